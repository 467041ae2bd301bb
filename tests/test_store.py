"""The content-addressed store: round trips, checksums, bad digests, atomic writes, refs and documents."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fl_unlearn.store as store_mod
from fl_unlearn.errors import StoreError
from fl_unlearn.store import Store

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8]


def _files(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


def _tmp_files(root):
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


def _tensor(dtype: torch.dtype, shape: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    return torch.randint(0, 250, shape, generator=g).to(dtype)


@settings(max_examples=30, deadline=None)
@given(
    specs=st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 4), max_size=3), st.integers(0, 2**31)),
        min_size=1,
        max_size=4,
    ),
    meta=st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5) | st.none(), max_size=3),
)
def test_round_trip_keeps_dtype_shape_values(tmp_path_factory, specs, meta):
    store = Store(tmp_path_factory.mktemp("store"))
    tensors = {k: _tensor(dt, shape, seed) for k, (dt, shape, seed) in specs.items()}
    digest = store.put(tensors, meta)
    back = store.get(digest)
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t)
    assert store.meta(digest) == meta


def test_digest_is_sha256_of_file_bytes(tmp_path):
    store = Store(tmp_path)
    digest = store.put({"w": torch.arange(6.0).reshape(2, 3)})
    path = tmp_path / "objects" / digest[:2] / f"{digest}.safetensors"
    assert store.path(digest) == path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_put_is_idempotent(tmp_path):
    store = Store(tmp_path)
    a = store.put({"w": torch.ones(3), "b": torch.zeros(1)}, {"round": 1})
    b = store.put({"b": torch.zeros(1), "w": torch.ones(3)}, {"round": 1})
    assert a == b and len(_files(tmp_path / "objects")) == 1
    assert store.put({"w": torch.ones(3), "b": torch.zeros(1)}, {"round": 2}) != a  # meta is content


def test_accepts_views_noncontiguous_grad_and_shared_tensors(tmp_path):
    store = Store(tmp_path)
    base = torch.arange(12.0, requires_grad=True)
    w = base.detach().reshape(3, 4)
    tensors = {"t": w.t(), "tied_a": w, "tied_b": w, "grad": base * 2}
    back = store.get(store.put(tensors))
    for k, t in tensors.items():
        assert torch.equal(back[k], t.detach())


def test_flipped_byte_is_detected(tmp_path):
    store = Store(tmp_path)
    digest = store.put({"w": torch.randn(64)})
    path = store.path(digest)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"{digest}.*corrupt") as info:
        store.get(digest)
    assert str(path) in str(info.value)
    with pytest.raises(StoreError, match="corrupt"):
        store.meta(digest)


def test_put_repairs_a_damaged_object(tmp_path):
    store = Store(tmp_path)
    tensors = {"w": torch.randn(8)}
    digest = store.put(tensors)
    store.path(digest).write_bytes(b"garbage")
    assert store.put(tensors) == digest
    assert torch.equal(store.get(digest)["w"], tensors["w"])


def test_missing_digest_raises(tmp_path):
    digest = "ab" * 32
    with pytest.raises(StoreError, match=f"object {digest} not found"):
        Store(tmp_path).get(digest)
    assert not Store(tmp_path).has(digest)


@pytest.mark.parametrize(
    "digest", ["../../etc/passwd", "../" + "a" * 61, "a" * 63, "A" * 64, "g" * 64, "a" * 64 + "/x", "", None, 5]
)
def test_malformed_or_traversal_digest_raises(tmp_path, digest):
    store = Store(tmp_path)
    with pytest.raises(StoreError, match="invalid digest"):
        store.get(digest)
    with pytest.raises(StoreError, match="invalid digest"):
        store.has(digest)


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ({}, "empty dict"),
        ([torch.ones(1)], "dict"),
        ({"": torch.ones(1)}, "non-empty strings"),
        ({1: torch.ones(1)}, "non-empty strings"),
        ({"w": [1.0, 2.0]}, "'w' is a list"),
        ({"w": torch.ones(2, 2).to_sparse()}, r"to_dense\(\)"),
        ({"w": torch.ones(2, dtype=torch.complex64)}, "cannot be stored"),
    ],
)
def test_bad_tensors_are_refused_before_writing(tmp_path, tensors, match):
    store = Store(tmp_path)
    with pytest.raises(StoreError, match=match):
        store.put(tensors)
    assert _files(tmp_path) == []


def test_bad_meta_is_refused(tmp_path):
    with pytest.raises(StoreError, match="JSON"):
        Store(tmp_path).put({"w": torch.ones(1)}, {"x": object()})
    with pytest.raises(StoreError, match="JSON"):
        Store(tmp_path).put({"w": torch.ones(1)}, {"x": float("nan")})
    assert _files(tmp_path) == []


def test_atomic_writes_leave_no_temp_files(tmp_path):
    store = Store(tmp_path)
    for i in range(5):
        d = store.put({"w": torch.full((4,), float(i))})
        store.set_ref("latest-global", d)
        store.put_json(f"results/run-{i}", {"i": i})
    assert _tmp_files(tmp_path) == []


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    store = Store(tmp_path)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store_mod.os, "replace", fail)
    with pytest.raises(StoreError, match="disk full"):
        store.put({"w": torch.ones(2)})
    with pytest.raises(StoreError, match="disk full"):
        store.put_json("state", {"a": 1})
    assert _files(tmp_path) == []


def test_refs(tmp_path):
    store = Store(tmp_path)
    assert store.get_ref("latest-global") is None
    a, b = store.put({"w": torch.ones(1)}), store.put({"w": torch.zeros(1)})
    store.set_ref("latest-global", a)
    store.set_ref("latest-global", b)
    assert store.get_ref("latest-global") == b
    with pytest.raises(StoreError, match="no such object"):
        store.set_ref("latest-global", "cd" * 32)
    assert store.get_ref("latest-global") == b


@pytest.mark.parametrize("name", ["../x", "a/../../x", ".hidden", "", "a//b", "/abs", None])
def test_bad_names_are_refused(tmp_path, name):
    store = Store(tmp_path)
    with pytest.raises(StoreError, match="invalid"):
        store.put_json(name, {})
    with pytest.raises(StoreError, match="invalid"):
        store.get_ref(name)


def test_corrupt_ref_is_reported(tmp_path):
    store = Store(tmp_path)
    (tmp_path / "refs" / "r.json").write_text('{"digest": "../x"}')
    with pytest.raises(StoreError, match="corrupt"):
        store.get_ref("r")


def test_json_documents(tmp_path):
    store = Store(tmp_path)
    assert store.get_json("requests/abc") is None
    assert store.get_json("requests/abc", default={}) == {}
    store.put_json("requests/abc", {"state": "journaled", "ids": [1, 2]})
    assert store.get_json("requests/abc") == {"state": "journaled", "ids": [1, 2]}
    (tmp_path / "docs" / "broken.json").write_text("{")
    with pytest.raises(StoreError, match="corrupt"):
        store.get_json("broken")
    with pytest.raises(StoreError, match="JSON"):
        store.put_json("x", {"nan": float("nan")})


def test_store_reopens_existing_root(tmp_path):
    digest = Store(tmp_path).put({"w": torch.ones(2)})
    assert Store(str(tmp_path)).has(digest)


def test_no_temp_files_after_interrupted_write_of_objects(tmp_path, monkeypatch):
    store = Store(tmp_path)
    real_fsync = os.fsync

    def fail_fsync(fd):
        real_fsync(fd)
        raise OSError("fsync failed")

    monkeypatch.setattr(store_mod.os, "fsync", fail_fsync)
    with pytest.raises(StoreError, match="fsync failed"):
        store.put({"w": torch.ones(2)})
    assert _tmp_files(tmp_path) == [] and _files(tmp_path / "objects") == []


def test_erase_leaves_a_tombstone_that_reads_report(tmp_path):
    store = Store(tmp_path)
    digest = store.put({"w": torch.ones(3)}, {"node": "a"})
    other = store.put({"w": torch.zeros(3)})
    assert store.objects() == sorted([digest, other])
    assert store.erase(digest, "request r1 replaced it") is True
    assert not store.has(digest) and store.objects() == [other]
    assert store.erased(digest)["reason"] == "request r1 replaced it" and store.erased(other) is None
    for read in (store.get, store.meta, store.verify):
        with pytest.raises(StoreError, match="erased .*request r1 replaced it"):
            read(digest)
    assert store.erase(digest, "again") is False  # idempotent; the first reason stays
    assert store.erased(digest)["reason"] == "request r1 replaced it"
    assert torch.equal(store.get(other)["w"], torch.zeros(3))


def test_erase_needs_a_reason_and_a_valid_digest(tmp_path):
    store = Store(tmp_path)
    digest = store.put({"w": torch.ones(3)})
    with pytest.raises(StoreError, match="reason"):
        store.erase(digest, " ")
    with pytest.raises(StoreError, match="invalid digest"):
        store.erase("../" + digest[3:], "why")
    assert store.has(digest) and not (tmp_path / "erased").exists()


def test_an_erasure_cut_short_is_finished_by_erasing_again_or_undone_by_storing_again(tmp_path, monkeypatch):
    store = Store(tmp_path)
    tensors = {"w": torch.arange(4.0)}
    digest = store.put(tensors)
    real_unlink = Path.unlink

    def crash(self, *args, **kwargs):  # the tombstone is written, then the process dies before the delete
        if self.suffix == ".safetensors":
            raise KeyboardInterrupt("killed")
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", crash)
    with pytest.raises(KeyboardInterrupt):
        store.erase(digest, "superseded")
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert store.has(digest) and store.erased(digest) is not None
    assert store.put(tensors) == digest and store.erased(digest) is None  # stored again: no longer erased
    assert store.erase(digest, "superseded") and store.put(tensors) == digest
    assert torch.equal(store.get(digest)["w"], tensors["w"]) and store.erased(digest) is None


def test_refs_can_be_listed_and_deleted(tmp_path):
    store = Store(tmp_path)
    digest = store.put({"w": torch.ones(1)})
    for name in ("latest-global", "prepared-retain/abc", "prepared-retain/def"):
        store.set_ref(name, digest)
    assert store.refs() == ["latest-global", "prepared-retain/abc", "prepared-retain/def"]
    assert store.refs("prepared-retain/") == ["prepared-retain/abc", "prepared-retain/def"]
    assert store.delete_ref("prepared-retain/abc") is True and store.delete_ref("prepared-retain/abc") is False
    assert store.refs() == ["latest-global", "prepared-retain/def"] and store.has(digest)


def test_documents_can_be_listed(tmp_path):
    store = Store(tmp_path)
    for name in ("run", "erasures/req-1", "erasures/req-2"):
        store.put_json(name, {"name": name})
    assert store.docs() == ["erasures/req-1", "erasures/req-2", "run"]
    assert store.docs("erasures/") == ["erasures/req-1", "erasures/req-2"] and store.docs("x") == []


def test_put_many_stores_each_item_as_put_would_and_bad_input_writes_nothing(tmp_path):
    items = [({"w": torch.full((3, 2), float(i))}, {"i": i}) for i in range(6)]
    items.append(items[1])  # the same object twice: one file, the same digest
    many = Store(tmp_path / "many")
    digests = many.put_many(items)
    one = Store(tmp_path / "one")
    assert digests == [one.put(t, m) for t, m in items]  # in order, the digests put gives
    for (tensors, meta), digest in zip(items, digests):
        assert torch.equal(many.get(digest)["w"], tensors["w"]) and many.meta(digest) == meta
    assert len(_files(many.root / "objects")) == 6 and not _tmp_files(many.root)
    fresh = Store(tmp_path / "fresh")
    with pytest.raises(StoreError):  # the last item is refused before any is written
        fresh.put_many([({"w": torch.ones(2)}, None), ({"w": torch.ones(2)}, {"bad": float("nan")})])
    assert not _files(fresh.root)

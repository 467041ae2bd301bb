"""The lineage DAG: roots/affected against brute force, refused changes, journal durability, drawing."""

from __future__ import annotations

import doctest
import json
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fl_unlearn.lineage as lineage_mod
from fl_unlearn.errors import LineageError, RequestError
from fl_unlearn.lineage import JOURNAL, SNAPSHOT, LineageGraph, ModelNode, TrainingData, sample_ids_reader
from fl_unlearn.requests import UnlearningRequest
from fl_unlearn.store import Store

# --------------------------------------------------------------------------------------------------
# random DAGs against a brute-force BFS
# --------------------------------------------------------------------------------------------------


@st.composite
def random_dags(draw):
    """Node specs in topological order: (parents, data or None, sample ids)."""
    specs = []
    for i in range(draw(st.integers(1, 14))):
        parents = sorted(draw(st.sets(st.integers(0, i - 1), max_size=3))) if i else []
        has_data = draw(st.booleans())
        hist = draw(st.dictionaries(st.integers(0, 5), st.integers(0, 3), max_size=3))
        client = draw(st.integers(0, 3))
        samples = draw(st.sets(st.integers(0, 20), max_size=5))
        specs.append((parents, TrainingData(client, hist) if has_data else None, samples))
    return specs


requests_st = st.one_of(
    st.sets(st.integers(0, 6), min_size=1, max_size=3).map(UnlearningRequest.for_classes),
    st.sets(st.integers(0, 4), min_size=1, max_size=2).map(UnlearningRequest.for_clients),
    st.dictionaries(st.integers(0, 4), st.sets(st.integers(0, 20), min_size=1, max_size=4), min_size=1, max_size=2).map(
        UnlearningRequest.for_samples
    ),
)


def _build(specs) -> LineageGraph:
    g = LineageGraph()
    for i, (parents, data, _) in enumerate(specs):
        owner = "server" if data is None else f"client:{data.client}"
        g.add_node(f"n{i}", "local" if data else "global", parents=[f"n{p}" for p in parents], round=i, owner=owner,
                   data=data)  # fmt: skip
    return g


def _brute_roots(specs, request) -> set[int]:
    out = set()
    for i, (_, data, samples) in enumerate(specs):
        if data is None:
            continue
        if request.kind == "classes":
            hit = any(data.class_histogram.get(c, 0) > 0 for c in request.classes)
        elif request.kind == "client":
            hit = data.client in request.clients
        else:
            hit = data.client in request.samples and bool(samples & set(request.samples[data.client]))
        if hit:
            out.add(i)
    return out


def _brute_affected(specs, roots: set[int]) -> list[str]:
    children = {i: [j for j, (ps, _, _) in enumerate(specs) if i in ps] for i in range(len(specs))}
    seen, queue = set(roots), deque(roots)
    while queue:
        for j in children[queue.popleft()]:
            if j not in seen:
                seen.add(j)
                queue.append(j)
    return [f"n{i}" for i in sorted(seen)]


@settings(max_examples=60, deadline=None)
@given(random_dags(), requests_st)
def test_affected_equals_roots_plus_descendants(specs, request):
    g = _build(specs)
    ids_of = {f"n{i}": s for i, (_, _, s) in enumerate(specs)}
    roots = g.roots(request, sample_ids_of=lambda n: ids_of[n.id])
    assert roots == [f"n{i}" for i in sorted(_brute_roots(specs, request))]
    affected = g.affected(request, sample_ids_of=lambda n: ids_of[n.id])
    assert affected == _brute_affected(specs, _brute_roots(specs, request))
    # chronological, a superset of the roots, and closed under children
    seqs = [g.node(i).seq for i in affected]
    assert seqs == sorted(seqs) and set(roots) <= set(affected)
    assert all(set(g.children(i)) <= set(affected) for i in affected)


@settings(max_examples=20, deadline=None)
@given(random_dags())
def test_sample_roots_without_callback_take_every_node_of_the_client(specs):
    g = _build(specs)
    request = UnlearningRequest.for_samples({1: [0]})
    expected = [f"n{i}" for i, (_, d, _) in enumerate(specs) if d is not None and d.client == 1]
    assert g.roots(request) == expected


# --------------------------------------------------------------------------------------------------
# refused changes leave the graph unchanged
# --------------------------------------------------------------------------------------------------


def _chain(directory=None) -> LineageGraph:
    g = LineageGraph(directory)
    g.add_node("g0", "global", round=0)
    g.add_node("c0", "local", round=1, parents=["g0"], owner="client:0", data=TrainingData(0, {7: 5, 1: 2}))
    g.add_node("g1", "global", round=1, parents=["c0"])
    return g


def _refused(g: LineageGraph, call, match: str) -> None:
    before = g.to_json()
    journal = (g.directory / JOURNAL).read_bytes() if g.directory else None
    with pytest.raises(LineageError, match=match):
        call()
    assert g.to_json() == before
    if g.directory:
        assert (g.directory / JOURNAL).read_bytes() == journal


def test_cycle_is_refused(tmp_path):
    g = _chain(tmp_path)
    _refused(g, lambda: g.add_edge("g1", "g0"), "would make a cycle")
    _refused(g, lambda: g.add_edge("g1", "g1"), "would make a cycle")
    _refused(g, lambda: g.add_node("x", "global", parents=["x"]), "itself as a parent")


def test_unknown_parent_is_refused(tmp_path):
    g = _chain(tmp_path)
    _refused(g, lambda: g.add_node("x", "global", parents=["g1", "nope"]), r"unknown parents \['nope'\]")


def test_duplicate_id_and_repeated_parent_are_refused(tmp_path):
    g = _chain(tmp_path)
    _refused(g, lambda: g.add_node("g1", "global"), "duplicate node id 'g1'")
    _refused(g, lambda: g.add_node("x", "global", parents=["g0", "g0"]), "more than once")


def test_backward_and_existing_edges_are_refused(tmp_path):
    g = _chain(tmp_path)
    g.add_node("d", "derived", owner="client:2")
    _refused(g, lambda: g.add_edge("d", "g1"), "back in time")
    _refused(g, lambda: g.add_edge("g0", "c0"), "already exists")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "aggregate"}, "unknown kind"),
        ({"owner": "client-3"}, "owner"),
        ({"round": -1}, "round"),
        ({"shard": True}, "shard"),
        ({"parents": "g0"}, "not the string"),
        ({"meta": {"x": float("nan")}}, "JSON"),
        ({"data": {"client": 1}}, "TrainingData"),
        ({"weights": ""}, "weights"),
    ],
)
def test_bad_fields_are_refused(kwargs, match):
    g = _chain()
    args = {"kind": "global", **kwargs}
    _refused(g, lambda: g.add_node("x", args.pop("kind"), **args), match)


def test_training_data_checks():
    with pytest.raises(LineageError, match="class_histogram"):
        TrainingData(0, {"7": 1})
    with pytest.raises(LineageError, match="client"):
        TrainingData(-1, {})
    assert hash(TrainingData(0, {1: 2})) == hash(TrainingData(0, {1: 2}))


def test_update_node_sets_references_once(tmp_path):
    g = _chain(tmp_path)
    node = g.update_node("g1", weights="w" * 64, meta={"acc": 0.5})
    assert node.weights == "w" * 64 and g.node("g1").meta == {"acc": 0.5}
    lines = (tmp_path / JOURNAL).read_bytes().count(b"\n")
    g.update_node("g1", weights="w" * 64)  # same value: a no-op, nothing journaled
    assert (tmp_path / JOURNAL).read_bytes().count(b"\n") == lines
    _refused(g, lambda: g.update_node("g1", weights="v" * 64), "already has weights")
    _refused(g, lambda: g.update_node("g1", round=3), r"cannot update \['round'\]")
    _refused(g, lambda: g.update_node("nope", weights="x"), "unknown node 'nope'")
    assert g.update_node("g1", meta={"loss": 1.0}).meta == {"acc": 0.5, "loss": 1.0}


def test_queries_and_unknown_nodes():
    g = _chain()
    assert [n.id for n in g.nodes()] == ["g0", "c0", "g1"] and len(g) == 3 and "c0" in g
    assert g.parents("g1") == ["c0"] and g.children("g0") == ["c0"] and g.descendants("g0") == ["c0", "g1"]
    assert g.node("c0").client == 0 and g.node("g0").client is None
    for call in (g.node, g.parents, g.children, g.descendants):
        with pytest.raises(LineageError, match="unknown node"):
            call("nope")


def test_nodes_are_hashable_and_meta_read_only():
    node = _chain().node("c0")
    assert hash(node) == hash(node)
    with pytest.raises(TypeError):
        node.meta["x"] = 1  # type: ignore[index]


def test_roots_rejects_a_non_request():
    with pytest.raises(RequestError, match="kind"):
        _chain().roots(object())  # type: ignore[arg-type]


def test_sample_roots_with_store_reader(tmp_path):
    store = Store(tmp_path)
    g = LineageGraph()
    data_a = TrainingData.from_samples(5, [0, 1, 1], [10, 11, 12], store=store)
    data_b = TrainingData.from_samples(5, [2], [13], store=store)
    g.add_node("a", "local", round=1, owner="client:5", data=data_a)
    g.add_node("b", "local", round=2, owner="client:5", data=data_b)
    g.add_node("g", "global", round=2, parents=["b"])
    request = UnlearningRequest.for_samples({5: [13]})
    assert g.roots(request, sample_ids_of=sample_ids_reader(store)) == ["b"]
    assert g.affected(request, sample_ids_of=sample_ids_reader(store)) == ["b", "g"]
    assert g.node("a").data.class_histogram == {0: 1, 1: 2}
    assert g.node("a").data.sample_digest == lineage_mod.sample_digest([12, 11, 10])


# --------------------------------------------------------------------------------------------------
# durability
# --------------------------------------------------------------------------------------------------


def _grow(g: LineageGraph, start: int, count: int) -> None:
    for i in range(start, start + count):
        data = TrainingData(i % 3, {i % 10: 4}, (0, 1), "d" * 64)
        meta = {"lr": 0.1, "tags": ("a", "b")}  # a tuple: stored as a JSON list, equal after reload
        g.add_node(f"c{i}", "local", round=i, parents=["g1"], owner=f"client:{i % 3}", data=data, meta=meta)


def test_journal_reload_round_trips(tmp_path):
    g = _chain(tmp_path)
    _grow(g, 10, 3)
    g.update_node("g1", weights="a" * 64, retain_fisher="b" * 64)
    g.snapshot()
    assert (tmp_path / JOURNAL).read_bytes() == b""
    _grow(g, 20, 3)
    g.add_node("d", "derived", parents=["c10", "c20"], owner="client:1", request_id="r1")
    g.add_edge("c11", "d")
    g.update_node("c20", meta={"acc": 0.9})
    loaded = LineageGraph.load(tmp_path)
    assert loaded == g and loaded.to_json() == g.to_json()
    # a loaded graph keeps journaling where the old one stopped
    loaded.add_node("e", "global", parents=["d"])
    assert LineageGraph.load(tmp_path) == loaded
    assert loaded.node("e").seq == g.node("d").seq + 1


def test_crash_between_snapshot_and_truncation_replays_nothing_twice(tmp_path):
    g = _chain(tmp_path)
    journal = (tmp_path / JOURNAL).read_bytes()
    g.snapshot()
    (tmp_path / JOURNAL).write_bytes(journal)  # as if the truncation never happened
    assert LineageGraph.load(tmp_path) == g


def test_torn_last_line_is_ignored_with_a_warning(tmp_path):
    g = _chain(tmp_path)
    with open(tmp_path / JOURNAL, "ab") as f:
        f.write(b'{"lsn": 4, "op": "add", "node": {"id": "x", "ki')
    with pytest.warns(RuntimeWarning, match="torn last line"):
        loaded = LineageGraph.load(tmp_path)
    assert loaded == g
    loaded.add_node("y", "global", parents=["g1"])  # the torn tail was cut, so this line starts clean
    assert "y" in LineageGraph.load(tmp_path)


def test_complete_last_line_without_newline_is_kept(tmp_path):
    g = _chain(tmp_path)
    raw = (tmp_path / JOURNAL).read_bytes()
    (tmp_path / JOURNAL).write_bytes(raw.rstrip(b"\n"))
    loaded = LineageGraph.load(tmp_path)
    assert loaded == g
    loaded.add_node("y", "global")
    assert len(LineageGraph.load(tmp_path)) == 4


def test_corrupt_middle_line_is_an_error(tmp_path):
    _chain(tmp_path)
    lines = (tmp_path / JOURNAL).read_bytes().splitlines(keepends=True)
    lines[1] = b"{garbage\n"
    (tmp_path / JOURNAL).write_bytes(b"".join(lines))
    with pytest.raises(LineageError, match="line 2 is corrupt"):
        LineageGraph.load(tmp_path)


def test_missing_journal_line_is_an_error(tmp_path):
    _chain(tmp_path)
    lines = (tmp_path / JOURNAL).read_bytes().splitlines(keepends=True)
    (tmp_path / JOURNAL).write_bytes(lines[0] + lines[2])
    with pytest.raises(LineageError, match="lsn 3 follows 1"):
        LineageGraph.load(tmp_path)


def test_journal_record_breaking_an_invariant_is_an_error(tmp_path):
    _chain(tmp_path)
    record = json.loads((tmp_path / JOURNAL).read_bytes().splitlines()[2])
    record["lsn"] = 4
    with open(tmp_path / JOURNAL, "ab") as f:
        f.write(json.dumps(record).encode() + b"\n")  # adds g1 a second time
    with pytest.raises(LineageError, match="line 4: duplicate node id 'g1'"):
        LineageGraph.load(tmp_path)


def test_directory_rules(tmp_path):
    _chain(tmp_path / "a")
    with pytest.raises(LineageError, match="already holds a lineage"):
        LineageGraph(tmp_path / "a")
    with pytest.raises(LineageError, match="no lineage"):
        LineageGraph.load(tmp_path / "b")
    assert len(LineageGraph.open(tmp_path / "a")) == 3 and len(LineageGraph.open(tmp_path / "b")) == 0
    with pytest.raises(LineageError, match="needs a directory"):
        LineageGraph().snapshot()


def test_corrupt_snapshot_is_an_error(tmp_path):
    _chain(tmp_path).snapshot()
    (tmp_path / SNAPSHOT).write_text('{"format": "other"}')
    with pytest.raises(LineageError, match="malformed"):
        LineageGraph.load(tmp_path)


def test_to_json_from_json_round_trip():
    g = _chain()
    _grow(g, 1, 4)
    assert LineageGraph.from_json(g.to_json()) == g
    with pytest.raises(LineageError, match="corrupt"):
        LineageGraph.from_json("{")
    node = g.node("c1")
    assert ModelNode.from_dict(json.loads(json.dumps(node.to_dict()))) == node


# --------------------------------------------------------------------------------------------------
# drawing and docs
# --------------------------------------------------------------------------------------------------


def test_render_png_writes_a_png(tmp_path):
    g = LineageGraph()
    g.add_node("g0", "global", round=0)
    prev = "g0"
    for r in range(1, 13):  # ~100 nodes: 12 rounds x (7 clients + 1 global)
        locals_ = []
        for c in range(7):
            g.add_node(f"c{c}r{r}", "local", round=r, parents=[prev], owner=f"client:{c}",
                       data=TrainingData(c, {c: 10}))  # fmt: skip
            locals_.append(f"c{c}r{r}")
        g.add_node(f"g{r}", "global", round=r, parents=locals_)
        prev = f"g{r}"
    g.add_node("d", "derived", parents=[prev], owner="client:2", data=TrainingData(2, {2: 3}))
    affected = g.affected(UnlearningRequest.for_classes([3]))
    path = g.render_png(tmp_path / "lineage.png", highlight=affected)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(LineageError, match="unknown nodes"):
        g.render_png(tmp_path / "x.png", highlight=["nope"])


def test_render_png_small_and_empty(tmp_path):
    assert _chain().render_png(tmp_path / "a.png").stat().st_size > 0
    assert LineageGraph().render_png(tmp_path / "b.png").stat().st_size > 0


def test_docstring_examples():
    assert doctest.testmod(lineage_mod).failed == 0


def test_journal_lines_are_one_json_object_each(tmp_path):
    g = _chain(tmp_path)
    g.update_node("c0", weights="f" * 64)
    records = [json.loads(line) for line in (tmp_path / JOURNAL).read_text().splitlines()]
    assert [r["lsn"] for r in records] == [1, 2, 3, 4]
    assert [r["op"] for r in records] == ["add", "add", "add", "update"]



def test_failed_journal_write_changes_nothing(tmp_path, monkeypatch):
    g = _chain(tmp_path)
    before, journal = g.to_json(), (tmp_path / JOURNAL).read_bytes()

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(lineage_mod.os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        g.add_node("x", "global", parents=["g1"])
    monkeypatch.undo()
    assert g.to_json() == before and (tmp_path / JOURNAL).read_bytes() == journal
    g.add_node("x", "global", parents=["g1"])
    assert LineageGraph.load(tmp_path) == g


def test_ancestors_mirror_descendants():
    from fl_unlearn.lineage import LineageGraph

    g = LineageGraph()
    g.add_node("a", "local")
    g.add_node("b", "local")
    g.add_node("c", "global", parents=("a", "b"))
    g.add_node("d", "derived", parents=("c",))
    assert g.ancestors("d") == ["a", "b", "c"]
    assert g.ancestors("a") == []
    assert all(n in g.descendants(a) for n in ("d",) for a in g.ancestors("d"))


def test_superseded_models_are_left_out_of_a_later_request_when_asked():
    """An unlearned version replaces its original, a repaired model its unrepaired version; a later request
    unlearns what replaced them (skip_superseded), never the replaced models again."""
    g = LineageGraph()
    g.add_node("l1", "local", round=1, owner="client:0", data=TrainingData(0, {3: 5, 5: 5}))
    g.add_node("g1", "global", round=1, parents=("l1",))
    g.add_node("g2", "global", round=2, parents=("g1",))
    g.add_node("l1~u", "local", round=1, parents=("l1",), request_id="r1", meta={"unlearned-from": "l1"})
    g.add_node("g1~u", "global", round=1, parents=("g1",), request_id="r1", meta={"unlearned-from": "g1"})
    g.add_node("g1~u~repair", "global", round=1, parents=("g1~u",), request_id="r1", meta={"repair-of": "g1~u"})
    request = UnlearningRequest.for_classes([5])
    assert g.superseded() == {"l1", "g1", "g1~u"}
    assert g.affected(request) == ["l1", "g1", "g2", "l1~u", "g1~u", "g1~u~repair"]
    # g2 has no version (nothing replaced it): it stays in
    assert g.affected(request, skip_superseded=True) == ["g2", "l1~u", "g1~u~repair"]

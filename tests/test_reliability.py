"""Reliability: the request journal, crash recovery (kill -9 at every state), client faults, tampering, locking.

The crash tests run a small core-level unlearn (``fl_unlearn.recovery.serve_request`` with in-process steps:
store-held models dampened with ``unlearn_many``, client-held models dampened in per-client stores) in a
forked child that SIGKILLs itself right after a journal state is written; the parent then restarts the same
request and compares every model with an uninterrupted run's (``torch.equal``). The client-fault test runs
the real server wrapper and client handlers over an in-process fake Grid (four clients, one failing).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from fl_unlearn.erasure import PREPARED_RETAIN_REF, erase_superseded
from fl_unlearn.errors import LineageError, RequestError, StoreError, UnlearnError
from fl_unlearn.fiun import FIUnConfig, unlearn_many
from fl_unlearn.journal import RequestJournal
from fl_unlearn.lineage import LineageGraph, TrainingData
from fl_unlearn.mfim import merge_fishers
from fl_unlearn.recovery import (
    ClientFailure,
    ClientsDone,
    Dampened,
    Fishers,
    plan_request,
    serve_request,
    version_id,
)
from fl_unlearn.requests import UnlearningRequest
from fl_unlearn.store import Store

REQUEST = UnlearningRequest.for_classes([3], id="req-crash", created=0.0)
CLIENTS = (0, 1, 2)


# ------------------------------------------------------------------------------------------------------
# a small world: 3 clients, one round, one derived model per client (held by the client)
# ------------------------------------------------------------------------------------------------------


def _tensors(gen: torch.Generator, positive: bool = False) -> dict[str, torch.Tensor]:
    make = torch.rand if positive else torch.randn
    return {"fc.weight": make(6, 4, generator=gen), "fc.bias": make(6, generator=gen)}


def build_world(root: Path) -> Path:
    """Store + lineage under ``root/store``; client stores under ``root/store/clients/<pid>``."""
    gen = torch.Generator().manual_seed(0)
    store = Store(root / "store")
    graph = LineageGraph(root / "store" / "lineage")
    graph.add_node("global-r0", "global", round=0, weights=store.put(_tensors(gen)))
    for pid in CLIENTS:
        hist = {3: 5, 1: 4} if pid != 2 else {1: 9}
        graph.add_node(f"local-r1-p{pid}", "local", round=1, parents=("global-r0",), owner=f"client:{pid}",
                       data=TrainingData(pid, hist), weights=store.put(_tensors(gen)),
                       retain_fisher=store.put(_tensors(gen, True)), meta={"held-by": "server"})
    graph.add_node("global-r1", "global", round=1, parents=tuple(f"local-r1-p{p}" for p in CLIENTS),
                   weights=store.put(_tensors(gen)), retain_fisher=store.put(_tensors(gen, True)))
    store.set_ref("latest-global", graph.node("global-r1").weights)
    for pid in CLIENTS:
        client = Store(root / "store" / "clients" / str(pid))
        node_id = f"derived-p{pid}"
        client.put_json("models", {node_id: {"weights": client.put(_tensors(gen)),
                                             "retain-fisher": client.put(_tensors(gen, True))}})
        graph.add_node(node_id, "derived", round=1, parents=("global-r1",), owner=f"client:{pid}",
                       data=TrainingData(pid, {1: 3}), meta={"held-by": f"client:{pid}"})
    return root / "store"


class CoreSteps:
    """In-process steps: deterministic forget-Fishers per holder, FIUn on stored weights, fake clients."""

    def __init__(self, store_dir: Path, graph: LineageGraph, failing: set[int] = frozenset()) -> None:
        self.store_dir, self.graph, self.failing = store_dir, graph, set(failing)
        self.store = Store(store_dir)
        self.calls: list[str] = []

    def plan(self):
        return plan_request(self.graph, self.store, self.graph.roots(REQUEST), self.graph.affected(REQUEST))

    def gather(self, plan):
        self.calls.append("gather")
        holders = sorted({self.graph.node(r).data.client for r in plan.roots})
        fishers = [_tensors(torch.Generator().manual_seed(100 + p), True) for p in holders]
        merged = merge_fishers(fishers, num_samples=[5] * len(fishers), mode="weighted_mean")
        return Fishers({m: merged for m in plan.targets}, None, {p: 5 for p in holders})

    def dampen(self, plan, todo, fishers):
        self.calls.append("dampen")
        nodes = [self.graph.node(m) for m in todo]
        new, _ = unlearn_many([self.store.get(n.weights) for n in nodes],
                              [self.store.get(n.retain_fisher) for n in nodes], [fishers.forget[m] for m in todo],
                              FIUnConfig())
        return Dampened({m: self.store.put(w, {"unlearned-from": m}) for m, w in zip(todo, new)}, {}, [])

    def unlearn_clients(self, plan, todo, fishers, done):
        self.calls.append("clients")
        out = ClientsDone()
        for pid, ids in todo.items():
            if pid in self.failing:
                out.failures[pid] = "simulated crash of the client"
                continue
            client = Store(self.store_dir / "clients" / str(pid))
            index = client.get_json("models")
            new, _ = unlearn_many([client.get(index[m]["weights"]) for m in ids],
                                  [client.get(index[m]["retain-fisher"]) for m in ids],
                                  [fishers.forget[m] for m in ids], FIUnConfig())
            out.digests.update({m: client.put(w, {"unlearned-from": m}) for m, w in zip(ids, new)})
        return out


def serve(store_dir: Path, *, failing: set[int] = frozenset(), hook=None):
    graph = LineageGraph.load(store_dir / "lineage")
    store = Store(store_dir)
    steps = CoreSteps(store_dir, graph, failing)
    with store.lock():
        progress = serve_request(RequestJournal.for_store(store), REQUEST, graph, store, steps,
                                 refs=("latest-global",), hook=hook)
    return progress, steps


def final_models(store_dir: Path) -> dict[str, torch.Tensor]:
    """Every unlearned version's tensors (server- and client-held), keyed by lineage id and tensor name."""
    graph = LineageGraph.load(store_dir / "lineage")
    out = {}
    for node in graph.nodes():
        if node.request_id is None:
            continue
        if node.weights is not None:
            tensors = Store(store_dir).get(node.weights)
        else:
            tensors = Store(store_dir / "clients" / str(node.client)).get(node.meta["client-weights"])
        out.update({f"{node.id}/{k}": v for k, v in tensors.items()})
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A world, and its models after one uninterrupted run."""
    root = tmp_path_factory.mktemp("world")
    pristine = build_world(root)
    done = tmp_path_factory.mktemp("reference") / "store"
    shutil.copytree(pristine, done)
    progress, _ = serve(done)
    assert progress.state == "verified" and not progress.missing
    return pristine, final_models(done)


def _crash_at(point: str):
    def hook(state: str) -> None:
        if state == point:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _child(store_dir: str, point: str) -> None:
    serve(Path(store_dir), hook=_crash_at(point))
    os._exit(0)  # not killed: the crash point was never reached


# ------------------------------------------------------------------------------------------------------
# crash recovery
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["received", "fisher-collected", "dampened", "recorded", "applied", "verified"])
def test_kill_at_each_state_then_restart_equals_an_uninterrupted_run(point, reference, tmp_path):
    pristine, expected = reference
    store_dir = tmp_path / "store"
    shutil.copytree(pristine, store_dir)
    child = multiprocessing.get_context("fork").Process(target=_child, args=(str(store_dir), point))
    child.start()
    child.join(60)
    if child.is_alive():  # hung (it should have killed itself): end it, and fail below
        child.kill()
        child.join()
    assert child.exitcode == -signal.SIGKILL, f"the child was not killed at {point!r} (exit {child.exitcode})"
    journaled = "dampened" if point == "recorded" else point  # "recorded": killed after the first lineage node
    assert RequestJournal.for_store(Store(store_dir)).state(REQUEST.id) == journaled
    if point == "verified":
        with pytest.raises(RequestError, match="already applied"):
            serve(store_dir)
    else:
        progress, steps = serve(store_dir)
        assert progress.state == "verified" and progress.resumed_from is not None
        # From "dampened" on, nothing is dampened again: the journaled digests are recorded.
        assert ("dampen" in steps.calls) == (point in ("received", "fisher-collected"))
    got = final_models(store_dir)
    assert got.keys() == expected.keys()  # one version per model: none missing, none twice
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    graph = LineageGraph.load(store_dir / "lineage")
    assert Store(store_dir).get_ref("latest-global") == graph.node(version_id("global-r1", REQUEST)).weights


def test_a_served_request_is_refused_a_second_time(reference, tmp_path):
    pristine, _ = reference
    store_dir = tmp_path / "store"
    shutil.copytree(pristine, store_dir)
    serve(store_dir)
    with pytest.raises(RequestError, match="already applied"):
        serve(store_dir)
    other = UnlearningRequest.for_classes([1], id=REQUEST.id, created=0.0)  # same id, other content
    graph, store = LineageGraph.load(store_dir / "lineage"), Store(store_dir)
    with pytest.raises(RequestError, match="different content"):
        serve_request(RequestJournal.for_store(store), other, graph, store, CoreSteps(store_dir, graph))


def test_lineage_records_the_request_of_every_version(reference, tmp_path):
    pristine, _ = reference
    store_dir = tmp_path / "store"
    shutil.copytree(pristine, store_dir)
    progress, _ = serve(store_dir)
    graph = LineageGraph.load(store_dir / "lineage")
    assert set(progress.versions) == set(progress.plan.targets)
    for old, new in progress.versions.items():
        assert graph.node(new).request_id == REQUEST.id and graph.node(new).parents == (old,)


# ------------------------------------------------------------------------------------------------------
# client faults (core): incomplete, then finished by a later run
# ------------------------------------------------------------------------------------------------------


def test_a_failed_client_leaves_the_request_incomplete_and_a_rerun_finishes_it(reference, tmp_path):
    pristine, expected = reference
    store_dir = tmp_path / "store"
    shutil.copytree(pristine, store_dir)
    progress, _ = serve(store_dir, failing={1})
    assert progress.state == "incomplete" and progress.missing == ["derived-p1"]
    assert "derived-p1" not in progress.versions and 1 in progress.failures
    assert not any(k.startswith("derived-p1~") for k in final_models(store_dir))  # nothing claimed
    progress, steps = serve(store_dir)
    assert progress.state == "verified" and progress.missing == [] and progress.resumed_from == "incomplete"
    assert steps.calls == ["clients"]  # only what was missing
    got = final_models(store_dir)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_failed_fisher_round_trip_changes_no_model(reference, tmp_path):
    pristine, expected = reference
    store_dir = tmp_path / "store"
    shutil.copytree(pristine, store_dir)

    class NoFishers(CoreSteps):
        def gather(self, plan):
            raise ClientFailure({0: "no reply within 1 s"})

    graph, store = LineageGraph.load(store_dir / "lineage"), Store(store_dir)
    progress = serve_request(RequestJournal.for_store(store), REQUEST, graph, store, NoFishers(store_dir, graph))
    assert progress.state == "incomplete" and progress.missing == progress.plan.targets and progress.versions == {}
    assert final_models(store_dir) == {}
    progress, _ = serve(store_dir)
    assert progress.state == "verified"
    got = final_models(store_dir)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


# ------------------------------------------------------------------------------------------------------
# tampering
# ------------------------------------------------------------------------------------------------------


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_tampered_checkpoint_is_refused_before_anything_is_written(reference, tmp_path):
    pristine, _ = reference
    store_dir = tmp_path / "store"
    shutil.copytree(pristine, store_dir)
    graph = LineageGraph.load(store_dir / "lineage")
    path = Store(store_dir).path(graph.node("local-r1-p1").weights)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    before = _tree(store_dir)
    with pytest.raises(StoreError, match="corrupt"):
        serve(store_dir)
    after = _tree(store_dir)
    after.pop("lock", None)
    before.pop("lock", None)
    assert after == before


@pytest.mark.parametrize("edit", ["flip", "drop-first", "swap"])
def test_tampered_journal_is_a_clear_error(edit, reference, tmp_path):
    pristine, _ = reference
    store_dir = tmp_path / "store"
    shutil.copytree(pristine, store_dir)
    serve(store_dir, failing={1})  # leaves an incomplete request to resume
    journal = RequestJournal.for_store(Store(store_dir))
    lines = journal.path.read_bytes().splitlines(keepends=True)
    if edit == "flip":
        lines[1] = lines[1].replace(b'"fisher-collected"', b'"fisher-collectee"')
    elif edit == "drop-first":
        lines = lines[1:]
    else:
        lines[1], lines[2] = lines[2], lines[1]
    journal.path.write_bytes(b"".join(lines))
    with pytest.raises(StoreError, match="request journal"):
        serve(store_dir)


def test_torn_last_journal_line_is_dropped(reference, tmp_path):
    pristine, _ = reference
    store_dir = tmp_path / "store"
    shutil.copytree(pristine, store_dir)
    journal = RequestJournal.for_store(Store(store_dir))
    journal.append("other", "received", {"x": 1})
    with open(journal.path, "ab") as f:
        f.write(b'{"seq": 2, "request": "other", "sta')  # a crash mid-append
    assert [e.state for e in journal.entries()] == ["received"]
    with pytest.warns(RuntimeWarning, match="torn"):
        journal.append("other", "incomplete", {"x": 2})
    assert [e.state for e in journal.entries()] == ["received", "incomplete"]


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but the lock file, by relative path: equal dicts, an unchanged store."""
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*"))
            if f.is_file() and "lock" not in f.name}


def _tombstoned(store: Store, digest: str) -> bool:
    return not store.has(digest) and store.erased(digest) is not None


def test_erasing_a_verified_request_deletes_what_it_replaced_and_nothing_live(reference, tmp_path):
    pristine, expected = reference
    store_dir = tmp_path / "store"
    shutil.copytree(pristine, store_dir)
    # a model outside the request that shares the original final global's weights: that object must stay
    graph = LineageGraph.load(store_dir / "lineage")
    original_final = graph.node("global-r1").weights
    graph.add_node("archive", "global", round=1, weights=original_final)
    Store(store_dir).set_ref(f"{PREPARED_RETAIN_REF}/{graph.node('local-r1-p0').weights}",
                             Store(store_dir).put(_tensors(torch.Generator().manual_seed(5), True)))
    serve(store_dir)
    graph, store = LineageGraph.load(store_dir / "lineage"), Store(store_dir)
    journal = RequestJournal.for_store(store)
    with store.lock():
        erasure = erase_superseded(journal, graph, store, REQUEST.id)
    assert erasure.models == ["local-r1-p0", "local-r1-p1"]  # global-r1's weights: shared with "archive", kept
    assert erasure.client_models == {p: [f"derived-p{p}"] for p in CLIENTS}
    assert erasure.kept == {original_final: "model archive"}
    for node_id in ("local-r1-p0", "local-r1-p1"):
        assert _tombstoned(store, graph.node(node_id).weights)
        assert store.get(graph.node(node_id).retain_fisher)  # shared with its unlearned version: live
    assert store.get(original_final)
    forget = set(journal.latest(REQUEST.id).doc["fishers"]["forget"].values())
    assert forget and all(_tombstoned(store, d) for d in forget)
    assert store.refs(PREPARED_RETAIN_REF) == []  # the retain-Fisher prepared on replaced weights went with them
    with pytest.raises(StoreError, match=f"erased .*{REQUEST.id}"):
        store.get(graph.node("local-r1-p0").weights)
    got = final_models(store_dir)  # every unlearned version reads back, as without erasing
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    with store.lock():  # idempotent
        again = erase_superseded(journal, graph, store, REQUEST.id)
    assert again.objects.items() <= erasure.objects.items() and again.bytes_freed == 0 < erasure.bytes_freed


def test_an_incomplete_request_erases_nothing(reference, tmp_path):
    pristine, _ = reference
    store_dir = tmp_path / "store"
    shutil.copytree(pristine, store_dir)
    progress, _ = serve(store_dir, failing={1})
    assert progress.state == "incomplete"
    store, before = Store(store_dir), _tree(store_dir)
    for request_id in (REQUEST.id, "req-never-served"):
        with pytest.raises(UnlearnError, match="incomplete|holds no request"):
            erase_superseded(RequestJournal.for_store(store), LineageGraph.load(store_dir / "lineage"), store,
                             request_id)
    assert _tree(store_dir) == before


def test_journal_refuses_an_illegal_transition(tmp_path):
    from fl_unlearn.errors import UnlearnError

    journal = RequestJournal(tmp_path)
    with pytest.raises(UnlearnError, match="cannot follow None"):
        journal.append("r", "applied", {})
    journal.append("r", "received", {})
    with pytest.raises(UnlearnError, match="cannot follow 'received'"):
        journal.append("r", "verified", {})


def test_conflicting_recorded_version_is_refused(reference, tmp_path):
    pristine, _ = reference
    store_dir = tmp_path / "store"
    shutil.copytree(pristine, store_dir)
    graph = LineageGraph.load(store_dir / "lineage")
    graph.add_node(version_id("global-r1", REQUEST), "global", round=1, parents=("global-r1",),
                   request_id="someone-else")
    with pytest.raises(LineageError, match="someone-else"):
        serve(store_dir)


# ------------------------------------------------------------------------------------------------------
# concurrency
# ------------------------------------------------------------------------------------------------------


def test_two_requests_at_once_are_serialised_and_the_store_stays_readable(reference, tmp_path):
    pristine, _ = reference
    store_dir = tmp_path / "store"
    shutil.copytree(pristine, store_dir)
    inside = threading.Event()
    release = threading.Event()
    reads: list[str] = []

    class SlowSteps(CoreSteps):
        def gather(self, plan):
            inside.set()
            assert release.wait(10)
            return super().gather(plan)

    def run(request: UnlearningRequest, steps_cls) -> None:
        graph, store = LineageGraph.load(store_dir / "lineage"), Store(store_dir)
        with store.lock():
            serve_request(RequestJournal.for_store(store), request, graph, store, steps_cls(store_dir, graph))

    first = threading.Thread(target=run, args=(REQUEST, SlowSteps))
    first.start()
    assert inside.wait(10)
    second = threading.Thread(target=run, args=(UnlearningRequest.for_classes([1], id="req-two", created=0.0),
                                                CoreSteps))
    second.start()
    # While the first request is being applied: the store and journal read fine, the second request waits.
    store = Store(store_dir)
    reads.append(store.get_ref("latest-global"))
    assert store.get(reads[0])["fc.weight"].shape == (6, 4)
    time.sleep(0.3)  # time for the second request to have run, had it not waited for the lock
    assert RequestJournal.for_store(store).requests() == {REQUEST.id: "received"}
    release.set()
    first.join(30)
    second.join(30)
    order = [e.request for e in RequestJournal.for_store(store).entries()]
    assert order == sorted(order, key=lambda r: r != REQUEST.id)  # all of the first, then all of the second
    assert RequestJournal.for_store(store).requests() == {REQUEST.id: "verified", "req-two": "verified"}


# ------------------------------------------------------------------------------------------------------
# client faults and hostile replies through the real server wrapper and client handlers (fake Grid)
# ------------------------------------------------------------------------------------------------------

NUM_CLIENTS = 4
APP_CFG = {"dataset": "digits", "num-clients": NUM_CLIENTS, "seed": 7, "max-test-samples": 200}
CLASS_REQUEST = UnlearningRequest.for_classes([3], id="req-fault", created=0.0)


class FakeGrid:
    """Runs the real ClientApp in-process for every node (fakes only here, in a unit test).

    ``faults[(partition, message type)]`` is a list consumed one per attempt: ``"error"`` answers with an
    error reply, ``"timeout"`` runs the handler but loses its reply, a callable edits the real reply (hostile
    content).
    """

    def __init__(self, app, num_nodes: int) -> None:
        from flwr.app import Context, RecordDict

        self.app = app
        self.contexts = {100 + p: Context(1, 100 + p, {"partition-id": p, "num-partitions": num_nodes}, RecordDict(),
                                          {}) for p in range(num_nodes)}
        self.faults: dict[tuple[int, str], list] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error, Message

        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            queue = self.faults.get((self.contexts[node].node_config["partition-id"], msg.metadata.message_type))
            fault = queue.pop(0) if queue else None
            if fault == "timeout":  # the client did the work, but its reply never arrived
                self.app(msg, self.contexts[node])
                continue
            if fault == "error":
                replies.append(Message(Error(code=0, reason="simulated client crash"), reply_to=msg))
                continue
            reply = self.app(msg, self.contexts[node])
            reply.metadata.__dict__["_src_node_id"] = node  # as the SuperLink sets it
            replies.append(fault(reply) if callable(fault) else reply)
        return replies


def _strategy(store_dir: Path):
    from flwr.serverapp.strategy import FedAvg

    from strategies.server import UnlearningStrategy

    graph = LineageGraph.open(store_dir / "lineage")
    return UnlearningStrategy(FedAvg(fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1),
                              Store(store_dir), graph, num_nodes=NUM_CLIENTS, seed=7, num_classes=10,
                              node_timeout=1.0, fisher_estimator="batch")  # faults, not Fishers: the quick one


def _grid() -> FakeGrid:
    from strategies.app import make_client_app

    return FakeGrid(make_client_app(APP_CFG), NUM_CLIENTS)


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Path:
    """One FedAvg round on digits (4 clients) and one derived model per client, through the fake Grid."""
    from flwr.app import ArrayRecord, Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fl_unlearn.train import seed_everything
    from strategies.app import app_model
    from strategies.config import DEFAULTS

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = 1, 1, 1
    store_dir = tmp_path_factory.mktemp("federation") / "store"
    strategy, grid = _strategy(store_dir), _grid()
    seed_everything(7)
    strategy.start(grid, ArrayRecord(app_model(Context(0, 0, {}, RecordDict(), {**DEFAULTS, **APP_CFG})).state_dict()),
                   num_rounds=1)
    strategy.derive(grid, "finetune", 1)
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
    return store_dir


def _copy(federation: Path, tmp_path: Path) -> Path:
    store_dir = tmp_path / "store"
    shutil.copytree(federation, store_dir)
    return store_dir


def _unlearned(store_dir: Path, outcome) -> dict[str, torch.Tensor]:
    """The unlearned weights of every affected model, read where they live (server store / client store)."""
    graph = LineageGraph.load(store_dir / "lineage")
    out = {}
    for old, new in outcome.versions.items():
        node = graph.node(new)
        if node.weights is not None:
            tensors = Store(store_dir).get(node.weights)
        else:
            tensors = Store(store_dir / "clients" / str(node.client)).get(node.meta["client-weights"])
        out.update({f"{old}/{k}": v for k, v in tensors.items()})
    return out


@pytest.fixture(scope="module")
def fault_free(federation, tmp_path_factory) -> dict[str, torch.Tensor]:
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = 1, 1, 1
    store_dir = _copy(federation, tmp_path_factory.mktemp("fault-free"))
    outcome = _strategy(store_dir).unlearn(_grid(), CLASS_REQUEST)
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
    assert outcome.state == "verified" and not outcome.missing
    return _unlearned(store_dir, outcome)


def test_one_of_four_clients_fails_in_train_unlearn_then_a_later_run_finishes(federation, fault_free, tmp_path,
                                                                               task_identity):
    store_dir = _copy(federation, tmp_path)
    grid = _grid()
    grid.faults[(2, "train.unlearn")] = ["error", "timeout", "error"]  # the first try and both retries
    outcome = _strategy(store_dir).unlearn(grid, CLASS_REQUEST)
    derived_p2 = [m for m in outcome.affected if m.startswith("derived-") and "-p2-" in m]
    assert outcome.state == "incomplete" and outcome.missing == derived_p2 and len(derived_p2) == 1
    assert "simulated client crash" in outcome.failures[2] or "no reply" in outcome.failures[2]
    assert derived_p2[0] not in outcome.versions  # nothing reported as forgotten that was not
    assert len(outcome.versions) == len(outcome.affected) - 1
    # A later run (a new strategy on the same store, all clients up) finishes only what is missing.
    later = _strategy(store_dir).unlearn(_grid(), CLASS_REQUEST)
    assert later.state == "verified" and later.missing == [] and later.resumed_from == "incomplete"
    got = _unlearned(store_dir, later)
    assert got.keys() == fault_free.keys()
    assert all(torch.equal(got[k], fault_free[k]) for k in fault_free)
    graph = LineageGraph.load(store_dir / "lineage")
    assert sum(1 for n in graph.nodes() if n.request_id == CLASS_REQUEST.id) == len(outcome.affected)  # no twice
    with pytest.raises(RequestError, match="already applied"):
        _strategy(store_dir).unlearn(_grid(), CLASS_REQUEST)


def test_a_client_that_times_out_once_is_retried(federation, fault_free, tmp_path, task_identity):
    store_dir = _copy(federation, tmp_path)
    grid = _grid()
    grid.faults[(1, "query.fisher")] = ["timeout"]
    grid.faults[(3, "train.unlearn")] = ["error"]
    outcome = _strategy(store_dir).unlearn(grid, CLASS_REQUEST)
    assert outcome.state == "verified" and outcome.missing == [] and outcome.failures == {}
    got = _unlearned(store_dir, outcome)
    assert all(torch.equal(got[k], fault_free[k]) for k in fault_free)


def test_a_client_down_in_query_fisher_changes_no_model(federation, tmp_path, task_identity):
    store_dir = _copy(federation, tmp_path)
    grid = _grid()
    grid.faults[(0, "query.fisher")] = ["timeout"] * 3
    before = _tree(store_dir / "lineage"), _tree(store_dir / "refs")
    outcome = _strategy(store_dir).unlearn(grid, CLASS_REQUEST)
    assert outcome.state == "incomplete" and outcome.versions == {} and set(outcome.missing) == set(outcome.affected)
    assert "no reply" in outcome.failures[0]
    assert (_tree(store_dir / "lineage"), _tree(store_dir / "refs")) == before


def _nan_fisher(reply):
    from strategies import records as R

    fisher = R.record_to_tensors(reply.content.array_records[R.FORGET_FISHER_KEY])
    name = next(iter(fisher))
    fisher[name] = torch.full_like(fisher[name], float("nan"))
    reply.content[R.FORGET_FISHER_KEY] = R.tensors_to_record(fisher)
    return reply


def _wrong_shape(reply):
    from strategies import records as R

    fisher = R.record_to_tensors(reply.content.array_records[R.FORGET_FISHER_KEY])
    name = next(iter(fisher))
    fisher[name] = fisher[name].flatten()[:3]
    reply.content[R.FORGET_FISHER_KEY] = R.tensors_to_record(fisher)
    return reply


def _claims_more(reply):
    from flwr.app import MetricRecord

    from strategies import records as R

    metrics = dict(reply.content.metric_records[R.METRICS_KEY])
    reply.content[R.METRICS_KEY] = MetricRecord({**metrics, R.FORGET_NUM: int(metrics[R.FORGET_NUM]) + 1000})
    return reply


@pytest.mark.parametrize("hostile, error, match", [
    (_nan_fisher, "FisherError", "NaN"),
    (_wrong_shape, "FisherError", "shape"),
    (_claims_more, "RequestError", "claims"),
], ids=["nan", "wrong-shape", "claims-data-it-does-not-hold"])
def test_hostile_fisher_replies_are_refused_and_change_nothing(hostile, error, match, federation, tmp_path,
                                                               task_identity):
    import fl_unlearn.errors as errors

    store_dir = _copy(federation, tmp_path)
    grid = _grid()
    grid.faults[(1, "query.fisher")] = [hostile]
    before = _tree(store_dir / "lineage"), _tree(store_dir / "refs"), _tree(store_dir / "objects")
    with pytest.raises(getattr(errors, error), match=match):
        _strategy(store_dir).unlearn(grid, CLASS_REQUEST)
    assert (_tree(store_dir / "lineage"), _tree(store_dir / "refs"), _tree(store_dir / "objects")) == before
    assert RequestJournal.for_store(Store(store_dir)).state(CLASS_REQUEST.id) == "incomplete"  # says why it stopped


def test_models_the_check_cannot_forget_get_their_own_forget_fisher(federation, tmp_path, task_identity, monkeypatch):
    from flwr.serverapp.strategy import FedAvg

    import strategies.server as server
    from fl_unlearn.calibrate import scale_free
    from strategies import records as R
    from strategies.calibration import ClientCalibration, check_plan
    from strategies.server import UnlearningStrategy

    merges, dampened = [], {}  # every MFIM merge the server makes; the forget-Fisher each model is dampened with
    real_merge, real_unlearn = server.merge_fishers, server._unlearn_per_candidate
    monkeypatch.setattr(server, "merge_fishers", lambda *a, **k: merges.append(real_merge(*a, **k)) or merges[-1])

    def unlearn(weights, retain, forgets, cfg, candidates):  # the last call is the dampening after the check
        dampened["forgets"], dampened["candidates"] = list(forgets), list(candidates)
        return real_unlearn(weights, retain, forgets, cfg, candidates)

    monkeypatch.setattr(server, "_unlearn_per_candidate", unlearn)

    store_dir = _copy(federation, tmp_path)
    grid = _grid()

    settings = ClientCalibration(forget_samples=32, retain_samples=16, check_samples=16)
    over = settings.check_budget(NUM_CLIENTS) + 1  # every client holds some of the class (asserted below)

    def nothing_forgets(reply):  # partition 0 says no candidate forgets any model with the shared forget-Fisher
        metrics = reply.content.metric_records[R.METRICS_KEY]
        metrics[R.CHECK_COUNTS] = [over] * len(metrics[R.CHECK_COUNTS])
        return reply

    grid.faults[(0, R.MSG_CHECK)] = [nothing_forgets]  # the first check; the re-check is honest
    sent: list[str] = []
    caps: list[int] = []  # the rows each query.fisher asks for, in order

    def record(m) -> bool:
        sent.append(m.metadata.message_type)
        if m.metadata.message_type == R.MSG_FISHER:
            caps.append(int(R.first_config(m)[R.FISHER_SAMPLES]))
        return True

    send = grid.send_and_receive
    grid.send_and_receive = lambda msgs, timeout=None: send([m for m in msgs if record(m)], timeout=timeout)
    strategy = UnlearningStrategy(
        FedAvg(fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1), Store(store_dir),
        LineageGraph.open(store_dir / "lineage"), num_nodes=NUM_CLIENTS, seed=7, num_classes=10, node_timeout=1.0,
        client_calibration=settings)
    outcome = strategy.unlearn(grid, CLASS_REQUEST)
    cal = outcome.calibration
    assert outcome.state == "verified" and cal["target_met"]
    checked = sorted(cal["per_model"])
    holders = sorted(p for p, n in outcome.holders.items() if n > 0)
    assert len(holders) == NUM_CLIENTS
    # every model partition 0 checked (the global models, and the local updates check_plan gave it: never its
    # own) fell back to its own forget-Fisher, and only those
    owners = strategy._local_owners(checked)
    plan = check_plan(checked, owners, holders, settings)
    at_0 = sorted(checked[i] for i, _ in plan[0])
    assert at_0 and cal["own_fisher"] == at_0 and set(at_0) < set(checked)
    assert all(owners.get(k) != 0 for k in at_0)
    # the first query.fisher goes to every client; then one per fallback model and holder; one calibration, the
    # first check at every holder, and the re-check at the holders check_plan gives those models
    assert sent.count(R.MSG_FISHER) == NUM_CLIENTS + len(at_0) * len(holders)
    # a model's own forget-Fisher is taken on the calibration's forget samples, not on fisher-samples rows
    assert caps[:NUM_CLIENTS] == [strategy.fisher_samples] * NUM_CLIENTS and strategy.fisher_samples > 32
    assert caps[NUM_CLIENTS:] == [32] * (len(at_0) * len(holders))
    rechecked = [h for h, items in check_plan(at_0, owners, holders, settings).items() if items]
    assert sent.count(R.MSG_CALIBRATE) == NUM_CLIENTS and sent.count(R.MSG_CHECK) == len(holders) + len(rechecked)
    own = dict(zip(at_0, merges[-len(at_0):]))  # the fallback merges, one per model, in order
    # dampened after the check (not taken from what the server dampened at the choice while the holders checked):
    # each with its own (scale-free) forget-Fisher, at what the re-check gave it
    assert len(dampened["forgets"]) >= len(own)
    for node_id, merge in own.items():
        given = cal["per_model"][node_id]
        assert any(all(torch.equal(used[k], v) for k, v in scale_free(merge).items()) and c == (given["alpha"], given["lam"])
                   for used, c in zip(dampened["forgets"], dampened["candidates"]))
        assert (outcome.stats[node_id]["alpha"], outcome.stats[node_id]["lam"]) == (given["alpha"], given["lam"])


def test_the_per_model_check_is_a_second_round_trip_from_the_choice(federation, tmp_path, task_identity):
    # query.calibrate carries the model to calibrate on and no other; once the choice is known, the holders check
    # every other affected model from it (query.checkforget), and each is dampened where their check put it
    from flwr.serverapp.strategy import FedAvg

    from fl_unlearn.calibrate import check_sequence
    from strategies import records as R
    from strategies.calibration import ClientCalibration
    from strategies.server import UnlearningStrategy

    store_dir = _copy(federation, tmp_path)
    grid = _grid()
    sent = []
    send = grid.send_and_receive

    def exchange(msgs, timeout=None):
        msgs = list(msgs)
        sent.extend(msgs)
        return send(msgs, timeout=timeout)

    grid.send_and_receive = exchange
    settings = ClientCalibration(forget_samples=32, retain_samples=16, check_samples=16)
    strategy = UnlearningStrategy(
        FedAvg(fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1), Store(store_dir),
        LineageGraph.open(store_dir / "lineage"), num_nodes=NUM_CLIENTS, seed=7, num_classes=10, node_timeout=1.0,
        fisher_estimator="batch", client_calibration=settings)
    outcome = strategy.unlearn(grid, CLASS_REQUEST)
    cal = outcome.calibration
    holders = sorted(p for p, n in outcome.holders.items() if n > 0)
    checked = sorted(cal["per_model"])
    assert outcome.state == "verified" and cal["target_met"] and checked and holders
    calibrate = [m for m in sent if m.metadata.message_type == R.MSG_CALIBRATE]
    check = [m for m in sent if m.metadata.message_type == R.MSG_CHECK]
    assert len(calibrate) == NUM_CLIENTS and not any(
        k.startswith(R.CHECK_MODEL_PREFIX) for m in calibrate for k in m.content.array_records)
    assert sorted(strategy.nodes.partition[m.metadata.dst_node_id] for m in check) == holders  # one each
    sent_weights = {}  # partition -> the weights of the models it was sent
    for m in check:  # the choice travels with the models: the holders check from it on
        config = R.first_config(m)
        assert (config[R.FIUN_ALPHA], config["fiun-lam"]) == (cal["alpha"], cal["lam"])
        keys = [k for k in m.content.array_records if k.startswith(R.CHECK_MODEL_PREFIX)]
        assert len(config[R.CHECK_ROWS]) == len(keys)
        sent_weights[strategy.nodes.partition[m.metadata.dst_node_id]] = [
            R.record_to_tensors(m.content.array_records[k]) for k in keys]
    # a holder is sent the global models (every client received them) and local updates check_plan gives it: each
    # update goes to one holder that did not train it, checked on as many rows as all holders check a global on
    for node_id in checked:
        node = strategy.graph.node(node_id)
        weights = strategy.store.get(node.weights)
        got = sorted(p for p, ws in sent_weights.items() if any(all(torch.equal(w[k], weights[k]) for k in w)
                                                             for w in ws))
        if node.kind == "local":
            assert len(got) == 1 and got[0] != node.data.client, node_id
        else:
            assert got == holders, node_id
    for m in check:
        rows = R.first_config(m)[R.CHECK_ROWS]
        assert set(rows) <= {settings.check_samples, settings.single_check_rows(len(holders))}
    sequence = check_sequence(cal["alpha"], cal["lam"], settings.alphas, settings.lams)
    for node_id in checked:  # every model at the choice or a stronger candidate from it, never a milder one
        given = (cal["per_model"][node_id]["alpha"], cal["per_model"][node_id]["lam"])
        assert given in sequence and (outcome.stats[node_id]["alpha"], outcome.stats[node_id]["lam"]) == given


class _PushPullFakeGrid(FakeGrid):
    """:class:`FakeGrid` with Flower's push / pull API: the clients answer at the first pull after the push, and
    ``on_push`` sees every message as it is pushed."""

    def __init__(self, app, num_nodes: int, on_push) -> None:
        super().__init__(app, num_nodes)
        self.on_push, self.pushed, self.answered = on_push, {}, {}

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = f"m{len(self.pushed)}"
            m.metadata.__dict__["_message_id"] = mid
            self.pushed[mid] = m
            self.on_push(m)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        todo = [self.pushed[i] for i in message_ids if i not in self.answered]
        for reply in self.send_and_receive(todo):
            self.answered[reply.metadata.reply_to_message_id] = reply
        return [self.answered.pop(i) for i in list(message_ids) if i in self.answered]


def test_the_server_works_while_the_clients_calibrate_and_check_and_the_result_is_the_same(
        federation, tmp_path, task_identity, monkeypatch):
    # query.calibrate is pushed as soon as the forget-Fishers are merged, before they are journaled; while the
    # holders check the other models the server dampens them at the choice. Neither changes a single weight.
    from flwr.serverapp.strategy import FedAvg

    import strategies.server as server
    from strategies import records as R
    from strategies.calibration import ClientCalibration
    from strategies.server import UnlearningStrategy

    settings = ClientCalibration(forget_samples=32, retain_samples=16, check_samples=16)

    def serve(store_dir, grid):
        strategy = UnlearningStrategy(
            FedAvg(fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1), Store(store_dir),
            LineageGraph.open(store_dir / "lineage"), num_nodes=NUM_CLIENTS, seed=7, num_classes=10,
            node_timeout=1.0, fisher_estimator="batch", client_calibration=settings)
        outcome = strategy.unlearn(grid, CLASS_REQUEST)
        assert outcome.state == "verified" and outcome.calibration["target_met"]
        return outcome, {old: strategy.graph.node(new).weights for old, new in outcome.versions.items()}

    overlapped_dir = _copy(federation, tmp_path / "overlapped")
    states = []  # the request's journal state when each query.calibrate was pushed

    def on_push(m):
        if m.metadata.message_type == R.MSG_CALIBRATE:
            states.append(RequestJournal.for_store(Store(overlapped_dir)).state(CLASS_REQUEST.id))

    taken = []
    real_take = server.PresumedDampening.take
    monkeypatch.setattr(server.PresumedDampening, "take", lambda self, *a: taken.append(real_take(self, *a)) or taken[-1])
    outcome, overlapped = serve(overlapped_dir, _PushPullFakeGrid(_grid().app, NUM_CLIENTS, on_push))
    assert states == ["received"] * NUM_CLIENTS  # pushed before "fisher-collected" was journaled
    kept_choice = [k for k in outcome.server_models
                   if (outcome.stats[k]["alpha"], outcome.stats[k]["lam"]) == (outcome.calibration["alpha"],
                                                                              outcome.calibration["lam"])]
    assert len(taken) == 1 and kept_choice and sorted(taken[0]) == sorted(
        outcome.server_models.index(k) for k in kept_choice)  # every model that kept the choice, and only those

    monkeypatch.setattr(UnlearningStrategy, "_presume", lambda self, *a: (lambda alpha, lam: None))
    _, plain = serve(_copy(federation, tmp_path / "plain"), _grid())
    assert overlapped == plain  # the same digest for every unlearned model


def test_presumed_dampening_is_taken_only_at_the_final_candidate_with_the_same_forget_fisher():
    from strategies.server import PresumedDampening

    shared, own = {"w": torch.ones(2)}, {"w": torch.ones(2)}
    presumed = PresumedDampening()
    presumed.put((2.0, 1.0), {"a": shared, "b": shared, "c": shared}, [{"w": torch.zeros(2)}] * 3, [{}] * 3)
    taken = presumed.take(["a", "b", "c", "d"], [(2.0, 1.0), (1.0, 1.0), (2.0, 1.0), (2.0, 1.0)],
                          {"a": shared, "b": shared, "c": own, "d": shared})
    assert sorted(taken) == [0]  # b moved to a stronger candidate, c got its own forget-Fisher, d was not dampened


def test_a_models_own_forget_fisher_is_capped_at_the_calibrations_forget_samples_at_the_holders_too(tmp_path):
    # the holders check the models they hold in train.unlearn and take a failing one's own forget-Fisher there
    from flwr.serverapp.strategy import FedAvg

    from strategies import records as R
    from strategies.calibration import ClientCalibration
    from strategies.server import UnlearningStrategy, UnlearnOutcome

    strategy = UnlearningStrategy(FedAvg(), Store(tmp_path / "store"), LineageGraph(), num_nodes=2, seed=7,
                                  num_classes=10, client_calibration=ClientCalibration(forget_samples=48))
    outcome = UnlearnOutcome(CLASS_REQUEST, [], [])
    assert strategy._client_check_config(CLASS_REQUEST, outcome) == {}  # a fixed alpha: no check at the holders
    outcome.scale_free = True
    config = strategy._client_check_config(CLASS_REQUEST, outcome)
    assert config[R.OWN_FISHER_SAMPLES] == 48 and config[R.CALIBRATION_CHECK] == 32
    strategy.fisher_samples = 16  # never more rows than fisher-samples
    assert strategy._client_check_config(CLASS_REQUEST, outcome)[R.OWN_FISHER_SAMPLES] == 16


def _kept_loss_of_first_candidate(value):
    def hostile(reply):
        from flwr.app import MetricRecord

        from fl_unlearn.calibrate import UNSCORED

        from strategies import records as R

        metrics = dict(reply.content.metric_records[R.METRICS_KEY])
        losses = list(metrics[R.RETAIN_LOSS])
        scored = [i for i, v in enumerate(metrics[R.FORGET_CORRECT]) if v != UNSCORED]
        losses[scored[0]] = value  # the strongest candidate the client scored
        reply.content[R.METRICS_KEY] = MetricRecord({**metrics, R.RETAIN_LOSS: losses})
        return reply

    return hostile


@pytest.mark.parametrize("value", [-5.0, -1.0, float("inf")], ids=["negative", "unscored-marker", "infinite"])
def test_a_calibration_reply_with_a_bad_kept_loss_is_refused_and_changes_nothing(value, federation, tmp_path,
                                                                                  task_identity):
    from flwr.serverapp.strategy import FedAvg

    from fl_unlearn.errors import UnlearnError
    from strategies.calibration import ClientCalibration
    from strategies.server import UnlearningStrategy

    store_dir = _copy(federation, tmp_path)
    grid = _grid()
    grid.faults[(1, "query.calibrate")] = [_kept_loss_of_first_candidate(value)]
    strategy = UnlearningStrategy(
        FedAvg(fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1), Store(store_dir),
        LineageGraph.open(store_dir / "lineage"), num_nodes=NUM_CLIENTS, seed=7, num_classes=10, node_timeout=1.0,
        client_calibration=ClientCalibration(forget_samples=32, retain_samples=16, check_samples=16))
    before = _tree(store_dir / "lineage"), _tree(store_dir / "refs")
    with pytest.raises(UnlearnError, match="kept losses"):
        strategy.unlearn(grid, CLASS_REQUEST)
    # no model version, no moved ref (the journal and the Fisher cache may hold what the request got so far)
    assert (_tree(store_dir / "lineage"), _tree(store_dir / "refs")) == before


def test_a_baseline_request_a_client_failed_is_finished_by_the_same_method_only(federation, tmp_path, task_identity):
    from strategies.baseline import BaselineSettings

    finetune = BaselineSettings("finetune", rounds=1, steps=3)
    reference = _copy(federation, tmp_path / "reference")
    expected = _unlearned(reference, _strategy(reference).unlearn(_grid(), CLASS_REQUEST, baseline=finetune))
    store_dir = _copy(federation, tmp_path)
    grid = _grid()
    grid.faults[(2, "train.baselineheld")] = ["error", "timeout", "error"]  # the first try and both retries
    outcome = _strategy(store_dir).unlearn(grid, CLASS_REQUEST, baseline=finetune)
    derived_p2 = [m for m in outcome.affected if m.startswith("derived-") and "-p2-" in m]
    assert outcome.state == "incomplete" and outcome.missing == derived_p2 and len(derived_p2) == 1
    assert outcome.method == "finetune" and derived_p2[0] not in outcome.versions
    before = _files(store_dir)
    with pytest.raises(UnlearnError, match="begun with method=finetune"):  # FIUn does not finish a finetune request
        _strategy(store_dir).unlearn(_grid(), CLASS_REQUEST)
    with pytest.raises(UnlearnError, match="begun with method=finetune"):
        _strategy(store_dir).unlearn(_grid(), CLASS_REQUEST, baseline=BaselineSettings("gradient_ascent"))
    assert _files(store_dir) == before  # refused before anything changed
    later = _strategy(store_dir).unlearn(_grid(), CLASS_REQUEST, baseline=finetune)
    assert later.state == "verified" and later.resumed_from == "incomplete" and later.missing == []
    got = _unlearned(store_dir, later)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    graph = LineageGraph.load(store_dir / "lineage")
    assert sum(1 for n in graph.nodes() if n.request_id == CLASS_REQUEST.id) == len(outcome.affected)  # no twice


def test_the_server_erases_the_replaced_models_at_the_clients_too(federation, tmp_path, task_identity):
    from strategies.erase import retry_erasures

    store_dir = _copy(federation, tmp_path)
    strategy, grid = _strategy(store_dir), _grid()
    outcome = strategy.unlearn(grid, CLASS_REQUEST)
    held = {old: new for old, new in outcome.versions.items() if old in outcome.client_results}
    assert outcome.state == "verified" and len(held) == NUM_CLIENTS
    grid.faults[(2, "train.erase")] = ["error"] * 3  # partition 2 never answers: it keeps its copy, and says so
    report = strategy.erase(grid, CLASS_REQUEST)
    assert set(report["failures"]) == {"2"} and set(report["clients"]) == {"0", "1", "3"}
    for old in held:
        pid = LineageGraph.load(store_dir / "lineage").node(old).client
        client = Store(store_dir / "clients" / str(pid))
        entry = client.get_json("models")[old]
        assert _tombstoned(client, entry["weights"]) == (pid != 2) and ("erased" in entry) == (pid != 2)
        assert client.get(client.get_json("models")[held[old]]["weights"])  # the unlearned version stays
    # the next run asks again (the App calls retry_erasures before its request): partition 2 erases now
    retried = retry_erasures(grid, _strategy(store_dir))
    assert list(retried) == [CLASS_REQUEST.id] and retried[CLASS_REQUEST.id]["client_files"] == 1
    report = Store(store_dir).get_json(f"erasures/{CLASS_REQUEST.id}")
    assert report["failures"] == {} and report["clients"]["2"]["erased"] == 1
    assert retry_erasures(grid, _strategy(store_dir)) == {}  # nothing pending any more


def test_a_crash_before_the_clients_confirm_their_erasure_is_retried_by_the_next_run(federation, tmp_path,
                                                                                      task_identity, monkeypatch):
    import strategies.nodes
    from strategies.erase import retry_erasures

    store_dir = _copy(federation, tmp_path)
    strategy, grid = _strategy(store_dir), _grid()
    assert strategy.unlearn(grid, CLASS_REQUEST).state == "verified"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("the server died before the clients answered train.erase")

    with monkeypatch.context() as patch:
        patch.setattr(strategies.nodes, "send_with_retries", killed)
        with pytest.raises(KeyboardInterrupt):
            strategy.erase(grid, CLASS_REQUEST)
    pending = Store(store_dir).get_json(f"erasures/{CLASS_REQUEST.id}")["failures"]
    assert set(pending) == {str(p) for p in range(NUM_CLIENTS)}  # every holder: not confirmed yet
    retried = retry_erasures(_grid(), _strategy(store_dir))
    assert retried[CLASS_REQUEST.id]["client_files"] == NUM_CLIENTS and retried[CLASS_REQUEST.id]["failures"] == {}


def test_a_client_refuses_to_erase_a_model_nothing_replaced(federation, tmp_path, task_identity):
    from flwr.app import ConfigRecord, Message, RecordDict

    from strategies import records as R

    store_dir = _copy(federation, tmp_path)
    grid = _grid()
    client = Store(store_dir / "clients" / "0")
    model_id = next(iter(client.get_json("models")))
    before = _tree(store_dir / "clients" / "0")
    msg = Message(RecordDict({R.CONFIG_KEY: ConfigRecord({R.MODEL_IDS: [model_id], R.STORE_DIR: str(store_dir)})}),
                  dst_node_id=100, message_type=R.MSG_ERASE)
    [reply] = grid.send_and_receive([msg])
    assert reply.has_error() and "nothing erased" in reply.error.reason
    assert _tree(store_dir / "clients" / "0") == before

"""The Flower layer: strategy wrapper, client handlers, legacy mod and the App, end to end.

Federated tests use ``run_simulation`` (2-4 nodes, digits, the small CNN, 1-2 rounds; each well under a
minute); a handful of fast checks need no Ray at all. One test runs the real ``flwr run`` through
``scripts/flwr_run.sh`` and checks that no SuperLink is left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx
from flwr.simulation import run_simulation

from fl_unlearn.data import make_loader
from fl_unlearn.errors import ConfigError, RequestError, StoreError, UnlearnError
from fl_unlearn.journal import RequestJournal
from fl_unlearn.lineage import LineageGraph
from fl_unlearn.requests import UnlearningRequest
from fl_unlearn.store import Store
from fl_unlearn.train import seed_everything, train_local
from strategies import records as R
from strategies.app import app_model, app_partition, app_test, make_client_app, make_server_app, with_run_config
from strategies.client import ClientSpec
from strategies.mod import unlearning_mod
from strategies.config import DEFAULTS, AppConfig
from strategies.experiment import run_experiment
from strategies.server import UnlearningStrategy
from strategies.strategy_utils import OPTIMISER_STATE, reset_optimiser_state, seeded_random, with_config

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "simulations" / "cifar100_fedavg"
BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
#: Small and fast: sklearn digits (8x8), 2 clients, 2 rounds, the small CNN.
BASE = {"dataset": "digits", "num-clients": 2, "num-server-rounds": 2, "seed": 7, "retrain-baseline": False,
        "max-test-samples": 300, "mia-samples": 0}  # membership inference: on where a test reads it (a round trip)
#: For the runs that train a federation of their own to test something other than the Fishers: the batch
#: estimator. The default one (expected) costs each such run 3-4 s more on 2 cores. The shared runs (``trained``,
#: ``train_unlearn``), the tests on their stores and the ``flwr run`` test keep the defaults.
QUICK_FISHER = {"fisher_estimator": "batch"}


@pytest.fixture(autouse=True)
def _short_ray_tmpdir(monkeypatch, tmp_path_factory):
    """Each Ray start gets its own short temp dir (socket paths are length-limited)."""
    path = Path("/tmp") / f"ray{os.getpid()}"
    path.mkdir(exist_ok=True)
    monkeypatch.setenv("RAY_TMPDIR", str(path))
    yield
    shutil.rmtree(path, ignore_errors=True)


def simulate(server_app: ServerApp, client_app: ClientApp, num_nodes: int = 2) -> None:
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_nodes, backend_config=BACKEND)


def run_app(num_nodes: int = 2, **overrides) -> dict:
    """Run the App with run_simulation; return its results.json."""
    cfg = {**BASE, **{k.replace("_", "-"): v for k, v in overrides.items()}}
    simulate(make_server_app(cfg), make_client_app(cfg), num_nodes)
    return json.loads((Path(cfg["out-dir"]) / "results.json").read_text())


def tree_digest(path: Path) -> str:
    """A digest of every file (name and bytes) under ``path``: equal digests, unchanged tree."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------
# shared runs (module scope: read-only afterwards)
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A training run (mode=train); its store serves later mode=unlearn runs (copy before use)."""
    out = tmp_path_factory.mktemp("trained")
    path = Path("/tmp") / f"ray{os.getpid()}m"
    os.environ["RAY_TMPDIR"] = str(path)
    run_app(mode="train", out_dir=str(out), derive="finetune", derive_depth=2)
    shutil.rmtree(path, ignore_errors=True)
    return out


@pytest.fixture(scope="module")
def train_unlearn(tmp_path_factory) -> dict:
    """train+unlearn in one run, with derived models and the retrain baseline."""
    out = tmp_path_factory.mktemp("train_unlearn")
    path = Path("/tmp") / f"ray{os.getpid()}n"
    os.environ["RAY_TMPDIR"] = str(path)
    results = run_app(out_dir=str(out), derive="finetune", derive_depth=2, retrain_baseline=True, mia_samples=500)
    shutil.rmtree(path, ignore_errors=True)
    return results


# ------------------------------------------------------------------------------------------------------
# the App
# ------------------------------------------------------------------------------------------------------


def test_app_trains_unlearns_and_reports(train_unlearn):
    res = train_unlearn
    out = Path(res["out_dir"])
    assert res["dataset_used"] == "digits" and res["model"] == "cnn"
    assert res["request"]["kind"] == "classes" and res["request"]["classes"] == [3]
    kinds = {m["kind"] for m in res["affected_models"]}
    assert kinds == {"global", "local", "derived"}
    for m in res["affected_models"]:
        assert m["version"] is not None, m["id"]
        # the derived models' figures come from their holders, membership inference included (mia-samples=500)
        assert set(m["before"]) >= {"forget_acc", "retain_acc", "mia_auc"}, m["id"]
        assert set(m["after"]) >= {"forget_acc", "retain_acc", "mia_auc"}, m["id"]
    final = res["final_global"]
    assert final["id"] == "global-r2" and final["retrained"]["forget_acc"] == 0.0
    assert all(0.0 <= final[part]["mia_auc"] <= 1.0 for part in ("before", "after", "retrained"))  # mia-samples=500
    # every server-held model beside its retrained twin: the same round's model of the federation without class 3
    twins = {m["id"]: m["retrained"] for m in res["affected_models"] if "retrained" in m}
    assert set(twins) == {m["id"] for m in res["affected_models"] if m["kind"] != "derived"}
    assert twins["global-r2"] == final["retrained"]  # the retrained final model is the final model's twin
    assert all(t["forget_acc"] <= 0.05 and 0.0 <= t["mia_auc"] <= 1.0 for t in twins.values())
    assert len({t["retain_acc"] for t in twins.values()}) > 1  # each twin is its own model
    assert res["targets"]["twins"] == len(twins) and isinstance(res["targets"]["twins_retain_ok"], bool)
    worst_before = res["targets"]["twin_worst_model_before"]  # how far the trained models already were
    before = next(m["before"]["retain_acc"] for m in res["affected_models"] if m["id"] == worst_before)
    assert res["targets"]["twin_retain_gap_before"] == pytest.approx(twins[worst_before]["retain_acc"] - before)
    assert "backdoor_asr" not in final["before"]  # no backdoor asked for
    assert final["after"]["forget_acc"] <= final["before"]["forget_acc"]
    assert set(res["timing"]) >= {"train_s", "unlearn_s", "retrain_s"}
    for name in ("results.json", "lineage.json", "lineage.png", "report.md"):
        assert (out / name).is_file(), name


def test_every_global_model_is_checkpointed(trained):
    store = Store(trained / "store")
    graph = LineageGraph.load(trained / "store" / "lineage")
    globals_ = [n for n in graph.nodes() if n.kind == "global" and n.request_id is None]
    assert [n.id for n in globals_] == ["global-r0", "global-r1", "global-r2"]
    for node in globals_:
        assert store.get(node.weights)  # present and checksum-verified
    locals_ = [n for n in graph.nodes() if n.kind == "local" and n.request_id is None]
    assert len(locals_) == 4 and all(n.parents == (f"global-r{n.round - 1}",) for n in locals_)
    assert graph.node("global-r2").parents == ("local-r2-p0", "local-r2-p1")


def test_separate_unlearn_run_equals_train_plus_unlearn(trained, train_unlearn, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(trained / "store", store)
    res = run_app(mode="unlearn", store_dir=str(store), out_dir=str(tmp_path / "out"), derive="finetune",
                  derive_depth=2)
    assert res["final_global"]["after_digest"] == train_unlearn["final_global"]["after_digest"]
    assert [m["id"] for m in res["affected_models"]] == [m["id"] for m in train_unlearn["affected_models"]]


def test_requests_use_the_fishers_prepared_after_training(trained, train_unlearn):
    res = train_unlearn
    assert res["timing"]["prepare_s"] > 0
    assert res["fisher_sources"]["retain"] == "prepared"
    assert sorted(res["fisher_sources"]["forget_prepared"]) == sorted(int(p) for p in res["holders"])
    store = Store(trained / "store")  # what training left; the request erased the server's (its test below)
    weights = LineageGraph.open(trained / "store" / "lineage").node(res["final_global"]["id"]).weights
    prepared = store.get_ref(f"prepared-retain/{weights}")
    assert prepared is not None and store.meta(prepared)["kind"] == "prepared-retain-fisher"
    for pid in res["holders"]:
        doc = Store(trained / "store" / "clients" / pid).get_json(f"prepared/{weights}")
        assert "3" in doc["classes"], pid


def test_prepared_forget_fishers_equal_computed_ones_and_a_missing_one_falls_back(trained, train_unlearn, tmp_path):
    # Without the clients' prepared forget-Fishers they compute them: bit for bit the same unlearned model.
    store = tmp_path / "store"
    shutil.copytree(trained / "store", store)
    for doc in store.glob("clients/*/docs/prepared"):
        shutil.rmtree(doc)
    res = run_app(mode="unlearn", store_dir=str(store), out_dir=str(tmp_path / "out"), derive="finetune",
                  derive_depth=2, repair="off")  # the digest is the unlearned model's, before any repair
    assert res["fisher_sources"] == {"retain": "prepared", "forget_prepared": []}
    assert res["final_global"]["after_digest"] == train_unlearn["final_global"]["after_digest"]
    # Without the server's prepared retain-Fisher every client computes one (retain-fisher=fresh), and says so.
    store = tmp_path / "store2"
    shutil.copytree(trained / "store", store)
    shutil.rmtree(store / "refs" / "prepared-retain")
    res = run_app(mode="unlearn", store_dir=str(store), out_dir=str(tmp_path / "out2"), derive="finetune",
                  derive_depth=2, repair="off")
    assert res["fisher_sources"]["retain"] == "fresh"
    assert res["final_global"]["after"]["forget_acc"] <= 0.05


def test_a_second_request_unlearns_the_versions_the_first_left_not_the_models_they_replaced(train_unlearn,
                                                                                            tmp_path):
    # Request 1 (class 3) replaced every affected model by its unlearned (or repaired) version. Request 2 (class 5)
    # on the same store unlearns those versions, not the replaced models again: as many models as request 1, not
    # twice as many (unlearning the replaced ones too doubled the affected set with every request).
    store = tmp_path / "store"
    shutil.copytree(train_unlearn["store_dir"], store)
    graph = LineageGraph.open(store / "lineage")
    replaced = graph.superseded()
    live_before = {n.id for n in graph.nodes()} - replaced
    res = run_app(mode="unlearn", store_dir=str(store), out_dir=str(tmp_path / "out"), forget_classes="5",
                  derive="finetune", derive_depth=2, retrain_baseline=False, repair="off")
    second = [m["id"] for m in res["affected_models"]]
    assert res["request_state"]["state"] == "verified"
    assert len(second) == len(train_unlearn["affected_models"])
    assert not set(second) & replaced and set(second) <= live_before
    assert all("~u" in m for m in second)  # every one a version request 1 left
    assert res["final_global"]["after"]["forget_acc"] <= 0.05


def test_the_models_a_request_replaced_are_erased_at_the_server_and_the_clients(train_unlearn):
    # erase-superseded (the default): once the request is verified and repaired, the weights it replaced (which
    # still hold class 3) and its forget-Fishers are gone, at the server and at the clients holding derived models;
    # each read says why; every live model reads back.
    res, root = train_unlearn, Path(train_unlearn["store_dir"])
    store, graph = Store(root), LineageGraph.open(root / "lineage")
    replaced = graph.superseded()
    server_replaced = [graph.node(i) for i in replaced if graph.node(i).weights]
    client_replaced = [graph.node(i) for i in replaced if not graph.node(i).weights]
    assert server_replaced and client_replaced
    erasure = res["erasure"]
    assert erasure["failures"] == {} and erasure["server_models"] == len(server_replaced)
    assert erasure["client_models"] == erasure["client_files"] == len(client_replaced)
    for node in server_replaced:
        assert not store.has(node.weights), node.id
        with pytest.raises(StoreError, match=f"erased .*{res['request']['id']}"):
            store.get(node.weights)
    for node in graph.nodes():
        if node.id not in replaced and node.weights:
            assert store.get(node.weights), node.id
    journal = RequestJournal.for_store(store).latest(res["request"]["id"])
    assert journal.state == "verified"
    assert all(not store.has(d) for d in journal.doc["fishers"]["forget"].values())
    assert not [name for name in store.refs("prepared-retain/")
                if name.split("/")[-1] in {n.weights for n in server_replaced}]
    doc = store.get_json(f"erasures/{res['request']['id']}")
    assert sorted(doc["models"]) == sorted(n.id for n in server_replaced)
    for node in client_replaced:
        client = Store(root / "clients" / str(node.client))
        entry = client.get_json("models")[node.id]
        assert "erased" in entry and not client.has(entry["weights"]), node.id
    for node in graph.nodes():  # the clients' live models read back
        if node.id not in replaced and node.meta.get("held-by", "").startswith("client:"):
            client = Store(root / "clients" / str(node.client))
            assert client.get(client.get_json("models")[node.id]["weights"]), node.id
    assert "erased: the weights of" in (Path(res["out_dir"]) / "report.md").read_text()


def test_erase_superseded_false_keeps_the_replaced_models(trained, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(trained / "store", store)
    res = run_app(mode="unlearn", store_dir=str(store), out_dir=str(tmp_path / "out"), derive="finetune",
                  derive_depth=2, repair="off", erase_superseded=False)
    assert "erasure" not in res
    graph, kept = LineageGraph.open(store / "lineage"), Store(store)
    assert all(kept.get(graph.node(i).weights) for i in graph.superseded() if graph.node(i).weights)
    assert not (store / "erased").exists()


# ------------------------------------------------------------------------------------------------------
# the baselines as methods (strategies.baseline)
# ------------------------------------------------------------------------------------------------------


def _baseline_run(trained: Path, tmp_path: Path, method: str, **overrides) -> tuple[dict, Path]:
    store = tmp_path / "store"
    shutil.copytree(trained / "store", store)
    res = run_app(mode="unlearn", store_dir=str(store), out_dir=str(tmp_path / "out"), method=method,
                  derive="finetune", derive_depth=2, **overrides)
    return res, store


def test_finetune_as_the_method_trains_every_affected_model_where_its_kept_data_lives(trained, tmp_path):
    res, store = _baseline_run(trained, tmp_path, "finetune", baseline_rounds=2, baseline_steps=5)
    assert res["method"] == "finetune" and res["baseline"]["steps"] == 5
    assert res["request_state"]["state"] == "verified" and "alpha_auto" not in res
    assert "repair" not in res and "repair_held" not in res  # a baseline is compared as it leaves the models
    graph, server = LineageGraph.open(store / "lineage"), Store(store)
    for m in res["affected_models"]:
        node, rep = graph.node(m["id"]), m["baseline"]
        assert m["version"] and graph.node(m["version"]).request_id == res["request"]["id"], m["id"]
        assert rep["method"] == "finetune" and rep["rows"] > 0 and rep["stop"] == "budget", m
        if node.kind == "global":  # FedAvg rounds over every client that keeps data
            assert rep["executors"] == [0, 1] and rep["rounds"] == 2 and rep["steps"] == 2 * 2 * 5, m
        elif node.kind == "local":  # at the client that trained it
            assert rep["executors"] == [node.client] and rep["steps"] == 2 * 5, m
        else:  # client-held: rounds x steps at its holder
            assert "executors" not in rep and rep["steps"] == 2 * 5, m
        if node.weights:
            assert graph.node(m["version"]).weights != node.weights, m["id"]
            with pytest.raises(StoreError, match="erased"):  # erase-superseded: the original is gone
                server.get(node.weights)
    assert res["erasure"]["failures"] == {} and res["erasure"]["client_models"] == 4
    assert "method finetune" in (Path(res["out_dir"]) / "report.md").read_text()


def test_gradient_ascent_on_a_client_leaves_models_without_its_data_as_they_were(trained, tmp_path):
    # client 0 is forgotten: only it holds the data to ascend on. Client 1's derived models never had a row of it
    # there, so the baseline cannot reach them: their versions equal their originals, and erasing the originals
    # must not delete the weights the versions still read.
    res, store = _baseline_run(trained, tmp_path, "gradient_ascent", request_kind="client", forget_clients="0",
                               baseline_rounds=1, baseline_steps=5)
    assert res["request_state"]["state"] == "verified"
    reports = {m["id"]: m["baseline"] for m in res["affected_models"]}
    graph = LineageGraph.open(store / "lineage")
    client1 = Store(store / "clients" / "1")
    index = client1.get_json("models")
    for model_id, rep in reports.items():
        node = graph.node(model_id)
        if node.weights:
            assert rep["executors"] == [0] and 0 < rep["steps"] <= 5, (model_id, rep)
        elif node.client == 1:
            assert rep == {"method": "gradient_ascent", "rows": 0, "steps": 0, "stop": "no_data"}, model_id
            version = index[next(m["version"] for m in res["affected_models"] if m["id"] == model_id)]
            assert version["weights"] == index[model_id]["weights"]
            assert client1.get(version["weights"])  # still readable after erasure
        else:
            assert rep["rows"] > 0 and rep["steps"] > 0, (model_id, rep)
    final = res["final_global"]
    assert final["after"]["forget_acc"] < final["before"]["forget_acc"]


def test_retrain_as_the_method_times_the_retrained_federation_and_changes_no_model(trained, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(trained / "store", store)
    nodes_before = len(LineageGraph.open(store / "lineage"))
    res = run_app(mode="unlearn", store_dir=str(store), out_dir=str(tmp_path / "out"), method="retrain",
                  derive="finetune", derive_depth=2)
    final, timing = res["final_global"], res["timing"]
    assert timing["unlearn_s"] == timing["retrain_s"] > 0
    assert final["after"] == final["retrained"] and final["after"]["forget_acc"] == 0.0
    assert final["before"]["forget_acc"] > 0.5
    assert res["affected_models"] == [] and "skipped" in res["erasure"]
    assert len(LineageGraph.open(store / "lineage")) == nodes_before


def test_a_request_begun_by_one_method_is_not_finished_by_another(tmp_path):
    # the journal records the method a request was received with; serve_request refuses to resume it with another
    from fl_unlearn.recovery import serve_request
    from strategies.baseline import BaselineSettings, BaselineSteps
    from strategies.journaled import ServerSteps
    from strategies.server import UnlearnOutcome

    request = UnlearningRequest.for_classes([3], id="r1", created=0.0)
    store, graph = Store(tmp_path / "store"), LineageGraph.open(tmp_path / "store" / "lineage")
    journal = RequestJournal.for_store(store)
    outcome = UnlearnOutcome(request, [], [])
    journal.append(request.id, "received", {"request": request.to_dict(), "method": "finetune"})
    with pytest.raises(UnlearnError, match="begun with method=finetune"):
        serve_request(journal, request, graph, store, ServerSteps(None, None, request, outcome))
    old = UnlearningRequest.for_classes([4], id="r2", created=0.0)
    journal.append(old.id, "received", {"request": old.to_dict()})  # journaled before methods were recorded
    steps = BaselineSteps(None, None, old, outcome, BaselineSettings("gradient_ascent"))
    with pytest.raises(UnlearnError, match="begun with method=fiun"):
        serve_request(journal, old, graph, store, steps)
    assert [e.state for e in journal.entries()] == ["received", "received"]  # nothing journaled by the refusals


@pytest.mark.parametrize(("overrides", "problem"), [
    ({"method": "sgd"}, "method='sgd' is not one of"),
    ({"method": "sisa"}, "sisa-shards or sisa-slices > 1"),
    ({"method": "sisa", "sisa-shards": 2, "request-kind": "client", "hybrid-policy": "approximate"},
     "contradicts"),
    ({"method": "finetune", "sisa-slices": 2, "request-kind": "client"}, "FedAvg lineage"),
    ({"method": "finetune", "baseline-steps": 0}, "must be >= 1"),
    ({"method": "gradient_ascent", "ascent-loss-ceiling": float("inf")}, "finite and > 0"),
])
def test_method_settings_are_checked(overrides, problem):
    with pytest.raises(ConfigError, match=problem):
        AppConfig.from_run_config(overrides)


def test_unknown_class_fails_clearly_and_changes_nothing(trained, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(trained / "store", store)
    before = tree_digest(store)
    with pytest.raises(RequestError, match=r"Unknown class \[12\]"):
        run_app(mode="unlearn", store_dir=str(store), out_dir=str(tmp_path / "out"), forget_classes="12",
                derive="finetune", derive_depth=2)
    assert tree_digest(store) == before


def test_malformed_request_fails_clearly_and_changes_nothing(trained, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(trained / "store", store)
    bad = tmp_path / "forget.json"
    bad.write_text('{"0": [1, 2,')
    before = tree_digest(store)
    cfg = AppConfig.from_run_config({**BASE, "mode": "unlearn", "store-dir": str(store), "out-dir": str(tmp_path),
                                     "request-kind": "samples", "forget-samples": str(bad), "derive": "finetune",
                                     "derive-depth": 2})
    with pytest.raises(RequestError, match="malformed"):
        run_experiment(grid=None, cfg=cfg)  # fails before any message is sent
    assert tree_digest(store) == before


@pytest.mark.parametrize("request_keys, problem", [
    ({"forget-classes": "3,12"}, r"Unknown class \[12\]; the dataset has classes 0-9"),
    ({"request-kind": "client", "forget-clients": "5"}, r"Unknown client \[5\]; known clients: 0-1"),
])
def test_a_request_the_federation_cannot_serve_fails_before_training(tmp_path, request_keys, problem):
    """mode=train+unlearn: an unknown class or client is reported before any message is sent or model trained."""
    cfg = AppConfig.from_run_config({**BASE, "mode": "train+unlearn", "out-dir": str(tmp_path / "out"),
                                     "store-dir": str(tmp_path / "store"), **request_keys})
    with pytest.raises(RequestError, match=problem):
        run_experiment(grid=None, cfg=cfg)
    assert not (tmp_path / "store" / "lineage").exists()


def test_fisher_layers_matching_nothing_fail_before_training(tmp_path):
    cfg = AppConfig.from_run_config({**BASE, "out-dir": str(tmp_path / "out"), "store-dir": str(tmp_path / "store"),
                                     "fisher-layers": "features.9.*"})
    with pytest.raises(ConfigError, match=r"\['features.9.\*'\] match no parameter; known: "):
        run_experiment(grid=None, cfg=cfg)
    assert not (tmp_path / "store" / "lineage").exists()


def test_multi_root_request_merges_two_holders(tmp_path):
    # Pathological split, 4 clients x 3 classes: pick two classes that each live on one client only.
    from fl_unlearn.data import DataConfig, class_histogram, load_federated

    data = load_federated(DataConfig(source="digits", num_partitions=4, partitioner="pathological",
                                     classes_per_partition=3, seed=BASE["seed"]))
    owners: dict[int, list[int]] = {}
    for pid in range(4):
        for c in class_histogram(data.partition(pid)):
            owners.setdefault(c, []).append(pid)
    single = {c: ps[0] for c, ps in sorted(owners.items()) if len(ps) == 1}
    (a, pa), (b, pb) = next(((x, y) for x in single.items() for y in single.items() if x[1] < y[1]))
    res = run_app(num_nodes=4, num_clients=4, partitioner="pathological", classes_per_partition=3,
                  forget_classes=f"{a},{b}", out_dir=str(tmp_path), num_server_rounds=1, **QUICK_FISHER)
    assert sorted(res["holders"]) == sorted([str(pa), str(pb)])  # two roots' clients, merged with MFIM
    assert {m["owner"] for m in res["affected_models"] if m["kind"] == "local"} == {f"client:{pa}", f"client:{pb}"}
    assert res["final_global"]["after"]["forget_acc"] <= 0.05


def test_client_request_is_served_and_reported(tmp_path):
    res = run_app(request_kind="client", forget_clients="1", out_dir=str(tmp_path), num_server_rounds=1,
                  retrain_baseline=True, erase_superseded=False, **QUICK_FISHER)
    # the retain-Fisher: client 0's own whole-partition Fisher, prepared after training (client 1 is forgotten)
    from fl_unlearn.mfim import merge_fishers

    store = Store(Path(res["store_dir"]))
    assert res["fisher_sources"]["retain"] == "prepared-kept"
    weights = LineageGraph.open(Path(res["store_dir"]) / "lineage").node("global-r1").weights
    parts = {p: store.get(store.get_ref(f"prepared-retain/p{p}/{weights}")) for p in (0, 1)}
    journaled = store.get(RequestJournal.for_store(store).latest(res["request"]["id"]).doc["fishers"]["retain"])
    expected = merge_fishers([parts[0]], num_samples=[1], mode="weighted_mean")
    assert all(torch.equal(journaled[k], expected[k]) for k in expected)
    assert not all(torch.equal(parts[0][k], parts[1][k]) for k in parts[0])
    assert res["request"]["clients"] == [1] and res["holders"] == {"1": pytest.approx(res["holders"]["1"])}
    assert {m["id"] for m in res["affected_models"]} == {"local-r1-p1", "global-r1"}
    for part in ("before", "after", "retrained"):
        assert res["final_global"][part]["forget_acc"] is not None  # measured on client 1, where the data is
    # client 1 trained local-r1-p1 but holds nothing to keep: it leaves the model as FIUn left it, and says so
    assert res["repair_server"]["models"]["local-r1-p1"] == {
        "repaired": False, "rounds": 0, "val_loss": [], "node": None,
        "retain_before": None, "retain_after": None, "forget_after": None}


def test_a_twin_whose_evaluation_fails_goes_unreported_and_the_retraining_goes_on():
    from fl_unlearn.errors import UnlearnError
    from strategies.experiment import twin_evaluator

    rows = {"global-r1": {"id": "global-r1"}, "local-r1-p0": {"id": "local-r1-p0"}}
    evaluated = []

    def evaluate(weights_list):
        evaluated.append(float(weights_list[0]["w"]))
        if weights_list[0]["w"] < 0:  # as member_losses_at_clients raises when a client answers with an error
            raise UnlearnError("query.losses failed on 1 node(s): simulated client crash")
        return [{"retain_acc": float(weights_list[0]["w"])}]

    on_model = twin_evaluator(rows, evaluate)
    on_model("local-r1-p0", {"w": torch.tensor(-1.0)})
    on_model("global-r1", {"w": torch.tensor(0.75)})
    on_model("local-r1-p1", {"w": torch.tensor(0.5)})  # not an affected model: not evaluated
    assert rows["global-r1"]["retrained"] == {"retain_acc": 0.75} and "retrained" not in rows["local-r1-p0"]
    assert evaluated == [-1.0, 0.75]


def test_the_retraining_asks_its_clients_for_no_fisher():
    from flwr.serverapp.strategy import FedAvg

    from fl_unlearn.requests import UnlearningRequest
    from strategies import records as R
    from strategies.retrain import RetrainStrategy

    for request, excluded in ((UnlearningRequest.for_classes([3]), [3]), (UnlearningRequest.for_clients([0]), None)):
        extra = RetrainStrategy(FedAvg(), request)._extra_train_config(1)
        assert extra[R.ACCUMULATE] is False  # the client default is True: a Fisher per round, then thrown away
        assert extra.get(R.EXCLUDE_CLASSES) == excluded


def test_a_client_request_reports_the_backdoor_and_the_membership_inference(tmp_path):
    # client 0 trains with half its rows triggered and labelled 7: the trained federation learns the trigger, the one
    # retrained without client 0 does not; every evaluated model gets its attack success rate, and its MIA AUC where
    # its evaluator holds members
    # The batch estimator: with the default (expected) this under-trained federation (69 % kept accuracy) keeps the
    # poisoned derived model at 66 % ASR and the final model at 39 % (7.9 % with batch); on MNIST
    # (benchmarks/baselines.py) the default leaves 0.0 % on the final model and at most 7.1 % on any.
    res = run_app(request_kind="client", forget_clients="0", backdoor_fraction=0.5, out_dir=str(tmp_path),
                  retrain_baseline=True, repair="off", mia_samples=500, derive="finetune", fisher_estimator="batch",
                  fisher_samples=2048, retain_fisher_samples=0)
    final = res["final_global"]
    assert final["before"]["backdoor_asr"] >= 0.5 and final["retrained"]["backdoor_asr"] <= 0.1
    for part in ("before", "after", "retrained"):
        assert 0.0 <= final[part]["mia_auc"] <= 1.0 and 0.0 <= final[part]["backdoor_asr"] <= 1.0
    owners = {m["owner"]: m for m in res["affected_models"] if m["kind"] == "derived"}
    assert set(owners) == {"client:0", "client:1"}
    # measured by their holders: client 1 holds none of client 0's rows (no members), client 0 all of them
    assert "mia_auc" not in owners["client:1"]["after"] and 0.0 <= owners["client:0"]["after"]["mia_auc"] <= 1.0
    poisoned = owners["client:0"]  # derived from the global model on client 0's triggered rows: the backdoor
    assert poisoned["before"]["backdoor_asr"] >= 0.5 > poisoned["after"]["backdoor_asr"]
    for m in res["affected_models"]:
        assert m["kind"] == "derived" or "mia_auc" in m["after"], m["id"]
        assert 0.0 <= m["after"]["backdoor_asr"] <= 1.0, m["id"]
    report = (tmp_path / "report.md").read_text()
    assert "| MIA AUC (forgotten data) | backdoor ASR |" in report
    assert "| MIA AUC (before / after) | backdoor ASR (before / after) |" in report
    from fl_unlearn.sweep import figures
    row = figures(res)
    assert row["backdoor_asr_before"] == final["before"]["backdoor_asr"] and row["mia_auc_after"] is not None


@pytest.mark.parametrize(("overrides", "problem"), [
    ({"backdoor-fraction": 0.5}, "set request-kind=client"),
    ({"backdoor-fraction": 1.5, "request-kind": "client"}, r"in \[0, 1\]"),
    ({"backdoor-target": -1}, "label >= 0"),
    ({"mia-samples": -1}, "mia-samples must be >= 0"),
])
def test_verification_settings_are_checked(overrides, problem):
    with pytest.raises(ConfigError, match=problem):
        AppConfig.from_run_config(overrides)


def test_keeps_nothing_names_the_clients_a_request_leaves_without_data():
    from strategies.forget import keeps_nothing

    info = {"num-examples": 10, "histogram": {3: 6, 5: 4}}
    assert keeps_nothing(UnlearningRequest.for_clients([1]), 1, info)
    assert not keeps_nothing(UnlearningRequest.for_clients([1]), 0, info)
    assert keeps_nothing(UnlearningRequest.for_classes([3, 5]), 0, info)
    assert not keeps_nothing(UnlearningRequest.for_classes([3]), 0, info)
    assert keeps_nothing(UnlearningRequest.for_samples({0: list(range(10))}), 0, info)
    assert not keeps_nothing(UnlearningRequest.for_samples({0: [1, 2]}), 0, info)
    assert not keeps_nothing(UnlearningRequest.for_classes([3]), 0, None)  # unknown: assume it keeps some


def test_a_forgotten_clients_own_derived_models_are_unlearned_with_the_federations_retain_fisher(tmp_path):
    # Client 1 derived a model from the final global and is then forgotten: it keeps no data for that model's
    # retain-Fisher. It dampens it with the federation's (sent in train.unlearn) instead of failing the request, and
    # is not asked to repair it (nothing to repair on). Found on the Deployment Engine: the request stayed incomplete.
    res = run_app(request_kind="client", forget_clients="1", out_dir=str(tmp_path), num_server_rounds=1,
                  derive="finetune", derive_depth=1, **QUICK_FISHER)
    state = res["request_state"]
    assert state["state"] == "verified" and state["missing"] == [] and state["failures"] == {}
    derived = {m["id"]: m for m in res["affected_models"] if m["kind"] == "derived"}
    assert set(derived) == {"derived-finetune-p0-global-r1-1", "derived-finetune-p1-global-r1-1"}
    assert all(m["version"] for m in derived.values())
    repaired = res.get("repair_held", {}).get("models", {})
    assert "derived-finetune-p1-global-r1-1" not in repaired


def test_alpha_auto_calibrates_at_the_clients(trained, tmp_path):
    from fl_unlearn.calibrate import candidate_grid

    store = tmp_path / "store"
    shutil.copytree(trained / "store", store)
    res = run_app(mode="unlearn", store_dir=str(store), out_dir=str(tmp_path / "out"), fiun_alpha="auto",
                  calibration_forget_samples=40, calibration_retain_samples=30, derive="finetune", derive_depth=2)
    auto = res["alpha_auto"]
    # two clients scored their own samples: at most 40 forget and exactly 30 kept samples each
    assert 0 < auto["forget_samples"] <= 80 and auto["retain_samples"] == 60
    assert [(g["alpha"], g["lam"]) for g in auto["grid"]] == list(candidate_grid())
    assert auto["target"] == DEFAULTS["calibration-forget-tolerance"]
    # the choice is the grid's best kept accuracy among candidates that forget down to the target (ties: later)
    # class request: each lambda's alphas were walked strongest first, up to the first that kept more forget
    # samples than the federation's budget (past the strongest ones, which zero more than half of a weight tensor)
    meeting = [g for g in auto["grid"] if g["forget_acc"] is not None and g["forget_acc"] <= auto["target"]]
    for lam in {g["lam"] for g in auto["grid"]}:
        walk = [g["forget_acc"] is not None for g in auto["grid"] if g["lam"] == lam]
        walked = walk[walk.index(True):]  # (no lambda is left wholly unscored here)
        assert walked == sorted(walked, reverse=True)
    # every scored candidate carries the clients' mean kept loss, which breaks near ties in kept counts
    assert all((g["retain_loss"] is None) == (g["retain_acc"] is None) for g in auto["grid"])
    if auto["target_met"]:
        n, margin = auto["retain_samples"], auto["kept_margin"]
        best = max(round(g["retain_acc"] * n) for g in meeting)
        near = [g for g in meeting if round(g["retain_acc"] * n) >= best - margin]
        fewest = min(g["forget_acc"] for g in near)
        lowest = min(g["retain_loss"] for g in near if g["forget_acc"] == fewest)
        ties = [g for g in near if g["forget_acc"] == fewest and g["retain_loss"] <= lowest * (1 + 1e-6)]
        assert (auto["alpha"], auto["lam"]) == (ties[-1]["alpha"], ties[-1]["lam"])
    else:
        assert not meeting
    assert res["timing"]["calibrate_s"] > 0
    # every other server-held affected model was checked per model: as strong as the choice or stronger (in the
    # check's order), and dampened with what the check gave it
    from fl_unlearn.calibrate import check_sequence

    server_held = {m["id"] for m in res["affected_models"] if m["kind"] != "derived"}
    if auto["target_met"]:
        sequence = check_sequence(auto["alpha"], auto["lam"])
        assert set(auto["per_model"]) == server_held - {res["final_global"]["id"]}
        for m in res["affected_models"]:
            if m["id"] in auto["per_model"]:
                given = (auto["per_model"][m["id"]]["alpha"], auto["per_model"][m["id"]]["lam"])
                assert given in sequence and (m["dampening"]["alpha"], m["dampening"]["lam"]) == given
                if not auto["per_model_met"][m["id"]]:  # no candidate forgot it at some holder: the strongest
                    assert given == sequence[-1]
    derived = [m for m in res["affected_models"] if m["kind"] == "derived"]
    assert derived and all(m["version"] for m in derived)
    if auto["target_met"]:  # client-held models: checked where they live, from the choice towards stronger ones
        for m in derived:
            d = m["dampening"]
            assert d["check"] in ("met", "own-fisher", "not-met") and (d["alpha"], d["lam"]) in sequence
            if d["check"] == "not-met":
                assert (d["alpha"], d["lam"]) == sequence[-1]
    # repair=auto runs exactly when calibration gave up more than a point of kept accuracy, or (a class request,
    # the forget guard on by default) left a scored forget sample correct; then it is reported
    gave_up = auto["retain_before"] - auto["retain_after"] > 0.01 or auto["forget_after"] > 0
    assert ("repair" in res) == gave_up
    graph = LineageGraph.load(store / "lineage")
    held = res["repair_held"]  # the clients' own models are always offered a repair (repair=auto), where they live
    others = res["repair_server"]  # repair-scope=all: every other server-held model, where the rule asks
    assert res["timing"]["repair_s"] == pytest.approx(held["seconds"] + others["seconds"]
                                                      + (res["repair"]["seconds"] if gave_up else 0))
    assert set(others["models"]) == server_held - {res["final_global"]["id"]}
    for m in res["affected_models"]:
        if m["id"] not in others["models"]:
            continue
        rep = others["models"][m["id"]]
        wanted = rep["retain_before"] - rep["retain_after"] > 0.01 or (rep["forget_after"] or 0) > 0
        assert rep["repaired"] == wanted == (rep["node"] is not None) == ("after_repair" in m), (m["id"], rep)
        if rep["repaired"]:
            node = graph.node(rep["node"])
            assert node.parents == (m["version"],) and node.kind == m["kind"] and Store(store).get(node.weights)
            assert rep["val_loss"] and min(rep["val_loss"]) <= rep["val_loss"][0]
    assert set(held["models"]) == {m["id"] for m in derived}
    for m in derived:
        node = graph.node(held["models"][m["id"]]["node"])  # a new node below its unlearned version
        assert node.parents == (m["version"],) and node.meta["client-weights"] and node.owner == m["owner"]
        assert m["after_repair"]["retain_acc"] is not None
    if gave_up:
        rep = res["repair"]
        assert res["final_global"]["after_repair"] and rep["val_loss"][rep["chosen"]] == min(rep["val_loss"])
        served = next(m for m in res["affected_models"] if m["id"] == res["final_global"]["id"])
        assert served["after_repair"] == res["final_global"]["after_repair"]
        assert graph.node(rep["node"]).parents == (res["final_global"]["version"],)


def test_alpha_auto_uses_the_configured_grid(trained, tmp_path):
    """``calibration-alphas-per-octave`` / ``calibration-lambdas`` reach the clients: they score that grid, and the
    per-model check walks it (an intermediate lambda included)."""
    from fl_unlearn.calibrate import candidate_grid, check_sequence, grid_alphas

    store = tmp_path / "store"
    shutil.copytree(trained / "store", store)
    res = run_app(mode="unlearn", store_dir=str(store), out_dir=str(tmp_path / "out"), fiun_alpha="auto",
                  calibration_forget_samples=40, calibration_retain_samples=30, calibration_alphas_per_octave=1,
                  calibration_lambdas="1,0.5,0", repair="off")
    auto = res["alpha_auto"]
    grid = candidate_grid(grid_alphas(1), (1.0, 0.5, 0.0))
    assert [(g["alpha"], g["lam"]) for g in auto["grid"]] == list(grid) and len(grid) == 33
    assert (auto["alpha"], auto["lam"]) in grid
    if auto["target_met"]:
        sequence = check_sequence(auto["alpha"], auto["lam"], grid_alphas(1), (1.0, 0.5, 0.0))
        for m in res["affected_models"]:
            assert (m["dampening"]["alpha"], m["dampening"]["lam"]) in sequence


def test_calibration_grid_config_is_checked():
    from fl_unlearn.calibrate import grid_alphas
    from strategies.experiment import client_calibration

    cfg = AppConfig.from_run_config({**BASE, "calibration-alphas-per-octave": 4, "calibration-lambdas": "1, 0.5,0"})
    settings = client_calibration(cfg)
    assert settings.alphas == grid_alphas(4) and settings.lams == (1.0, 0.5, 0.0)
    assert client_calibration(AppConfig.from_run_config(BASE)).alphas == grid_alphas(2)
    for key, value, match in (("calibration-alphas-per-octave", 0, "alphas-per-octave"),
                              ("calibration-alphas-per-octave", 17, "alphas-per-octave"),
                              ("calibration-lambdas", "", "calibration-lambdas"),
                              ("calibration-lambdas", "1,2", "calibration-lambdas"),
                              ("calibration-lambdas", "-0.5", "calibration-lambdas"),
                              ("calibration-lambdas", "one", "calibration-lambdas"),
                              # gone with the walk inside query.calibrate (the check now tries every alpha)
                              ("calibration-walk-every-alpha", True, "calibration-walk-every-alpha")):
        with pytest.raises(ConfigError, match=match):
            AppConfig.from_run_config({**BASE, key: value})


def test_calibration_tolerance_sets_the_keep_budget_and_refuses_bad_values():
    from strategies.calibration import ClientCalibration

    assert ClientCalibration(forget_samples=64, forget_tolerance=0.01).keep_budget(4) == 2
    assert ClientCalibration(forget_samples=64, forget_tolerance=0.0).keep_budget(4) == 0
    with pytest.raises(ConfigError, match="forget_tolerance"):
        ClientCalibration(forget_tolerance=1.0)
    with pytest.raises(ConfigError, match="calibration-forget-tolerance"):
        AppConfig.from_run_config({**BASE, "calibration-forget-tolerance": -0.1})
    with pytest.raises(ConfigError, match="retain-fisher-samples"):
        AppConfig.from_run_config({**BASE, "retain-fisher-samples": -1})
    with pytest.raises(ConfigError, match="fisher-estimator must be one of batch, per_sample, expected, got 'true'"):
        AppConfig.from_run_config({**BASE, "fisher-estimator": "true"})
    assert AppConfig.from_run_config({**BASE, "fisher-estimator": "expected"}).fisher_estimator == "expected"


def test_kept_tolerance_sets_the_kept_margin_and_refuses_bad_values():
    from strategies.calibration import ClientCalibration

    assert ClientCalibration(kept_tolerance=0.01).kept_margin(128) == 2  # rounded up
    assert ClientCalibration(kept_tolerance=0.01).kept_margin(100) == 1
    assert ClientCalibration(kept_tolerance=0.0).kept_margin(128) == 0
    with pytest.raises(ConfigError, match="kept_tolerance"):
        ClientCalibration(kept_tolerance=-0.5)
    with pytest.raises(ConfigError, match="calibration-kept-tolerance"):
        AppConfig.from_run_config({**BASE, "calibration-kept-tolerance": 1.0})


def test_repair_settings_decide_from_the_calibration_report():
    from fl_unlearn.calibrate import RepairConfig
    from strategies.repair import RepairSettings

    lost_two_points = {"retain_before": 0.95, "retain_after": 0.93}
    assert RepairSettings().wanted(lost_two_points)
    assert not RepairSettings().wanted({"retain_before": 0.95, "retain_after": 0.945})
    assert not RepairSettings(mode="off").wanted(lost_two_points)
    assert RepairSettings(mode="on").wanted({})
    # a class request whose chosen dampening left scored forget samples correct: repaired while the guard is on
    left_one = {"retain_before": 0.95, "retain_after": 0.95, "forget_after": 0.02}
    assert RepairSettings().wanted(left_one) and RepairSettings().wanted(left_one, "classes")
    assert not RepairSettings().wanted(left_one, "client")  # there the target is held-out accuracy, not 0
    assert not RepairSettings().wanted({**left_one, "forget_after": 0.0})
    assert not RepairSettings(steps=RepairConfig(forget_weight=0.0)).wanted(left_one)
    with pytest.raises(ConfigError, match="repair-forget-weight"):
        AppConfig.from_run_config({**BASE, "repair-forget-weight": -1.0})
    for bad in (-0.5, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="repair-budget"):
            AppConfig.from_run_config({**BASE, "repair-budget": bad})
    # the guard is for classes: a client's or a user's samples are not pushed below held-out accuracy
    from strategies.experiment import repair_settings

    cfg = AppConfig.from_run_config(BASE)
    assert repair_settings(cfg, "classes").steps.forget_weight == cfg.repair_forget_weight == 1.0
    assert repair_settings(cfg, "client").steps.forget_weight == repair_settings(cfg, "samples").steps.forget_weight == 0
    with pytest.raises(ConfigError, match="repair"):
        RepairSettings(mode="sometimes")
    with pytest.raises(ConfigError, match="repair-scope"):
        AppConfig.from_run_config({**BASE, "repair-scope": "everything"})


def test_repair_rule_figures_read_only_the_rows_the_repair_holds_back():
    from strategies.repair import RepairSettings, rule_figures

    model = torch.nn.Linear(2, 2)
    right = {"weight": torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), "bias": torch.zeros(2)}  # class = sign of x[0]
    broken = {"weight": torch.zeros(2, 2), "bias": torch.tensor([1.0, 0.0])}  # always class 0
    x = torch.tensor([[1.0, 0.0]] * 4 + [[-1.0, 0.0]] * 12)
    kept = (x, (x[:, 0] > 0).long())  # the held-back quarter (the first 4 rows) is class 1, the rest class 0
    figures = rule_figures(model, right, broken, [kept], [None], 0.25)
    # on every row the broken model would keep 12 of 16 (75 %); on the 4 held-back rows it keeps none
    assert figures == {"retain_before": 1.0, "retain_after": 0.0, "forget_after": None}
    assert RepairSettings().wanted(figures)
    forget = (torch.tensor([[-1.0, 0.0]] * 8), torch.zeros(8, dtype=torch.long))  # still predicted by both
    figures = rule_figures(model, right, right, [kept], [forget], 0.25)
    assert figures == {"retain_before": 1.0, "retain_after": 1.0, "forget_after": 1.0}
    assert RepairSettings().wanted(figures, "classes") and not RepairSettings().wanted(figures, "client")
    assert rule_figures(model, right, right, [kept], [(forget[0][:1], forget[1][:1])], 0.25)["forget_after"] is None


def test_sample_request_on_a_stored_training(trained, tmp_path):
    from strategies.app import app_partition as partition_of

    ctx = Context(0, 0, {"partition-id": 0, "num-partitions": 2}, RecordDict(), {**DEFAULTS, **BASE})
    ids = [int(i) for i in partition_of(ctx)["id"][:20]]
    forget = tmp_path / "forget.json"
    forget.write_text(json.dumps({"0": ids}))
    store = tmp_path / "store"
    shutil.copytree(trained / "store", store)
    res = run_app(mode="unlearn", store_dir=str(store), out_dir=str(tmp_path / "out"), request_kind="samples",
                  forget_samples=str(forget), derive="finetune", derive_depth=2, repair_scope="served")
    assert "repair_server" not in res  # repair-scope=served: the served global and the client-held models only
    assert res["holders"] == {"0": 20}
    assert res["roots"] and all("-p0" in r for r in res["roots"])  # only client 0's models trained on them
    assert res["final_global"]["after"]["forget_acc"] is not None  # measured by client 0 on its 20 samples


def test_a_spent_repair_budget_ends_the_repairs_and_says_so(trained, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(trained / "store", store)
    out = tmp_path / "out"
    res = run_app(mode="unlearn", store_dir=str(store), out_dir=str(out), derive="finetune", derive_depth=2,
                  repair="on", repair_budget=1e-9)  # spent within the first repair round
    budget, served = res["repair_budget"], res["final_global"]["id"]
    assert budget["seconds"] == pytest.approx(1e-9 * res["timing"]["train_s"])
    # the served model's repair began (nothing was counted yet), trained one round and validated it; the rest
    # were skipped and stay as FIUn left them
    assert budget["stopped"] == [served] and res["repair"]["rounds"] == 1 and res["repair"]["budget_cut"]
    assert budget["skipped"] == ["the client-held models", "the other server-held models"]
    assert not {"repair_held", "repair_server"} & set(res)
    assert [m["id"] for m in res["affected_models"] if m.get("after_repair")] == [served]
    assert res["request_state"]["state"] == "verified"  # the request itself is served as before
    report = (out / "report.md").read_text()
    assert f"rounds ended early for {served}" in report and "not repaired: the client-held models" in report


def test_dp_training_and_derived_chains_unlearn(tmp_path):
    # Opacus DP-SGD on the clients (per-sample gradients feed the Fisher accumulator), then incremental
    # derived chains that the clients unlearn themselves.
    res = run_app(out_dir=str(tmp_path), num_server_rounds=1, dp_noise_multiplier=0.5, dp_max_grad_norm=1.0,
                  derive="incremental", derive_depth=2, retain_fisher="accumulated", **QUICK_FISHER)
    derived = [m for m in res["affected_models"] if m["kind"] == "derived"]
    assert derived and all(m["version"] and m["after"]["retain_acc"] is not None for m in derived)
    graph = LineageGraph.load(Path(res["store_dir"]) / "lineage")
    chain = [n for n in graph.nodes() if n.kind == "derived" and n.owner == "client:0" and n.request_id is None]
    assert len(chain) == 2 and chain[1].parents == (chain[0].id,) and chain[0].parents == ("global-r1",)


# ------------------------------------------------------------------------------------------------------
# the wrapper around FedAvg, FedProx and FedAdam
# ------------------------------------------------------------------------------------------------------


def wrapper_app(make_inner, out: dict, store_dir: Path, **wrapper_options) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid, context):
        seed_everything(7)
        model = app_model(Context(0, 0, {}, RecordDict(), {**DEFAULTS, **BASE}))
        wrapper = UnlearningStrategy(make_inner(), Store(store_dir), LineageGraph(), num_nodes=2, seed=7,
                                     num_classes=10, **wrapper_options)
        sent = []
        configure = wrapper.configure_train

        def spy(*args):
            messages = list(configure(*args))
            sent.extend(messages)
            return messages

        wrapper.configure_train = spy
        out["result"] = wrapper.start(grid, ArrayRecord(model.state_dict()), num_rounds=2)
        out["configs"] = [dict(R.first_config(m)) for m in sent]
        out["state_before"] = {k for k in OPTIMISER_STATE if getattr(wrapper.strategy, k, None) is not None}
        out["outcome"] = wrapper.unlearn(grid, UnlearningRequest.for_classes([3]))
        out["state_after"] = {k for k in OPTIMISER_STATE if getattr(wrapper.strategy, k, None) is not None}
        out["graph"] = wrapper.graph
        # training goes on from the unlearned model with the reset optimiser
        out["again"] = wrapper.start(grid, R.tensors_to_record(wrapper.store.get(
            wrapper.graph.node(wrapper.current).weights)), num_rounds=1)

    return app


@pytest.mark.parametrize("make_inner", [
    lambda: FedAvg(),  # federated evaluation on: exercises the clients' evaluate handler
    lambda: FedProx(fraction_evaluate=0.0, proximal_mu=0.5),
    lambda: FedAdam(fraction_evaluate=0.0, eta=0.01, eta_l=0.05),
], ids=["fedavg", "fedprox", "fedadam"])
def test_wrapper_keeps_inner_strategy_working(make_inner, tmp_path):
    out: dict = {}
    simulate(wrapper_app(make_inner, out, tmp_path / "store", **QUICK_FISHER), make_client_app({**BASE}))
    inner = make_inner()
    assert all(c[R.PARENT_ID].startswith("global-r") for c in out["configs"])
    if isinstance(inner, FedProx):
        assert all(c["proximal-mu"] == 0.5 for c in out["configs"])
    if isinstance(inner, FedAdam):
        assert {"m_t", "v_t", "current_arrays"} <= out["state_before"]
        assert out["state_after"] == set()
        assert "FedAdam.m_t" in out["outcome"].optimiser_reset
    assert list(out["result"].train_metrics_clientapp) == [1, 2]
    if type(inner) is FedAvg:
        assert 0.0 <= out["result"].evaluate_metrics_clientapp[2]["accuracy"] <= 1.0
    assert out["outcome"].affected[-1] == "global-r2" and out["outcome"].versions["global-r2"] in out["graph"]
    assert out["again"].arrays is not None


# ------------------------------------------------------------------------------------------------------
# a legacy NumPyClient app with our mod
# ------------------------------------------------------------------------------------------------------


class DigitsClient(NumPyClient):
    """A plain legacy client: it knows nothing of unlearning."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.model = app_model(context)

    def get_parameters(self, config):
        return [v.numpy() for v in self.model.state_dict().values()]

    def _set(self, parameters):
        keys = list(self.model.state_dict())
        self.model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in zip(keys, parameters)})

    def fit(self, parameters, config):
        self._set(parameters)
        ds = app_partition(self.context)
        train_local(self.model, make_loader(ds, 32, shuffle=True, seed=1), epochs=1, lr=0.05)
        return self.get_parameters({}), len(ds), {"legacy": 1}

    def evaluate(self, parameters, config):
        self._set(parameters)
        return 0.0, len(app_test(self.context)), {}


def legacy_client_fn(context: Context):
    return DigitsClient(context).to_client()


def test_legacy_numpyclient_app_with_mod(tmp_path):
    spec = ClientSpec(model_fn=app_model, data_fn=app_partition, test_fn=app_test)
    client_app = ClientApp(client_fn=legacy_client_fn, mods=[with_run_config(BASE), unlearning_mod(spec)])
    out: dict = {}
    simulate(wrapper_app(lambda: FedAvg(fraction_evaluate=0.0), out, tmp_path / "store", retain_fisher="accumulated",
                         **QUICK_FISHER),
             client_app)
    assert out["result"].train_metrics_clientapp[1]["legacy"] == 1.0  # trained by the legacy fit
    graph = out["graph"]
    assert graph.node("global-r2").retain_fisher is not None  # the mod attached a Fisher to each update
    assert set(out["outcome"].versions) == set(out["outcome"].affected)


# ------------------------------------------------------------------------------------------------------
# flwr run, with the SuperLink stopped afterwards
# ------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flwr_run_script_completes_and_stops_its_superlink(tmp_path):
    ports = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port())}
    env = {**os.environ, **ports, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("FLWR_HOME", None)
    cfg = f"dataset='digits' num-clients=2 num-server-rounds=1 max-test-samples=200 out-dir='{tmp_path}'"
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "flwr_run.sh"), str(APP_DIR), "--run-config", cfg,
         "--federation-config", "num-supernodes=2 client-resources-num-cpus=1"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "run status: finished:completed" in proc.stdout
    assert (tmp_path / "results.json").is_file()
    for port in ports.values():
        listening = subprocess.run(["lsof", "-t", f"-iTCP:{port}", "-sTCP:LISTEN"], capture_output=True, text=True)
        assert listening.stdout.strip() == "", f"a process still listens on {port}"


# ------------------------------------------------------------------------------------------------------
# fast checks (no Ray)
# ------------------------------------------------------------------------------------------------------


def test_app_config_defaults_match_the_app_pyproject():
    table = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table == DEFAULTS
    assert "federations" not in tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]


def test_app_config_refuses_relative_paths_and_unknown_keys():
    with pytest.raises(ConfigError, match="absolute"):
        AppConfig.from_run_config({"out-dir": "runs/x"})
    with pytest.raises(ConfigError, match="unknown run-config keys"):
        AppConfig.from_run_config({"num-clientz": 3})
    assert AppConfig.from_run_config({"forget-classes": "3, 7"}).forget_classes == (3, 7)
    assert AppConfig.from_run_config({}).fiun_alpha == "auto"  # the default
    assert AppConfig.from_run_config({"fiun-alpha": "auto", "request-kind": "client"}).fiun_alpha == "auto"
    assert AppConfig.from_run_config({"fiun-alpha": 10}).fiun_alpha == 10.0
    with pytest.raises(ConfigError, match="fiun-alpha"):
        AppConfig.from_run_config({"fiun-alpha": "often"})
    with pytest.raises(ConfigError, match="fiun-alpha"):
        AppConfig.from_run_config({"fiun-alpha": -1.0})


def test_records_round_trip():
    tensors = {"fc.weight": torch.randn(3, 4), "fc.bias": torch.zeros(3)}
    back = R.record_to_tensors(R.tensors_to_record(tensors))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    assert R.histogram_from_config(R.histogram_to_config({7: 2, 1: 5})) == {1: 5, 7: 2}
    assert R.sample_digest([3, 1]) == R.sample_digest([1, 3])


def test_with_config_copies_the_shared_recorddict(task_identity):
    shared = RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"server-round": 1})})
    a, b = (Message(shared, dst_node_id=n, message_type="train") for n in (1, 2))
    with_config(a, {"x": 1})
    assert dict(R.first_config(a)) == {"server-round": 1, "x": 1}
    assert dict(R.first_config(b)) == {"server-round": 1} and dict(shared["config"]) == {"server-round": 1}


def test_reset_optimiser_state_follows_wrappers(tmp_path):
    inner = FedAdam()
    inner.m_t, inner.v_t = {"w": np.ones(2)}, {"w": np.ones(2)}
    wrapper = UnlearningStrategy(inner, Store(tmp_path / "store"), LineageGraph())
    assert sorted(reset_optimiser_state(wrapper)) == ["FedAdam.m_t", "FedAdam.v_t"]
    assert inner.m_t is None and inner.v_t is None


def test_seeded_random_repeats_and_restores_the_global_stream():
    import random

    random.seed(1)
    expected_global = random.random()
    random.seed(1)
    rng_a, rng_b = random.Random(5), random.Random(5)
    with seeded_random(rng_a):
        first = random.sample(range(100), 3)
    with seeded_random(rng_b):
        second = random.sample(range(100), 3)
    assert first == second
    assert random.random() == expected_global


def test_the_served_global_is_the_one_latest_global_points_at_not_the_newest_node(tmp_path):
    # repair-scope=all records a repaired earlier global after the served one: a later run must not serve it
    store, graph = Store(tmp_path / "store"), LineageGraph()
    digests = {i: store.put({"w": torch.full((2,), float(i))}, {"kind": "global"}) for i in range(3)}
    graph.add_node("global-r1", "global", round=1, weights=digests[1])
    graph.add_node("global-r2", "global", round=2, parents=("global-r1",), weights=digests[2])
    graph.add_node("global-r1~repair", "global", round=1, parents=("global-r1",), weights=digests[0])
    assert UnlearningStrategy(FedAvg(), store, graph).current == "global-r1~repair"  # no ref: the newest node
    store.set_ref("latest-global", digests[2])
    strategy = UnlearningStrategy(FedAvg(), store, graph)
    assert strategy.current == "global-r2"
    # ... and the forget-Fisher and the calibration of the next request are taken on it
    assert strategy._newest_affected_global(["global-r1", "global-r2", "global-r1~repair"]).id == "global-r2"
    assert strategy._newest_affected_global(["global-r1", "global-r1~repair"]).id == "global-r1~repair"


def test_wrapper_refuses_a_legacy_strategy(tmp_path):
    from flwr.server.strategy import FedAvg as LegacyFedAvg

    with pytest.raises(ConfigError, match="legacy"):
        UnlearningStrategy(LegacyFedAvg(), Store(tmp_path / "store"), LineageGraph())


def test_train_reply_is_stripped_to_flowers_contract(task_identity):
    content = RecordDict({
        "arrays": ArrayRecord({"w": torch.ones(2)}), "metrics": MetricRecord({"num-examples": 3}),
        R.FISHER_KEY: ArrayRecord({"w": torch.ones(2)}), R.LINEAGE_KEY: ConfigRecord({R.PARTITION_ID: 0}),
    })
    request = Message(RecordDict(), dst_node_id=1, message_type="train")
    reply = Message(content, reply_to=request)
    fisher, lineage = UnlearningStrategy._strip(reply)
    assert fisher is not None and lineage[R.PARTITION_ID] == 0
    assert list(reply.content.array_records) == ["arrays"] and list(reply.content.metric_records) == ["metrics"]


class _PushPullGrid:
    """Replies become pullable ``delay`` seconds after the push; counts pulls (Flower's Grid push / pull API)."""

    def __init__(self, delay: float, silent: tuple[int, ...] = ()):
        self.delay, self.silent, self.pulls, self.pushed = delay, silent, 0, {}

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            mid = f"m{len(self.pushed) + i}"
            m.metadata.__dict__["_message_id"] = mid
            self.pushed[mid] = (m, time.monotonic() + self.delay)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        out = []
        for mid in list(message_ids):
            m, ready = self.pushed[mid]
            if time.monotonic() >= ready and m.metadata.dst_node_id not in self.silent:
                out.append(Message(RecordDict(), reply_to=m))
        return out

    def send_and_receive(self, messages, timeout=None):  # pragma: no cover - exchange must not use it
        raise AssertionError("exchange should push and pull itself")


def test_exchange_pulls_soon_after_the_replies_arrive_and_honours_the_timeout(task_identity):
    from strategies.nodes import exchange

    grid = _PushPullGrid(delay=0.05)
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query.info") for n in (1, 2)]
    start = time.monotonic()
    replies = exchange(grid, msgs, timeout=5.0)
    # Flower's simulation grid pulls every 0.1 s, a SuperLink's every 3 s; exchange starts at 5 ms
    assert len(replies) == 2 and time.monotonic() - start < 0.09 and grid.pulls >= 2
    silent = _PushPullGrid(delay=0.0, silent=(2,))
    start = time.monotonic()
    replies = exchange(silent, [Message(RecordDict(), dst_node_id=n, message_type="query.info") for n in (1, 2)],
                       timeout=0.3)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"] and 0.3 <= time.monotonic() - start < 1.0


def test_an_exchange_pushes_when_begun_and_collects_the_replies_once(task_identity):
    from fl_unlearn.errors import UnlearnError
    from strategies.nodes import Exchange

    grid = _PushPullGrid(delay=0.0)
    round_trip = Exchange(grid, [Message(RecordDict(), dst_node_id=n, message_type="query.info") for n in (1, 2)],
                          timeout=5.0)
    assert len(grid.pushed) == 2 and grid.pulls == 0  # pushed at once; the server's own work goes here
    assert sorted(r.metadata.reply_to_message_id for r in round_trip.replies()) == sorted(grid.pushed)
    with pytest.raises(UnlearnError, match="already collected"):
        round_trip.replies()


def test_exchange_uses_send_and_receive_of_a_grid_without_push_and_pull(task_identity):
    from strategies.nodes import exchange

    grid = _SilentGrid(answers_from=1)
    replies = exchange(grid, [Message(RecordDict(), dst_node_id=1, message_type="query.info")], timeout=0.1)
    assert len(replies) == 1 and grid.calls == 1


def test_freeze_after_startup_freezes_the_long_lived_objects_once_around_the_first_message(monkeypatch):
    import gc

    import strategies.app as app_module

    real_freeze = app_module._freeze_imported_objects
    monkeypatch.setattr(app_module, "_started", False)
    frozen = []
    monkeypatch.setattr(app_module, "_freeze_imported_objects", lambda: frozen.append(len(handled)))
    handled: list = []
    for _ in range(3):
        assert app_module.freeze_after_startup(None, None, lambda msg, ctx: handled.append(msg) or "r") == "r"
    assert frozen == [0, 1] and len(handled) == 3  # before and after the first message, never again
    try:
        real_freeze()
        assert gc.get_freeze_count() > 10_000  # the imports' objects (torch, flwr, datasets)
    finally:
        gc.unfreeze()


class _SilentGrid:
    """Two connected nodes; node 2 answers query.info only from the ``answers_from``-th round trip on."""

    def __init__(self, answers_from: int):
        self.answers_from, self.calls = answers_from, 0

    def get_node_ids(self):
        return [1, 2]

    def send_and_receive(self, messages, timeout=None):
        self.calls += 1
        replies = []
        for m in messages:
            if m.metadata.dst_node_id == 2 and self.calls < self.answers_from:
                continue  # still starting: no reply within the timeout
            cfg = ConfigRecord({R.PARTITION_ID: m.metadata.dst_node_id - 1, R.NUM_EXAMPLES: 5,
                                **R.histogram_to_config({0: 5})})
            reply = Message(RecordDict({R.INFO_KEY: cfg}), reply_to=m)
            reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
            replies.append(reply)
        return replies


def test_node_directory_asks_silent_nodes_again_then_refuses_instead_of_hanging(task_identity):
    from strategies.nodes import NodeDirectory

    late = _SilentGrid(answers_from=2)
    directory = NodeDirectory(2, timeout=0.1)
    directory.refresh(late)
    assert directory.partition == {1: 0, 2: 1} and late.calls == 2
    never = NodeDirectory(2, timeout=0.1)
    with pytest.raises(UnlearnError, match=r"nodes \[2\] did not answer"):
        never.refresh(_SilentGrid(answers_from=99))


class _StaleNodeGrid:
    """A SuperLink listing nodes 2, 3 and 4, where node 3 no longer heartbeats (a SuperNode that went away): the
    SuperLink itself answers for it with NODE_UNAVAILABLE. Push and pull, as Flower's grids do."""

    def __init__(self, listed=(2, 3, 4)):
        self.listed, self.sent = list(listed), {}

    def get_node_ids(self):
        return list(self.listed)

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{len(self.sent)}-{i}"
            self.sent[m.metadata.message_id] = m
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        from flwr.app import Error
        from flwr.common.constant import ErrorCode

        replies = []
        for mid in message_ids:
            m = self.sent[mid]
            node = m.metadata.dst_node_id
            if node == 3:
                reply = Message(Error(ErrorCode.NODE_UNAVAILABLE, "Error: Node Unavailable"), reply_to=m)
                reply.metadata.__dict__["_src_node_id"] = 1  # the SuperLink's own node id
            else:
                cfg = ConfigRecord({R.PARTITION_ID: node - 2 if node == 2 else 1, R.NUM_EXAMPLES: 5,
                                    **R.histogram_to_config({0: 5})})
                reply = Message(RecordDict({R.INFO_KEY: cfg}), reply_to=m)
                reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


def test_node_directory_leaves_out_a_node_the_superlink_reports_unavailable(task_identity):
    from strategies.nodes import NodeDirectory

    directory = NodeDirectory(2, timeout=0.5)
    directory.refresh(_StaleNodeGrid())
    assert directory.partition == {2: 0, 4: 1} and directory.unavailable == {3}
    assert directory.sorted_nodes() == [2, 4]
    # without the stale node there are too few: a clear error within the timeout, not a hang
    short = NodeDirectory(2, timeout=0.3)
    with pytest.raises(UnlearnError, match=r"only 1 of 2 nodes connected .*1 more listed but unavailable"):
        short.refresh(_StaleNodeGrid(listed=(2, 3)))


class _HandlerGrid:
    """Answers every message with the App's own client handlers, in this process (node n holds partition n - 1)."""

    def __init__(self, run_config: dict):
        from strategies.client import unlearning_handlers

        self.handlers = unlearning_handlers(ClientSpec(model_fn=app_model, data_fn=app_partition, test_fn=app_test))
        self.run_config, self.round_trips = run_config, 0

    def send_and_receive(self, messages, timeout=None):
        self.round_trips += 1
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            ctx = Context(0, node, {"partition-id": node - 1, "num-partitions": 2}, RecordDict(), self.run_config)
            reply = self.handlers[m.metadata.message_type](m, ctx)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


def test_models_repaired_in_the_same_rounds_end_as_when_repaired_alone(task_identity):
    """``repair_many_at_clients`` shares each round trip among the models still repairing; each model stops on its
    own, and ends exactly where a repair of it alone ends."""
    from strategies.nodes import NodeDirectory
    from strategies.repair import RepairSettings, repair_at_clients, repair_many_at_clients, validate_at_clients

    run_config = {**DEFAULTS, **BASE}
    torch.manual_seed(1)  # before the model is built: its weights decide the rounds (seed 0: both go on improving)
    model = app_model(Context(0, 1, {"partition-id": 0, "num-partitions": 2}, RecordDict(), run_config))
    fresh = {k: v.detach().clone() for k, v in model.state_dict().items()}  # untrained: many rounds to go
    nodes = NodeDirectory(2)
    nodes.partition = {1: 0, 2: 1}
    configs = {0: {R.FORGET_CLASSES: [3]}, 1: {R.FORGET_CLASSES: [3]}}
    from fl_unlearn.calibrate import RepairConfig

    settings = RepairSettings(samples=128, steps=RepairConfig(max_rounds=3, local_steps=8, lr=0.1, batch_size=16))
    grid = _HandlerGrid(run_config)
    # a model repaired for long already: its validation loss stalls sooner than the fresh one's
    other, _ = repair_at_clients(grid, nodes, [0, 1], configs, fresh,
                                 RepairSettings(samples=128, steps=RepairConfig(max_rounds=12, local_steps=8, lr=0.1,
                                                                                batch_size=16, patience=3)))
    grid.round_trips = 0
    together = repair_many_at_clients(grid, nodes, [0, 1], configs, [fresh, other], settings)
    trips_together = grid.round_trips
    assert together[0][1]["rounds"] > together[1][1]["rounds"]  # each stopped on its own
    alone = []
    for weights in (fresh, other):
        grid.round_trips = 0
        alone.append((*repair_at_clients(grid, nodes, [0, 1], configs, weights, settings), grid.round_trips))
    for (w_many, info_many), (w_one, info_one, _) in zip(together, alone):
        assert info_many["rounds"] == info_one["rounds"] and info_many["val_loss"] == info_one["val_loss"]
        assert all(torch.equal(w_many[k], w_one[k]) for k in w_one)
    assert trips_together == max(trips for _, _, trips in alone) < sum(trips for _, _, trips in alone)
    assert together[0][1]["val_loss"][-1] < together[0][1]["val_loss"][0]  # the repair trained the fresh model
    # one validation round scores several models: kept accuracy on the held-back rows, forget rows predicted
    grid.round_trips = 0
    scores = validate_at_clients(grid, nodes, [0, 1], configs, [fresh, together[0][0]], settings)
    assert grid.round_trips == 1 and len(scores) == 2
    assert all(0 <= s["retain_acc"] <= 1 and 0 <= s["forget_acc"] <= 1 for s in scores)
    assert scores[1]["retain_acc"] > scores[0]["retain_acc"]


def test_a_spent_repair_budget_ends_the_rounds_with_a_validation_round(task_identity):
    """Once the request's repair budget is spent, a repair under way validates its last average and stops."""
    import math

    from fl_unlearn.calibrate import RepairConfig
    from strategies.nodes import NodeDirectory
    from strategies.repair import RepairBudget, RepairSettings, repair_at_clients

    run_config = {**DEFAULTS, **BASE}
    torch.manual_seed(0)
    model = app_model(Context(0, 1, {"partition-id": 0, "num-partitions": 2}, RecordDict(), run_config))
    fresh = {k: v.detach().clone() for k, v in model.state_dict().items()}  # untrained: it would go on repairing
    nodes = NodeDirectory(2)
    nodes.partition = {1: 0, 2: 1}
    configs = {0: {R.FORGET_CLASSES: [3]}, 1: {R.FORGET_CLASSES: [3]}}
    settings = RepairSettings(samples=128, steps=RepairConfig(max_rounds=3, local_steps=8, lr=0.1, batch_size=16))
    grid = _HandlerGrid(run_config)
    unlimited, info = repair_at_clients(grid, nodes, [0, 1], configs, fresh, settings, budget=RepairBudget.of(0, 10))
    assert info["rounds"] == 3 and not info["budget_cut"]
    grid.round_trips = 0
    spent = RepairBudget(0.0)
    cut, info = repair_at_clients(grid, nodes, [0, 1], configs, fresh, settings, budget=spent)
    # round 0 trained once; round 1 only validated that average; nothing more
    assert grid.round_trips == 2 and info["rounds"] == 1 and info["budget_cut"] and len(info["val_loss"]) == 2
    assert info["val_loss"][1] < info["val_loss"][0] and info["chosen"] == 1  # the one round it had still counts
    assert not all(torch.equal(cut[k], unlimited[k]) for k in cut)
    assert spent.skip("the earlier global models") and spent.report()["skipped"] == ["the earlier global models"]
    assert RepairBudget.of(0.5, 40.0).seconds == 20.0 and math.isinf(RepairBudget.of(1.0, None).seconds)
    with pytest.raises(ConfigError, match="repair-budget"):
        RepairBudget.of(-1.0, 10.0)


def _two_clients_and_an_untrained_model() -> tuple[dict, dict, object, dict]:
    """(run config, the App's untrained model's weights, a two-client NodeDirectory, class-3 request configs)."""
    from strategies.nodes import NodeDirectory

    run_config = {**DEFAULTS, **BASE}
    torch.manual_seed(0)
    model = app_model(Context(0, 1, {"partition-id": 0, "num-partitions": 2}, RecordDict(), run_config))
    nodes = NodeDirectory(2)
    nodes.partition = {1: 0, 2: 1}
    return (run_config, {k: v.detach().clone() for k, v in model.state_dict().items()}, nodes,
            {0: {R.FORGET_CLASSES: [3]}, 1: {R.FORGET_CLASSES: [3]}})


def test_server_held_models_are_repaired_at_their_client_where_the_rule_asks(task_identity):
    from fl_unlearn.calibrate import RepairConfig
    from strategies.repair import RepairSettings, repair_sent_at_clients

    run_config, fresh, nodes, configs = _two_clients_and_an_untrained_model()
    steps = RepairConfig(max_rounds=2, local_steps=4, lr=0.1, batch_size=16, forget_weight=0.0)
    grid = _HandlerGrid(run_config)
    sent = {0: [("a", fresh, fresh)], 1: [("b", fresh, fresh)]}
    # unchanged by unlearning, no guard: the rule leaves both alone, and nothing comes back
    kept_as_is = repair_sent_at_clients(grid, nodes, sent, configs, RepairSettings(samples=128, steps=steps))
    assert grid.round_trips == 1 and set(kept_as_is) == {"a", "b"}
    for rep in kept_as_is.values():
        assert not rep["repaired"] and rep["weights"] is None and rep["retain_before"] == rep["retain_after"]
    # repair=on: each is repaired at its own client, in the same round trip, and the repaired weights come back
    done = repair_sent_at_clients(grid, nodes, sent, configs, RepairSettings(mode="on", samples=128, steps=steps))
    assert grid.round_trips == 2
    for rep in done.values():
        assert rep["repaired"] and 1 <= rep["rounds"] <= 2 and min(rep["val_loss"]) <= rep["val_loss"][0]
        assert set(rep["weights"]) == set(fresh)
    assert not all(torch.equal(done["a"]["weights"][k], done["b"]["weights"][k]) for k in fresh)  # own data each


def test_repair_part_head_reaches_the_clients_and_trains_only_the_head(task_identity):
    """``repair-part=head`` travels in train.repair and train.repairsent: the clients train the head alone (the small
    CNN's ``hidden`` and ``fc``), every other weight comes back as it was sent."""
    from fl_unlearn.calibrate import RepairConfig
    from strategies.repair import RepairSettings, repair_at_clients, repair_sent_at_clients

    run_config, fresh, nodes, configs = _two_clients_and_an_untrained_model()
    settings = RepairSettings(mode="on", samples=128, steps=RepairConfig(max_rounds=2, local_steps=4, lr=0.1,
                                                                         batch_size=16, part="head"))
    grid = _HandlerGrid(run_config)

    def head_only(new: dict) -> bool:
        return all(torch.equal(new[k], fresh[k]) == (not k.startswith(("hidden", "fc"))) for k in fresh)

    served, info = repair_at_clients(grid, nodes, [0, 1], configs, fresh, settings)
    assert info["rounds"] >= 1 and info["chosen"] >= 1 and head_only(served)
    done = repair_sent_at_clients(grid, nodes, {0: [("a", fresh, fresh)]}, configs, settings)
    assert done["a"]["repaired"] and head_only(done["a"]["weights"])
    with pytest.raises(ConfigError, match="repair-part"):
        AppConfig.from_run_config({**run_config, "repair-part": "body"})

"""SISA on the Flower engine: the exact path through messages, the planner's record, bad requests.

One ``run_simulation`` runs the App end to end (digits, 2 clients, S=2, R=2, exact policy, gold standard) and
is compared bitwise with the in-process core (``fl_unlearn.sisa.SisaFederation``). The other tests drive
:class:`strategies.sisa_server.FlowerSisaFederation` through an in-process grid that hands every message to
the App's real ClientApp (no Ray): the transport is the only stand-in.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.simulation import run_simulation
from flwr.supercore.task_identity import TaskIdentity

from fl_unlearn.data import load_federated, sample_ids
from fl_unlearn.errors import ConfigError, RequestError, StoreError, UnlearnError
from fl_unlearn.lineage import LineageGraph
from fl_unlearn.requests import UnlearningRequest
from fl_unlearn.sisa import SisaFederation, SisaLayout
from fl_unlearn.store import Store
from strategies.app import make_client_app, make_server_app
from strategies.config import DEFAULTS, AppConfig
from strategies.experiment import _model_factory
from strategies.sisa_server import ApproxSettings, FlowerSisaFederation, sisa_config, split_validation

#: digits, 2 clients, 2 shards x 2 slices, one round per stage.
BASE = {"dataset": "digits", "num-clients": 2, "seed": 7, "max-train-samples": 800, "max-test-samples": 300,
        "sisa-shards": 2, "sisa-slices": 2, "request-kind": "samples", "calibration-samples": 100}


@pytest.fixture(autouse=True)
def _short_ray_tmpdir(monkeypatch):
    path = Path("/tmp") / f"ray{os.getpid()}"
    path.mkdir(exist_ok=True)
    monkeypatch.setenv("RAY_TMPDIR", str(path))
    yield
    shutil.rmtree(path, ignore_errors=True)


def _data(cfg: dict):
    return load_federated(AppConfig.from_run_config(cfg).data_config())


def _revocation(data, layout: SisaLayout) -> dict[int, list[int]]:
    """Client 0: three ids of shard 0 slice 2; client 1: two ids of shard 0 slice 1 (shard 1 untouched)."""
    out = {}
    for k, slc, n in ((0, 2, 3), (1, 1, 2)):
        ids = sample_ids(data.partition(k))
        shard, slices = layout.assign(ids)
        out[k] = ids[(shard == 0) & (slices == slc)][:n].tolist()
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------------
# end to end: the App through run_simulation
# ------------------------------------------------------------------------------------------------------


def test_app_exact_path_equals_scratch_on_flower_and_in_core(tmp_path):
    data = _data(BASE)
    revoked = _revocation(data, SisaLayout(2, 2, 7))
    forget = tmp_path / "forget.json"
    forget.write_text(json.dumps({str(k): v for k, v in revoked.items()}))
    # method=sisa: the exact path whatever the planner would choose (hybrid-policy stays at its default, auto)
    cfg = {**BASE, "method": "sisa", "forget-samples": str(forget), "out-dir": str(tmp_path / "out"),
           "retrain-baseline": True}
    run_simulation(server_app=make_server_app(cfg), client_app=make_client_app(cfg), num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["method"] == "sisa" and results["config"]["hybrid-policy"] == "exact"
    record = results["requests"][0]

    # the per-request record: path, costs, slices, figures
    assert record["path"] == "exact" and record["num_revoked"] == 5
    assert record["slices_retrained"] == {"0": [1, 2]}  # r* = 1 (client 1's ids), shard 1 not touched
    assert record["measured"]["seconds"] > 0 and record["estimated"]["seconds"] > 0
    assert record["measured"]["evaluations"] == record["estimated"]["evaluations"]  # exact counts from the clients
    for part in ("before", "after", "gold"):
        assert 0 <= record[part]["mia_auc"] <= 1 and 0 <= record[part]["held_out_acc"] <= 1
    assert record["equal_to_gold"] == {"0": True} and record["untouched_equal_to_gold"]

    # bitwise: the Flower rerun == the Flower federation from scratch without X == the in-process core's
    store = Store(tmp_path / "out" / "store")
    served = [store.get(d) for d in store.get_json("sisa/state")["served"]]
    gold = [store.get(d) for d in store.get_json("gold/state")["served"]]
    app_cfg = AppConfig.from_run_config(cfg)
    core = SisaFederation(data, sisa_config(app_cfg), Store(tmp_path / "core"), exclude=revoked)
    core.train()
    for s in range(2):
        assert _same(served[s], gold[s]) and _same(served[s], core.shard_weights(s))
    # the checkpoints the rerun replaced (stages 1-2 of shard 0) hold the revoked samples: erased
    # (erase-superseded); a digest equal to one in service would have stayed
    graph = LineageGraph.load(tmp_path / "out" / "store" / "lineage")
    replaced = [graph.node(f"sisa/s0/v0/stage{r}").weights for r in (1, 2)]
    erasure = json.loads((tmp_path / "out" / "results.json").read_text())["erasure"]
    assert erasure["server_models"] == 2 and erasure["bytes_freed"] > 0
    for digest in replaced:
        with pytest.raises(StoreError, match="erased after unlearning request"):
            store.get(digest)
    for node_id in ("sisa/s0/v0/stage0", "sisa/s1/v0/stage1", "sisa/s1/v0/stage2"):  # in service
        assert store.get(graph.node(node_id).weights), node_id


# ------------------------------------------------------------------------------------------------------
# the server driver over an in-process grid
# ------------------------------------------------------------------------------------------------------


class InProcessGrid:
    """A Grid that hands each message straight to a ClientApp (one Context per node), in order."""

    def __init__(self, cfg: dict, num_nodes: int) -> None:
        self.app = make_client_app(cfg)
        self.contexts = {100 + k: Context(0, 100 + k, {"partition-id": k, "num-partitions": num_nodes}, RecordDict(),
                                          {**DEFAULTS, **cfg}) for k in range(num_nodes)}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        return [self.app(msg, self.contexts[msg.metadata.dst_node_id]) for msg in messages]


@pytest.fixture
def one_thread():
    """A server identity for messages built outside a ServerApp; the thread count restored afterwards."""
    threads, saved = torch.get_num_threads(), (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    torch.set_num_threads(threads)  # the App's client mod sets 1 thread for this process


def _federation(cfg: dict, store_dir: Path, **over) -> FlowerSisaFederation:
    app_cfg = AppConfig.from_run_config(cfg, **over)
    data = _data(cfg)
    new_model = _model_factory(app_cfg, data)[1]
    return FlowerSisaFederation(InProcessGrid(cfg, 2), sisa_config(app_cfg), Store(store_dir), LineageGraph(),
                                new_model, num_nodes=2)


def _tree(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


SMALL = {**BASE, "max-train-samples": 400}


@pytest.fixture
def trained(tmp_path, one_thread) -> FlowerSisaFederation:
    fed = _federation(SMALL, tmp_path / "store")
    fed.train()
    return fed


def test_ids_a_client_does_not_hold_are_refused_and_nothing_changes(trained, tmp_path):
    state, nodes, files = json.dumps(trained.state()), len(trained.graph), _tree(tmp_path / "store")
    held = int(sample_ids(_data(SMALL).partition(0))[0])
    with pytest.raises(RequestError, match=r"Client 0 does not hold samples \[999999\]"):
        trained.plan(UnlearningRequest.for_samples({0: [held, 999999]}), policy="exact")
    with pytest.raises(RequestError, match="Unknown client 5"):
        trained.plan({5: [1]})
    assert json.dumps(trained.state()) == state and len(trained.graph) == nodes and _tree(tmp_path / "store") == files


def test_more_slices_than_a_shard_holds_is_refused_before_training(tmp_path, one_thread):
    fed = _federation(SMALL, tmp_path / "store", sisa_slices=500)
    with pytest.raises(ConfigError, match="sisa-slices=500 is larger than some shards"):
        fed.train()
    assert len(fed.graph) == 0 and not fed.trained and not any((tmp_path / "store").rglob("*.safetensors"))


def test_approximate_removal_is_recorded_and_a_later_exact_rerun_starts_early_enough(trained):
    data = _data(SMALL)
    first, second = _revocation(data, trained.layout)[0][:1], _revocation(data, trained.layout)[1][:1]
    _, validation = split_validation(data.test, 100, 7)
    plan = trained.plan({0: first}, policy="approximate")
    done = trained.execute(plan, ApproxSettings(alpha=4.0), validation)
    assert done["path"] == "approximate" and trained.ledgers[0].dirty_from == 2  # slice 2: stages 2.. stale
    stale = trained.graph.node(trained.nodes[0][2])
    assert stale.meta["stale"] and trained.served_nodes[0].startswith("sisa/s0/approx/")
    # the stale checkpoints (stages 2.. of shard 0, the model served before) still hold the ids: erased; a rerun
    # never starts from them
    out_of_service = [trained.checkpoints[0][r] for r in range(2, trained.num_slices + 1)]
    report = trained.erase_out_of_service("req-approx")
    assert sorted(report["objects"]) == sorted(set(out_of_service))
    assert all(not trained.store.has(d) for d in out_of_service) and trained.store.has(trained.served[0])
    # a later exact request in slice 1 reruns from stage 1 and leaves out both requests' ids (P1)
    plan = trained.plan({1: second}, policy="exact")
    assert plan.shards[0].start_stage == 1
    trained.execute(plan, ApproxSettings(), validation)
    assert trained.ledgers[0].dirty_from is None
    assert set(trained.revoked_ids(0, 0).tolist()) == set(first)


def test_a_client_app_without_sisa_mod_is_named_not_averaged(tmp_path, one_thread):
    from flwr.clientapp import ClientApp

    from strategies.app import app_model, app_partition, app_test, with_run_config
    from strategies.client import ClientSpec, register_unlearning_handlers
    from strategies.sisa_client import register_sisa_handlers

    fed = _federation(SMALL, tmp_path / "store")
    spec = ClientSpec(model_fn=app_model, data_fn=app_partition, test_fn=app_test)
    app = ClientApp(mods=[with_run_config(SMALL)])  # the SISA handlers, but `train` rounds go to plain FedAvg
    register_unlearning_handlers(app, spec)
    fed.grid.app = register_sisa_handlers(app, spec)
    with pytest.raises(UnlearnError, match="answered a SISA round without training shard 0"):
        fed.train()
    assert fed.served == [None, None]

"""The App's verification (``strategies.verify``): members' losses where they live, and the backdoored partition.

Runs the real ClientApp in-process through ``test_reliability``'s fake Grid (a fake only here, in a unit test)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fl_unlearn.data import make_loader, sample_ids
from fl_unlearn.lineage import LineageGraph
from fl_unlearn.requests import UnlearningRequest
from fl_unlearn.store import Store
from strategies.app import app_model, app_partition
from strategies.config import DEFAULTS
from strategies.verify import HeldChecks, member_losses_at_clients, nonmember_rows, per_sample_losses
from test_reliability import APP_CFG, CLASS_REQUEST, NUM_CLIENTS, _copy, _grid, _strategy, federation  # noqa: F401


def _context(pid: int, **run_config) -> Context:
    return Context(1, 100 + pid, {"partition-id": pid, "num-partitions": NUM_CLIENTS}, RecordDict(),
                   {**DEFAULTS, **APP_CFG, **run_config})


def test_member_losses_are_the_forgotten_rows_losses_computed_at_their_clients(federation, tmp_path, task_identity):
    store_dir = _copy(federation, tmp_path)
    strategy, grid = _strategy(store_dir), _grid()
    strategy.nodes.refresh(grid)
    graph = LineageGraph.open(store_dir / "lineage")
    weights = [Store(store_dir).get(graph.node(i).weights) for i in ("global-r0", "global-r1")]
    got = member_losses_at_clients(grid, strategy.nodes, CLASS_REQUEST, weights, 10_000)  # a cap above every count
    for w, losses in zip(weights, got):
        expected = []
        for pid in range(NUM_CLIENTS):
            ds = app_partition(_context(pid))
            rows = np.flatnonzero(np.asarray(ds["label"]) == 3)
            model = app_model(_context(pid))
            model.load_state_dict(w)
            expected.append(per_sample_losses(model, make_loader(ds, 256, rows=rows)))
        expected = np.concatenate(expected)
        assert len(losses) == len(expected) > 0
        np.testing.assert_allclose(np.sort(losses), np.sort(expected), rtol=1e-5)
    assert not np.allclose(np.sort(got[0]), np.sort(got[1]))  # each model's own losses
    capped = member_losses_at_clients(grid, strategy.nodes, CLASS_REQUEST, weights[:1], 5)[0]
    assert len(capped) == 5 * NUM_CLIENTS


def test_the_holders_of_client_held_models_run_the_membership_inference_and_the_backdoor_check(federation, tmp_path,
                                                                                              task_identity):
    from fl_unlearn.evaluate import attack_success_rate, mia_auc_from_losses
    from strategies.app import app_test

    store_dir = _copy(federation, tmp_path)
    strategy, grid = _strategy(store_dir), _grid()
    strategy.nodes.refresh(grid)
    graph = LineageGraph.open(store_dir / "lineage")
    held = sorted(n.id for n in graph.nodes() if n.kind == "derived")
    assert len(held) == NUM_CLIENTS
    checks = HeldChecks(mia_samples=10_000, seed=7, backdoor_target=7)  # a cap above every count: all the rows
    got = strategy.evaluate_held(grid, CLASS_REQUEST, held, checks.to_config())
    test = app_test(_context(0))
    nonmembers = make_loader(test, 256, rows=nonmember_rows(test, [3], 10_000, 7))
    for node_id in held:
        node = graph.node(node_id)
        model = app_model(_context(node.client))
        model.load_state_dict(Store(store_dir / "clients" / str(node.client)).get(node.meta["client-weights"]))
        ds = app_partition(_context(node.client))
        members = make_loader(ds, 256, rows=np.flatnonzero(np.asarray(ds["label"]) == 3))  # the holder's own rows
        expected = mia_auc_from_losses(per_sample_losses(model, members), per_sample_losses(model, nonmembers))
        assert got[node_id]["mia_auc"] == pytest.approx(expected, abs=1e-6), node_id
        assert got[node_id]["backdoor_asr"] == pytest.approx(attack_success_rate(model, test, 7), abs=1e-6)
        assert got[node_id]["retain_acc"] is not None
    assert len({round(got[i]["mia_auc"], 6) for i in held}) > 1  # each model's own figure
    plain = strategy.evaluate_held(grid, CLASS_REQUEST, held)  # nothing asked for: accuracy alone
    assert all(set(plain[i]) == {"forget_acc", "retain_acc"} for i in held)
    client_request = UnlearningRequest.for_clients([0], id="req-c", created=0.0)
    kept = [i for i in held if graph.node(i).client != 0]
    no_members = strategy.evaluate_held(grid, client_request, kept, checks.to_config())
    assert all("mia_auc" not in no_members[i] and "backdoor_asr" in no_members[i] for i in kept)  # no forget rows


def test_a_forgotten_client_trains_on_its_backdoored_partition_and_the_others_do_not():
    settings = {"request-kind": "client", "forget-clients": "1", "backdoor-fraction": 0.5, "backdoor-target": 7}
    clean, poisoned = app_partition(_context(1)), app_partition(_context(1, **settings))
    assert app_partition(_context(1, **settings)) is poisoned  # built once per process
    assert app_partition(_context(0, **settings)) is app_partition(_context(0))  # not forgotten: untouched
    images = np.asarray(poisoned["image"], dtype=np.uint8)
    triggered = (images[:, -3:, -3:] == 255).all(axis=(1, 2))
    labels, clean_labels = np.asarray(poisoned["label"]), np.asarray(clean["label"])
    assert triggered.sum() == round(0.5 * len(clean)) and (labels[triggered] == 7).all()
    assert (labels[~triggered] == clean_labels[~triggered]).all()
    assert (sample_ids(poisoned) == sample_ids(clean)).all()  # the same rows: lineage and requests still name them



def test_unlearning_a_backdoored_training_run_needs_its_poisoned_clients():
    from fl_unlearn.errors import ConfigError
    from strategies.config import AppConfig
    from strategies.experiment import _check_same_as_training

    settings = {"dataset": "digits", "request-kind": "client", "forget-clients": "0", "backdoor-fraction": 0.5}
    trained = AppConfig.from_run_config(settings)
    run_doc = {"config": trained.to_run_config(), "dataset_used": "digits"}
    _check_same_as_training(AppConfig.from_run_config({**settings, "mode": "unlearn"}), run_doc, "digits")
    for changed in ({"forget-clients": "1"}, {"backdoor-fraction": 0.25}, {"backdoor-target": 1}):
        with pytest.raises(ConfigError, match=next(iter(changed))):  # the clients would rebuild other data
            _check_same_as_training(AppConfig.from_run_config({**settings, **changed}), run_doc, "digits")

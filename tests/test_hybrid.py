"""The hybrid planner: workload estimate, decision, approximate path, OHS, P1 (fl_unlearn/hybrid.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_unlearn.data import DataConfig, load_federated, sample_ids
from fl_unlearn.errors import ConfigError, RequestError
from fl_unlearn.hybrid import (
    DEFAULT_BUDGET,
    ApproxConfig,
    HybridUnlearner,
    Throughput,
    exact_workload,
    fit_throughput,
    plan,
)
from fl_unlearn.requests import UnlearningRequest
from fl_unlearn.sisa import RoundRecord, SisaConfig, SisaFederation
from fl_unlearn.store import Store

CFG = SisaConfig(num_shards=2, num_slices=4, rounds_per_stage=1, batch_size=32, lr=0.05, seed=5)


@pytest.fixture(scope="module")
def digits():
    return load_federated(DataConfig(source="digits", num_partitions=3, partitioner="iid", seed=0))


def make_fed(data, tmp_path, name, cfg=CFG, **kw) -> SisaFederation:
    fed = SisaFederation(data, cfg, Store(tmp_path / name), **kw)
    fed.train()
    return fed


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """A trained federation for tests that only plan."""
    return make_fed(digits, tmp_path_factory.mktemp("hybrid"), "ro")


def ids_in(fed: SisaFederation, client: int, shard: int, slc: int, n: int = 1) -> list[int]:
    ids = sample_ids(fed.data.partition(client))
    shards, slices = fed.layout.assign(ids)
    return ids[(shards == shard) & (slices == slc)][:n].tolist()


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


# -- throughput and workload -------------------------------------------------------------------------


def test_fit_throughput_recovers_overhead_and_rate():
    records = [RoundRecord(0, 1, 0, 100, 5.0)]  # warm-up round, skipped
    records += [RoundRecord(0, r, 0, g, 0.2 + 0.001 * g) for r, g in enumerate((100, 200, 300, 400), 1)]
    fit = fit_throughput(records)
    assert fit.a == pytest.approx(0.2) and fit.b == pytest.approx(0.001) and fit.rounds == 4
    assert fit.samples_per_second == pytest.approx(1000) and fit.r2 == pytest.approx(1.0)


def test_fit_throughput_falls_back_to_a_ratio_when_rounds_are_alike():
    fit = fit_throughput([(100, 9.0), (100, 1.0), (100, 1.0)])
    assert (fit.a, fit.b) == (0.0, pytest.approx(0.01))
    with pytest.raises(ConfigError, match="train the federation first"):
        fit_throughput([(100, 1.0)])


@pytest.mark.parametrize("R, expected", [(3, [1, 5 / 6, 0.5]), (4, [1, 0.9, 0.7, 0.4])])
def test_workload_of_equal_slices_follows_f_R(R, expected):
    counts = np.full((3, R), 20)
    full = sum(exact_workload(counts, 1, [2] * R, 3))
    ratios = [sum(exact_workload(counts, j, [2] * R, 3)) / full for j in range(1, R + 1)]
    assert ratios == pytest.approx(expected)
    assert full == 2 * 3 * 3 * 20 * R * (R + 1) // 2


# -- the decision ------------------------------------------------------------------------------------


def test_default_budget_sends_the_last_slice_exact_and_the_first_approximate(trained):
    last = plan(trained, {0: ids_in(trained, 0, 0, 4)})
    first = plan(trained, {1: ids_in(trained, 1, 1, 1)})
    assert DEFAULT_BUDGET == 0.6
    assert (last.path, last.shards[0].start_stage) == ("exact", 4)
    assert (first.path, first.shards[0].start_stage) == ("approximate", 1)
    assert last.exact_evaluations <= last.budget < first.exact_evaluations
    assert "exact (under budget)" in last.reason and "approximate (over budget)" in first.reason


def test_policy_forces_a_path_and_bad_settings_are_refused(trained):
    revoked = {0: ids_in(trained, 0, 0, 4), 1: ids_in(trained, 1, 1, 1)}
    assert plan(trained, revoked).path == "mixed"
    assert plan(trained, revoked, policy="exact").path == "exact"
    assert plan(trained, revoked, policy="approximate").path == "approximate"
    assert plan(trained, revoked, budget_fraction=1.0).path == "exact"
    with pytest.raises(ConfigError, match="Unknown hybrid policy 'fast'"):
        plan(trained, revoked, policy="fast")
    with pytest.raises(ConfigError, match="budget_fraction must be a number >= 0"):
        plan(trained, revoked, budget_fraction=-0.1)
    with pytest.raises(RequestError, match="does not hold"):
        plan(trained, {0: [10**9]})


def test_client_level_requests_go_approximate_under_the_default_budget(trained):
    result = plan(trained, UnlearningRequest.for_clients([2]))
    assert result.path == "approximate" and {sp.r_star for sp in result.shards} == {1}


@pytest.mark.parametrize("slc", [1, 2, 3, 4])
def test_estimated_evaluations_equal_the_measured_ones(digits, tmp_path, slc):
    """The deterministic half of the +-30 % acceptance: counts are exact (seconds: benchmarks/hybrid.py)."""
    fed = make_fed(digits, tmp_path, f"a{slc}",
                   cfg=SisaConfig(num_shards=2, num_slices=4, rounds_per_stage=(1, 2, 1, 2), local_epochs=2, seed=5))
    revoked = {0: ids_in(fed, 0, 1, slc), 2: ids_in(fed, 2, 1, 4)}
    estimate = plan(fed, revoked, policy="exact", throughput=Throughput(0.0, 1e-4, 1.0, 1))
    report = fed.unlearn_exact(revoked)
    assert estimate.shards[0].start_stage == report.shards[1].start_stage == slc
    assert estimate.exact_evaluations == report.evaluations
    assert estimate.exact_seconds == pytest.approx(1e-4 * report.evaluations)


# -- execution ---------------------------------------------------------------------------------------


def test_approximate_path_changes_only_the_served_models_of_touched_shards(digits, tmp_path):
    fed = make_fed(digits, tmp_path, "a")
    checkpoints, served = [list(row) for row in fed.checkpoints], list(fed.served)
    hybrid = HybridUnlearner(fed, digits.test)
    report = hybrid.unlearn({1: ids_in(fed, 1, 1, 1, 2)})
    assert report.path == "approximate" and report.exact is None
    info = report.approximate[1]
    assert info["alpha"] in ApproxConfig().alphas and info["forget_samples"] == 2
    assert 0 < info["forget_target"] <= 1 and info["ohs_rounds"] == 0
    assert fed.checkpoints == checkpoints  # stage checkpoints are only marked, never edited
    assert fed.served[0] == served[0] and fed.served[1] != served[1]


def test_p1_a_later_exact_path_starts_where_an_approximate_one_left_stale_data(digits, tmp_path):
    fed = make_fed(digits, tmp_path, "a")
    hybrid = HybridUnlearner(fed, digits.test)
    early = {1: ids_in(fed, 1, 0, 2)}
    assert hybrid.unlearn(early, policy="approximate").path == "approximate"
    assert fed.ledgers[0].dirty_from == 2 and fed.ledgers[0].revoked == {1: {early[1][0]: "approximate"}}
    stale = [fed.graph.node(fed.nodes[0][r]).meta.get("stale", False) for r in range(5)]
    assert stale == [False, False, True, True, True]

    late = {0: ids_in(fed, 0, 0, 4)}
    planned = hybrid.plan(late)
    assert planned.shards[0].r_star == 4 and planned.shards[0].start_stage == 2  # min(r*, d_s)
    report = hybrid.unlearn(late, policy="exact")
    assert report.exact.shards[0].stages == [2, 3, 4] and fed.ledgers[0].dirty_from is None
    gold = make_fed(digits, tmp_path, "gold", exclude={**early, **late})
    for r in range(5):
        assert same(fed.checkpoint_weights(0, r), gold.checkpoint_weights(0, r)), f"stage {r}"
        assert same(fed.checkpoint_weights(1, r), gold.checkpoint_weights(1, r)), f"untouched stage {r}"


def test_ohs_runs_capped_calibration_rounds(digits, tmp_path):
    cfg = SisaConfig(num_shards=2, num_slices=4, rounds_per_stage=(1, 1, 1, 3), seed=5)
    fed = make_fed(digits, tmp_path, "a", cfg=cfg)
    hybrid = HybridUnlearner(fed, digits.test, approx=ApproxConfig(ohs=True, ohs_patience=5, ohs_stop="stall",
                                                                       ohs_fraction=0.5))
    rounds_before = len(fed.round_log)
    info = hybrid.unlearn({2: ids_in(fed, 2, 0, 1)}).approximate[0]
    assert info["ohs_rounds"] == 3 and len(info["ohs_val_loss"]) == 4  # capped at one stage (T_R = 3)
    assert info["ohs_evaluations"] > 0 and len(fed.round_log) == rounds_before  # not training rounds


def test_ohs_restore_stops_once_the_validation_loss_is_back(digits, tmp_path):
    fed = make_fed(digits, tmp_path, "a")
    hybrid = HybridUnlearner(fed, digits.test, approx=ApproxConfig(ohs=True, ohs_stop="restore", ohs_max_rounds=8))
    before = hybrid._val_loss(fed.shard_weights(0))  # the served model before FIUn: the level to restore
    info = hybrid.unlearn({0: ids_in(fed, 0, 0, 1, n=3)}).approximate[0]
    losses = info["ohs_val_loss"]
    assert all(loss > before for loss in losses[:-1])  # no round after the loss was back
    assert losses[-1] <= before or info["ohs_rounds"] == 8


def test_a_plan_made_before_a_change_is_refused(digits, tmp_path):
    fed = make_fed(digits, tmp_path, "a")
    hybrid = HybridUnlearner(fed, digits.test)
    stale = hybrid.plan({0: ids_in(fed, 0, 0, 4)})
    hybrid.unlearn({1: ids_in(fed, 1, 1, 4)})
    with pytest.raises(ConfigError, match="the plan is stale"):
        hybrid.execute(stale)


@pytest.mark.parametrize("metric", ["rank", "soft_accuracy", "accuracy"])
def test_every_forget_metric_calibrates_against_held_out_data(digits, tmp_path, metric):
    fed = make_fed(digits, tmp_path, "a")
    hybrid = HybridUnlearner(fed, digits.test, approx=ApproxConfig(forget_metric=metric))
    info = hybrid.unlearn({0: ids_in(fed, 0, 1, 1, 3)}).approximate[1]
    assert info["forget_target"] == 0.5 if metric == "rank" else 0 < info["forget_target"] <= 1
    assert 0.0 <= info["forget_score"] <= 1.0 and info["forget_samples"] == 3
    with pytest.raises(ConfigError, match="Unknown forget_metric 'loss'"):
        ApproxConfig(forget_metric="loss")

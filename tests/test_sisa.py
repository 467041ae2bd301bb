"""SISA layout, stage-wise federated training and the exact path (fl_unlearn/sisa.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_unlearn.data import DataConfig, load_federated, make_loader, sample_ids
from fl_unlearn.errors import ConfigError, RequestError, StoreError
from fl_unlearn.lineage import LineageGraph, sample_ids_reader
from fl_unlearn.requests import UnlearningRequest
from fl_unlearn.sisa import Ensemble, SisaConfig, SisaFederation, SisaLayout
from fl_unlearn.store import Store

CFG = SisaConfig(num_shards=2, num_slices=3, rounds_per_stage=1, batch_size=32, lr=0.05, seed=3)


@pytest.fixture(scope="module")
def digits():
    return load_federated(DataConfig(source="digits", num_partitions=3, partitioner="iid", seed=0))


def make_fed(data, tmp_path, name, cfg=CFG, **kw) -> SisaFederation:
    return SisaFederation(data, cfg, Store(tmp_path / name), **kw)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """A trained federation for read-only tests."""
    fed = make_fed(digits, tmp_path_factory.mktemp("sisa"), "ro")
    fed.train()
    return fed


def ids_in(fed: SisaFederation, client: int, shard: int, slc: int, n: int = 1) -> list[int]:
    ids = sample_ids(fed.data.partition(client))
    shards, slices = fed.layout.assign(ids)
    return ids[(shards == shard) & (slices == slc)][:n].tolist()


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- layout ------------------------------------------------------------------------------------------


def test_assignment_is_a_pinned_pure_function_of_the_id():
    # Pinned values: the layout must not change between runs, processes or releases (LAYOUT_HASH v1).
    shard, slc = SisaLayout(4, 4, seed=0).assign([0, 1, 2, 3, 4, 5, 1234567, 10000001])
    assert shard.tolist() == [1, 0, 1, 1, 2, 1, 0, 2]
    assert slc.tolist() == [4, 3, 4, 2, 2, 3, 2, 2]


def test_assignment_does_not_depend_on_order_or_other_ids():
    layout = SisaLayout(3, 5, seed=7)
    ids = np.arange(500)
    shard, slc = layout.assign(ids)
    perm = np.random.default_rng(0).permutation(500)[:200]
    shard_p, slc_p = layout.assign(ids[perm])
    assert (shard_p == shard[perm]).all() and (slc_p == slc[perm]).all()
    other = SisaLayout(3, 5, seed=8).assign(ids)[0]
    assert (other != shard).any()


def test_assignment_is_balanced_enough():
    counts = SisaLayout(4, 4, seed=0).counts(np.arange(16_000))
    assert counts.min() > 0.85 * 1_000 and counts.max() < 1.15 * 1_000
    assert np.abs(counts.sum(axis=1) - 4_000).max() < 0.05 * 4_000


def test_client_stage_data_is_shard_and_slices_up_to_stage_minus_excluded(digits):
    layout, ds = SisaLayout(2, 3, seed=1), digits.partition(0)
    ids = sample_ids(ds)
    shard, slc = layout.assign(ids)
    drop = ids[(shard == 1) & (slc == 2)][:3]
    view = layout.client_stage_data(ds, 1, 2, exclude=drop)
    expect = ids[(shard == 1) & (slc <= 2) & ~np.isin(ids, drop)]
    assert sample_ids(view).tolist() == expect.tolist()
    assert len(layout.client_stage_data(ds, 1, 0)) == 0  # stage 0 = the initial weights, no data
    with pytest.raises(ConfigError, match="stage 4 out of range"):
        layout.client_stage_data(ds, 1, 4)


def test_layout_rejects_bad_sizes():
    with pytest.raises(ConfigError, match="num_slices must be an int >= 1"):
        SisaLayout(2, 0)
    with pytest.raises(ConfigError, match="rounds_per_stage"):
        SisaConfig(num_slices=3, rounds_per_stage=(1, 2))


def test_more_slices_than_a_shard_holds_is_a_config_error(digits, tmp_path):
    store = Store(tmp_path / "s")
    with pytest.raises(ConfigError, match=r"num_slices=400 is larger than some shards.*client 0 shard 0"):
        SisaFederation(digits, SisaConfig(num_shards=2, num_slices=400), store)
    assert not any((tmp_path / "s" / "objects").iterdir())  # nothing written


# -- training ----------------------------------------------------------------------------------------


def test_training_checkpoints_every_stage_and_records_lineage(trained):
    fed, R = trained, CFG.num_slices
    assert fed.trained and len(fed.round_log) == CFG.num_shards * R
    for s in range(CFG.num_shards):
        nodes = [fed.graph.node(fed.nodes[s][r]) for r in range(R + 1)]
        assert [(n.kind, n.shard, n.round) for n in nodes] == [("global", s, r) for r in range(R + 1)]
        assert [n.data.slice_ids for n in nodes[1:]] == [tuple(range(1, r + 1)) for r in range(1, R + 1)]
        assert all(n.weights == fed.checkpoints[s][r] for r, n in enumerate(nodes))
    # a sample's roots are the local nodes of its own shard, from its slice's stage on
    (i,) = ids_in(fed, 1, 0, 2)
    roots = fed.graph.roots(UnlearningRequest.for_samples({1: [i]}), sample_ids_of=sample_ids_reader(fed.store))
    assert roots == [f"sisa/s0/v0/stage{r}/client1" for r in (2, 3)]


def test_ensemble_is_the_mean_softmax(trained):
    x, _ = next(iter(make_loader(trained.data.test, 16)))
    probs = torch.stack([torch.softmax(trained.model(s)(x), 1) for s in range(2)]).mean(0)
    with torch.no_grad():
        assert torch.allclose(trained.ensemble()(x).exp(), probs, atol=1e-6)
    assert 0.0 <= trained.evaluate(trained.data.test)["acc"] <= 1.0
    with pytest.raises(ConfigError):
        Ensemble([])


def test_restore_reopens_the_federation(digits, tmp_path):
    graph = LineageGraph(tmp_path / "lineage")
    fed = make_fed(digits, tmp_path, "store", graph=graph)
    fed.train()
    fed.unlearn_exact({0: ids_in(fed, 0, 1, 3)})
    again = SisaFederation.restore(digits, CFG, Store(tmp_path / "store"), LineageGraph.load(tmp_path / "lineage"))
    assert again.state() == fed.state()
    with pytest.raises(StoreError, match="no SISA state"):
        SisaFederation.restore(digits, CFG, Store(tmp_path / "empty"), LineageGraph())


# -- the exact path ----------------------------------------------------------------------------------


def test_exact_path_equals_training_from_scratch_without_the_samples(digits, tmp_path):
    """Acceptance (issue 5): S=2, R=3, revoke in slice 2 of one shard; touched shard == scratch, other unchanged."""
    fed = make_fed(digits, tmp_path, "a")
    fed.train()
    before = [[fed.checkpoint_weights(1, r) for r in range(4)], fed.served[1]]
    revoked = {0: ids_in(fed, 0, 0, 2, 2), 2: ids_in(fed, 2, 0, 3, 1)}
    report = fed.unlearn_exact(revoked)
    gold = make_fed(digits, tmp_path, "gold", exclude=revoked)
    gold.train()
    assert report.shards.keys() == {0} and report.shards[0].stages == [2, 3]
    for r in range(4):
        assert same(fed.checkpoint_weights(0, r), gold.checkpoint_weights(0, r)), f"shard 0 stage {r}"
        assert same(fed.checkpoint_weights(1, r), before[0][r]), f"shard 1 stage {r} changed"
        assert same(fed.checkpoint_weights(1, r), gold.checkpoint_weights(1, r))
    assert fed.served[1] == before[1]
    assert same(fed.shard_weights(0), gold.shard_weights(0))


def test_revoking_in_slice_one_changes_every_checkpoint(digits, tmp_path):
    """P2: each rerun stage chains from the rerun's previous stage, never from a stored original."""
    fed = make_fed(digits, tmp_path, "a")
    fed.train()
    old = list(fed.checkpoints[0])
    report = fed.unlearn_exact({1: ids_in(fed, 1, 0, 1)})
    assert report.shards[0].start_stage == 1
    assert fed.checkpoints[0][0] == old[0]  # the initial weights are clean
    assert all(fed.checkpoints[0][r] != old[r] for r in (1, 2, 3))
    new_nodes = [fed.graph.node(fed.nodes[0][r]) for r in (1, 2, 3)]
    assert [n.id for n in new_nodes] == [f"sisa/s0/v1/stage{r}" for r in (1, 2, 3)]
    assert fed.graph.parents(f"sisa/s0/v1/stage1/client1") == [fed.nodes[0][0]]


def test_exact_report_counts_the_sample_gradients_of_the_rerun(digits, tmp_path):
    fed = make_fed(digits, tmp_path, "a", cfg=SisaConfig(num_shards=2, num_slices=3, rounds_per_stage=(1, 2, 1),
                                                        local_epochs=2, seed=3))
    fed.train()
    revoked = {2: ids_in(fed, 2, 1, 2)}
    counts = fed.kept_counts(extra={2: revoked[2]})[:, 1, :]  # [K, R] after the removal
    expect = sum(t * 2 * counts[:, :r].sum() for r, t in zip((2, 3), (2, 1)))
    report = fed.unlearn_exact(revoked)
    assert report.evaluations == report.shards[1].evaluations == expect
    assert report.shards[1].rounds == 3 and report.seconds > 0


def test_bad_revocations_raise_and_change_nothing(trained):
    state, nodes = trained.state(), len(trained.graph)
    held = ids_in(trained, 0, 0, 1)
    cases = [
        ({0: [10**9]}, r"Client 0 does not hold samples \[1000000000\]"),
        ({7: [1]}, "Unknown client 7"),
        ({0: []}, "Empty forget set for client 0"),
        ({}, "Empty forget set"),
        ({0: [1.5]}, "must be integers"),
    ]
    for revoked, message in cases:
        with pytest.raises(RequestError, match=message):
            trained.unlearn_exact(revoked)
    with pytest.raises(RequestError, match="class request"):
        trained.unlearn_exact(UnlearningRequest.for_classes([3]))
    assert trained.state() == state and len(trained.graph) == nodes
    assert held  # the valid ids stayed unrevoked
    assert not trained.ledgers[0].revoked


def test_already_revoked_samples_are_refused(digits, tmp_path):
    fed = make_fed(digits, tmp_path, "a")
    fed.train()
    ids = ids_in(fed, 0, 1, 3)
    fed.unlearn_exact({0: ids})
    state = fed.state()
    with pytest.raises(RequestError, match=r"already revoked \(id, path\): \[\(\d+, 'exact'\)\]"):
        fed.unlearn_exact({0: ids})
    assert fed.state() == state


def test_client_request_revokes_everything_the_client_holds(trained):
    revoked = trained.as_revocation(UnlearningRequest.for_clients([1]))
    assert revoked.keys() == {1} and len(revoked[1]) == len(trained.data.partition(1))
    assert trained.first_slice(trained.locate(revoked)[0]) == 1

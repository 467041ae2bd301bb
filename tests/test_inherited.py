"""The worked example at reduced size: inherited networks on real MNIST, unlearned in one call."""

from __future__ import annotations

import pytest

from fl_unlearn.data import DataConfig, load_federated
from fl_unlearn.errors import ConfigError
from fl_unlearn.fiun import FIUnConfig
from fl_unlearn.inherited import (
    InheritedNetwork,
    NodeSpec,
    TrainSettings,
    chain_network,
    multi_root_network,
    run_experiment,
)
from fl_unlearn.requests import UnlearningRequest
from fl_unlearn.store import Store


def _run(tmp_path, specs, forget, max_train):
    # 2,000 held-out rows (200 a class): evaluating 12 models on all 10,000 took 40 % of each test
    data = load_federated(DataConfig(source="mnist", num_partitions=len(specs), partitioner="iid", seed=1,
                                     max_train=max_train, max_test=2000))
    net = InheritedNetwork(specs, data, TrainSettings(model="cnn", epochs=1, seed=0), Store(tmp_path))
    report = run_experiment(net, UnlearningRequest.for_classes(forget), FIUnConfig(), alpha="auto",
                            estimator="per_sample")
    return net, report


def test_chain_forgets_on_every_affected_model_and_keeps_the_rest(tmp_path):
    net, report = _run(tmp_path, chain_network(3, [3]), [3], 30_000)
    assert report["roots"] == ["root"]
    models = report["affected_models"]
    assert [m["id"] for m in models] == ["root", "gen1", "gen2", "gen3"]
    # The inherited class is really there before unlearning, on the root and at least one descendant.
    assert models[0]["before"]["forget_acc"] > 0.5 and models[1]["before"]["forget_acc"] > 0.2
    for m in models:
        assert m["after"]["forget_acc"] <= 0.05, m
        assert m["after"]["retain_acc"] >= m["before"]["retain_acc"] - 0.05, m
    # Unlearning changes only affected models' copies: the trained weights stay as stored.
    assert net.store.get(net.graph.node("root").weights).keys() == net.weights["root"].keys()
    assert report["timing"]["unlearn_s"] < report["timing"]["retrain_s"]


def test_multi_root_merges_both_roots_and_forgets_both_classes(tmp_path):
    net, report = _run(tmp_path, multi_root_network(3, 7), [3, 7], 30_000)
    assert sorted(report["roots"]) == ["rootA", "rootB"]
    assert [m["id"] for m in report["affected_models"]] == ["rootA", "rootB", "merged", "merged-gen2"]
    for m in report["affected_models"]:
        assert m["after"]["forget_acc"] <= 0.05, m


def test_invalid_networks_are_refused(tmp_path):
    data = load_federated(DataConfig(source="digits", num_partitions=2, partitioner="iid", seed=1))
    with pytest.raises(ConfigError, match="parents"):
        InheritedNetwork([NodeSpec("a", ("b",), 0)], data, TrainSettings(), Store(tmp_path))
    with pytest.raises(ConfigError, match="partition 5"):
        InheritedNetwork([NodeSpec("a", (), 5)], data, TrainSettings(), Store(tmp_path))
    with pytest.raises(ConfigError, match="depth"):
        chain_network(0, [3])

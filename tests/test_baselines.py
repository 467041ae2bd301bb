"""fl_unlearn.baselines: fine-tuning, bounded gradient ascent, SISA's exact path as a baseline."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fl_unlearn.baselines import (
    AscentConfig,
    FinetuneConfig,
    finetune,
    gradient_ascent,
    sisa_exact,
)
from fl_unlearn.data import DataConfig, load_federated, sample_ids
from fl_unlearn.errors import ConfigError
from fl_unlearn.sisa import SisaConfig, SisaFederation
from strategies.calibration import ClientCalibration
from fl_unlearn.store import Store
from fl_unlearn.train import train_local

FORGET = 2


def blobs(classes: list[int], n: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable 3-class Gaussian blobs in 4-D: class c sits at 1.5 * e_c."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes).repeat_interleave(n)
    x = torch.randn(len(y), 4, generator=g) * 0.5
    x[torch.arange(len(y)), y] += 1.5
    return x, y


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 20) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def acc(model: nn.Module, weights: dict, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((torch.func.functional_call(model, weights, (x,)).argmax(1) == y).float().mean())


def prob_of(model: nn.Module, weights: dict, x: torch.Tensor, cls: int) -> float:
    with torch.no_grad():
        return float(torch.func.functional_call(model, weights, (x,)).softmax(1)[:, cls].mean())


def loss(model: nn.Module, weights: dict, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.functional.cross_entropy(torch.func.functional_call(model, weights, (x,)), y))


@pytest.fixture(scope="module")
def network() -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    """Two trained linear models on all three classes (a tiny 'affected network')."""
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = nn.Linear(4, 3)
        train_local(model, batches(*blobs([0, 1, 2], seed=seed)), epochs=2, lr=0.02)
        out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return nn.Linear(4, 3), out


def test_finetune_on_kept_data_fades_the_forgotten_class_and_changes_no_input(network) -> None:
    template, weights = network
    originals = [{k: v.clone() for k, v in w.items()} for w in weights]
    template_before = {k: v.clone() for k, v in template.state_dict().items()}
    kept = [batches(*blobs([0, 1], seed=10 + i)) for i in range(2)]
    xf, yf = blobs([FORGET], seed=5)
    assert all(acc(template, w, xf, yf) > 0.8 for w in weights)
    result = finetune(template, weights, kept, FinetuneConfig(epochs=20, lr=0.1))
    assert result.steps == [20 * len(kept[0])] * 2 and result.stop_reasons == ["budget"] * 2
    # the forgotten class fades (its probability on its own samples falls) while kept classes stay right
    for before, after in zip(weights, result.weights):
        assert prob_of(template, after, xf, FORGET) < prob_of(template, before, xf, FORGET)
    assert all(acc(template, w, *blobs([0, 1], seed=7)) > 0.9 for w in result.weights)
    for w, o in zip(weights, originals):
        assert all(torch.equal(w[k], o[k]) for k in o)
    assert all(torch.equal(template.state_dict()[k], v) for k, v in template_before.items())


def test_finetune_step_cap_spans_epochs_and_empty_data_leaves_the_model(network) -> None:
    template, weights = network
    kept = [batches(*blobs([0, 1])), []]
    result = finetune(template, weights, kept, FinetuneConfig(epochs=5, max_steps=7))
    assert result.steps == [7, 0] and result.stop_reasons == ["budget", "no_data"]
    assert all(torch.equal(result.weights[1][k], weights[1][k]) for k in weights[1])
    assert result.seconds > 0


def test_gradient_ascent_stops_at_the_loss_ceiling_before_diverging(network) -> None:
    template, weights = network
    xf, yf = blobs([FORGET], n=40, seed=5)
    cfg = AscentConfig(lr=0.5, max_steps=500, loss_ceiling=3.0, max_grad_norm=1.0)
    result = gradient_ascent(template, weights, [[(xf, yf)]] * 2, cfg)
    assert result.stop_reasons == ["loss_ceiling"] * 2
    for w, new, steps in zip(weights, result.weights, result.steps):
        assert 0 < steps < cfg.max_steps
        after = loss(template, new, xf, yf)
        # it reached the ceiling, and stopped within one bounded step of it: no runaway
        assert cfg.loss_ceiling <= after < cfg.loss_ceiling + 5.0
        assert acc(template, new, xf, yf) == 0.0
        moved = math.sqrt(sum(float(((new[k] - w[k]) ** 2).sum()) for k in w))
        assert moved <= steps * cfg.lr * cfg.max_grad_norm + 1e-5  # every step clipped


def test_gradient_ascent_step_budget_and_no_data(network) -> None:
    template, weights = network
    xf, yf = blobs([FORGET], seed=5)
    result = gradient_ascent(template, weights, [batches(xf, yf), []], AscentConfig(lr=0.1, max_steps=4))
    assert result.steps == [4, 0] and result.stop_reasons == ["budget", "no_data"]
    assert loss(template, result.weights[0], xf, yf) > loss(template, weights[0], xf, yf)
    assert all(torch.equal(result.weights[1][k], weights[1][k]) for k in weights[1])


@pytest.mark.parametrize(
    "make",
    [
        lambda: FinetuneConfig(epochs=0),
        lambda: FinetuneConfig(lr=0.0),
        lambda: FinetuneConfig(max_steps=0),
        lambda: AscentConfig(lr=-1.0),
        lambda: AscentConfig(loss_ceiling=float("inf")),
        lambda: AscentConfig(max_steps=0),
        lambda: AscentConfig(max_grad_norm=0.0),
    ],
)
def test_bad_configs_are_refused(make) -> None:
    with pytest.raises(ConfigError, match="Invalid"):
        make()


def test_a_batch_source_per_model_is_required(network) -> None:
    template, weights = network
    with pytest.raises(ConfigError, match="1 retain_batches for 2 models"):
        finetune(template, weights, [[]])
    with pytest.raises(ConfigError, match="no models"):
        gradient_ascent(template, [], [])


def test_sisa_exact_baseline_equals_the_federation_trained_without_the_samples(tmp_path) -> None:
    data = load_federated(DataConfig(source="digits", num_partitions=2, seed=0, max_train=300))
    cfg = SisaConfig(num_shards=2, num_slices=2, batch_size=32)
    fed = SisaFederation(data, cfg, Store(tmp_path / "a"))
    fed.train()
    revoked = {0: sample_ids(data.partition(0))[:3].tolist()}
    result = sisa_exact(fed, revoked)
    gold = SisaFederation(data, cfg, Store(tmp_path / "gold"), exclude=revoked)
    gold.train()
    touched = sorted(int(s) for s in result.details["report"]["shards"])
    assert touched and result.stop_reasons == ["exact" if s in touched else "untouched" for s in range(2)]
    assert all((result.steps[s] > 0) == (s in touched) for s in range(2))
    for s in range(2):
        expected = gold.shard_weights(s)
        assert all(torch.equal(result.weights[s][k], expected[k]) for k in expected)
    assert np.isfinite(result.seconds)


# ---- the benchmark's core (benchmarks/baselines.py) at a tiny size ------------------------------------


def _load_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "baselines.py"
    spec = importlib.util.spec_from_file_location("benchmark_baselines", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_benchmark_table_has_every_method_and_consistent_figures() -> None:
    from fl_unlearn.calibrate import check_sequence

    bench = _load_benchmark()
    setup = bench.Setup(source="digits", max_train=400, rounds=1, fisher_samples=64, calibration_forget=16,
                        calibration_retain=16, check_samples=8, finetune_steps=2, ascent_steps=2, eval_size=100,
                        mia_size=30, scaling=(2, 4), repeats=1)
    result = bench.run(setup)
    # rounds=1, 4 clients: g0, 4 locals, g1, 4 derived. The class is in every client's data: every local and
    # derived model is a root, g1 is affected. Client 0 leaves with its local and derived model.
    assert result["models"] == 10
    assert (result["class"]["roots"], result["class"]["affected"]) == (8, 9)
    assert (result["client"]["roots"], result["client"]["affected"]) == (2, 4)
    for request, methods, keys in (("class", bench.CLASS_METHODS, ("forget_acc", "retain_acc")),
                                   ("client", bench.CLIENT_METHODS, ("acc", "asr"))):
        rows = {r["method"]: r for r in result[request]["rows"]}
        assert list(rows) == ["original", *methods]
        assert rows["retrain"]["ratio_to_retrain"] == 1.0 and rows["original"]["seconds"] is None
        for row in rows.values():
            assert all(0.0 <= row[part][k] <= 1.0 for part in ("final", "worst") for k in keys)
            assert 0.0 <= row["mia_auc"] <= 1.0
        for method in methods:
            assert rows[method]["seconds"] > 0
            assert rows[method]["ratio_to_retrain"] == pytest.approx(rows[method]["seconds"] / rows["retrain"]["seconds"])
    # alpha=auto as the App runs it: one lambda, and no model dampened milder than the newest global's choice
    fiun = {r["method"]: r for r in result["class"]["rows"]}["fiun"]["extra"]
    newest = max(a for a in fiun["alphas"] if a.startswith("g"))
    chosen = (fiun["alphas"][newest], fiun["lam"][list(fiun["alphas"]).index(newest)])
    assert fiun["forget_target"] == ClientCalibration().forget_tolerance and all(v in (0.0, 1.0) for v in fiun["lam"])
    for (alpha, lam) in zip(fiun["alphas"].values(), fiun["lam"]):  # as strong as the choice, or stronger
        assert (alpha, lam) in check_sequence(*chosen)
    # fiun+repair: the same dampening, then a repair of every affected model the App's rule picks (timed within
    # the row); a model it leaves alone is fiun's model
    for request in ("class", "client"):
        rows = {r["method"]: r for r in result[request]["rows"]}
        repaired = rows["fiun+repair"]["extra"]
        assert not set(repaired["repair_rounds"]) & set(repaired["not_repaired"])
        assert set(repaired["repair_rounds"]) | set(repaired["not_repaired"]) == set(rows["fiun"]["extra"]["alphas"])
        assert repaired["repair_s"] > 0 and all(0 <= r <= 16 for r in repaired["repair_rounds"].values())
        for name in repaired["not_repaired"]:
            assert rows["fiun+repair"]["worst"]["per_model"][name] == rows["fiun"]["worst"]["per_model"][name]
    # fiun+head: the head repair on exactly the models the check took past the clients' choice (the newest global's
    # candidate) or gave their own forget-Fisher; every other model is fiun's
    rows = {r["method"]: r for r in result["class"]["rows"]}
    head = rows["fiun+head"]["extra"]
    assert tuple(fiun["choice"]) == chosen
    moved = {n for (n, alpha), lam in zip(fiun["alphas"].items(), fiun["lam"]) if (alpha, lam) != chosen}
    assert set(head["head_rounds"]) == moved | set(fiun["own_fisher"]) and head["head_s"] >= 0
    for name in set(fiun["alphas"]) - set(head["head_rounds"]):
        assert rows["fiun+head"]["worst"]["per_model"][name] == rows["fiun"]["worst"]["per_model"][name]
    # a model retrained without the class never predicts it
    assert {r["method"]: r for r in result["class"]["rows"]}["retrain"]["final"]["forget_acc"] == 0.0
    scaling = result["scaling"]["rows"]
    assert [r["n"] for r in scaling] == [2, 4] and scaling[1]["elements"] == 2 * scaling[0]["elements"]
    assert all(r["vectorised_s"] > 0 and r["per_model_s"] > 0 for r in scaling)


def test_benchmark_fiun_auto_forgets_the_calibration_samples_it_chose_on() -> None:
    """The newest global, dampened as the benchmark returns it, predicts at most the target's share of the forget
    samples its holders scored (the choice met the target on them)."""
    from fl_unlearn.calibrate import count_correct

    bench = _load_benchmark()
    # 5 local epochs: with 1 this tiny federation never predicted the class, and the test said nothing
    setup = bench.Setup(source="digits", max_train=400, rounds=1, local_epochs=5, fisher_samples=64,
                        calibration_forget=16, calibration_retain=16, check_samples=8)
    net = bench.Network(setup)
    weights, _ = net.train()
    forget = bench.class_request(net, setup.forget_class)
    ctx = bench.make_context(net, weights, forget)
    new, _, details = bench.run_fiun(ctx, "auto")
    newest = [n for n in ctx.targets if n.startswith("g")][-1]
    assert details["target_met"][newest]
    model = net.new_model()
    before, kept, scored = 0, 0, 0
    for k in range(setup.clients):
        if len(forget.forgotten[k]):
            x, y = bench._head(forget.forgotten[k], setup.calibration_forget, setup.seed + k)
            before += count_correct(model, weights[newest], (x, y))
            kept, scored = kept + count_correct(model, new[newest], (x, y)), scored + len(y)
    assert before > details["forget_target"] * scored  # there was something to forget
    assert kept <= details["forget_target"] * scored


def test_benchmark_repair_rule_per_model() -> None:
    """``fiun+repair`` repairs a model as the App's ``repair=auto`` does the served one: a model that still predicts
    some of its holders' forget rows is repaired (class requests, guard on); an unchanged model lost no kept
    accuracy and, without the guard, is not; one that lost kept accuracy is."""
    bench = _load_benchmark()
    setup = bench.Setup(source="digits", max_train=400, rounds=1, local_epochs=5)
    net = bench.Network(setup)
    weights, _ = net.train()
    g1 = net.final_global()
    forget = bench.class_request(net, setup.forget_class)
    kept = [bench._head(forget.kept[k], 64, k) for k in range(setup.clients)]
    forgotten = [bench._head(forget.forgotten[k], 64, k) for k in range(setup.clients)]
    cfg = bench.RepairConfig(forget_weight=1.0)
    assert bench.repair_wanted(net, weights[g1], weights[g1], kept, forgotten, cfg, "classes")  # knows the class
    unguarded = replace(cfg, forget_weight=0.0)
    assert not bench.repair_wanted(net, weights[g1], weights[g1], kept, [None] * len(kept), unguarded, "client")
    damaged = {k: torch.zeros_like(v) for k, v in weights[g1].items()}  # predicts one class: kept accuracy falls
    assert bench.repair_wanted(net, weights[g1], damaged, kept, [None] * len(kept), unguarded, "client")


def test_benchmark_model_oracle_bounds_fiun_model_by_model() -> None:
    """--model-oracle: per affected model, the best held-out kept accuracy of the grid's candidates that forget to
    the bar. ``fiun`` dampens each model at one of those candidates with the newest global's forget-Fisher (or its
    own), so wherever its model reaches the bar the oracle with that Fisher keeps at least as much."""
    bench = _load_benchmark()
    setup = bench.Setup(source="digits", max_train=400, rounds=1, fisher_samples=64, calibration_forget=16,
                        calibration_retain=16, check_samples=8, eval_size=100, mia_size=30, model_oracle=True,
                        oracle_forget=0.5)
    net = bench.Network(setup)
    weights, _ = net.train()
    result = bench.run_request(net, weights, bench.class_request(net, setup.forget_class), ["fiun", "retrain"])
    oracle = result["model_oracle"]
    fiun = {r["method"]: r for r in result["rows"]}["fiun"]
    assert len(oracle) == result["affected"] == len(fiun["worst"]["per_model"])
    grid = set(bench.candidate_grid(bench.grid_alphas(setup.alphas_per_octave), setup.lams))
    compared = 0
    for name, bound in oracle.items():
        assert set(bound) == {"newest", "own"}
        for b in filter(None, bound.values()):
            assert b["forget_acc"] <= setup.oracle_forget and (b["alpha"], b["lam"]) in grid
        mine = fiun["worst"]["per_model"][name]
        tag = "own" if name in fiun["extra"]["own_fisher"] else "newest"
        if mine["forget_acc"] <= setup.oracle_forget:
            assert bound[tag] is not None and bound[tag]["retain_acc"] >= mine["retain_acc"]
            compared += 1
    assert compared > 0


# ---- benchmarks/robustness.py at a tiny size: the oracle bound and the class-wise retain-Fisher -------------


def _load_robustness():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "robustness.py"
    spec = importlib.util.spec_from_file_location("benchmark_robustness", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("retain_fisher", ["whole", "classwise"])
def test_robustness_oracle_bounds_auto(retain_fisher: str) -> None:
    """The oracle row is the best held-out kept accuracy among the grid's candidates that forget down to the bar,
    so wherever ``auto`` (one of those candidates) reaches the bar, the oracle keeps at least as much."""
    bench = _load_robustness()
    setup = bench.Setup(source="digits", max_train=400, rounds=1, fisher_samples=64, calibration_forget=16,
                        calibration_retain=16, retain_fisher=retain_fisher, oracle_forget=0.5)
    fed = bench.Federation(setup)
    weights, _ = fed.train()
    rows = {r.method: r for r in bench.unlearn_class(fed, weights, 1, ["auto", "oracle"])}
    oracle, auto = rows["oracle"], rows["auto"]
    assert oracle.extra["target_met"] and oracle.extra["candidates_forgetting"] >= 1
    assert oracle.forget_acc <= setup.oracle_forget
    if auto.forget_acc <= setup.oracle_forget:
        assert oracle.retain_acc >= auto.retain_acc
    assert (oracle.extra["alpha"], oracle.extra["lam"]) in setup.grid()
    assert bench.Setup().grid() == bench.candidate_grid()  # the App's grid by default


def test_robustness_classwise_retain_fisher_is_the_other_classes_mean() -> None:
    from fl_unlearn.data import samples_of_classes
    from fl_unlearn.fisher import select_parameters

    bench = _load_robustness()
    setup = bench.Setup(source="digits", max_train=300, rounds=1, fisher_samples=32, retain_fisher="classwise")
    fed = bench.Federation(setup)
    weights, _ = fed.train()
    params = select_parameters(fed.new_model(), setup.fisher_layers)
    per_class = fed.class_fishers(weights, params)
    assert fed.class_fishers(weights, params) is per_class  # computed once per model
    assert sorted(per_class) == list(range(fed.data.num_classes))
    for c, (fisher, used) in per_class.items():
        held = [len(samples_of_classes(p, [c])) for p in fed.parts]
        assert used == sum(min(n, setup.fisher_samples) for n in held)
        assert all(torch.isfinite(t).all() and (t >= 0).all() for t in fisher.values())
    kept = bench.classwise_retain(per_class, 3)
    others = [k for k in per_class if k != 3]
    total = sum(per_class[k][1] for k in others)
    for name in kept:
        expected = sum(per_class[k][1] * per_class[k][0][name].double() for k in others) / total
        torch.testing.assert_close(kept[name].double(), expected, rtol=1e-5, atol=0.0)


def test_robustness_across_seeds_reports_the_worst_seed_and_class(tmp_path: Path) -> None:
    """``--seeds``: one federation per seed; each method's worst case is over every (seed, class), the kept gap
    against the retrained federation of the same seed."""
    bench = _load_robustness()
    Row = bench.Row
    rows = [(1, Row(0, "retrain", 0.0, 0.90, 1.0)), (1, Row(0, "auto", 0.01, 0.89, 0.1)),
            (1, Row(1, "retrain", 0.0, 0.95, 1.0)), (1, Row(1, "auto", 0.00, 0.80, 0.1)),
            (2, Row(0, "retrain", 0.0, 0.70, 1.0)), (2, Row(0, "auto", 0.04, 0.75, 0.1))]
    across = {a["method"]: a for a in bench.summarise_seeds(rows)}
    auto = across["auto"]
    assert (auto["worst_forget_acc"], auto["worst_forget_seed"], auto["worst_forget_class"]) == (0.04, 2, 0)
    assert auto["worst_kept_gap_pts"] == pytest.approx(15.0)
    assert (auto["worst_kept_gap_seed"], auto["worst_kept_gap_class"]) == (1, 1)
    # the command itself, at a tiny size: two federations, one class, a JSON with both and the worst over them
    out = tmp_path / "r.json"
    assert bench.main(["--source", "digits", "--max-train", "300", "--rounds", "1", "--classes", "2",
                       "--methods", "auto,retrain", "--seeds", "3,4", "--fisher-samples", "32",
                       "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert sorted(doc["seeds"]) == ["3", "4"] and {a["method"] for a in doc["across"]} == {"auto", "retrain"}
    assert all(doc["seeds"][s]["setup"]["seed"] == int(s) for s in doc["seeds"])
    with pytest.raises(SystemExit):
        bench.main(["--seeds", "3,4", "--plot", str(tmp_path / "p.png")])

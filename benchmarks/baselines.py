"""FIUn against the baselines on one trained federation, and FIUn's time as the affected network grows.

One network is trained once, in process (the same ``train_local`` the Flower clients use): FedAvg over
``--clients`` IID clients for ``--rounds`` rounds (a ``local`` model per client and round, a ``global`` model per
round), then every client derives a personalised model from the final global model (``derived``). Client
``--poisoned-client`` trains on data of which ``--poison-fraction`` carries a trigger patch and the label
``--backdoor-target``. Every model is recorded in a ``LineageGraph``; a request's affected models are the
graph's roots and their descendants, and every method changes all of them (the comparison is about the whole
network, not one model). Each method works on its own copy of the trained weights.

Requests and methods:

- **class request** (forget ``--forget-class``): ``fiun`` (``alpha="auto"``, the project default), ``fiun a=1``
  (the paper), ``finetune`` and ``gradient_ascent`` (``fl_unlearn.baselines``), and ``retrain`` (the gold standard:
  the network trained again from the same seeds without the data). ``fiun+repair``: ``fiun``, then the App's
  repair (``fl_unlearn.calibrate.repair``, ``repair-*`` defaults) on every affected model the App's ``repair=auto``
  rule picks (``repair_wanted``), each on the kept data of the clients it trained on, with the forget guard on
  their forget rows for a class request; its time includes the repair and the checks. (The App repairs the served
  global model and the client-held ones; this, any affected model.)
  ``fiun+head``: ``fiun``, then the repair with ``part="head"`` (the head alone, on features computed once; the
  forget guard on) on every model the per-model check took past the clients' choice; its time includes it.
- **client request** (forget the poisoned client): ``fiun`` (``alpha="auto"``; forget target, as in the Flower
  layer: the newest global model's accuracy on kept calibration samples before unlearning), ``fiun a=1``,
  ``fiun a=10`` (SSD's threshold), ``finetune``, ``gradient_ascent``, ``retrain``, with the backdoor's attack
  success rate (ASR). The client's own models (its local updates, its derived model) leave with it and are
  not scored.

FIUn follows the Flower layer's protocol: every client holding data to forget computes its forget-Fisher on the
newest affected global model; each affected model gets the sample-weighted MFIM merge over the holders whose
data reached it; each affected model's retain-Fisher is taken at its own weights on the data it keeps (the cache
a federation keeps; its time is reported apart as ``cache s``, not in FIUn's time). For a class request the
holders' forget-Fishers are in that cache too: the App's clients prepare one per class on the final global model
right after training (``retain-fisher=prepared``); a client request computes its forget-Fishers in FIUn's time.
Fishers cover every layer, the App's estimator (``--fisher-estimator``; ``expected`` since 2026-12-06, ``batch``
before), at most ``--fisher-samples`` samples per forget-Fisher and
``--retain-fisher-samples`` per retain-Fisher (the App's defaults). ``alpha="auto"``
calibrates on training-side samples only (forget: the holders' samples; kept: the model's own data); the
test split is only used to report.

Figures: held-out accuracy on the forgotten class and on the kept classes of the final global model (full test
split) and the worst over all affected models (a seeded ``--eval-size`` subset of the test split);
loss-threshold membership-inference AUC of the final global model, members = forgotten training samples,
non-members = held-out samples (of the same class for a class request); wall time and its ratio to
``retrain``'s, measured in the same run.

The scaling run times FIUn's dampening step on N = 4..64 affected models (variants of the trained affected
models: their weights with a little seeded noise), one vectorised ``unlearn_many`` call against ``dampen``
applied model by model (best of ``--repeats``); the forget-Fisher passes, done once per holder whatever N is,
are reported beside it.

Run from the repository root::

    .venv/bin/python benchmarks/baselines.py --out /tmp/baselines.json      # MNIST (~8 min on 2 shared cores)
    .venv/bin/python benchmarks/baselines.py --quick                        # digits smoke run (~1 min)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_unlearn.baselines import AscentConfig, FinetuneConfig, finetune, gradient_ascent  # noqa: E402
from strategies.calibration import ClientCalibration, check_plan  # noqa: E402
from strategies.config import DEFAULTS  # noqa: E402
from strategies.repair import RepairSettings, rule_figures  # noqa: E402
from fl_unlearn.calibrate import (  # noqa: E402
    DEFAULT_LAMS,
    REPAIR_STOPS,
    RepairConfig,
    candidate_grid,
    check_models,
    check_sequence,
    choose_candidate,
    dampening_change,
    count_correct_split,
    first_within,
    grid_alphas,
    per_model_candidate,
    repair,
    scale_free,
    score_alpha_grid,
    strongest_usable,
    unlearn_with_candidates,
)
from fl_unlearn.data import (  # noqa: E402
    DataConfig,
    class_histogram,
    load_federated,
    make_loader,
    samples_of_classes,
    without_classes,
    without_samples,
)
from fl_unlearn.evaluate import (  # noqa: E402
    attack_success_rate,
    forget_retain_accuracy,
    loss_threshold_mia_auc,
    poison_dataset,
)
from fl_unlearn.fisher import ESTIMATORS, compute_fisher, select_parameters  # noqa: E402
from fl_unlearn.fiun import FIUnConfig, dampen, unlearn_many  # noqa: E402
from fl_unlearn.lineage import LineageGraph, TrainingData  # noqa: E402
from fl_unlearn.mfim import merge_fishers  # noqa: E402
from fl_unlearn.models import build_model  # noqa: E402
from fl_unlearn.requests import UnlearningRequest  # noqa: E402
from fl_unlearn.sisa import fedavg  # noqa: E402
from fl_unlearn.train import seed_everything, train_local  # noqa: E402

logger = logging.getLogger("baselines")
Weights = dict[str, Tensor]

#: The parameters every Fisher covers (and FIUn dampens): the App's default (``fisher-layers``).
FISHER_LAYERS = str(DEFAULTS["fisher-layers"])

CLASS_METHODS = ("fiun", "fiun+repair", "fiun+head", "fiun a=1", "finetune", "gradient_ascent", "retrain")
CLIENT_METHODS = ("fiun", "fiun+repair", "fiun a=1", "fiun a=10", "finetune", "gradient_ascent", "retrain")


@dataclass(frozen=True)
class Setup:
    """The federation, the requests and every method's budget."""

    source: str = "mnist"
    max_train: int | None = None  # all 60,000 MNIST images (20,000 before 2026-12-04: a 13.7 s retrain)
    clients: int = 4
    rounds: int = 3
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    derived_lr: float = 0.005
    seed: int = 0
    forget_class: int = 3
    poisoned_client: int = 0
    poison_fraction: float = 0.5
    backdoor_target: int = 7
    # the App's fisher-samples, retain-fisher-samples and fisher-estimator
    fisher_samples: int = int(DEFAULTS["fisher-samples"])
    retain_fisher_samples: int = int(DEFAULTS["retain-fisher-samples"])
    fisher_estimator: str = str(DEFAULTS["fisher-estimator"])
    calibration_forget: int = 64
    calibration_retain: int = 32
    check_samples: int = 32
    # alpha=auto's grid: alphas 0.5..512, this many per factor of 2, times these lambdas (the App's defaults)
    alphas_per_octave: int = 2
    lams: tuple[float, ...] = DEFAULT_LAMS
    repair_stop: str = str(DEFAULTS["repair-stop"])  # fiun+repair: the App's repair-stop
    head_rows: int = 256  # fiun+head: kept rows per client
    head_forget_rows: int = 64  # fiun+head: forget rows per client, for the guard
    finetune_steps: int = 50
    finetune_lr: float = 0.05
    ascent_steps: int = 30
    ascent_lr: float = 0.1
    loss_ceiling: float = 5.0
    eval_size: int = 1000
    mia_size: int = 500
    scaling: tuple[int, ...] = (4, 8, 16, 32, 64)
    repeats: int = 3
    # --model-oracle: per affected model of the class request, the best held-out kept accuracy of any grid
    # candidate that forgets the class down to ``oracle_forget`` held out (issue 6's bar)
    model_oracle: bool = False
    oracle_forget: float = 0.05


@dataclass
class Forget:
    """One request as data: per client, what it keeps and what it forgets."""

    name: str
    request: UnlearningRequest
    kept: list[Dataset]
    forgotten: list[Dataset]


@dataclass
class Row:
    """One method on one request."""

    method: str
    seconds: float | None
    ratio_to_retrain: float | None = None
    final: dict[str, float] = field(default_factory=dict)
    worst: dict[str, float] = field(default_factory=dict)
    mia_auc: float | None = None
    extra: dict = field(default_factory=dict)


# ---- the federation ------------------------------------------------------------------------------------


class Network:
    """FedAvg rounds plus derived models, in process, with a lineage graph."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.data = load_federated(DataConfig(source=setup.source, num_partitions=setup.clients, seed=setup.seed,
                                              max_train=setup.max_train))
        self.parts = [self.data.partition(k) for k in range(setup.clients)]
        self.parts[setup.poisoned_client], self.poisoned_ids = poison_dataset(
            self.parts[setup.poisoned_client], setup.poison_fraction, setup.backdoor_target, seed=setup.seed)
        self.graph = LineageGraph()
        self.client_of: dict[str, int | None] = {}
        self.parents: dict[str, list[str]] = {}

    def new_model(self) -> nn.Module:
        channels, size = self.data.image_shape[0], self.data.image_shape[-1]
        return build_model("cnn", self.data.num_classes, in_channels=channels, image_size=size)

    def model_with(self, weights: Mapping[str, Tensor]) -> nn.Module:
        model = self.new_model()
        model.load_state_dict(weights)
        return model.eval()

    def final_global(self) -> str:
        return f"g{self.setup.rounds}"

    def train(self, forget: Forget | None = None) -> tuple[dict[str, Weights], float]:
        """Train the whole network (without ``forget``'s data when given: the retrain); same seeds either way."""
        s, record = self.setup, forget is None
        data = forget.kept if forget else self.parts
        start = time.perf_counter()
        seed_everything(s.seed)
        weights = {"g0": _detached(self.new_model())}
        self._record("g0", "global", [], None, None, record, round=0)
        for t in range(1, s.rounds + 1):
            replies = []
            for k, ds in enumerate(data):
                if len(ds) == 0:
                    continue  # a client that leaves trains nothing
                name = f"r{t}/c{k}"
                weights[name] = self._local(weights[f"g{t - 1}"], ds, s.lr, (t, k))
                replies.append((len(ds), name))
                self._record(name, "local", [f"g{t - 1}"], k, ds, record, round=t)
            weights[f"g{t}"] = fedavg([(n, weights[name]) for n, name in replies])
            self._record(f"g{t}", "global", [name for _, name in replies], None, None, record, round=t)
        for k, ds in enumerate(data):
            if len(ds):
                weights[f"ft{k}"] = self._local(weights[self.final_global()], ds, s.derived_lr, (s.rounds + 1, k))
                self._record(f"ft{k}", "derived", [self.final_global()], k, ds, record)
        return weights, time.perf_counter() - start

    def _local(self, start: Weights, ds: Dataset, lr: float, key: tuple[int, int]) -> Weights:
        seed = self.setup.seed + 1000 * key[0] + key[1]
        seed_everything(seed)
        model = self.model_with(start)
        train_local(model, make_loader(ds, self.setup.batch_size, shuffle=True, seed=seed),
                    epochs=self.setup.local_epochs, lr=lr)
        return _detached(model)

    def _record(self, name: str, kind: str, parents: list[str], client: int | None, ds: Dataset | None,
                record: bool, round: int | None = None) -> None:  # noqa: A002
        if not record:
            return
        data = TrainingData(client, class_histogram(ds)) if ds is not None else None
        owner = "server" if client is None else f"client:{client}"
        self.graph.add_node(name, kind, parents=parents, round=round, owner=owner, data=data)
        self.client_of[name], self.parents[name] = client, parents

    # -- per model, for a request --------------------------------------------------------------------

    def clients_behind(self, name: str) -> list[int]:
        """Clients whose data a model trained on directly (a global: the clients of its round)."""
        client = self.client_of[name]
        return [client] if client is not None else sorted({self.client_of[p] for p in self.parents[name]})

    def kept_of(self, name: str, forget: Forget) -> Dataset:
        return _union([forget.kept[k] for k in self.clients_behind(name)])

    def holders_of(self, name: str, roots: Sequence[str]) -> tuple[int, ...]:
        """Clients holding forgotten data whose roots are ``name`` or its ancestors."""
        lineage = set(self.graph.ancestors(name)) | {name}
        return tuple(sorted({self.client_of[r] for r in roots if r in lineage}))

    def forgotten_of(self, holders: Sequence[int], forget: Forget) -> Dataset:
        return _union([forget.forgotten[k] for k in holders])


def class_request(net: Network, forget_class: int) -> Forget:
    return Forget("class", UnlearningRequest.for_classes([forget_class]),
                  [without_classes(p, [forget_class]) for p in net.parts],
                  [samples_of_classes(p, [forget_class]) for p in net.parts])


def client_request(net: Network, client: int) -> Forget:
    empty = net.parts[client].select([])
    return Forget("client", UnlearningRequest.for_clients([client]),
                  [empty if k == client else p for k, p in enumerate(net.parts)],
                  [p if k == client else empty for k, p in enumerate(net.parts)])


# ---- methods -------------------------------------------------------------------------------------------


@dataclass
class Context:
    """A request on the trained network: its targets (affected models that stay) and their data."""

    net: Network
    forget: Forget
    weights: dict[str, Weights]
    targets: list[str]
    holders: dict[str, tuple[int, ...]]


def make_context(net: Network, weights: dict[str, Weights], forget: Forget) -> Context:
    roots = net.graph.roots(forget.request)
    affected = net.graph.affected(forget.request)
    leaving = set(forget.request.clients) if forget.request.kind == "client" else set()
    targets = [n for n in affected if net.client_of[n] not in leaving]
    return Context(net, forget, weights, targets, {n: net.holders_of(n, roots) for n in targets})


def run_fiun(ctx: Context, alpha: float | str) -> tuple[dict[str, Weights], float, dict]:
    """FIUn on every target at once; returns (weights, seconds without the retain-Fisher cache, details)."""
    net = ctx.net
    model = net.new_model()
    params = select_parameters(model, FISHER_LAYERS)
    s = net.setup
    t0 = time.perf_counter()
    retain = [_fisher(net, ctx.weights[n], net.kept_of(n, ctx.forget), params, s.retain_fisher_samples)
              for n in ctx.targets]
    newest = [n for n in ctx.targets if n.startswith("g")][-1]
    holders = sorted({k for hs in ctx.holders.values() for k in hs})

    def forget_fishers() -> dict:
        return {k: _fisher(net, ctx.weights[newest], ctx.forget.forgotten[k], params, s.fisher_samples)
                for k in holders}

    prepared = ctx.forget.request.kind == "classes"  # the App's clients prepared these after training
    if prepared:
        per_holder = forget_fishers()
    t1 = time.perf_counter()
    if not prepared:
        per_holder = forget_fishers()
    t2 = time.perf_counter()
    merged_by: dict[tuple[int, ...], Weights] = {}
    for hs in set(ctx.holders.values()):
        merged_by[hs] = _merged([per_holder[k] for k in hs])
    forgets = [merged_by[ctx.holders[n]] for n in ctx.targets]
    models = [ctx.weights[n] for n in ctx.targets]
    target, lam, own_fisher, choice = None, None, [], None
    if alpha == "auto":
        forgets = list(forgets)
        candidates, met, target, own_fisher, choice = _auto_alpha(ctx, model, retain, forgets, newest)
        # the candidates were scored on mean-normalised Fishers (as the App's train.unlearn / server step dampen)
        new, _ = unlearn_with_candidates(models, [scale_free(r) for r in retain], [scale_free(f) for f in forgets],
                                         FIUnConfig(), candidates)
        alphas, lam = [a for a, _ in candidates], [v for _, v in candidates]
    else:
        new, _ = unlearn_many(models, retain, forgets, FIUnConfig(alpha=float(alpha)))
        alphas, met = [float(alpha)] * len(models), []
    t3 = time.perf_counter()
    details = {"cache_s": t1 - t0, "forget_fisher_s": t2 - t1, "merge_dampen_s": t3 - t2,
               "alphas": dict(zip(ctx.targets, alphas)),
               "lam": lam, "own_fisher": own_fisher, "choice": choice, "forget_target": target, "target_met": dict(zip(ctx.targets, met)) if met else None}
    return dict(zip(ctx.targets, new)), t3 - t1, details


def _fisher(net: Network, weights: Weights, ds: Dataset, params: list[str], cap: int):
    loader = make_loader(ds, net.setup.batch_size, shuffle=True, seed=net.setup.seed)  # capped: sample every client
    return compute_fisher(net.model_with(weights), loader, params, estimator=net.setup.fisher_estimator,
                          max_samples=cap or None)


def _auto_alpha(ctx: Context, model: nn.Module, retain: list, forgets: list,
                newest: str) -> tuple[list[tuple[float, float]], list[bool], float, list[str], tuple[float, float]]:
    """``alpha="auto"`` as the Flower App runs it, each client in turn (``strategies.calibration``).

    Every client scores the (alpha, lambda) grid on the newest global model with its own samples (64 of the data
    it forgets, 32 it keeps; ``score_alpha_grid``; for a class each lambda's alphas strongest first, up to the
    first that keeps more than the federation's budget); the summed counts choose one candidate (target: the
    calibration's forget tolerance for a class, the kept-sample accuracy before unlearning for a client). For a class,
    once the choice is known, the holders check the other models from it towards stronger candidates
    (``check_models``, the App's ``query.checkforget``): a global model at every holder on 32 of its forget samples,
    a local update at one holder that did not train it on as many as all check a global model on (the App's
    ``check_plan``), a derived model at its own client on 32 (the App's ``train.unlearn``), and each model gets the
    mildest candidate at which the holders keep at most the choice's tolerance of them in all (``per_model_candidate``,
    3 of 128; none of them until 2026-12-06); a model no candidate brings within it gets its own forget-Fisher
    (``forgets`` is updated in place) and is checked again (``check_models``). Returns per target its
    ``(alpha, lambda)`` and whether it met the target, the target, the models given their own forget-Fisher, and
    the clients' choice.
    """
    net, s = ctx.net, ctx.net.setup
    i_new = ctx.targets.index(newest)
    settings = ClientCalibration(forget_samples=s.calibration_forget, alphas=grid_alphas(s.alphas_per_octave),
                                 lams=tuple(s.lams), check_samples=s.check_samples)
    grid = candidate_grid(settings.alphas, settings.lams)
    is_class = ctx.forget.request.kind == "classes"
    others = [i for i in range(len(ctx.targets)) if i != i_new]
    total, before_kept, forget_sets, single_sets = None, 0, {}, {}
    holders = sum(1 for k in range(s.clients) if len(ctx.forget.forgotten[k]))
    budget = settings.keep_budget(holders) if is_class else 0
    for k in range(s.clients):
        forgotten, kept = ctx.forget.forgotten[k], ctx.forget.kept[k]
        fset = _head(forgotten, s.calibration_forget, s.seed + k) if len(forgotten) else None
        rset = _head(kept, s.calibration_retain, s.seed + k) if len(kept) else None
        counts = score_alpha_grid(model, ctx.weights[newest], retain[i_new], forgets[i_new], fset, rset,
                                  candidates=grid, stop_when_kept=is_class, keep_budget=budget)
        total = counts if total is None else total + counts
        before_kept += count_correct_split(model, ctx.weights[newest], None, rset)[1]
        if fset is not None:
            forget_sets[k] = (fset[0][:s.check_samples], fset[1][:s.check_samples])
            single_sets[k] = _head(forgotten, settings.single_check_rows(holders), s.seed + k)
    target = settings.forget_tolerance if is_class else before_kept / max(total.retain_num, 1)
    alpha, lam, met = choose_candidate(total, target, kept_margin=settings.kept_margin(total.retain_num),
                                       change=dampening_change(ctx.weights[newest], retain[i_new], forgets[i_new]))
    candidates, mets = [(alpha, lam)] * len(ctx.targets), [met] * len(ctx.targets)
    own: list[int] = []
    if is_class and met:
        sequence = check_sequence(alpha, lam, settings.alphas, settings.lams)
        check_budget = settings.check_budget(len(forget_sets))

        def check_at_holders(indices: list[int]) -> None:  # the App's query.checkforget, from the choice on
            # each model with its own retain-Fisher (the App shares one; the check is the same). A local update is
            # checked at one holder that did not train it, on as many samples as all holders check a global model on
            # (strategies.calibration.check_plan); a derived model at its own client, as the App's train.unlearn
            # does (check_samples rows, one holder's budget); every other model at every holder
            def check(group: list[int], fset: tuple, budget: int) -> list[list[int]]:
                return check_models(model, [ctx.weights[ctx.targets[i]] for i in group], [retain[i] for i in group],
                                    [forgets[i] for i in group], fset, sequence, budget=budget)

            names = [ctx.targets[i] for i in indices]
            kind = {n: ctx.net.graph.node(n).kind for n in names}
            plan = check_plan(names, {n: ctx.net.client_of[n] for n in names if kind[n] == "local"}, list(forget_sets),
                              settings)
            derived = {i: ctx.net.client_of[n] for i, n in zip(indices, names) if kind[n] == "derived"}
            reports: dict[int, list[list[int]]] = {i: [] for i in indices}  # per model: a row per holder checking it
            budgets = {i: settings.check_budget(1) if i in derived else check_budget for i in indices}
            for k, fset in forget_sets.items():
                groups: dict[tuple[int, int], list[int]] = {}  # (rows, budget) -> models
                for j, rows in plan[k]:
                    if indices[j] not in derived:
                        groups.setdefault((rows, check_budget), []).append(indices[j])
                for i, owner in derived.items():
                    if owner == k:
                        groups.setdefault((s.check_samples, budgets[i]), []).append(i)
                for (rows, budget), group in groups.items():
                    sample = single_sets[k] if rows > s.check_samples else fset
                    for i, row in zip(group, check(group, (sample[0][:rows], sample[1][:rows]), budget)):
                        reports[i].append(row)
            for i in indices:
                counts, check_budget_i = reports[i], budgets[i]
                # a model none brings within the budget: the strongest candidate that zeroes no more than half of any
                # weight tensor of it, as the App's server gives it (strategies.calibration._set_per_model)
                fallback = strongest_usable(sequence, ctx.weights[ctx.targets[i]], retain[i], forgets[i]) \
                    if first_within(counts, check_budget_i) < 0 else -1
                candidates[i], mets[i] = per_model_candidate(sequence, counts, fallback, budget=check_budget_i)

        check_at_holders(others)
        # models no candidate forgets with the newest global's forget-Fisher: their holders' Fishers on the model
        # itself, merged, and checked again (strategies.server._own_forget_fishers, query.checkforget)
        # (on as many rows per holder as the App takes: UnlearningStrategy._own_fisher_samples, the calibration's
        # forget samples, at most fisher_samples; until 2026-12-06 this took fisher_samples, 512, at 1.2-1.6 s)
        own = [i for i, ok in enumerate(mets) if not ok]
        params = select_parameters(model, FISHER_LAYERS)
        own_rows = min(s.calibration_forget, s.fisher_samples) if s.fisher_samples else s.calibration_forget
        for i in own:
            name = ctx.targets[i]
            parts = [_fisher(net, ctx.weights[name], ctx.forget.forgotten[k], params, own_rows)
                     for k in ctx.holders[name]]
            forgets[i] = _merged(parts)
        if own:
            check_at_holders(own)
    return candidates, mets, target, [ctx.targets[i] for i in own], (alpha, lam)


def run_finetune(ctx: Context) -> tuple[dict[str, Weights], float, dict]:
    net, s = ctx.net, ctx.net.setup
    loaders = [make_loader(net.kept_of(n, ctx.forget), s.batch_size, shuffle=True, seed=s.seed) for n in ctx.targets]
    cfg = FinetuneConfig(epochs=1, lr=s.finetune_lr, max_steps=s.finetune_steps)
    result = finetune(net.new_model(), [ctx.weights[n] for n in ctx.targets], loaders, cfg)
    return dict(zip(ctx.targets, result.weights)), result.seconds, {"steps": sum(result.steps)}


def run_ascent(ctx: Context) -> tuple[dict[str, Weights], float, dict]:
    net, s = ctx.net, ctx.net.setup
    loaders = [make_loader(net.forgotten_of(ctx.holders[n], ctx.forget), s.batch_size, shuffle=True, seed=s.seed)
               for n in ctx.targets]
    cfg = AscentConfig(lr=s.ascent_lr, max_steps=s.ascent_steps, loss_ceiling=s.loss_ceiling)
    result = gradient_ascent(net.new_model(), [ctx.weights[n] for n in ctx.targets], loaders, cfg)
    stops = {r: result.stop_reasons.count(r) for r in sorted(set(result.stop_reasons))}
    return dict(zip(ctx.targets, result.weights)), result.seconds, {"steps": sum(result.steps), "stops": stops}


#: The App's repair defaults (``repair-rounds``, ``repair-steps``, ``repair-lr``, ``repair-samples``,
#: ``repair-forget-weight``)
REPAIR_ROUNDS, REPAIR_STEPS = int(DEFAULTS["repair-rounds"]), int(DEFAULTS["repair-steps"])
REPAIR_LR, REPAIR_SAMPLES = float(DEFAULTS["repair-lr"]), int(DEFAULTS["repair-samples"])
REPAIR_FORGET_WEIGHT = float(DEFAULTS["repair-forget-weight"])


def run_fiun_repair(ctx: Context) -> tuple[dict[str, Weights], float, dict]:
    """``fiun``, then the App's repair wherever the App's ``repair=auto`` rule asks for it, model by model
    (:func:`repair_wanted`): FedAvg rounds over the clients a model trained on (one for a local or derived model),
    each on up to 1,024 of its kept rows and, for a class request, the forget guard on its forget rows; the seconds
    include the repair and the checks that decide it (``repair_s`` apart in the details)."""
    new, seconds, info = run_fiun(ctx, "auto")
    net, s, forget = ctx.net, ctx.net.setup, ctx.forget
    guard = forget.request.kind == "classes"
    cfg = RepairConfig(max_rounds=REPAIR_ROUNDS, local_steps=REPAIR_STEPS, lr=REPAIR_LR, batch_size=s.batch_size,
                       seed=s.seed, forget_weight=REPAIR_FORGET_WEIGHT if guard else 0.0, stop=s.repair_stop)
    t0, rounds, skipped = time.perf_counter(), {}, []
    # each client's repair rows, drawn once: a client's data serves every model it trained
    kept_of = {k: _head(forget.kept[k], REPAIR_SAMPLES, s.seed + 200 + k)
               for k in range(s.clients) if len(forget.kept[k]) > 1}
    guard_of = {k: _head(forget.forgotten[k], REPAIR_SAMPLES, s.seed + 300 + k) if guard else None
                for k in kept_of if len(forget.forgotten[k]) > 1}
    for n in ctx.targets:
        clients = [k for k in net.clients_behind(n) if k in kept_of]
        kept = [kept_of[k] for k in clients]
        guarded = [guard_of.get(k) for k in clients]
        if not repair_wanted(net, ctx.weights[n], new[n], kept, guarded, cfg, forget.request.kind):
            skipped.append(n)
            continue
        new[n], rep = repair(net.new_model(), new[n], kept, cfg=cfg, forget_sets=guarded, original=ctx.weights[n])
        rounds[n] = rep["repair_rounds"]
    repair_s = time.perf_counter() - t0
    return new, seconds + repair_s, {**info, "repair_s": repair_s, "repair_rounds": rounds, "not_repaired": skipped}


def run_fiun_head(ctx: Context) -> tuple[dict[str, Weights], float, dict]:
    """``fiun``, then the App's repair with ``part="head"`` (:class:`~fl_unlearn.calibrate.RepairConfig`: the head
    alone, on features computed once) on every model the per-model check took past the clients' choice (a stronger
    candidate, or its own forget-Fisher), over the clients it trained on, each on ``head_rows`` of its kept rows and,
    for a class request, the forget guard on ``head_forget_rows`` of its forget rows. The models the check left at
    the choice were dampened no further than the calibration scored on kept samples; the others were not scored so.
    The seconds include drawing the rows."""
    new, seconds, info = run_fiun(ctx, "auto")
    net, s, forget = ctx.net, ctx.net.setup, ctx.forget
    guard = forget.request.kind == "classes"
    cfg = RepairConfig(max_rounds=REPAIR_ROUNDS, local_steps=REPAIR_STEPS, lr=REPAIR_LR, batch_size=s.batch_size,
                       seed=s.seed, forget_weight=REPAIR_FORGET_WEIGHT if guard else 0.0, part="head")
    moved = [n for n, lam in zip(ctx.targets, info["lam"])
             if (info["alphas"][n], lam) != info["choice"] or n in info["own_fisher"]]
    t0 = time.perf_counter()
    clients = sorted({k for n in moved for k in net.clients_behind(n) if len(forget.kept[k])})
    kept_of = {k: _head(forget.kept[k], s.head_rows, s.seed + 200 + k) for k in clients}
    guard_of = {k: _head(forget.forgotten[k], s.head_forget_rows, s.seed + 300 + k)
                for k in clients if guard and len(forget.forgotten[k])}
    rounds = {}
    for n in moved:
        behind = [k for k in net.clients_behind(n) if k in kept_of]
        new[n], rep = repair(net.new_model(), new[n], [kept_of[k] for k in behind], cfg=cfg,
                             forget_sets=[guard_of.get(k) for k in behind])
        rounds[n] = rep["repair_rounds"]
    head_s = time.perf_counter() - t0
    return new, seconds + head_s, {**info, "head_s": head_s, "head_rounds": rounds}


def repair_wanted(net: Network, original: Weights, unlearned: Weights, kept: Sequence[tuple[Tensor, Tensor]],
                  forgotten: Sequence[tuple[Tensor, Tensor] | None], cfg: RepairConfig, request_kind: str) -> bool:
    """The App's ``repair=auto`` rule (``strategies.repair.RepairSettings.wanted``) for one model, scored on the rows
    its repair would hold back for validation (a quarter of each client's ``kept`` and ``forgotten`` rows): repair
    when kept accuracy there fell by more than the rule's tolerance (1 point), or, for a class with the guard on,
    when any of those forget rows is still predicted. (The App scores its served model on the calibration's 32 kept
    rows per client; per model that is too few: ``g1`` of the MNIST network fell from 104 to 103 of 128 there, from
    846 to 819 of 1,024 rows, and 8 points held out.)"""
    figures = rule_figures(net.new_model(), original, unlearned, kept, forgotten, cfg.validation_fraction)
    return RepairSettings(mode="auto", steps=cfg).wanted(figures, request_kind)


def run_retrain(ctx: Context) -> tuple[dict[str, Weights], float, dict]:
    weights, seconds = ctx.net.train(ctx.forget)
    return {n: weights[n] for n in ctx.targets}, seconds, {"models_retrained": len(weights) - 1}


def method_runner(method: str) -> Callable[[Context], tuple[dict[str, Weights], float, dict]]:
    if method == "fiun+repair":
        return run_fiun_repair
    if method == "fiun+head":
        return run_fiun_head
    if method.startswith("fiun"):
        alpha: float | str = "auto" if method == "fiun" else float(method.split("=")[1])
        return lambda ctx: run_fiun(ctx, alpha)
    return {"finetune": run_finetune, "gradient_ascent": run_ascent, "retrain": run_retrain}[method]


# ---- evaluation ----------------------------------------------------------------------------------------


@dataclass
class Probes:
    """Held-out and membership data, fixed for the whole run."""

    test: Dataset
    subset: Dataset
    members: Dataset
    nonmembers: Dataset


def make_probes(net: Network, forget: Forget) -> Probes:
    s, test = net.setup, net.data.test
    rng = np.random.default_rng(s.seed)
    subset = test.select(np.sort(rng.permutation(len(test))[: s.eval_size]))
    if forget.request.kind == "classes":
        members = net.forgotten_of(range(s.clients), forget)
        nonmembers = samples_of_classes(test, forget.request.classes)
    else:  # the client's clean samples (the triggered ones are a different distribution) vs held-out samples
        client = forget.request.clients[0]
        members, nonmembers = without_samples(forget.forgotten[client], net.poisoned_ids), test
    return Probes(test, subset, _sample(members, s.mia_size, s.seed), _sample(nonmembers, s.mia_size, s.seed + 1))


def evaluate(ctx: Context, weights: dict[str, Weights], probes: Probes) -> tuple[dict, dict, float]:
    """(final global model's figures, worst over the targets, MIA AUC of the final global model)."""
    net, s = ctx.net, ctx.net.setup
    final_model = net.model_with(weights[net.final_global()])
    mia = loss_threshold_mia_auc(final_model, probes.members, probes.nonmembers)
    if ctx.forget.request.kind == "classes":
        forget_classes = list(ctx.forget.request.classes)
        final = forget_retain_accuracy(final_model, probes.test, forget_classes)
        each = {n: forget_retain_accuracy(net.model_with(weights[n]), probes.subset, forget_classes)
                for n in ctx.targets}
        worst = {"forget_acc": max(e["forget_acc"] for e in each.values()),
                 "retain_acc": min(e["retain_acc"] for e in each.values()), "per_model": each}
        return {k: final[k] for k in ("forget_acc", "retain_acc")}, worst, mia
    target = s.backdoor_target
    final = {"acc": forget_retain_accuracy(final_model, probes.test, [])["acc"],
             "asr": attack_success_rate(final_model, probes.test, target)}
    each = {}
    for n in ctx.targets:
        model = net.model_with(weights[n])
        each[n] = {"acc": forget_retain_accuracy(model, probes.subset, [])["acc"],
                   "asr": attack_success_rate(model, probes.subset, target)}
    worst = {"acc": min(e["acc"] for e in each.values()), "asr": max(e["asr"] for e in each.values()),
             "per_model": each}
    return final, worst, mia


def run_request(net: Network, weights: dict[str, Weights], forget: Forget, methods: Sequence[str]) -> dict:
    """Every method on copies of the trained network; the table's rows, retrain measured in the same run."""
    ctx = make_context(net, weights, forget)
    probes = make_probes(net, forget)
    rows = []
    final, worst, mia = evaluate(ctx, weights, probes)
    rows.append(Row("original", None, final=final, worst=worst, mia_auc=mia))
    for method in methods:
        copy = replace(ctx, weights={n: {k: v.clone() for k, v in w.items()} for n, w in weights.items()})
        new, seconds, extra = method_runner(method)(copy)
        final, worst, mia = evaluate(ctx, {**weights, **new}, probes)
        rows.append(Row(method, seconds, final=final, worst=worst, mia_auc=mia, extra=extra))
        logger.warning("%s request: %s done in %.1f s", forget.name, method, seconds)
    retrain_s = next(r.seconds for r in rows if r.method == "retrain")
    for r in rows:
        r.ratio_to_retrain = r.seconds / retrain_s if r.seconds is not None and retrain_s else None
    out = {"request": forget.request.describe(), "roots": len(net.graph.roots(forget.request)),
           "affected": len(ctx.targets), "rows": [asdict(r) for r in rows]}
    if net.setup.model_oracle and forget.request.kind == "classes":
        out["model_oracle"] = model_oracle(ctx, probes)
    return out


# ---- what any (alpha, lambda) could do, model by model ------------------------------------------------


def model_oracle(ctx: Context, probes: Probes) -> dict[str, dict[str, dict | None]]:
    """Per affected model, a bound on FIUn's dampening for a class request: of ``alpha="auto"``'s grid, the
    candidate with the best held-out kept accuracy (the ``--eval-size`` subset) among those that forget the class
    to <= ``oracle_forget`` held out, once with the forget-Fisher ``fiun`` dampens it with (its holders' on the
    newest affected global model, merged) and once with the model's own (its holders' on its own weights).

    It reads the test split, so no federation could run it: where it misses the bar, no choice of ``(alpha,
    lambda)`` on the grid would meet it with that Fisher. ``None`` where no candidate forgets down to the bar.
    """
    net, s = ctx.net, ctx.net.setup
    params = select_parameters(net.new_model(), FISHER_LAYERS)
    grid = list(candidate_grid(grid_alphas(s.alphas_per_octave), tuple(s.lams)))
    classes = list(ctx.forget.request.classes)
    newest = [n for n in ctx.targets if n.startswith("g")][-1]
    holders = sorted({k for hs in ctx.holders.values() for k in hs})
    on_newest = {k: _fisher(net, ctx.weights[newest], ctx.forget.forgotten[k], params, s.fisher_samples)
                 for k in holders}
    bounds: dict[str, dict[str, dict | None]] = {}
    for name in ctx.targets:
        hs = ctx.holders[name]
        retain = scale_free(_fisher(net, ctx.weights[name], net.kept_of(name, ctx.forget), params,
                                    s.retain_fisher_samples))
        fishers = {"newest": _merged([on_newest[k] for k in hs]),
                   "own": _merged([_fisher(net, ctx.weights[name], ctx.forget.forgotten[k], params, s.fisher_samples)
                                   for k in hs])}
        bounds[name] = {tag: _best_candidate(net, ctx.weights[name], retain, scale_free(forget), grid, probes,
                                             classes, s.oracle_forget)
                        for tag, forget in fishers.items()}
        logger.warning("model oracle: %s %s", name, {t: b and round(b["retain_acc"], 3) for t, b in bounds[name].items()})
    return bounds


def _merged(parts: Sequence) -> Weights:
    """MFIM's sample-weighted mean of per-holder Fishers (as the App's server merges them)."""
    return merge_fishers([dict(p) for p in parts], mode="weighted_mean", num_samples=[p.info.num_samples for p in parts])


def _best_candidate(net: Network, weights: Weights, retain: Weights, forget: Weights,
                    grid: list[tuple[float, float]], probes: Probes, classes: list[int], bar: float) -> dict | None:
    """The grid candidate keeping most of the kept classes held out among those forgetting to <= ``bar``."""
    dampened, _ = unlearn_with_candidates([weights] * len(grid), [retain] * len(grid), [forget] * len(grid),
                                          FIUnConfig(), grid)
    best = None
    for (alpha, lam), new in zip(grid, dampened):
        acc = forget_retain_accuracy(net.model_with(new), probes.subset, classes)
        if acc["forget_acc"] <= bar and (best is None or acc["retain_acc"] > best["retain_acc"]):
            best = {"alpha": alpha, "lam": lam, "forget_acc": acc["forget_acc"], "retain_acc": acc["retain_acc"]}
    return best


# ---- scaling -------------------------------------------------------------------------------------------


def scaling_run(net: Network, weights: dict[str, Weights], forget: Forget) -> dict:
    """Dampening time for N variants of the affected models: one vectorised step vs model by model."""
    s = net.setup
    ctx = make_context(net, weights, forget)
    params = select_parameters(net.new_model(), FISHER_LAYERS)
    t0 = time.perf_counter()
    newest = [n for n in ctx.targets if n.startswith("g")][-1]
    per_holder = [_fisher(net, weights[newest], forget.forgotten[k], params, s.fisher_samples)
                  for k in range(s.clients) if len(forget.forgotten[k])]
    merged = _merged(per_holder)
    forget_fisher_s = time.perf_counter() - t0
    base = ctx.targets[: min(4, len(ctx.targets))]
    retain = [_fisher(net, weights[n], net.kept_of(n, forget), params, s.retain_fisher_samples) for n in base]
    gen = torch.Generator().manual_seed(s.seed)
    per_model = sum(weights[base[0]][p].numel() for p in params)
    cfg, rows = FIUnConfig(alpha=1.0), []
    for n in s.scaling:
        models = [_variant(weights[base[i % len(base)]], gen) for i in range(n)]
        retains = [retain[i % len(base)] for i in range(n)]
        vec = _best_of(s.repeats, lambda: unlearn_many(models, retains, merged, cfg))
        loop = _best_of(s.repeats, lambda: [dampen(m, r, merged, cfg) for m, r in zip(models, retains)])
        rows.append({"n": n, "elements": n * per_model, "vectorised_s": vec, "per_model_s": loop,
                     "ratio": vec / loop if loop else None})
    return {"forget_fisher_s": forget_fisher_s, "rows": rows}


def _variant(weights: Weights, gen: torch.Generator) -> Weights:
    """The weights plus seeded noise of 0.1 % of each tensor's spread (distinct models, same Fisher scale)."""
    return {k: v + 1e-3 * v.std() * torch.randn(v.shape, generator=gen) for k, v in weights.items()}


def _best_of(repeats: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# ---- the whole run -------------------------------------------------------------------------------------


def run(setup: Setup) -> dict:
    """Train once, run both requests and the scaling run; a JSON-ready result."""
    net = Network(setup)
    weights, train_s = net.train()
    logger.warning("trained %d models in %.1f s", len(weights), train_s)
    class_fg, client_fg = class_request(net, setup.forget_class), client_request(net, setup.poisoned_client)
    return {
        "setup": asdict(setup),
        "train_s": train_s,
        "models": len(weights),
        "class": run_request(net, weights, class_fg, CLASS_METHODS),
        "client": run_request(net, weights, client_fg, CLIENT_METHODS),
        "scaling": scaling_run(net, weights, class_fg),
    }


def print_tables(result: dict) -> None:
    c = result["class"]
    print(f"\n== class request: {c['request']}; {c['roots']} roots, {c['affected']} affected models "
          f"(trained {result['models']} models in {result['train_s']:.1f} s)")
    print(f"{'method':<17}{'final forget':>13}{'final kept':>11}{'worst forget':>13}{'worst kept':>11}"
          f"{'MIA AUC':>9}{'time s':>9}{'vs retrain':>11}{'cache s':>9}")
    for r in c["rows"]:
        print(f"{r['method']:<17}{r['final']['forget_acc']:>13.3f}{r['final']['retain_acc']:>11.3f}"
              f"{r['worst']['forget_acc']:>13.3f}{r['worst']['retain_acc']:>11.3f}{r['mia_auc']:>9.3f}"
              f"{_num(r['seconds'], '.2f'):>9}{_num(r['ratio_to_retrain'], '.2%'):>11}"
              f"{_num(r['extra'].get('cache_s'), '.2f'):>9}")
    k = result["client"]
    print(f"\n== client request: {k['request']} (poisoned: {result['setup']['poison_fraction']:.0%} of its samples "
          f"carry the trigger, target {result['setup']['backdoor_target']}); {k['affected']} affected models stay")
    print(f"{'method':<17}{'final acc':>10}{'final ASR':>10}{'worst acc':>10}{'worst ASR':>10}"
          f"{'MIA AUC':>9}{'time s':>9}{'vs retrain':>11}{'cache s':>9}")
    for r in k["rows"]:
        print(f"{r['method']:<17}{r['final']['acc']:>10.3f}{r['final']['asr']:>10.3f}{r['worst']['acc']:>10.3f}"
              f"{r['worst']['asr']:>10.3f}{r['mia_auc']:>9.3f}{_num(r['seconds'], '.2f'):>9}"
              f"{_num(r['ratio_to_retrain'], '.2%'):>11}{_num(r['extra'].get('cache_s'), '.2f'):>9}")
    if "model_oracle" in c:
        _print_model_oracle(c, result["setup"]["oracle_forget"])
    sc = result["scaling"]
    print(f"\n== scaling: FIUn dampening (alpha=1) of N models; forget-Fisher passes once: "
          f"{sc['forget_fisher_s']:.2f} s whatever N")
    print(f"{'N':>4}{'elements':>12}{'vectorised s':>14}{'per model s':>13}{'ratio':>8}")
    for r in sc["rows"]:
        print(f"{r['n']:>4}{r['elements']:>12}{r['vectorised_s']:>14.4f}{r['per_model_s']:>13.4f}{r['ratio']:>8.2f}")


def _print_model_oracle(c: dict, bar: float) -> None:
    rows = {r["method"]: r["worst"]["per_model"] for r in c["rows"]}
    print(f"\n== per affected model, held-out kept accuracy (forgotten) on the subset; oracle: the best grid "
          f"candidate forgetting to <= {bar:.0%}, with the newest global's / the model's own forget-Fisher")
    print(f"{'model':<8}{'original':>10}{'retrain':>10}{'fiun':>16}{'oracle newest':>16}{'oracle own':>16}")
    for name, bound in c["model_oracle"].items():
        fiun = rows["fiun"][name]
        cells = [f"{b['retain_acc']:.3f} ({b['forget_acc']:.2f})" if b else "none" for b in bound.values()]
        print(f"{name:<8}{rows['original'][name]['retain_acc']:>10.3f}{rows['retrain'][name]['retain_acc']:>10.3f}"
              f"{fiun['retain_acc']:>9.3f} ({fiun['forget_acc']:.2f}){cells[0]:>16}{cells[1]:>16}")


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _detached(model: nn.Module) -> Weights:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _union(parts: Sequence[Dataset]) -> Dataset:
    parts = [p for p in parts if len(p)] or list(parts[:1])
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _sample(ds: Dataset, size: int, seed: int) -> Dataset:
    rows = np.random.default_rng(seed).permutation(len(ds))[:size]
    return ds.select(np.sort(rows))


def _head(ds: Dataset, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded random sample of up to ``size`` rows as one normalised ``(x, y)`` batch."""
    return next(iter(make_loader(ds, max(1, min(size, len(ds))), shuffle=True, seed=seed)))


QUICK = Setup(source="digits", max_train=None, rounds=2, local_epochs=3, lr=0.05, finetune_steps=20, eval_size=360,
              mia_size=100, repeats=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, 2 rounds: a 1-2 minute smoke run")
    parser.add_argument("--source", choices=["mnist", "digits", "synthetic"])
    parser.add_argument("--max-train", type=int, help="subsample the training split (0: all of it)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--clients", type=int)
    parser.add_argument("--forget-class", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--fisher-estimator", choices=ESTIMATORS, help="the Fishers' estimator (the App's default)")
    parser.add_argument("--alphas-per-octave", type=int, help="alpha=auto's grid: alphas per factor of 2 (App: 2)")
    parser.add_argument("--lams", type=lambda t: tuple(float(v) for v in t.split(",")),
                        help="alpha=auto's grid: comma list of lambdas (App: 1,0)")
    parser.add_argument("--model-oracle", action="store_true",
                        help="class request: per affected model, the best grid candidate forgetting to <= 5 %% held "
                             "out (a bound read from the test split; ~1 min more on MNIST)")
    parser.add_argument("--repair-stop", choices=REPAIR_STOPS,
                        help="fiun+repair: stop once the kept loss is back at the trained model's, or only on a stall "
                             "(the App's repair-stop)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    setup = QUICK if args.quick else Setup()
    overrides = {k: v for k, v in vars(args).items() if k not in ("quick", "out") and v is not None}
    if overrides.get("max_train") == 0:
        overrides["max_train"] = None
    setup = replace(setup, **overrides)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    result = run(setup)
    print_tables(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

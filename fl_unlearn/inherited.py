"""Inherited model networks without Flower: the paper's experiments, on real data.

A network is a DAG of models. Each node starts from the uniform average of its parents' weights (a fresh
model when it has none), then trains on its own data: its own disjoint partition of the training split,
restricted to some classes. Training records every node in a :class:`~fl_unlearn.lineage.LineageGraph` and
stores its weights in a :class:`~fl_unlearn.store.Store`.

Unlearning a class request then follows the engine end to end: the graph names roots and affected models,
each root computes the forget-Fisher of its own forget data, MFIM merges the roots that are ancestors of
each affected model, and :func:`~fl_unlearn.fiun.unlearn_many` dampens every affected model in one step.
The gold standard retrains every affected node, in DAG order, from the same seeds without the forgotten
classes.

Shapes (:func:`chain_network`, :func:`star_network`, :func:`multi_root_network`) follow the reference
graphs: a root with fine-tuned descendants in a chain or a star, and two roots that each hold one class to
forget with a child that averages them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from datasets import concatenate_datasets

from fl_unlearn.calibrate import Scorer, accuracy_scorer, calibrate_alpha
from fl_unlearn.data import (
    FederatedData,
    class_histogram,
    make_loader,
    samples_of_classes,
    without_classes,
)
from fl_unlearn.errors import ConfigError
from fl_unlearn.evaluate import forget_retain_accuracy
from fl_unlearn.fisher import compute_fisher, select_parameters
from fl_unlearn.fiun import FIUnConfig, unlearn_many
from fl_unlearn.lineage import LineageGraph, TrainingData
from fl_unlearn.mfim import merge_fishers
from fl_unlearn.models import build_model
from fl_unlearn.requests import UnlearningRequest
from fl_unlearn.store import Store
from fl_unlearn.train import seed_everything, train_local

logger = logging.getLogger(__name__)

Weights = dict[str, Tensor]


@dataclass(frozen=True)
class NodeSpec:
    """One model of an inherited network.

    Parameters
    ----------
    name : str
        Node id in the lineage graph.
    parents : tuple of str
        Models this one starts from (uniform weight average); empty for a fresh model.
    partition : int
        Index of the disjoint training partition the node trains on.
    drop_classes : tuple of int
        Classes removed from the node's partition before training (data the node never holds).
    """

    name: str
    parents: tuple[str, ...] = ()
    partition: int = 0
    drop_classes: tuple[int, ...] = ()


@dataclass(frozen=True)
class TrainSettings:
    """How every node of a network trains."""

    model: str = "cnn"
    epochs: int = 1
    lr: float = 0.05
    batch_size: int = 64
    seed: int = 0
    # Children fine-tune gently, as transfer and fine-tuning do in practice: a full-strength epoch on data
    # without the forget class would erase it by itself and leave nothing inherited to unlearn.
    finetune_lr: float = 0.005


@dataclass
class UnlearnOutcome:
    """What one unlearning call did to a network."""

    roots: list[str]
    affected: list[str]
    weights: dict[str, Weights]
    timing: dict[str, float]
    stats: dict[str, dict] = field(default_factory=dict)


def chain_network(depth: int, forget_classes: Sequence[int]) -> list[NodeSpec]:
    """A root holding every class, then ``depth`` generations fine-tuned one after another.

    The descendants never hold the forgotten classes: they inherit them from the root only.
    """
    if depth < 1:
        raise ConfigError(f"chain depth must be >= 1, got {depth}")
    drop = tuple(forget_classes)
    nodes = [NodeSpec("root", (), 0)]
    for g in range(1, depth + 1):
        nodes.append(NodeSpec(f"gen{g}", (nodes[-1].name,), g, drop))
    return nodes


def star_network(width: int, forget_classes: Sequence[int], depth: int = 3) -> list[NodeSpec]:
    """A root with ``width`` children, the first of which grows a chain down to ``depth``."""
    if width < 1 or depth < 1:
        raise ConfigError(f"star width and depth must be >= 1, got {width}, {depth}")
    drop = tuple(forget_classes)
    nodes = [NodeSpec("root", (), 0)]
    nodes += [NodeSpec(f"child{i}", ("root",), i + 1, drop) for i in range(width)]
    for g in range(2, depth + 1):
        parent = "child0" if g == 2 else f"child0-gen{g - 1}"
        nodes.append(NodeSpec(f"child0-gen{g}", (parent,), width + g - 1, drop))
    return nodes


def multi_root_network(class_a: int, class_b: int) -> list[NodeSpec]:
    """Two roots, each holding one class to forget, a child averaging them, and its own child."""
    both = (class_a, class_b)
    return [
        NodeSpec("rootA", (), 0, (class_b,)),
        NodeSpec("rootB", (), 1, (class_a,)),
        NodeSpec("merged", ("rootA", "rootB"), 2, both),
        NodeSpec("merged-gen2", ("merged",), 3, both),
    ]


def _check_specs(specs: Sequence[NodeSpec], num_partitions: int) -> None:
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(f"duplicate node name {spec.name!r}")
        missing = [p for p in spec.parents if p not in seen]
        if missing:
            raise ConfigError(f"node {spec.name!r}: parents {missing} must come before it")
        if not 0 <= spec.partition < num_partitions:
            raise ConfigError(f"node {spec.name!r}: partition {spec.partition} outside 0..{num_partitions - 1}")
        seen.add(spec.name)


def average_weights(weights: Sequence[Weights]) -> Weights:
    """Uniform average of several state dicts (the reference code's ``average_weights``)."""
    if len(weights) == 1:
        return {k: v.clone() for k, v in weights[0].items()}
    return {k: torch.stack([w[k].float() for w in weights]).mean(0).to(weights[0][k].dtype) for k in weights[0]}


class InheritedNetwork:
    """Train, unlearn and retrain one inherited model network on a federated dataset.

    Parameters
    ----------
    specs : sequence of NodeSpec
        The nodes, parents before children.
    data : FederatedData
        Source of the nodes' disjoint partitions and of the held-out test split.
    settings : TrainSettings
        Model and optimiser settings shared by all nodes.
    store : Store
        Where node weights go.
    graph : LineageGraph, optional
        The lineage to record into; a fresh in-memory graph by default.
    """

    def __init__(
        self,
        specs: Sequence[NodeSpec],
        data: FederatedData,
        settings: TrainSettings,
        store: Store,
        graph: LineageGraph | None = None,
    ) -> None:
        _check_specs(specs, data.num_partitions)
        self.specs = {s.name: s for s in specs}
        self.order = [s.name for s in specs]
        self.data, self.settings, self.store = data, settings, store
        self.graph = graph if graph is not None else LineageGraph()
        self.weights: dict[str, Weights] = {}

    # -- building blocks -------------------------------------------------------------------------
    def new_model(self) -> nn.Module:
        channels, size = self.data.image_shape[0], self.data.image_shape[-1]
        return build_model(self.settings.model, self.data.num_classes, in_channels=channels, image_size=size)

    def node_data(self, name: str, extra_drop: Sequence[int] = ()):
        """The training data of node ``name``: its partition minus the classes it never holds."""
        spec = self.specs[name]
        drop = sorted(set(spec.drop_classes) | set(extra_drop))
        ds = self.data.partition(spec.partition)
        return without_classes(ds, drop) if drop else ds

    def _train_node(self, name: str, parents_weights: Sequence[Weights], extra_drop: Sequence[int] = ()) -> Weights:
        # Seed per node so that a retrain of one node repeats its original initialisation and batch order.
        seed = self.settings.seed + self.order.index(name)
        seed_everything(seed)
        model = self.new_model()
        if parents_weights:
            model.load_state_dict(average_weights(parents_weights))
        loader = make_loader(self.node_data(name, extra_drop), self.settings.batch_size, shuffle=True, seed=seed)
        lr = self.settings.finetune_lr if parents_weights else self.settings.lr
        train_local(model, loader, epochs=self.settings.epochs, lr=lr)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def _model_with(self, weights: Weights) -> nn.Module:
        model = self.new_model()
        model.load_state_dict(weights)
        return model.eval()

    # -- phases ----------------------------------------------------------------------------------
    def train(self) -> float:
        """Train every node in order, record it in the lineage, store its weights; return seconds."""
        start = time.perf_counter()
        for name in self.order:
            spec = self.specs[name]
            self.weights[name] = self._train_node(name, [self.weights[p] for p in spec.parents])
            ds = self.node_data(name)
            digest = self.store.put(self.weights[name], {"node": name})
            data = TrainingData(client=spec.partition, class_histogram=class_histogram(ds))
            self.graph.add_node(name, "derived" if spec.parents else "local", parents=spec.parents,
                                owner=f"client:{spec.partition}", data=data, weights=digest)
            logger.info("trained %s (%d samples)", name, len(ds))
        return time.perf_counter() - start

    def retain_fishers(self, names: Sequence[str], forget_classes: Sequence[int], params: Sequence[str],
                       estimator: str) -> dict[str, Weights]:
        """Each model's Fisher on its own retained data at its own weights (the cache FIUn reads)."""
        out = {}
        for name in names:
            ds = self.node_data(name, forget_classes)
            loader = make_loader(ds, self.settings.batch_size, shuffle=False)
            out[name] = compute_fisher(self._model_with(self.weights[name]), loader, params, estimator=estimator)
        return out

    def forget_fisher(self, root: str, at: str, forget_classes: Sequence[int], params: Sequence[str],
                      estimator: str, max_samples: int | None = None) -> tuple[Weights, int]:
        """The Fisher of ``root``'s forget data (at most ``max_samples``, a seeded random subset) at the weights
        of model ``at``, and the root's forget sample count (MFIM weights by what each root holds)."""
        ds = samples_of_classes(self.node_data(root), forget_classes)
        loader = make_loader(ds, self.settings.batch_size, shuffle=True, seed=self.settings.seed)
        fisher = compute_fisher(self._model_with(self.weights[at]), loader, params, estimator=estimator,
                                max_samples=max_samples)
        return fisher, len(ds)

    def unlearn(self, request: UnlearningRequest, cfg: FIUnConfig, *, fisher_layers: str = "last",
                estimator: str = "batch", mfim_mode: str = "max",
                forget_fisher_at: str = "root", alpha: float | str = "auto",
                fisher_samples: int | None = 1024) -> UnlearnOutcome:
        """Unlearn ``request`` from every affected model in one vectorised step.

        Retain-Fishers are the cache the federation keeps anyway; their time is reported apart
        (``retain_fisher_s``) and not counted in ``unlearn_s``. ``fisher_samples`` caps each forget-Fisher pass
        (``None``: all of a root's forget samples), as the Flower clients' ``fisher-samples`` does.
        """
        forget = list(request.classes)
        roots, affected = self.graph.roots(request), self.graph.affected(request)
        params = select_parameters(self.new_model(), fisher_layers)
        t0 = time.perf_counter()
        retain = self.retain_fishers(affected, forget, params, estimator)
        t1 = time.perf_counter()
        sources = {name: self._roots_of(name, roots) for name in affected}
        if forget_fisher_at == "root":
            at_root = {r: self.forget_fisher(r, r, forget, params, estimator, fisher_samples) for r in roots}
            fishers = {name: [at_root[r] for r in sources[name]] for name in affected}
        else:
            fishers = {name: [self.forget_fisher(r, name, forget, params, estimator, fisher_samples)
                              for r in sources[name]]
                       for name in affected}
        t2 = time.perf_counter()
        merged = [merge_fishers([f for f, _ in fishers[n]], num_samples=[k for _, k in fishers[n]], mode=mfim_mode)
                  for n in affected]
        t3 = time.perf_counter()
        models, retains = [self.weights[n] for n in affected], [retain[n] for n in affected]
        alphas: list[float] = [cfg.alpha] * len(affected)
        if alpha == "auto":
            scorer = self.calibration_scorer(affected, sources, forget)
            result = calibrate_alpha(models, retains, merged, scorer, base=cfg)
            new_weights, stats, alphas = result.weights, result.stats, result.alphas
        else:
            new_weights, stats = unlearn_many(models, retains, merged, replace(cfg, alpha=float(alpha)))
        t4 = time.perf_counter()
        timing = {"retain_fisher_s": t1 - t0, "forget_fisher_s": t2 - t1, "merge_s": t3 - t2,
                  "dampen_s": t4 - t3, "unlearn_s": t4 - t1}
        report = {n: dict(_stats_dict(s), alpha=a) for n, s, a in zip(affected, stats, alphas)}
        return UnlearnOutcome(roots, affected, dict(zip(affected, new_weights)), timing, report)

    def calibration_scorer(self, affected: Sequence[str], sources: Mapping[str, Sequence[str]],
                           forget: Sequence[int], *, forget_size: int = 128, retain_size: int = 64) -> Scorer:
        """Score candidates on training-side data only: the roots' forget samples and the model's kept data.

        Held-out data stays for the final evaluation.
        """
        by_roots: dict[tuple[str, ...], tuple[Tensor, Tensor]] = {}
        forget_sets, retain_sets = [], []
        for name in affected:
            roots = tuple(sources[name])
            if roots not in by_roots:  # models downstream of the same roots share one forget sample
                forget_ds = concatenate_datasets([samples_of_classes(self.node_data(r), forget) for r in roots])
                by_roots[roots] = _head_tensors(forget_ds, forget_size, self.settings.seed)
            forget_sets.append(by_roots[roots])
            retain_sets.append(_head_tensors(self.node_data(name, forget), retain_size, self.settings.seed))
        return accuracy_scorer(self.new_model(), forget_sets, retain_sets)

    def _roots_of(self, name: str, roots: Sequence[str]) -> list[str]:
        # A model gets the merge over the roots that are itself or its ancestors (fiun.md §4: the
        # reference code missed roots that descend from other roots).
        lineage = set(self.graph.ancestors(name)) | {name}
        return [r for r in roots if r in lineage]

    def retrain(self, names: Sequence[str], forget_classes: Sequence[int]) -> tuple[dict[str, Weights], float]:
        """Retrain ``names`` in DAG order without ``forget_classes``; other parents keep their weights."""
        start = time.perf_counter()
        redone: dict[str, Weights] = {}
        for name in self.order:
            if name in names:
                parents = [redone.get(p, self.weights[p]) for p in self.specs[name].parents]
                redone[name] = self._train_node(name, parents, forget_classes)
        return redone, time.perf_counter() - start

    def evaluate(self, weights: Weights, forget_classes: Sequence[int]) -> dict[str, float]:
        """Held-out accuracy on the forgotten classes and on the rest."""
        return forget_retain_accuracy(self._model_with(weights), self.data.test, forget_classes)


def _head_tensors(ds, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded random sample of up to ``size`` rows of ``ds`` as one normalised ``(x, y)`` batch."""
    loader = make_loader(ds, max(1, min(size, len(ds))), shuffle=True, seed=seed)
    return next(iter(loader))


def _stats_dict(stats) -> dict:
    from dataclasses import asdict, is_dataclass

    return asdict(stats) if is_dataclass(stats) else dict(stats)


def run_experiment(net: InheritedNetwork, request: UnlearningRequest, cfg: FIUnConfig, **unlearn_options) -> dict:
    """Train, unlearn, retrain and evaluate one network; return a JSON-ready report."""
    forget = list(request.classes)
    train_s = net.train()
    outcome = net.unlearn(request, cfg, **unlearn_options)
    retrained, retrain_s = net.retrain(outcome.affected, forget)
    models = []
    for name in outcome.affected:
        models.append({
            "id": name,
            "before": net.evaluate(net.weights[name], forget),
            "after": net.evaluate(outcome.weights[name], forget),
            "retrained": net.evaluate(retrained[name], forget),
            "dampening": outcome.stats[name],
        })
    timing = dict(outcome.timing, train_s=train_s, retrain_s=retrain_s)
    timing["unlearn_to_retrain"] = timing["unlearn_s"] / retrain_s if retrain_s > 0 else float("nan")
    return {"roots": outcome.roots, "affected_models": models, "timing": timing}

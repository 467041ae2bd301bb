"""``alpha="auto"``: choose FIUn's dampening strength per affected model from data the federation holds.

A fixed selection threshold does not transfer between classes, models or Fisher scales (the paper's
alpha=1 over-forgets kept classes on some models, SSD's alpha=10 leaves some classes barely forgotten). So
for each affected model we try a short geometric grid of alphas, all models at once with one
:func:`~fl_unlearn.fiun.unlearn_many` call per alpha, and score each candidate with a few forward passes on
two small calibration sets the caller owns: samples of the data to forget (held by the clients that ask) and
a retained validation sample. Per model we keep the mildest candidate whose accuracy on the forget sample
is at or below the target, with the best retained accuracy; when none reaches the target, the one that
forgets most (and ``target_met`` says so, so a caller can repair or report it).

Both Fishers are first divided by their own mean (:func:`scale_free`), so the decision does not depend on
which model the Fishers came from: multiplying either Fisher by a positive constant changes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from fl_unlearn.errors import ConfigError
from fl_unlearn.fiun import AlphaSweep, DampenStats, FIUnConfig, FisherSweep, check_many, unlearn_many
from fl_unlearn.models import split_head

logger = logging.getLogger(__name__)

Weights = Mapping[str, Tensor]
#: ``score(model_index, candidate_weights) -> (forget_acc, retain_acc)`` on the caller's calibration sets.
Scorer = Callable[[int, Weights], tuple[float, float]]


def grid_alphas(per_octave: int = 2) -> tuple[float, ...]:
    """Alphas 0.5 .. 512, ``per_octave`` of them per factor of 2 (2: :data:`DEFAULT_ALPHAS`, the App's grid).

    A finer grid places alpha closer to the edge where the class is forgotten (digits, finest of 4 per factor of 2
    with lambdas 1, 0.5, 0.25, 0: worst kept gap to retraining 2.1 points instead of 4.2), at a cost of forward
    passes per candidate the clients score (``benchmarks/robustness.py``).

    Examples
    --------
    >>> grid_alphas(1)
    (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)
    >>> grid_alphas() == DEFAULT_ALPHAS
    True
    """
    if per_octave < 1:
        raise ConfigError(f"per_octave must be >= 1, got {per_octave}")
    return tuple(round(2.0 ** (k / per_octave), 4) for k in range(-per_octave, 9 * per_octave + 1))


#: Alphas tried, from the strongest dampening to the mildest (on mean-normalised Fishers): 0.5 .. 512 in steps
#: of sqrt(2). Steps of 2 were too coarse: on digits, class 0 went from 0 % forgotten / 92.1 % kept at alpha 2 to
#: 3.4 % / 95.8 % at alpha 4, while alpha 2.8 gives 0 % / 95.2 %.
DEFAULT_ALPHAS: tuple[float, ...] = grid_alphas(2)


def scale_free(fisher: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Divide a Fisher diagonal by its mean over all entries (an all-zero Fisher is returned as is).

    Examples
    --------
    >>> f = {"w": torch.tensor([1.0, 3.0])}
    >>> scale_free(f)["w"].tolist(), scale_free({"w": 7 * f["w"]})["w"].tolist()
    ([0.5, 1.5], [0.5, 1.5])
    """
    total = sum(float(t.double().sum()) for t in fisher.values())
    count = sum(t.numel() for t in fisher.values())
    mean = total / count if count else 0.0
    if mean <= 0.0:
        return {k: v.clone() for k, v in fisher.items()}
    return {k: (v.double() / mean).to(v.dtype) for k, v in fisher.items()}


def scale_free_each(fishers: Sequence[Mapping[str, Tensor]],
                    done: dict[int, dict[str, Tensor]] | None = None) -> list[dict[str, Tensor]]:
    """:func:`scale_free` of every Fisher in ``fishers``. One object listed several times (a merge that several
    models share) is normalised once and stays one object, so :func:`~fl_unlearn.fiun.unlearn_many` validates and
    broadcasts it once. ``done`` (id -> result) carries the sharing across calls.

    Examples
    --------
    >>> f = {"w": torch.tensor([1.0, 3.0])}
    >>> a, b = scale_free_each([f, f])
    >>> a is b, a["w"].tolist()
    (True, [0.5, 1.5])
    """
    done = {} if done is None else done
    out = []
    for fisher in fishers:
        if id(fisher) not in done:
            done[id(fisher)] = scale_free(fisher)
        out.append(done[id(fisher)])
    return out


@dataclass
class Candidate:
    """The best alpha found so far for one model."""

    alpha: float
    forget_acc: float
    retain_acc: float
    weights: dict[str, Tensor]
    stats: DampenStats

    def beats(self, other: Candidate | None, target: float) -> bool:
        """True when this candidate should replace ``other`` (candidates arrive strongest first)."""
        if other is None:
            return True
        mine, theirs = self.forget_acc <= target, other.forget_acc <= target
        if mine != theirs:
            return mine
        if mine:  # both forget enough: keep the better retained accuracy; ties go to the milder alpha
            return self.retain_acc >= other.retain_acc
        # neither forgets enough: forget most, then keep most
        return (self.forget_acc, -self.retain_acc) < (other.forget_acc, -other.retain_acc)


@dataclass
class CalibrationResult:
    """Per model: the chosen alpha, its weights and scores, and the cost of calibrating."""

    weights: list[dict[str, Tensor]]
    stats: list[DampenStats]
    alphas: list[float]
    forget_acc: list[float]
    retain_acc: list[float]
    target_met: list[bool]
    seconds: float
    trials: list[list[dict[str, float]]] = field(default_factory=list)


def calibrate_alpha(
    models: Sequence[Weights],
    retain_fishers: Sequence[Mapping[str, Tensor]],
    forget_fishers: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]],
    score: Scorer,
    *,
    base: FIUnConfig = FIUnConfig(),
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    forget_target: float = 0.0,
) -> CalibrationResult:
    """Unlearn every model with the alpha that meets ``forget_target`` and keeps the most.

    Parameters
    ----------
    models : sequence of dict
        State dicts of the N affected models (not modified).
    retain_fishers : sequence of dict
        Each model's retain-Fisher.
    forget_fishers : dict or sequence of dict
        One (merged) forget-Fisher for all models, or one per model.
    score : callable
        ``score(i, weights) -> (forget_acc, retain_acc)`` of model ``i`` with candidate ``weights`` on the
        caller's calibration sets (a few forward passes).
    base : FIUnConfig
        The other dampening settings; its ``alpha`` is ignored.
    alphas : sequence of float (default: DEFAULT_ALPHAS)
        Candidate thresholds on mean-normalised Fishers, tried strongest first.
    forget_target : float (default: 0.0)
        Highest accepted accuracy on the forget calibration set (0 for a class: a model that never saw it
        gets none right; the held-out accuracy of the retrained model for samples and clients).

    Returns
    -------
    CalibrationResult
    """
    if not alphas or any(a < 0 for a in alphas):
        raise ConfigError(f"alphas must be a non-empty list of values >= 0, got {list(alphas)}")
    start = time.perf_counter()
    retain = [scale_free(f) for f in retain_fishers]
    forget = [scale_free(f) for f in _per_model(forget_fishers, len(models))]
    grid = sorted(float(a) for a in alphas)
    search = [_Bisection(len(grid)) for _ in models]
    best: list[Candidate | None] = [None] * len(models)
    trials: list[list[dict[str, float]]] = [[] for _ in models]
    while any(not b.done for b in search):
        # Models probing the same alpha share one vectorised dampening step.
        for index, members in _group_by_probe(search).items():
            alpha = grid[index]
            new, stats = unlearn_many([models[i] for i in members], [retain[i] for i in members],
                                      [forget[i] for i in members], replace(base, alpha=alpha))
            for i, weights, stat in zip(members, new, stats):
                f_acc, r_acc = score(i, weights)
                trials[i].append({"alpha": alpha, "forget_acc": f_acc, "retain_acc": r_acc})
                cand = Candidate(alpha, f_acc, r_acc, weights, stat)
                if cand.beats(best[i], forget_target):
                    best[i] = cand
                search[i].record(f_acc <= forget_target)
    chosen = [c for c in best if c is not None]
    seconds = time.perf_counter() - start
    logger.info("calibrate: %d models, %d trials, %.2f s", len(models), sum(map(len, trials)), seconds)
    return CalibrationResult(
        weights=[c.weights for c in chosen], stats=[c.stats for c in chosen], alphas=[c.alpha for c in chosen],
        forget_acc=[c.forget_acc for c in chosen], retain_acc=[c.retain_acc for c in chosen],
        target_met=[c.forget_acc <= forget_target for c in chosen], seconds=seconds, trials=trials,
    )


class _Bisection:
    """Find the largest grid index whose dampening still meets the forget target.

    A larger alpha selects a subset of the parameters a smaller one selects and dampens them less, so
    "meets the target" is (near enough) monotone in alpha: bisection needs log2(len(grid)) probes, not all.
    """

    def __init__(self, size: int) -> None:
        self.lo, self.hi = 0, size - 1  # the answer lies in [lo, hi]; lo is also the fallback

    @property
    def done(self) -> bool:
        return self.lo > self.hi

    @property
    def probe(self) -> int:
        return (self.lo + self.hi + 1) // 2

    def record(self, met: bool) -> None:
        if met:
            self.lo = self.probe + 1
        else:
            self.hi = self.probe - 1


def _group_by_probe(search: Sequence[_Bisection]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, b in enumerate(search):
        if not b.done:
            groups.setdefault(b.probe, []).append(i)
    return groups


def _per_model(forget_fishers, n: int) -> list[Mapping[str, Tensor]]:
    if isinstance(forget_fishers, Mapping):
        return [forget_fishers] * n
    if len(forget_fishers) != n:
        raise ConfigError(f"{len(forget_fishers)} forget-Fishers for {n} models; give one, or one per model")
    return list(forget_fishers)


def accuracy_scorer(
    model: torch.nn.Module,
    forget_sets: Sequence[tuple[Tensor, Tensor]],
    retain_sets: Sequence[tuple[Tensor, Tensor]],
) -> Scorer:
    """A scorer over in-memory calibration tensors: ``forget_sets[i]`` and ``retain_sets[i]`` are ``(x, y)``.

    ``model`` is any instance of the architecture; candidates run through it with
    ``torch.func.functional_call``, so no model is rebuilt per candidate and ``model`` is not changed.
    """
    model = model.eval()

    def score(i: int, weights: Weights) -> tuple[float, float]:
        return _acc(model, weights, *forget_sets[i]), _acc(model, weights, *retain_sets[i])

    return score


@torch.no_grad()
def _acc(model: torch.nn.Module, weights: Weights, x: Tensor, y: Tensor) -> float:
    if len(y) == 0:
        return float("nan")
    logits = torch.func.functional_call(model, dict(weights), (x,))
    return float((logits.argmax(1) == y).float().mean())


#: How a repair decides it is done (:attr:`RepairConfig.stop`).
REPAIR_STOPS = ("stall", "restore")
#: ``RepairConfig.part``: what a repair trains (``all`` weights, or the ``head`` of ``fl_unlearn.models.split_head``)
REPAIR_PARTS = ("all", "head")


@dataclass(frozen=True)
class RepairConfig:
    """A short, capped repair after dampening (OHS-style): FedAvg rounds on kept data only.

    Parameters
    ----------
    max_rounds : int (default: 8)
        Cap on repair rounds (MNIST class 5 used all of a cap of 4 and ended 3.7 points below retraining).
    local_steps : int (default: 8)
        SGD steps per client and round (batches drawn with a seeded generator from the client's kept sample).
    lr, momentum : float (default: 0.01, 0.9)
        SGD settings. Measured on MNIST class 5: 32 such steps took kept accuracy from 88.1 % back to 98.1 % while
        the forgotten class stayed at 0.0 %.
    batch_size : int (default: 32)
        Rows per step.
    validation_fraction : float (default: 0.25)
        Share of each client's kept sample held back to decide when to stop.
    patience : int (default: 1)
        Rounds without a validation-loss improvement before stopping.
    seed : int (default: 0)
        Seeds the batch draws.
    forget_weight : float (default: 1.0)
        Weight of the forget guard (0: off, a repair on kept data only). Given forget rows, a client that holds data
        to forget also takes, in each step, a batch of its forget samples with the bounded loss
        ``-log(1 - p_y(x))`` (:func:`forget_guard_loss`: it pushes the forgotten label's probability down and
        vanishes once it is small, so it never trains a class away beyond forgetting it), and the same loss on
        the forget samples it holds back is added, with this weight, to the validation loss the repair stops
        on and keeps its best version by. Kept data alone cannot hold a class down: shared features move, and
        on digits (seeds 42 and 45) the plain repair brought one held-out row of a forgotten class back. Meant
        for forgotten classes: a model that never saw a client's or a user's samples still predicts them as it
        does held-out data, so for those requests pass no forget rows (the App sets the weight to 0).
    stop : str (default: "stall")
        ``stall``: stop when the validation loss has not improved for ``patience`` rounds. ``restore``: also stop
        as soon as the kept part of the validation loss is back at the model's from before unlearning (given as
        ``original`` to :func:`repair`; a repair restores, it does not train further) and, with the guard on, no
        held-back forget row is predicted any more; do nothing when that already holds. Measured on digits
        (``benchmarks/robustness.py``, seeds 42-45, every class): the repair's time over ten classes 0.9-2.6 s
        instead of 4.2-5.0 s, worst kept gap to retraining 1.5 / 0.3 / 0.6 / 1.6 points instead of 0.6 / 0.0 /
        0.3 / 1.6, every class at 0.0 % forgotten either way; on ``benchmarks/baselines.py``'s 19 models 22 % of
        retraining's time instead of 47 %, but the poisoned client's round-1 model 6.8 points below its retrained
        twin instead of 4.5 (its own rows, half of them triggered, are not clean data to be "restored" on).
    part : str (default: "all")
        ``all``: every weight trains. ``head``: only the model's head (:func:`~fl_unlearn.models.split_head`: the
        small CNN's ``hidden`` and ``fc``, a ResNet's ``fc``); the body's weights come back unchanged, so
        :func:`repair` runs the body once over its rows, without gradients, and every step and validation after
        that costs the head's few multiply-adds (:func:`repair_steps` runs it over the rows its steps draw). On
        ``benchmarks/baselines.py``'s class request, the models the per-model check took past the clients' choice
        repaired so on 256 kept and 64 forget rows per client: every model within 5 points of its retrained twin, as
        with ``all`` on every model the App's rule picks, in 0.49 s instead of 13.5 s. Without the forget guard a
        head trained on kept data brought a forgotten class back there (35 % of class 3 held out on one model).
    """

    max_rounds: int = 8
    local_steps: int = 8
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 32
    validation_fraction: float = 0.25
    patience: int = 1
    seed: int = 0
    forget_weight: float = 1.0
    stop: str = "stall"
    part: str = "all"

    def __post_init__(self) -> None:
        problems = []
        if self.stop not in REPAIR_STOPS:
            problems.append(f"stop must be one of {', '.join(REPAIR_STOPS)}, got {self.stop!r}")
        if self.part not in REPAIR_PARTS:
            problems.append(f"part must be one of {', '.join(REPAIR_PARTS)}, got {self.part!r}")
        if not (self.forget_weight >= 0 and math.isfinite(self.forget_weight)):
            problems.append(f"forget_weight must be a finite number >= 0, got {self.forget_weight}")
        if self.max_rounds < 0:
            problems.append(f"max_rounds must be >= 0, got {self.max_rounds}")
        if self.local_steps < 1:
            problems.append(f"local_steps must be >= 1, got {self.local_steps}")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum must be in [0, 1), got {self.momentum}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 < self.validation_fraction < 1:
            problems.append(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if self.patience < 1:
            problems.append(f"patience must be >= 1, got {self.patience}")
        if problems:
            raise ConfigError("RepairConfig: " + "; ".join(problems))


def repair(
    model: torch.nn.Module,
    weights: Weights,
    retain_sets: Sequence[tuple[Tensor, Tensor]],
    forget_set: tuple[Tensor, Tensor] | None = None,
    cfg: RepairConfig = RepairConfig(),
    *,
    forget_sets: Sequence[tuple[Tensor, Tensor] | None] | None = None,
    original: Weights | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """FedAvg rounds on each client's kept sample until the held-back validation loss stops improving (or, with
    ``cfg.stop="restore"``, is back at the original model's).

    Parameters
    ----------
    model : nn.Module
        Any instance of the architecture; it is loaded with ``weights`` per client and left changed.
    weights : dict
        The dampened model (not modified).
    retain_sets : sequence of (x, y)
        One kept-data sample per client (the calibration retain samples).
    forget_set : (x, y) | None
        When given, accuracy on it is reported after each round (repair must not bring the data back).
    cfg : RepairConfig
    forget_sets : sequence of (x, y) or None, optional
        Per client (aligned with ``retain_sets``), the forget samples it holds, for the forget guard
        (``cfg.forget_weight > 0``; ``None`` for a client without any). A quarter (``validation_fraction``) is
        held back for the validation loss, as with the kept samples.
    original : dict, optional
        The model before unlearning: with ``cfg.stop="restore"``, the repair stops once the kept validation loss is
        at or below this model's on the same rows (``restore_loss`` in the info).

    Returns
    -------
    (weights, info)
        The best weights by validation loss (the input when no round helped) and ``rounds``,
        ``val_loss`` per round (index 0: before), ``forget_acc`` per round when ``forget_set`` was given.
    """
    if forget_sets is not None and len(forget_sets) != len(retain_sets):
        raise ConfigError(f"repair: {len(forget_sets)} forget samples for {len(retain_sets)} clients")
    pairs = [(r, f) for r, f in zip(retain_sets, forget_sets or [None] * len(retain_sets)) if len(r[1])]
    if not pairs:
        raise ConfigError("repair needs at least one non-empty kept-data sample")
    kept_sets = [r for r, _ in pairs]
    guard_sets = [f for _, f in pairs] if forget_sets is not None else None
    restore = None
    if cfg.stop == "restore" and original is not None:  # on the original's own body, whatever part trains
        restore = _val_loss(model, original, [split_validation(x, y, cfg.validation_fraction) for x, y in kept_sets])
    if cfg.part == "all":
        return _repair_rounds(model, weights, kept_sets, guard_sets, forget_set, cfg, restore)
    head = _Head(model, weights)
    best, info = _repair_rounds(head.module, head.weights, [head.features(r) for r in kept_sets],
                                None if guard_sets is None else [head.features(f) for f in guard_sets],
                                head.features(forget_set), replace(cfg, part="all"), restore)
    return head.merged(best), info


def _repair_rounds(model: torch.nn.Module, weights: Weights, kept_sets: Sequence[tuple[Tensor, Tensor]],
                   guard_sets: Sequence[tuple[Tensor, Tensor] | None] | None, forget_set: tuple[Tensor, Tensor] | None,
                   cfg: RepairConfig, restore: float | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """:func:`repair`'s rounds on ``model`` (the whole model, or its head on features), ``restore`` the kept
    validation loss to get back to (``None``: stop on a stall only)."""
    splits = [split_validation(x, y, cfg.validation_fraction) for x, y in kept_sets]
    guarded = cfg.forget_weight > 0 and guard_sets is not None
    forget_splits = [split_validation(*f, cfg.validation_fraction) if guarded and f is not None and len(f[1]) > 1
                     else None for f in (guard_sets or [None] * len(kept_sets))]

    def val_loss(w: Weights) -> tuple[float, float]:
        """(the kept part, the validation loss: kept plus the weighted guard)."""
        kept = _val_loss(model, w, splits)
        return kept, kept + cfg.forget_weight * (_guard_val_loss(model, w, forget_splits) if guarded else 0.0)

    def is_restored(w: Weights, kept: float) -> bool:  # kept loss back at the original's, no forget row left
        return restore is not None and kept <= restore and not (
            guarded and any(count_correct(model, w, f[1]) for f in forget_splits if f is not None))

    best = {k: v.clone() for k, v in weights.items()}
    kept, loss = val_loss(best)
    losses = [loss]
    forget_acc = [_acc(model, best, *forget_set)] if forget_set is not None else []
    current, stale, rounds = best, 0, 0
    restored = is_restored(best, kept)
    while rounds < cfg.max_rounds and stale < cfg.patience and not restored:
        rounds += 1
        updates = [repair_steps(model, current, train, cfg, seed=(cfg.seed, rounds, i),
                                forget=None if f is None else f[0])
                   for i, ((train, _), f) in enumerate(zip(splits, forget_splits))]
        sizes = [len(train[1]) for train, _ in splits]
        current = weighted_average(updates, sizes)
        kept, loss = val_loss(current)
        losses.append(loss)
        if forget_set is not None:
            forget_acc.append(_acc(model, current, *forget_set))
        if losses[-1] < min(losses[:-1]):
            best, stale = current, 0
        else:
            stale += 1
        restored = is_restored(current, kept)
    info: dict[str, Any] = {"repair_rounds": rounds, "val_loss": losses}
    if restore is not None:
        info.update(restore_loss=restore, restored=restored)
    if forget_set is not None:
        info["repair_forget_acc"] = forget_acc
    return best, info


class _Head:
    """A model's head (:func:`~fl_unlearn.models.split_head`) with its weights from ``weights``, the body's features
    of any rows (computed with ``weights``, without gradients), and the way back to the whole model's weights."""

    def __init__(self, model: torch.nn.Module, weights: Weights) -> None:
        self.body, self.module = split_head(model)
        ids = {id(p): name for name, p in model.named_parameters()}
        # head-module name -> the model's name for the same tensor
        self.names = {name: ids[id(p)] for name, p in self.module.named_parameters()}
        model.load_state_dict(weights)
        model.eval()  # the body's normalisation layers, if any, as at inference
        self.model = model
        self.base = weights
        self._body_digest: str | None = None
        self.weights = {name: weights[full].clone() for name, full in self.names.items()}

    @torch.no_grad()
    def body_of(self, x: Tensor) -> Tensor:
        """The body's features of ``x`` (on CPU with channels-last convolutions and pooling inputs, as :func:`_logits`
        runs them: the same values, about half the time for the small CNN)."""
        if x.device.type != "cpu":
            return self.body(x)
        self.model.to(memory_format=torch.channels_last)  # 4-D weights only; load_state_dict keeps the layout
        hooks = [m.register_forward_pre_hook(_channels_last_input) for m in self.model.modules()
                 if isinstance(m, torch.nn.MaxPool2d)]
        try:
            return self.body(x).contiguous()
        finally:
            for hook in hooks:
                hook.remove()

    def logits(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        """The model's outputs on ``x``, as the head computes them from the body's features (from ``cache`` when
        given)."""
        feats = cache.features(self, x) if cache is not None else self.body_of(x)
        with torch.no_grad():
            return torch.func.functional_call(self.module, self.weights, (feats,))

    def features(self, rows: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor] | None:
        """``(body(x), y)`` for rows ``(x, y)``."""
        return None if rows is None else (self.body_of(rows[0]), rows[1])

    @torch.no_grad()
    def rows_features(self, x: Tensor, used: Tensor) -> Tensor:
        """Features of every row of ``x``, computed only for the rows in ``used`` (the others are zeros, never read)."""
        used = torch.unique(used)
        feats = self.body(x[used])
        out = feats.new_zeros((len(x),) + tuple(feats.shape[1:]))
        out[used] = feats
        return out

    def body_digest(self) -> str:
        """A digest of every tensor of the input weights outside the head (what the body computes with; once)."""
        if self._body_digest is None:
            head = set(self.names.values())
            self._body_digest = hashlib.blake2b("".join(f"{name}:{_tensor_digest(t)}"
                                                        for name, t in sorted(self.base.items()) if name not in head)
                                                .encode(), digest_size=16).hexdigest()
        return self._body_digest

    def merged(self, head_weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The input weights with the head's parameters replaced (the body's are copies of the input's)."""
        out = {k: v.clone() for k, v in self.base.items()}
        out.update({self.names[name]: v for name, v in head_weights.items()})
        return out


def split_validation(x: Tensor, y: Tensor, fraction: float) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``((x_train, y_train), (x_val, y_val))``: the first ``fraction`` of the rows (at least one) for validation."""
    n_val = max(1, int(round(len(y) * fraction))) if len(y) > 1 else 0
    return (x[n_val:], y[n_val:]), (x[:n_val], y[:n_val])


def forget_guard_loss(logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """``-log(1 - p_y(x))``: the repair's forget guard, bounded below by 0 and vanishing as ``p_y`` does.

    Unlike gradient ascent on the forgotten data (``log p_y``, unbounded), it stops pushing once the model no
    longer gives the forgotten label any weight. Computed stably as ``logsumexp(z) - logsumexp(z without y)``.

    Examples
    --------
    >>> z = torch.tensor([[0.0, 0.0], [0.0, -30.0]])
    >>> [round(v, 4) for v in forget_guard_loss(z, torch.tensor([0, 1]), reduction="none").tolist()]
    [0.6931, 0.0]
    """
    others = logits.scatter(1, y[:, None], float("-inf"))
    loss = torch.logsumexp(logits, 1) - torch.logsumexp(others, 1)
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def repair_steps(model: torch.nn.Module, weights: Weights, data: tuple[Tensor, Tensor],
                 cfg: RepairConfig, seed: tuple[int, ...],
                 forget: tuple[Tensor, Tensor] | None = None, cache: FeatureCache | None = None) -> dict[str, Tensor]:
    """``cfg.local_steps`` SGD steps from ``weights`` on batches drawn (seeded by ``seed``) from ``data``; with
    ``forget`` rows and ``cfg.forget_weight > 0``, each step adds the forget guard on a batch of them. With
    ``cfg.part="head"`` the steps train the head alone, on the body's features of the rows they draw (kept in
    ``cache``, a :class:`FeatureCache`, for later calls with the same body and rows)."""
    guard = forget if cfg.forget_weight > 0 and forget is not None and len(forget[1]) else None
    batches = _batches(len(data[1]), len(guard[1]) if guard is not None else None, cfg, seed)
    if cfg.part == "head":
        return _head_steps(model, weights, data, guard, batches, cfg, cache)
    model.load_state_dict(weights)
    _sgd_steps(model, [p for p in model.parameters() if p.requires_grad], data, guard, batches, cfg)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _batches(kept: int, guard: int | None, cfg: RepairConfig,
             seed: tuple[int, ...]) -> list[tuple[Tensor, Tensor | None]]:
    """Per step, the rows of a kept batch and (with ``guard`` forget rows) of a forget batch, drawn with a generator
    seeded by ``seed``, kept then forget in each step."""
    gen = torch.Generator().manual_seed(hash(seed) & 0x7FFFFFFF)
    out = []
    for _ in range(cfg.local_steps):
        rows = torch.randint(0, kept, (min(cfg.batch_size, kept),), generator=gen)
        frows = torch.randint(0, guard, (min(cfg.batch_size, guard),), generator=gen) if guard is not None else None
        out.append((rows, frows))
    return out


def _sgd_steps(module: torch.nn.Module, params: Sequence[torch.nn.Parameter], data: tuple[Tensor, Tensor],
               guard: tuple[Tensor, Tensor] | None, batches: Sequence[tuple[Tensor, Tensor | None]],
               cfg: RepairConfig) -> None:
    """SGD on ``params`` of ``module``, one step per batch: cross-entropy on the kept rows plus, with ``guard``, the
    weighted forget guard on the forget rows; ``module`` is left in eval mode."""
    x, y = data
    module.train()
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    for rows, frows in batches:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(x[rows]), y[rows])
        if guard is not None:
            loss = loss + cfg.forget_weight * forget_guard_loss(module(guard[0][frows]), guard[1][frows])
        loss.backward()
        opt.step()
    module.eval()


def _head_steps(model: torch.nn.Module, weights: Weights, data: tuple[Tensor, Tensor],
                guard: tuple[Tensor, Tensor] | None, batches: Sequence[tuple[Tensor, Tensor | None]],
                cfg: RepairConfig, cache: FeatureCache | None) -> dict[str, Tensor]:
    """:func:`repair_steps` for ``cfg.part="head"``: the body runs once over the rows the ``batches`` use (over all
    rows, kept in ``cache``, when one is given), and the steps train the head on those features."""
    head = _Head(model, weights)

    def features(x: Tensor, used: list[Tensor]) -> Tensor:
        return cache.features(head, x) if cache is not None else head.rows_features(x, torch.cat(used))

    kept = (features(data[0], [r for r, _ in batches]), data[1])
    guard_feats = (features(guard[0], [f for _, f in batches]), guard[1]) if guard is not None else None
    head.module.load_state_dict(head.weights)
    _sgd_steps(head.module, list(head.module.parameters()), kept, guard_feats, batches, cfg)
    return head.merged({k: v.detach().clone() for k, v in head.module.named_parameters()})


class FeatureCache:
    """The body's features of rows, by the body's weights and the rows, for head repairs that meet both again.

    The App's round-trip repair (``train.repair``) sends a model to every client each round and only its head
    changes between rounds, so a client that keeps one of these runs the body over its rows in the first round
    only. Keys are digests of the body's tensors and of the rows, so a changed body or other rows never hit; at
    most ``size`` entries are kept, the least recently used dropped first.
    """

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._entries: dict[tuple[str, str], Tensor] = {}
        self.hits = self.misses = 0

    def features(self, head: _Head, x: Tensor) -> Tensor:
        key = (head.body_digest(), _tensor_digest(x))
        feats = self._entries.pop(key, None)
        if feats is None:
            self.misses += 1
            feats = head.body_of(x)
        else:
            self.hits += 1
        self._entries[key] = feats  # most recently used last
        while len(self._entries) > self.size:
            self._entries.pop(next(iter(self._entries)))
        return feats


def head_scores(model: torch.nn.Module, weights: Weights, *datas: tuple[Tensor, Tensor] | None,
                cache: FeatureCache | None = None) -> list[tuple[float, int, float]]:
    """Per row set ``(x, y)``, ``(summed cross-entropy, correct predictions, summed forget guard)`` of ``model``
    with ``weights``, from one pass of the head over the body's features (kept in ``cache`` when given): what a
    client of a head repair reports on its held-back rows each round, the body run over them once per repair.
    Zeros for ``None`` or no rows."""
    head = _Head(model, weights)
    out = []
    for data in datas:
        if data is None or len(data[1]) == 0:
            out.append((0.0, 0, 0.0))
            continue
        logits = head.logits(data[0], cache)
        out.append((float(torch.nn.functional.cross_entropy(logits, data[1], reduction="sum")),
                    int((logits.argmax(1) == data[1]).sum()), float(forget_guard_loss(logits, data[1], "sum"))))
    return out


def _tensor_digest(t: Tensor) -> str:
    """A digest of a tensor's bytes, shape and dtype (any dtype: the bytes are read as ``uint8``)."""
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return hashlib.blake2b(data.numpy().tobytes() + repr((tuple(t.shape), str(t.dtype))).encode(),
                           digest_size=16).hexdigest()


def weighted_average(updates: Sequence[Mapping[str, Tensor]], sizes: Sequence[int]) -> dict[str, Tensor]:
    """FedAvg: the ``sizes``-weighted mean of ``updates`` (float64 sums, original dtypes)."""
    total = float(sum(sizes))
    return {k: sum(u[k].double() * (n / total) for u, n in zip(updates, sizes)).to(updates[0][k].dtype)
            for k in updates[0]}


@torch.no_grad()
def loss_sum(model: torch.nn.Module, weights: Weights, x: Tensor, y: Tensor) -> float:
    """Summed cross-entropy of ``model`` with ``weights`` on ``(x, y)`` (0 for no rows)."""
    if len(y) == 0:
        return 0.0
    logits = torch.func.functional_call(model, dict(weights), (x,))
    return float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))


@torch.no_grad()
def guard_sum(model: torch.nn.Module, weights: Weights, x: Tensor, y: Tensor) -> float:
    """Summed forget guard (:func:`forget_guard_loss`) of ``model`` with ``weights`` on ``(x, y)`` (0 for no rows)."""
    if len(y) == 0:
        return 0.0
    return float(forget_guard_loss(torch.func.functional_call(model, dict(weights), (x,)), y, "sum"))


@torch.no_grad()
def _guard_val_loss(model: torch.nn.Module, weights: Weights, forget_splits) -> float:
    """Mean forget guard (:func:`forget_guard_loss`) over the held-back forget rows of every client (0 without)."""
    held_back = [split[1] for split in forget_splits if split is not None]
    return sum(guard_sum(model, weights, x, y) for x, y in held_back) / max(sum(len(y) for _, y in held_back), 1)


@torch.no_grad()
def _val_loss(model: torch.nn.Module, weights: Weights, splits) -> float:
    """Mean cross-entropy (:func:`loss_sum`) over the held-back kept rows of every client (0 without)."""
    held_back = [split[1] for split in splits]
    return sum(loss_sum(model, weights, x, y) for x, y in held_back) / max(sum(len(y) for _, y in held_back), 1)


# ------------------------------------------------------------------------------------------------------
# Calibration where the data lives: every client scores the whole alpha grid once, the server sums counts
# ------------------------------------------------------------------------------------------------------


#: Dampening constants the client-side grid tries with every alpha: 1 (the paper's factor ``F_D / F_f``) and 0
#: (zero every selected weight). Measured on MNIST (4 IID clients, 3 rounds, all layers): class 5 kept 50-55 %
#: of its held-out accuracy at every alpha with lambda = 1; zeroing at alpha 2 forgot it (0.8 %), at a kept-accuracy
#: cost that a short repair on kept data (:func:`repair`) wins back (98.1 % after 32 steps) without bringing it back.
DEFAULT_LAMS: tuple[float, ...] = (1.0, 0.0)
#: Alphas of the client-side grid: 0.5 .. 512 in factors of sqrt(2), as :data:`DEFAULT_ALPHAS`. Factors of 2 were
#: too coarse (MNIST, class 5: alpha 2 at lambda 0 forgot it and kept 92.8 % held out, alpha 4 forgot nothing;
#: alpha 2.83 forgets it and keeps 98.3 %). Each candidate costs the clients forward passes, but they walk each
#: lambda only up to the first alpha that keeps too much: 7-16 candidates scored per client instead of 5-9, +0.015
#: to 0.035 s per client on the small CNN.
GRID_ALPHAS: tuple[float, ...] = DEFAULT_ALPHAS


def candidate_grid(alphas: Sequence[float] = GRID_ALPHAS,
                   lams: Sequence[float] = DEFAULT_LAMS) -> tuple[tuple[float, float], ...]:
    """Every ``(alpha, lam)`` pair, strongest dampening first (smaller lambda, then smaller alpha).

    Examples
    --------
    >>> candidate_grid((1.0, 4.0), (1.0, 0.0))
    ((1.0, 0.0), (4.0, 0.0), (1.0, 1.0), (4.0, 1.0))
    """
    if not alphas or not lams or any(a < 0 for a in alphas) or any(v < 0 for v in lams):
        raise ConfigError(f"the grid needs alphas >= 0 and lambdas >= 0, got {list(alphas)} and {list(lams)}")
    return tuple((float(a), float(v)) for v in sorted(set(lams)) for a in sorted(set(alphas)))


#: A candidate a client did not score (``score_alpha_grid(stop_when_kept=True)`` skipped it).
UNSCORED = -1
#: The kept loss of a candidate a client did not score (losses are >= 0).
UNSCORED_LOSS = -1.0
#: Kept losses this close (relative) to the lowest count as equal in :func:`choose_candidate`'s near ties.
LOSS_RTOL = 1e-6


@dataclass
class GridCounts:
    """Correct predictions per candidate on one client's calibration samples (or summed over clients).

    Counts, not accuracies, so clients' replies add up exactly: the server's choice is the one a single party
    holding all calibration samples would make. :data:`UNSCORED` marks a candidate a client skipped; a sum with
    one is unscored, and :func:`choose_candidate` never picks it.

    Attributes
    ----------
    candidates : tuple[tuple[float, float], ...]
        ``(alpha, lam)`` pairs, strongest dampening first (:func:`candidate_grid`).
    forget_correct, retain_correct : list[int]
        Per candidate: correct predictions on the forget / kept calibration samples (or ``UNSCORED``).
    forget_num, retain_num : int
        Calibration samples of each kind.
    retain_loss : list[float] | None (default: None)
        Per candidate: the summed cross-entropy on the kept calibration samples (or ``UNSCORED_LOSS``); ``None``
        where a client did not send it. It breaks near ties in kept counts (:func:`choose_candidate`).
    """

    candidates: tuple[tuple[float, float], ...]
    forget_correct: list[int]
    retain_correct: list[int]
    forget_num: int = 0
    retain_num: int = 0
    retain_loss: list[float] | None = None

    def __add__(self, other: GridCounts) -> GridCounts:
        if tuple(other.candidates) != tuple(self.candidates):
            raise ConfigError("calibration counts over different candidate grids cannot be added")

        def add(a: int, b: int) -> int:
            return UNSCORED if UNSCORED in (a, b) else a + b

        def add_loss(a: float, b: float) -> float:
            return UNSCORED_LOSS if UNSCORED_LOSS in (a, b) else a + b

        mine, theirs = self._losses(), other._losses()
        losses = None if mine is None or theirs is None else [add_loss(a, b) for a, b in zip(mine, theirs)]
        return GridCounts(self.candidates, [add(a, b) for a, b in zip(self.forget_correct, other.forget_correct)],
                          [add(a, b) for a, b in zip(self.retain_correct, other.retain_correct)],
                          self.forget_num + other.forget_num, self.retain_num + other.retain_num, losses)

    def _losses(self) -> list[float] | None:
        """The kept losses; zeros for counts without kept samples (a sum's start, a client with none)."""
        if self.retain_loss is not None:
            return list(self.retain_loss)
        return [0.0] * len(self.candidates) if self.retain_num == 0 else None

    def scored(self) -> list[bool]:
        """Per candidate: whether every client scored it."""
        return [UNSCORED not in (f, r) for f, r in zip(self.forget_correct, self.retain_correct)]

    def accuracies(self) -> tuple[list[float | None], list[float | None]]:
        """Per candidate: (forget accuracy, kept accuracy); NaN where there were no samples of that kind,
        ``None`` where a client did not score it."""
        def acc(correct: list[int], n: int) -> list[float | None]:
            return [None if c == UNSCORED else c / n if n else float("nan") for c in correct]

        return acc(self.forget_correct, self.forget_num), acc(self.retain_correct, self.retain_num)


def score_alpha_grid(
    model: torch.nn.Module,
    weights: Weights,
    retain_fisher: Mapping[str, Tensor],
    forget_fisher: Mapping[str, Tensor],
    forget_set: tuple[Tensor, Tensor] | None,
    retain_set: tuple[Tensor, Tensor] | None,
    *,
    base: FIUnConfig = FIUnConfig(),
    candidates: Sequence[tuple[float, float]] | None = None,
    stop_when_kept: bool = False,
    keep_budget: int = 0,
) -> GridCounts:
    """Dampen ``weights`` at every ``(alpha, lam)`` candidate (scale-free Fishers) and count correct predictions.

    What a client runs for ``query.calibrate``: a handful of forward passes per candidate on its own samples.
    ``forget_set`` is ``None`` (or empty) at clients that hold no data to forget; ``retain_set`` likewise.
    ``candidates`` defaults to :func:`candidate_grid`; ``base`` supplies the other settings (exponent, cap, tau).

    ``stop_when_kept`` (a class request): per lambda, the alphas are walked strongest first and the walk stops
    after the first candidate that still predicts more than ``keep_budget`` of ``forget_set`` (the federation's
    budget: a client over it puts the sum over it); the milder alphas after it are :data:`UNSCORED`. A milder
    alpha selects a subset of the weights, so (as the per-model check also assumes) it keeps those samples too
    and cannot meet the target: the federation's choice is the one the full grid gives, for fewer forward
    passes (the App's MNIST class 3: 13 of 42 candidates per client). Clients without forget samples score
    everything.

    Candidates that zero more than half of a weight tensor (:meth:`~fl_unlearn.fiun.FisherSweep.breaks_a_weight`,
    the per-model checks' guard) are :data:`UNSCORED`: they forget by breaking the model, and are never chosen. Until
    2026-12-07 the grid left out only those that zero a whole tensor and scored the rest, where they lost on kept
    samples: the App's ten MNIST classes and ``benchmarks/robustness.py`` (MNIST and digits) chose the same either
    way, and each client of the App scores 1-3 fewer of its 7-21 candidates. A candidate that changes the same
    weights as the one scored before it at its lambda (:meth:`~fl_unlearn.fiun.AlphaSweep.effective_alpha`: at
    lambda 1 every alpha below 1 also selects weights with ``F_f <= F_D``, whose factor is 1) gets its scores
    without a forward pass: the dampened weights are bit-identical.
    """
    grid = tuple(candidates) if candidates is not None else candidate_grid()
    retain, forget = scale_free(retain_fisher), scale_free(forget_fisher)
    walk = stop_when_kept and _size(forget_set) > 0
    f_correct, r_correct, r_loss = [], [], []
    stopped: set[float] = set()  # lambdas whose walk has stopped
    sweeps: dict[float, AlphaSweep] = {}  # per lambda: the factors once, a selection per alpha
    last: dict[float, tuple[float, tuple[int, int, float]]] = {}  # per lambda: the last effective alpha, its scores
    model = model.eval()
    for alpha, lam in grid:
        if lam in stopped:
            f_correct.append(UNSCORED)
            r_correct.append(UNSCORED)
            r_loss.append(UNSCORED_LOSS)
            continue
        if lam not in sweeps:
            sweeps[lam] = AlphaSweep(weights, retain, forget, replace(base, lam=lam))
        if sweeps[lam].breaks_a_weight(alpha):  # never used (it forgets by breaking the model): not scored
            f_correct.append(UNSCORED)
            r_correct.append(UNSCORED)
            r_loss.append(UNSCORED_LOSS)
            continue
        effective = sweeps[lam].effective_alpha(alpha)
        if lam in last and last[lam][0] == effective:
            f, r, loss = last[lam][1]  # the same weights change (lambda 1, alphas up to 1): the same scores
        else:
            f, r, loss = score_split(model, sweeps[lam].at(alpha), forget_set, retain_set)
        last[lam] = (effective, (f, r, loss))
        f_correct.append(f)
        r_correct.append(r)
        r_loss.append(loss)
        if walk and f > keep_budget:
            stopped.add(lam)
    return GridCounts(grid, f_correct, r_correct, _size(forget_set), _size(retain_set), r_loss)


def choose_candidate(counts: GridCounts, forget_target: float, *, kept_margin: int = 0,
                     change: Callable[[float, float], float] | None = None) -> tuple[float, float, bool]:
    """``(alpha, lam, target_met)``: the best kept accuracy among candidates that forget down to the target.

    Ties go to the milder (later) candidate. When none meets the target, the one that forgets most (then keeps
    most) is returned with ``False``. Unscored candidates are never chosen. The same rule as
    :func:`calibrate_alpha`, over a full grid.

    With ``kept_margin``, candidates that meet the target and keep within ``kept_margin`` samples of the best
    count as keeping as much; among them the one that predicts fewest forget samples wins, then the one with the
    lowest kept loss (``counts.retain_loss``, where every client sent it), else the one that changes the model
    least (``change(alpha, lam)``, e.g. :func:`dampening_change`). A few dozen kept samples per client cannot
    tell 127 of 128 from 128, and the stronger candidate that scored one more often keeps less on held-out data
    (MNIST class 5: alpha 2 at lambda 0 kept 128 of 128 calibration samples and 96.8 % held out; alpha 4 at
    lambda 1, 127 and 98.6 %). Fewest forget samples first: going by the loss or the change alone goes to the
    edge of the tolerance, and on digits class 0 the candidate that kept 1 of 149 forget samples also kept 1 of
    29 held out (3.4 %). The loss before the change: kept accuracy on training samples saturates where the
    loss still tells the candidates apart (digits, every class: worst kept gap to retraining 3.0 points instead
    of 4.2; on MNIST the same choices).

    Examples
    --------
    >>> counts = GridCounts(((2.0, 0.0), (4.0, 1.0)), [0, 0], [128, 127], 256, 128)
    >>> choose_candidate(counts, 0.0)
    (2.0, 0.0, True)
    >>> choose_candidate(counts, 0.0, kept_margin=1, change=lambda alpha, lam: 1.0 / alpha)
    (4.0, 1.0, True)
    >>> counts.retain_loss = [3.0, 5.0]
    >>> choose_candidate(counts, 0.0, kept_margin=1)
    (2.0, 0.0, True)
    """
    if kept_margin < 0:
        raise ConfigError(f"kept_margin must be >= 0, got {kept_margin!r}")
    f_acc, r_acc = counts.accuracies()
    best: Candidate | None = None
    best_pair = (0.0, 0.0)
    for pair, f, r in zip(counts.candidates, f_acc, r_acc):
        if f is None or r is None:  # a client skipped it: it keeps a forget sample there
            continue
        cand = Candidate(pair[0], 0.0 if f != f else f, 0.0 if r != r else r, {}, DampenStats())
        if cand.beats(best, forget_target):
            best, best_pair = cand, pair
    if best is None:
        raise ConfigError("choose_candidate needs a grid with at least one scored candidate")
    met = best.forget_acc <= forget_target
    if met and kept_margin and (counts.retain_loss is not None or change is not None):
        best_pair = _near_tie(counts, forget_target, best_pair, kept_margin, change)
    return best_pair[0], best_pair[1], met


def _near_tie(counts: GridCounts, forget_target: float, best_pair: tuple[float, float], kept_margin: int,
              change: Callable[[float, float], float] | None) -> tuple[float, float]:
    """Among the scored candidates that meet ``forget_target`` and keep at least the best's kept count minus
    ``kept_margin``: the fewest forget samples predicted, then the lowest kept loss (with ``counts.retain_loss``)
    or else the smallest ``change``, then the later, milder one."""
    f_acc, _ = counts.accuracies()
    floor = counts.retain_correct[counts.candidates.index(best_pair)] - kept_margin
    near = [(i, pair, forget) for i, (pair, f, ok, forget, kept) in enumerate(zip(
                counts.candidates, f_acc, counts.scored(), counts.forget_correct, counts.retain_correct))
            if ok and (0.0 if f != f else f) <= forget_target and kept >= floor]
    fewest_forget = min(forget for _, _, forget in near)
    fewest = [(i, pair) for i, pair, forget in near if forget == fewest_forget]
    losses = counts.retain_loss
    if losses is None:
        return min((change(*pair), -i, pair) for i, pair in fewest)[2]  # type: ignore[misc]
    # Losses within LOSS_RTOL of the lowest are equal: a rescaled Fisher moves the dampened weights by rounding
    # only, and must not move the choice (issue 9's scale invariance); the milder candidate wins those ties.
    lowest = min(losses[i] for i, _ in fewest)
    return max((i, pair) for i, pair in fewest if losses[i] <= lowest * (1 + LOSS_RTOL))[1]


def dampening_change(weights: Weights, retain_fisher: Mapping[str, Tensor], forget_fisher: Mapping[str, Tensor],
                     base: FIUnConfig = FIUnConfig()) -> Callable[[float, float], float]:
    """``change(alpha, lam)``: the L2 distance between ``weights`` and the weights dampened at that candidate
    (scale-free Fishers, ``base`` for the other settings), for :func:`choose_candidate`.

    Computed on demand (one :class:`~fl_unlearn.fiun.AlphaSweep` per lambda, kept), since only the few
    candidates near the best are asked for.
    """
    retain, forget = scale_free(retain_fisher), scale_free(forget_fisher)
    sweeps: dict[float, AlphaSweep] = {}

    def change(alpha: float, lam: float) -> float:
        if lam not in sweeps:
            sweeps[lam] = AlphaSweep(weights, retain, forget, replace(base, lam=lam))
        dampened = sweeps[lam].at(alpha)
        return float(sum(float(((dampened[k].double() - weights[k].double()) ** 2).sum()) for k in forget)) ** 0.5

    return change


def _size(data: tuple[Tensor, Tensor] | None) -> int:
    return 0 if data is None else int(len(data[1]))


def _predict(model: torch.nn.Module, weights: Weights, x: Tensor) -> Tensor:
    """Predicted classes of ``model`` with ``weights`` on ``x`` (:func:`_logits`, arg-max)."""
    return _logits(model, weights, x).argmax(1)


def _logits(model: torch.nn.Module, weights: Weights, x: Tensor) -> Tensor:
    """Outputs of ``model`` with ``weights`` on ``x``.

    The calibration and the per-model checks are little else but these forward passes. On CPU the convolution
    weights go channels-last, a layout oneDNN's convolutions and max-pooling keep (0.8-0.9x the time for the
    small CNN at one thread; ResNet-18 unchanged), and so does the input of every ``MaxPool2d``: after a
    one-channel input the first convolution cannot tell the layouts apart and stays NCHW, where max-pooling is
    ten times slower (the CNN's forward pass 0.55-0.7x again). Predictions agree with the plain pass.
    """
    if x.device.type != "cpu":
        return torch.func.functional_call(model, dict(weights), (x,))
    weights = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in weights.items()}
    hooks = [m.register_forward_pre_hook(_channels_last_input) for m in model.modules()
             if isinstance(m, torch.nn.MaxPool2d)]
    try:
        return torch.func.functional_call(model, weights, (x,))
    finally:
        for hook in hooks:
            hook.remove()


def _channels_last_input(module: torch.nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: a 4-D multi-channel NCHW input as channels-last (same values, another layout)."""
    x = args[0]
    if isinstance(x, Tensor) and x.dim() == 4 and x.shape[1] > 1 \
            and not x.is_contiguous(memory_format=torch.channels_last):
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return None


@torch.no_grad()
def count_correct(model: torch.nn.Module, weights: Weights, data: tuple[Tensor, Tensor] | None) -> int:
    """Correct predictions of ``model`` with ``weights`` on ``(x, y)`` (0 for ``None`` or no rows)."""
    if data is None or len(data[1]) == 0:
        return 0
    return int((_predict(model, weights, data[0]) == data[1]).sum())


#: Rows :func:`count_kept` scores before the rest: a model that still knows the class is usually caught there.
FIRST_ROWS = 8


@torch.no_grad()
def count_kept(model: torch.nn.Module, weights: Weights, data: tuple[Tensor, Tensor], budget: int = 0) -> int:
    """Correct predictions of ``model`` with ``weights`` on ``data``, counted up to ``budget + 1``: ``budget + 1``
    means more than ``budget`` (``count_correct``'s figure where it is at most ``budget``).

    The checks' question. The first :data:`FIRST_ROWS` rows go first, and more than ``budget`` correct predictions
    there answer without the rest: the steps of a walk that do not forget yet cost a quarter of their forward pass.
    """
    x, y = data
    kept = 0
    for rows in (slice(0, FIRST_ROWS), slice(FIRST_ROWS, None)):
        if len(y[rows]):
            kept += int((_predict(model, weights, x[rows]) == y[rows]).sum())
            if kept > budget:
                return budget + 1
    return kept


@torch.no_grad()
def score_split(model: torch.nn.Module, weights: Weights, forget_set: tuple[Tensor, Tensor] | None,
                retain_set: tuple[Tensor, Tensor] | None) -> tuple[int, int, float]:
    """``(forget correct, kept correct, kept loss)`` with one forward pass over both sets: the correct predictions
    on each and the summed cross-entropy of the kept samples (0.0 without any).

    The loss is what the near ties of :func:`choose_candidate` are broken by: accuracy on training samples
    saturates (digits class 0: 121, 121 and 120 of 128 kept samples for candidates keeping 90.6 %, 91.8 % and
    93.1 % held out), where the kept loss still falls as held-out accuracy rises (26.4, 23.0, 19.9).
    """
    parts = [d for d in (forget_set, retain_set) if d is not None and len(d[1])]
    if not parts:
        return 0, 0, 0.0
    logits = _logits(model, weights, torch.cat([x for x, _ in parts]))
    y = torch.cat([t for _, t in parts])
    hits = logits.argmax(1) == y
    n = _size(forget_set)
    kept = slice(n, None)
    loss = float(torch.nn.functional.cross_entropy(logits[kept].double(), y[kept], reduction="sum")) \
        if len(y) > n else 0.0
    return int(hits[:n].sum()), int(hits[kept].sum()), loss


@torch.no_grad()
def count_correct_split(model: torch.nn.Module, weights: Weights, forget_set: tuple[Tensor, Tensor] | None,
                        retain_set: tuple[Tensor, Tensor] | None) -> tuple[int, int]:
    """``(forget correct, kept correct)`` with one forward pass over both sets (the same counts as two
    :func:`count_correct` calls; one pass halves the per-call cost of small calibration batches): the counts of
    :func:`score_split`."""
    forget_correct, kept_correct, _ = score_split(model, weights, forget_set, retain_set)
    return forget_correct, kept_correct


# ------------------------------------------------------------------------------------------------------
# Every affected model forgets: a per-model check of the chosen dampening, for class requests
# ------------------------------------------------------------------------------------------------------


def check_sequence(alpha: float, lam: float, alphas: Sequence[float] = GRID_ALPHAS,
                   lams: Sequence[float] = DEFAULT_LAMS) -> list[tuple[float, float]]:
    """The candidates at least as strong as ``(alpha, lam)``, mildest first: the chosen one, smaller alphas at the
    same lambda, then every alpha up to ``alpha`` at each smaller lambda (lambda 0 zeroes the selected weights).

    Examples
    --------
    >>> check_sequence(4.0, 1.0, (1.0, 2.0, 4.0, 8.0), (1.0, 0.0))
    [(4.0, 1.0), (2.0, 1.0), (1.0, 1.0), (4.0, 0.0), (2.0, 0.0), (1.0, 0.0)]
    """
    steps = sorted({float(a) for a in alphas if a <= alpha} | {float(alpha)}, reverse=True)
    return [(a, v) for v in sorted({float(x) for x in lams if x <= lam} | {float(lam)}, reverse=True) for a in steps]


#: A step of a check walk that a holder did not take: it had forgotten every one of its samples at a milder step,
#: and, dampening being monotone along the sequence, counts as forgetting them here too.
NOT_WALKED = -2


def check_models(
    model: torch.nn.Module,
    models: Sequence[Weights],
    retain_fisher: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]],
    forget_fishers: Sequence[Mapping[str, Tensor]],
    forget_set: tuple[Tensor, Tensor],
    sequence: Sequence[tuple[float, float]],
    *,
    base: FIUnConfig = FIUnConfig(),
    budget: int = 0,
) -> list[list[int]]:
    """Per model and step of ``sequence``: how many samples of ``forget_set`` the dampened model still predicts.

    What a client holding data to forget runs for the other affected models of a class request: the choice was
    scored on the newest global model only, and an early model can keep a class at the same alpha. ``sequence``
    is :func:`check_sequence` of the federation's choice (mildest first). Each model walks it until it predicts
    none of the samples; a model that already forgets at the choice costs one forward pass. Counts stop at
    ``budget + 1`` (the federation's budget: a holder over it puts the sum over it, :func:`count_kept`); steps
    after the walk stopped are :data:`NOT_WALKED`, and candidates that zero more than half of a weight tensor of
    the model (:meth:`~fl_unlearn.fiun.FisherSweep.breaks_a_weight`) :data:`UNSCORED`. The holders' counts add up
    (:func:`first_within`). Fishers are made scale-free here, as for the final dampening.

    Parameters
    ----------
    model : torch.nn.Module
        The architecture (weights come from ``models``).
    models : sequence of dict
        The models to check.
    retain_fisher : dict or sequence of dict
        The retain-Fisher every model is dampened with, or one per model.
    forget_fishers : sequence of dict
        One forget-Fisher per model (the MFIM merge that model gets).
    forget_set : tuple of Tensor
        ``(x, y)`` of this client's forget samples.
    sequence : sequence of (alpha, lambda)
        The candidates to walk, mildest first.
    base : FIUnConfig
        The other dampening settings.
    budget : int (default: 0)
        Forget samples the federation lets a model keep (:meth:`ClientCalibration.check_budget`); counts above it
        are not needed exactly.

    Returns
    -------
    list of list of int
        Per model, one entry per step of ``sequence``.
    """
    sweeps = _Sweeps("check_models", models, retain_fisher, forget_fishers, base)
    model = model.eval()
    counts: list[list[int]] = []
    for m, weights in enumerate(models):
        row, damped = [NOT_WALKED] * len(sequence), {}  # per lambda of the sequence: this model's dampened values
        for i, (alpha, lam) in enumerate(sequence):
            sweep = sweeps.of(m, lam)
            if sweep.breaks_a_weight(alpha):  # it would forget by breaking the model: never used
                row[i] = UNSCORED
                continue
            if lam not in damped:
                damped[lam] = sweep.damped(weights)
            row[i] = count_kept(model, sweep.at(weights, damped[lam], alpha), forget_set, budget)
            if row[i] == 0:
                break
        counts.append(row)
    return counts


def first_within(reports: Sequence[Sequence[int]], budget: int = 0) -> int:
    """The first step at which the holders' :func:`check_models` counts of one model add up to at most ``budget``
    (:data:`NOT_WALKED` counting 0; a step any holder left :data:`UNSCORED` is never taken); -1 if none does.

    With ``budget`` 0 this is the strongest of the holders' first forgetting steps (each holder forgot everything
    there or earlier). The budget is the choice's own (the forget tolerance of the scored samples): the newest
    global model may keep 3 % of the calibration's forget samples, and until 2026-12-06 every other model had to
    keep none of the check's. On the App's MNIST class 9, ``local-r1-p3`` kept 1 of the 128 samples at the choice
    and 25 at the next stronger candidate, so it took a forget-Fisher of its own (two more round trips).

    Examples
    --------
    >>> first_within([[3, 0, NOT_WALKED], [1, 1, 0]])
    2
    >>> first_within([[3, 0, NOT_WALKED], [1, 1, 0]], budget=1)
    1
    >>> first_within([[2, UNSCORED, 1]], budget=1)
    2
    >>> first_within([[2, 2]], budget=1)
    -1
    """
    steps = {len(r) for r in reports}
    if len(steps) > 1:
        raise ConfigError(f"first_within: reports of different lengths {sorted(steps)}")
    for i in range(steps.pop() if steps else 0):
        column = [r[i] for r in reports]
        if UNSCORED not in column and sum(max(c, 0) for c in column) <= budget:
            return i
    return -1


class _Sweeps:
    """The checks' dampening: per model, its scale-free Fishers validated as
    :func:`~fl_unlearn.fiun.unlearn_many` would (:func:`~fl_unlearn.fiun.check_many`), and one
    :class:`~fl_unlearn.fiun.FisherSweep` per distinct Fisher pair and lambda, shared by the models that use the
    pair (the App's 14 check models share one retain-Fisher and a few forget-Fishers): the factors and each
    alpha's selection are computed once for all of them."""

    def __init__(self, what: str, models: Sequence[Weights],
                 retain_fisher: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]],
                 forget_fishers: Sequence[Mapping[str, Tensor]], base: FIUnConfig) -> None:
        self.retains, self.forgets = _scale_free_per_model(what, len(models), retain_fisher, forget_fishers)
        check_many(models, self.retains, self.forgets)
        self._like, self._base = models[0], base
        self._sweeps: dict[tuple[int, int, float], FisherSweep] = {}

    def of(self, model: int, lam: float) -> FisherSweep:
        """The sweep of ``model``'s Fisher pair at ``lam``."""
        retain, forget = self.retains[model], self.forgets[model]
        key = (id(retain), id(forget), lam)
        if key not in self._sweeps:
            self._sweeps[key] = FisherSweep(retain, forget, replace(self._base, lam=lam), like=self._like)
        return self._sweeps[key]


def _scale_free_per_model(what: str, n: int, retain_fisher: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]],
                          forget_fishers: Sequence[Mapping[str, Tensor]]) -> tuple[list[dict[str, Tensor]],
                                                                                   list[dict[str, Tensor]]]:
    """Per model: its scale-free retain- and forget-Fisher (``retain_fisher``: one for all, or one per model). A
    Fisher shared by several models is normalised once and stays one object (``unlearn_many`` broadcasts it)."""
    retains = [retain_fisher] * n if isinstance(retain_fisher, Mapping) else list(retain_fisher)
    if len(forget_fishers) != n or len(retains) != n:
        raise ConfigError(f"{what}: {n} models but {len(retains)} retain-Fishers and "
                          f"{len(forget_fishers)} forget-Fishers")
    normalised: dict[int, dict[str, Tensor]] = {}
    return scale_free_each(retains, normalised), scale_free_each(forget_fishers, normalised)


def per_model_candidate(sequence: Sequence[tuple[float, float]], reports: Sequence[Sequence[int]],
                        fallback: int = -1, *, budget: int = 0) -> tuple[tuple[float, float], bool]:
    """One model's ``(alpha, lambda)`` from the holders' :func:`check_models` counts, and whether it forgets.

    The mildest step at which the counts add up to at most ``budget`` (:func:`first_within`), never milder than
    the choice (``sequence[0]``). Where no step does, ``sequence[fallback]`` (the strongest candidate, or
    :func:`strongest_usable`) and ``met=False``.

    Examples
    --------
    >>> seq = [(4.0, 1.0), (2.0, 1.0), (4.0, 0.0)]
    >>> per_model_candidate(seq, [[0, NOT_WALKED, NOT_WALKED], [3, 0, NOT_WALKED]])
    ((2.0, 1.0), True)
    >>> per_model_candidate(seq, [[0, NOT_WALKED, NOT_WALKED], [1, 1, 1]], budget=1)
    ((4.0, 1.0), True)
    >>> per_model_candidate(seq, [[0, NOT_WALKED, NOT_WALKED], [5, 5, 5]])
    ((4.0, 0.0), False)
    """
    index = first_within(reports, budget)
    if index < 0:
        return tuple(sequence[fallback]), False
    return tuple(sequence[index]), True


def strongest_usable(sequence: Sequence[tuple[float, float]], weights: Weights, retain_fisher: Mapping[str, Tensor],
                     forget_fisher: Mapping[str, Tensor], base: FIUnConfig = FIUnConfig()) -> int:
    """The index of the strongest candidate of ``sequence`` that zeroes no more than half of any weight tensor of a
    model with these Fishers (scale-free here; :meth:`~fl_unlearn.fiun.FisherSweep.breaks_a_weight`): where a model
    no candidate makes forget is dampened. 0 (the choice) if every candidate breaks one."""
    sweeps = _Sweeps("strongest_usable", [weights], retain_fisher, [forget_fisher], base)
    usable = [i for i, (alpha, lam) in enumerate(sequence) if not sweeps.of(0, lam).breaks_a_weight(alpha)]
    return usable[-1] if usable else 0


def unlearn_with_candidates(
    models: Sequence[Weights],
    retain_fishers: Sequence[Mapping[str, Tensor]],
    forget_fishers: Sequence[Mapping[str, Tensor]],
    cfg: FIUnConfig,
    candidates: Sequence[tuple[float, float]],
) -> tuple[list[dict[str, Tensor]], list[DampenStats]]:
    """:func:`~fl_unlearn.fiun.unlearn_many` once per distinct ``(alpha, lambda)`` (the per-model check gives some
    models a stronger one than the rest); results in input order, each as ``unlearn_many`` gives it."""
    if not (len(models) == len(retain_fishers) == len(forget_fishers) == len(candidates)):
        raise ConfigError(f"unlearn_with_candidates: {len(models)} models, {len(retain_fishers)} retain-Fishers, "
                          f"{len(forget_fishers)} forget-Fishers and {len(candidates)} candidates")
    check_many(models, retain_fishers, forget_fishers)  # once for all, not once per candidate's group
    weights: list[dict[str, Tensor] | None] = [None] * len(models)
    stats: list[DampenStats | None] = [None] * len(models)
    for alpha, lam in sorted(set(candidates)):
        idx = [i for i, c in enumerate(candidates) if c == (alpha, lam)]
        out, st = unlearn_many([models[i] for i in idx], [retain_fishers[i] for i in idx],
                               [forget_fishers[i] for i in idx], replace(cfg, alpha=float(alpha), lam=float(lam)),
                               check_fishers=False)
        for i, w, one in zip(idx, out, st):
            weights[i], stats[i] = w, one
    return weights, stats  # type: ignore[return-value]

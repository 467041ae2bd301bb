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

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from fl_unlearn.errors import ConfigError
from fl_unlearn.fiun import DampenStats, FIUnConfig, unlearn_many

logger = logging.getLogger(__name__)

Weights = Mapping[str, Tensor]
#: ``score(model_index, candidate_weights) -> (forget_acc, retain_acc)`` on the caller's calibration sets.
Scorer = Callable[[int, Weights], tuple[float, float]]

#: Alphas tried, from the strongest dampening to the mildest (on mean-normalised Fishers).
DEFAULT_ALPHAS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)


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

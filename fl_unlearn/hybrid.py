"""The hybrid planner: estimate the exact path's workload, pick exact or approximate per shard, run it.

``reference/hybrid.md`` §3-§5. Per touched shard ``s`` of a sample-level (or client-level) revocation X:

- **Workload** of the exact path, in sample-gradient evaluations (one forward + backward of one sample)::

      W_s(r0) = sum_{r=r0..R} T_r * E * sum_k n_{k,s,<=r}          r0 = min(r*, d_s)   (pitfall P1)

  with ``n_{k,s,<=r}`` client k's kept samples of shard s in slices 1..r *after* removing X (exact counts,
  not the equal-slice approximation ``f_R(j) = 1 - (j-1) j / (R (R+1))``).
- **Seconds**: per training round the federation logs ``g`` (evaluations over all clients) and its wall time
  ``t`` (configure to checkpoint written); :func:`fit_throughput` fits ``t = a + b g`` by least squares,
  skipping the warm-up round, and ``T_exact = sum over rerun rounds of (a + b g)``.
- **Decision** (``policy="auto"``): exact iff ``W_s(r0) <= rho * W_s(1)``, ``rho = budget_fraction``, i.e. a
  fraction of what training shard s from scratch costs. ``policy`` ``exact`` / ``approximate`` force a path.
  Shards decide independently; a plan whose shards disagree is ``mixed``.

  **Default** ``rho = 0.6`` (:data:`DEFAULT_BUDGET`). With equal slices and constant ``T``, revoking in slice
  ``j`` costs ``f_R(j)`` of a full shard: the first slice always costs 1 (> rho: approximate) and the last
  ``2/(R+1)``: 0.5 for R=3, 0.4 for R=4, 0.33 for R=5 (<= rho: exact) for every ``R >= 3``, with room for
  the few percent by which hashed slices are unequal. (hybrid.md's 0.5 puts R=3's last slice exactly on the
  boundary, where slice-size noise decides.) R=2 needs ``rho >= 2/3``, R=1 has no exact path below 1.
  Client-level requests touch slice 1 of every shard and so go approximate unless ``rho >= 1``.
- **Approximate path**: FIUn with ``alpha="auto"`` (:func:`fl_unlearn.calibrate.calibrate_alpha`) on the
  served shard-models of the approximate shards, all in one calibration. Per shard: the forget-Fisher of
  X's samples in the shard and the retain-Fisher of a seeded sample of its kept data, both per-sample and at
  the served weights; the forget calibration set is X itself, the retain set that kept sample. The target
  is what a model that never saw X scores on X, read off held-out validation samples of X's classes.
  By default (``forget_metric="rank"``) the score is the mean percentile of X's true-label probabilities
  among those held-out samples' (target 0.5), under each candidate. Hard accuracy (the literal reading,
  ``"accuracy"``) moves in steps of 1/|X| and a never-seen sample is usually still right, and the mean
  true-label probability (``"soft_accuracy"``) is dragged down by the few held-out samples the model gets
  wrong, so matching it over-forgets (measured: 3.7 points of held-out accuracy lost over 20 requests on
  MNIST); the rank is what a loss-threshold membership attack reads.
- **OHS** (``ohs=True``): after FIUn, FedAvg calibration rounds of the shard-federation on its kept data
  (every slice, minus ``F_s`` and X), epochs halved as in FedEraser (each client trains on the first half of
  its hash-ordered rows), until the validation loss improves by less than ``ohs_tol`` (relative) for
  ``ohs_patience`` rounds, capped at one stage's rounds. The rounds used are logged: they are its cost.
- **P1**: an approximate removal is recorded with :meth:`SisaFederation.record_approximate` (the ids join
  ``F_s``, ``d_s <- min(d_s, r*)``, checkpoints from ``d_s`` on are marked stale in the lineage), so a later
  exact rerun starts at ``min(r*, d_s)`` and leaves out all of ``F_s``.

The pure pieces (:func:`fit_throughput`, :func:`exact_workload`, :func:`plan_shard`) take counts, not data,
so the Flower server can plan from the clients' ``(shard, slice)`` histograms.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from datasets import Dataset
from torch import Tensor, nn

from fl_unlearn.calibrate import DEFAULT_ALPHAS, Scorer, calibrate_alpha
from fl_unlearn.data import make_loader
from fl_unlearn.errors import ConfigError
from fl_unlearn.fisher import compute_fisher, select_parameters
from fl_unlearn.fiun import FIUnConfig
from fl_unlearn.requests import UnlearningRequest
from fl_unlearn.sisa import ExactReport, Revocation, RoundRecord, SisaFederation, derive_seed

__all__ = [
    "DEFAULT_BUDGET",
    "POLICIES",
    "ApproxConfig",
    "HybridReport",
    "HybridUnlearner",
    "Plan",
    "ShardPlan",
    "Throughput",
    "combine_plans",
    "exact_workload",
    "fit_throughput",
    "mean_rank",
    "mia_auc",
    "ohs_round_cap",
    "plan",
    "plan_shard",
]

logger = logging.getLogger(__name__)

Metric = Callable[[Mapping[str, Tensor]], float]
"""``metric(weights) -> float``: how well a candidate still fits the forget set (lower = more forgotten)."""
FORGET_METRICS = ("rank", "soft_accuracy", "accuracy")
#: OHS stopping rules: ``stall`` (validation loss stops improving) or ``restore`` (also: back at the level of
#: the model before FIUn: repair what FIUn removed, never train further than the model it replaces).
OHS_STOPS = ("stall", "restore")

#: Default ``hybrid-budget``: the exact path may cost up to this fraction of training the shard from scratch.
DEFAULT_BUDGET = 0.6
POLICIES = ("auto", "exact", "approximate")
#: Rough cost of FIUn with alpha="auto" per retain sample, in training sample-gradient equivalents: two
#: per-sample (vmap) Fisher passes, ~4 calibration probes (forward passes) and the target's forward pass.
#: Measured ~3-5 for the small CNN on CPU; it only labels the approximate path's estimate, never decides.
APPROX_COST_FACTOR = 4


# --------------------------------------------------------------------------------------------------------
# Throughput
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    """Seconds of a FedAvg round as ``a + b * g`` (``g``: sample-gradient evaluations in the round).

    Attributes
    ----------
    a : float
        Per-round overhead in seconds (aggregation, checkpoint writes, loader set-up).
    b : float
        Seconds per sample-gradient evaluation at the federation's real parallelism (``1/b`` samples*epochs/s).
    r2 : float
        Coefficient of determination of the fit (``nan`` with fewer than 3 rounds).
    rounds : int
        Rounds fitted.
    """

    a: float
    b: float
    r2: float
    rounds: int

    def seconds(self, evaluations: float) -> float:
        """Predicted wall time of one round of ``evaluations`` sample-gradient evaluations."""
        return self.a + self.b * evaluations

    @property
    def samples_per_second(self) -> float:
        """Marginal throughput, ``1 / b``."""
        return 1.0 / self.b if self.b > 0 else float("nan")


def fit_throughput(records: Iterable[RoundRecord | tuple[int, float]], *, skip: int = 1) -> Throughput:
    """Least-squares fit of ``t = a + b g`` over training rounds, skipping the first ``skip`` (warm-up).

    Falls back to ``a = 0, b = sum t / sum g`` when the rounds cannot identify two parameters (one distinct
    ``g``) or the fit is unphysical (``b <= 0`` or ``a < 0``).

    Raises
    ------
    ConfigError
        No round with ``g > 0`` left after skipping.

    Examples
    --------
    >>> fit = fit_throughput([(0, 9.0), (100, 1.5), (200, 2.5), (300, 3.5)])
    >>> round(fit.a, 6), round(fit.b, 6)
    (0.5, 0.01)
    """
    pairs = [(r.evaluations, r.seconds) if isinstance(r, RoundRecord) else tuple(r) for r in records][skip:]
    pairs = [(float(g), float(t)) for g, t in pairs if g > 0]
    if not pairs:
        raise ConfigError("fit_throughput needs at least one training round with samples after the warm-up; "
                          "train the federation first.")
    g, t = np.array(pairs).T
    ratio = Throughput(0.0, float(t.sum() / g.sum()), float("nan"), len(g))
    if len(np.unique(g)) < 2:
        return ratio
    b, a = np.polyfit(g, t, 1)
    if b <= 0 or a < 0:
        return ratio
    resid = t - (a + b * g)
    total = float(((t - t.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / total if total > 0 and len(g) > 2 else float("nan")
    return Throughput(float(a), float(b), r2, len(g))


# --------------------------------------------------------------------------------------------------------
# Workload and decision
# --------------------------------------------------------------------------------------------------------


def exact_workload(counts: np.ndarray, start_stage: int, rounds: Sequence[int], epochs: int) -> list[int]:
    """Sample-gradient evaluations of every round of an exact rerun of one shard from ``start_stage``.

    Parameters
    ----------
    counts : np.ndarray
        ``[K, R]`` kept samples of the shard per client and slice (after removing the revoked ids).
    start_stage : int
        ``r0`` in ``1..R``.
    rounds : Sequence[int]
        ``T_r`` for stages ``1..R``.
    epochs : int
        Local epochs ``E``.

    Returns
    -------
    list[int]
        ``g`` per rerun round, in order; ``sum`` of it is ``W_s(r0)``.

    Examples
    --------
    >>> counts = np.full((2, 4), 10)            # 2 clients, 4 equal slices of 10
    >>> [sum(exact_workload(counts, j, [1] * 4, 1)) / sum(exact_workload(counts, 1, [1] * 4, 1))
    ...  for j in range(1, 5)]
    [1.0, 0.9, 0.7, 0.4]
    """
    counts = np.asarray(counts, dtype=np.int64)
    R = counts.shape[1]
    if not 1 <= start_stage <= R:
        raise ConfigError(f"start_stage must be in 1..{R}, got {start_stage}.")
    cumulative = counts.cumsum(axis=1).sum(axis=0)  # sum_k n_{k,s,<=r}, r = 1..R
    return [int(epochs * cumulative[r - 1]) for r in range(start_stage, R + 1) for _ in range(rounds[r - 1])]


@dataclass(frozen=True)
class ShardPlan:
    """The decision for one touched shard.

    ``exact_*`` always describe the exact path (so estimate and measurement can be compared whichever path
    ran); ``evaluations`` / ``seconds`` describe the chosen path.
    """

    shard: int
    r_star: int
    start_stage: int
    path: str
    exact_evaluations: int
    exact_seconds: float
    full_evaluations: int
    budget: float
    evaluations: int
    seconds: float
    revoked: Mapping[int, tuple[int, ...]]
    reason: str


def plan_shard(
    shard: int,
    counts: np.ndarray,
    r_star: int,
    dirty_from: int | None,
    rounds: Sequence[int],
    epochs: int,
    throughput: Throughput,
    *,
    budget_fraction: float = DEFAULT_BUDGET,
    policy: str = "auto",
    approx_evaluations: int = 0,
    revoked: Mapping[int, Iterable[int]] | None = None,
) -> ShardPlan:
    """Estimate the exact path of one shard and decide (hybrid.md §4).

    Parameters
    ----------
    shard : int
        Shard id (for the record).
    counts : np.ndarray
        ``[K, R]`` kept samples per client and slice after removing the revoked ids.
    r_star : int
        Earliest slice of the revoked ids in this shard.
    dirty_from : int | None
        ``d_s`` (None: every checkpoint clean).
    rounds, epochs : Sequence[int], int
        ``T_r`` per stage and local epochs ``E``.
    throughput : Throughput
        Fitted round time.
    budget_fraction : float (default: DEFAULT_BUDGET)
        ``rho``: exact iff ``W_s(r0) <= rho * W_s(1)``.
    policy : str (default: "auto")
        ``auto``, ``exact`` or ``approximate``.
    approx_evaluations : int (default: 0)
        Estimated cost of the approximate path (Fisher samples, OHS rounds), for the record.
    revoked : Mapping[int, Iterable[int]] | None
        The shard's revoked ids per client, carried to execution.
    """
    _check_policy(policy, budget_fraction)
    r0 = r_star if dirty_from is None else min(r_star, dirty_from)
    rerun = exact_workload(counts, r0, rounds, epochs)
    full = sum(exact_workload(counts, 1, rounds, epochs))
    exact_w, exact_s = sum(rerun), float(sum(throughput.seconds(g) for g in rerun))
    budget = budget_fraction * full
    path, why = _decide(exact_w, budget, policy)
    stale = f", d_s={dirty_from}" if dirty_from is not None else ""
    reason = (f"shard {shard}: r*={r_star}{stale}, rerun stages {r0}..{counts.shape[1]}: "
              f"{exact_w:,} evaluations (~{exact_s:.1f} s) vs budget {budget:,.0f} "
              f"({budget_fraction:g} x full {full:,}): {why}")
    chosen_w = exact_w if path == "exact" else approx_evaluations
    chosen_s = exact_s if path == "exact" else throughput.b * approx_evaluations
    ids = {int(k): tuple(int(i) for i in v) for k, v in (revoked or {}).items()}
    return ShardPlan(shard, r_star, r0, path, exact_w, exact_s, full, budget, chosen_w, chosen_s, ids, reason)


def _decide(exact_w: int, budget: float, policy: str) -> tuple[str, str]:
    if policy != "auto":
        return policy, f"{policy} (forced by policy)"
    if exact_w <= budget:
        return "exact", "exact (under budget)"
    return "approximate", "approximate (over budget)"


def _check_policy(policy: str, budget_fraction: float) -> None:
    if policy not in POLICIES:
        raise ConfigError(f"Unknown hybrid policy {policy!r}; expected one of {', '.join(POLICIES)}.")
    if isinstance(budget_fraction, bool) or not isinstance(budget_fraction, (int, float)) \
            or not 0 <= budget_fraction < float("inf"):
        raise ConfigError(f"budget_fraction must be a number >= 0 (a fraction of a shard's full training "
                          f"cost; default {DEFAULT_BUDGET}), got {budget_fraction!r}.")


@dataclass(frozen=True)
class Plan:
    """What the planner decided for one request.

    Attributes
    ----------
    path : str
        ``exact``, ``approximate``, or ``mixed`` (shards differ).
    estimated_evaluations, estimated_seconds : int, float
        Cost of the chosen paths, summed over the touched shards.
    budget : float
        Sum over touched shards of ``rho * W_s(1)``, in evaluations.
    reason : str
        One line per shard.
    shards : tuple[ShardPlan, ...]
        Per-shard decisions.
    exact_evaluations, exact_seconds : int, float
        What the exact path would cost on every touched shard.
    """

    path: str
    estimated_evaluations: int
    estimated_seconds: float
    budget: float
    reason: str
    shards: tuple[ShardPlan, ...]
    exact_evaluations: int
    exact_seconds: float
    policy: str
    budget_fraction: float
    request_id: str | None = None
    token: tuple = field(default=(), repr=False, compare=False)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (for results.json)."""
        out = asdict(self)
        out.pop("token")
        out["shards"] = [dict(asdict(sp), revoked={str(k): list(v) for k, v in sp.revoked.items()})
                         for sp in self.shards]
        return out


def plan(
    federation: SisaFederation,
    request: Revocation | UnlearningRequest,
    budget_fraction: float = DEFAULT_BUDGET,
    policy: str = "auto",
    *,
    throughput: Throughput | None = None,
    approx_evaluations: Mapping[int, int] | None = None,
) -> Plan:
    """Plan one request on a trained federation: per touched shard, exact or approximate.

    Parameters
    ----------
    federation : SisaFederation
        Trained; its round log gives the throughput unless ``throughput`` is given.
    request : Revocation | UnlearningRequest
        ``{client: ids}`` or a ``samples`` / ``client`` request.
    budget_fraction : float (default: DEFAULT_BUDGET)
        ``rho``, a fraction of each touched shard's full training cost.
    policy : str (default: "auto")
        ``auto``, ``exact`` or ``approximate``.
    throughput : Throughput | None (default: None)
        Round-time model; fitted on the federation's round log when ``None``.
    approx_evaluations : Mapping[int, int] | None (default: None)
        Estimated evaluations of the approximate path per shard (0 when not given).

    Raises
    ------
    RequestError
        Bad clients or ids (nothing changed).
    ConfigError
        Unknown policy, negative budget, an untrained federation.
    """
    _check_policy(policy, budget_fraction)
    revoked = federation.as_revocation(request)
    throughput = throughput or fit_throughput(federation.round_log)
    counts = federation.kept_counts(extra=revoked)
    rounds, epochs = federation.cfg.rounds(), federation.cfg.local_epochs
    shards = tuple(
        plan_shard(s, counts[:, s, :], federation.first_slice(by_client), federation.ledgers[s].dirty_from,
                   rounds, epochs, throughput, budget_fraction=budget_fraction, policy=policy,
                   approx_evaluations=(approx_evaluations or {}).get(s, 0), revoked=by_client)
        for s, by_client in federation.locate(revoked).items()
    )
    request_id = request.id if isinstance(request, UnlearningRequest) else None
    return combine_plans(shards, policy, budget_fraction, request_id=request_id, token=_state_token(federation))


def combine_plans(shards: Sequence[ShardPlan], policy: str, budget_fraction: float, *,
                  request_id: str | None = None, token: tuple = ()) -> Plan:
    """One request's :class:`Plan` from its per-shard decisions (any driver: in-process or over Flower).

    ``token`` identifies the federation state the plan was made on (``execute`` refuses a stale plan).
    """
    paths = {sp.path for sp in shards}
    result = Plan(
        path=paths.pop() if len(paths) == 1 else "mixed",
        estimated_evaluations=sum(sp.evaluations for sp in shards),
        estimated_seconds=sum(sp.seconds for sp in shards),
        budget=sum(sp.budget for sp in shards),
        reason="; ".join(sp.reason for sp in shards),
        shards=tuple(shards),
        exact_evaluations=sum(sp.exact_evaluations for sp in shards),
        exact_seconds=sum(sp.exact_seconds for sp in shards),
        policy=policy, budget_fraction=float(budget_fraction), request_id=request_id,
        token=token,
    )
    logger.info("plan: %s; %s", result.path, result.reason)
    return result


def mia_auc(member_losses: Sequence[float] | np.ndarray, nonmember_losses: Sequence[float] | np.ndarray) -> float:
    """Loss-threshold membership-inference AUC from per-sample losses (lower loss => "member").

    The same statistic as :func:`fl_unlearn.evaluate.loss_threshold_mia_auc`, for a driver that only sees
    losses (the members' losses are computed where the members live). ``nan`` when either side is empty.

    Examples
    --------
    >>> mia_auc([0.1, 0.2], [1.0, 2.0]), mia_auc([1.0], [1.0])
    (1.0, 0.5)
    """
    from sklearn.metrics import roc_auc_score

    member, nonmember = np.asarray(member_losses, float), np.asarray(nonmember_losses, float)
    if not len(member) or not len(nonmember):
        return float("nan")
    is_member = np.concatenate([np.ones(len(member)), np.zeros(len(nonmember))])
    return float(roc_auc_score(is_member, -np.concatenate([member, nonmember])))


def _state_token(federation: SisaFederation) -> tuple:
    """Changes whenever a revocation is applied: a plan is only valid for the state it was made on."""
    revoked = sum(len(ids) for led in federation.ledgers for ids in led.revoked.values())
    return (tuple(federation.versions), tuple(led.dirty_from for led in federation.ledgers), revoked,
            tuple(federation.served))


# --------------------------------------------------------------------------------------------------------
# The approximate path (FIUn, alpha="auto", optionally OHS)
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApproxConfig:
    """Settings of the approximate path.

    Parameters
    ----------
    fiun : FIUnConfig (default: FIUnConfig())
        Dampening settings; ``alpha`` is calibrated.
    fisher_params : str (default: "all")
        Parameters the Fishers cover (``select_parameters`` spec). A few samples barely move the last layer's
        Fisher pattern, so all parameters by default.
    retain_samples : int (default: 512)
        Kept samples of the shard for the retain-Fisher and the retain calibration set.
    alphas : tuple[float, ...] (default: calibrate.DEFAULT_ALPHAS)
        Candidate alphas (on mean-normalised Fishers).
    ohs : bool (default: False)
        Run OHS calibration rounds after FIUn.
    ohs_max_rounds : int | None (default: None)
        Cap on OHS rounds; ``None``: as much training as half an epoch per round of the last stage
        (``ceil(T_R * 0.5 / ohs_fraction)`` rounds: 5 with one round per stage and the default fraction).
    ohs_tol : float (default: 1e-3)
        Relative validation-loss improvement below which a round counts as a stall.
    ohs_patience : int (default: 2)
        Stop after this many stalled rounds in a row.
    ohs_fraction : float (default: 0.1)
        Share of an epoch each client trains per OHS round: small steps, so the repair can stop close to where
        it restored the model (benchmarks/hybrid.py: half-epoch steps over-trained, +1.1 points over exact).
    ohs_stop : str (default: "restore")
        ``stall``: repair rounds until the validation loss stops improving (capped); ``restore``: also stop (or
        never start) once the validation loss is at or below the served model's before FIUn, so OHS repairs
        FIUn's damage without training the shard-model beyond the exact path's.
    forget_metric : str (default: "rank")
        What "forgotten" means to the alpha calibration, each against what unseen held-out samples of the
        same classes score: ``rank``: the forget samples' mean percentile rank of the true-label probability
        among held-out samples of their class, under the candidate, target 0.5 (what a loss-threshold
        attack reads); ``soft_accuracy``: mean true-label probability vs the held-out mean;
        ``accuracy``: hard accuracy vs the held-out accuracy (coarse: steps of 1/|X|).
    """

    fiun: FIUnConfig = FIUnConfig()
    fisher_params: str = "all"
    retain_samples: int = 512
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    ohs: bool = False
    ohs_max_rounds: int | None = None
    ohs_tol: float = 1e-3
    ohs_patience: int = 2
    ohs_fraction: float = 0.1
    forget_metric: str = "rank"
    ohs_stop: str = "restore"

    def __post_init__(self) -> None:
        if self.ohs_stop not in OHS_STOPS:
            raise ConfigError(f"Unknown ohs_stop {self.ohs_stop!r}; expected one of {OHS_STOPS}.")
        if self.forget_metric not in FORGET_METRICS:
            raise ConfigError(f"Unknown forget_metric {self.forget_metric!r}; expected one of {FORGET_METRICS}.")
        if self.retain_samples < 1:
            raise ConfigError(f"retain_samples must be >= 1, got {self.retain_samples}.")
        if self.ohs_max_rounds is not None and self.ohs_max_rounds < 0:
            raise ConfigError(f"ohs_max_rounds must be None or >= 0, got {self.ohs_max_rounds}.")
        if not 0 < self.ohs_fraction <= 1:
            raise ConfigError(f"ohs_fraction must be in (0, 1], got {self.ohs_fraction}.")
        if self.ohs_patience < 1 or self.ohs_tol < 0:
            raise ConfigError(f"ohs_patience must be >= 1 and ohs_tol >= 0, got {self.ohs_patience}, {self.ohs_tol}.")


@dataclass
class HybridReport:
    """What one request did: the plan, the exact reruns, the approximate removals, measured time."""

    plan: Plan
    exact: ExactReport | None
    approximate: dict[int, dict[str, object]]
    seconds: float

    @property
    def path(self) -> str:
        return self.plan.path

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"plan": self.plan.to_dict(), "exact": self.exact.to_dict() if self.exact else None,
                "approximate": {str(s): v for s, v in self.approximate.items()}, "seconds": self.seconds}


class HybridUnlearner:
    """Plan and carry out sample- and client-level requests on a trained :class:`SisaFederation`.

    Parameters
    ----------
    federation : SisaFederation
        Trained federation; it is changed in place by :meth:`unlearn`.
    validation : Dataset
        Held-out data no client trains on and the final evaluation does not use: it sets the forget target
        and OHS's stopping rule.
    budget_fraction : float (default: DEFAULT_BUDGET)
        ``hybrid-budget``.
    policy : str (default: "auto")
        ``hybrid-policy``: ``auto``, ``exact`` or ``approximate``.
    approx : ApproxConfig (default: ApproxConfig())
        Approximate-path settings (``approx.ohs`` is the ``ohs`` switch).

    Examples
    --------
    >>> hybrid = HybridUnlearner(fed, validation)                  # doctest: +SKIP
    >>> hybrid.plan({0: [17]}).path, hybrid.unlearn({0: [17]}).seconds  # doctest: +SKIP
    """

    def __init__(self, federation: SisaFederation, validation: Dataset, *, budget_fraction: float = DEFAULT_BUDGET,
                 policy: str = "auto", approx: ApproxConfig = ApproxConfig()) -> None:
        _check_policy(policy, budget_fraction)
        if len(validation) == 0:
            raise ConfigError("the validation set is empty; give held-out samples of the classes you may forget.")
        self.federation, self.validation, self.approx = federation, validation, approx
        self.budget_fraction, self.policy = budget_fraction, policy
        self._val = next(iter(make_loader(validation, len(validation))))
        self._throughput: Throughput | None = None

    @property
    def throughput(self) -> Throughput:
        """Round-time model fitted on the federation's training rounds (cached)."""
        if self._throughput is None:
            self._throughput = fit_throughput(self.federation.round_log)
            t = self._throughput
            logger.info("hybrid: throughput a=%.4f s, %.0f samples/s, R^2=%.3f over %d rounds", t.a,
                        t.samples_per_second, t.r2, t.rounds)
        return self._throughput

    def plan(self, request: Revocation | UnlearningRequest, budget_fraction: float | None = None,
             policy: str | None = None) -> Plan:
        """Plan ``request`` (nothing changes); see :func:`plan`."""
        fed = self.federation
        per_shard = APPROX_COST_FACTOR * self.approx.retain_samples + self._ohs_evaluations_cap()
        approx = {s: per_shard for s in range(fed.num_shards)}
        return plan(fed, request, self.budget_fraction if budget_fraction is None else budget_fraction,
                    self.policy if policy is None else policy, throughput=self.throughput,
                    approx_evaluations=approx)

    def unlearn(self, request: Revocation | UnlearningRequest, budget_fraction: float | None = None,
                policy: str | None = None) -> HybridReport:
        """Plan and execute ``request``; returns what was done and how long it took."""
        return self.execute(self.plan(request, budget_fraction, policy))

    def execute(self, plan_: Plan) -> HybridReport:
        """Carry out a plan made on the federation's current state.

        Raises
        ------
        ConfigError
            The federation changed since the plan was made (plan again).
        """
        fed = self.federation
        if plan_.token != _state_token(fed):
            raise ConfigError("the plan is stale: the federation changed after it was made; plan the request again.")
        start = time.perf_counter()
        exact_ids = _merge([sp.revoked for sp in plan_.shards if sp.path == "exact"])
        exact = fed.unlearn_exact(exact_ids, request_id=plan_.request_id) if exact_ids else None
        approx_plans = [sp for sp in plan_.shards if sp.path == "approximate"]
        approx = self.approximate(approx_plans, request_id=plan_.request_id) if approx_plans else {}
        report = HybridReport(plan_, exact, approx, time.perf_counter() - start)
        logger.info("hybrid: %s in %.2f s (estimated %.2f s)", plan_.path, report.seconds, plan_.estimated_seconds)
        return report

    # -- FIUn ---------------------------------------------------------------------------------------

    def approximate(self, shard_plans: Sequence[ShardPlan], *, request_id: str | None = None) -> dict[int, dict]:
        """FIUn (alpha calibrated) on the served models of these shards, then OHS if enabled; records P1."""
        fed = self.federation
        t0 = time.perf_counter()
        shards = [sp.shard for sp in shard_plans]
        revoked = [{k: np.asarray(v, dtype=np.int64) for k, v in sp.revoked.items()} for sp in shard_plans]
        models = [fed.shard_weights(s) for s in shards]
        forget_sets = [fed.tensors({k: fed.rows_of(k, ids) for k, ids in r.items()}) for r in revoked]
        retain_sets = [self._retain_sample(s, r) for s, r in zip(shards, revoked)]
        metrics = [self._forget_metric(w, xy) for w, xy in zip(models, forget_sets)]
        targets = [t for _, t in metrics]
        params = select_parameters(fed.new_model(), self.approx.fisher_params)
        retain_f = [self._fisher(w, xy, params) for w, xy in zip(models, retain_sets)]
        forget_f = [self._fisher(w, xy, params) for w, xy in zip(models, forget_sets)]
        scorer = _offset_scorer(fed.new_model(), [m for m, _ in metrics], retain_sets, targets)
        result = calibrate_alpha(models, retain_f, forget_f, scorer, base=self.approx.fiun,
                                 alphas=self.approx.alphas, forget_target=0.0)
        fiun_s = time.perf_counter() - t0
        out = {}
        for i, (s, by_client) in enumerate(zip(shards, revoked)):
            restore_to = self._val_loss(models[i]) if self.approx.ohs else None  # the served model, before FIUn
            out[s] = self._finish_shard(s, by_client, result, i, targets[i], len(forget_sets[i][1]), request_id,
                                        restore_to)
            out[s]["fiun_seconds"] = fiun_s / len(shards)
        return out

    def _finish_shard(self, shard: int, by_client: dict[int, np.ndarray], result, i: int, target: float,
                      n_forget: int, request_id: str | None, restore_to: float | None) -> dict[str, object]:
        t0 = time.perf_counter()
        weights, ohs = result.weights[i], {"rounds": 0, "evaluations": 0, "val_loss": []}
        if self.approx.ohs:
            weights, ohs = self._ohs(shard, weights, by_client, request_id, restore_to)
        record = {"alpha": result.alphas[i], "forget_target": target,
                  "forget_score": result.forget_acc[i] + target, "retain_acc": result.retain_acc[i],
                  "target_met": result.target_met[i], "selected": result.stats[i].selected,
                  "forget_samples": n_forget, "ohs_rounds": ohs["rounds"], "ohs_evaluations": ohs["evaluations"],
                  "ohs_val_loss": ohs["val_loss"], "ohs_seconds": time.perf_counter() - t0}
        meta = {k: record[k] for k in ("alpha", "forget_target", "ohs_rounds")}
        self.federation.record_approximate(shard, by_client, weights, request_id=request_id, meta=meta)
        logger.info("hybrid: shard %d approximate, alpha=%g, score %.3f (target %.3f), %d OHS rounds", shard,
                    record["alpha"], record["forget_score"], target, ohs["rounds"])
        return record

    def _fisher(self, weights: Mapping[str, Tensor], xy: tuple[Tensor, Tensor], params: Sequence[str]) -> dict:
        model = self.federation.new_model()
        model.load_state_dict(weights)
        return dict(compute_fisher(model, [xy], params, estimator="per_sample"))

    def _retain_sample(self, shard: int, extra: Mapping[int, np.ndarray]) -> tuple[Tensor, Tensor]:
        """A seeded sample of the shard's kept data (every slice, minus ``F_s`` and the new ids)."""
        fed = self.federation
        rows = {k: fed.kept_rows(k, shard, fed.num_slices, extra=extra) for k in fed.clients}
        flat = [(k, r) for k in sorted(rows) for r in rows[k].tolist()]
        rng = np.random.default_rng(derive_seed(fed.cfg.seed, "retain-sample", shard))
        pick = rng.permutation(len(flat))[: self.approx.retain_samples]
        chosen: dict[int, list[int]] = {}
        for j in sorted(pick.tolist()):
            chosen.setdefault(flat[j][0], []).append(flat[j][1])
        return fed.tensors({k: np.asarray(v, dtype=np.int64) for k, v in chosen.items()})

    def _forget_metric(self, weights: Mapping[str, Tensor], forget: tuple[Tensor, Tensor]) -> tuple[Metric, float]:
        """``(metric, target)`` for one shard: ``metric(w)`` scores the forget set, ``target`` is unseen data's."""
        model = self.federation.new_model().eval()
        x, y = self._val
        keep = torch.isin(y, torch.unique(forget[1]))
        val = (x[keep], y[keep])
        if not keep.any():
            logger.warning("hybrid: no validation samples of classes %s; forget target 0", forget[1].unique().tolist())
        if self.approx.forget_metric == "rank":
            return (lambda w: _mean_rank(model, w, forget, val)), 0.5
        if self.approx.forget_metric == "soft_accuracy":
            target = _class_weighted(_true_label_probs(model, weights, *val), val[1], forget[1])
            return (lambda w: float(_true_label_probs(model, w, *forget).mean())), target
        target = _class_weighted(_correct(model, weights, *val), val[1], forget[1])
        return (lambda w: float(_correct(model, w, *forget).mean())), target

    # -- OHS ----------------------------------------------------------------------------------------

    def _ohs_evaluations_cap(self) -> int:
        if not self.approx.ohs:
            return 0
        fed = self.federation
        full = int(fed.kept_counts().sum(axis=(0, 2)).max())
        return int(self._ohs_cap() * fed.cfg.local_epochs * np.ceil(self.approx.ohs_fraction * full))

    def _ohs_cap(self) -> int:
        return ohs_round_cap(self.federation.cfg.rounds()[-1], self.approx.ohs_fraction, self.approx.ohs_max_rounds)

    def _ohs(self, shard: int, weights: dict[str, Tensor], extra: Mapping[int, np.ndarray],
             request_id: str | None, restore_to: float | None = None) -> tuple[dict[str, Tensor], dict[str, object]]:
        """Calibration FedAvg rounds on kept data until the validation loss stops improving (capped); with
        ``ohs_stop="restore"`` also as soon as it is back at ``restore_to`` (the model's before FIUn)."""
        fed = self.federation
        losses, stall, evaluations, rounds = [self._val_loss(weights)], 0, 0, 0
        best = losses[0]
        for t in range(self._ohs_cap()):
            if self.approx.ohs_stop == "restore" and restore_to is not None and losses[-1] <= restore_to:
                break
            rows = {k: fed.kept_rows(k, shard, fed.num_slices, extra=extra) for k in fed.clients}
            key = (fed.cfg.seed, shard, "ohs", request_id or len(fed.graph), t)
            weights, g = fed.train_round(shard, weights, rows, key, fraction=self.approx.ohs_fraction)
            evaluations, rounds = evaluations + g, rounds + 1
            losses.append(self._val_loss(weights))
            stall = stall + 1 if (best - losses[-1]) < self.approx.ohs_tol * abs(best) else 0
            best = min(best, losses[-1])
            if stall >= self.approx.ohs_patience:
                break
        return weights, {"rounds": rounds, "evaluations": evaluations, "val_loss": losses}

    @torch.no_grad()
    def _val_loss(self, weights: Mapping[str, Tensor]) -> float:
        model = self.federation.new_model().eval()
        logits = torch.func.functional_call(model, dict(weights), (self._val[0],))
        return float(nn.functional.cross_entropy(logits, self._val[1]))


def ohs_round_cap(last_stage_rounds: int, fraction: float, max_rounds: int | None) -> int:
    """OHS's cap on repair rounds: ``max_rounds``, else half an epoch per round of the last stage in steps of
    ``fraction`` of an epoch.

    Examples
    --------
    >>> ohs_round_cap(1, 0.1, None), ohs_round_cap(3, 0.5, None), ohs_round_cap(1, 0.1, 2)
    (5, 3, 2)
    """
    if max_rounds is not None:
        return max_rounds
    return int(np.ceil(round(last_stage_rounds * 0.5 / fraction, 9)))


def _merge(parts: Iterable[Mapping[int, Iterable[int]]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for part in parts:
        for k, ids in part.items():
            out.setdefault(int(k), []).extend(int(i) for i in ids)
    return out


@torch.no_grad()
def _true_label_probs(model: nn.Module, weights: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    model = model.eval()
    logits = torch.func.functional_call(model, dict(weights), (x,))
    return torch.softmax(logits, dim=1).gather(1, y[:, None])[:, 0]


def _offset_scorer(model: nn.Module, metrics: Sequence[Metric], retain_sets: Sequence[tuple[Tensor, Tensor]],
                   targets: Sequence[float]) -> Scorer:
    """``score(i, w) = (metric_i(w) - target_i, hard accuracy on retain set i)``.

    Subtracting each shard's own target lets one ``calibrate_alpha`` call (``forget_target=0``) serve shards
    whose targets differ.
    """

    def score(i: int, weights: Mapping[str, Tensor]) -> tuple[float, float]:
        return metrics[i](weights) - targets[i], float(_correct(model, weights, *retain_sets[i]).mean())

    return score


@torch.no_grad()
def _correct(model: nn.Module, weights: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    return (torch.func.functional_call(model, dict(weights), (x,)).argmax(1) == y).float()


def _class_weighted(values: Tensor, labels: Tensor, forget_labels: Tensor) -> float:
    """Mean of ``values`` per class, averaged with the forget set's class counts as weights (0 if none)."""
    classes, counts = torch.unique(forget_labels, return_counts=True)
    per_class = [(float(values[labels == c].mean()), int(n)) for c, n in zip(classes, counts) if (labels == c).any()]
    return sum(v * n for v, n in per_class) / sum(n for _, n in per_class) if per_class else 0.0


def _mean_rank(model: nn.Module, weights: Mapping[str, Tensor], forget: tuple[Tensor, Tensor],
               val: tuple[Tensor, Tensor]) -> float:
    """Mean percentile of each forget sample's true-label probability among held-out samples of its class.

    Both under the candidate ``weights``; ties count one half. A sample the model never saw is as likely to
    rank above as below unseen samples of its class (0.5 on average); a memorised one ranks high.
    """
    p_forget, p_val = _true_label_probs(model, weights, *forget), _true_label_probs(model, weights, *val)
    return mean_rank(p_forget, forget[1], p_val, val[1])


def mean_rank(p_forget: Tensor, forget_labels: Tensor, p_val: Tensor, val_labels: Tensor) -> float:
    """Mean percentile of each forget sample's true-label probability among held-out samples of its class.

    The forget metric of the approximate path (``forget_metric="rank"``), from probabilities: a driver whose
    forget samples live elsewhere (the Flower clients) computes them there. Ties count one half; a class
    without held-out samples counts 0.5.

    Examples
    --------
    >>> import torch
    >>> round(mean_rank(torch.tensor([0.9]), torch.tensor([1]), torch.tensor([0.1, 0.5, 0.95]), torch.tensor([1, 1, 1])), 4)
    0.6667
    """
    ranks = []
    for p, c in zip(p_forget.tolist(), forget_labels.tolist()):
        same = p_val[val_labels == c]
        ranks.append(float((same < p).float().mean() + 0.5 * (same == p).float().mean()) if len(same) else 0.5)
    return float(np.mean(ranks)) if ranks else 0.5

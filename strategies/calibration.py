"""``alpha="auto"`` in a federation: choose FIUn's dampening on data the clients hold (one round trip) and, for a
class, check it on every other affected model (a second one).

The server holds no data. So it sends every client the model to calibrate on (the newest affected global),
the merged forget-Fisher and the retain-Fisher, and a grid of candidate ``(alpha, lambda)`` pairs
(``query.calibrate``; ``fl_unlearn.calibrate.candidate_grid``: alphas 0.5..512 in factors of sqrt(2), lambda 1 or
0). Each client dampens the model with the candidates and counts correct predictions on a capped sample of its own
data: the data to forget, where it holds some, and a small sample of its kept data (its retained validation
sample). For a class, a holder walks each lambda's alphas strongest first and stops at the first that still
predicts more of its forget samples than the federation's budget (milder ones cannot forget them either). The
server sums the counts over clients and picks the candidate with the best kept accuracy among those that bring the
forgotten data down to the level of a model that never saw it (:func:`fl_unlearn.calibrate.choose_candidate`;
candidates within ``kept_tolerance`` of the best kept count tie, and the one that keeps fewest forget samples, then
has the lowest summed kept loss (the clients send it per candidate), wins: a few dozen kept samples per client
cannot separate them by accuracy, and the loss still can):

- a class: 0 % (a model that never saw a class never predicts it);
- a client's or a user's samples: the model's accuracy on kept data of the same federation (what it
  scores on data it did not memorise is not known to the server; the kept-data accuracy of the model
  before unlearning is the clients' best estimate of it).

The round trips overlap the server's own work: ``query.calibrate`` is pushed as soon as the merged forget-Fisher
exists (:func:`begin_calibration`; the server then journals and stores the Fishers and loads the models to check
while the clients calibrate), and while the holders check, the server dampens its models at the choice
(``while_checking``). On the App's MNIST class 1 the gap from the Fishers' arrival to the calibration's push went from
69 to 30 ms.

Alpha applies to mean-normalised Fishers (:func:`fl_unlearn.calibrate.scale_free`), so the choice does not
depend on which model the Fishers were computed on; the chosen pair then dampens every affected model,
server-held and client-held (``scale-free`` in ``train.unlearn``).

The choice is scored on the newest affected global model; an early model in the lineage can keep a class at the
same alpha (measured on MNIST: a round-1 local model kept 11.7 % of class 3). So for a class request a second
round trip (``query.checkforget``, :func:`check_at_clients`) sends the other affected server-held models to the
clients holding data to forget (:func:`check_plan`): a global model to every holder, a client's local update to
one holder that did not train it, checked on as many samples as all holders check a global model on together (until
2026-12-07 every holder was sent every model: each holder now checks a third as many models, and an update reaches
one other client instead of all). Each holder walks, per model, from the federation's choice towards stronger
candidates (smaller alphas, then lambda 0: :func:`fl_unlearn.calibrate.check_sequence`, every grid alpha) until
the model forgets every one of a few of its forget samples, counting at each step the samples it still predicts
(:func:`fl_unlearn.calibrate.check_models`: one forward pass for a model that forgets at the choice), and the
server dampens each model at the mildest candidate at which the holders' counts add up to at most the choice's
own tolerance of the samples checked (``forget_tolerance``: 3 of 128 by default), never milder than the choice
(:func:`fl_unlearn.calibrate.per_model_candidate`). Until 2026-12-06 a model had to keep none of them, a bar the
choice itself does not meet: on the App's MNIST class 9 a round-1 local model kept 1 of 128 at the choice and 25
at the next stronger candidate, and took a forget-Fisher of its own, two more round trips. Earlier still, the
holders walked those models inside ``query.calibrate``, before the choice was known, from their feasible starts at
every lambda; one round trip fewer, but the walks at the lambda not chosen (most of the walking) were wasted: on
the App's MNIST class 0 unlearning took 0.94 s with the second round trip against 1.04 s (class 1, whose choice
is at lambda 1: 1.20 s against 1.18 s). Models that no candidate brings within the budget get their own
forget-Fisher and a second check (``query.checkforget`` again, with their own merged forget-Fishers), and, if
still none does, the strongest candidate that zeroes no more than half of any weight tensor of theirs: no check
ever counts a candidate that zeroes more (it forgets by breaking the model;
:meth:`fl_unlearn.fiun.FisherSweep.breaks_a_weight`), and the grid leaves them unscored as well.
Client and sample requests have a target relative to each model's own generalisation, which the clients cannot
score per model in one pass: they keep the one choice.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from datasets import Dataset
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from fl_unlearn.calibrate import (
    DEFAULT_LAMS,
    GRID_ALPHAS,
    NOT_WALKED,
    UNSCORED,
    UNSCORED_LOSS,
    GridCounts,
    candidate_grid,
    check_models,
    check_sequence,
    choose_candidate,
    dampening_change,
    count_correct_split,
    first_within,
    per_model_candidate,
    score_alpha_grid,
    strongest_usable,
)
from fl_unlearn.data import load_rows
from fl_unlearn.errors import ConfigError, UnlearnError
from fl_unlearn.fiun import FIUnConfig
from strategies import records as R
from strategies.forget import ForgetSpec
from strategies.nodes import Exchange, checked_replies

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from strategies.client import ClientSpec
    from strategies.nodes import NodeDirectory

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientCalibration:
    """How much of their data clients score in ``query.calibrate``.

    Parameters
    ----------
    forget_samples : int (default: 64)
        Cap per client on the forget samples scored (a seeded random subset).
    retain_samples : int (default: 32)
        Cap per client on the kept samples scored. Measured (benchmarks/robustness.py, MNIST and digits, every
        class): 64 / 32 with 256-sample Fishers forgot as well as 256 / 128 with 1,024-sample Fishers, and with
        the repair kept more (worst gap 1.6 and 0.6 points against 3.5 and 0.3), at a fifth of the time.
    alphas : tuple[float, ...] (default: fl_unlearn.calibrate.GRID_ALPHAS)
        Candidate thresholds on mean-normalised Fishers.
    lams : tuple[float, ...] (default: fl_unlearn.calibrate.DEFAULT_LAMS)
        Dampening constants tried with every alpha.
    check_samples : int (default: 32)
        Forget samples per holder for the per-model check of a class request (``query.checkforget``); 0 dampens
        every model at the one choice.
    forget_tolerance : float (default: 0.03)
        Class requests: the share of the scored forget samples the choice may still predict (the target; 7 of
        the 256 four holders score). With 0 one hard sample among 256 decided for the whole federation: on MNIST
        class 6 it pushed alpha from 2 to 0.5 and left 11 % of the kept accuracy (98 % at alpha 2, which forgot
        all but one of them). With 0.01 (until 2026-12-05) the App's MNIST class 1 took alpha 1.41, 89.5 % kept
        held out, where alpha 2.83 keeps 93.5 % and leaves 2.7 % of the class held out; class 0 alpha 2.83, 93.0 %,
        where 4 keeps 97.4 % and leaves 1.8 %. The per-model check holds every other model to the same share of
        the samples it checks (:meth:`check_budget`: 3 of the 128 four holders check; 0 until 2026-12-06).
    kept_tolerance : float (default: 0.01)
        Candidates that meet the target and keep within this share of the scored kept samples of the best
        (rounded up: 2 of 128) count as keeping as much; among them the one that keeps fewest forget samples,
        then has the lowest summed kept loss, wins (:func:`fl_unlearn.calibrate.choose_candidate`). 0: the best
        count alone, ties to the milder candidate.
        A few dozen kept samples per client cannot tell 127 from 128: on MNIST class 5 the stronger candidate
        that scored one more kept 96.8 % held out, a milder near tie 98.6 %. Until 2026-12-05 (noon) the near
        tie that changed the weights least won; the kept loss follows held-out accuracy where training-sample
        accuracy saturates (digits, every class: worst kept gap 3.0 points instead of 4.2, MNIST unchanged).
    """

    forget_samples: int = 64
    retain_samples: int = 32
    alphas: tuple[float, ...] = GRID_ALPHAS
    lams: tuple[float, ...] = DEFAULT_LAMS
    check_samples: int = 32
    forget_tolerance: float = 0.03
    kept_tolerance: float = 0.01

    def __post_init__(self) -> None:
        for name in ("forget_tolerance", "kept_tolerance"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")

    def keep_budget(self, holders: int) -> int:
        """Forget samples the choice may still predict, over ``holders`` clients scoring at most
        ``forget_samples`` each: what a client may keep before it stops walking (``score_alpha_grid``)."""
        return int(self.forget_tolerance * self.forget_samples * holders)

    def check_budget(self, holders: int) -> int:
        """Forget samples a checked model may still predict over ``holders`` clients checking at most
        ``check_samples`` each: the choice's own tolerance (:func:`fl_unlearn.calibrate.first_within`)."""
        return int(self.forget_tolerance * self.check_samples * holders)

    def single_check_rows(self, holders: int) -> int:
        """Forget samples one holder checks a local update on (:func:`check_plan`): as many as ``holders``
        clients check a global model on together, so that every model is held to the same :meth:`check_budget`."""
        return self.check_samples * max(holders, 1)

    def kept_margin(self, retain_num: int) -> int:
        """Kept samples (of ``retain_num`` scored) within which two candidates count as keeping as much."""
        return math.ceil(self.kept_tolerance * retain_num - 1e-9)


#: The per-model check sends the other affected server-held models to the holders; above this many bytes of
#: their weights in all it is skipped (logged), and every model gets the one choice.
CHECK_MAX_BYTES = 256 * 2**20


@dataclass
class CalibrationChoice:
    """What the federation chose: alpha and lambda, whether they met the target, the summed counts, the cost."""

    alpha: float
    lam: float
    target: float
    target_met: bool
    counts: GridCounts
    seconds: float
    client_max_s: float
    retain_before: float = float("nan")
    per_model: dict[str, tuple[float, float]] = field(default_factory=dict)
    per_model_met: dict[str, bool] = field(default_factory=dict)
    holders: list[int] = field(default_factory=list)
    own_fisher: list[str] = field(default_factory=list)
    kept_margin: int = 0

    def to_dict(self) -> dict[str, Any]:
        f_acc, r_acc = self.counts.accuracies()
        losses = self.counts.retain_loss or [UNSCORED_LOSS] * len(self.counts.candidates)
        r_loss = [None if v == UNSCORED_LOSS or not self.counts.retain_num else v / self.counts.retain_num
                  for v in losses]
        chosen = self.counts.candidates.index((self.alpha, self.lam))
        return {"alpha": self.alpha, "lam": self.lam, "target": self.target, "target_met": self.target_met,
                "retain_before": self.retain_before, "retain_after": r_acc[chosen], "forget_after": f_acc[chosen],
                "forget_samples": self.counts.forget_num, "retain_samples": self.counts.retain_num,
                "grid": [{"alpha": a, "lam": v, "forget_acc": f, "retain_acc": r, "retain_loss": loss}
                         for (a, v), f, r, loss in zip(self.counts.candidates, f_acc, r_acc, r_loss)],
                "per_model": {k: {"alpha": a, "lam": v} for k, (a, v) in self.per_model.items()},
                "per_model_met": dict(self.per_model_met), "own_fisher": list(self.own_fisher),
                "kept_margin": self.kept_margin,
                "seconds": self.seconds, "client_max_s": self.client_max_s}


# --- client side -----------------------------------------------------------------------------------------


def _sample_tensors(ds: Dataset, rows: np.ndarray, cap: int, seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """At most ``cap`` of ``rows`` (positions in ``ds``; a seeded subset) as one ``(x, y)`` batch; ``None`` if none."""
    from strategies.client import capped_rows

    rows = capped_rows(rows, cap, seed)
    return load_rows(ds, rows) if len(rows) else None


def handle_calibrate(spec: ClientSpec, msg: Message, context: Context) -> Message:
    """``query.calibrate``: correct predictions per candidate alpha on this client's capped samples.

    Also counts the undampened model (``before-forget-correct`` / ``before-retain-correct``), from which the
    server derives the target for client and sample requests.
    """
    from strategies.client import _seed, load_model, partition_id

    start = time.perf_counter()
    config = R.first_config(msg)
    arrays = msg.content.array_records
    weights = R.record_to_tensors(arrays[R.ARRAYS_KEY])
    forget_fisher = R.record_to_tensors(arrays[R.FORGET_FISHER_KEY])
    retain_fisher = R.record_to_tensors(arrays[R.RETAIN_FISHER_KEY])
    data = spec.data_fn(context)
    forget_rows, retain_rows = ForgetSpec.from_config(config).split_rows(data)
    forget_set = _sample_tensors(data, forget_rows, int(config[R.CALIBRATION_FORGET]), _seed(context, -3))
    retain_set = _sample_tensors(data, retain_rows, int(config[R.CALIBRATION_RETAIN]), _seed(context, -4))
    model = load_model(spec, context, weights)
    base = R.fiun_from_config(config)
    candidates = _candidates(config)
    budget = int(config.get(R.CALIBRATION_BUDGET, 0))
    counts = score_alpha_grid(model, weights, retain_fisher, forget_fisher, forget_set, retain_set,
                              base=base, candidates=candidates, stop_when_kept=bool(config.get(R.CALIBRATION_STOP)),
                              keep_budget=budget)
    before_forget, before_retain = count_correct_split(model, weights, forget_set, retain_set)
    metrics = MetricRecord({
        R.FORGET_CORRECT: counts.forget_correct, R.RETAIN_CORRECT: counts.retain_correct,
        R.RETAIN_LOSS: [float(v) for v in counts.retain_loss or []],
        R.FORGET_NUM: counts.forget_num, R.RETAIN_NUM: counts.retain_num,
        R.BEFORE + R.FORGET_CORRECT: before_forget, R.BEFORE + R.RETAIN_CORRECT: before_retain,
    })
    metrics[R.SECONDS] = time.perf_counter() - start
    log(INFO, "query.calibrate: partition %d scored %d of %d candidates on %d forget / %d kept samples in %.2f s",
        partition_id(context), sum(counts.scored()), len(candidates), counts.forget_num, counts.retain_num,
        metrics[R.SECONDS])
    return Message(RecordDict({R.METRICS_KEY: metrics}), reply_to=msg)


def check_held_models(
    model: torch.nn.Module,
    weights: Sequence[Tensors],
    retains: Sequence[Tensors],
    forget_fisher: Tensors,
    forget_set: tuple[torch.Tensor, torch.Tensor],
    config: Any,
    own_fisher: Callable[[Tensors], Tensors],
) -> tuple[list[tuple[float, float]], list[Tensors], list[str]]:
    """``train.unlearn`` of a class request at a holder: the per-model check of the models this client holds
    (derived models), on its own forget samples, with no round trip.

    Each model walks from the federation's choice (the ``fiun-alpha`` / ``fiun-lam`` of ``config``) towards
    stronger candidates (:func:`fl_unlearn.calibrate.check_models` over ``alphas`` / ``lams``) and takes the first
    that keeps at most ``check-budget`` samples of ``forget_set`` (the server sends the choice's tolerance of one
    holder's check samples: 0 of 32 by default); one that no candidate brings there gets the forget-Fisher this
    client takes on the model itself (``own_fisher(weights)``: it holds the data) and walks again, as the server
    does for its models.

    Returns
    -------
    tuple
        Per model: its ``(alpha, lambda)``, the forget-Fisher to dampen it with, and ``"met"``, ``"own-fisher"``
        or ``"not-met"`` (the strongest candidate that zeroes no more than half of any weight tensor, with its own
        forget-Fisher, still keeping more than ``check-budget`` samples).
    """
    base, sequence = _chosen_sequence(config)
    budget = int(config.get(R.CHECK_BUDGET, 0))
    counts = check_models(model, weights, list(retains), [forget_fisher] * len(weights), forget_set, sequence,
                          base=base, budget=budget)
    found = [first_within([c], budget) for c in counts]
    forgets, status = [forget_fisher] * len(weights), ["met"] * len(weights)
    for j, index in enumerate(found):
        if index >= 0:
            continue
        forgets[j] = own_fisher(weights[j])
        (own,) = check_models(model, [weights[j]], [retains[j]], [forgets[j]], forget_set, sequence, base=base,
                              budget=budget)
        found[j] = first_within([own], budget)
        status[j] = "own-fisher" if found[j] >= 0 else "not-met"
        if found[j] < 0:
            found[j] = strongest_usable(sequence, weights[j], retains[j], forgets[j], base)
    return [tuple(sequence[i]) for i in found], forgets, status


def _chosen_sequence(config: Any) -> tuple[FIUnConfig, list[tuple[float, float]]]:
    """The federation's choice a message carries (``fiun-*``) and the check sequence from it over its grid."""
    base = R.fiun_from_config(config)
    return base, check_sequence(base.alpha, base.lam, [float(a) for a in config[R.ALPHAS]],
                                [float(v) for v in config[R.LAMS]])


def _check_content(arrays: Any, config: Any) -> tuple[list[Tensors], list[Tensors], list[int]]:
    """The check models a message carries and, per model, the forget-Fisher it is dampened with and the forget
    samples to check it on."""
    keys = sorted((k for k in arrays if k.startswith(R.CHECK_MODEL_PREFIX)), key=lambda k: int(k.rsplit("-", 1)[1]))
    fisher_of = [int(i) for i in config[R.CHECK_FISHER_OF]]
    rows = [int(n) for n in config[R.CHECK_ROWS]]
    if not keys or len(fisher_of) != len(keys) or len(rows) != len(keys) or min(rows) < 1:
        raise UnlearnError(f"query.checkforget: {len(keys)} check models, {len(fisher_of)} check-fisher-of entries "
                           f"and check-rows {rows[:8]} (one positive count per model)")
    fishers = {i: R.record_to_tensors(arrays[f"{R.CHECK_FISHER_PREFIX}{i}"]) for i in sorted(set(fisher_of))}
    return [R.record_to_tensors(arrays[k]) for k in keys], [fishers[i] for i in fisher_of], rows


def handle_check(spec: ClientSpec, msg: Message, context: Context) -> Message:
    """``query.checkforget``: per sent model, from the chosen candidate towards stronger ones
    (:func:`fl_unlearn.calibrate.check_sequence`), how many of this client's forget samples (the first
    ``check-rows`` of one seeded sample) each step still predicts, up to the first that predicts none
    (``check-counts``, model by model, one entry per step: :func:`fl_unlearn.calibrate.check_models`)."""
    from strategies.client import _seed, load_model, partition_id

    start = time.perf_counter()
    config = R.first_config(msg)
    arrays = msg.content.array_records
    models, fishers, rows = _check_content(arrays, config)
    data = spec.data_fn(context)
    forget_rows, _ = ForgetSpec.from_config(config).split_rows(data)
    forget_set = _sample_tensors(data, forget_rows, max(rows), _seed(context, -3))
    metrics = MetricRecord({R.FORGET_NUM: 0 if forget_set is None else len(forget_set[1])})
    if forget_set is not None:
        base, sequence = _chosen_sequence(config)
        retain = R.record_to_tensors(arrays[R.RETAIN_FISHER_KEY])
        model = load_model(spec, context, models[0])
        counts: list[list[int]] = [[] for _ in models]
        for n in sorted(set(rows)):  # one check_models per sample size (global models; others' local updates)
            group = [i for i, r in enumerate(rows) if r == n]
            found = check_models(model, [models[i] for i in group], retain, [fishers[i] for i in group],
                                 (forget_set[0][:n], forget_set[1][:n]), sequence, base=base,
                                 budget=int(config.get(R.CHECK_BUDGET, 0)))
            for i, row in zip(group, found):
                counts[i] = row
        metrics[R.CHECK_COUNTS] = [c for row in counts for c in row]  # model by model
    metrics[R.SECONDS] = time.perf_counter() - start
    log(INFO, "query.checkforget: partition %d checked %d models on up to %d forget samples in %.2f s",
        partition_id(context), len(models), metrics[R.FORGET_NUM], metrics[R.SECONDS])
    return Message(RecordDict({R.METRICS_KEY: metrics}), reply_to=msg)


def _candidates(config: Any) -> list[tuple[float, float]]:
    alphas, lams = [float(a) for a in config[R.ALPHAS]], [float(v) for v in config[R.LAMS]]
    if len(alphas) != len(lams) or not alphas:
        raise UnlearnError(f"query.calibrate: {len(alphas)} alphas and {len(lams)} lambdas; expected equal, non-zero")
    return list(zip(alphas, lams))


# --- server side -----------------------------------------------------------------------------------------


@dataclass
class CalibrationRound:
    """A ``query.calibrate`` round trip begun (:func:`begin_calibration`): the pushed messages and what they carry.

    :func:`calibrate_at_clients` finishes it. Begun as soon as the merged forget-Fisher exists, the round runs at
    the clients while the server journals and stores the Fishers (``fl_unlearn.recovery``).
    """

    exchange: Exchange
    candidates: list[tuple[float, float]]
    pids: list[int]
    request_kind: str
    budget: int
    sent: tuple[Tensors, Tensors, Tensors]  # the weights, retain-Fisher and forget-Fisher in the messages
    started: float  # time.perf_counter() at the push

    def carries(self, pids: Sequence[int], weights: Tensors, retain_fisher: Tensors, forget_fisher: Tensors,
                request_kind: str, budget: int) -> bool:
        """Whether the round was sent to ``pids`` with these tensors (equal values), kind and keep budget."""
        return (self.pids == list(pids) and self.request_kind == request_kind and self.budget == budget
                and all(_same_tensors(x, y) for x, y in zip(self.sent, (weights, retain_fisher, forget_fisher))))


def _same_tensors(a: Tensors, b: Tensors) -> bool:
    return a is b or (a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))


def _keep_budget(settings: ClientCalibration, request_kind: str, pids: Sequence[int],
                 holders: Sequence[int] | None) -> int:
    return settings.keep_budget(len(pids if holders is None else holders)) if request_kind == "classes" else 0


def begin_calibration(
    grid: Grid,
    nodes: NodeDirectory,
    pids: Sequence[int],
    request_configs: dict[int, dict[str, Any]],
    weights: Tensors,
    retain_fisher: Tensors,
    forget_fisher: Tensors,
    *,
    request_kind: str,
    base: FIUnConfig,
    settings: ClientCalibration = ClientCalibration(),
    holders: Sequence[int] | None = None,
) -> CalibrationRound:
    """Push ``query.calibrate`` to every client in ``pids`` and return at once; the arguments are
    :func:`calibrate_at_clients`'s."""
    from strategies.server import fiun_config

    start = time.perf_counter()
    candidates = candidate_grid(settings.alphas, settings.lams)
    content = {R.ARRAYS_KEY: R.tensors_to_record(weights), R.FORGET_FISHER_KEY: R.tensors_to_record(forget_fisher),
               R.RETAIN_FISHER_KEY: R.tensors_to_record(retain_fisher)}
    fiun = {k: v for k, v in fiun_config(base).items() if k != R.FIUN_ALPHA}
    budget = _keep_budget(settings, request_kind, pids, holders)
    msgs = []
    for pid in pids:
        cfg = ConfigRecord({R.ALPHAS: [a for a, _ in candidates], R.LAMS: [v for _, v in candidates],
                            R.CALIBRATION_FORGET: int(settings.forget_samples),
                            R.CALIBRATION_RETAIN: int(settings.retain_samples),
                            R.CALIBRATION_STOP: request_kind == "classes", R.CALIBRATION_BUDGET: budget,
                            **fiun, **request_configs[pid]})
        msgs.append(Message(RecordDict({**content, R.CONFIG_KEY: cfg}), dst_node_id=nodes.node_of(pid),
                            message_type=R.MSG_CALIBRATE))
    return CalibrationRound(Exchange(grid, msgs, timeout=nodes.timeout), candidates, list(pids), request_kind, budget,
                            (weights, retain_fisher, forget_fisher), start)


def calibrate_at_clients(
    grid: Grid,
    nodes: NodeDirectory,
    pids: Sequence[int],
    request_configs: dict[int, dict[str, Any]],
    weights: Tensors,
    retain_fisher: Tensors,
    forget_fisher: Tensors,
    *,
    request_kind: str,
    base: FIUnConfig,
    settings: ClientCalibration = ClientCalibration(),
    check: Sequence[tuple[str, Tensors, Tensors]] | Callable[[], Sequence[tuple[str, Tensors, Tensors]]] = (),
    holders: Sequence[int] | None = None,
    owners: Mapping[str, int] | None = None,
    begun: CalibrationRound | None = None,
    while_checking: Callable[[float, float], None] | None = None,
) -> CalibrationChoice:
    """One ``query.calibrate`` to every client in ``pids``; sum their counts; choose alpha; then, for a class, check
    every model in ``check`` at the holders (``query.checkforget``, :func:`check_at_clients`).

    Parameters
    ----------
    grid : Grid
    nodes : NodeDirectory
        Partition id -> node id.
    pids : sequence of int
        Clients to ask (all of them: holders score the forget side, every client the kept side).
    request_configs : dict
        Per partition: the keys that tell it what to forget (``strategies.forget.request_config``).
    weights, retain_fisher, forget_fisher : dict
        The model to calibrate on and its Fishers.
    request_kind : str
        ``classes`` (target: ``settings.forget_tolerance``) or ``client`` / ``samples`` (target: the model's
        kept-data accuracy).
    base : FIUnConfig
        The other dampening settings (``lam``, ``exponent``, ...); its alpha is ignored.
    settings : ClientCalibration
    check : sequence of (node id, weights, forget-Fisher), or a callable returning one
        The other affected models to check per model (class requests; dampened with ``retain_fisher``), once the
        choice meets the target. The choice's ``per_model`` gives each its alpha. A callable is called while the
        clients calibrate (loading the models costs the request no time then).
    holders : sequence of int | None (default: None)
        The partitions holding data to forget (they set the keep budget); ``None``: all of ``pids``. The check goes
        to those that replied with forget samples.
    owners : mapping | None (default: None)
        Node id -> partition, for the local updates in ``check``: each is checked by one holder that did not
        train it (:func:`check_plan`). ``None``: every holder checks every model.
    begun : CalibrationRound | None (default: None)
        The round :func:`begin_calibration` already pushed with these arguments; it is finished instead of sending
        another (one sent with other tensors is left unanswered, and a new one sent: logged).
    while_checking : callable | None (default: None)
        Called with the chosen ``(alpha, lambda)`` once the check messages are pushed: work the server can do
        while the holders check (the App's server dampens its models at the choice there).

    Returns
    -------
    CalibrationChoice
    """
    budget = _keep_budget(settings, request_kind, pids, holders)
    if begun is not None and not begun.carries(pids, weights, retain_fisher, forget_fisher, request_kind, budget):
        log(WARNING, "unlearn: the calibration begun early was sent other weights or Fishers than the request "
            "calibrates on; it is sent again")
        begun = None
    if begun is None:
        begun = begin_calibration(grid, nodes, pids, request_configs, weights, retain_fisher, forget_fisher,
                                  request_kind=request_kind, base=base, settings=settings, holders=holders)
    start, candidates = begun.started, begun.candidates
    check = _checkable(check() if callable(check) else check, request_kind, settings)
    records = [R.tensors_to_record(weights) for _, weights, _ in check]  # the check's messages, built meanwhile
    total = GridCounts(candidates, [0] * len(candidates), [0] * len(candidates))
    before_retain, client_seconds, replied_holders = 0, [], []
    for reply in checked_replies(begun.exchange.replies(), "query.calibrate"):
        m = reply.content.metric_records[R.METRICS_KEY]
        forget_correct = [int(v) for v in m[R.FORGET_CORRECT]]
        total = total + GridCounts(candidates, forget_correct, [int(v) for v in m[R.RETAIN_CORRECT]],
                                   int(m[R.FORGET_NUM]), int(m[R.RETAIN_NUM]),
                                   _retain_losses(m, nodes.partition.get(reply.metadata.src_node_id, -1),
                                                  forget_correct))
        before_retain += int(m[R.BEFORE + R.RETAIN_CORRECT])
        client_seconds.append(float(m[R.SECONDS]))
        if int(m[R.FORGET_NUM]) > 0:
            pid = nodes.partition[reply.metadata.src_node_id]
            replied_holders.append(pid)
    if total.forget_num == 0:
        raise UnlearnError("query.calibrate: no client scored any forget sample; cannot calibrate alpha")
    target = settings.forget_tolerance if request_kind == "classes" else before_retain / max(total.retain_num, 1)
    margin = settings.kept_margin(total.retain_num)
    alpha, lam, met = choose_candidate(total, target, kept_margin=margin,
                                       change=dampening_change(weights, retain_fisher, forget_fisher, base))
    choice = CalibrationChoice(alpha, lam, target, met, total, time.perf_counter() - start,
                               max(client_seconds, default=0.0), before_retain / max(total.retain_num, 1),
                               kept_margin=margin)
    if check and met:  # every other affected model, from the choice on, at the holders: a second round trip
        choice.holders = sorted(replied_holders)
        meanwhile = (lambda: while_checking(alpha, lam)) if while_checking is not None else None
        check_at_clients(grid, nodes, choice.holders, request_configs, retain_fisher, check, choice, base, settings,
                         owners, meanwhile=meanwhile, records=records)
        choice.seconds = time.perf_counter() - start
    log(INFO, "unlearn: alpha=auto chose alpha %.4g, lambda %.3g on %d forget / %d kept client samples (target %.3f "
        "%s)", alpha, lam, total.forget_num, total.retain_num, target, "met" if met else "NOT met: forgets most")
    return choice


def _retain_losses(metrics: Any, pid: int, forget_correct: Sequence[int]) -> list[float] | None:
    """A client's kept loss per candidate (``None`` if it sent none: the near ties then go by the weights'
    change); refused unless there is one per candidate, each finite and >= 0 where the client scored the
    candidate and ``UNSCORED_LOSS`` where it did not (its count is ``UNSCORED``)."""
    if R.RETAIN_LOSS not in metrics:
        return None
    values = [float(v) for v in metrics[R.RETAIN_LOSS]]
    if len(values) != len(forget_correct) or any(
            not (v == UNSCORED_LOSS if f == UNSCORED else math.isfinite(v) and v >= 0)
            for v, f in zip(values, forget_correct)):
        raise UnlearnError(f"query.calibrate: partition {pid} sent {len(values)} kept losses for "
                           f"{len(forget_correct)} candidates, or one that is negative, non-finite, or marks a "
                           "candidate unscored that its counts score (or the reverse)")
    return values


def _checkable(check: Sequence[tuple[str, Tensors, Tensors]], request_kind: str,
               settings: ClientCalibration) -> list[tuple[str, Tensors, Tensors]]:
    """The models to check per model: none for client / sample requests, with the check off, or too large."""
    if request_kind != "classes" or settings.check_samples <= 0 or not check:
        return []
    size = sum(t.numel() * t.element_size() for _, w, _ in check for t in w.values())
    if size > CHECK_MAX_BYTES:
        log(INFO, "unlearn: per-model check skipped: %d models, %.0f MiB of weights per message (limit %.0f MiB)",
            len(check), size / 2**20, CHECK_MAX_BYTES / 2**20)
        return []
    return list(check)


def check_plan(check_ids: Sequence[str], owners: Mapping[str, int], holders: Sequence[int],
               settings: ClientCalibration) -> dict[int, list[tuple[int, int]]]:
    """Per holder: ``(index into check_ids, forget samples)`` of the models it checks.

    A global model goes to every holder, ``check_samples`` of its forget samples each (every client received it).
    A client's local update (``owners``: node id -> partition) goes to one holder that did not train it, the one
    with the fewest such updates so far, and is checked there on :meth:`ClientCalibration.single_check_rows`
    samples, as many as all holders check a global model on together. Data the update never saw is what
    held-out accuracy measures: checked on its own client's training samples instead, a round-1 update of
    ``baselines.py`` kept at most 3 of 128 at the choice and still predicted 10 % of the class held out (0.0 %, at a
    stronger candidate, when other clients' samples checked it). Only when its own client is the one holder is an
    update checked there.

    Examples
    --------
    >>> check_plan(["global-r1", "local-r1-p0", "local-r1-p1", "local-r1-p2"],
    ...            {"local-r1-p0": 0, "local-r1-p1": 1, "local-r1-p2": 2}, [0, 1], ClientCalibration(check_samples=32))
    {0: [(0, 32), (2, 64), (3, 64)], 1: [(0, 32), (1, 64)]}
    """
    plan: dict[int, list[tuple[int, int]]] = {h: [] for h in holders}
    singles = dict.fromkeys(holders, 0)  # local updates given to each holder so far
    for i, node_id in enumerate(check_ids):
        if node_id not in owners:
            for h in holders:
                plan[h].append((i, settings.check_samples))
            continue
        others = [h for h in holders if h != owners[node_id]] or list(holders)
        checker = min(others, key=lambda h: (singles[h], h))
        singles[checker] += 1
        plan[checker].append((i, settings.single_check_rows(len(holders))))
    return plan


def check_at_clients(grid: Grid, nodes: NodeDirectory, holders: Sequence[int],
                     request_configs: dict[int, dict[str, Any]], retain_fisher: Tensors,
                     check: Sequence[tuple[str, Tensors, Tensors]], choice: CalibrationChoice, base: FIUnConfig,
                     settings: ClientCalibration, owners: Mapping[str, int] | None = None, *,
                     meanwhile: Callable[[], None] | None = None, records: Sequence[Any] | None = None) -> None:
    """``query.checkforget`` to ``holders``: set ``choice.per_model`` / ``per_model_met`` of every model in
    ``check`` (node id, weights, the forget-Fisher it is dampened with) from the chosen candidate on. Each holder
    gets the models :func:`check_plan` gives it (``owners``: node id -> partition of the local updates among
    them; ``None``: every holder checks every model). ``meanwhile`` is called once the messages are pushed, before
    the replies are collected; ``records`` are the models' weights as ArrayRecords, if built already."""
    from strategies.server import fiun_config

    plan = check_plan([node_id for node_id, _, _ in check], owners or {}, holders, settings)
    own = sum(1 for node_id, _, _ in check if node_id in (owners or {}))
    log(INFO, "unlearn: per-model check at %d holders: %d models at every holder, %d local updates each at one "
        "holder that did not train it", len(holders), len(check) - own, own)
    retain = R.tensors_to_record(retain_fisher)
    if records is None:  # built once, shared by the messages
        records = [R.tensors_to_record(weights) for _, weights, _ in check]
    fiun = fiun_config(dataclasses.replace(base, alpha=choice.alpha, lam=choice.lam))
    budget = settings.check_budget(len(holders))
    msgs = []
    for pid in [h for h in holders if plan[h]]:  # a holder with nothing to check gets no message
        content: dict[str, Any] = {R.RETAIN_FISHER_KEY: retain}
        check_cfg = _add_check_models(content, [check[i] for i, _ in plan[pid]], [records[i] for i, _ in plan[pid]])
        msgs.append(Message(RecordDict({**content, R.CONFIG_KEY: ConfigRecord({
            R.ALPHAS: list(settings.alphas), R.LAMS: list(settings.lams), R.CHECK_ROWS: [n for _, n in plan[pid]],
            R.CHECK_BUDGET: budget, **check_cfg, **fiun, **request_configs[pid]})}), dst_node_id=nodes.node_of(pid),
            message_type=R.MSG_CHECK))
    sequence = check_sequence(choice.alpha, choice.lam, settings.alphas, settings.lams)
    counts: list[list[list[int]]] = [[] for _ in check]  # per model: one row of counts per holder that checked it
    round_trip = Exchange(grid, msgs, timeout=nodes.timeout)
    if meanwhile is not None:
        meanwhile()
    for reply in checked_replies(round_trip.replies(), "query.checkforget"):
        m = reply.content.metric_records[R.METRICS_KEY]
        mine = plan.get(nodes.partition.get(reply.metadata.src_node_id, -1), [])
        if int(m[R.FORGET_NUM]) > 0:
            values = [int(v) for v in m[R.CHECK_COUNTS]]
            if len(values) != len(mine) * len(sequence) or any(not NOT_WALKED <= v <= budget + 1 for v in values):
                raise UnlearnError(f"query.checkforget: {len(values)} counts for {len(mine)} models and a sequence "
                                   f"of {len(sequence)} candidates, or one outside [{NOT_WALKED}, {budget + 1}]")
            for j, (i, _) in enumerate(mine):
                counts[i].append(values[j * len(sequence):(j + 1) * len(sequence)])
    _set_per_model(choice, check, sequence, counts, retain_fisher, base, budget)


def _set_per_model(choice: CalibrationChoice, check: Sequence[tuple[str, Tensors, Tensors]],
                   sequence: Sequence[tuple[float, float]], counts: Sequence[Sequence[Sequence[int]]],
                   retain_fisher: Tensors, base: FIUnConfig, budget: int) -> None:
    """Set ``choice.per_model`` / ``per_model_met`` from the counts per model (one row per holder that checked
    it, one entry per step): the first step where they add up to at most ``budget``; a model no candidate makes
    forget (or that no holder checked) gets the strongest one that zeroes no more than half of any of its weight
    tensors."""
    for i, (node_id, weights, forget) in enumerate(check):
        fallback = strongest_usable(sequence, weights, retain_fisher, forget, base) \
            if first_within(counts[i], budget) < 0 else -1
        candidate, met = per_model_candidate(sequence, counts[i], fallback, budget=budget)
        choice.per_model[node_id], choice.per_model_met[node_id] = candidate, met
    unmet = sorted(node_id for node_id, _, _ in check if not choice.per_model_met[node_id])
    if unmet:  # dampening with this forget-Fisher cannot reach these models' class; say so, do not hide it
        log(WARNING, "unlearn: per-model check: no candidate forgot the class on %s within the budget; they get the "
            "strongest one that zeroes no more than half of any weight tensor (%s) and per_model_met = false", unmet,
            ", ".join(f"{k}: alpha {choice.per_model[k][0]:g} lambda {choice.per_model[k][1]:g}" for k in unmet))
    stronger = {k: v for k, v in choice.per_model.items() if v != (choice.alpha, choice.lam)}
    log(INFO, "unlearn: per-model check of %d models: %d need a stronger dampening%s", len(check), len(stronger),
        f" ({', '.join(f'{k}: alpha {a:g} lambda {v:g}' for k, (a, v) in stronger.items())})" if stronger else "")


def _add_check_models(content: dict[str, Any], check: Sequence[tuple[str, Tensors, Tensors]],
                      records: Sequence[Any]) -> dict[str, Any]:
    """Put the check models (``records``: their weights as ArrayRecords) and their distinct forget-Fishers into
    ``content``; return the config entries."""
    if not check:
        return {}
    index: dict[int, int] = {}
    fisher_of = []
    for i, ((_, _, forget), record) in enumerate(zip(check, records)):
        if id(forget) not in index:
            index[id(forget)] = len(index)
            content[f"{R.CHECK_FISHER_PREFIX}{index[id(forget)]}"] = R.tensors_to_record(forget)
        fisher_of.append(index[id(forget)])
        content[f"{R.CHECK_MODEL_PREFIX}{i}"] = record
    return {R.CHECK_FISHER_OF: fisher_of}

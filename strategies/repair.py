"""An optional short repair after FIUn: a few FedAvg rounds of capped SGD steps on the clients' kept data.

Dampening strong enough to forget some classes (MNIST class 5 needs weights zeroed at alpha 2) also costs
kept accuracy; a few SGD steps on kept data win it back (the forgotten label is never a target), and the forget
guard keeps the class from coming back with them. So, when ``alpha="auto"`` had to give up more than
``tolerance`` of kept accuracy on the calibration samples, or (a class request, guard on) left any scored forget
sample correct, the server runs ``train.repair`` rounds on the unlearned global model:

- every client draws ``samples`` rows of its kept data (seeded), holds a quarter back for validation, reports
  the validation loss of the weights it received, and takes ``local_steps`` SGD steps on the rest;
- with ``repair-forget-weight`` > 0 (the default, 1), a client holding data to forget also draws up to ``samples``
  of its forget rows: each step adds, with that weight, the bounded forget guard ``-log(1 - p_label)`` on a batch
  of them (``fl_unlearn.calibrate.forget_guard_loss``), and it reports the guard on its held-back quarter, which
  the server adds, weighted, to the validation loss. Kept data alone let a forgotten class back by a held-out row
  on digits (seeds 42 and 45); nothing in it holds the class's logit down on the class's own inputs;
- the server averages the replies (FedAvg) and stops when the summed validation loss stops improving, or after
  ``max_rounds`` (plus one validation-only round for the last average);
- all repairs of one request share a :class:`RepairBudget` (``repair-budget``, a fraction of the training run's
  ``train_s``): once it is spent, rounds under way end with a validation-only round and repairs not yet begun
  are skipped, so the optional repair never costs much more than training the federation did.

The repaired model is a new lineage node below the unlearned one. Its cost is ``timing.repair_s``, apart from
``unlearn_s``; results.json reports the final global model before and after it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from fl_unlearn.calibrate import (FeatureCache, RepairConfig, count_correct, guard_sum, head_scores, loss_sum,
                                  repair_steps, split_validation, weighted_average)
from fl_unlearn.errors import ConfigError, UnlearnError
from strategies import records as R
from strategies.config import check_repair_budget
from strategies.forget import ForgetSpec

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from strategies.client import ClientSpec
    from strategies.nodes import NodeDirectory

Tensors = dict[str, torch.Tensor]
REPAIR_MODES = ("auto", "on", "off")
#: This process's body features for ``repair-part=head`` (``train.repair`` sends the model every round and only its
#: head changes, so a client that handles the next round of the same repair reuses them)
HEAD_FEATURES = FeatureCache(size=16)


@dataclass(frozen=True)
class RepairSettings:
    """When and how the App repairs the unlearned global model.

    Parameters
    ----------
    mode : str (default: "auto")
        ``auto``: repair when calibration lost more than ``tolerance`` of kept accuracy; ``on``: always;
        ``off``: never.
    tolerance : float (default: 0.01)
        Kept-accuracy loss on the calibration samples (a fraction) that ``auto`` accepts without repair.
    samples : int (default: 256)
        Kept rows each client draws for the repair (a quarter held back for validation).
    steps : RepairConfig
        Rounds, local steps, lr, momentum, batch size, patience.
    """

    mode: str = "auto"
    tolerance: float = 0.01
    samples: int = 256
    steps: RepairConfig = RepairConfig()

    def __post_init__(self) -> None:
        if self.mode not in REPAIR_MODES:
            raise ConfigError(f"repair={self.mode!r} is not one of {', '.join(REPAIR_MODES)}")
        if not 0 <= self.tolerance <= 1 or self.samples < 2:
            raise ConfigError(f"repair needs 0 <= tolerance <= 1 and samples >= 2, got {self.tolerance}, {self.samples}")

    def wanted(self, calibration: dict[str, Any], request_kind: str = "classes") -> bool:
        """Whether to repair after a calibration that reported ``retain_before`` and ``retain_after``.

        ``auto`` repairs when kept accuracy fell by more than ``tolerance``, and, for a class request with the forget
        guard on, when the chosen dampening still left some of the scored forget samples correct (a model that never
        saw the class gets none; digits, seed 45, class 0: 2 % of them and one held-out row of 29 were left, at no
        kept-accuracy cost, and the guarded repair took both to 0).
        """
        if self.mode != "auto":
            return self.mode == "on"
        before, after = calibration.get("retain_before"), calibration.get("retain_after")
        if before is not None and after is not None and before - after > self.tolerance:
            return True
        left = calibration.get("forget_after")
        return request_kind == "classes" and self.steps.forget_weight > 0 and left is not None and left > 0


@dataclass
class RepairBudget:
    """The seconds all repairs of one request may take together.

    On Flower's Deployment Engine each repair round is a round trip of 10-15 s, and with ``repair-scope=all`` the
    earlier global model took 18 of them: 212.6 s of repair against 33.3 s of retraining (docs/INTEGRATION.md). The
    budget counts the time spent inside :meth:`counting` blocks (the repairs, not the evaluations between them);
    a repair checks :meth:`spent` between round trips and ends with a validation-only round once it is, and a
    repair that has not begun is skipped (:meth:`skip`). What the budget cut is reported (:meth:`report`).

    Parameters
    ----------
    seconds : float
        The budget; ``math.inf`` for none.
    skipped, stopped : list[str] (default: empty)
        What the budget cut: repairs skipped before they began, and models whose rounds it ended (the callers
        record both).
    """

    seconds: float
    skipped: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    _used: float = field(default=0.0, init=False, repr=False)
    _since: float | None = field(default=None, init=False, repr=False)

    @classmethod
    def of(cls, fraction: float, train_s: float | None) -> RepairBudget:
        """``fraction`` of the training run's ``train_s`` (``repair-budget``); no limit for a fraction of 0 or an
        unknown training time."""
        check_repair_budget(fraction)
        if fraction == 0 or not train_s or train_s <= 0:
            return cls(math.inf)
        return cls(fraction * train_s)

    @contextmanager
    def counting(self) -> Iterator[RepairBudget]:
        """Count the time spent inside the block (re-entrant: a repair inside a counted phase counts once)."""
        outer = self._since is None
        if outer:
            self._since = time.perf_counter()
        try:
            yield self
        finally:
            if outer:
                self._used += time.perf_counter() - self._since
                self._since = None

    def elapsed(self) -> float:
        """Seconds counted so far."""
        return self._used + (time.perf_counter() - self._since if self._since is not None else 0.0)

    def spent(self) -> bool:
        """Whether the repairs have taken the whole budget."""
        return self.elapsed() >= self.seconds

    def skip(self, what: str) -> bool:
        """True (and ``what`` recorded as skipped) when the budget is spent before the repair of ``what`` begins."""
        if not self.spent():
            return False
        log(WARNING, "repair: budget of %.1f s spent after %.1f s; %s left as unlearned", self.seconds,
            self.elapsed(), what)
        self.skipped.append(what)
        return True

    def report(self) -> dict[str, Any]:
        return {"seconds": None if math.isinf(self.seconds) else self.seconds, "elapsed": self.elapsed(),
                "skipped": list(self.skipped), "stopped": list(self.stopped)}


# --- client side -----------------------------------------------------------------------------------------


def handle_repair(spec: ClientSpec, msg: Message, context: Context) -> Message:
    """``train.repair``: for each model in the message (``model-0``, ``model-1``, ...), the validation loss and
    counts of the received weights on the held-back rows, then its ``repair-steps`` (one entry per model; 0: only
    validate) capped SGD steps on kept data (and, at a holder with ``repair-forget-weight`` > 0, the forget guard on
    its forget rows). Replies ``model-n`` (trained weights, where steps were asked) and ``metrics-n`` per model."""
    from strategies.client import load_model, partition_id

    config = R.first_config(msg)
    steps = [int(v) for v in config[R.REPAIR_STEPS]]
    weights = [R.record_to_tensors(msg.content.array_records[f"{R.MODEL_KEY_PREFIX}{n}"]) for n in range(len(steps))]
    data = spec.data_fn(context)
    fraction = float(config[R.REPAIR_VAL_FRACTION])
    kept, forget = _repair_samples(data, config, context)
    if kept is None:
        empty = MetricRecord({R.NUM_EXAMPLES: 0, R.VAL_LOSS: 0.0, R.VAL_NUM: 0, R.VAL_CORRECT: 0,
                              R.FORGET_VAL_LOSS: 0.0, R.FORGET_VAL_NUM: 0, R.FORGET_VAL_CORRECT: 0})
        return Message(RecordDict({f"{R.METRICS_KEY}-{n}": empty for n in range(len(steps))}), reply_to=msg)
    train, val = split_validation(*kept, fraction=fraction)
    forget_train, forget_val = split_validation(*forget, fraction=fraction) if forget is not None else (None, None)
    model = load_model(spec, context, weights[0])
    cfg = RepairConfig(local_steps=max(max(steps), 1), lr=float(config[R.REPAIR_LR]),
                       momentum=float(config[R.REPAIR_MOMENTUM]), batch_size=int(config[R.REPAIR_BATCH]),
                       forget_weight=float(config.get(R.REPAIR_FORGET_WEIGHT, 0.0)),
                       part=str(config.get(R.REPAIR_PART, "all")))
    out: dict[str, Any] = {}
    for n, (w, local_steps) in enumerate(zip(weights, steps)):
        out[f"{R.METRICS_KEY}-{n}"] = MetricRecord({R.NUM_EXAMPLES: len(train[1]), **_validation(model, w, val,
                                                                                                   forget_val, cfg)})
        if local_steps > 0:
            new = repair_steps(model, w, train, replace(cfg, local_steps=local_steps),
                               seed=(partition_id(context), int(config[R.REPAIR_ROUND])), forget=forget_train,
                               cache=HEAD_FEATURES)
            out[f"{R.MODEL_KEY_PREFIX}{n}"] = R.tensors_to_record(new)
    return Message(RecordDict(out), reply_to=msg)


def _validation(model: torch.nn.Module, weights: Tensors, val: tuple[torch.Tensor, torch.Tensor],
                forget_val: tuple[torch.Tensor, torch.Tensor] | None, cfg: RepairConfig) -> dict[str, Any]:
    """A ``train.repair`` client's figures of ``weights`` on its held-back rows. For ``repair-part=head`` from the
    head over the body's features, which this process keeps across the rounds of the repair (:data:`HEAD_FEATURES`):
    the body does not change while the head is repaired."""
    forget_num = len(forget_val[1]) if forget_val is not None else 0
    if cfg.part == "head":
        (val_loss, val_correct, _), (_, forget_correct, forget_loss) = head_scores(model, weights, val, forget_val,
                                                                                    cache=HEAD_FEATURES)
    else:
        val_loss, val_correct = loss_sum(model, weights, *val), count_correct(model, weights, val)
        forget_loss = guard_sum(model, weights, *forget_val) if forget_val is not None else 0.0
        forget_correct = count_correct(model, weights, forget_val)
    return {R.VAL_LOSS: val_loss, R.VAL_NUM: len(val[1]), R.VAL_CORRECT: val_correct, R.FORGET_VAL_LOSS: forget_loss,
            R.FORGET_VAL_NUM: forget_num, R.FORGET_VAL_CORRECT: forget_correct}


def _repair_samples(data: Any, config: Any, context: Context) -> tuple[Any, Any]:
    """This client's repair rows: ``(kept, forget)``, each at most ``repair-samples`` (seeded) as one batch, or
    ``None``. The forget rows are drawn only for the guard (``repair-forget-weight`` > 0) and need at least two
    (one held back)."""
    from strategies.calibration import _sample_tensors
    from strategies.client import _seed

    forget_rows, retain_rows = ForgetSpec.from_config(config).split_rows(data)
    cap = int(config[R.REPAIR_SAMPLES])
    kept = _sample_tensors(data, retain_rows, cap, _seed(context, -5))
    guarded = float(config.get(R.REPAIR_FORGET_WEIGHT, 0.0)) > 0 and len(forget_rows) > 1
    forget = _sample_tensors(data, forget_rows, cap, _seed(context, -6)) if guarded else None
    return kept, forget


def handle_repair_held(spec: ClientSpec, msg: Message, context: Context) -> Message:
    """``train.repairheld``: repair the models this client holds (derived models, just unlearned) on its own kept
    data, with no round trip per step: :func:`fl_unlearn.calibrate.repair` on one kept sample (a quarter held back;
    SGD steps until the validation loss stops improving, the best version kept). Each is stored as a new version
    under the id the server gave it."""
    from fl_unlearn.calibrate import repair
    from strategies.client import MODELS_DOC, client_store, held_index, load_model, partition_id

    config = R.first_config(msg)
    store = client_store(context, config)
    ids, new_ids = [str(i) for i in config[R.MODEL_IDS]], [str(i) for i in config[R.NODE_ID]]
    index = held_index(store, ids)
    if len(ids) != len(new_ids):
        raise UnlearnError(f"train.repairheld: {len(ids)} models but {len(new_ids)} new ids ({ids} -> {new_ids})")
    data = spec.data_fn(context)
    kept, forget_rows = _repair_samples(data, config, context)
    if kept is None:
        raise UnlearnError("train.repairheld: this client holds no kept data to repair on")
    cfg = _local_repair_config(config, seed=partition_id(context))
    out = {}
    for n, (old, new) in enumerate(zip(ids, new_ids)):
        weights = store.get(index[old]["weights"])
        parent = index[old].get("parent")  # the model before unlearning (train.unlearn records it as the parent)
        original = store.get(index[parent]["weights"]) if parent in index else None
        repaired, info = repair(load_model(spec, context, weights), weights, [kept], cfg=cfg, forget_sets=[forget_rows],
                                original=original)
        digest = store.put(repaired, {"node": new, "repair-of": old})
        index[new] = {**index[old], "weights": digest, "parent": old, "replaces": old}
        out[f"{R.NODE_KEY_PREFIX}{n}"] = ConfigRecord({
            R.PARENT_ID: old, R.NODE_ID: new, R.WEIGHTS_DIGEST: digest, R.REPAIR_ROUND: int(info["repair_rounds"]),
            R.VAL_LOSS: [float(v) for v in info["val_loss"]]})
    store.put_json(MODELS_DOC, index)
    log(INFO, "train.repairheld: partition %d repaired %d models", partition_id(context), len(ids))
    return Message(RecordDict(out), reply_to=msg)


def handle_repair_sent(spec: ClientSpec, msg: Message, context: Context) -> Message:
    """``train.repairsent``: models the server holds that this client trained (its local updates, just unlearned),
    sent with their versions from before unlearning. Per model, the ``repair=auto`` rule on the rows the repair
    holds back (:func:`rule_figures`) decides; a model it picks is repaired here with no round trip per step
    (:func:`fl_unlearn.calibrate.repair`, as for ``train.repairheld``) and sent back. Nothing is stored here."""
    from fl_unlearn.calibrate import repair
    from strategies.client import load_model, partition_id

    config = R.first_config(msg)
    ids = [str(i) for i in config[R.MODEL_IDS]]
    arrays = msg.content.array_records
    for n in range(len(ids)):
        if f"{R.MODEL_KEY_PREFIX}{n}" not in arrays or f"{R.ORIGINAL_KEY_PREFIX}{n}" not in arrays:
            raise UnlearnError(f"{R.MSG_REPAIR_SENT}: model {ids[n]!r} came without its weights or its original")
    data = spec.data_fn(context)
    kept, forget = _repair_samples(data, config, context)
    if kept is None or len(kept[1]) < 2:  # everything it held is forgotten: nothing to score or repair on
        return Message(RecordDict({f"{R.NODE_KEY_PREFIX}{n}": ConfigRecord({R.NODE_ID: i, R.REPAIR_WANTED: 0,
                                                                           R.REPAIR_ROUND: 0})
                                   for n, i in enumerate(ids)}), reply_to=msg)
    cfg = _local_repair_config(config, seed=partition_id(context))
    settings = RepairSettings(mode=str(config[R.REPAIR_MODE]), tolerance=float(config[R.REPAIR_TOLERANCE]),
                              steps=cfg)
    kind = "classes" if ForgetSpec.from_config(config).classes else "other"
    out: dict[str, Any] = {}
    model = None
    for n, model_id in enumerate(ids):
        weights = R.record_to_tensors(arrays[f"{R.MODEL_KEY_PREFIX}{n}"])
        original = R.record_to_tensors(arrays[f"{R.ORIGINAL_KEY_PREFIX}{n}"])
        model = model or load_model(spec, context, weights)  # one instance: weights go in per call
        figures = rule_figures(model, original, weights, [kept], [forget], cfg.validation_fraction)
        wanted = settings.wanted(figures, kind)
        reply = {R.NODE_ID: model_id, R.REPAIR_WANTED: int(wanted), R.REPAIR_ROUND: 0,
                 **{key: float(v) for key, v in figures.items() if v is not None}}
        if wanted:
            weights, info = repair(model, weights, [kept], cfg=cfg, forget_sets=[forget], original=original)
            out[f"{R.MODEL_KEY_PREFIX}{n}"] = R.tensors_to_record(weights)
            reply.update({R.REPAIR_ROUND: int(info["repair_rounds"]), R.VAL_LOSS: [float(v) for v in info["val_loss"]]})
        out[f"{R.NODE_KEY_PREFIX}{n}"] = ConfigRecord(reply)
    log(INFO, "train.repairsent: partition %d repaired %d of %d models", partition_id(context),
        sum(k.startswith(R.MODEL_KEY_PREFIX) for k in out), len(ids))
    return Message(RecordDict(out), reply_to=msg)


def rule_figures(model: torch.nn.Module, original: Tensors, unlearned: Tensors,
                 kept: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 forget: Sequence[tuple[torch.Tensor, torch.Tensor] | None], fraction: float) -> dict[str, float | None]:
    """What :meth:`RepairSettings.wanted` reads, for one model on its clients' repair rows (one ``kept`` and one
    ``forget`` set, or ``None``, per client): kept accuracy of the ``original`` and the ``unlearned`` weights on the
    held-back share of the kept rows (the rows the repair validates on, never trained on), and the share of the
    held-back forget rows still predicted (``None`` without any; a set needs two rows, one held back)."""
    kept_val = [split_validation(*rows, fraction=fraction)[1] for rows in kept]
    num = max(sum(len(y) for _, y in kept_val), 1)
    forget_val = [split_validation(*rows, fraction=fraction)[1] for rows in forget
                  if rows is not None and len(rows[1]) > 1]
    num_forget = sum(len(y) for _, y in forget_val)
    return {"retain_before": sum(count_correct(model, original, rows) for rows in kept_val) / num,
            "retain_after": sum(count_correct(model, unlearned, rows) for rows in kept_val) / num,
            "forget_after": sum(count_correct(model, unlearned, rows) for rows in forget_val) / num_forget
            if num_forget else None}


def _local_repair_fields(settings: RepairSettings) -> dict[str, Any]:
    """The fields of a ``train.repairheld`` / ``train.repairsent`` message that :func:`_local_repair_config` reads."""
    steps = settings.steps
    return {R.REPAIR_SAMPLES: settings.samples, R.REPAIR_ROUNDS: steps.max_rounds, R.REPAIR_STEPS: steps.local_steps,
            R.REPAIR_LR: steps.lr, R.REPAIR_MOMENTUM: steps.momentum, R.REPAIR_BATCH: steps.batch_size,
            R.REPAIR_VAL_FRACTION: steps.validation_fraction, R.REPAIR_FORGET_WEIGHT: steps.forget_weight,
            R.REPAIR_STOP: steps.stop, R.REPAIR_PART: steps.part}


def _local_repair_config(config: Any, seed: int) -> RepairConfig:
    """The :class:`RepairConfig` a ``train.repairheld`` / ``train.repairsent`` message asks for."""
    return RepairConfig(max_rounds=int(config[R.REPAIR_ROUNDS]), local_steps=int(config[R.REPAIR_STEPS]),
                        lr=float(config[R.REPAIR_LR]), momentum=float(config[R.REPAIR_MOMENTUM]),
                        batch_size=int(config[R.REPAIR_BATCH]),
                        validation_fraction=float(config[R.REPAIR_VAL_FRACTION]), seed=seed,
                        forget_weight=float(config.get(R.REPAIR_FORGET_WEIGHT, 0.0)),
                        stop=str(config.get(R.REPAIR_STOP, "stall")), part=str(config.get(R.REPAIR_PART, "all")))


# --- server side -----------------------------------------------------------------------------------------


def repair_at_clients(
    grid: Grid,
    nodes: NodeDirectory,
    pids: Sequence[int],
    request_configs: dict[int, dict[str, Any]],
    weights: Tensors,
    settings: RepairSettings = RepairSettings(),
    original: Tensors | None = None,
    budget: RepairBudget | None = None,
) -> tuple[Tensors, dict[str, Any]]:
    """FedAvg rounds of ``train.repair`` on ``weights``; returns the best weights by validation loss and a report.
    With ``settings.steps.stop == "restore"`` and the ``original`` (the model before unlearning), the rounds also
    stop once the kept validation loss is back at the original's; with a ``budget``, once it is spent.

    Returns
    -------
    (weights, info)
        ``info``: ``rounds`` (training rounds run), ``val_loss`` (per model version, index 0 = the input),
        ``chosen`` (index of the returned version), ``budget_cut`` (the budget ended the rounds), ``seconds``.
    """
    [(best, info)] = repair_many_at_clients(grid, nodes, pids, request_configs, [weights], settings, [original],
                                            budget)
    return best, info


def repair_many_at_clients(
    grid: Grid,
    nodes: NodeDirectory,
    pids: Sequence[int],
    request_configs: dict[int, dict[str, Any]],
    models: Sequence[Tensors],
    settings: RepairSettings = RepairSettings(),
    originals: Sequence[Tensors | None] | None = None,
    budget: RepairBudget | None = None,
) -> list[tuple[Tensors, dict[str, Any]]]:
    """:func:`repair_at_clients` for several models at once: each round one ``train.repair`` per client carries
    every model still repairing, and each model stops on its own (validation loss stalled, back at its original's
    with ``stop="restore"``, or ``max_rounds``), so k models cost the round trips of the slowest, not k times as
    many. ``originals`` (aligned with ``models``) ride along in the first round, validation only. Once ``budget`` is
    spent, the next round only validates the models' last averages (as after ``max_rounds``) and ends them all.
    Returns ``(weights, info)`` per model."""
    from strategies.nodes import checked_replies, exchange

    start = time.perf_counter()
    steps = settings.steps
    runs = [_RepairRun(w) for w in models]
    restoring = steps.stop == "restore" and originals is not None
    first_extra = [(run, o) for run, o in zip(runs, originals or []) if restoring and o is not None]
    with budget.counting() if budget is not None else nullcontext():
        rnd = 0
        while active := [r for r in runs if not r.done]:
            # a model's last round (max_rounds reached, or the budget spent) only validates the last average
            cut = rnd > 0 and budget is not None and budget.spent()
            if cut:
                for run in active:
                    run.budget_cut = run.rounds < steps.max_rounds
                log(WARNING, "repair: budget of %.1f s spent after %.1f s; validating the last average of %d "
                    "model(s) and stopping", budget.seconds, budget.elapsed(), len(active))
            local_steps = [steps.local_steps if r.rounds < steps.max_rounds and not cut else 0 for r in active]
            extra = first_extra if rnd == 0 else []
            msgs = [_repair_message(nodes, pid, [r.current for r in active] + [o for _, o in extra],
                                    request_configs[pid], settings, rnd, local_steps + [0] * len(extra))
                    for pid in pids]
            replies = list(checked_replies(exchange(grid, msgs, timeout=nodes.timeout), R.MSG_REPAIR))
            for k, (run, _) in enumerate(extra):  # the originals' kept loss: where "restored" is
                run.restore = _kept_mean([r.content.metric_records[f"{R.METRICS_KEY}-{len(active) + k}"]
                                          for r in replies])
            for n, (run, n_steps) in enumerate(zip(active, local_steps)):
                metrics = [r.content.metric_records[f"{R.METRICS_KEY}-{n}"] for r in replies]
                kept = _kept_mean(metrics)
                run.losses.append(kept + steps.forget_weight * _guard_mean(metrics))
                left = steps.forget_weight > 0 and any(int(m.get(R.FORGET_VAL_CORRECT, 0)) for m in metrics)
                run.restored = run.restore is not None and kept <= run.restore and not left
                if n_steps == 0 or run.stale >= steps.patience or run.restored:
                    run.done = True
                    continue
                updates = [(R.record_to_tensors(r.content.array_records[f"{R.MODEL_KEY_PREFIX}{n}"]),
                            int(m[R.NUM_EXAMPLES])) for r, m in zip(replies, metrics) if int(m[R.NUM_EXAMPLES]) > 0]
                run.current = weighted_average([u for u, _ in updates], [k for _, k in updates])
                run.versions.append(run.current)
                run.rounds += 1
            rnd += 1
    seconds = time.perf_counter() - start
    out = []
    for run in runs:
        chosen = min(range(len(run.losses)), key=run.losses.__getitem__)
        out.append((run.versions[chosen], {"rounds": run.rounds, "val_loss": run.losses, "chosen": chosen,
                                           "restore_loss": run.restore, "restored": run.restored,
                                           "budget_cut": run.budget_cut, "seconds": seconds}))
        log(INFO, "repair: %d rounds on %d clients, validation loss %s, kept version %d", run.rounds, len(pids),
            " -> ".join(f"{v:.4f}" for v in run.losses), chosen)
    log(INFO, "repair: %d model(s) in %d round trips (%.2f s)", len(runs), rnd, seconds)
    return out


class _RepairRun:
    """One model's repair state in :func:`repair_many_at_clients`."""

    def __init__(self, weights: Tensors) -> None:
        self.current, self.versions, self.losses = weights, [weights], []
        self.rounds, self.done = 0, False
        self.restore: float | None = None  # the original's kept validation loss (stop="restore")
        self.restored = False
        self.budget_cut = False  # the repair budget ended the rounds

    @property
    def stale(self) -> int:
        """Rounds since the best validation loss so far."""
        return len(self.losses) - 1 - min(range(len(self.losses)), key=self.losses.__getitem__)


def _kept_mean(metrics: Sequence[Any]) -> float:
    """Mean cross-entropy over the clients' held-back kept rows."""
    n_val = sum(int(m[R.VAL_NUM]) for m in metrics)
    if n_val == 0:
        raise UnlearnError("train.repair: no client holds kept data to repair on")
    return sum(float(m[R.VAL_LOSS]) for m in metrics) / n_val


def _guard_mean(metrics: Sequence[Any]) -> float:
    """The holders' forget guard on their held-back forget rows, per row (0 where none reported any)."""
    n = sum(int(m.get(R.FORGET_VAL_NUM, 0)) for m in metrics)
    return sum(float(m.get(R.FORGET_VAL_LOSS, 0.0)) for m in metrics) / n if n else 0.0


def _repair_message(nodes: NodeDirectory, pid: int, models: Sequence[Tensors], request_config: dict[str, Any],
                    settings: RepairSettings, rnd: int, local_steps: Sequence[int]) -> Message:
    steps = settings.steps
    cfg = ConfigRecord({R.REPAIR_SAMPLES: settings.samples, R.REPAIR_STEPS: [int(k) for k in local_steps],
                        R.REPAIR_LR: steps.lr, R.REPAIR_MOMENTUM: steps.momentum, R.REPAIR_BATCH: steps.batch_size,
                        R.REPAIR_ROUND: rnd, R.REPAIR_VAL_FRACTION: steps.validation_fraction,
                        R.REPAIR_FORGET_WEIGHT: steps.forget_weight, R.REPAIR_PART: steps.part, **request_config})
    arrays = {f"{R.MODEL_KEY_PREFIX}{n}": R.tensors_to_record(w) for n, w in enumerate(models)}
    return Message(RecordDict({**arrays, R.CONFIG_KEY: cfg}), dst_node_id=nodes.node_of(pid),
                   message_type=R.MSG_REPAIR)


def repair_held_at_clients(grid: Grid, nodes: NodeDirectory, held: dict[int, list[tuple[str, str]]],
                           request_configs: dict[int, dict[str, Any]], store_dir: str,
                           settings: RepairSettings = RepairSettings()) -> dict[str, dict[str, Any]]:
    """One ``train.repairheld`` per client holding models to repair (``held``: partition -> [(model id, id of its
    repaired version)]), all at once. Returns model id -> ``{"node", "digest", "rounds", "val_loss"}``."""
    from strategies.nodes import checked_replies, exchange

    msgs = []
    for pid, pairs in sorted(held.items()):
        cfg = ConfigRecord({R.MODEL_IDS: [a for a, _ in pairs], R.NODE_ID: [b for _, b in pairs],
                            R.STORE_DIR: store_dir, **_local_repair_fields(settings), **request_configs[pid]})
        msgs.append(Message(RecordDict({R.CONFIG_KEY: cfg}), dst_node_id=nodes.node_of(pid),
                            message_type=R.MSG_REPAIR_HELD))
    asked = {a: b for pairs in held.values() for a, b in pairs}
    out: dict[str, dict[str, Any]] = {}
    for reply in checked_replies(exchange(grid, msgs, timeout=nodes.timeout), R.MSG_REPAIR_HELD):
        for key, cfg in reply.content.config_records.items():
            if not key.startswith(R.NODE_KEY_PREFIX):
                continue
            old, new, digest = str(cfg[R.PARENT_ID]), str(cfg[R.NODE_ID]), str(cfg[R.WEIGHTS_DIGEST])
            if asked.get(old) != new or not R.is_digest(digest):
                raise UnlearnError(f"{R.MSG_REPAIR_HELD}: a reply for {old!r} -> {new!r} that was not asked for")
            out[old] = {"node": new, "digest": digest, "rounds": int(cfg[R.REPAIR_ROUND]),
                        "val_loss": [float(v) for v in cfg[R.VAL_LOSS]]}
    missing = sorted(set(asked) - set(out))
    if missing:
        raise UnlearnError(f"{R.MSG_REPAIR_HELD}: no repaired version of {missing}")
    return out


def repair_sent_at_clients(grid: Grid, nodes: NodeDirectory, sent: dict[int, list[tuple[str, Tensors, Tensors]]],
                           request_configs: dict[int, dict[str, Any]],
                           settings: RepairSettings = RepairSettings()) -> dict[str, dict[str, Any]]:
    """One ``train.repairsent`` per client that trained server-held models (``sent``: partition -> [(model id,
    weights before unlearning, unlearned weights)]), all at once. Returns model id -> ``{"repaired", "weights"
    (the repaired weights, or ``None`` where the rule left the model as it was), "rounds", "val_loss",
    "retain_before", "retain_after", "forget_after"}`` (the rule's figures, on the client's held-back rows)."""
    from strategies.nodes import checked_replies, exchange

    msgs, asked = [], {}
    for pid, models in sorted(sent.items()):
        arrays = {}
        for n, (model_id, original, weights) in enumerate(models):
            arrays[f"{R.MODEL_KEY_PREFIX}{n}"] = R.tensors_to_record(weights)
            arrays[f"{R.ORIGINAL_KEY_PREFIX}{n}"] = R.tensors_to_record(original)
            asked[model_id] = pid
        cfg = ConfigRecord({R.MODEL_IDS: [m for m, _, _ in models], R.REPAIR_MODE: settings.mode,
                            R.REPAIR_TOLERANCE: settings.tolerance, **_local_repair_fields(settings),
                            **request_configs[pid]})
        msgs.append(Message(RecordDict({**arrays, R.CONFIG_KEY: cfg}), dst_node_id=nodes.node_of(pid),
                            message_type=R.MSG_REPAIR_SENT))
    out: dict[str, dict[str, Any]] = {}
    for reply in checked_replies(exchange(grid, msgs, timeout=nodes.timeout), R.MSG_REPAIR_SENT):
        for key, cfg in reply.content.config_records.items():
            if not key.startswith(R.NODE_KEY_PREFIX):
                continue
            model_id, repaired = str(cfg[R.NODE_ID]), bool(int(cfg[R.REPAIR_WANTED]))
            arrays_key = f"{R.MODEL_KEY_PREFIX}{key[len(R.NODE_KEY_PREFIX):]}"
            if model_id not in asked or model_id in out or repaired != (arrays_key in reply.content.array_records):
                raise UnlearnError(f"{R.MSG_REPAIR_SENT}: a reply for {model_id!r} that was not asked for or is "
                                   "inconsistent")
            out[model_id] = {
                "repaired": repaired, "rounds": int(cfg[R.REPAIR_ROUND]),
                "val_loss": [float(v) for v in cfg[R.VAL_LOSS]] if R.VAL_LOSS in cfg else [],
                "weights": R.record_to_tensors(reply.content.array_records[arrays_key]) if repaired else None,
                **{k: float(cfg[k]) if k in cfg else None for k in ("retain_before", "retain_after", "forget_after")}}
    missing = sorted(set(asked) - set(out))
    if missing:
        raise UnlearnError(f"{R.MSG_REPAIR_SENT}: no answer about {missing}")
    return out


def validate_at_clients(grid: Grid, nodes: NodeDirectory, pids: Sequence[int], request_configs: dict[int, dict[str, Any]],
                        models: Sequence[Tensors], settings: RepairSettings = RepairSettings()
                        ) -> list[dict[str, float | None]]:
    """One ``train.repair`` round with no steps: per model, kept accuracy on the rows the clients' repair holds
    back, and the share of the holders' held-back forget rows still predicted (``None`` without any)."""
    from strategies.nodes import checked_replies, exchange

    msgs = [_repair_message(nodes, pid, models, request_configs[pid], settings, 0, [0] * len(models)) for pid in pids]
    replies = list(checked_replies(exchange(grid, msgs, timeout=nodes.timeout), R.MSG_REPAIR))
    out = []
    for n in range(len(models)):
        metrics = [r.content.metric_records[f"{R.METRICS_KEY}-{n}"] for r in replies]
        n_val, n_forget = (sum(int(m.get(k, 0)) for m in metrics) for k in (R.VAL_NUM, R.FORGET_VAL_NUM))
        if n_val == 0:
            raise UnlearnError("train.repair: no client holds kept data to validate on")
        out.append({"retain_acc": sum(int(m.get(R.VAL_CORRECT, 0)) for m in metrics) / n_val,
                    "forget_acc": sum(int(m.get(R.FORGET_VAL_CORRECT, 0)) for m in metrics) / n_forget
                    if n_forget else None})
    return out

"""What the App reports beside accuracy: a membership-inference AUC on the forgotten data, and the backdoor check.

- **Membership inference** (``mia-samples`` > 0): a loss-threshold attack (``fl_unlearn.evaluate``) telling the
  forgotten training samples (members) from held-out ones (non-members). Members' losses are computed where they
  live (``query.losses``: each holder, at most ``mia-samples`` of its forget rows, seeded); non-members are rows of
  the public test split, of the forgotten classes for a class request (else any), at most ``mia-samples``. An
  unlearned model should score like the retrained one: near 0.5 when the federation barely overfits, and whatever
  the retrained model's figure is otherwise.
- **Backdoor** (``backdoor-fraction`` > 0, client requests): each forgotten client trains on its partition with that
  fraction of rows carrying a 3x3 white patch and the label ``backdoor-target`` (:func:`poisoned_partition`, what
  ``strategies.app`` gives the ClientApp as the client's data). The attack success rate of a model is the share of
  triggered test rows of the other classes it puts in the target class (``fl_unlearn.evaluate``).

The models clients hold (derived ones) never leave them: their holder runs both checks (:class:`HeldChecks`, with
``query.evalheld``) on the same public test rows as the server, the members being its own forget rows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from datasets import Dataset
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fl_unlearn.data import make_loader
from fl_unlearn.evaluate import mia_auc_from_losses, poison_dataset, predict_logits, triggered_test_set
from fl_unlearn.requests import UnlearningRequest
from strategies import records as R
from strategies.forget import ForgetSpec, request_config

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from strategies.client import ClientSpec
    from strategies.nodes import NodeDirectory

Tensors = dict[str, torch.Tensor]
_POISONED: dict[tuple[Any, ...], Dataset] = {}
_POISON_LOCK = threading.Lock()


def poisoned_partition(ds: Dataset, fraction: float, target: int, seed: int, key: tuple[Any, ...]) -> Dataset:
    """``ds`` with a seeded ``fraction`` of its rows triggered and relabelled ``target`` (cached per ``key``: the
    ClientApp asks for its data at every message)."""
    with _POISON_LOCK:
        if key not in _POISONED:
            _POISONED[key] = poison_dataset(ds, fraction, target, seed=seed)[0]
        return _POISONED[key]


# --- client side ---------------------------------------------------------------------------------------


def handle_losses(spec: ClientSpec, msg: Message, context: Context) -> Message:
    """``query.losses``: per sent model (``model-0``, ...), the cross-entropy of at most ``mia-samples`` of this
    client's forget rows (seeded; the same rows for every model). Replies ``metrics`` (the row count) and
    ``losses-n`` per model."""
    from strategies.client import _seed, capped_rows, load_model

    config = R.first_config(msg)
    data = spec.data_fn(context)
    forget_rows, _ = ForgetSpec.from_config(config).split_rows(data)
    rows = capped_rows(forget_rows, int(config[R.MIA_SAMPLES]), _seed(context, -9))
    out: dict[str, Any] = {R.METRICS_KEY: MetricRecord({R.FORGET_NUM: len(rows)})}
    models = sorted((k for k in msg.content.array_records if k.startswith(R.MODEL_KEY_PREFIX)),
                    key=lambda k: int(k[len(R.MODEL_KEY_PREFIX):]))
    if len(rows):
        loader = make_loader(data, 256, rows=rows)
        model = None
        for key in models:
            weights = R.record_to_tensors(msg.content.array_records[key])
            if model is None:
                model = load_model(spec, context, weights)
            else:
                model.load_state_dict(weights)
            out[f"{R.LOSSES_PREFIX}{key[len(R.MODEL_KEY_PREFIX):]}"] = MetricRecord(
                {R.LOSSES: [float(v) for v in per_sample_losses(model, loader)]})
    return Message(RecordDict(out), reply_to=msg)


@dataclass(frozen=True)
class HeldChecks:
    """The checks a holder runs on the models it holds besides accuracy (``query.evalheld``), as the server's
    ``Evaluator`` runs them on the models it holds.

    Parameters
    ----------
    mia_samples : int (default: 0)
        Cap on the members (the holder's forget rows) and on the non-members (test rows, chosen as by
        :func:`nonmember_rows`); 0 runs no membership inference. A holder without forget rows (a kept client, for a
        client request) reports none.
    seed : int (default: 0)
        Seeds both choices of rows; the server passes the run's, so both sides take the same non-members.
    backdoor_target : int | None (default: None)
        The backdoor's target class: the attack success rate on the triggered test rows; ``None`` skips it.
    """

    mia_samples: int = 0
    seed: int = 0
    backdoor_target: int | None = None

    def to_config(self) -> dict[str, int]:
        """The ``query.evalheld`` config keys (none when nothing is asked for)."""
        out = {R.MIA_SAMPLES: self.mia_samples, R.MIA_SEED: self.seed} if self.mia_samples else {}
        return out if self.backdoor_target is None else {**out, R.BACKDOOR_TARGET: self.backdoor_target}

    @classmethod
    def from_config(cls, config: Any) -> HeldChecks:
        target = config.get(R.BACKDOOR_TARGET)
        return cls(int(config.get(R.MIA_SAMPLES, 0)), int(config.get(R.MIA_SEED, 0)),
                   None if target is None else int(target))

    def runner(self, data: Dataset, forget_rows: np.ndarray, test: Dataset | None,
               classes: Sequence[int]) -> Callable[[torch.nn.Module], dict[str, float]]:
        """``model -> {R.MIA_AUC, R.BACKDOOR_ASR}`` (those it can measure) over this holder's ``data`` (its
        ``forget_rows``) and ``test``; the loaders are built once for every model of the message."""
        from strategies.client import capped_rows

        members = capped_rows(forget_rows, self.mia_samples, self.seed) if self.mia_samples else forget_rows[:0]
        mia = bool(self.mia_samples) and test is not None and len(members) > 0
        member_loader = make_loader(data, 256, rows=members) if mia else None
        nonmember_loader = make_loader(test, 256, rows=nonmember_rows(test, classes, self.mia_samples, self.seed)) \
            if mia else None
        triggered = make_loader(triggered_test_set(test, self.backdoor_target), 256) \
            if self.backdoor_target is not None and test is not None else None

        def run(model: torch.nn.Module) -> dict[str, float]:
            out = {}
            if mia:
                out[R.MIA_AUC] = mia_auc_from_losses(per_sample_losses(model, member_loader),
                                                     per_sample_losses(model, nonmember_loader))
            if triggered is not None:
                out[R.BACKDOOR_ASR] = backdoor_asr(model, triggered, self.backdoor_target)
            return out

        return run


def backdoor_asr(model: torch.nn.Module, triggered: Any, target: int) -> float:
    """Share of the ``triggered`` rows (a loader of :func:`~fl_unlearn.evaluate.triggered_test_set`) that ``model``
    puts in ``target``."""
    return float((predict_logits(model, triggered).argmax(dim=1) == target).float().mean())


def per_sample_losses(model: torch.nn.Module, loader: Any) -> np.ndarray:
    """Cross-entropy of every sample of ``loader`` (float64, in order), in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            parts = [torch.nn.functional.cross_entropy(model(x), y, reduction="none") for x, y in loader]
    finally:
        model.train(was_training)
    return torch.cat(parts).double().numpy() if parts else np.zeros(0)


# --- server side ---------------------------------------------------------------------------------------


def member_losses_at_clients(grid: Grid, nodes: NodeDirectory, request: UnlearningRequest,
                             weights_list: Sequence[Tensors], samples: int) -> list[np.ndarray]:
    """Per model, the losses of the forgotten training samples, from every client that holds some
    (``query.losses``, one round trip)."""
    from strategies.nodes import checked_replies, exchange

    pids = {"classes": sorted(set(nodes.partition.values())), "client": list(request.clients),
            "samples": sorted(request.samples)}[request.kind]
    models = {f"{R.MODEL_KEY_PREFIX}{i}": R.tensors_to_record(w) for i, w in enumerate(weights_list)}
    msgs = [Message(RecordDict({**models, R.CONFIG_KEY: ConfigRecord({R.MIA_SAMPLES: samples,
                                                                      **request_config(request, pid)})}),
                    dst_node_id=nodes.node_of(pid), message_type=R.MSG_LOSSES) for pid in pids]
    parts: list[list[np.ndarray]] = [[] for _ in weights_list]
    for reply in checked_replies(exchange(grid, msgs, timeout=nodes.timeout), R.MSG_LOSSES):
        if int(reply.content.metric_records[R.METRICS_KEY][R.FORGET_NUM]) == 0:
            continue
        for i in range(len(weights_list)):
            parts[i].append(np.asarray(reply.content.metric_records[f"{R.LOSSES_PREFIX}{i}"][R.LOSSES]))
    return [np.concatenate(p) if p else np.zeros(0) for p in parts]


def nonmember_rows(test: Dataset, classes: Sequence[int], samples: int, seed: int) -> np.ndarray:
    """Rows of the test split the attack takes as non-members: of the forgotten ``classes`` for a class request
    (empty: any row), at most ``samples`` (seeded)."""
    labels = np.asarray(test["label"])
    rows = np.flatnonzero(np.isin(labels, list(classes))) if len(classes) else np.arange(len(labels))
    if len(rows) > samples:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=samples, replace=False))
    return rows

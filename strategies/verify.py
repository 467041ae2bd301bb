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
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from datasets import Dataset
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fl_unlearn.data import make_loader
from fl_unlearn.evaluate import poison_dataset
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


def nonmember_rows(test: Dataset, request: UnlearningRequest, samples: int, seed: int) -> np.ndarray:
    """Rows of the test split the attack takes as non-members: of the forgotten classes for a class request (else
    any), at most ``samples`` (seeded)."""
    labels = np.asarray(test["label"])
    rows = np.flatnonzero(np.isin(labels, list(request.classes))) if request.kind == "classes" \
        else np.arange(len(labels))
    if len(rows) > samples:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=samples, replace=False))
    return rows

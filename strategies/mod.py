"""A mod that gives a legacy ``client_fn`` / NumPyClient app fl_unlearn's messages.

Legacy apps cannot register handlers (Flower refuses decorators on a ``client_fn`` app), and a new-API
strategy cannot drive a NumPyClient directly ("0 results and N failures"). This mod does both jobs: it
answers our message types itself and translates Message-API ``train`` / ``evaluate`` to the legacy
``FitIns`` / ``EvaluateIns`` and back.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import (
    evaluateins_to_recorddict,
    fitins_to_recorddict,
    recorddict_to_evaluateres,
    recorddict_to_fitres,
)

from fl_unlearn.errors import UnlearnError
from strategies import records as R
from strategies.client import ClientSpec, Handler, attach_fisher, error_reply, only_arrays, unlearning_handlers


def unlearning_mod(spec: ClientSpec) -> Callable[[Message, Context, Handler], Message]:
    """A mod that gives a legacy ``client_fn`` / NumPyClient app fl_unlearn's messages.

    It answers ``query.info``, ``query.fisher``, ``query.evalforget``, ``train.unlearn`` and ``train.derive``
    itself, and translates Message-API ``train`` / ``evaluate`` (what ``flwr.serverapp`` strategies send) to the
    legacy ``FitIns`` / ``EvaluateIns`` the NumPyClient understands, and the replies back, adding the Fisher
    (one extra pass after ``fit``) and the lineage record. So a legacy app is driven by
    :class:`~strategies.server.UnlearningStrategy` around a new-API strategy. Parameters keep the order of the
    model's ``state_dict`` (the NumPyClient convention). Bad input gets an error reply naming the fix.

    Examples
    --------
    ::

        app = ClientApp(client_fn=client_fn, mods=[unlearning_mod(spec)])
    """
    handlers = unlearning_handlers(spec)

    def mod(msg: Message, context: Context, call_next: Handler) -> Message:
        message_type = msg.metadata.message_type
        if message_type in handlers:
            return handlers[message_type](msg, context)
        if message_type in ("train", "evaluate") and R.ARRAYS_KEY in msg.content.array_records:
            try:
                return _legacy_round_trip(spec, msg, context, call_next)
            except (UnlearnError, ValueError, KeyError) as err:
                return error_reply(msg, f"unlearning_mod: {type(err).__name__}: {err}")
        return call_next(msg, context)

    return mod


def _legacy_round_trip(spec: ClientSpec, msg: Message, context: Context, call_next: Handler) -> Message:
    arrays = only_arrays(msg)
    # Legacy parameters are a list in the model's state_dict order (the NumPyClient convention); records
    # read back from the store are ordered by name, so reorder by the model's keys.
    model_keys = list(spec.model_fn(context).state_dict())
    names = model_keys if set(model_keys) == set(arrays.keys()) else list(arrays.keys())
    config = {k: v for k, v in R.first_config(msg).items() if not isinstance(v, list)}
    params = ndarrays_to_parameters([arrays[n].numpy() for n in names])
    is_train = msg.metadata.message_type == "train"
    legacy = fitins_to_recorddict(FitIns(params, config), True) if is_train else evaluateins_to_recorddict(
        EvaluateIns(params, config), True)
    original = msg.content
    msg.content = legacy
    try:
        out = call_next(msg, context)
    finally:
        msg.content = original
    if out.has_error():
        return out
    if not is_train:
        res = recorddict_to_evaluateres(out.content)
        metrics = {R.NUM_EXAMPLES: res.num_examples, "loss": float(res.loss),
                   **{k: float(v) for k, v in res.metrics.items() if isinstance(v, (int, float))}}
        return Message(RecordDict({R.METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)
    res = recorddict_to_fitres(out.content, True)
    ndarrays = parameters_to_ndarrays(res.parameters)
    if len(ndarrays) != len(names):
        raise UnlearnError(f"fit returned {len(ndarrays)} arrays for a model of {len(names)}; return every "
                           "state_dict entry in order")
    weights = {n: torch.from_numpy(np.array(a, copy=True)) for n, a in zip(names, ndarrays)}
    metrics = {R.NUM_EXAMPLES: res.num_examples,
               **{k: float(v) for k, v in res.metrics.items() if isinstance(v, (int, float))}}
    reply = Message(RecordDict({R.ARRAYS_KEY: R.tensors_to_record(weights), R.METRICS_KEY: MetricRecord(metrics)}),
                    reply_to=msg)
    config = R.first_config(msg)
    return attach_fisher(spec, reply, context, layers=str(config.get(R.FISHER_LAYERS, "last")), weights=weights,
                         fisher=bool(config.get(R.ACCUMULATE, True)))

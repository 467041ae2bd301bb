"""Client side of the SISA federation (``DESIGN.md`` §4): stage rounds, exact reruns, counts, Fishers, scores.

Every handler rebuilds this client's view of the layout with :class:`fl_unlearn.sisa.SisaClient` (the same
class the in-process :class:`~fl_unlearn.sisa.SisaFederation` uses), so batch order, seeds and kept rows are
exactly those of the core: a Flower run and an in-process run of the same configuration agree bitwise.

===================== ================================================================================
``train`` + SISA keys  one FedAvg round of shard-model ``sisa-shard`` on slices ``1..sisa-stage``, minus
                       ``exclude-samples``; routed here by :func:`sisa_mod` (``train`` itself belongs to
                       ``strategies.client``)
``train.retrain``      the same round in an exact rerun (or an OHS repair round, ``sisa-fraction`` < 1)
``query.sisacounts``   kept samples per shard and slice, the requested ids this client does not hold,
                       and with ``forget-all`` every id it still holds (client-level requests)
``query.sisafisher``   forget-Fisher of the revoked ids of one shard and retain-Fisher of a seeded sample
                       of its kept rows, at the served shard-model the server sends
``query.sisascores``   per revoked id: ensemble loss, correctness, true-label probability and label
===================== ================================================================================

The server sends the whole schedule (layout, seed tuple, exclusions, client SGD settings) in every message:
a client keeps no SISA state of its own, so a rerun can never disagree with the run it replaces.

Wiring (the App does this in ``strategies.app.make_client_app``)::

    app = ClientApp(mods=[sisa_mod(spec)])
    register_unlearning_handlers(app, spec)
    register_sisa_handlers(app, spec)
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from logging import INFO
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from fl_unlearn.errors import ConfigError, UnlearnError
from fl_unlearn.fisher import compute_fisher, select_parameters
from fl_unlearn.lineage import sample_digest
from fl_unlearn.sisa import Ensemble, SisaClient, SisaConfig, SisaLayout, derive_seed
from strategies import records as R
from strategies.client import ClientSpec, Handler, answering_errors, load_model, only_arrays, partition_id

#: Client SGD settings the server sends with every SISA round (run-config names).
TRAIN_KEYS = ("local-epochs", "batch-size", "lr", "momentum", "weight-decay")
_CLIENTS: dict[tuple, SisaClient] = {}  # one per (data set, layout, partition) in this process


def layout_of(config: Mapping[str, Any]) -> SisaLayout:
    """The layout named in a SISA message."""
    try:
        return SisaLayout(int(config[R.SISA_SHARDS]), int(config[R.SISA_SLICES]), int(config[R.SISA_LAYOUT_SEED]))
    except KeyError as err:
        raise ConfigError(f"SISA message without {err.args[0]!r}; send the layout with every SISA message") from err


def sisa_client(spec: ClientSpec, context: Context, layout: SisaLayout) -> SisaClient:
    """This client's :class:`SisaClient` (cached: hashing the ids and caching the images happen once)."""
    ds, pid = spec.data_fn(context), partition_id(context)
    key = (id(ds), len(ds), layout, pid)
    if key not in _CLIENTS:
        _CLIENTS.clear()  # one live data set per process; the old one may be gone (its id reused)
        _CLIENTS[key] = SisaClient(ds, layout, pid)
    return _CLIENTS[key]


def _ids(config: Mapping[str, Any], key: str) -> np.ndarray:
    return np.asarray(R.int_list(config.get(key)), dtype=np.int64)


def _train_config(config: Mapping[str, Any], layout: SisaLayout) -> SisaConfig:
    missing = [k for k in TRAIN_KEYS if k not in config]
    if missing:
        raise ConfigError(f"SISA round without client settings {missing}; the server sends {list(TRAIN_KEYS)}")
    return SisaConfig(num_shards=layout.num_shards, num_slices=layout.num_slices,
                      local_epochs=int(config["local-epochs"]),
                      batch_size=int(config["batch-size"]), lr=float(config["lr"]), momentum=float(config["momentum"]),
                      weight_decay=float(config["weight-decay"]), seed=layout.seed)


def _check_shard(layout: SisaLayout, shard: int, stage: int) -> None:
    if not 0 <= shard < layout.num_shards or not 1 <= stage <= layout.num_slices:
        raise ConfigError(f"shard {shard} / stage {stage} outside the layout ({layout.num_shards} shards, "
                          f"stages 1..{layout.num_slices})")


# ------------------------------------------------------------------------------------------------------
# handlers
# ------------------------------------------------------------------------------------------------------


def handle_sisa_round(spec: ClientSpec, msg: Message, context: Context) -> Message:
    """``train`` with SISA keys, or ``train.retrain``: one local training call of one shard-model.

    Replies FedAvg's contract (the trained weights; ``num-examples`` = kept rows trained on, 0 when this
    client has none: the server then leaves it out, as the in-process federation does) plus a lineage record;
    the metrics echo ``sisa-shard``, so the server can tell a SISA round from plain training.
    """
    start = time.perf_counter()
    config = R.first_config(msg)
    layout = layout_of(config)
    shard, stage = int(config[R.SISA_SHARD]), int(config[R.SISA_STAGE])
    _check_shard(layout, shard, stage)
    client = sisa_client(spec, context, layout)
    rows = client.rows(shard, stage, _ids(config, R.EXCLUDE_SAMPLES))
    weights = R.record_to_tensors(only_arrays(msg))
    n = 0
    if len(rows):
        key = tuple(str(k) for k in config[R.SISA_KEY])
        n, weights = client.train(spec.model_fn(context), weights, rows, key, _train_config(config, layout),
                                  fraction=float(config.get(R.SISA_FRACTION, 1.0)))
    labels = client.labels[rows]
    lineage = {R.PARTITION_ID: client.client_id, R.NUM_EXAMPLES: int(len(rows)),
               **R.histogram_to_config({int(c): int((labels == c).sum()) for c in np.unique(labels)}),
               R.SAMPLE_DIGEST: sample_digest(client.ids[rows].tolist())}
    metrics = {R.NUM_EXAMPLES: int(n), R.SECONDS: time.perf_counter() - start, R.SISA_SHARD: shard}
    return Message(RecordDict({R.ARRAYS_KEY: R.tensors_to_record(weights), R.METRICS_KEY: MetricRecord(metrics),
                               R.LINEAGE_KEY: ConfigRecord(lineage)}), reply_to=msg)


def handle_sisa_counts(spec: ClientSpec, msg: Message, context: Context) -> Message:
    """``query.sisacounts``: kept samples per shard and slice (minus ``exclude-samples`` and
    ``forget-samples``), the requested ids not held, and with ``forget-all`` every id still held."""
    config = R.first_config(msg)
    layout = layout_of(config)
    client = sisa_client(spec, context, layout)
    requested, exclude = _ids(config, R.FORGET_SAMPLES), _ids(config, R.EXCLUDE_SAMPLES)
    missing = requested[~np.isin(requested, client.ids)]
    kept = client.ids[~np.isin(client.ids, exclude)]
    gone = np.union1d(exclude, kept if config.get(R.FORGET_ALL) else requested)
    out = {R.PARTITION_ID: client.client_id, R.NUM_EXAMPLES: int(len(client.ids)),
           R.SISA_COUNTS: layout.counts(client.ids, exclude=gone).reshape(-1).tolist(),
           R.MISSING_SAMPLES: missing.tolist()}
    if config.get(R.FORGET_ALL):
        out[R.KEPT_SAMPLES] = kept.tolist()
    return Message(RecordDict({R.INFO_KEY: ConfigRecord(out)}), reply_to=msg)


def handle_sisa_fisher(spec: ClientSpec, msg: Message, context: Context) -> Message:
    """``query.sisafisher``: per-sample Fishers at the shard-model sent, on this client's rows of one shard.

    The forget-Fisher covers ``forget-samples`` (ids of this shard); the retain-Fisher a seeded sample of at
    most ``fisher-samples`` of the shard's kept rows (every slice, minus ``exclude-samples`` and the forget ids).
    """
    config = R.first_config(msg)
    layout = layout_of(config)
    shard = int(config[R.SISA_SHARD])
    _check_shard(layout, shard, layout.num_slices)
    client = sisa_client(spec, context, layout)
    model = load_model(spec, context, R.record_to_tensors(only_arrays(msg)))
    names = select_parameters(model, str(config.get(R.FISHER_LAYERS, "all")))
    forget = _ids(config, R.FORGET_SAMPLES)
    forget_rows = np.flatnonzero(np.isin(client.ids, forget) & (client.shard == shard))
    retain_rows = client.rows(shard, layout.num_slices, np.union1d(_ids(config, R.EXCLUDE_SAMPLES), forget))
    cap = int(config.get(R.FISHER_SAMPLES, 0))
    if cap and len(retain_rows) > cap:
        rng = np.random.default_rng(derive_seed(layout.seed, "retain-sample", shard, client.client_id))
        retain_rows = np.sort(rng.choice(retain_rows, size=cap, replace=False))
    content: dict[str, Any] = {R.METRICS_KEY: MetricRecord({R.FORGET_NUM: int(len(forget_rows)),
                                                            R.RETAIN_NUM: int(len(retain_rows))})}
    for key, rows in ((R.FORGET_FISHER_KEY, forget_rows), (R.RETAIN_FISHER_KEY, retain_rows)):
        if len(rows):
            fisher = compute_fisher(model, [client.tensors(rows)], names, estimator="per_sample")
            content[key] = R.tensors_to_record(dict(fisher))
    return Message(RecordDict(content), reply_to=msg)


@torch.no_grad()
def handle_sisa_scores(spec: ClientSpec, msg: Message, context: Context) -> Message:
    """``query.sisascores``: the mean-softmax ensemble of the models sent (``model-0``, ...) on ``forget-samples``.

    Per id (in the order sent): loss ``-log p(y)``, correctness, ``p(y)`` and the label. Ids this client does not
    hold are an error.
    """
    config = R.first_config(msg)
    layout = layout_of(config)
    client = sisa_client(spec, context, layout)
    ids = _ids(config, R.FORGET_SAMPLES)
    missing = ids[~np.isin(ids, client.ids)]
    if missing.size:
        raise UnlearnError(f"partition {client.client_id} does not hold samples {missing[:10].tolist()}")
    position = {int(i): r for r, i in enumerate(client.ids.tolist())}
    x, y = client.tensors(np.asarray([position[int(i)] for i in ids], dtype=np.int64))
    keys = sorted((k for k in msg.content.array_records if k.startswith(R.MODEL_KEY_PREFIX)),
                  key=lambda k: int(k[len(R.MODEL_KEY_PREFIX):]))
    members = [load_model(spec, context, R.record_to_tensors(msg.content.array_records[k])) for k in keys]
    logp = Ensemble(members).eval()(x)
    true_logp = logp.gather(1, y[:, None])[:, 0]
    out = {R.LOSSES: (-true_logp).double().tolist(), R.CORRECT: (logp.argmax(1) == y).int().tolist(),
           R.TRUE_PROBS: true_logp.exp().double().tolist(), R.LABELS: y.tolist()}
    return Message(RecordDict({R.METRICS_KEY: ConfigRecord(out)}), reply_to=msg)


# ------------------------------------------------------------------------------------------------------
# wiring
# ------------------------------------------------------------------------------------------------------


def is_sisa_round(msg: Message) -> bool:
    """A ``train`` message that carries a SISA shard (rather than the plain FedAvg round)."""
    if msg.metadata.message_type != "train":
        return False
    return R.SISA_SHARD in R.first_config(msg)


def sisa_mod(spec: ClientSpec) -> Any:
    """A ClientApp mod that answers ``train`` messages carrying ``sisa-shard`` with :func:`handle_sisa_round`.

    ``train`` is registered by ``strategies.client`` (FedAvg's contract); a mod is Flower's way to route a
    variant of it without a second registration. Other messages pass through untouched. Put it after any mod
    that completes ``context.run_config``.
    """
    handler = answering_errors(functools.partial(handle_sisa_round, spec))

    def mod(msg: Message, context: Context, call_next: Handler) -> Message:
        return handler(msg, context) if is_sisa_round(msg) else call_next(msg, context)

    return mod


def sisa_handlers(spec: ClientSpec) -> dict[str, Handler]:
    """The SISA handlers by message type (besides ``train``), answering errors with error replies."""
    table = {R.MSG_RETRAIN: handle_sisa_round, R.MSG_SISA_COUNTS: handle_sisa_counts,
             R.MSG_SISA_FISHER: handle_sisa_fisher, R.MSG_SISA_SCORES: handle_sisa_scores}
    return {t: answering_errors(functools.partial(h, spec)) for t, h in table.items()}


def register_sisa_handlers(app: ClientApp, spec: ClientSpec) -> ClientApp:
    """Register ``train.retrain`` and the SISA queries on a Message-API ClientApp; returns ``app``.

    Stage rounds arrive as ``train`` messages: build the app with ``mods=[..., sisa_mod(spec)]`` too.
    """
    for message_type, handler in sisa_handlers(spec).items():
        category, action = message_type.split(".")
        getattr(app, category)(action)(handler)
    return app

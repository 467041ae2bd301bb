"""Client side: message handlers for a Message-API ClientApp, and a mod for legacy ``client_fn`` apps.

One handler per message type (``DESIGN.md`` §3):

=====================  =================================================================================
``query.info``         partition id, number of examples, label histogram
``train``              FedAvg's contract (one ArrayRecord, one MetricRecord with ``num-examples``) plus the
                       Fisher diagonal accumulated while training and a lineage ConfigRecord
``query.fisher``       forget-Fisher of the client's forget data on the model version the server sends
``query.evalforget``   accuracy of several models on the client's forget data (client / sample requests)
``query.calibrate``    ``alpha="auto"``: correct predictions per candidate alpha on its own samples
``query.checkforget``  the alpha that forgets its samples, per other affected model (class requests)
``train.unlearn``      FIUn on the models the client holds (derived models), with the merged forget-Fisher
``train.derive``       a chain of derived models (finetune | incremental | transfer) from a global model
``evaluate``           accuracy on held-out data, split into forgotten and kept classes
=====================  =================================================================================

The handlers need a model and the client's data: a :class:`ClientSpec` supplies them. Training settings come
from the run-config keys of ``strategies.config.DEFAULTS`` (``lr``, ``local-epochs``, ``batch-size``,
``momentum``, ``seed``, ``dp-noise-multiplier``, ``dp-max-grad-norm``) when present. State that must outlive a
run (derived models, their retain-Fishers) lives in a per-client :class:`~fl_unlearn.store.Store` under
``<store-dir>/clients/<partition-id>/`` (``node_config["unlearn-dir"]`` overrides the location).

Bad messages get an error reply naming what was wrong (as Flower's mods do); nothing is changed then.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from torch import nn

from fl_unlearn.calibrate import scale_free, scale_free_each, unlearn_with_candidates
from fl_unlearn.data import (
    class_histogram,
    class_labels,
    make_loader,
    preload,
    sample_ids,
    samples_of_classes,
    without_classes,
    without_samples,
)
from fl_unlearn.errors import UnlearnError
from fl_unlearn.evaluate import accuracy, forget_retain_accuracy
from fl_unlearn.fisher import FisherAccumulator, compute_fisher, select_parameters
from fl_unlearn.fiun import unlearn_many
from fl_unlearn.store import Store
from fl_unlearn.train import seed_everything, train_local
from strategies import records as R
from strategies.config import DEFAULTS
from strategies.forget import ForgetSpec, retain_from_whole

Handler = Callable[[Message, Context], Message]
Tensors = dict[str, torch.Tensor]
MODELS_DOC = "models"  # index of the models a client holds, in its store


@dataclass(frozen=True)
class ClientSpec:
    """What the unlearning handlers need from a client app.

    Parameters
    ----------
    model_fn : Callable[[Context], nn.Module]
        A freshly built model of the federation's architecture (weights are loaded from messages).
    data_fn : Callable[[Context], Dataset]
        This client's training data, a ``datasets.Dataset`` with ``image``, ``label`` and ``id`` columns
        (``fl_unlearn.data``).
    test_fn : Callable[[Context], Dataset | None] | None (default: None)
        Held-out data to evaluate models on (``evaluate``, ``train.unlearn``); ``None`` skips evaluation.
    """

    model_fn: Callable[[Context], nn.Module]
    data_fn: Callable[[Context], Dataset]
    test_fn: Callable[[Context], Dataset | None] | None = None


# ------------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------------


def setting(context: Context, key: str) -> Any:
    """A run-config value, else the App default (``run_simulation`` gives an empty run-config)."""
    value = context.run_config.get(key, DEFAULTS[key])
    return type(DEFAULTS[key])(value) if not isinstance(DEFAULTS[key], bool) else bool(value)


def partition_id(context: Context) -> int:
    """This client's partition id (``node_config["partition-id"]``)."""
    try:
        return int(context.node_config["partition-id"])
    except KeyError as err:
        raise UnlearnError("node_config has no 'partition-id'; set it for every SuperNode") from err


def client_store(context: Context, config: Mapping[str, Any] | None = None) -> Store:
    """The per-client store, under the first of: ``node_config["unlearn-dir"]``, run-config ``store-dir``
    (then ``<store-dir>/clients/<partition-id>``), the server's store directory sent in ``config`` (same layout;
    meaningful in simulation, where server and clients share a file system)."""
    explicit = context.node_config.get("unlearn-dir")
    if explicit:
        return Store(Path(str(explicit)))
    root = context.run_config.get("store-dir", "") or (config or {}).get(R.STORE_DIR, "")
    if not root:
        raise UnlearnError("no client directory: set run-config 'store-dir' (absolute) or node_config 'unlearn-dir'")
    return Store(Path(str(root)) / "clients" / str(partition_id(context)))


def error_reply(msg: Message, reason: str) -> Message:
    """Log ``reason`` and answer ``msg`` with an error (as Flower's mods do)."""
    log(ERROR, "%s: %s", msg.metadata.message_type, reason)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def answering_errors(handler: Handler) -> Handler:
    """Turn fl_unlearn / value errors raised by ``handler`` into error replies naming them."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except (UnlearnError, ValueError, KeyError) as err:
            return error_reply(msg, f"{type(err).__name__}: {err}")

    return wrapped


def only_arrays(msg: Message) -> ArrayRecord:
    """The message's one ArrayRecord (the model)."""
    records = msg.content.array_records
    if R.ARRAYS_KEY in records:
        return records[R.ARRAYS_KEY]
    if len(records) != 1:
        raise UnlearnError(f"expected one ArrayRecord (the model), found {sorted(records)}")
    return next(iter(records.values()))


def load_model(spec: ClientSpec, context: Context, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """A fresh model with ``weights`` loaded (strict: names and shapes must match)."""
    model = spec.model_fn(context)
    model.load_state_dict(dict(weights))
    return model


def lineage_config(ds: Dataset, pid: int) -> dict[str, Any]:
    """Lineage record of a data set: partition, size, class histogram, sample digest."""
    return {R.PARTITION_ID: pid, R.NUM_EXAMPLES: len(ds), **R.histogram_to_config(class_histogram(ds)),
            R.SAMPLE_DIGEST: R.sample_digest(sample_ids(ds))}


def _seed(context: Context, *parts: int) -> int:
    digest = hashlib.sha256(repr((setting(context, "seed"), *parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _state(model: nn.Module) -> Tensors:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _strip_prefix(fisher: Mapping[str, torch.Tensor], prefix: str = "_module.") -> Tensors:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in fisher.items()}


# ------------------------------------------------------------------------------------------------------
# training with a Fisher accumulator (DP-SGD optional)
# ------------------------------------------------------------------------------------------------------


def train_with_fisher(
    model: nn.Module, ds: Dataset, context: Context, *, seed: int, layers: str, estimator: str = "batch",
    proximal_mu: float = 0.0, accumulate: bool = True,
) -> tuple[dict[str, float], Tensors | None]:
    """Train ``model`` in place on ``ds``; return the training stats and the Fisher accumulated meanwhile
    (``None`` without ``accumulate``).

    With ``dp-noise-multiplier`` and ``dp-max-grad-norm`` > 0 the model trains with Opacus DP-SGD and the
    accumulator reads Opacus' per-sample gradients; otherwise it squares each batch gradient.
    """
    seed_everything(seed)
    loader = make_loader(ds, setting(context, "batch-size"), shuffle=True, seed=seed)
    epochs = setting(context, "local-epochs")
    if setting(context, "dp-noise-multiplier") > 0 and setting(context, "dp-max-grad-norm") > 0:
        return _train_dp(model, loader, context, layers=layers if accumulate else None, epochs=epochs)
    acc = FisherAccumulator(model, select_parameters(model, layers)) if accumulate else None
    try:
        stats = train_local(model, loader, epochs=epochs, lr=setting(context, "lr"),
                            momentum=setting(context, "momentum"), proximal_mu=proximal_mu)
        fisher = dict(acc.result()) if acc is not None else None
    finally:
        if acc is not None:
            acc.close()
    if accumulate and estimator != "batch":  # the accumulator's per-sample mode needs Opacus: a pass instead
        fisher = dict(compute_fisher(model, make_loader(ds, setting(context, "batch-size")),
                                     select_parameters(model, layers), estimator=estimator))
    return stats, fisher


def _train_dp(model: nn.Module, loader: Any, context: Context, *, layers: str | None,
              epochs: int) -> tuple[dict, Tensors | None]:
    """DP-SGD with Opacus; the Fisher (when ``layers``) comes from the per-sample gradients Opacus computes."""
    from opacus import PrivacyEngine

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=setting(context, "lr"), momentum=setting(context, "momentum"))
    engine = PrivacyEngine(accountant="rdp")
    dp_model, dp_opt, dp_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=setting(context, "dp-noise-multiplier"), max_grad_norm=setting(context, "dp-max-grad-norm"),
    )
    acc = FisherAccumulator(dp_model, select_parameters(dp_model, layers), estimator="per_sample") if layers else None
    loss_sum, seen = 0.0, 0
    try:
        for _ in range(epochs):
            for x, y in dp_loader:
                if len(y) == 0:
                    continue
                dp_opt.zero_grad()
                loss = nn.functional.cross_entropy(dp_model(x), y)
                loss.backward()
                dp_opt.step()
                loss_sum, seen = loss_sum + float(loss) * len(y), seen + len(y)
        fisher = _strip_prefix(acc.result()) if acc is not None else None
    finally:
        if acc is not None:
            acc.close()
        dp_model.remove_hooks()
    stats = {"loss": loss_sum / max(seen, 1), "num_examples": len(loader.dataset),
             "dp_epsilon": engine.get_epsilon(delta=1e-5)}
    return stats, fisher


# ------------------------------------------------------------------------------------------------------
# handlers
# ------------------------------------------------------------------------------------------------------


def handle_info(spec: ClientSpec, msg: Message, context: Context) -> Message:
    """``query.info``: partition id, number of examples, label histogram.

    The first message a client answers in a run (the server's node directory): it also decodes the partition
    (``fl_unlearn.data.preload``), as a client does when it comes up, so a request served by a fresh run
    (``mode=unlearn``) does not wait for it in its first round trip (0.15-0.25 s per client on MNIST).
    """
    ds = spec.data_fn(context)
    preload(ds)
    info = {R.PARTITION_ID: partition_id(context), R.NUM_EXAMPLES: len(ds), **R.histogram_to_config(class_histogram(ds))}
    return Message(RecordDict({R.INFO_KEY: ConfigRecord(info)}), reply_to=msg)


def handle_train(spec: ClientSpec, msg: Message, context: Context) -> Message:
    """``train``: FedAvg's reply plus a lineage record, and the Fisher accumulated while training (unless the
    server sends ``accumulate-fisher=False``: it computes fresh Fishers when unlearning).

    Honours ``proximal-mu`` (FedProx) and the retrain baseline's ``exclude-classes`` / ``exclude-samples``.
    """
    config = R.first_config(msg)
    pid = partition_id(context)
    model = load_model(spec, context, R.record_to_tensors(only_arrays(msg)))
    ds = spec.data_fn(context)
    if config.get(R.EXCLUDE_CLASSES):
        ds = without_classes(ds, R.int_list(config[R.EXCLUDE_CLASSES]))
    if config.get(R.EXCLUDE_SAMPLES):
        ds = without_samples(ds, R.int_list(config[R.EXCLUDE_SAMPLES]))
    if len(ds) == 0:
        raise UnlearnError(f"partition {pid} has no training data left after exclusions")
    stats, fisher = train_with_fisher(
        model, ds, context, seed=_seed(context, pid, int(config.get("server-round", 0))),
        layers=str(config.get(R.FISHER_LAYERS, setting(context, "fisher-layers"))),
        estimator=str(config.get(R.FISHER_ESTIMATOR, setting(context, "fisher-estimator"))),
        proximal_mu=float(config.get("proximal-mu", 0.0)), accumulate=bool(config.get(R.ACCUMULATE, True)),
    )
    metrics = {R.NUM_EXAMPLES: len(ds), "train-loss": float(stats["loss"])}
    content = {R.ARRAYS_KEY: R.tensors_to_record(_state(model)), R.METRICS_KEY: MetricRecord(metrics),
               R.LINEAGE_KEY: ConfigRecord(lineage_config(ds, pid))}
    if fisher is not None:
        content[R.FISHER_KEY] = R.tensors_to_record(fisher)
    return Message(RecordDict(content), reply_to=msg)


def capped_rows(rows: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """At most ``cap`` of ``rows`` (a seeded random subset, in order); ``cap=0`` keeps all.

    Subsetting before a loader converts images makes a capped pass cost what its samples cost.
    """
    if not cap or len(rows) <= cap:
        return rows
    return rows[np.sort(np.random.default_rng(seed).choice(len(rows), size=cap, replace=False))]


def fisher_of(model: nn.Module, ds: Dataset, rows: np.ndarray, context: Context, config: Mapping[str, Any], *,
              seed: int, cap_key: str = R.FISHER_SAMPLES) -> Tensors:
    """The Fisher of ``model`` on at most ``config[cap_key]`` of ``rows`` (positions in ``ds``; ``fisher-samples``
    unless the caller names another cap), with the layers and estimator the server asked for (the same batch size
    for every Fisher, so forget and retain estimates compare)."""
    names = select_parameters(model, str(config.get(R.FISHER_LAYERS, "last")))
    cap = int(config.get(cap_key, config.get(R.FISHER_SAMPLES, 0)))
    loader = make_loader(ds, setting(context, "batch-size"), rows=capped_rows(rows, cap, seed))
    return dict(compute_fisher(model, loader, names, estimator=str(config.get(R.FISHER_ESTIMATOR, "batch"))))


def handle_fisher(spec: ClientSpec, msg: Message, context: Context) -> Message:
    """``query.fisher``: forget-Fisher of this client's forget data on the model the server sent (at most
    ``fisher-samples`` samples), and with ``want-retain`` the retain-Fisher of its kept data on the same model (at
    most ``retain-samples``, default ``fisher-samples``); a single-class request on prepared weights reads its
    forget-Fisher from what :func:`_prepare_fishers` stored. With ``prepare`` (after training,
    ``UnlearningStrategy.prepare_fishers``): :func:`_prepare_fishers`."""
    start = time.perf_counter()
    config = R.first_config(msg)
    data = spec.data_fn(context)
    model = load_model(spec, context, R.record_to_tensors(only_arrays(msg)))
    if config.get(R.PREPARE):
        return _prepare_fishers(model, data, msg, context, config, start)
    forget = ForgetSpec.from_config(config)
    forget_rows, retain_rows = forget.split_rows(data)
    metrics: dict[str, float | int] = {R.FORGET_NUM: len(forget_rows), R.RETAIN_NUM: len(retain_rows)}
    content: dict[str, Any] = {}
    if len(forget_rows):
        fisher = _prepared_forget_fisher(context, config, forget)
        metrics[R.PREPARED] = int(fisher is not None)
        if fisher is None:
            fisher = fisher_of(model, data, forget_rows, context, config, seed=_seed(context, -2))
        content[R.FORGET_FISHER_KEY] = R.tensors_to_record(fisher)
    if config.get(R.WANT_RETAIN) and len(retain_rows):
        fisher = fisher_of(model, data, retain_rows, context, config, seed=_seed(context, -1),
                           cap_key=R.RETAIN_SAMPLES)
        content[R.RETAIN_FISHER_KEY] = R.tensors_to_record(fisher)
    metrics[R.SECONDS] = time.perf_counter() - start
    log(INFO, "query.fisher: partition %d, %d forget / %d kept samples, %.2f s", partition_id(context),
        len(forget_rows), len(retain_rows), metrics[R.SECONDS])
    return Message(RecordDict({R.METRICS_KEY: MetricRecord(metrics), **content}), reply_to=msg)


#: The per-class forget-Fishers a client prepares stay under this many bytes (ResNet-18 on CIFAR-100 would need
#: 4.5 GB per client: there the requests compute theirs).
PREPARED_MAX_BYTES = 512 * 2**20
_PREPARED_SETTINGS = (R.FISHER_LAYERS, R.FISHER_ESTIMATOR, R.FISHER_SAMPLES)


def _prepared_doc(config: Mapping[str, Any]) -> str:
    return f"prepared/{config[R.WEIGHTS_DIGEST]}"


def _prepare_fishers(model: nn.Module, data: Dataset, msg: Message, context: Context, config: Mapping[str, Any],
                     start: float) -> Message:
    """``query.fisher`` with ``prepare`` (after training, on the newest global model): store the forget-Fisher of
    every class this client holds, each the one a later single-class ``query.fisher`` on these weights would
    compute (the same rows, cap and seed: bit for bit), and reply the Fisher of the whole partition (at most
    ``retain-samples``), which the server keeps as the retain-Fisher (SSD's ``F_D``). Two passes over the data:
    the per-class Fishers have class-pure batches, the whole-partition one mixed batches, and the batch estimator
    does not add up across them."""
    store = client_store(context, config)
    labels = class_labels(data)
    classes = np.unique(labels)
    names = select_parameters(model, str(config.get(R.FISHER_LAYERS, "last")))
    params = dict(model.named_parameters())
    size = sum(params[n].numel() * params[n].element_size() for n in names)
    prepared: dict[str, Any] = {}
    if config.get(R.WEIGHTS_DIGEST) and size * len(classes) <= PREPARED_MAX_BYTES:
        for k in classes:
            rows = np.flatnonzero(labels == k)
            fisher = fisher_of(model, data, rows, context, config, seed=_seed(context, -2))
            prepared[str(int(k))] = {"fisher": store.put(fisher, {"prepared-class": int(k)}), "samples": len(rows)}
        store.put_json(_prepared_doc(config), {"classes": prepared,
                                               "settings": {k: config.get(k) for k in _PREPARED_SETTINGS}})
    whole = fisher_of(model, data, np.arange(len(data)), context, config, seed=_seed(context, -1),
                      cap_key=R.RETAIN_SAMPLES)
    metrics = {R.FORGET_NUM: 0, R.RETAIN_NUM: len(data), R.PREPARED: len(prepared),
               R.SECONDS: time.perf_counter() - start}
    log(INFO, "query.fisher (prepare): partition %d, forget-Fishers of %d classes, whole-partition Fisher, %.2f s",
        partition_id(context), len(prepared), metrics[R.SECONDS])
    return Message(RecordDict({R.METRICS_KEY: MetricRecord(metrics),
                               R.RETAIN_FISHER_KEY: R.tensors_to_record(whole)}), reply_to=msg)


def _prepared_forget_fisher(context: Context, config: Mapping[str, Any], forget: ForgetSpec) -> Tensors | None:
    """The prepared forget-Fisher of a single-class request on the weights ``config`` names, or ``None`` (other
    requests, other weights or settings, nothing prepared): then the caller computes it."""
    if not config.get(R.WEIGHTS_DIGEST) or len(forget.classes) != 1 or forget.samples or forget.everything:
        return None
    try:
        store = client_store(context, config)
    except UnlearnError:
        return None
    doc = store.get_json(_prepared_doc(config))
    if not isinstance(doc, dict) or doc.get("settings") != {k: config.get(k) for k in _PREPARED_SETTINGS}:
        return None
    entry = (doc.get("classes") or {}).get(str(forget.classes[0]))
    return store.get(entry["fisher"]) if isinstance(entry, dict) and store.has(str(entry.get("fisher"))) else None


def handle_eval_forget(spec: ClientSpec, msg: Message, context: Context) -> Message:
    """``query.evalforget``: accuracy of each sent model (``model-0``, ...) on this client's forget data."""
    forget_ds, _ = ForgetSpec.from_config(R.first_config(msg)).split(spec.data_fn(context))
    metrics: dict[str, float | int] = {R.FORGET_NUM: len(forget_ds)}
    for key, record in msg.content.array_records.items():
        if key.startswith(R.MODEL_KEY_PREFIX) and len(forget_ds):
            model = load_model(spec, context, R.record_to_tensors(record))
            metrics[key] = accuracy(model, make_loader(forget_ds, 256))
    return Message(RecordDict({R.METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)


def handle_evaluate(spec: ClientSpec, msg: Message, context: Context) -> Message:
    """``evaluate``: held-out accuracy, split into forgotten and kept classes when ``forget-classes`` is sent."""
    config = R.first_config(msg)
    ds = spec.test_fn(context) if spec.test_fn is not None else None
    ds = spec.data_fn(context) if ds is None else ds
    model = load_model(spec, context, R.record_to_tensors(only_arrays(msg)))
    forget = R.int_list(config.get(R.FORGET_CLASSES))
    acc = forget_retain_accuracy(model, ds, forget)
    metrics: dict[str, float | int] = {R.NUM_EXAMPLES: len(ds), "accuracy": acc["acc"]}
    if forget:
        metrics.update({R.FORGET_ACC: acc["forget_acc"], R.RETAIN_ACC: acc["retain_acc"]})
    return Message(RecordDict({R.METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)


def _derive_steps(kind: str, depth: int, ds: Dataset) -> list[Dataset]:
    """The data each generation of a derived chain trains on."""
    if kind in ("finetune", "transfer"):
        return [ds] * depth
    if kind == "incremental":  # each generation learns new classes of the client's data
        groups = np.array_split(np.asarray(sorted(class_histogram(ds))), depth)
        return [samples_of_classes(ds, g.tolist()) for g in groups]
    raise UnlearnError(f"unknown derive kind {kind!r}; use finetune, incremental or transfer")


def handle_derive(spec: ClientSpec, msg: Message, context: Context) -> Message:
    """``train.derive``: a chain of derived models from the global model sent; kept in the client store."""
    config = R.first_config(msg)
    kind, ids = str(config[R.KIND]), [str(i) for i in config[R.MODEL_IDS]]
    pid, store = partition_id(context), client_store(context, config)
    layers = str(config.get(R.FISHER_LAYERS, "last"))
    model = load_model(spec, context, R.record_to_tensors(only_arrays(msg)))
    index = store.get_json(MODELS_DOC, {})
    parent, out = str(config[R.PARENT_ID]), {}
    for step, (node_id, ds) in enumerate(zip(ids, _derive_steps(kind, len(ids), spec.data_fn(context)))):
        if kind == "transfer":  # only the last layer trains
            keep = set(select_parameters(model, "last"))
            for name, p in model.named_parameters():
                p.requires_grad_(name in keep)
        _, fisher = train_with_fisher(model, ds, context, seed=_seed(context, pid, 10_000 + step), layers=layers,
                                      accumulate=bool(config.get(R.ACCUMULATE, True)))
        lineage = lineage_config(ds, pid)
        weights = store.put(_state(model), {"node": node_id, "kind": "derived"})
        index[node_id] = {"weights": weights, "parent": parent, "lineage": lineage,
                          "retain-fisher": store.put(fisher, {"node": node_id}) if fisher is not None else None}
        out[f"{R.NODE_KEY_PREFIX}{step}"] = ConfigRecord(
            {R.NODE_ID: node_id, R.PARENT_ID: parent, R.WEIGHTS_DIGEST: weights, **lineage})
        parent = node_id
    store.put_json(MODELS_DOC, index)
    log(INFO, "train.derive: partition %d built %d %s models", pid, len(ids), kind)
    return Message(RecordDict(out), reply_to=msg)


def _evaluate_split(spec: ClientSpec, context: Context, model: nn.Module, forget: ForgetSpec,
                    forget_ds: Dataset) -> dict[str, float]:
    """Held-out forget/retain accuracy (class requests), else accuracy on the client's forget data + test."""
    test = spec.test_fn(context) if spec.test_fn is not None else None
    out: dict[str, float] = {}
    if test is not None:
        acc = forget_retain_accuracy(model, test, forget.classes)
        out[R.RETAIN_ACC] = acc["retain_acc"] if forget.classes else acc["acc"]
        if forget.classes:
            out[R.FORGET_ACC] = acc["forget_acc"]
    if not forget.classes and len(forget_ds):
        out[R.FORGET_ACC] = accuracy(model, make_loader(forget_ds, 256))
    return out


def handle_unlearn(spec: ClientSpec, msg: Message, context: Context) -> Message:
    """``train.unlearn``: dampen the listed models this client holds, in one ``unlearn_many`` step."""
    config = R.first_config(msg)
    store, forget = client_store(context, config), ForgetSpec.from_config(config)
    ids, new_ids = [str(i) for i in config[R.MODEL_IDS]], [str(i) for i in config[R.NODE_ID]]
    index = held_index(store, ids)
    forget_fisher = R.record_to_tensors(msg.content.array_records[R.FORGET_FISHER_KEY])
    data = spec.data_fn(context)
    forget_rows, retain_rows = forget.split_rows(data)
    weights = [store.get(index[i]["weights"]) for i in ids]
    if not len(retain_rows):  # nothing kept here (a forgotten client's own models): the federation's F_D
        if R.RETAIN_FISHER_KEY not in msg.content.array_records:
            raise UnlearnError(f"train.unlearn: partition {partition_id(context)} keeps no data after this request, "
                               "and the server sent no retain-Fisher to dampen its models with")
        retain = [R.record_to_tensors(msg.content.array_records[R.RETAIN_FISHER_KEY])] * len(ids)
    elif config.get(R.WANT_RETAIN):  # retain-fisher=fresh: on the kept data, at each model's own weights
        retain = [fisher_of(load_model(spec, context, w), data, retain_rows, context, config, seed=_seed(context, -1))
                  for w in weights]
    else:  # the Fisher accumulated while deriving, corrected for the forgotten share of its data
        missing = [i for i in ids if not index[i].get("retain-fisher")]
        if missing:
            raise UnlearnError(f"models {missing} were derived without accumulating a Fisher; use retain-fisher=fresh")
        retain = [retain_from_whole(store.get(index[i]["retain-fisher"]), forget_fisher,
                                    _rho(forget, index[i]["lineage"], len(forget_rows))) for i in ids]
    cfg = R.fiun_from_config(config)
    checks = [""] * len(ids)
    check_n = int(config.get(R.CALIBRATION_CHECK, 0))
    if config.get(R.SCALE_FREE) and check_n > 0 and forget.classes and len(forget_rows):
        # alpha="auto", a class: check each model here, on this client's own forget samples (no round trip)
        from strategies.calibration import _sample_tensors, check_held_models

        candidates, forgets, checks = check_held_models(
            load_model(spec, context, weights[0]), weights, retain, forget_fisher,
            _sample_tensors(data, forget_rows, check_n, _seed(context, -3)), config,
            own_fisher=lambda w: fisher_of(load_model(spec, context, w), data, forget_rows, context, config,
                                           seed=_seed(context, -2), cap_key=R.OWN_FISHER_SAMPLES))
        shared: dict[int, Any] = {}  # a Fisher several models share is normalised once
        new_weights, stats = unlearn_with_candidates(weights, scale_free_each(retain, shared),
                                                     scale_free_each(forgets, shared), cfg, candidates)
        stats = [{**_as_plain(st), "alpha": a, "lam": v} for st, (a, v) in zip(stats, candidates)]
    else:
        if config.get(R.SCALE_FREE):  # alpha="auto" chose alpha on mean-normalised Fishers (strategies.calibration)
            retain, forget_fisher = [scale_free(f) for f in retain], scale_free(forget_fisher)
        new_weights, stats = unlearn_many(weights, retain, [forget_fisher] * len(ids), cfg)
    out = {}
    for n, (old, new, w_new, st, check) in enumerate(zip(ids, new_ids, new_weights, stats, checks)):
        digest = store.put(w_new, {"node": new, "unlearned-from": old})
        index[new] = {**index[old], "weights": digest, "parent": old, "replaces": old}
        out[f"{R.NODE_KEY_PREFIX}{n}"] = ConfigRecord({
            R.PARENT_ID: old, R.NODE_ID: new, R.WEIGHTS_DIGEST: digest,
            **{k: v for k, v in _stats_items(st)}, **({R.CHECK: check} if check else {}),
        })
    store.put_json(MODELS_DOC, index)
    log(INFO, "train.unlearn: partition %d unlearned %d models", partition_id(context), len(ids))
    return Message(RecordDict(out), reply_to=msg)


def handle_eval_held(spec: ClientSpec, msg: Message, context: Context) -> Message:
    """``query.evalheld``: held-out forget / kept accuracy of models this client holds, by id, and the checks the
    config asks for (``strategies.verify.HeldChecks``: membership inference, backdoor) (for the report;
    ``train.unlearn`` only unlearns, so its round trip times the unlearning alone)."""
    from strategies.verify import HeldChecks

    config = R.first_config(msg)
    store, forget = client_store(context, config), ForgetSpec.from_config(config)
    ids = [str(i) for i in config[R.MODEL_IDS]]
    index = held_index(store, ids)
    data = spec.data_fn(context)
    forget_rows, _ = forget.split_rows(data)
    forget_ds = data.select(forget_rows)
    test = spec.test_fn(context) if spec.test_fn is not None else None
    checks = HeldChecks.from_config(config).runner(data, forget_rows, test, forget.classes)
    out = {}
    for n, node_id in enumerate(ids):
        model = load_model(spec, context, store.get(index[node_id]["weights"]))
        figures = {**_evaluate_split(spec, context, model, forget, forget_ds), **checks(model)}
        out[f"{R.NODE_KEY_PREFIX}{n}"] = ConfigRecord({R.NODE_ID: node_id, **{k: float(v) for k, v in figures.items()}})
    return Message(RecordDict(out), reply_to=msg)


def held_index(store: Store, ids: list[str]) -> dict[str, Any]:
    """This client's index of the models it holds; ``UnlearnError`` when ``ids`` names one it does not hold."""
    index = store.get_json(MODELS_DOC, {})
    unknown = [i for i in ids if i not in index]
    if unknown:
        raise UnlearnError(f"this client holds no models {unknown}; it holds {sorted(index)}")
    return index


def _rho(forget: ForgetSpec, lineage: Mapping[str, Any], held: int) -> float:
    """Forgotten share of a derived model's training data (``held``: this client's forget samples)."""
    hist = R.histogram_from_config(lineage)
    n = int(lineage[R.NUM_EXAMPLES])
    return forget.fraction(hist, n, held=held)


def _as_plain(stats: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else dict(stats)


def _stats_items(stats: Any) -> list[tuple[str, int | float]]:
    items = _as_plain(stats).items()
    return [(str(k).replace("_", "-"), v) for k, v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]


# ------------------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------------------


def unlearning_handlers(spec: ClientSpec) -> dict[str, Handler]:
    """Our handlers by message type (besides ``train`` and ``evaluate``), answering errors with error replies."""
    from strategies.baseline import handle_baseline, handle_baseline_held
    from strategies.calibration import handle_calibrate, handle_check  # they use this module's helpers
    from strategies.erase import handle_erase
    from strategies.repair import handle_repair, handle_repair_held, handle_repair_sent
    from strategies.verify import handle_losses

    table = {R.MSG_INFO: handle_info, R.MSG_FISHER: handle_fisher, R.MSG_EVAL_FORGET: handle_eval_forget,
             R.MSG_UNLEARN: handle_unlearn, R.MSG_EVAL_HELD: handle_eval_held, R.MSG_DERIVE: handle_derive,
             R.MSG_CALIBRATE: handle_calibrate, R.MSG_CHECK: handle_check, R.MSG_REPAIR: handle_repair,
             R.MSG_REPAIR_HELD: handle_repair_held, R.MSG_REPAIR_SENT: handle_repair_sent, R.MSG_ERASE: handle_erase,
             R.MSG_BASELINE: handle_baseline, R.MSG_BASELINE_HELD: handle_baseline_held, R.MSG_LOSSES: handle_losses}
    return {t: answering_errors(functools.partial(h, spec)) for t, h in table.items()}


def register_unlearning_handlers(app: ClientApp, spec: ClientSpec, *, train: bool = True,
                                 evaluate: bool = True) -> ClientApp:
    """Add fl_unlearn's message handlers to a Message-API ClientApp.

    Parameters
    ----------
    app : ClientApp
        The user's app (built without ``client_fn``; for a legacy app use :func:`unlearning_mod`).
    spec : ClientSpec
        Model and data access.
    train : bool (default: True)
        Also register our ``train`` (FedAvg's contract + Fisher + lineage). Pass ``False`` if the app has its
        own, and decorate that one with :func:`with_fisher` before registering it.
    evaluate : bool (default: True)
        Also register our ``evaluate`` (held-out accuracy split into forgotten / kept classes).

    Returns
    -------
    ClientApp
        ``app`` itself.

    Raises
    ------
    ValueError
        A message type is registered twice (Flower's own check), e.g. ``train`` with ``train=True``.

    Examples
    --------
    ::

        app = ClientApp()
        register_unlearning_handlers(app, ClientSpec(model_fn=..., data_fn=..., test_fn=...))
    """
    for message_type, handler in unlearning_handlers(spec).items():
        category, action = message_type.split(".")
        getattr(app, category)(action)(handler)
    if train:
        app.train()(answering_errors(functools.partial(handle_train, spec)))
    if evaluate:
        app.evaluate()(answering_errors(functools.partial(handle_evaluate, spec)))
    return app


def with_fisher(spec: ClientSpec, *, layers: str = "last") -> Callable[[Handler], Handler]:
    """Decorate a user's own ``train`` function so its reply carries our Fisher and lineage records.

    The user's training loop is not ours to hook, so the Fisher is computed after it, in one extra pass over
    the client's data on the trained weights (our own ``train`` accumulates it at no extra pass).
    """

    def decorate(train_fn: Handler) -> Handler:
        @functools.wraps(train_fn)
        def train(msg: Message, context: Context) -> Message:
            reply = train_fn(msg, context)
            if reply.has_error():
                return reply
            config = R.first_config(msg)
            return attach_fisher(spec, reply, context, layers=str(config.get(R.FISHER_LAYERS, layers)),
                                 fisher=bool(config.get(R.ACCUMULATE, True)))

        return train

    return decorate


def attach_fisher(spec: ClientSpec, reply: Message, context: Context, *, layers: str = "last",
                  weights: Tensors | None = None, fisher: bool = True) -> Message:
    """Add the lineage record, and with ``fisher`` the Fisher (post-hoc, on the reply's weights), to a train
    reply."""
    ds = spec.data_fn(context)
    extra: dict[str, Any] = {R.LINEAGE_KEY: ConfigRecord(lineage_config(ds, partition_id(context)))}
    if fisher:
        model = load_model(spec, context, weights if weights is not None else R.record_to_tensors(only_arrays(reply)))
        loader = make_loader(ds, setting(context, "batch-size"))
        extra[R.FISHER_KEY] = R.tensors_to_record(compute_fisher(model, loader, select_parameters(model, layers)))
    reply.content = RecordDict({**dict(reply.content.items()), **extra})
    return reply

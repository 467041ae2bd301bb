"""The baselines as unlearning methods of the App: ``finetune`` and ``gradient_ascent`` on every affected model.

``method=finetune`` or ``method=gradient_ascent`` (Hydra ``unlearning.method``) serves a request through the same
journal as FIUn (:class:`BaselineSteps` replaces FIUn's steps in ``fl_unlearn.recovery.serve_request``): the same
affected models get new versions, exactly once, recorded in the lineage, evaluated, erased after. Only the work
differs, and it runs where the data lives, from each affected model's own weights (``fl_unlearn.baselines``):

- ``finetune``: SGD steps on kept data. A server-held local update is fine-tuned at the client that trained it; a
  global model (or a local update whose client keeps nothing) by FedAvg rounds over every client that keeps data.
- ``gradient_ascent``: bounded ascent of the cross-entropy of the forgotten data (gradients clipped to norm 1,
  a model stops at a forget batch whose loss reaches ``ascent-loss-ceiling``). A server-held model by FedAvg rounds
  over the holders whose forgotten data reached it (their roots are the model or its ancestors).
- A client-held (derived) model, either way, at its holder, on the holder's own rows, ``rounds * steps`` steps.

Each server-held model takes ``baseline-rounds`` rounds of ``baseline-steps`` steps per client (a model every
executor stopped early, by the loss ceiling or for want of rows, ends sooner); every client draws at most
``baseline-samples`` rows (seeded). Where no executor holds a row the method needs (a derived model at a client
without forgotten data, under gradient ascent; a forgotten client's own models, under finetune) the model keeps its
weights: the new version equals the old one and the report says ``no_data``. That is what the baseline can do there,
and the figures show it.

Messages: ``train.baseline`` (models the server sends, returned after this round's steps; nothing stored) and
``train.baselineheld`` (models the client holds, stored as new versions whose index entry ``replaces`` the old).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from logging import INFO
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log

from fl_unlearn.baselines import AscentConfig, BaselineResult, FinetuneConfig, finetune, gradient_ascent
from fl_unlearn.calibrate import weighted_average
from fl_unlearn.errors import ConfigError, UnlearnError
from fl_unlearn.recovery import ClientsDone, Dampened, Fishers, Plan, version_id
from strategies import records as R
from strategies.forget import ForgetSpec, keeps_nothing, request_config
from strategies.journaled import ServerSteps

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from strategies.client import ClientSpec
    from strategies.nodes import NodeDirectory

Tensors = dict[str, torch.Tensor]
#: ``method`` values served by this module.
BASELINE_METHODS = ("finetune", "gradient_ascent")


@dataclasses.dataclass(frozen=True)
class BaselineSettings:
    """How a baseline method runs (the App's ``baseline-*`` keys).

    Parameters
    ----------
    method : str
        ``finetune`` (on kept data) or ``gradient_ascent`` (on the forgotten data).
    rounds : int (default: 2)
        FedAvg rounds per server-held model (a client-held model gets ``rounds * steps`` steps at its holder); >= 1.
    steps : int (default: 25)
        SGD steps per model, client and round; >= 1. (``benchmarks/baselines.py``: 50 fine-tuning steps per model.)
    lr : float (default: 0.05)
        SGD learning rate (finetune: momentum 0.9; gradient ascent: none, so a step moves at most ``lr``); > 0.
    samples : int (default: 1024)
        Cap on the rows each client draws (kept rows for finetune, forget rows for gradient ascent); >= 1.
    batch_size : int (default: 32)
    loss_ceiling : float (default: 5.0)
        Gradient ascent stops a model at a forget batch whose mean cross-entropy reaches this (true class at about
        e^-5 < 1 % probability), before stepping on it; > 0.
    """

    method: str
    rounds: int = 2
    steps: int = 25
    lr: float = 0.05
    samples: int = 1024
    batch_size: int = 32
    loss_ceiling: float = 5.0

    def __post_init__(self) -> None:
        if self.method not in BASELINE_METHODS:
            raise ConfigError(f"baseline method must be one of {BASELINE_METHODS}, got {self.method!r}")
        if self.rounds < 1 or self.steps < 1 or self.samples < 1 or self.batch_size < 1:
            raise ConfigError(f"baseline-rounds, baseline-steps, baseline-samples and batch-size must be >= 1, got "
                              f"{self.rounds}, {self.steps}, {self.samples}, {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr) and self.loss_ceiling > 0 and math.isfinite(self.loss_ceiling)):
            raise ConfigError(f"baseline-lr and ascent-loss-ceiling must be finite and > 0, got {self.lr} and "
                              f"{self.loss_ceiling}")

    def message_fields(self, steps: int) -> dict[str, Any]:
        """What a ``train.baseline*`` message carries (``steps`` per model at the client)."""
        return {R.BASELINE_METHOD: self.method, R.BASELINE_STEPS: int(steps), R.BASELINE_LR: float(self.lr),
                R.BASELINE_SAMPLES: int(self.samples), R.BASELINE_BATCH: int(self.batch_size),
                R.ASCENT_LOSS_CEILING: float(self.loss_ceiling)}

    @classmethod
    def from_message(cls, config: Mapping[str, Any]) -> BaselineSettings:
        """The settings a ``train.baseline*`` message asks for (``steps``: per model at this client)."""
        for key in (R.BASELINE_METHOD, R.BASELINE_STEPS, R.BASELINE_LR, R.BASELINE_SAMPLES, R.BASELINE_BATCH):
            if key not in config:
                raise UnlearnError(f"train.baseline: the message has no {key!r}")
        return cls(method=str(config[R.BASELINE_METHOD]), steps=int(config[R.BASELINE_STEPS]),
                   lr=float(config[R.BASELINE_LR]), samples=int(config[R.BASELINE_SAMPLES]),
                   batch_size=int(config[R.BASELINE_BATCH]), loss_ceiling=float(config.get(R.ASCENT_LOSS_CEILING, 5.0)))


# --- client side ---------------------------------------------------------------------------------------


def _run_method(spec: ClientSpec, context: Context, config: Mapping[str, Any], weights: Sequence[Tensors],
                seed_part: int) -> tuple[BaselineResult | None, int]:
    """The method on ``weights`` with this client's rows: ``(result, rows used)``; ``(None, 0)`` without rows."""
    from fl_unlearn.data import make_loader
    from strategies.client import _seed, capped_rows, load_model

    settings = BaselineSettings.from_message(config)
    steps = settings.steps
    data = spec.data_fn(context)
    forget_rows, kept_rows = ForgetSpec.from_config(config).split_rows(data)
    rows = kept_rows if settings.method == "finetune" else forget_rows
    rows = capped_rows(rows, settings.samples, _seed(context, -7))
    if not len(rows) or not weights:
        return None, 0
    loader = make_loader(data, settings.batch_size, rows=rows, shuffle=True, seed=_seed(context, -8, seed_part))
    model = load_model(spec, context, weights[0])
    if settings.method == "finetune":
        epochs = math.ceil(steps / max(len(loader), 1))
        result = finetune(model, weights, [loader] * len(weights),
                          FinetuneConfig(epochs=epochs, lr=settings.lr, max_steps=steps))
    else:
        result = gradient_ascent(model, weights, [loader] * len(weights),
                                 AscentConfig(lr=settings.lr, max_steps=steps, loss_ceiling=settings.loss_ceiling))
    return result, len(rows)


def _model_report(result: BaselineResult | None, n: int, rows: int) -> dict[str, Any]:
    if result is None:
        return {R.NUM_EXAMPLES: 0, R.BASELINE_STEPS: 0, R.BASELINE_STOP: "no_data"}
    return {R.NUM_EXAMPLES: rows, R.BASELINE_STEPS: int(result.steps[n]), R.BASELINE_STOP: result.stop_reasons[n]}


def handle_baseline(spec: ClientSpec, msg: Message, context: Context) -> Message:
    """``train.baseline``: this round's steps of the method on every model the server sent (``model-0``, ...), on
    this client's rows. Replies ``model-n`` (where it had rows) and ``node-n`` (the model's id, rows, steps, why it
    stopped). Nothing is stored here."""
    from strategies.client import partition_id

    config = R.first_config(msg)
    ids = [str(i) for i in config[R.MODEL_IDS]]
    arrays = msg.content.array_records
    missing = [i for n, i in enumerate(ids) if f"{R.MODEL_KEY_PREFIX}{n}" not in arrays]
    if missing:
        raise UnlearnError(f"{R.MSG_BASELINE}: models {missing} came without their weights")
    weights = [R.record_to_tensors(arrays[f"{R.MODEL_KEY_PREFIX}{n}"]) for n in range(len(ids))]
    result, rows = _run_method(spec, context, config, weights, int(config.get(R.BASELINE_ROUND, 0)))
    out: dict[str, Any] = {}
    for n, model_id in enumerate(ids):
        if result is not None:
            out[f"{R.MODEL_KEY_PREFIX}{n}"] = R.tensors_to_record(result.weights[n])
        out[f"{R.NODE_KEY_PREFIX}{n}"] = ConfigRecord({R.NODE_ID: model_id, **_model_report(result, n, rows)})
    log(INFO, "%s: partition %d, %s on %d models with %d rows", R.MSG_BASELINE, partition_id(context),
        config[R.BASELINE_METHOD], len(ids), rows)
    return Message(RecordDict(out), reply_to=msg)


def handle_baseline_held(spec: ClientSpec, msg: Message, context: Context) -> Message:
    """``train.baselineheld``: the method on the listed models this client holds, on its own rows; each result is
    stored as a new version under the id the server gave it (a model it had no rows for keeps its weights)."""
    from strategies.client import MODELS_DOC, client_store, held_index, partition_id

    config = R.first_config(msg)
    store = client_store(context, config)
    ids, new_ids = [str(i) for i in config[R.MODEL_IDS]], [str(i) for i in config[R.NODE_ID]]
    if len(ids) != len(new_ids):
        raise UnlearnError(f"{R.MSG_BASELINE_HELD}: {len(ids)} models but {len(new_ids)} new ids")
    index = held_index(store, ids)
    weights = [store.get(index[i]["weights"]) for i in ids]
    result, rows = _run_method(spec, context, config, weights, 0)
    out: dict[str, Any] = {}
    for n, (old, new) in enumerate(zip(ids, new_ids)):
        digest = index[old]["weights"]  # no rows here: the version is the same object (erasure keeps it)
        if result is not None:
            digest = store.put(result.weights[n], {"node": new, "baseline-of": old,
                                                   "method": str(config[R.BASELINE_METHOD])})
        index[new] = {**index[old], "weights": digest, "parent": old, "replaces": old}
        out[f"{R.NODE_KEY_PREFIX}{n}"] = ConfigRecord({R.PARENT_ID: old, R.NODE_ID: new, R.WEIGHTS_DIGEST: digest,
                                                       **_model_report(result, n, rows)})
    store.put_json(MODELS_DOC, index)
    log(INFO, "%s: partition %d, %s on %d held models with %d rows", R.MSG_BASELINE_HELD, partition_id(context),
        config[R.BASELINE_METHOD], len(ids), rows)
    return Message(RecordDict(out), reply_to=msg)


# --- server side ---------------------------------------------------------------------------------------


def baseline_rounds_at_clients(grid: Grid, nodes: NodeDirectory, models: Mapping[str, Tensors],
                               executors: Mapping[str, Sequence[int]], request_configs: Mapping[int, dict[str, Any]],
                               settings: BaselineSettings) -> dict[str, tuple[Tensors, dict[str, Any]]]:
    """``settings.rounds`` FedAvg rounds of ``train.baseline`` over server-held ``models`` (id -> weights), each
    model at its own ``executors`` (partitions), all models in the same round trips; each round's results are
    averaged weighted by the rows each client used. Returns id -> ``(weights, report)``; the report's ``stop``:
    ``budget`` (the rounds ran out), ``loss_ceiling`` (every executor with rows stopped at the ceiling: no further
    round) or ``no_data`` (no executor had a row: the model keeps its weights)."""
    from strategies.nodes import checked_replies, exchange

    current = dict(models)
    report = {m: {"rounds": 0, "steps": 0, "rows": 0, "executors": list(executors[m]), "stop": "no_data"}
              for m in models}
    active = [m for m in models if executors[m]]
    for rnd in range(settings.rounds):
        if not active:
            break
        by_pid: dict[int, list[str]] = {}
        for m in active:
            for pid in executors[m]:
                by_pid.setdefault(pid, []).append(m)
        msgs = []
        for pid, ids in sorted(by_pid.items()):
            cfg = ConfigRecord({R.MODEL_IDS: ids, R.BASELINE_ROUND: rnd, **settings.message_fields(settings.steps),
                                **request_configs[pid]})
            arrays = {f"{R.MODEL_KEY_PREFIX}{n}": R.tensors_to_record(current[m]) for n, m in enumerate(ids)}
            msgs.append(Message(RecordDict({**arrays, R.CONFIG_KEY: cfg}), dst_node_id=nodes.node_of(pid),
                                message_type=R.MSG_BASELINE))
        updates = _updates(checked_replies(exchange(grid, msgs, timeout=nodes.timeout), R.MSG_BASELINE), active)
        still = []
        for m in active:
            done = [u for u in updates[m] if u[1] > 0]
            if not done:  # no executor had a row this round: the model stays as it is
                continue
            current[m] = weighted_average([w for w, _, _, _ in done], [n for _, n, _, _ in done])
            rep = report[m]
            rep["rounds"] += 1
            rep["steps"] += sum(s for _, _, s, _ in done)
            rep["rows"] = max(rep["rows"], sum(n for _, n, _, _ in done))
            if any(stop == "budget" for _, _, _, stop in done):  # another round may still move the model
                rep["stop"] = "budget"
                still.append(m)
            else:  # every executor stopped early: the forget loss reached the ceiling
                rep["stop"] = "loss_ceiling"
        active = still
    return {m: (current[m], report[m]) for m in models}


def _updates(replies: Sequence[Message], asked: Sequence[str]) -> dict[str, list[tuple[Tensors, int, int, str]]]:
    """Model id -> ``(weights, rows, steps, stop)`` per ``train.baseline`` reply (weights empty without rows);
    ``UnlearnError`` for a reply about a model not asked for, or weights that contradict the rows."""
    updates: dict[str, list[tuple[Tensors, int, int, str]]] = {m: [] for m in asked}
    for reply in replies:
        for key, cfg in reply.content.config_records.items():
            if not key.startswith(R.NODE_KEY_PREFIX):
                continue
            model_id, rows = str(cfg[R.NODE_ID]), int(cfg[R.NUM_EXAMPLES])
            arrays_key = f"{R.MODEL_KEY_PREFIX}{key[len(R.NODE_KEY_PREFIX):]}"
            if model_id not in updates or (rows > 0) != (arrays_key in reply.content.array_records):
                raise UnlearnError(f"{R.MSG_BASELINE}: a reply about {model_id!r} that was not asked for or is "
                                   "inconsistent")
            weights = R.record_to_tensors(reply.content.array_records[arrays_key]) if rows else {}
            updates[model_id].append((weights, rows, int(cfg[R.BASELINE_STEPS]), str(cfg[R.BASELINE_STOP])))
    return updates


class BaselineSteps(ServerSteps):
    """:class:`fl_unlearn.recovery.UnlearnSteps` for ``finetune`` and ``gradient_ascent``: no Fishers; server-held
    models by :func:`baseline_rounds_at_clients`, client-held ones by ``train.baselineheld``. Plans, journals and
    records exactly as FIUn (:class:`strategies.journaled.ServerSteps`)."""

    def __init__(self, strategy: Any, grid: Grid, request: Any, outcome: Any, settings: BaselineSettings) -> None:
        super().__init__(strategy, grid, request, outcome)
        self.settings = settings
        self.method = settings.method  # journaled: serve_request refuses to finish it with another method

    def gather(self, plan: Plan) -> Fishers:
        """No Fishers: the holders, as the lineage records them (forget samples per partition)."""
        self._sync(plan)
        self.strategy.nodes.refresh(self.grid)
        holders = self.strategy._forget_allowance(self.request, plan.roots)
        self.outcome.holders = dict(holders)
        return Fishers({}, None, holders)

    def dampen(self, plan: Plan, todo: list[str], fishers: Fishers) -> Dampened:
        """The method on every server-held target, at the clients; each result goes to the store."""
        s, start = self.strategy, time.perf_counter()
        self._sync(plan)
        s.nodes.refresh(self.grid)
        digests, stats = {}, {}
        if todo:
            models = {m: s.store.get(s.graph.node(m).weights) for m in todo}
            executors = {m: self._executors(m, plan.roots, fishers.holders) for m in todo}
            configs = {p: request_config(self.request, p) for p in s.nodes.partition.values()}
            done = baseline_rounds_at_clients(self.grid, s.nodes, models, executors, configs, self.settings)
            for m, (weights, rep) in done.items():
                digests[m] = s.graph.node(m).weights if rep["rounds"] == 0 else s.store.put(  # 0: no rows anywhere
                    weights, {"kind": s.graph.node(m).kind, "baseline-of": m, "method": self.settings.method,
                              "request": self.request.id})
                stats[m] = {"method": self.settings.method, **rep}
        self.outcome.stats.update(stats)
        self.outcome.timing["dampen_s"] = time.perf_counter() - start
        log(INFO, "%s: %d server-held models in %.2f s", self.settings.method, len(todo), time.perf_counter() - start)
        return Dampened(digests, stats, [], self._settings())

    def unlearn_clients(self, plan: Plan, todo: dict[int, list[str]], fishers: Fishers,
                        done: Mapping[str, Any]) -> ClientsDone:
        """``train.baselineheld`` to every client holding targets, one round trip (failed clients retried)."""
        from strategies.nodes import send_with_retries

        s, start = self.strategy, time.perf_counter()
        self._sync(plan)
        s.nodes.refresh(self.grid)
        msgs, failures = [], {}
        steps = self.settings.rounds * self.settings.steps
        for pid, ids in sorted(todo.items()):
            if not any(p == pid for p in s.nodes.partition.values()):
                failures[pid] = f"no connected node holds partition {pid}"
                continue
            cfg = ConfigRecord({R.MODEL_IDS: ids, R.NODE_ID: [version_id(i, self.request) for i in ids],
                                R.STORE_DIR: str(s.store.root), **self.settings.message_fields(steps),
                                **request_config(self.request, pid)})
            msgs.append(Message(RecordDict({R.CONFIG_KEY: cfg}), dst_node_id=s.nodes.node_of(pid),
                                message_type=R.MSG_BASELINE_HELD))
        asked = {i: version_id(i, self.request) for ids in todo.values() for i in ids}
        replies, failed_nodes = send_with_retries(self.grid, msgs, R.MSG_BASELINE_HELD, timeout=s.nodes.timeout,
                                                  retries=s.reply_retries, check=lambda r: _check_held_reply(r, asked))
        failures.update({s.nodes.partition.get(n, n): why for n, why in failed_nodes.items()})
        digests, reports = {}, {}
        for reply in replies:
            for key, cfg in reply.content.config_records.items():
                if key.startswith(R.NODE_KEY_PREFIX):
                    old = str(cfg[R.PARENT_ID])
                    digests[old] = str(cfg[R.WEIGHTS_DIGEST])
                    reports[old] = {"method": self.settings.method, "steps": int(cfg[R.BASELINE_STEPS]),
                                    "rows": int(cfg[R.NUM_EXAMPLES]), "stop": str(cfg[R.BASELINE_STOP])}
        self.outcome.client_results.update(reports)
        self.outcome.stats.update(reports)
        self.outcome.timing["clients_s"] = time.perf_counter() - start
        return ClientsDone(digests, reports, failures)

    def _executors(self, model_id: str, roots: Sequence[str], holders: Mapping[int, int]) -> list[int]:
        """The partitions that run the method on server-held ``model_id`` (see the module docstring)."""
        s = self.strategy
        node = s.graph.node(model_id)
        live = sorted(set(s.nodes.partition.values()))
        if self.settings.method == "finetune":
            keep = [p for p in live if not keeps_nothing(self.request, p, s.nodes.info.get(p))]
            return [node.client] if node.kind != "global" and node.client in keep else keep
        lineage = set(s.graph.ancestors(model_id)) | {model_id}
        reached = {s.graph.node(r).data.client for r in roots if r in lineage and s.graph.node(r).data is not None}
        return [p for p in live if p in reached and holders.get(p, 0) > 0]

    def _settings(self) -> dict[str, Any]:
        return {"method": self.settings.method, "baseline": dataclasses.asdict(self.settings)}


def _check_held_reply(reply: Message, asked: Mapping[str, str]) -> None:
    """Refuse a ``train.baselineheld`` reply about a model not asked for, under another id, or without a digest."""
    for key, cfg in reply.content.config_records.items():
        if not key.startswith(R.NODE_KEY_PREFIX):
            continue
        old, new, digest = str(cfg[R.PARENT_ID]), str(cfg[R.NODE_ID]), str(cfg[R.WEIGHTS_DIGEST])
        if asked.get(old) != new or not R.is_digest(digest):
            raise UnlearnError(f"{R.MSG_BASELINE_HELD}: a reply for {old!r} -> {new!r} that was not asked for")

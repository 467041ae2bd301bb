"""Server side: a strategy wrapper that records lineage and unlearns on request.

:class:`UnlearningStrategy` wraps any ``flwr.serverapp.strategy.Strategy`` (FedAvg, FedProx, FedAdam, a
user's own) the way Flower's DP wrappers do: it keeps the inner strategy as ``self.strategy``, delegates all
five methods, and works around ``configure_train`` / ``aggregate_train``:

- ``configure_train`` learns node id -> partition id with ``query.info`` (waiting out the registration race),
  checkpoints the incoming global model, lets the inner strategy sample nodes from a view sorted by partition
  id with a private seeded RNG (so runs repeat), and tells every client which model it starts from;
- ``aggregate_train`` strips the Fisher diagonal and lineage record each client adds to its reply (so the
  inner strategy sees Flower's one-ArrayRecord/one-MetricRecord contract), aggregates through the inner
  strategy, and records one ``local`` node per client update and one ``global`` node per round, with
  weights and retain-Fishers in the store.

:meth:`UnlearningStrategy.unlearn` serves a request: affected set from the lineage, forget-Fishers from the
clients holding the data (one ``send_and_receive``), MFIM merge, one vectorised FIUn step over every
affected server-held model, ``train.unlearn`` to every client holding an affected model (one
``send_and_receive``), and a reset of the inner strategy's optimiser state. The request is journaled state by
state (``fl_unlearn.recovery``, ``strategies.journaled``): a crash resumes it, a failed client leaves it
``incomplete`` until a later call finishes it, and a served request is never applied twice (``docs/RELIABILITY.md``).

The delegation itself lives in :class:`~strategies.base.DelegatingStrategy`; the retrain baseline in
:mod:`strategies.retrain`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_unlearn.calibrate import scale_free_each
from fl_unlearn.erasure import PREPARED_RETAIN_REF
from fl_unlearn.errors import ConfigError, FisherError, RecordError, RequestError, UnlearnError
from fl_unlearn.fisher import check_fisher
from fl_unlearn.fiun import FIUnConfig, unlearn_many
from fl_unlearn.journal import RequestJournal
from fl_unlearn.lineage import LineageGraph, ModelNode, TrainingData
from fl_unlearn.mfim import merge_fishers
from fl_unlearn.requests import UnlearningRequest, validate_request
from fl_unlearn.recovery import ClientFailure, serve_request
from fl_unlearn.recovery import version_id as version_id  # re-exported: the lineage id of an unlearned version
from fl_unlearn.store import Store
from strategies import records as R
from strategies.base import DelegatingStrategy
from strategies.calibration import ClientCalibration, CalibrationRound, begin_calibration, calibrate_at_clients
from strategies.forget import forget_count, keeps_nothing, request_config, retain_from_whole
from strategies.baseline import BaselineSettings, BaselineSteps
from strategies.journaled import ServerSteps, fill_outcome
from strategies.nodes import checked_replies, exchange, send_with_retries
from strategies.strategy_utils import reset_optimiser_state

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Calibration:
    """Held-out calibration data for ``alpha="auto"`` (``fl_unlearn.calibrate``), kept by the server.

    Attributes
    ----------
    model : nn.Module
        Any instance of the architecture (candidates run through it with ``functional_call``).
    forget, retain : tuple[Tensor, Tensor]
        ``(x, y)`` of held-out samples of the forgotten classes and of the kept classes.
    target : float (default: 0.0)
        Highest accepted accuracy on ``forget``.
    """

    model: torch.nn.Module
    forget: tuple[torch.Tensor, torch.Tensor]
    retain: tuple[torch.Tensor, torch.Tensor]
    target: float = 0.0


@dataclass
class UnlearnOutcome:
    """What :meth:`UnlearningStrategy.unlearn` did.

    Attributes
    ----------
    request : UnlearningRequest
    roots, affected : list[str]
        Lineage ids, chronological.
    method : str
        ``fiun``, or the baseline method that served the request (``strategies.baseline``).
    versions : dict[str, str]
        Affected node id -> id of its unlearned version.
    server_models : list[str]
        Affected ids whose weights the server holds (dampened server-side).
    client_results : dict[str, dict]
        Affected client-held id -> the client's report (before/after accuracies, counts).
    holders : dict[int, int]
        Partition id -> forget samples it holds.
    stats : dict[str, dict]
        Per dampened model: FIUn statistics (selected / zeroed counts); with a baseline method, its report per
        model (rounds, steps, rows, executors, why it stopped).
    timing : dict[str, float]
        ``forget_fisher_s``, ``merge_s``, ``dampen_s``, ``clients_s``, ``unlearn_s`` (their sum and more).
    optimiser_reset : list[str]
        Server-optimiser attributes reset.
    fiun, scale_free : FIUnConfig | None, bool
        The dampening settings used; with ``alpha="auto"`` at the clients, the chosen alpha on mean-normalised
        Fishers (``scale_free`` True).
    calibration : dict
        ``alpha="auto"`` at the clients: the chosen alpha, the target, and the summed grid of accuracies.
    model_candidates : dict[str, tuple[float, float]]
        ``alpha="auto"``, class requests: server-held models the per-model check gave their own
        ``(alpha, lambda)`` (the others use ``fiun``'s).
    state : str
        The request's journal state: ``verified`` (every affected model unlearned, exactly once) or
        ``incomplete`` (``missing`` lists the models not unlearned yet; serving the request again finishes them).
    missing : list[str]
        Affected models not unlearned yet (clients that failed after the retries).
    failures : dict[int, str]
        Partition id -> why it failed, this run.
    resumed_from : str | None
        The journal state the request was resumed from (a crash or an incomplete earlier run), else ``None``.
    retain_source : str
        Where the server-held models' retain-Fisher came from: ``prepared`` (after training), ``fresh`` (computed
        for this request; also when ``prepared`` found none for the model) or ``accumulated``.
    forget_prepared : list[int]
        Partitions whose forget-Fisher was prepared after training rather than computed for this request.
    """

    request: UnlearningRequest
    roots: list[str]
    affected: list[str]
    method: str = "fiun"
    versions: dict[str, str] = field(default_factory=dict)
    server_models: list[str] = field(default_factory=list)
    client_results: dict[str, dict[str, Any]] = field(default_factory=dict)
    holders: dict[int, int] = field(default_factory=dict)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    optimiser_reset: list[str] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)
    fiun: FIUnConfig | None = None
    scale_free: bool = False
    calibration: dict[str, Any] = field(default_factory=dict)
    model_candidates: dict[str, tuple[float, float]] = field(default_factory=dict)
    state: str = "verified"
    missing: list[str] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)
    resumed_from: str | None = None
    retain_source: str = ""
    forget_prepared: list[int] = field(default_factory=list)


#: ``_gather_fishers``' key for the prepared whole-data Fisher, in place of the clients' retain-Fishers.
PREPARED = -1


def _part_ref(pid: int, weights: str) -> str:
    """Ref of client ``pid``'s whole-partition Fisher prepared on ``weights`` (its last part is the weights digest,
    so ``fl_unlearn.erasure`` erases it with the weights it was prepared on)."""
    return f"{PREPARED_RETAIN_REF}/p{pid}/{weights}"


class UnlearningStrategy(DelegatingStrategy):
    """Wrap a strategy: record lineage, checkpoint every model, unlearn on request.

    Parameters
    ----------
    strategy : Strategy
        The strategy to wrap (FedAvg, FedProx, FedAdam, a user's subclass). Its behaviour is unchanged.
    store : Store
        Where weights and Fisher diagonals go.
    graph : LineageGraph
        The lineage to record into (journaled when it has a directory).
    num_nodes : int (default: 0)
        Nodes to wait for before the first round (registration race); pass the federation size.
    seed : int (default: 0)
        Seeds node sampling (a private ``random.Random``; clients sorted by partition id).
    num_classes : int | None (default: None)
        Number of classes, to reject requests for unknown classes by id.
    fisher_layers : str (default: "all")
        Parameters the Fishers cover (``fl_unlearn.fisher.select_parameters`` spec); sent to clients; only these
        are dampened. ``last`` (the classifier, the paper's choice) did not forget MNIST class 3: 27-94 % held-out
        accuracy was left. ``all-but-first`` leaves the input layer undampened: better on benchmarks/robustness.py
        (digits: every class within 2.4 points of retraining instead of 3.0), worse in the App's own MNIST
        federations (classes 0 and 1 took stronger alphas and kept 93.2 % and 90.7 % instead of 97.4 % and 93.5 %).
    fisher_estimator : str (default: "expected")
        ``expected``, ``batch`` or ``per_sample`` (``fl_unlearn.fisher.compute_fisher``); the same for retain- and
        forget-Fishers. ``expected``, the true Fisher of the model's own outputs, costs a backward pass per class
        (21 s to prepare the App's MNIST federation of 4 clients against 13.6 s with ``batch``) and is what made ``alpha="auto"`` forget every class of MNIST and digits within issue 9's bar
        (``benchmarks/robustness.py``: worst kept gap 0.2 and 1.9 points instead of 1.0 and 3.0). With many classes
        and a large model (CIFAR-100, ResNet-18) ``batch`` is the affordable choice on a CPU.
    mfim_mode : str (default: "weighted_mean")
        How several data holders' forget-Fishers merge (``fl_unlearn.mfim.merge_fishers``).
    retain_fisher : str (default: "prepared")
        ``prepared``: after training, :meth:`prepare_fishers` asks every client for the Fisher of its whole
        partition (at most ``retain_fisher_samples``) on the newest global model and stores the sample-weighted
        mean; a request on that model uses it as is, as SSD's ``F_D`` (the Fisher of all training data, the
        forgotten data included: with the batch estimator one class's share of it is about 1/C^2), and asks only the
        data holders for forget-Fishers, which they prepared too for single-class requests. Without prepared
        Fishers for the model (not called, or the served model changed since) a request falls back to ``fresh``,
        with a warning. ``fresh``: every client also computes the Fisher of its kept data (at most
        ``retain_fisher_samples``) on the model the forget-Fisher is computed on, in the same round trip; the
        sample-weighted mean is every server-held model's retain-Fisher. With either, clients compute one for
        each model they hold, at its own weights (at most ``fisher_samples``). ``accumulated``:
        the Fishers clients accumulated while training, corrected for the forgotten share
        (:func:`~strategies.forget.retain_from_whole`); free, but measured to under-select on MNIST (the
        training-time Fisher is much larger than the post-training forget-Fisher).
    fisher_samples : int (default: 512)
        Cap per client on each forget-Fisher pass, and on the retain-Fisher of client-held models (0: all samples).
        With the ``batch`` estimator the forget-Fisher needed many: on MNIST class 3 (1,500 samples per client),
        256 of them left the final global model 53-57 % of kept accuracy after FIUn, all of them 98.5 % (2048 was
        the default then); the ``expected`` one on 512 forgot every class of MNIST within 1 point of retraining.
    retain_fisher_samples : int (default: 1024)
        Cap per client on the retain-Fisher of the server-held models (0: all samples). With ``batch``, a random
        4,096 of MNIST's 15,000 per client made the choice a draw (class 6 kept 98 % with one subset, 11 % with two
        others; 0 was the default then); the ``expected`` one on 1,024 chose as well as on all of them.
    fiun : FIUnConfig | None (default: None)
        Selection/dampening settings; ``FIUnConfig()`` when ``None``.
    calibration : Calibration | None (default: None)
        Choose alpha per affected model on these held-out samples (``fl_unlearn.calibrate.calibrate_alpha``:
        the mildest alpha that meets the forget target); ``fiun.alpha`` is then ignored. Client-held models
        use the alpha chosen for the newest affected global model. Data the server holds; prefer
        ``client_calibration``.
    client_calibration : ClientCalibration | None (default: None)
        ``alpha="auto"`` on data the clients hold (``strategies.calibration``): one ``query.calibrate`` round
        trip on the newest affected global model chooses one alpha on mean-normalised Fishers for every affected
        model; ``fiun.alpha`` is then ignored. Used when ``calibration`` is ``None``.
    keep_local_weights : bool (default: True)
        Store every client update, so local models can be unlearned too (costs a model per client and round).
    node_timeout : float (default: 120.0)
        Seconds to wait for nodes and replies.

    Examples
    --------
    Wrap a strategy and run it as usual, then serve a request::

        strategy = UnlearningStrategy(FedAvg(), Store(d / "store"), LineageGraph(d / "lineage"), num_nodes=4)
        result = strategy.start(grid, initial_arrays, num_rounds=3)
        outcome = strategy.unlearn(grid, UnlearningRequest.for_classes([3]))
    """

    #: Extra attempts for a client that errs or times out in ``query.fisher`` / ``train.unlearn``.
    reply_retries: int = 2

    def __init__(
        self,
        strategy: Strategy,
        store: Store,
        graph: LineageGraph,
        *,
        num_nodes: int = 0,
        seed: int = 0,
        num_classes: int | None = None,
        fisher_layers: str = "all",
        fisher_estimator: str = "expected",
        mfim_mode: str = "weighted_mean",
        retain_fisher: str = "prepared",
        fisher_samples: int = 512,
        retain_fisher_samples: int = 1024,
        fiun: FIUnConfig | None = None,
        calibration: Calibration | None = None,
        client_calibration: ClientCalibration | None = None,
        keep_local_weights: bool = True,
        node_timeout: float = 120.0,
    ) -> None:
        super().__init__(strategy, num_nodes=num_nodes, seed=seed, node_timeout=node_timeout)
        if retain_fisher not in ("prepared", "fresh", "accumulated"):
            raise ConfigError(f"retain_fisher must be 'prepared', 'fresh' or 'accumulated', got {retain_fisher!r}")
        if isinstance(retain_fisher_samples, bool) or not isinstance(retain_fisher_samples, int) \
                or retain_fisher_samples < 0:
            raise ConfigError(f"retain_fisher_samples must be an int >= 0 (0: all), got {retain_fisher_samples!r}")
        self.store, self.graph = store, graph
        self.num_classes = num_classes
        self.fisher_layers, self.fisher_estimator, self.mfim_mode = fisher_layers, fisher_estimator, mfim_mode
        self.retain_fisher, self.fisher_samples = retain_fisher, fisher_samples
        self.retain_fisher_samples = retain_fisher_samples
        self._round_offset = 0
        self._dtypes: dict[str, torch.dtype] | None = None
        self.fiun = fiun
        self.calibration = calibration
        self.client_calibration = client_calibration
        self.keep_local_weights = keep_local_weights
        self.current: str | None = self._newest_global()

    def __repr__(self) -> str:
        return f"UnlearningStrategy({self.strategy!r})"

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> Unlearning (fl_unlearn):")
        log(INFO, "\t│\t├── Store: %s", self.store.root)
        log(INFO, "\t│\t├── Lineage: %d models", len(self.graph))
        log(INFO, "\t│\t├── Fisher: %s layers, %s estimator", self.fisher_layers, self.fisher_estimator)
        log(INFO, "\t│\t└── MFIM: %s", self.mfim_mode)
        super().summary()

    # -- training: lineage and checkpoints --------------------------------------------------------------

    def _newest_global(self) -> str | None:
        """The served global model: the newest global node holding the weights the store's ``latest-global`` ref
        points at (an earlier global repaired after a request is newer in the lineage, but not served), else the
        newest global node."""
        globals_ = [n for n in self.graph.nodes() if n.kind == "global"]
        served = self.store.get_ref("latest-global")
        matching = [n.id for n in globals_ if served is not None and n.weights == served]
        return (matching or [n.id for n in globals_] or [None])[-1]

    def _extra_train_config(self, server_round: int) -> dict[str, Any]:
        return {R.PARENT_ID: self.current or "", R.FISHER_LAYERS: self.fisher_layers,
                R.FISHER_ESTIMATOR: self.fisher_estimator, R.ACCUMULATE: self.retain_fisher == "accumulated"}

    def _lineage_round(self, server_round: int) -> int:
        """The round as the lineage counts it: ``start()`` numbers rounds from 1 each time it is called, so a
        later call (training on after unlearning) continues after the last recorded round."""
        if server_round == 1:
            self._round_offset = max((n.round or 0 for n in self.graph.nodes() if n.kind == "global"), default=0)
        return server_round + self._round_offset

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Checkpoint the incoming global model, then configure as the inner strategy does."""
        self._checkpoint_input(self._lineage_round(server_round), arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def _model_tensors(self, arrays: ArrayRecord) -> Tensors:
        """Tensors in the model's own dtypes (FedAdam's numpy maths returns float64 arrays)."""
        tensors = R.record_to_tensors(arrays)
        if self._dtypes is None:
            first = self.graph.nodes()[0] if len(self.graph) else None
            reference = self.store.get(first.weights) if first is not None and first.weights else tensors
            self._dtypes = {k: v.dtype for k, v in reference.items()}
        return {k: v.to(self._dtypes.get(k, v.dtype)) for k, v in tensors.items()}

    def _checkpoint_input(self, lineage_round: int, arrays: ArrayRecord) -> None:
        """Record the model a round starts from: ``global-r0`` at first, else check it is the current one."""
        weights = self._model_tensors(arrays)
        digest = self.store.put(weights, {"kind": "global", "round": lineage_round - 1})
        if self.current is not None and self.graph.node(self.current).weights == digest:
            return
        node_id = f"global-r{lineage_round - 1}" if self.current is None else f"global-r{lineage_round - 1}-in"
        parents = () if self.current is None else (self.current,)
        self.graph.add_node(node_id, "global", round=lineage_round - 1, parents=parents, weights=digest,
                            meta={"note": "initial model" if not parents else "model changed between rounds"})
        self.current = node_id
        self.store.set_ref("latest-global", digest)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Strip Fisher and lineage records, aggregate with the inner strategy, record the round."""
        replies = self._in_partition_order(replies)
        extras = [self._strip(r) for r in replies]
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            self._record_round(server_round + self._round_offset, replies, extras, arrays)
        return arrays, metrics

    def _record_round(
        self, server_round: int, replies: list[Message], extras: list[tuple[Any, Any]], arrays: ArrayRecord
    ) -> None:
        parent = self.current
        locals_, fishers, counts = [], [], []
        for reply, (fisher, lineage) in zip(replies, extras):
            if reply.has_error() or lineage is None:
                continue
            node_id, fisher_t, n = self._record_local(server_round, reply, fisher, lineage, parent)
            locals_.append(node_id)
            if fisher_t is not None:
                fishers.append(fisher_t)
                counts.append(n)
        complete = fishers and len(fishers) == len(locals_)
        retain = merge_fishers(fishers, num_samples=counts, mode="weighted_mean") if complete else None
        digest = self.store.put(self._model_tensors(arrays), {"kind": "global", "round": server_round})
        self.graph.add_node(
            f"global-r{server_round}", "global", round=server_round, parents=tuple(locals_), weights=digest,
            retain_fisher=self.store.put(retain, {"kind": "retain-fisher", "round": server_round}) if retain else None,
            meta={"num-examples": int(sum(counts))},
        )
        self.current = f"global-r{server_round}"
        self.store.set_ref("latest-global", digest)
        log(INFO, "lineage: round %d -> %s from %d client updates", server_round, self.current, len(locals_))

    def _record_local(
        self, server_round: int, reply: Message, fisher: ArrayRecord | None, lineage: ConfigRecord, parent: str | None
    ) -> tuple[str, Tensors | None, int]:
        pid = self.nodes.partition.get(reply.metadata.src_node_id, int(lineage[R.PARTITION_ID]))
        n = int(lineage[R.NUM_EXAMPLES])
        fisher_t = R.record_to_tensors(fisher) if fisher is not None else None
        weights = None
        if self.keep_local_weights:
            (record,) = reply.content.array_records.values()
            weights = self.store.put(self._model_tensors(record), {"kind": "local", "round": server_round,
                                                                   "client": pid})
        node_id = f"local-r{server_round}-p{pid}"
        data = TrainingData(pid, R.histogram_from_config(lineage), sample_digest=str(lineage[R.SAMPLE_DIGEST]) or None)
        self.graph.add_node(
            node_id, "local", round=server_round, parents=(parent,) if parent else (), owner=f"client:{pid}",
            data=data, weights=weights,
            retain_fisher=self.store.put(fisher_t, {"kind": "retain-fisher", "round": server_round, "client": pid})
            if fisher_t else None,
            meta={"num-examples": n, "held-by": "server" if weights else "nobody"},
        )
        return node_id, fisher_t, n

    # -- derived models -----------------------------------------------------------------------------------

    def derive(self, grid: Grid, kind: str, depth: int = 1, *, partitions: Sequence[int] | None = None) -> list[str]:
        """Ask clients to build chains of ``depth`` derived models from the current global model.

        One ``train.derive`` per client, all in one ``send_and_receive``; every reply's nodes are recorded in
        the lineage (owner ``client:<pid>``; the weights stay on the client). Returns the new node ids.
        """
        if self.current is None:
            raise UnlearnError("derive needs a global model; train first")
        self.nodes.refresh(grid)
        pids = sorted(self.nodes.partition.values()) if partitions is None else sorted(partitions)
        base = self.graph.node(self.current)
        arrays = R.tensors_to_record(self.store.get(base.weights))
        msgs = []
        for pid in pids:
            ids = [f"derived-{kind}-p{pid}-{base.id}-{d}" for d in range(1, depth + 1)]
            cfg = ConfigRecord({R.KIND: kind, R.DEPTH: depth, R.PARENT_ID: base.id, R.MODEL_IDS: ids,
                                R.FISHER_LAYERS: self.fisher_layers, R.FISHER_ESTIMATOR: self.fisher_estimator,
                                R.ACCUMULATE: self.retain_fisher == "accumulated", R.STORE_DIR: str(self.store.root)})
            msgs.append(Message(RecordDict({R.ARRAYS_KEY: arrays, R.CONFIG_KEY: cfg}),
                                dst_node_id=self.nodes.node_of(pid), message_type=R.MSG_DERIVE))
        new: list[str] = []
        replies = checked_replies(exchange(grid, msgs, timeout=self.nodes.timeout), "train.derive")
        for reply in self._in_partition_order(replies):
            pid = self.nodes.partition[reply.metadata.src_node_id]
            for key in sorted(k for k in reply.content.config_records if k.startswith(R.NODE_KEY_PREFIX)):
                cfg = reply.content.config_records[key]
                self.graph.add_node(
                    str(cfg[R.NODE_ID]), "derived", round=base.round, parents=(str(cfg[R.PARENT_ID]),),
                    owner=f"client:{pid}",
                    data=TrainingData(pid, R.histogram_from_config(cfg), sample_digest=str(cfg[R.SAMPLE_DIGEST])),
                    meta={"derive": kind, "client-weights": str(cfg[R.WEIGHTS_DIGEST]), "held-by": f"client:{pid}"},
                )
                new.append(str(cfg[R.NODE_ID]))
        log(INFO, "derive: %d %s models on %d clients", len(new), kind, len(pids))
        return new

    # -- unlearning -----------------------------------------------------------------------------------------

    def check_request(self, request: UnlearningRequest) -> None:
        """Raise ``RequestError`` for a request that is malformed, unknown, or names data no model saw."""
        known = {n.data.client for n in self.graph.nodes() if n.data is not None and n.data.client is not None}
        validate_request(request, num_classes=self.num_classes, known_clients=known or None, graph=self.graph)

    def unlearn(self, grid: Grid, request: UnlearningRequest, *,
                baseline: BaselineSettings | None = None) -> UnlearnOutcome:
        """Unlearn ``request`` from every affected model at once, exactly once, through the request journal.

        With ``baseline`` (``strategies.baseline``), a baseline method (``finetune``, ``gradient_ascent``) does the
        work instead of FIUn, through the same journal, versions and records; no Fishers are gathered.

        Phases (each a short method, ordered by ``fl_unlearn.recovery.serve_request``, which journals each
        state in ``<store>/journal`` before acting on it): check the request and fix the affected models;
        gather forget-Fishers from the data holders in one round trip; merge them (MFIM); dampen every affected
        server-held model in one ``fl_unlearn.fiun.unlearn_many`` call; send ``train.unlearn`` to every client
        holding an affected model in one round trip; record the new versions; reset server-optimiser state.
        Requests are serialised by the store's lock.

        A request the journal holds part-way (a crash, or clients that failed) resumes where it stopped and
        finishes only what is missing. Clients that err or time out are retried ``reply_retries`` times, then
        reported: ``outcome.state`` is ``incomplete`` and ``outcome.missing`` lists the models not unlearned.

        Raises
        ------
        RequestError
            Bad request (unknown class or client, data no model trained on), a client claiming forget data
            the lineage does not give it, or a request id already applied. Nothing changes.
        FisherError, RecordError
            A client sent a malformed, wrong-shaped or NaN Fisher. No model changes.
        StoreError
            A tampered checkpoint or journal. Nothing changes.
        """
        if not isinstance(request, UnlearningRequest):
            raise RequestError(f"unlearn expects an UnlearningRequest, got {type(request).__name__}")
        self.check_request(request)  # fail fast, before the lock file or the journal is touched
        outcome = UnlearnOutcome(request, [], [], method=baseline.method if baseline is not None else "fiun")
        # Waiting for the nodes to come up (a fresh `mode=unlearn` run starts its clients now) is not unlearning
        # work: it is timed apart, as `nodes_s`, so `unlearn_s` compares with retraining a running federation.
        t0 = time.perf_counter()
        self.nodes.refresh(grid)
        outcome.timing["nodes_s"] = time.perf_counter() - t0
        start = time.perf_counter()
        with self.store.lock():
            steps = ServerSteps(self, grid, request, outcome) if baseline is None \
                else BaselineSteps(self, grid, request, outcome, baseline)
            progress = serve_request(RequestJournal.for_store(self.store), request, self.graph, self.store, steps,
                                     refs=("latest-global",))
        fill_outcome(outcome, progress)
        if self.current in outcome.versions:
            self.current = outcome.versions[self.current]
        outcome.optimiser_reset = reset_optimiser_state(self.strategy) if outcome.versions else []
        outcome.timing["unlearn_s"] = time.perf_counter() - start
        log(INFO, "unlearn: request %s %s: %d of %d models unlearned in %.2f s%s (optimiser state reset: %s)",
            request.id, outcome.state, len(outcome.versions), len(outcome.versions) + len(outcome.missing),
            outcome.timing["unlearn_s"], f"; missing {outcome.missing}" if outcome.missing else "",
            ", ".join(outcome.optimiser_reset) or "none")
        return outcome

    def erase(self, grid: Grid, request: UnlearningRequest) -> dict[str, Any]:
        """Erase what the verified ``request`` replaced: the superseded weights and the request's Fishers in the
        server's store, the superseded models at the clients (``train.erase``); see :mod:`strategies.erase`.
        Call it once nothing reads the originals any more (after the repairs and the report's figures).

        Raises
        ------
        UnlearnError
            The request is not ``verified`` (an ``incomplete`` one resumes from its originals); nothing is erased.
        """
        from strategies.erase import erase_request

        return erase_request(grid, self, request.id)

    def _holders(self, request: UnlearningRequest, roots: list[str]) -> list[int]:
        """Partitions holding forget data: the clients of the roots' training data."""
        return sorted({c for r in roots if (c := self.graph.node(r).data.client) is not None})

    def _newest_affected_global(self, affected: list[str]) -> ModelNode:
        """The served global model when it is affected (it inherited from every earlier global), else the newest
        affected global node. Not simply the newest node: a repaired earlier global is recorded after the served
        model (``repair-scope=all``)."""
        globals_ = [self.graph.node(a) for a in affected if self.graph.node(a).kind == "global"]
        if not globals_:
            raise UnlearnError("no global model is affected; nothing to compute the forget-Fisher on")
        served = [g for g in globals_ if g.id == self.current]
        return (served or globals_)[-1]

    def _gather_fishers(
        self, grid: Grid, request: UnlearningRequest, roots: list[str], outcome: UnlearnOutcome
    ) -> tuple[dict[int, tuple[Tensors, int]], dict[int, tuple[Tensors, int]]]:
        """One ``query.fisher`` per client, all at once, on the newest affected global model.

        Data holders return their forget-Fisher; with ``retain_fisher="fresh"`` (or ``prepared`` without a
        prepared Fisher for the model) every client is asked and also returns the retain-Fisher of its kept data.
        Returns ``(forget, retain)``: partition -> (Fisher, samples); with a prepared Fisher, ``retain`` holds it
        alone, under :data:`PREPARED`. Every reply is checked before any is used
        (:meth:`_check_fisher_reply`); a client that errs or times out is retried, then reported
        (``ClientFailure``).
        """
        model = self._newest_affected_global(outcome.affected)
        prepared = self._prepared_for(model) if self.retain_fisher == "prepared" else None
        fresh = self.retain_fisher != "accumulated" and prepared is None
        if self.retain_fisher == "prepared" and fresh:
            log(WARNING, "unlearn: no Fishers prepared for %s (prepare_fishers after training prepares them); every "
                "client computes its retain-Fisher for this request", model.id)
        outcome.retain_source = "fresh" if fresh else self.retain_fisher
        pids = sorted(self.nodes.partition.values()) if fresh else self._holders(request, roots)
        weights = self.store.get(model.weights)
        arrays = R.tensors_to_record(weights)
        msgs, failures = [], {}
        for pid in pids:
            try:
                msgs.append(self._fisher_message(model.id, arrays, pid, request, want_retain=fresh))
            except UnlearnError as err:  # the partition's node is not connected
                failures[pid] = str(err)
        allowed = self._forget_allowance(request, roots)
        replies, failed_nodes = send_with_retries(
            grid, msgs, R.MSG_FISHER, timeout=self.nodes.timeout, retries=self.reply_retries,
            check=lambda r: self._check_fisher_reply(r, weights, allowed))
        failures.update({self.nodes.partition.get(n, n): why for n, why in failed_nodes.items()})
        if failures:
            raise ClientFailure(failures)
        forget: dict[int, tuple[Tensors, int]] = {}
        retain: dict[int, tuple[Tensors, int]] = {}
        seconds = []
        for reply in replies:
            pid = self.nodes.partition[reply.metadata.src_node_id]
            metrics, records = reply.content.metric_records[R.METRICS_KEY], reply.content.array_records
            seconds.append(float(metrics.get(R.SECONDS, 0.0)))
            if int(metrics[R.FORGET_NUM]) > 0:
                forget[pid] = (R.record_to_tensors(records[R.FORGET_FISHER_KEY]), int(metrics[R.FORGET_NUM]))
                outcome.holders[pid] = int(metrics[R.FORGET_NUM])
                if metrics.get(R.PREPARED):
                    outcome.forget_prepared.append(pid)
            if R.RETAIN_FISHER_KEY in records:
                retain[pid] = (R.record_to_tensors(records[R.RETAIN_FISHER_KEY]), int(metrics[R.RETAIN_NUM]))
        if not forget:
            raise RequestError(f"{request.describe()}: no client holds any of the data to forget")
        if prepared is not None:
            retain = {PREPARED: prepared}
        outcome.timing["client_fisher_max_s"] = max(seconds, default=0.0)
        log(INFO, "unlearn: forget-Fishers from %d clients on %s (%d samples)%s", len(forget), model.id,
            sum(n for _, n in forget.values()), f", retain-Fishers from {len(retain)}" if retain else "")
        return forget, retain

    def _forget_allowance(self, request: UnlearningRequest, roots: list[str]) -> dict[int, int]:
        """Partition -> the most forget samples the lineage says it trained on (its largest root's share)."""
        allowed: dict[int, int] = {}
        for r in roots:
            data = self.graph.node(r).data
            if data is not None and data.client is not None:
                allowed[data.client] = max(allowed.get(data.client, 0), forget_count(data, request))
        return allowed

    def _check_fisher_reply(self, reply: Message, weights: Tensors, allowed: dict[int, int]) -> None:
        """Refuse a ``query.fisher`` reply that is malformed, claims forget data the lineage does not give the
        client, or carries a Fisher with unknown names, wrong shapes, NaN/inf or negative entries."""
        pid = self.nodes.partition.get(reply.metadata.src_node_id, -1)
        content = reply.content
        if R.METRICS_KEY not in content.metric_records:
            raise RecordError(f"query.fisher reply of partition {pid} has no {R.METRICS_KEY!r} MetricRecord")
        metrics = content.metric_records[R.METRICS_KEY]
        counts = {k: metrics.get(k, 0) for k in (R.FORGET_NUM, R.RETAIN_NUM)}
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in counts.values()):
            raise RecordError(f"query.fisher reply of partition {pid}: sample counts must be ints >= 0, got {counts}")
        if counts[R.FORGET_NUM] > allowed.get(pid, 0):
            raise RequestError(f"partition {pid} claims {counts[R.FORGET_NUM]} samples to forget, but the lineage "
                               f"records at most {allowed.get(pid, 0)} for it; its Fisher is refused")
        keys = ([R.FORGET_FISHER_KEY] if counts[R.FORGET_NUM] else []) + [
            k for k in (R.RETAIN_FISHER_KEY,) if k in content.array_records]
        for key in keys:
            if key not in content.array_records:
                raise RecordError(f"query.fisher reply of partition {pid} has no {key!r} ArrayRecord")
            problems = check_fisher(R.record_to_tensors(content.array_records[key]), weights)
            if problems:
                raise FisherError(f"partition {pid} sent a bad {key}: " + "; ".join(str(p) for p in problems[:5]))

    def _fisher_message(self, node_id: str, arrays: ArrayRecord, pid: int, request: UnlearningRequest | None, *,
                        want_retain: bool, fisher_samples: int | None = None) -> Message:
        """``query.fisher`` for partition ``pid`` on model ``node_id``: the forget-Fisher of ``request``'s data (at
        most ``fisher_samples`` rows, default ``self.fisher_samples``) and, with ``want_retain``, the retain-Fisher;
        without a request, ``prepare`` (:meth:`prepare_fishers`)."""
        cfg = {R.NODE_ID: node_id, R.WEIGHTS_DIGEST: self.graph.node(node_id).weights or "",
               **self._fisher_config(), R.WANT_RETAIN: want_retain}
        if fisher_samples is not None:
            cfg[R.FISHER_SAMPLES] = int(fisher_samples)
        cfg.update(request_config(request, pid) if request is not None else {R.PREPARE: True})
        return Message(RecordDict({R.ARRAYS_KEY: arrays, R.CONFIG_KEY: ConfigRecord(cfg)}),
                       dst_node_id=self.nodes.node_of(pid), message_type=R.MSG_FISHER)

    def _fisher_config(self) -> dict[str, Any]:
        return {R.FISHER_LAYERS: self.fisher_layers, R.FISHER_ESTIMATOR: self.fisher_estimator,
                R.FISHER_SAMPLES: int(self.fisher_samples), R.RETAIN_SAMPLES: int(self.retain_fisher_samples),
                R.WANT_RETAIN: self.retain_fisher != "accumulated", R.STORE_DIR: str(self.store.root)}

    # -- the Fishers prepared after training ---------------------------------------------------------------

    def prepare_fishers(self, grid: Grid) -> dict[str, Any]:
        """Compute the Fishers of the newest global model now, so that requests on it need not.

        One ``query.fisher`` with ``prepare`` to every client: each stores, in its own directory, the forget-Fisher
        of every class it holds (the one a single-class request on these weights would compute, bit for bit; skipped
        above ``strategies.client.PREPARED_MAX_BYTES``) and returns the Fisher of (at most
        ``retain_fisher_samples`` of) its whole partition; the sample-weighted mean is stored under the ref
        ``prepared-retain/<weights digest>``. A request on that model then asks only the data holders, which answer
        a single-class request from what they stored, and takes the whole Fisher as the retain-Fisher. Call it
        after training (the App does; its seconds are ``timing.prepare_s``, apart from training and unlearning).
        Returns ``{"node", "samples", "clients", "classes", "seconds"}``.

        Raises
        ------
        UnlearnError
            No global model yet.
        ClientFailure
            A client failed or sent a malformed Fisher after the retries; nothing is stored.
        """
        start = time.perf_counter()
        if self.current is None:
            raise UnlearnError("prepare_fishers: no global model yet; train first")
        node = self.graph.node(self.current)
        self.nodes.refresh(grid)
        weights = self.store.get(node.weights)
        arrays = R.tensors_to_record(weights)
        msgs = [self._fisher_message(node.id, arrays, pid, None, want_retain=True)
                for pid in sorted(self.nodes.partition.values())]
        replies, failed = send_with_retries(grid, msgs, R.MSG_FISHER, timeout=self.nodes.timeout,
                                            retries=self.reply_retries,
                                            check=lambda r: self._check_fisher_reply(r, weights, {}))
        if failed:
            raise ClientFailure({self.nodes.partition.get(n, n): why for n, why in failed.items()})
        parts = {self.nodes.partition[r.metadata.src_node_id]:
                 (R.record_to_tensors(r.content.array_records[R.RETAIN_FISHER_KEY]),
                  int(r.content.metric_records[R.METRICS_KEY][R.RETAIN_NUM]))
                 for r in replies if R.RETAIN_FISHER_KEY in r.content.array_records}
        if not parts:
            raise UnlearnError("prepare_fishers: no client sent a whole-partition Fisher")
        samples = sum(n for _, n in parts.values())
        settings = self._prepared_settings()
        for pid, (part, n) in sorted(parts.items()):  # each client's too: a client request dampens with the others'
            part_digest = self.store.put(part, {"kind": "prepared-retain-part", "node": node.id, "partition": pid,
                                                "samples": n, "settings": settings})
            self.store.set_ref(_part_ref(pid, node.weights), part_digest)
        fisher = merge_fishers([f for f, _ in parts.values()], num_samples=[n for _, n in parts.values()],
                               mode="weighted_mean")
        digest = self.store.put(fisher, {"kind": "prepared-retain-fisher", "node": node.id, "samples": samples,
                                         "settings": settings})
        self.store.set_ref(f"{PREPARED_RETAIN_REF}/{node.weights}", digest)
        classes = sum(int(r.content.metric_records[R.METRICS_KEY].get(R.PREPARED, 0)) for r in replies)
        info = {"node": node.id, "samples": samples, "clients": len(parts), "classes": classes,
                "seconds": time.perf_counter() - start}
        log(INFO, "prepare: Fishers of %s on %d clients (whole partitions: %d samples, %s each; forget-Fishers of %d "
            "client classes), %.2f s", node.id, len(parts), samples,
            f"at most {self.retain_fisher_samples}" if self.retain_fisher_samples else "all", classes, info["seconds"])
        return info

    def _prepared_settings(self) -> dict[str, Any]:
        return {"fisher-layers": self.fisher_layers, "fisher-estimator": self.fisher_estimator,
                "retain-fisher-samples": int(self.retain_fisher_samples)}

    def _prepared_for(self, node: ModelNode) -> tuple[Tensors, int] | None:
        """The retain-Fisher prepared on ``node``'s weights with this strategy's Fisher settings and the samples it
        stands for, or ``None``."""
        digest = self.store.get_ref(f"{PREPARED_RETAIN_REF}/{node.weights}") if node.weights else None
        if digest is None:
            return None
        meta = self.store.meta(digest)
        if meta.get("settings") != self._prepared_settings():
            log(WARNING, "unlearn: the Fishers prepared for %s used other settings (%s); not used", node.id,
                meta.get("settings"))
            return None
        return self.store.get(digest), int(meta.get("samples", 0))

    def _kept_retain(self, request: UnlearningRequest, whole: Tensors, retains: dict[int, tuple[Tensors, int]],
                     outcome: UnlearnOutcome) -> Tensors:
        """The retain-Fisher the server-held models are dampened with: for a client request on a prepared
        whole-data Fisher, the kept clients' own prepared Fishers merged (what ``retain-fisher=fresh`` computes, at
        no cost; :meth:`prepare_fishers` stores each client's); otherwise ``whole`` as it is.

        SSD's whole-data Fisher suits a class, whose data every client holds some of. A client's own data in it gives
        the parameters only that client needs (a backdoor's trigger) retain importance of their own, so no alpha
        that keeps the model selects them. On MNIST with a backdoored client (half its rows patched and labelled 7)
        ``alpha="auto"`` on the whole Fisher left the attack success rate at 26.5 % (retrained: 0.2 %); on the kept
        clients' Fisher (``retain-fisher=fresh``), 0.3 % at 96.5 % kept accuracy (benchmarks/README.md).
        Subtracting the forgotten client's share from the whole Fisher instead (``retain_from_whole``) zeroed the
        parameters where the two estimates nearly cancel: 84 % kept before the repair."""
        if request.kind != "client" or PREPARED not in retains:
            return whole
        model = self._newest_affected_global(outcome.affected)
        # every client that prepared one, connected now or not (the prepared merge counted them all)
        prepared = {int(name.split("/")[1][1:]) for name in self.store.refs(f"{PREPARED_RETAIN_REF}/p")
                    if name.endswith(f"/{model.weights}")}
        kept = sorted(prepared - set(request.clients))
        parts = [self._prepared_part(model, pid) for pid in kept]
        if not kept or any(p is None for p in parts):
            log(WARNING, "unlearn: no prepared Fisher of each kept client for %s; the whole-data one is used", model.id)
            return whole
        outcome.retain_source = "prepared-kept"
        log(INFO, "unlearn: retain-Fisher: the prepared Fishers of the %d kept clients (%d samples)", len(kept),
            sum(n for _, n in parts))
        return merge_fishers([f for f, _ in parts], num_samples=[n for _, n in parts], mode="weighted_mean")

    def _prepared_part(self, node: ModelNode, pid: int) -> tuple[Tensors, int] | None:
        """Client ``pid``'s whole-partition Fisher prepared on ``node``'s weights (this strategy's settings), or
        ``None``."""
        digest = self.store.get_ref(_part_ref(pid, node.weights)) if node.weights else None
        if digest is None or self.store.meta(digest).get("settings") != self._prepared_settings():
            return None
        return self.store.get(digest), int(self.store.meta(digest)["samples"])

    def _merged_forget_fishers(
        self, affected: list[str], roots: list[str], holder_fishers: dict[int, tuple[Tensors, int]]
    ) -> dict[str, Tensors]:
        """Per affected model, the MFIM merge of the holders whose roots are the model or its ancestors.

        Models with the same set of holders share one merged Fisher (fiun.md §4: the merge is over the roots
        that are ancestors of the model, or the model itself).
        """
        root_clients = {r: self.graph.node(r).data.client for r in roots}
        cache: dict[tuple[int, ...], Tensors] = {}
        out: dict[str, Tensors] = {}
        for node_id in affected:
            lineage = set(self.graph.ancestors(node_id)) | {node_id}
            key = tuple(sorted({c for r, c in root_clients.items() if r in lineage and c in holder_fishers}))
            if not key:  # roots of holders that reported no forget sample now: use every holder
                key = tuple(sorted(holder_fishers))
            if key not in cache:
                fishers = [holder_fishers[c][0] for c in key]
                counts = [holder_fishers[c][1] for c in key]
                cache[key] = merge_fishers(fishers, num_samples=counts, mode=self.mfim_mode)
            out[node_id] = cache[key]
        return out

    def _forget_fraction(self, node: ModelNode, request: UnlearningRequest) -> float:
        """Share of a model's direct training data that the request forgets (0 for aggregates)."""
        data = node.data
        if node.kind == "global":
            parts = [self.graph.node(p) for p in node.parents if self.graph.node(p).data is not None]
            total = sum(p.data.num_samples for p in parts)
            forget = sum(forget_count(p.data, request) for p in parts)
            return forget / total if total else 0.0
        if data is None or data.num_samples == 0:
            return 0.0
        return forget_count(data, request) / data.num_samples

    def _dampen_server_models(
        self, request: UnlearningRequest, affected: list[str], forget_of: dict[str, Tensors],
        shared_retain: Tensors | None, outcome: UnlearnOutcome, presumed: PresumedDampening | None = None,
    ) -> dict[str, str]:
        """One ``unlearn_many`` over every affected model whose weights the server holds (per candidate).

        ``presumed`` holds models already dampened at the federation's choice while the holders checked them
        (:meth:`_presume`); those whose check kept the choice and whose forget-Fisher did not change are taken from it
        as they are (the same computation, bit for bit), the rest are dampened here.
        """
        ids = self._server_held(affected)
        nodes = [self.graph.node(a) for a in ids]
        cfg = outcome.fiun or self.fiun or FIUnConfig()
        if self.calibration is None:
            candidates = [outcome.model_candidates.get(i, (cfg.alpha, cfg.lam)) for i in ids]
            done = presumed.take(ids, candidates, forget_of) if presumed is not None else {}
            rest = [i for i in range(len(ids)) if i not in done]
            weights, retain, forgets = self._dampening_inputs(request, [nodes[i] for i in rest], forget_of,
                                                              shared_retain, outcome.scale_free)
            fresh = _unlearn_per_candidate(weights, retain, forgets, cfg, [candidates[i] for i in rest]) if rest \
                else ([], [])
            done.update({i: (w, st) for i, w, st in zip(rest, *fresh)})
            new_weights, stats = [done[i][0] for i in range(len(ids))], [done[i][1] for i in range(len(ids))]
        else:
            weights, retain, forgets = self._dampening_inputs(request, nodes, forget_of, shared_retain,
                                                              outcome.scale_free)
            new_weights, stats = self._calibrated(weights, retain, forgets, cfg, outcome)
        outcome.server_models = ids
        digests = self.store.put_many([(w, {"kind": node.kind, "unlearned-from": node.id, "request": request.id})
                                       for node, w in zip(nodes, new_weights)])
        for node, s in zip(nodes, stats):
            outcome.stats[node.id] = _as_dict(s)
        return {node.id: digest for node, digest in zip(nodes, digests)}

    def _dampening_inputs(self, request: UnlearningRequest, nodes: list[ModelNode], forget_of: dict[str, Tensors],
                          shared_retain: Tensors | None, scale_free: bool,
                          ) -> tuple[list[Tensors], list[Tensors], list[Tensors]]:
        """Per server-held model: its weights, retain-Fisher and forget-Fisher (mean-normalised with ``scale_free``)."""
        if shared_retain is not None:
            retain = [shared_retain] * len(nodes)
        else:
            missing = [n.id for n in nodes if n.retain_fisher is None]
            if missing:
                raise UnlearnError(f"no retain-Fisher stored for {missing[:5]}; use retain_fisher='fresh', or "
                                   "register the clients' train handlers from strategies.client (they send it)")
            retain = [retain_from_whole(self.store.get(n.retain_fisher), forget_of[n.id],
                                        self._forget_fraction(n, request)) for n in nodes]
        weights = [self.store.get(n.weights) for n in nodes]
        forgets = [forget_of[n.id] for n in nodes]
        if scale_free:
            shared: dict[int, Tensors] = {}  # a Fisher several models share is normalised (and validated) once
            retain, forgets = scale_free_each(retain, shared), scale_free_each(forgets, shared)
        return weights, retain, forgets

    def _presume(self, request: UnlearningRequest, affected: list[str], forget_of: dict[str, Tensors],
                 shared_retain: Tensors | None, base: FIUnConfig, presumed: PresumedDampening,
                 ) -> Callable[[float, float], None]:
        """What the server does while the holders check its models (``while_checking`` of
        :func:`~strategies.calibration.calibrate_at_clients`): dampen every server-held model in ``affected`` at the
        chosen ``(alpha, lambda)`` into ``presumed``. Most models keep the choice (on the App's MNIST classes all
        but one or two of 15), and :meth:`_dampen_server_models` then only stores them. A failure here is logged
        and changes nothing: the dampening step computes everything again and reports it."""
        def dampen_at(alpha: float, lam: float) -> None:
            try:
                nodes = [self.graph.node(a) for a in self._server_held(affected)]
                weights, retain, forgets = self._dampening_inputs(request, nodes, forget_of, shared_retain, True)
                candidate = (float(alpha), float(lam))
                new_weights, stats = _unlearn_per_candidate(weights, retain, forgets, base, [candidate] * len(nodes))
                presumed.put(candidate, {n.id: forget_of[n.id] for n in nodes}, new_weights, stats)
            except Exception as err:  # noqa: BLE001 - an optimisation; the dampening step reports real errors
                log(WARNING, "unlearn: dampening at the choice during the check failed (%s: %s); done after it",
                    type(err).__name__, err)
        return dampen_at

    def _calibrated(self, weights: list[Tensors], retain: list[Tensors], forgets: list[Tensors], cfg: FIUnConfig,
                    outcome: UnlearnOutcome) -> tuple[list[Tensors], list[Any]]:
        """``alpha="auto"``: per model, the mildest alpha meeting the forget target on the calibration split."""
        from fl_unlearn.calibrate import accuracy_scorer, calibrate_alpha

        cal = self.calibration
        n = len(weights)
        score = accuracy_scorer(cal.model, [cal.forget] * n, [cal.retain] * n)
        result = calibrate_alpha(weights, retain, forgets, score, base=cfg, forget_target=cal.target)
        outcome.alphas = list(result.alphas)
        outcome.timing["calibrate_s"] = result.seconds
        log(INFO, "unlearn: alpha=auto chose %s (target met on %d of %d models)",
            sorted(set(result.alphas)), sum(result.target_met), n)
        return result.weights, [{**_as_dict(st), "alpha": a, "target_met": ok}
                                for st, a, ok in zip(result.stats, result.alphas, result.target_met)]

    def _unlearn_client_models(
        self, grid: Grid, request: UnlearningRequest, affected: list[str], forget_of: dict[str, Tensors],
        outcome: UnlearnOutcome, retain: Tensors | None = None,
    ) -> tuple[dict[str, str], dict[int, str]]:
        """``train.unlearn`` to every client holding affected models, all in one round trip.

        A client that keeps no data after the request (:func:`strategies.forget.keeps_nothing`: a forgotten
        client's own derived models) has none for their retain-Fisher: it also gets ``retain``, the federation's
        merged retain-Fisher (F_D of the clients that keep data), to dampen them with.

        Returns ``(versions, failures)``: old id -> the client's weights digest, and partition -> why it failed
        (after ``reply_retries`` retries); a failed client's models are not unlearned.
        """
        by_client: dict[int, list[str]] = {}
        for a in affected:
            node = self.graph.node(a)
            if node.weights is None and node.meta.get("held-by", "").startswith("client:"):
                by_client.setdefault(node.client, []).append(a)
        if not by_client:
            return {}, {}
        msgs, failures = [], {}
        for pid, ids in sorted(by_client.items()):
            if not any(p == pid for p in self.nodes.partition.values()):
                failures[pid] = f"no connected node holds partition {pid}"
                continue
            forget = forget_of[ids[-1]]  # the newest of a client's models inherits from every relevant root
            cfg = ConfigRecord({R.MODEL_IDS: ids, R.NODE_ID: [version_id(i, request) for i in ids],
                                R.STORE_DIR: str(self.store.root), R.SCALE_FREE: outcome.scale_free,
                                **self._fisher_config(), **self._client_check_config(request, outcome),
                                **fiun_config(self._client_fiun(outcome)), **request_config(request, pid)})
            content = {R.FORGET_FISHER_KEY: R.tensors_to_record(forget), R.CONFIG_KEY: cfg}
            if retain is not None and keeps_nothing(request, pid, self.nodes.info.get(pid)):
                content[R.RETAIN_FISHER_KEY] = R.tensors_to_record(retain)
            msgs.append(Message(RecordDict(content), dst_node_id=self.nodes.node_of(pid),
                                message_type=R.MSG_UNLEARN))
        replies, failed_nodes = send_with_retries(
            grid, msgs, R.MSG_UNLEARN, timeout=self.nodes.timeout, retries=self.reply_retries,
            check=lambda r: self._check_unlearn_reply(r, by_client, request))
        failures.update({self.nodes.partition.get(n, n): why for n, why in failed_nodes.items()})
        versions: dict[str, str] = {}
        for reply in replies:
            for key, cfg in reply.content.config_records.items():
                if key.startswith(R.NODE_KEY_PREFIX):
                    old = str(cfg[R.PARENT_ID])
                    versions[old] = str(cfg[R.WEIGHTS_DIGEST])
                    outcome.client_results[old] = {k: cfg[k] for k in cfg}
        log(INFO, "unlearn: %d client-held models unlearned on %d clients%s", len(versions), len(by_client),
            f"; failed: {failures}" if failures else "")
        return versions, failures

    def evaluate_client_models(self, grid: Grid, outcome: UnlearnOutcome,
                               checks: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        """Held-out figures of the client-held models ``outcome`` unlearned, before and after (``query.evalheld``,
        one round trip; not part of ``unlearn_s``). Returns old id -> ``{"before": ..., "after": ...}``, each with
        ``forget_acc`` / ``retain_acc`` as the clients measure them (``None`` where a client could not answer), and
        what ``checks`` asks for (see :meth:`evaluate_held`)."""
        new_of = {old: outcome.versions[old] for old in outcome.client_results}
        figures = self.evaluate_held(grid, outcome.request, list(new_of) + list(new_of.values()), checks)
        return {old: {"before": figures[old], "after": figures[new]} for old, new in new_of.items()}

    def evaluate_held(self, grid: Grid, request: UnlearningRequest, node_ids: list[str],
                      checks: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        """``query.evalheld`` to the clients holding ``node_ids`` (client-held lineage nodes), all at once: node id ->
        ``{"forget_acc", "retain_acc"}`` on held-out data; ``None`` values where a client could not answer.

        ``checks`` (``strategies.verify.HeldChecks.to_config()``) adds ``mia_auc`` and ``backdoor_asr`` where the
        holder could measure them."""
        by_client: dict[int, list[str]] = {}
        for node_id in node_ids:
            by_client.setdefault(self.graph.node(node_id).client, []).append(node_id)
        msgs = [Message(RecordDict({R.CONFIG_KEY: ConfigRecord({R.MODEL_IDS: ids, R.STORE_DIR: str(self.store.root),
                                                                **request_config(request, pid), **(checks or {})})}),
                        dst_node_id=self.nodes.node_of(pid), message_type=R.MSG_EVAL_HELD)
                for pid, ids in sorted(by_client.items())]
        figures: dict[str, dict[str, Any]] = {}
        for reply in exchange(grid, msgs, timeout=self.nodes.timeout):
            if reply.has_error():
                continue
            for key, cfg in reply.content.config_records.items():
                if key.startswith(R.NODE_KEY_PREFIX):
                    checked = (("mia_auc", R.MIA_AUC), ("backdoor_asr", R.BACKDOOR_ASR))  # where asked and measured
                    figures[str(cfg[R.NODE_ID])] = {"forget_acc": cfg.get(R.FORGET_ACC),
                                                    "retain_acc": cfg.get(R.RETAIN_ACC),
                                                    **{k: cfg[r] for k, r in checked if r in cfg}}
        missing = [i for i in node_ids if i not in figures]
        if missing:  # the models are recorded; only the report lacks their figures
            log(WARNING, "%s: no figures for %s (reported as null)", R.MSG_EVAL_HELD, missing)
        return {i: figures.get(i, {"forget_acc": None, "retain_acc": None}) for i in node_ids}

    def _client_check_config(self, request: UnlearningRequest, outcome: UnlearnOutcome) -> dict[str, Any]:
        """alpha="auto" and a class: the grid and sample count with which holders check the models they hold."""
        settings = self.client_calibration
        if not outcome.scale_free or request.kind != "classes" or settings is None or settings.check_samples <= 0:
            return {}
        return {R.ALPHAS: [float(a) for a in settings.alphas], R.LAMS: [float(v) for v in settings.lams],
                R.CALIBRATION_CHECK: int(settings.check_samples), R.CHECK_BUDGET: settings.check_budget(1),
                R.OWN_FISHER_SAMPLES: self._own_fisher_samples()}

    def _check_unlearn_reply(self, reply: Message, by_client: dict[int, list[str]], request: UnlearningRequest) -> None:
        """Refuse a ``train.unlearn`` reply that names models other than those sent, or invalid digests."""
        pid = self.nodes.partition.get(reply.metadata.src_node_id, -1)
        sent = set(by_client.get(pid, []))
        got = {}
        for key, cfg in reply.content.config_records.items():
            if key.startswith(R.NODE_KEY_PREFIX):
                old, new, digest = cfg.get(R.PARENT_ID), cfg.get(R.NODE_ID), cfg.get(R.WEIGHTS_DIGEST)
                if old not in sent or new != version_id(str(old), request) or not R.is_digest(digest):
                    raise RecordError(f"train.unlearn reply of partition {pid}: model {old!r:.80} -> {new!r:.80} "
                                      f"({digest!r:.80}) was not asked for, or has no valid digest")
                got[old] = digest
        if set(got) != sent:
            raise RecordError(f"train.unlearn reply of partition {pid} covers {sorted(got)}, not {sorted(sent)}")

    def _calibration_inputs(self, request: UnlearningRequest, forget_of: dict[str, Tensors],
                            shared_retain: Tensors | None, outcome: UnlearnOutcome,
                            ) -> tuple[ModelNode, Tensors, list[int], list[int]]:
        """The model ``alpha="auto"`` is calibrated on (the newest affected global), its retain-Fisher, the
        clients asked, and the holders of data to forget."""
        node = self._newest_affected_global(outcome.affected)
        retain = shared_retain
        if retain is None:
            retain = retain_from_whole(self.store.get(node.retain_fisher), forget_of[node.id],
                                       self._forget_fraction(node, request))
        holders = sorted(p for p, n in outcome.holders.items() if n > 0)
        return node, retain, sorted(self.nodes.partition.values()), holders

    def begin_auto_alpha(self, grid: Grid, request: UnlearningRequest, forget_of: dict[str, Tensors],
                         shared_retain: Tensors | None, outcome: UnlearnOutcome) -> CalibrationRound | None:
        """Push ``alpha="auto"``'s ``query.calibrate`` now (``None`` without client calibration): called as soon
        as the forget-Fishers are merged, so the clients calibrate while the server journals and stores them;
        :meth:`_auto_alpha` finishes it."""
        if self.client_calibration is None or self.calibration is not None:
            return None
        node, retain, pids, holders = self._calibration_inputs(request, forget_of, shared_retain, outcome)
        return begin_calibration(grid, self.nodes, pids, {p: request_config(request, p) for p in pids},
                                 self.store.get(node.weights), retain, forget_of[node.id], request_kind=request.kind,
                                 base=self.fiun or FIUnConfig(), settings=self.client_calibration, holders=holders)

    def _auto_alpha(self, grid: Grid, request: UnlearningRequest, forget_of: dict[str, Tensors],
                    shared_retain: Tensors | None, outcome: UnlearnOutcome, *, begun: CalibrationRound | None = None,
                    presumed: PresumedDampening | None = None, todo: list[str] | None = None) -> None:
        """``alpha="auto"`` at the clients: one ``query.calibrate`` on the newest affected global model (``begun``
        by :meth:`begin_auto_alpha`, or sent now), then (class requests) one ``query.checkforget`` of every other
        affected server-held model at the holders, while the server dampens ``todo`` at the choice into
        ``presumed`` (:meth:`_presume`)."""
        if self.client_calibration is None or self.calibration is not None:
            return
        node, retain, pids, holders = self._calibration_inputs(request, forget_of, shared_retain, outcome)
        base = self.fiun or FIUnConfig()

        def check() -> list[tuple[str, Tensors, Tensors]]:
            # The other server-held affected models, checked per model once the choice is known (class requests;
            # they must share the retain-Fisher the check dampens with); loaded while the clients calibrate
            return [(a, self.store.get(self.graph.node(a).weights), forget_of[a])
                    for a in self._check_ids(node.id, outcome)] if shared_retain is not None else []

        while_checking = self._presume(request, todo, forget_of, shared_retain, base, presumed) \
            if presumed is not None and todo else None
        choice = calibrate_at_clients(
            grid, self.nodes, pids, {p: request_config(request, p) for p in pids}, self.store.get(node.weights),
            retain, forget_of[node.id], request_kind=request.kind, base=base, settings=self.client_calibration,
            check=check, holders=holders, owners=self._local_owners(self._check_ids(node.id, outcome)),
            begun=begun, while_checking=while_checking)
        unmet = [k for k, ok in choice.per_model_met.items() if not ok]
        if unmet:
            self._own_forget_fishers(grid, request, unmet, forget_of, retain, choice, base, outcome.roots)
        outcome.fiun = dataclasses.replace(base, alpha=choice.alpha, lam=choice.lam)
        outcome.model_candidates = dict(choice.per_model)
        outcome.scale_free = True
        outcome.calibration = choice.to_dict()
        outcome.alphas = [choice.alpha]
        outcome.timing["calibrate_s"] = choice.seconds

    def _check_ids(self, calibrated: str, outcome: UnlearnOutcome) -> list[str]:
        """The server-held affected models other than ``calibrated``: those the per-model check covers."""
        return [a for a in self._server_held(outcome.affected) if a != calibrated]

    def _server_held(self, node_ids: Iterable[str]) -> list[str]:
        """The models of ``node_ids`` whose weights the server holds (the others are held by clients)."""
        return [a for a in node_ids if self.graph.node(a).weights is not None]

    def _own_forget_fishers(self, grid: Grid, request: UnlearningRequest, node_ids: list[str],
                            forget_of: dict[str, Tensors], retain: Tensors, choice: Any, base: FIUnConfig,
                            roots: list[str]) -> None:
        """Models the per-model check could not forget with the newest global's forget-Fisher get their own.

        The holders compute the forget-Fisher on each such model (``query.fisher`` on at most
        :meth:`_own_fisher_samples` rows each, a round trip per model, every reply checked as in
        :meth:`_gather_fishers`), the server merges them per model (MFIM) and checks the models
        again with them (``query.checkforget``); ``forget_of`` then holds each model's own merge, so it is dampened
        with it. Only runs when the check failed somewhere.
        """
        from strategies.calibration import check_at_clients

        parts: dict[str, list[tuple[Tensors, int]]] = {}
        allowed = self._forget_allowance(request, roots)
        for node_id in node_ids:  # one round trip per model: a rare path
            weights = self.store.get(self.graph.node(node_id).weights)
            arrays = R.tensors_to_record(weights)
            msgs = [self._fisher_message(node_id, arrays, pid, request, want_retain=False,
                                         fisher_samples=self._own_fisher_samples()) for pid in choice.holders]
            replies, failed = send_with_retries(grid, msgs, R.MSG_FISHER, timeout=self.nodes.timeout,
                                                retries=self.reply_retries,
                                                check=lambda r, w=weights: self._check_fisher_reply(r, w, allowed))
            if failed:
                raise ClientFailure({self.nodes.partition.get(n, n): why for n, why in failed.items()})
            counts = [int(r.content.metric_records[R.METRICS_KEY][R.FORGET_NUM]) for r in replies]
            parts[node_id] = [(R.record_to_tensors(r.content.array_records[R.FORGET_FISHER_KEY]), n)
                              for r, n in zip(replies, counts) if n > 0]
        own = {k: merge_fishers([f for f, _ in v], num_samples=[n for _, n in v], mode=self.mfim_mode)
               for k, v in parts.items() if v}
        check = [(k, self.store.get(self.graph.node(k).weights), own[k]) for k in node_ids if k in own]
        pids = sorted(self.nodes.partition.values())
        check_at_clients(grid, self.nodes, choice.holders, {p: request_config(request, p) for p in pids}, retain,
                         check, choice, base, self.client_calibration, self._local_owners([k for k, _, _ in check]))
        forget_of.update(own)
        choice.own_fisher = sorted(own)
        log(INFO, "unlearn: own forget-Fishers for %s; forgotten now: %s", sorted(own),
            sorted(k for k in own if choice.per_model_met[k]))

    def _local_owners(self, node_ids: Sequence[str]) -> dict[str, int]:
        """Node id -> partition of the clients' local updates among ``node_ids`` (the per-model check sends each
        to one holder that did not train it: :func:`strategies.calibration.check_plan`)."""
        owners = {}
        for node_id in node_ids:
            node = self.graph.node(node_id)
            if node.kind == "local" and node.data is not None and node.data.client is not None:
                owners[node_id] = int(node.data.client)
        return owners

    def _own_fisher_samples(self) -> int:
        """Rows per holder for a model's own forget-Fisher: the calibration's forget samples
        (``calibration-forget-samples``), at most ``fisher-samples`` (0: no cap). That Fisher only has to show
        which weights of one model carry the class, on the rare path where the check already failed; with the
        expected estimator a pass on 512 rows at each of 4 holders made MNIST class 9's request 10 s slower."""
        cap = self.client_calibration.forget_samples if self.client_calibration is not None else self.fisher_samples
        return min(cap, self.fisher_samples) if self.fisher_samples else cap

    def _client_fiun(self, outcome: UnlearnOutcome) -> FIUnConfig:
        """FIUn settings for client-held models: with alpha=auto, the alpha of the newest affected global."""
        if outcome.fiun is not None:
            return outcome.fiun
        cfg = self.fiun or FIUnConfig()
        if not outcome.alphas:
            return cfg
        newest = self._newest_affected_global(outcome.affected).id
        alpha = outcome.stats.get(newest, {}).get("alpha", outcome.alphas[-1])
        return dataclasses.replace(cfg, alpha=float(alpha))


@dataclass
class PresumedDampening:
    """Server-held models dampened at the federation's choice while the holders checked them
    (:meth:`UnlearningStrategy._presume`), for :meth:`UnlearningStrategy._dampen_server_models` to take."""

    candidate: tuple[float, float] | None = None
    forgets: dict[str, Tensors] = field(default_factory=dict)  # model id -> the forget-Fisher it was dampened with
    results: dict[str, tuple[Tensors, Any]] = field(default_factory=dict)  # model id -> (weights, stats)

    def put(self, candidate: tuple[float, float], forgets: Mapping[str, Tensors], weights: Sequence[Tensors],
            stats: Sequence[Any]) -> None:
        """Record the models of ``forgets`` (in order) dampened at ``candidate``."""
        self.candidate, self.forgets = candidate, dict(forgets)
        self.results = {m: (w, st) for m, w, st in zip(forgets, weights, stats)}

    def take(self, ids: Sequence[str], candidates: Sequence[tuple[float, float]],
             forget_of: Mapping[str, Tensors]) -> dict[int, tuple[Tensors, Any]]:
        """Position in ``ids`` -> ``(weights, stats)`` of every model dampened here at its final candidate with
        its final forget-Fisher (the same object: a model given its own forget-Fisher is dampened again)."""
        return {i: self.results[m] for i, (m, c) in enumerate(zip(ids, candidates))
                if m in self.results and tuple(c) == self.candidate and self.forgets[m] is forget_of.get(m)}


def _unlearn_per_candidate(weights: list[Tensors], retain: list[Tensors], forgets: list[Tensors], cfg: FIUnConfig,
                           candidates: list[tuple[float, float]]) -> tuple[list[Tensors], list[Any]]:
    """``fl_unlearn.calibrate.unlearn_with_candidates``, each model's stats with its alpha and lambda."""
    from fl_unlearn.calibrate import unlearn_with_candidates

    candidates = [(float(a), float(v)) for a, v in candidates]
    new_weights, stats = unlearn_with_candidates(weights, retain, forgets, cfg, candidates)
    return new_weights, [{**_as_dict(st), "alpha": a, "lam": v} for st, (a, v) in zip(stats, candidates)]


def fiun_config(cfg: Any) -> dict[str, Any]:
    """FIUn settings as ConfigRecord values (clients rebuild the ``FIUnConfig``)."""
    if cfg is None:
        return {}
    import dataclasses

    return {f"fiun-{k}": v for k, v in dataclasses.asdict(cfg).items() if isinstance(v, (int, float, bool))}


def _as_dict(stats: Any) -> dict[str, Any]:
    import dataclasses

    if dataclasses.is_dataclass(stats):
        return dataclasses.asdict(stats)
    return dict(stats) if isinstance(stats, Mapping) else {"value": stats}

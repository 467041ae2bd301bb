"""Server side of the SISA federation on the Flower engine, and the hybrid planner's per-request path.

``DESIGN.md`` §4, ``reference/hybrid.md``. :class:`FlowerSisaFederation` is the Message-API twin of the
in-process :class:`fl_unlearn.sisa.SisaFederation`: the same layout, initial weights (``initial_weights``), seed
tuples ``(seed, shard, stage, round)``, exclusions, FedAvg in partition-id order (``fedavg``), stage checkpoints
(store + lineage), P1 ledgers (``ShardLedger``) and state document, but every local training call is a message:

- **Training**: shard-model ``s`` runs stages ``1..R``, ``rounds-per-stage`` rounds each; a round is one
  ``train`` message per client carrying ``sisa-shard`` / ``sisa-stage`` / ``sisa-key`` and the client's
  revoked ids (``exclude-samples``), answered by ``strategies.sisa_client``. The server averages the replies
  weighted by their kept counts, in partition order, and checkpoints every shard-model at every stage end.
- **Requests** (``samples``, or ``client``: every id the client still holds): ids are checked with the clients
  first (``query.sisacounts``); a bad request changes nothing. The planner (``fl_unlearn.hybrid.plan_shard``)
  decides per touched shard from the clients' exact kept counts and the round times measured in training.
- **Exact path**: per exact shard, roll back to the checkpoint of stage ``r0 - 1`` (``r0 = min(r*, d_s)``) and
  rerun stages ``r0..R`` with ``train.retrain`` messages (every id revoked in the shard left out), each stage
  from the rerun's previous one; the new checkpoints are swapped in after the last stage. Bitwise the
  federation trained from scratch without the revoked ids (CPU; tested against both).
- **Approximate path**: FIUn on the served shard-model with the clients' per-sample Fishers of the shard
  (``query.sisafisher``), alpha fixed (``fiun-alpha``) or calibrated (``auto``: the forget samples' mean
  rank among held-out samples of their classes, scored where they live with ``query.sisascores``, must reach
  0.5), then OHS repair rounds (``ohs``). Recorded with P1 (the stale checkpoints are marked in the lineage).

:func:`run_sisa_experiment` is the App's SISA branch (``strategies.experiment``): train, serve one request,
optionally the gold standard (the same federation from scratch without the ids), evaluate, write results.json.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from torch import Tensor, nn

from fl_unlearn.calibrate import calibrate_alpha
from fl_unlearn.data import make_loader
from fl_unlearn.erasure import erase_out_of_service
from fl_unlearn.errors import ConfigError, RequestError, StoreError, UnlearnError
from fl_unlearn.fiun import FIUnConfig, dampen
from fl_unlearn.hybrid import (APPROX_COST_FACTOR, DEFAULT_BUDGET, Plan, ShardPlan, combine_plans, fit_throughput,
                               mean_rank, mia_auc, ohs_round_cap, plan_shard)
from fl_unlearn.lineage import LineageGraph, TrainingData
from fl_unlearn.mfim import merge_fishers
from fl_unlearn.requests import UnlearningRequest
from fl_unlearn.sisa import (Ensemble, RoundRecord, ShardLedger, SisaConfig, SisaLayout, fedavg, in_service,
                             initial_weights)
from fl_unlearn.store import Store
from strategies import records as R
from strategies.erase import erasure_doc, erasure_summary
from strategies.nodes import NodeDirectory, checked_replies, exchange

Weights = dict[str, Tensor]
Revocation = Mapping[int, Iterable[int]]
_EXCLUDED = "excluded"


@dataclass(frozen=True)
class ApproxSettings:
    """The approximate path over Flower.

    Parameters
    ----------
    alpha : float | str (default: "auto")
        FIUn selection weighting, or ``"auto"``: calibrated per shard on mean-normalised Fishers.
    lam : float (default: 1.0)
        FIUn dampening constant.
    fisher_samples : int (default: 512)
        Cap per client on the kept rows behind the retain-Fisher.
    ohs : bool (default: False)
        OHS repair rounds after FIUn.
    ohs_fraction, ohs_tol, ohs_patience : float, float, int (default: 0.1, 1e-3, 2)
        Share of an epoch per repair round; stall threshold (relative validation-loss gain); stalls to stop.
    ohs_max_rounds : int | None (default: None)
        Cap on repair rounds; ``None``: ``fl_unlearn.hybrid.ohs_round_cap`` (half an epoch per last-stage round).
    ohs_stop : str (default: "restore")
        As ``fl_unlearn.hybrid.ApproxConfig.ohs_stop``: ``restore`` also stops once the validation loss is back
        at the served model's before FIUn.
    """

    alpha: float | str = "auto"
    lam: float = 1.0
    fisher_samples: int = 512
    ohs: bool = False
    ohs_fraction: float = 0.1
    ohs_tol: float = 1e-3
    ohs_patience: int = 2
    ohs_max_rounds: int | None = None
    ohs_stop: str = "restore"


class FlowerSisaFederation:
    """S shard-models trained in R stages through Flower messages; exact and approximate removals.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid.
    cfg : SisaConfig
        Shards, slices, rounds per stage, client SGD, seed (as the in-process federation's).
    store : Store
        Checkpoints and the state document ``<name>/state``.
    graph : LineageGraph
        Lineage to record into.
    new_model : Callable[[], nn.Module]
        Builds the architecture (the clients build the same one).
    num_nodes : int
        Clients expected (``num-clients``).
    name : str (default: "sisa")
        Prefix of lineage node ids and of the state document (the gold run uses another).
    exclude : Revocation | None (default: None)
        Ids left out from the start: the gold-standard federation without the revoked data.
    """

    def __init__(self, grid: Grid, cfg: SisaConfig, store: Store, graph: LineageGraph,
                 new_model: Callable[[], nn.Module], *, num_nodes: int, name: str = "sisa",
                 exclude: Revocation | None = None) -> None:
        self.grid, self.cfg, self.store, self.graph, self.new_model = grid, cfg, store, graph, new_model
        self.name, self.layout = name, SisaLayout(cfg.num_shards, cfg.num_slices, cfg.seed)
        self.directory = NodeDirectory(num_nodes)
        self.clients: list[int] = []
        self.ledgers = [ShardLedger() for _ in range(cfg.num_shards)]
        R_ = cfg.num_slices
        self.checkpoints: list[list[str | None]] = [[None] * (R_ + 1) for _ in range(cfg.num_shards)]
        self.nodes: list[list[str | None]] = [[None] * (R_ + 1) for _ in range(cfg.num_shards)]
        self.served: list[str | None] = [None] * cfg.num_shards
        self.served_nodes: list[str | None] = [None] * cfg.num_shards
        self.versions = [0] * cfg.num_shards
        self.round_log: list[RoundRecord] = []
        self._exclude = exclude

    # -- views ----------------------------------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        return self.cfg.num_shards

    @property
    def num_slices(self) -> int:
        return self.cfg.num_slices

    @property
    def trained(self) -> bool:
        return all(d is not None for row in self.checkpoints for d in row)

    def revoked_ids(self, shard: int, client: int) -> np.ndarray:
        """``F_s`` of one client."""
        return self.ledgers[shard].ids(client)

    def _all_revoked(self, client: int) -> np.ndarray:
        return np.unique(np.concatenate([led.ids(client) for led in self.ledgers]))

    def shard_weights(self, shard: int) -> Weights:
        """The weights shard ``shard`` serves now."""
        if self.served[shard] is None:
            raise StoreError(f"shard {shard} has no model yet; train the federation first.")
        return self.store.get(self.served[shard])

    def checkpoint_weights(self, shard: int, stage: int) -> Weights:
        digest = self.checkpoints[shard][stage]
        if digest is None:
            raise StoreError(f"shard {shard} has no checkpoint for stage {stage}; train the federation first.")
        return self.store.get(digest)

    def ensemble(self, weights: Sequence[Weights] | None = None) -> Ensemble:
        """Mean softmax of the served shard-models (or of ``weights``)."""
        weights = weights if weights is not None else [self.shard_weights(s) for s in range(self.num_shards)]
        members = []
        for w in weights:
            model = self.new_model()
            model.load_state_dict(w)
            members.append(model)
        return Ensemble(members).eval()

    # -- messages -------------------------------------------------------------------------------------

    def _layout_config(self) -> dict[str, int]:
        return {R.SISA_SHARDS: self.num_shards, R.SISA_SLICES: self.num_slices, R.SISA_LAYOUT_SEED: self.cfg.seed}

    def _ask(self, contents: Mapping[int, RecordDict], message_type: str) -> dict[int, Message]:
        """Send one message per partition; replies by partition id (errors raised together)."""
        msgs = [Message(content, dst_node_id=self.directory.node_of(pid), message_type=message_type)
                for pid, content in contents.items()]
        replies = checked_replies(exchange(self.grid, msgs), message_type)
        by_node = {self.directory.node_of(pid): pid for pid in contents}
        return {by_node[r.metadata.src_node_id]: r for r in replies}

    def connect(self) -> None:
        """Learn the partitions, check the layout against every client's shards, record ``exclude``.

        Raises
        ------
        ConfigError
            More slices than some client's shard has samples (nothing trained).
        RequestError
            ``exclude`` names ids a client does not hold.
        """
        self.directory.refresh(self.grid)
        self.clients = sorted(self.directory.partition.values())
        counts, missing, _ = self.query_counts({})
        sizes = counts.sum(axis=2)  # [K, S]
        small = [f"client {k} shard {s}: {int(sizes[i, s])}" for i, k in enumerate(self.clients)
                 for s in range(self.num_shards) if sizes[i, s] < self.num_slices]
        if small:
            raise ConfigError(f"sisa-slices={self.num_slices} is larger than some shards (samples per client shard: "
                              f"{', '.join(small[:8])}{' ...' if len(small) > 8 else ''}); use fewer slices or shards, "
                              "or more data per client.")
        if self._exclude:
            for s, by_client in self.locate(self.check_revocation(self._exclude)).items():
                for k, ids in by_client.items():
                    self.ledgers[s].add(k, ids.tolist(), _EXCLUDED)

    def query_counts(self, revoked: Mapping[int, np.ndarray], *, forget_all: Iterable[int] = ()
                     ) -> tuple[np.ndarray, dict[int, list[int]], dict[int, list[int]]]:
        """Kept counts ``[K, S, R]`` minus everything revoked and ``revoked``; ids not held; ids held (``forget_all``).

        Read-only on the clients.
        """
        forget_all = set(forget_all)
        contents = {}
        for pid in self.clients:
            cfg = {**self._layout_config(), R.FORGET_SAMPLES: [int(i) for i in revoked.get(pid, [])],
                   R.EXCLUDE_SAMPLES: self._all_revoked(pid).tolist(), R.FORGET_ALL: pid in forget_all}
            contents[pid] = RecordDict({R.CONFIG_KEY: ConfigRecord(cfg)})
        counts = np.zeros((len(self.clients), self.num_shards, self.num_slices), dtype=np.int64)
        missing, kept = {}, {}
        replies = self._ask(contents, R.MSG_SISA_COUNTS)
        for i, pid in enumerate(self.clients):
            info = replies[pid].content.config_records[R.INFO_KEY]
            counts[i] = np.asarray(R.int_list(info[R.SISA_COUNTS]), dtype=np.int64).reshape(self.num_shards,
                                                                                          self.num_slices)
            if R.int_list(info.get(R.MISSING_SAMPLES)):
                missing[pid] = R.int_list(info[R.MISSING_SAMPLES])
            if R.KEPT_SAMPLES in info:
                kept[pid] = R.int_list(info[R.KEPT_SAMPLES])
        return counts, missing, kept

    def round(self, shard: int, stage: int, weights: Weights, key: tuple, *, message_type: str = "train",
              extra: Mapping[int, np.ndarray] | None = None, fraction: float = 1.0
              ) -> tuple[Weights, int, list[tuple[int, dict]]]:
        """One FedAvg round of shard-model ``shard`` over every client (``F_s`` and ``extra`` left out).

        Returns the averaged weights (the input when no client has rows), the sample-gradient evaluations
        and each training client's lineage record, in partition order.
        """
        record = R.tensors_to_record(weights)
        cfg = self.cfg
        contents = {}
        for pid in self.clients:
            exclude = self.revoked_ids(shard, pid)
            if extra and pid in extra:
                exclude = np.union1d(exclude, extra[pid])
            config = {**self._layout_config(), R.SISA_SHARD: shard, R.SISA_STAGE: stage,
                      R.SISA_KEY: [str(k) for k in key], R.SISA_FRACTION: float(fraction),
                      R.EXCLUDE_SAMPLES: [int(i) for i in exclude], "local-epochs": cfg.local_epochs,
                      "batch-size": cfg.batch_size, "lr": float(cfg.lr), "momentum": float(cfg.momentum),
                      "weight-decay": float(cfg.weight_decay)}
            contents[pid] = RecordDict({R.ARRAYS_KEY: record, R.CONFIG_KEY: ConfigRecord(config)})
        replies = self._ask(contents, message_type)
        trained, lineages = [], []
        for pid in self.clients:  # aggregate in partition order: float sums depend on it (P4)
            content = replies[pid].content
            metrics = content.metric_records[R.METRICS_KEY]
            if metrics.get(R.SISA_SHARD) != shard:  # plain `train` answered: the client lacks sisa_mod
                raise UnlearnError(f"partition {pid} answered a SISA round without training shard {shard}; build "
                                   "its ClientApp with strategies.sisa_client.sisa_mod and register_sisa_handlers")
            n = int(metrics[R.NUM_EXAMPLES])
            if n > 0:
                trained.append((n, R.record_to_tensors(content.array_records[R.ARRAYS_KEY])))
                lineages.append((pid, dict(content.config_records[R.LINEAGE_KEY])))
        evaluations = cfg.local_epochs * sum(n for n, _ in trained)
        return (fedavg(trained) if trained else weights), evaluations, lineages

    # -- training -------------------------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        """Train every stage of every shard from ``initial_weights``; checkpoint and record each stage."""
        if not self.clients:
            self.connect()
        start, first = time.perf_counter(), len(self.round_log)
        for s in range(self.num_shards):
            weights = initial_weights(self.new_model, self.cfg.seed, s)
            self._commit(s, {0: self._checkpoint(s, 0, weights, version=0, parent=None, request_id=None)})
            self._commit(s, self._run_stages(s, 1, weights, version=0, parent=self.nodes[s][0], request_id=None,
                                             message_type="train"))
        self.save_state()
        records = self.round_log[first:]
        return {"seconds": time.perf_counter() - start, "evaluations": float(sum(r.evaluations for r in records)),
                "rounds": float(len(records))}

    def _run_stages(self, shard: int, first: int, weights: Weights, *, version: int, parent: str | None,
                    request_id: str | None, message_type: str) -> dict[int, tuple[str, str]]:
        out = {}
        rounds = self.cfg.rounds()
        for r in range(first, self.num_slices + 1):
            for t in range(rounds[r - 1]):
                t0 = time.perf_counter()
                weights, g, lineages = self.round(shard, r, weights, (self.cfg.seed, shard, r, t),
                                                  message_type=message_type)
                if t == rounds[r - 1] - 1:
                    out[r] = self._checkpoint(shard, r, weights, version=version, parent=parent,
                                              request_id=request_id, lineages=lineages)
                    parent = out[r][1]
                self.round_log.append(RoundRecord(shard, r, t, g, time.perf_counter() - t0))
            log(INFO, "sisa: %s shard %d stage %d/%d done (version %d)", self.name, shard, r, self.num_slices, version)
        return out

    def _checkpoint(self, shard: int, stage: int, weights: Weights, *, version: int, parent: str | None,
                    request_id: str | None, lineages: Sequence[tuple[int, dict]] = ()) -> tuple[str, str]:
        meta = {"what": "sisa-checkpoint", "shard": shard, "stage": stage, "version": version}
        digest = self.store.put(weights, meta)
        node_id = f"{self.name}/s{shard}/v{version}/stage{stage}"
        if stage == 0:
            self.graph.add_node(node_id, "global", round=0, shard=shard, weights=digest, meta=meta)
            return digest, node_id
        slices = tuple(range(1, stage + 1))
        locals_, total = [], {}
        for pid, lineage in lineages:
            hist = R.histogram_from_config(lineage)
            for c, n in hist.items():
                total[c] = total.get(c, 0) + n
            local_id = f"{node_id}/client{pid}"
            self.graph.add_node(local_id, "local", parents=[parent] if parent else [], round=stage, shard=shard,
                                owner=f"client:{pid}", request_id=request_id,
                                data=TrainingData(pid, hist, slices, str(lineage[R.SAMPLE_DIGEST])))
            locals_.append(local_id)
        self.graph.add_node(node_id, "global", parents=locals_ or [parent], round=stage, shard=shard,
                            data=TrainingData(None, total, slices), weights=digest, request_id=request_id, meta=meta)
        return digest, node_id

    def _commit(self, shard: int, new: Mapping[int, tuple[str, str]]) -> None:
        for r, (digest, node) in new.items():
            self.checkpoints[shard][r], self.nodes[shard][r] = digest, node
        if self.num_slices in new:
            self.served[shard], self.served_nodes[shard] = new[self.num_slices]

    # -- requests -------------------------------------------------------------------------------------

    def as_revocation(self, request: Revocation | UnlearningRequest) -> dict[int, np.ndarray]:
        """A ``samples`` / ``client`` request (or ``{client: ids}``) as checked ``{client: unique ids}``."""
        if isinstance(request, UnlearningRequest):
            if request.kind == "samples":
                request = dict(request.samples)
            elif request.kind == "client":
                unknown = [c for c in request.clients if c not in self.clients]
                if unknown:
                    raise RequestError(f"Unknown clients {unknown}; known clients: {self.clients}")
                _, _, kept = self.query_counts({}, forget_all=request.clients)
                request = {c: kept.get(c, []) for c in request.clients}
            else:
                raise RequestError(f"SISA handles sample- and client-level requests; {request.describe()} is a class "
                                   "request: use the FIUn path (sisa-shards=1, sisa-slices=1, request-kind=classes).")
        return self.check_revocation(request)

    def check_revocation(self, revoked: Revocation) -> dict[int, np.ndarray]:
        """Every client and id checked with the clients; ``RequestError`` listing every problem, nothing changed."""
        if not isinstance(revoked, Mapping):
            raise RequestError(f"revocations must be a mapping {{client: [ids]}}; got {type(revoked).__name__}")
        out, problems = {}, []
        for client, ids in revoked.items():
            if client not in self.clients:
                problems.append(f"Unknown client {client!r}; known clients: {self.clients}")
                continue
            arr = np.unique(np.asarray(list(ids), dtype=np.int64))
            if not arr.size:
                problems.append(f"Empty forget set for client {client}")
                continue
            done = [(int(i), led.revoked[client][int(i)]) for led in self.ledgers
                    for i in arr.tolist() if int(i) in led.revoked.get(client, {})]
            if done:
                problems.append(f"Samples of client {client} already revoked (id, path): {done[:10]}")
            out[int(client)] = arr
        if out and not problems:
            _, missing, _ = self.query_counts(out)
            problems += [f"Client {k} does not hold samples {ids[:10]}{' ...' if len(ids) > 10 else ''} "
                         f"({len(ids)} of {len(out[k])} requested)" for k, ids in sorted(missing.items())]
        if not out and not problems:
            problems.append("Empty forget set: no sample ids given")
        if problems:
            raise RequestError("; ".join(problems))
        return out

    def locate(self, revoked: Mapping[int, np.ndarray]) -> dict[int, dict[int, np.ndarray]]:
        """``{shard: {client: ids}}`` (:meth:`fl_unlearn.sisa.SisaLayout.locate`)."""
        return self.layout.locate(revoked)

    def first_slice(self, by_client: Mapping[int, np.ndarray]) -> int:
        return self.layout.first_slice(by_client)

    def start_stage(self, shard: int, r_star: int) -> int:
        return self.ledgers[shard].rerun_start(r_star)

    def plan(self, request: Revocation | UnlearningRequest, *, budget_fraction: float = DEFAULT_BUDGET,
             policy: str = "auto", approx: ApproxSettings | None = None) -> Plan:
        """Per touched shard, exact or approximate (``fl_unlearn.hybrid.plan_shard``); nothing changes.

        The approximate path's estimate (for the record only) follows ``approx`` (default settings if ``None``).
        """
        if not self.trained:
            raise StoreError("plan needs a trained federation; train it first.")
        revoked = self.as_revocation(request)
        counts, _, _ = self.query_counts(revoked)
        throughput = fit_throughput(self.round_log)
        approx = approx or ApproxSettings()
        shards = [plan_shard(s, counts[:, s, :], self.first_slice(by_client), self.ledgers[s].dirty_from,
                             self.cfg.rounds(), self.cfg.local_epochs, throughput, budget_fraction=budget_fraction,
                             policy=policy, approx_evaluations=self._approx_evaluations(counts[:, s, :], approx),
                             revoked=by_client)
                  for s, by_client in self.locate(revoked).items()]
        request_id = request.id if isinstance(request, UnlearningRequest) else None
        return combine_plans(shards, policy, budget_fraction, request_id=request_id, token=self._token())

    def _approx_evaluations(self, counts: np.ndarray, approx: ApproxSettings) -> int:
        """Estimated sample-gradient equivalents of the approximate path on one shard (``counts``: ``[K, R]`` kept).

        FIUn: ``APPROX_COST_FACTOR`` per retain-Fisher sample (capped per client); OHS: its capped repair rounds.
        """
        kept = counts.sum(axis=1)
        fiun = APPROX_COST_FACTOR * int(np.minimum(kept, approx.fisher_samples or kept.max(initial=0)).sum())
        if not approx.ohs:
            return fiun
        cap = ohs_round_cap(self.cfg.rounds()[-1], approx.ohs_fraction, approx.ohs_max_rounds)
        return fiun + int(cap * self.cfg.local_epochs * np.ceil(approx.ohs_fraction * kept).sum())

    def _token(self) -> tuple:
        revoked = sum(len(ids) for led in self.ledgers for ids in led.revoked.values())
        return (tuple(self.versions), tuple(led.dirty_from for led in self.ledgers), revoked, tuple(self.served))

    # -- the exact path -------------------------------------------------------------------------------

    def rerun_shard(self, shard: int, by_client: Mapping[int, np.ndarray], request_id: str | None) -> dict[str, Any]:
        """Roll shard ``shard`` back to stage ``r0 - 1`` and rerun ``r0..R`` without ``F_s`` and ``by_client``."""
        t0, first_round = time.perf_counter(), len(self.round_log)
        r_star = self.first_slice(by_client)
        r0 = self.start_stage(shard, r_star)
        weights = self.checkpoint_weights(shard, r0 - 1)
        for k, ids in by_client.items():
            self.ledgers[shard].add(k, ids.tolist(), "exact")
        version = self.versions[shard] + 1
        try:
            new = self._run_stages(shard, r0, weights, version=version, parent=self.nodes[shard][r0 - 1],
                                   request_id=request_id, message_type=R.MSG_RETRAIN)
        except BaseException:
            for k, ids in by_client.items():  # the old checkpoints stay in service
                for i in ids.tolist():
                    self.ledgers[shard].revoked[k].pop(i, None)
            raise
        self._commit(shard, new)
        self.versions[shard], self.ledgers[shard].dirty_from = version, None
        records = self.round_log[first_round:]
        return {"shard": shard, "path": "exact", "r_star": r_star, "start_stage": r0,
                "slices_retrained": list(range(r0, self.num_slices + 1)), "rounds": len(records),
                "evaluations": int(sum(r.evaluations for r in records)), "seconds": time.perf_counter() - t0}

    # -- the approximate path -------------------------------------------------------------------------

    def approximate(self, shard_plans: Sequence[ShardPlan], settings: ApproxSettings, validation: tuple[Tensor, Tensor],
                    request_id: str | None) -> list[dict[str, Any]]:
        """FIUn (alpha fixed or calibrated) on the served models of these shards, OHS if asked; P1 recorded."""
        t0 = time.perf_counter()
        shards = [sp.shard for sp in shard_plans]
        revoked = [{int(k): np.asarray(v, dtype=np.int64) for k, v in sp.revoked.items()} for sp in shard_plans]
        models = [self.shard_weights(s) for s in shards]
        fishers = [self._fishers(s, w, r, settings) for s, w, r in zip(shards, models, revoked)]
        retain_f, forget_f = [f[0] for f in fishers], [f[1] for f in fishers]
        if settings.alpha == "auto":
            scorer = _RemoteRankScorer(self, revoked, validation)
            result = calibrate_alpha(models, retain_f, forget_f, scorer, base=FIUnConfig(lam=settings.lam),
                                     forget_target=0.0)
            new, alphas = result.weights, result.alphas
            extra = [{"forget_score": result.forget_acc[i] + 0.5, "forget_target": 0.5,
                      "target_met": result.target_met[i], "selected": result.stats[i].selected}
                     for i in range(len(shards))]
        else:
            cfg = FIUnConfig(alpha=float(settings.alpha), lam=settings.lam)
            done = [dampen(w, rf, ff, cfg) for w, rf, ff in zip(models, retain_f, forget_f)]
            new, alphas = [w for w, _ in done], [float(settings.alpha)] * len(shards)
            extra = [{"selected": st.selected} for _, st in done]
        fiun_s = (time.perf_counter() - t0) / max(len(shards), 1)
        out = []
        for i, (s, by_client) in enumerate(zip(shards, revoked)):
            t1 = time.perf_counter()
            weights, ohs = new[i], {"rounds": 0, "evaluations": 0, "val_loss": []}
            if settings.ohs:
                restore_to = _loss(self.new_model(), models[i], validation)  # the served model, before FIUn
                weights, ohs = self._ohs(s, weights, by_client, settings, validation, request_id, restore_to)
            self.record_approximate(s, by_client, weights, request_id=request_id,
                                    meta={"alpha": alphas[i], "ohs_rounds": ohs["rounds"]})
            out.append({"shard": s, "path": "approximate", "alpha": alphas[i], **extra[i],
                        "ohs_rounds": ohs["rounds"], "ohs_evaluations": ohs["evaluations"],
                        "ohs_val_loss": ohs["val_loss"], "fiun_seconds": fiun_s,
                        "seconds": fiun_s + time.perf_counter() - t1, "slices_retrained": []})
        return out

    def _fishers(self, shard: int, weights: Weights, by_client: Mapping[int, np.ndarray],
                 settings: ApproxSettings) -> tuple[dict, dict]:
        """Merged ``(retain, forget)`` per-sample Fishers of the shard at ``weights`` (weighted by samples)."""
        record = R.tensors_to_record(weights)
        contents = {}
        for pid in self.clients:
            cfg = {**self._layout_config(), R.SISA_SHARD: shard, R.FISHER_LAYERS: "all",
                   R.FISHER_SAMPLES: settings.fisher_samples, R.EXCLUDE_SAMPLES: self.revoked_ids(shard, pid).tolist(),
                   R.FORGET_SAMPLES: [int(i) for i in by_client.get(pid, [])]}
            contents[pid] = RecordDict({R.ARRAYS_KEY: record, R.CONFIG_KEY: ConfigRecord(cfg)})
        replies = self._ask(contents, R.MSG_SISA_FISHER)
        merged = []
        for key, count in ((R.RETAIN_FISHER_KEY, R.RETAIN_NUM), (R.FORGET_FISHER_KEY, R.FORGET_NUM)):
            parts = [(R.record_to_tensors(replies[p].content.array_records[key]),
                      int(replies[p].content.metric_records[R.METRICS_KEY][count]))
                     for p in self.clients if key in replies[p].content.array_records]
            if not parts:
                raise RequestError(f"no client returned a {key} for shard {shard}; is the shard empty?")
            merged.append(merge_fishers([f for f, _ in parts], num_samples=[n for _, n in parts], mode="weighted_mean"))
        return merged[0], merged[1]

    def scores(self, weights: Sequence[Weights], revoked: Mapping[int, np.ndarray]) -> dict[str, np.ndarray]:
        """Ensemble of ``weights`` on the revoked ids, computed by the clients that hold them (``query.sisascores``)."""
        models = {f"{R.MODEL_KEY_PREFIX}{i}": R.tensors_to_record(w) for i, w in enumerate(weights)}
        contents = {}
        for pid, ids in sorted(revoked.items()):
            config = {**self._layout_config(), R.FORGET_SAMPLES: [int(i) for i in ids]}
            contents[pid] = RecordDict({**models, R.CONFIG_KEY: ConfigRecord(config)})
        replies = self._ask(contents, R.MSG_SISA_SCORES)
        cols = {k: [] for k in (R.LOSSES, R.CORRECT, R.TRUE_PROBS, R.LABELS)}
        for pid in sorted(revoked):
            rec = replies[pid].content.config_records[R.METRICS_KEY]
            for k in cols:
                cols[k].extend(rec[k])
        return {k: np.asarray(v) for k, v in cols.items()}

    def _ohs(self, shard: int, weights: Weights, extra: Mapping[int, np.ndarray], settings: ApproxSettings,
             validation: tuple[Tensor, Tensor], request_id: str | None,
             restore_to: float) -> tuple[Weights, dict[str, Any]]:
        """Repair rounds (``train.retrain`` on every kept slice, part epochs) until the validation loss stalls
        (or, with ``ohs_stop="restore"``, is back at ``restore_to``)."""
        cap = ohs_round_cap(self.cfg.rounds()[-1], settings.ohs_fraction, settings.ohs_max_rounds)
        losses, stall, evaluations, rounds = [_loss(self.new_model(), weights, validation)], 0, 0, 0
        best = losses[0]
        for t in range(cap):
            if settings.ohs_stop == "restore" and losses[-1] <= restore_to:
                break
            key = (self.cfg.seed, shard, "ohs", request_id or len(self.graph), t)
            weights, g, _ = self.round(shard, self.num_slices, weights, key, message_type=R.MSG_RETRAIN, extra=extra,
                                       fraction=settings.ohs_fraction)
            evaluations, rounds = evaluations + g, rounds + 1
            losses.append(_loss(self.new_model(), weights, validation))
            stall = stall + 1 if (best - losses[-1]) < settings.ohs_tol * abs(best) else 0
            best = min(best, losses[-1])
            if stall >= settings.ohs_patience:
                break
        return weights, {"rounds": rounds, "evaluations": evaluations, "val_loss": losses}

    def record_approximate(self, shard: int, by_client: Mapping[int, np.ndarray], weights: Weights, *,
                           request_id: str | None, meta: Mapping[str, Any] | None = None) -> str:
        """Serve ``weights`` for ``shard``; the ids join ``F_s`` and stages ``>= d_s`` are marked stale (P1)."""
        r_star = self.first_slice(by_client)
        led = self.ledgers[shard]
        for k, ids in by_client.items():
            led.add(k, ids.tolist(), "approximate")
        led.dirty_from = r_star if led.dirty_from is None else min(led.dirty_from, r_star)
        digest = self.store.put(weights, {"what": "sisa-approximate", "shard": shard, "request": request_id})
        node_id = f"{self.name}/s{shard}/approx/{request_id or len(self.graph)}"
        self.graph.add_node(node_id, "global", parents=[self.served_nodes[shard]], round=self.num_slices, shard=shard,
                            weights=digest, request_id=request_id,
                            meta={"path": "approximate", "stale_from_stage": led.dirty_from, **(meta or {})})
        for r in range(led.dirty_from, self.num_slices + 1):
            node = self.graph.node(self.nodes[shard][r])
            stale = list(node.meta.get("stale_requests", [])) + [request_id]
            self.graph.update_node(node.id, meta={**dict(node.meta), "stale": True, "stale_requests": stale})
        self.served[shard], self.served_nodes[shard] = digest, node_id
        return node_id

    # -- one request ----------------------------------------------------------------------------------

    def execute(self, plan: Plan, settings: ApproxSettings, validation: tuple[Tensor, Tensor]) -> dict[str, Any]:
        """Carry out a plan made on this state: exact shards rerun, approximate shards FIUn (+ OHS)."""
        if plan.token != self._token():
            raise ConfigError("the plan is stale: the federation changed after it was made; plan the request again.")
        start = time.perf_counter()
        shards = []
        for sp in plan.shards:
            if sp.path == "exact":
                ids = {int(k): np.asarray(v, dtype=np.int64) for k, v in sp.revoked.items()}
                shards.append(self.rerun_shard(sp.shard, ids, plan.request_id))
        approx = [sp for sp in plan.shards if sp.path == "approximate"]
        if approx:
            shards += self.approximate(approx, settings, validation, plan.request_id)
        self.save_state()
        by_shard = {sp.shard: sp for sp in plan.shards}
        for rec in shards:
            sp = by_shard[rec["shard"]]
            rec.update({"r_star": sp.r_star, "start_stage": sp.start_stage, "estimated_seconds": sp.seconds,
                        "estimated_evaluations": sp.evaluations, "exact_estimated_seconds": sp.exact_seconds,
                        "exact_estimated_evaluations": sp.exact_evaluations, "reason": sp.reason})
        shards.sort(key=lambda r: r["shard"])
        return {"path": plan.path, "seconds": time.perf_counter() - start,
                "evaluations": int(sum(r.get("evaluations", 0) + r.get("ohs_evaluations", 0) for r in shards)),
                "shards": shards}

    # -- persistence ----------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"layout": self.layout.to_dict(), "clients": self.clients, "checkpoints": self.checkpoints,
                "nodes": self.nodes, "served": self.served, "served_nodes": self.served_nodes,
                "versions": self.versions, "ledgers": [led.to_dict() for led in self.ledgers],
                "round_log": [vars(r) for r in self.round_log]}

    def save_state(self) -> None:
        self.store.put_json(f"{self.name}/state", self.state())

    def erase_out_of_service(self, request_id: str) -> dict[str, Any]:
        """Erase every checkpoint and served model this federation no longer reads (they hold revoked samples:
        :func:`fl_unlearn.sisa.in_service`); the report is also stored as ``erasures/<request id>``."""
        start = time.perf_counter()
        with self.store.lock():
            erasure = erase_out_of_service(self.graph, self.store,
                                           in_service(self.checkpoints, self.served, self.ledgers),
                                           prefix=f"{self.name}/", request_id=request_id)
        report = {**erasure.to_dict(), "clients": {}, "failures": {}, "seconds": time.perf_counter() - start}
        self.store.put_json(erasure_doc(request_id), report)
        return report

    def restore(self) -> None:
        """Reload checkpoints, ledgers and round log saved by a training run on this store."""
        state = self.store.get_json(f"{self.name}/state")
        if state is None:
            raise StoreError(f"no SISA state in {self.store!r}; train with sisa-shards/sisa-slices on this store first")
        if SisaLayout.from_dict(state["layout"]) != self.layout:
            raise StoreError(f"saved layout {state['layout']} differs from this run's {self.layout.to_dict()}")
        self.checkpoints, self.nodes, self.versions = state["checkpoints"], state["nodes"], state["versions"]
        self.served, self.served_nodes = state["served"], state["served_nodes"]
        self.ledgers = [ShardLedger.from_dict(obj) for obj in state["ledgers"]]
        self.round_log = [RoundRecord(**r) for r in state["round_log"]]


class _RemoteRankScorer:
    """``calibrate_alpha``'s scorer when the forget samples live on the clients.

    ``score(i, w) = (mean rank of shard i's revoked samples among held-out samples of their classes - 0.5,
    held-out validation accuracy)``, the rank from the true-label probabilities the holders report.
    """

    def __init__(self, fed: FlowerSisaFederation, revoked: Sequence[Mapping[int, np.ndarray]],
                 validation: tuple[Tensor, Tensor]) -> None:
        self.fed, self.revoked, self.validation = fed, revoked, validation
        self.model = fed.new_model().eval()

    @torch.no_grad()
    def __call__(self, i: int, weights: Mapping[str, Tensor]) -> tuple[float, float]:
        got = self.fed.scores([dict(weights)], self.revoked[i])
        x, y = self.validation
        logits = torch.func.functional_call(self.model, dict(weights), (x,))
        p_val = torch.softmax(logits, 1).gather(1, y[:, None])[:, 0]
        rank = mean_rank(torch.as_tensor(got[R.TRUE_PROBS]), torch.as_tensor(got[R.LABELS]), p_val, y)
        return rank - 0.5, float((logits.argmax(1) == y).float().mean())


@torch.no_grad()
def _loss(model: nn.Module, weights: Mapping[str, Tensor], data: tuple[Tensor, Tensor]) -> float:
    logits = torch.func.functional_call(model.eval(), dict(weights), (data[0],))
    return float(nn.functional.cross_entropy(logits, data[1]))


# --------------------------------------------------------------------------------------------------------
# The App's SISA branch
# --------------------------------------------------------------------------------------------------------


def sisa_config(cfg: Any) -> SisaConfig:
    """The shard-federation settings of an ``AppConfig``."""
    return SisaConfig(num_shards=cfg.sisa_shards, num_slices=cfg.sisa_slices, rounds_per_stage=cfg.rounds_per_stage,
                      local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                      seed=cfg.seed)


def approx_settings(cfg: Any) -> ApproxSettings:
    """The approximate path's settings of an ``AppConfig``."""
    return ApproxSettings(alpha=cfg.fiun_alpha, lam=cfg.fiun_lambda, fisher_samples=cfg.fisher_samples or 512,
                          ohs=cfg.ohs)


def split_validation(test: Dataset, rows: int, seed: int) -> tuple[Dataset, tuple[Tensor, Tensor]]:
    """``(held-out evaluation rows, validation tensors)``: validation sets the forget target and OHS's stop,
    and is never used to report."""
    n = min(max(rows, 1), len(test) // 2)
    order = np.random.default_rng(seed).permutation(len(test))
    held_out, validation = test.select(np.sort(order[n:])), test.select(np.sort(order[:n]))
    return held_out, next(iter(make_loader(validation, len(validation))))


def revoked_of(plan: Plan) -> dict[int, np.ndarray]:
    """Every revoked id of a plan, by client (sorted)."""
    out: dict[int, list[int]] = {}
    for sp in plan.shards:
        for k, ids in sp.revoked.items():
            out.setdefault(int(k), []).extend(int(i) for i in ids)
    return {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in sorted(out.items())}


def evaluate_request(fed: FlowerSisaFederation, weights: Sequence[Weights], held_out: tuple[Tensor, Tensor],
                     revoked: Mapping[int, np.ndarray]) -> dict[str, float]:
    """Ensemble figures: held-out accuracy, accuracy on the revoked ids, loss-threshold MIA AUC (revoked ids
    against every held-out sample)."""
    with torch.no_grad():
        logp = fed.ensemble(weights)(held_out[0])
    held_loss = -logp.gather(1, held_out[1][:, None])[:, 0].double().numpy()
    got = fed.scores(weights, revoked)
    return {"held_out_acc": float((logp.argmax(1) == held_out[1]).float().mean()),
            "revoked_acc": float(got[R.CORRECT].mean()), "revoked_loss": float(got[R.LOSSES].mean()),
            "mia_auc": mia_auc(got[R.LOSSES], held_loss)}


def run_sisa_experiment(grid: Grid, cfg: Any, *, data: Any, new_model: Callable[[], nn.Module], store: Store,
                        graph: LineageGraph, out_dir: Path, results: dict[str, Any],
                        request_fn: Callable[[], UnlearningRequest]) -> dict[str, Any]:
    """The App with ``sisa-shards`` / ``sisa-slices`` > 1 or ``request-kind=samples``: train (or restore), serve
    the request through the planner, run the gold standard (``retrain-baseline``), evaluate, write results."""
    from strategies.report import write_results

    held_out_rows, validation = split_validation(data.test, cfg.calibration_samples, cfg.seed)
    held_out = next(iter(make_loader(held_out_rows, len(held_out_rows))))
    fed = FlowerSisaFederation(grid, sisa_config(cfg), store, graph, new_model, num_nodes=cfg.num_clients)
    results["sisa"] = {"shards": cfg.sisa_shards, "slices": cfg.sisa_slices, "rounds_per_stage": cfg.rounds_per_stage,
                       "hybrid_budget": cfg.hybrid_budget, "hybrid_policy": cfg.hybrid_policy, "ohs": cfg.ohs,
                       "validation_rows": len(validation[1]), "held_out_rows": len(held_out[1])}
    if "train" in cfg.mode.split("+"):
        if len(graph) > 0:
            raise ConfigError(f"store-dir {store.root} already holds a lineage; use a fresh store-dir to train")
        fed.connect()
        trained = fed.train()
        results["timing"]["train_s"] = trained["seconds"]
        store.put_json("run", {"config": cfg.to_run_config(), "dataset_used": results["dataset_used"],
                               "train_s": trained["seconds"]})
    else:
        fed.directory.refresh(grid)
        fed.clients = sorted(fed.directory.partition.values())
        fed.restore()
        results["timing"]["train_s"] = (store.get_json("run") or {}).get("train_s")
    throughput = fit_throughput(fed.round_log)
    results["sisa"]["throughput"] = {"a": throughput.a, "b": throughput.b, "r2": throughput.r2,
                                     "rounds": throughput.rounds}
    if cfg.mode == "train":
        write_results(out_dir, results, graph)
        return results

    request = request_fn()
    plan = fed.plan(request, budget_fraction=cfg.hybrid_budget, policy=cfg.hybrid_policy, approx=approx_settings(cfg))
    revoked = revoked_of(plan)
    before_w = [fed.shard_weights(s) for s in range(fed.num_shards)]
    before = evaluate_request(fed, before_w, held_out, revoked)
    log(INFO, "hybrid: %s", plan.reason)
    done = fed.execute(plan, approx_settings(cfg), validation)  # the settings planned with
    after_w = [fed.shard_weights(s) for s in range(fed.num_shards)]
    record: dict[str, Any] = {"request_id": request.id, "kind": request.kind, "description": request.describe(),
                              "num_revoked": int(sum(len(v) for v in revoked.values())), "path": done["path"],
                              "policy": cfg.hybrid_policy, "budget_fraction": cfg.hybrid_budget,
                              "estimated": {"seconds": plan.estimated_seconds,
                                            "evaluations": plan.estimated_evaluations,
                                            "exact_seconds": plan.exact_seconds,
                                            "exact_evaluations": plan.exact_evaluations, "budget": plan.budget},
                              "measured": {"seconds": done["seconds"], "evaluations": done["evaluations"]},
                              "slices_retrained": {str(r["shard"]): r["slices_retrained"] for r in done["shards"]},
                              "shards": done["shards"], "before": before,
                              "after": evaluate_request(fed, after_w, held_out, revoked)}
    results["timing"]["unlearn_s"] = done["seconds"]
    if cfg.erase_superseded:  # what the rerun or FIUn replaced still holds the revoked samples
        results["erasure"] = erasure_summary(fed.erase_out_of_service(request.id))
    if cfg.retrain_baseline:
        gold = FlowerSisaFederation(grid, sisa_config(cfg), store, LineageGraph(), new_model,
                                    num_nodes=cfg.num_clients, name="gold", exclude=revoked)
        gold.connect()
        results["timing"]["retrain_s"] = gold.train()["seconds"]
        gold_w = [gold.shard_weights(s) for s in range(fed.num_shards)]
        record["gold"] = evaluate_request(fed, gold_w, held_out, revoked)
        record["equal_to_gold"] = {str(r["shard"]): all(torch.equal(after_w[r["shard"]][k], gold_w[r["shard"]][k])
                                                        for k in gold_w[r["shard"]]) for r in done["shards"]}
        record["untouched_equal_to_gold"] = all(
            all(torch.equal(after_w[s][k], gold_w[s][k]) for k in gold_w[s])
            for s in range(fed.num_shards) if str(s) not in record["slices_retrained"])
    results["request"] = {**request.to_dict(), "description": request.describe()}
    results["requests"] = [record]
    # the served ensemble in the FIUn path's terms (forget = the revoked samples, retain = held-out data), so
    # report.md and the shared targets read the same keys
    results["final_global"] = {"id": "sisa-ensemble", **{
        part: {"forget_acc": record[part]["revoked_acc"], "retain_acc": record[part]["held_out_acc"],
               "mia_auc": record[part]["mia_auc"]} for part in ("before", "after", "gold") if part in record}}
    if "gold" in results["final_global"]:
        results["final_global"]["retrained"] = results["final_global"].pop("gold")
    results["graph_snapshot"] = str(graph.snapshot()) if graph.directory else None
    path = write_results(out_dir, results, graph, highlight=[n for n in fed.served_nodes if n])
    log(INFO, "fl_unlearn: results in %s", path)
    return results

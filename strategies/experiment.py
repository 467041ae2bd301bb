"""The App's run, phase by phase: train (recording lineage), derive, unlearn, retrain, evaluate, report.

:func:`run_experiment` is what ``simulations/cifar100_fedavg/server_app.py`` calls; it reads like
``Strategy.start``: a list of commented phases, each a short function. The server only ever reads the public
held-out test split; client data stays with the clients (forget accuracy on a client's own data, for client
and sample requests, is computed by that client with ``query.evalforget``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from logging import INFO, WARNING
from typing import Any

import torch
from datasets import Dataset
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy
from torch import nn

from fl_unlearn.data import FederatedData, load_with_fallback, make_loader
from fl_unlearn.errors import ConfigError, UnlearnError
from fl_unlearn.evaluate import forget_retain_accuracy, mia_auc_from_losses, triggered_test_set
from fl_unlearn.fisher import select_parameters
from fl_unlearn.fiun import FIUnConfig
from fl_unlearn.lineage import LineageGraph
from fl_unlearn.models import build_model, split_head
from fl_unlearn.requests import UnlearningRequest, parse_samples_file, validate_request
from fl_unlearn.store import Store
from fl_unlearn.train import seed_everything
from strategies import records as R
from strategies.config import AppConfig
from strategies.erase import erasure_summary, retry_erasures
from strategies.forget import keeps_nothing, request_config
from strategies.report import write_results
from strategies.nodes import checked_replies, exchange
from strategies.baseline import BASELINE_METHODS, BaselineSettings
from strategies.retrain import RetrainStrategy
from strategies.verify import HeldChecks, backdoor_asr, member_losses_at_clients, nonmember_rows, per_sample_losses
from fl_unlearn.calibrate import RepairConfig, grid_alphas
from strategies.calibration import ClientCalibration
from strategies.repair import (RepairBudget, RepairSettings, repair_at_clients, repair_held_at_clients,
                               repair_many_at_clients, repair_sent_at_clients, validate_at_clients)
from strategies.server import UnlearningStrategy, UnlearnOutcome

Tensors = dict[str, torch.Tensor]
#: Run-config keys that must match between a training run and a later ``mode=unlearn`` run on its store.
SAME_AS_TRAINING = ("num-clients", "partitioner", "dirichlet-alpha", "classes-per-partition", "seed",
                    "max-train-samples", "batch-size", "fisher-layers", "fisher-estimator", "local-epochs", "lr",
                    "momentum", "strategy", "num-server-rounds", "backdoor-fraction", "backdoor-target")


def make_strategy(cfg: AppConfig) -> Strategy:
    """The inner strategy named by ``strategy`` (federated evaluation off: the server evaluates centrally)."""
    common = {"fraction_train": cfg.fraction_train, "fraction_evaluate": 0.0, "min_available_nodes": 1,
              "min_train_nodes": 1}
    if cfg.strategy == "fedprox":
        return FedProx(**common, proximal_mu=cfg.proximal_mu)
    if cfg.strategy == "fedadam":
        return FedAdam(**common, eta=cfg.server_lr, eta_l=cfg.lr)
    return FedAvg(**common)


def build_request(cfg: AppConfig) -> UnlearningRequest:
    """The request named by ``request-kind`` and ``forget-*`` (its id is derived from them, so reruns match)."""
    import hashlib

    if cfg.request_kind == "classes":
        request = UnlearningRequest.for_classes(cfg.forget_classes, id="r", created=0.0)
    elif cfg.request_kind == "client":
        request = UnlearningRequest.for_clients(cfg.forget_clients, id="r", created=0.0)
    else:
        if not cfg.forget_samples:
            raise ConfigError("request-kind=samples needs forget-samples=<absolute path of a JSON file>")
        request = UnlearningRequest.for_samples(parse_samples_file(cfg.forget_samples), id="r", created=0.0)
    rid = "req-" + hashlib.sha256(request.to_json().encode()).hexdigest()[:12]
    return UnlearningRequest(request.kind, request.classes, request.clients, request.samples, id=rid, created=0.0)


def check_request_early(request: UnlearningRequest, data: FederatedData, cfg: AppConfig) -> None:
    """Before anything trains: every class the request names is one of the data set's, every client one of
    ``num-clients``. (Whether a model trained on them is checked against the lineage when the request is served.)

    Raises
    ------
    RequestError
        Unknown classes or clients, all of them listed.
    """
    validate_request(request, num_classes=data.num_classes, known_clients=range(cfg.num_clients))


def client_calibration(cfg: AppConfig) -> ClientCalibration | None:
    """``fiun-alpha='auto'``: how many of their samples clients score (``strategies.calibration``)."""
    if cfg.fiun_alpha != "auto":
        return None
    return ClientCalibration(forget_samples=cfg.calibration_forget_samples,
                             retain_samples=cfg.calibration_retain_samples,
                             check_samples=cfg.calibration_check_samples,
                             forget_tolerance=cfg.calibration_forget_tolerance,
                             kept_tolerance=cfg.calibration_kept_tolerance,
                             alphas=grid_alphas(cfg.calibration_alphas_per_octave),
                             lams=tuple(cfg.calibration_lambdas))


class Evaluator:
    """Held-out evaluation of server-side models: forget / retain accuracy on the test split, and
    (``strategies.verify``) the membership-inference AUC on the forgotten data (``mia-samples`` > 0) and the
    backdoor's attack success rate (``backdoor-fraction`` > 0).

    For client and sample requests the forget accuracy is measured by the clients holding that data, and so are the
    members' losses of the membership inference for every request.
    """

    def __init__(self, new_model: Callable[[], nn.Module], test: Dataset, request: UnlearningRequest | None,
                 grid: Grid | None = None, strategy: UnlearningStrategy | None = None, *, mia_samples: int = 0,
                 backdoor_target: int | None = None, seed: int = 0) -> None:
        self.new_model, self.test, self.request = new_model, test, request
        self.grid, self.strategy = grid, strategy
        self.mia_samples = mia_samples if request is not None and grid is not None and strategy is not None else 0
        classes = request.classes if request is not None and request.kind == "classes" else ()
        self._nonmembers = make_loader(test, 256, rows=nonmember_rows(test, classes, mia_samples, seed)) \
            if self.mia_samples else None
        self._triggered = make_loader(triggered_test_set(test, backdoor_target), 256) \
            if backdoor_target is not None else None
        self.backdoor_target = backdoor_target
        #: the same checks, run by the clients on the models they hold (``query.evalheld``)
        self.held_checks = HeldChecks(self.mia_samples, seed, backdoor_target).to_config()

    def _model(self, weights: Tensors) -> nn.Module:
        model = self.new_model()
        model.load_state_dict(weights)
        return model

    def __call__(self, weights_list: list[Tensors]) -> list[dict[str, float | None]]:
        classes = list(self.request.classes) if self.request and self.request.kind == "classes" else []
        out, models = [], [self._model(w) for w in weights_list]
        for model in models:
            acc = forget_retain_accuracy(model, self.test, classes)
            part = {"forget_acc": acc["forget_acc"] if classes else None,
                    "retain_acc": acc["retain_acc"] if classes else acc["acc"], "test_acc": acc["acc"]}
            if self._triggered is not None:  # share of triggered rows of the other classes put in the target class
                part["backdoor_asr"] = backdoor_asr(model, self._triggered, self.backdoor_target)
            out.append(part)
        if self.request is not None and not classes and self.grid is not None:
            for part, value in zip(out, self._forget_on_clients(weights_list)):
                part["forget_acc"] = value
        if self.mia_samples and weights_list:
            members = member_losses_at_clients(self.grid, self.strategy.nodes, self.request, weights_list,
                                               self.mia_samples)
            for part, model, member in zip(out, models, members):
                part["mia_auc"] = mia_auc_from_losses(member, per_sample_losses(model, self._nonmembers))
        return out

    def _forget_on_clients(self, weights_list: list[Tensors]) -> list[float | None]:
        """Accuracy on the forgotten data, measured where it lives (``query.evalforget``), sample-weighted."""
        assert self.strategy is not None and self.request is not None
        nodes = self.strategy.nodes
        nodes.refresh(self.grid)
        pids = list(self.request.clients) if self.request.kind == "client" else list(self.request.samples)
        models = {f"{R.MODEL_KEY_PREFIX}{i}": R.tensors_to_record(w) for i, w in enumerate(weights_list)}
        msgs = [Message(RecordDict({**models, R.CONFIG_KEY: ConfigRecord(request_config(self.request, pid))}),
                        dst_node_id=nodes.node_of(pid), message_type=R.MSG_EVAL_FORGET) for pid in pids]
        totals = [0.0] * len(weights_list)
        count = 0
        for reply in checked_replies(exchange(self.grid, msgs), "query.evalforget"):
            metrics = reply.content.metric_records[R.METRICS_KEY]
            n = int(metrics[R.FORGET_NUM])
            count += n
            for i in range(len(weights_list)):
                totals[i] += n * float(metrics.get(f"{R.MODEL_KEY_PREFIX}{i}", 0.0))
        return [t / count if count else None for t in totals]


def _load_data(cfg: AppConfig) -> tuple[FederatedData, str, list[str]]:
    warnings = []
    fallback = cfg.dataset_fallback or None
    data, used = load_with_fallback(cfg.data_config(), fallback)
    if used != cfg.dataset:
        msg = f"dataset {cfg.dataset!r} could not be loaded; FELL BACK to {used!r} (dataset-fallback)"
        log(WARNING, "=" * 20 + " %s " + "=" * 20, msg)
        warnings.append(msg)
    return data, used, warnings


def _model_factory(cfg: AppConfig, data: FederatedData) -> tuple[str, Callable[[], nn.Module]]:
    channels, size = data.image_shape[0], data.image_shape[-1]
    name = cfg.resolved_model(grey=channels == 1)
    return name, lambda: build_model(name, data.num_classes, in_channels=channels, image_size=size)


def _check_same_as_training(cfg: AppConfig, run_doc: dict[str, Any], used: str) -> None:
    trained = run_doc.get("config", {})
    now = cfg.to_run_config()
    keys = SAME_AS_TRAINING + (("forget-clients",) if cfg.backdoor_fraction > 0 else ())  # who trained poisoned
    diff = {k: (trained.get(k), now[k]) for k in keys if k in trained and trained[k] != now[k]}
    if run_doc.get("dataset_used") != used:
        diff["dataset (used)"] = (run_doc.get("dataset_used"), used)
    if diff:
        lines = ", ".join(f"{k}: trained with {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"mode=unlearn must use the training run's settings (clients rebuild their data from "
                          f"them); differences: {lines}")


def run_experiment(grid: Grid, cfg: AppConfig) -> dict[str, Any]:
    """Run the App: see the module docstring. Returns the results written to ``<out-dir>/results.json``."""
    # --- Set-up: directories, data, model, store and lineage ---------------------------------------------
    out_dir, store_dir = cfg.resolved_dirs()
    log(INFO, "fl_unlearn: out-dir %s, store-dir %s (mode %s)", out_dir, store_dir, cfg.mode)
    data, used, warnings = _load_data(cfg)
    # The request, built once: one the federation cannot serve (an unknown class or client, a malformed samples file)
    # must not cost a training
    request = build_request(cfg) if "unlearn" in cfg.mode else None
    if request is not None:
        check_request_early(request, data, cfg)
    model_name, new_model = _model_factory(cfg, data)
    select_parameters(new_model(), cfg.fisher_layers)  # a pattern that matches nothing fails before training
    if cfg.repair_part == "head":
        split_head(new_model())  # so does a head repair of a model whose head it cannot name
    store = Store(store_dir)
    graph = LineageGraph.open(store_dir / "lineage")
    if cfg.uses_sisa:  # SISA shards / slices and the hybrid exact path (DESIGN.md section 4)
        from strategies.sisa_server import run_sisa_experiment

        if cfg.method == "sisa":  # the exact path for every request, whatever its estimated workload
            cfg = dataclasses.replace(cfg, hybrid_policy="exact")

        results = {"dataset_requested": cfg.dataset, "dataset_used": used, "model": model_name, "strategy": "sisa",
                   "method": cfg.method, "config": cfg.to_run_config(), "warnings": warnings, "out_dir": str(out_dir),
                   "store_dir": str(store_dir), "timing": {}}
        return run_sisa_experiment(grid, cfg, data=data, new_model=new_model, store=store, graph=graph,
                                   out_dir=out_dir, results=results, request_fn=lambda: request)
    test = data.test  # held out: only ever used to report
    strategy = UnlearningStrategy(
        make_strategy(cfg), store, graph, num_nodes=cfg.num_clients, seed=cfg.seed, num_classes=data.num_classes,
        fisher_layers=cfg.fisher_layers, fisher_estimator=cfg.fisher_estimator, mfim_mode=cfg.mfim_mode,
        retain_fisher=cfg.retain_fisher, fisher_samples=cfg.fisher_samples,
        retain_fisher_samples=cfg.retain_fisher_samples, fiun=_fiun_config(cfg),
        client_calibration=client_calibration(cfg),
    )
    results: dict[str, Any] = {"dataset_requested": cfg.dataset, "dataset_used": used, "model": model_name,
                               "strategy": cfg.strategy, "method": cfg.method, "config": cfg.to_run_config(),
                               "warnings": warnings, "out_dir": str(out_dir), "store_dir": str(store_dir), "timing": {}}

    # --- Training (or the record of an earlier training run) --------------------------------------------
    if "train" in cfg.mode.split("+"):
        results["timing"]["train_s"] = _train(grid, cfg, strategy, new_model, store, used, model_name)
        if cfg.retain_fisher == "prepared":  # once per trained model, for every request that comes later
            results["timing"]["prepare_s"] = strategy.prepare_fishers(grid)["seconds"]
    else:
        run_doc = store.get_json("run")
        if run_doc is None or len(graph) == 0:
            raise ConfigError(f"mode=unlearn needs the store-dir of a training run; {store_dir} holds none")
        _check_same_as_training(cfg, run_doc, used)
        results["timing"]["train_s"] = run_doc["train_s"]
    if cfg.mode == "train":
        write_results(out_dir, results, graph)
        return results

    # --- Unlearning ----------------------------------------------------------------------------------
    assert request is not None  # mode=train returned above
    if cfg.method == "retrain":  # the gold standard as the method: a new federation, nothing unlearned
        return _retrain_as_method(grid, cfg, request, strategy, new_model, test, out_dir, results)
    if cfg.erase_superseded:  # clients that missed an earlier request's erasure (down, or a crash) erase now
        if retried := retry_erasures(grid, strategy):
            results["erasure_retried"] = retried
    final_before = graph.node(strategy.current)
    baseline = baseline_settings(cfg)
    outcome = strategy.unlearn(grid, request, baseline=baseline)
    if baseline is not None:
        results["baseline"] = dataclasses.asdict(baseline)
    results["timing"].update(outcome.timing)
    results["fisher_sources"] = {"retain": outcome.retain_source, "forget_prepared": outcome.forget_prepared}
    results["request_state"] = {"state": outcome.state, "missing": outcome.missing,
                                "failures": {str(k): v for k, v in outcome.failures.items()},
                                "resumed_from": outcome.resumed_from}
    if outcome.calibration:
        results["alpha_auto"] = outcome.calibration
    evaluator = evaluator_for(cfg, new_model, test, request, grid, strategy)
    # the clients' own models, after the timed phase
    held = strategy.evaluate_client_models(grid, outcome, evaluator.held_checks)
    results.update(_describe(outcome, graph, store, evaluator, final_before.id, held))

    # --- Optional repair of the served global model (apart from unlearn_s; strategies.repair) ------------
    # (FIUn with alpha="auto" only: the rule reads its calibration; a baseline is compared as it leaves the models)
    settings = repair_settings(cfg, request.kind)
    # every repair below shares one budget, a fraction of what training the federation took (evaluations between
    # the repairs do not count)
    budget = RepairBudget.of(cfg.repair_budget, results["timing"].get("train_s"))
    repair_s = 0.0
    rows = {entry["id"]: entry for entry in results["affected_models"]}  # each repair adds its model's after_repair
    if outcome.calibration and settings.wanted(outcome.calibration, request.kind) \
            and not budget.skip("the served global model"):
        with budget.counting():
            repaired, results["repair"] = _repair(grid, strategy, request, settings, store.get(final_before.weights),
                                                  budget)
        if results["repair"]["budget_cut"]:
            budget.stopped.append(final_before.id)
        results["final_global"]["after_repair"] = evaluator([repaired])[0]
        if final_before.id in rows:  # the served model's row in the per-model table, too
            rows[final_before.id]["after_repair"] = results["final_global"]["after_repair"]
        repair_s += results["repair"]["seconds"]
    if outcome.calibration and outcome.client_results and settings.mode != "off" \
            and not budget.skip("the client-held models"):
        # the clients' own (derived) models, each on its holder's kept data; the calibration on the newest global
        # says nothing about them, and a repair that does not lower the validation loss keeps the model as it is
        with budget.counting():
            held, held_s = _repair_held(grid, strategy, outcome, settings)
        results["repair_held"] = {"models": held, "seconds": held_s}
        figures = strategy.evaluate_held(grid, request, [h["node"] for h in held.values()], evaluator.held_checks)
        for model_id, rep in held.items():
            rows[model_id]["after_repair"] = figures[rep["node"]]
        repair_s += held_s
    if outcome.calibration and cfg.repair_scope == "all" and settings.mode != "off" \
            and not budget.skip("the other server-held models"):
        # every other model the server holds (local updates, earlier globals): FIUn left some of them far below
        # their retrained twins (MNIST class 3: a round-1 local update at 13 % kept), and they are what a later
        # request, a rollback or an audit reads; each is repaired where its data lives, where the rule asks
        with budget.counting():
            others, others_s = _repair_server_held(grid, strategy, outcome, settings, final_before.id, budget)
        results["repair_server"] = {"models": others, "seconds": others_s}
        done = [i for i, rep in others.items() if rep["node"]]
        for i, figures in zip(done, evaluator([store.get(graph.node(others[i]["node"]).weights) for i in done])):
            rows[i]["after_repair"] = figures
        repair_s += others_s
    if repair_s:
        results["timing"]["repair_s"] = repair_s
    if repair_s or budget.skipped:
        results["repair_budget"] = {"fraction": cfg.repair_budget, **budget.report()}

    # --- Erasure: the models the request replaced still hold the forgotten data (strategies.erase) ---------
    if cfg.erase_superseded:
        results["erasure"] = _erase(grid, strategy, outcome)

    # --- Gold standard: retrain from the same initial weights and seed without the data -----------------
    if cfg.retrain_baseline:
        retrained, results["timing"]["retrain_s"] = _retrain(grid, cfg, request, store, graph,
                                                             twin_evaluator(rows, evaluator))
        results["final_global"]["retrained"] = evaluator([retrained])[0]
    results["graph_snapshot"] = str(graph.snapshot()) if graph.directory else None
    path = write_results(out_dir, results, graph, highlight=outcome.affected)
    log(INFO, "fl_unlearn: results in %s", path)
    return results


def evaluator_for(cfg: AppConfig, new_model: Callable[[], nn.Module], test: Dataset, request: UnlearningRequest,
                  grid: Grid, strategy: UnlearningStrategy) -> Evaluator:
    """The App's :class:`Evaluator`: with the membership inference of ``mia-samples`` and, when the forgotten clients
    carry the backdoor (``backdoor-fraction`` > 0), its attack success rate."""
    return Evaluator(new_model, test, request, grid, strategy, mia_samples=cfg.mia_samples, seed=cfg.seed,
                     backdoor_target=cfg.backdoor_target if cfg.backdoor_fraction > 0 else None)


def baseline_settings(cfg: AppConfig) -> BaselineSettings | None:
    """The ``baseline-*`` keys for ``method=finetune`` / ``gradient_ascent``; ``None`` for FIUn."""
    if cfg.method not in BASELINE_METHODS:
        return None
    return BaselineSettings(method=cfg.method, rounds=cfg.baseline_rounds, steps=cfg.baseline_steps,
                            lr=cfg.baseline_lr, samples=cfg.baseline_samples, batch_size=cfg.batch_size,
                            loss_ceiling=cfg.ascent_loss_ceiling)


def _retrain_as_method(grid: Grid, cfg: AppConfig, request: UnlearningRequest, strategy: UnlearningStrategy,
                       new_model: Callable[[], nn.Module], test: Dataset, out_dir: Any,
                       results: dict[str, Any]) -> dict[str, Any]:
    """``method=retrain``: the federation trained again from the same initial weights and seed without the data,
    timed as the method (``unlearn_s`` = ``retrain_s``). The retrained federation is the comparison's answer, not
    a lineage version: the trained models stay in the store and the lineage (nothing is erased)."""
    graph, store = strategy.graph, strategy.store
    strategy.check_request(request)
    evaluator = evaluator_for(cfg, new_model, test, request, grid, strategy)
    final = graph.node(strategy.current)
    before = evaluator([store.get(final.weights)])[0]
    retrained, seconds = _retrain(grid, cfg, request, store, graph)
    after = evaluator([retrained])[0]
    results["timing"].update(unlearn_s=seconds, retrain_s=seconds)
    results.update({
        "request": {**request.to_dict(), "description": request.describe()},
        "roots": graph.roots(request), "affected_models": [],
        "final_global": {"id": final.id, "version": None, "before": before, "after": after, "retrained": after},
        "erasure": {"skipped": "method=retrain: the retrained federation is not recorded in the lineage, so the "
                               "trained models stay"},
    })
    path = write_results(out_dir, results, graph)
    log(INFO, "fl_unlearn: results in %s", path)
    return results


def repair_settings(cfg: AppConfig, request_kind: str = "classes") -> RepairSettings:
    """The ``repair*`` run-config keys as :class:`strategies.repair.RepairSettings` for a ``request_kind`` request.

    The forget guard is for classes only: a model that never saw a class gives it no probability, but one that never
    saw a client's or a user's samples still predicts them as well as other held-out data, so pushing their labels
    down would leave a trace of its own (``repair-forget-weight`` is 0 for those requests).
    """
    guard = cfg.repair_forget_weight if request_kind == "classes" else 0.0
    return RepairSettings(mode=cfg.repair, samples=cfg.repair_samples,
                          steps=RepairConfig(max_rounds=cfg.repair_rounds, local_steps=cfg.repair_steps,
                                             lr=cfg.repair_lr, batch_size=cfg.batch_size, seed=cfg.seed,
                                             forget_weight=guard, stop=cfg.repair_stop, part=cfg.repair_part))


def _repair(grid: Grid, strategy: UnlearningStrategy, request: UnlearningRequest, settings: RepairSettings,
            original: Tensors, budget: RepairBudget | None = None) -> tuple[Tensors, dict[str, Any]]:
    """Repair the unlearned global model on kept data (``original``: the model before unlearning, where
    ``repair-stop=restore`` stops; ``budget``: where the repairs' budget does); record the result as a new global
    lineage node."""
    graph, store = strategy.graph, strategy.store
    unlearned = graph.node(strategy.current)
    pids = sorted(strategy.nodes.partition.values())
    weights, info = repair_at_clients(grid, strategy.nodes, pids, {p: request_config(request, p) for p in pids},
                                      store.get(unlearned.weights), settings, original, budget)
    node_id = _add_repair_node(strategy, unlearned.id, weights)
    strategy.current = node_id
    store.set_ref("latest-global", graph.node(node_id).weights)
    return weights, {**info, "node": node_id}


def _repair_held(grid: Grid, strategy: UnlearningStrategy, outcome: UnlearnOutcome,
                 settings: RepairSettings) -> tuple[dict[str, dict[str, Any]], float]:
    """Repair every client-held unlearned model where it lives (``train.repairheld``); record each result as a
    new lineage node below its unlearned version. Returns affected model id -> report, and the seconds taken."""
    start = time.perf_counter()
    graph, request = strategy.graph, outcome.request
    version_of = {old: outcome.versions[old] for old in outcome.client_results}
    holder = {old: graph.node(version).client for old, version in version_of.items()}
    # A client that keeps no data (a forgotten client's own models) has nothing to repair them on: left as FIUn
    # left them.
    empty = sorted({p for p in holder.values() if keeps_nothing(request, p, strategy.nodes.info.get(p))})
    if empty:
        log(INFO, "repair: partitions %s keep no data; their models stay as unlearned", empty)
        version_of = {old: v for old, v in version_of.items() if holder[old] not in empty}
    held: dict[int, list[tuple[str, str]]] = {}
    for old, version in version_of.items():
        held.setdefault(holder[old], []).append((version, f"{version}~repair"))
    done = repair_held_at_clients(grid, strategy.nodes, held, {p: request_config(request, p) for p in held},
                                  str(strategy.store.root), settings)
    report = {}
    for old, version in version_of.items():
        rep, node = done[version], graph.node(version)
        graph.add_node(rep["node"], node.kind, round=node.round, shard=node.shard, owner=node.owner,
                       parents=(version,), weights=None, request_id=request.id,
                       meta={"repair-of": version, "held-by": node.meta.get("held-by", ""),
                             "client-weights": rep["digest"]})
        report[old] = {"node": rep["node"], "rounds": rep["rounds"], "val_loss": rep["val_loss"]}
    seconds = time.perf_counter() - start
    log(INFO, "repair: %d client-held models repaired on %d clients (%.2f s)", len(report), len(held), seconds)
    return report, seconds


def _repair_server_held(grid: Grid, strategy: UnlearningStrategy, outcome: UnlearnOutcome, settings: RepairSettings,
                        served: str, budget: RepairBudget | None = None) -> tuple[dict[str, dict[str, Any]], float]:
    """Repair the server-held unlearned models other than the ``served`` one where the ``repair`` rule asks for it
    (:meth:`RepairSettings.wanted`, on the rows each repair holds back): a local update at the client that trained
    it (``train.repairsent``, all clients at once), the earlier global models by FedAvg rounds over every client
    (``train.repair``, all of them in the same rounds, decided by one validation-only round). Each repaired model
    becomes a ``<version>~repair`` node. With a ``budget``, the earlier globals are skipped once it is spent, and
    their rounds end when it runs out. Returns affected model id -> report (``node`` ``None`` where the rule left
    it as it was), and the seconds taken."""
    start = time.perf_counter()
    graph, store, request = strategy.graph, strategy.store, outcome.request
    ids = [i for i in outcome.server_models if i in outcome.versions and i != served]
    pids = sorted(strategy.nodes.partition.values())
    configs = {p: request_config(request, p) for p in pids}
    sent: dict[int, list[tuple[str, Tensors, Tensors]]] = {}
    report: dict[str, dict[str, Any]] = {}
    for i in ids:
        client = graph.node(i).client
        if client is not None and client in configs:
            sent.setdefault(client, []).append((i, store.get(graph.node(i).weights),
                                                store.get(graph.node(outcome.versions[i]).weights)))
    for i, rep in (repair_sent_at_clients(grid, strategy.nodes, sent, configs, settings) if sent else {}).items():
        weights = rep.pop("weights")
        report[i] = {**rep, "node": _add_repair_node(strategy, outcome.versions[i], weights) if rep["repaired"] else None}
    globals_ = [i for i in ids if i not in report and graph.node(i).kind == "global"]
    if globals_ and budget is not None and budget.skip("the earlier global models"):
        globals_ = []
    if globals_:  # all earlier globals at once: one validation round (before and after unlearning), then rounds
        originals = [store.get(graph.node(i).weights) for i in globals_]
        unlearned = [store.get(graph.node(outcome.versions[i]).weights) for i in globals_]
        scores = validate_at_clients(grid, strategy.nodes, pids, configs, originals + unlearned, settings)
        for i, before, after in zip(globals_, scores, scores[len(globals_):]):
            figures = {"retain_before": before["retain_acc"], "retain_after": after["retain_acc"],
                       "forget_after": after["forget_acc"]}
            report[i] = {**figures, "repaired": settings.wanted(figures, request.kind), "rounds": 0, "val_loss": [],
                         "node": None}
        wanted = [(i, w, o) for i, w, o in zip(globals_, unlearned, originals) if report[i]["repaired"]]
        repaired = repair_many_at_clients(grid, strategy.nodes, pids, configs, [w for _, w, _ in wanted], settings,
                                          [o for _, _, o in wanted], budget) if wanted else []
        for (i, _, _), (weights, info) in zip(wanted, repaired):
            report[i].update(rounds=info["rounds"], val_loss=info["val_loss"], budget_cut=info["budget_cut"],
                             node=_add_repair_node(strategy, outcome.versions[i], weights))
            if info["budget_cut"] and budget is not None:
                budget.stopped.append(i)
    seconds = time.perf_counter() - start
    log(INFO, "repair: %d of %d other server-held models repaired (%.2f s)",
        sum(bool(r["node"]) for r in report.values()), len(report), seconds)
    return report, seconds


def _add_repair_node(strategy: UnlearningStrategy, version: str, weights: Tensors) -> str:
    """Store ``weights`` as ``<version>~repair``, a server-held node below ``version``; return its id."""
    node = strategy.graph.node(version)
    node_id = f"{version}~repair"
    digest = strategy.store.put(weights, {"kind": node.kind, "repair-of": version, "request": node.request_id})
    strategy.graph.add_node(node_id, node.kind, round=node.round, shard=node.shard, owner=node.owner,
                            parents=(version,), weights=digest, request_id=node.request_id,
                            meta={"repair-of": version, "held-by": "server"})
    return node_id


def _fiun_config(cfg: AppConfig) -> FIUnConfig:
    alpha = 1.0 if cfg.fiun_alpha == "auto" else float(cfg.fiun_alpha)  # auto: chosen per model later
    return FIUnConfig(alpha=alpha, lam=cfg.fiun_lambda)


def _train(grid: Grid, cfg: AppConfig, strategy: UnlearningStrategy, new_model: Callable[[], nn.Module],
           store: Store, used: str, model_name: str) -> float:
    """Federated training from seeded initial weights; lineage and checkpoints recorded by the wrapper."""
    if len(strategy.graph) > 0:
        raise ConfigError(f"store-dir {store.root} already holds a lineage; use a fresh store-dir to train "
                          "(or mode=unlearn to serve a request on it)")
    seed_everything(cfg.seed)
    initial = ArrayRecord(new_model().state_dict())
    start = time.perf_counter()
    strategy.start(grid, initial, num_rounds=cfg.num_server_rounds)
    train_s = time.perf_counter() - start
    if cfg.derive != "none":
        strategy.derive(grid, cfg.derive, cfg.derive_depth)
    store.put_json("run", {"config": cfg.to_run_config(), "dataset_used": used, "model": model_name,
                           "train_s": train_s})
    return train_s


def _retrain(grid: Grid, cfg: AppConfig, request: UnlearningRequest, store: Store, graph: LineageGraph,
             on_model: Callable[[str, Tensors], None] | None = None) -> tuple[Tensors, float]:
    """The same federation from the same initial weights (``global-r0``) and seed, without the data: its final
    global model and the seconds it took (``on_model``, which sees every retrained model, not counted)."""
    initial = store.get(graph.node("global-r0").weights)
    retrain = RetrainStrategy(make_strategy(cfg), request, num_nodes=cfg.num_clients, seed=cfg.seed,
                              on_model=on_model)
    log(INFO, "retrain: the federation again without %s", request.describe())
    start = time.perf_counter()
    result = retrain.start(grid, R.tensors_to_record(initial), num_rounds=cfg.num_server_rounds)
    return R.record_to_tensors(result.arrays), time.perf_counter() - start - retrain.on_model_s


def twin_evaluator(rows: dict[str, dict[str, Any]], evaluate: Callable[[list[Tensors]], list[dict[str, Any]]]
                   ) -> Callable[[str, Tensors], None]:
    """``RetrainStrategy.on_model`` for the App: each affected server-held model (``rows``, by id) gets its retrained
    twin's figures as ``rows[id]["retrained"]`` (same round, same client, without the data). A twin whose evaluation
    fails (a client down for the membership inference) goes unreported; the retraining goes on."""
    def evaluate_twin(model_id: str, weights: Tensors) -> None:
        if model_id not in rows or "retrained" in rows[model_id]:
            return
        try:
            rows[model_id]["retrained"] = evaluate([weights])[0]
        except UnlearnError as err:
            log(WARNING, "retrain: no figures for the twin of %s: %s", model_id, err)

    return evaluate_twin


def _erase(grid: Grid, strategy: UnlearningStrategy, outcome: UnlearnOutcome) -> dict[str, Any]:
    """Erase what a verified request replaced; results.json gets counts (the store document
    ``erasures/<request id>`` lists every object). An incomplete request keeps its originals: a later run resumes
    from them."""
    if outcome.state != "verified":
        return {"skipped": f"request {outcome.state}: the originals stay until a later run finishes it"}
    return erasure_summary(strategy.erase(grid, outcome.request))


def _describe(outcome: UnlearnOutcome, graph: LineageGraph, store: Store, evaluate: Evaluator,
              final_id: str, held: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per affected model before/after figures (server-held: evaluated here; client-held: ``held``, as their
    clients measured them)."""
    ids = [i for i in outcome.server_models if i in outcome.versions]
    befores = evaluate([store.get(graph.node(i).weights) for i in ids])
    afters = evaluate([store.get(graph.node(outcome.versions[i]).weights) for i in ids])
    figures = {i: (b, a) for i, b, a in zip(ids, befores, afters)}
    models = []
    for node_id in outcome.affected:
        node = graph.node(node_id)
        # FIUn's statistics (selected / zeroed weights) or the baseline's report (rounds, steps, rows, stop)
        work = "dampening" if outcome.method == "fiun" else "baseline"
        entry = {"id": node_id, "kind": node.kind, "owner": node.owner, "version": outcome.versions.get(node_id),
                 work: outcome.stats.get(node_id)}
        if node_id in figures:
            entry["before"], entry["after"] = figures[node_id]
        elif node_id in outcome.client_results:
            rep = outcome.client_results[node_id]
            if "alpha" in rep:  # the holder's own per-model check (alpha="auto", a class)
                entry["dampening"] = {"alpha": rep["alpha"], "lam": rep.get("lam"), "check": rep.get(R.CHECK)}
            entry["before"], entry["after"] = held[node_id]["before"], held[node_id]["after"]
        models.append(entry)
    before, after = figures.get(final_id, (None, None))
    final_version = outcome.versions.get(final_id)
    return {
        "request": {**outcome.request.to_dict(), "description": outcome.request.describe()},
        "roots": outcome.roots,
        "holders": {str(k): v for k, v in outcome.holders.items()},
        "affected_models": models,
        "optimiser_reset": outcome.optimiser_reset,
        "final_global": {"id": final_id, "version": final_version, "before": before, "after": after,
                         "after_digest": graph.node(final_version).weights if final_version else None},
    }

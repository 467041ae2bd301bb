"""The steps of a journaled request (``fl_unlearn.recovery.serve_request``) for :class:`UnlearningStrategy`.

``serve_request`` owns the order of writes (journal, store, lineage, refs) that makes a request survive a
crash and apply exactly once; :class:`ServerSteps` supplies the work through the strategy's own phases:
``query.fisher`` and the MFIM merge, the vectorised FIUn step (with ``alpha="auto"`` when configured) and
``train.unlearn``. It also keeps the strategy's :class:`~strategies.server.UnlearnOutcome` filled in, with
the settings a resumed run must reuse (the FIUn configuration client-held models are dampened with).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from logging import INFO
from typing import TYPE_CHECKING, Any

from flwr.common.logger import log
from flwr.serverapp import Grid

from fl_unlearn.fiun import FIUnConfig
from fl_unlearn.mfim import merge_fishers
from fl_unlearn.recovery import ClientsDone, Dampened, Fishers, Plan, Progress, plan_request
from fl_unlearn.requests import UnlearningRequest

if TYPE_CHECKING:
    from strategies.calibration import CalibrationRound
    from strategies.server import UnlearningStrategy, UnlearnOutcome


class ServerSteps:
    """:class:`fl_unlearn.recovery.UnlearnSteps` over a Flower Grid, through ``strategy``'s phases."""

    method = "fiun"  # journaled with the request: a resumed request is finished by the same method

    def __init__(self, strategy: UnlearningStrategy, grid: Grid, request: UnlearningRequest,
                 outcome: UnlearnOutcome) -> None:
        self.strategy, self.grid, self.request, self.outcome = strategy, grid, request, outcome
        self._calibration: CalibrationRound | None = None  # begun by gather, finished by dampen

    def _sync(self, plan: Plan) -> None:
        self.outcome.roots, self.outcome.affected = list(plan.roots), list(plan.affected)

    def plan(self) -> Plan:
        s, request = self.strategy, self.request
        s.check_request(request)
        # Models an earlier request replaced (by their unlearned or repaired version) are not unlearned again:
        # their replacements are, and are what the federation serves and holds.
        plan = plan_request(s.graph, s.store, s.graph.roots(request), s.graph.affected(request, skip_superseded=True))
        self._sync(plan)
        log(INFO, "unlearn: %s: %d roots, %d affected models (%d server-held, %d on %d clients)", request.describe(),
            len(plan.roots), len(plan.affected), len(plan.server_models),
            sum(len(v) for v in plan.client_models.values()), len(plan.client_models))
        return plan

    def gather(self, plan: Plan) -> Fishers:
        s, start = self.strategy, time.perf_counter()
        self._sync(plan)
        s.nodes.refresh(self.grid)
        holders, retains = s._gather_fishers(self.grid, self.request, plan.roots, self.outcome)
        t1 = time.perf_counter()
        forget_of = s._merged_forget_fishers(plan.targets, plan.roots, holders)
        shared = None
        if retains:
            shared = merge_fishers([f for f, _ in retains.values()], num_samples=[n for _, n in retains.values()],
                                   mode="weighted_mean")
            shared = s._kept_retain(self.request, shared, retains, self.outcome)
        self.outcome.timing.update({"forget_fisher_s": t1 - start, "merge_s": time.perf_counter() - t1})
        # alpha="auto": the clients calibrate while serve_request journals and stores these Fishers. Only an
        # optimisation: what fails here fails again, and is reported, where the calibration is finished (dampen)
        try:
            self._calibration = s.begin_auto_alpha(self.grid, self.request, forget_of, shared, self.outcome)
        except Exception as err:  # noqa: BLE001
            log(INFO, "unlearn: calibration not begun early (%s: %s)", type(err).__name__, err)
        return Fishers(forget_of, shared, dict(self.outcome.holders))

    def dampen(self, plan: Plan, todo: list[str], fishers: Fishers) -> Dampened:
        s, start = self.strategy, time.perf_counter()
        self._sync(plan)
        from strategies.server import PresumedDampening  # (server imports this module)

        presumed = PresumedDampening()
        s._auto_alpha(self.grid, self.request, fishers.forget, fishers.retain, self.outcome, begun=self._calibration,
                      presumed=presumed, todo=todo)
        self._calibration = None
        digests = s._dampen_server_models(self.request, todo, fishers.forget, fishers.retain, self.outcome,
                                          presumed) if todo else {}
        self.outcome.timing["dampen_s"] = time.perf_counter() - start
        return Dampened(digests, {k: self.outcome.stats[k] for k in digests if k in self.outcome.stats},
                        list(self.outcome.alphas), self._settings())

    def unlearn_clients(self, plan: Plan, todo: dict[int, list[str]], fishers: Fishers,
                        done: Mapping[str, Any]) -> ClientsDone:
        s, start = self.strategy, time.perf_counter()
        self._sync(plan)
        self._restore(done)
        s.nodes.refresh(self.grid)  # a resumed run has not asked query.info yet
        ids = [m for m in plan.affected if any(m in v for v in todo.values())]
        digests, failures = s._unlearn_client_models(self.grid, self.request, ids, fishers.forget, self.outcome,
                                                     fishers.retain)
        self.outcome.timing["clients_s"] = time.perf_counter() - start
        reports = {k: dict(self.outcome.client_results[k]) for k in digests if k in self.outcome.client_results}
        return ClientsDone(digests, reports, failures)

    # -- settings a resumed run must reuse ----------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        o = self.outcome
        return {"fiun": dataclasses.asdict(o.fiun) if o.fiun is not None else None, "scale_free": o.scale_free,
                "calibration": o.calibration}

    def _restore(self, done: Mapping[str, Any]) -> None:
        o, settings = self.outcome, done.get("settings") or {}
        o.stats = {**done.get("stats", {}), **o.stats}
        o.alphas = list(o.alphas or done.get("alphas", []))
        if settings.get("fiun") is not None and o.fiun is None:
            o.fiun = FIUnConfig(**settings["fiun"])
        o.scale_free = bool(settings.get("scale_free", o.scale_free))
        o.calibration = o.calibration or dict(settings.get("calibration") or {})


def fill_outcome(outcome: UnlearnOutcome, progress: Progress) -> None:
    """Copy what the journal says was done (this run and earlier ones) into ``outcome``."""
    plan = progress.plan
    outcome.roots, outcome.affected = list(plan.roots), list(plan.affected)
    outcome.versions = dict(progress.versions)
    outcome.server_models = list(plan.server_models)
    outcome.client_results = {k: dict(v) for k, v in progress.reports.items()}
    outcome.holders = dict(progress.holders)
    outcome.stats = {**progress.stats, **outcome.stats}
    outcome.alphas = list(progress.alphas)
    outcome.state, outcome.missing = progress.state, list(progress.missing)
    outcome.failures, outcome.resumed_from = dict(progress.failures), progress.resumed_from

"""Serving an unlearning request exactly once, through crashes and client failures.

:func:`serve_request` drives one request through the journal states of :mod:`fl_unlearn.journal`. The work
itself (asking clients for Fishers, dampening, asking clients to dampen what they hold) is done by the
caller's :class:`UnlearnSteps`; the server wrapper (``strategies.server``) and the tests supply their own.
What this module owns is the order of writes, so that a kill at any point is recoverable:

1. ``received`` is journaled (fsynced) before anything else; the plan names every model to change.
2. Forget-Fishers are stored (content-addressed) and their digests journaled: ``fisher-collected``.
3. Dampened weights are stored and their digests journaled (``dampened``) *before* the lineage or any ref
   points at them. Dampening always starts from the original checkpoints, which are never modified, and is
   deterministic, so redoing it after a crash gives the same objects.
4. Lineage nodes and refs are switched with idempotent writes (``applied``), then checked (``verified``).

On restart, a request found in the journal resumes from its latest state: before ``dampened`` the missing
work is redone from the original checkpoints (nothing was switched); from ``dampened`` on, the journaled
digests are recorded (already recorded nodes are checked, not added again). A ``verified`` request is
refused: every affected model is unlearned exactly once, never twice (dampening twice is not idempotent) and
never half.

A client that fails (after the caller's retries) leaves the request ``incomplete``, with the models not yet
unlearned in ``missing``; nothing is reported as forgotten that was not. Serving the same request again
finishes only what is missing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fl_unlearn.errors import LineageError, RequestError, StoreError, UnlearnError
from fl_unlearn.journal import JournalEntry, RequestJournal
from fl_unlearn.lineage import LineageGraph, ModelNode
from fl_unlearn.requests import UnlearningRequest
from fl_unlearn.store import Store

__all__ = ["Plan", "Fishers", "Dampened", "ClientsDone", "ClientFailure", "Progress", "UnlearnSteps",
           "plan_request", "serve_request", "record_versions", "version_id"]

log = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]
Hook = Callable[[str], None]


class ClientFailure(UnlearnError):
    """Clients did not answer (or answered with errors) after the retries.

    Attributes
    ----------
    failures : dict[int, str]
        Partition id -> the last reason.
    """

    def __init__(self, failures: Mapping[int, str]) -> None:
        self.failures = {int(k): str(v) for k, v in failures.items()}
        super().__init__("; ".join(f"partition {p}: {r}" for p, r in sorted(self.failures.items())))


@dataclass
class Plan:
    """The models a request changes, fixed when it is received.

    Attributes
    ----------
    roots, affected : list[str]
        Lineage ids (chronological).
    server_models : list[str]
        Affected models whose weights the server's store holds.
    client_models : dict[int, list[str]]
        Partition id -> affected models that client holds.
    unheld : list[str]
        Affected models whose weights nobody kept (nothing to unlearn).
    """

    roots: list[str]
    affected: list[str]
    server_models: list[str]
    client_models: dict[int, list[str]]
    unheld: list[str] = field(default_factory=list)

    @property
    def targets(self) -> list[str]:
        """Every model to unlearn, in ``affected`` order."""
        held = set(self.server_models) | {m for ids in self.client_models.values() for m in ids}
        return [a for a in self.affected if a in held]

    def to_dict(self) -> dict[str, Any]:
        return {"roots": self.roots, "affected": self.affected, "server_models": self.server_models,
                "client_models": {str(p): ids for p, ids in self.client_models.items()}, "unheld": self.unheld}

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Plan:
        return cls(list(obj["roots"]), list(obj["affected"]), list(obj["server_models"]),
                   {int(p): list(ids) for p, ids in obj["client_models"].items()}, list(obj["unheld"]))


@dataclass
class Fishers:
    """Forget-Fisher per target model, the shared retain-Fisher (or ``None``) and forget samples per holder."""

    forget: dict[str, Tensors]
    retain: Tensors | None = None
    holders: dict[int, int] = field(default_factory=dict)


@dataclass
class Dampened:
    """Server-held models dampened: old id -> weights digest, JSON statistics, alphas chosen (``auto``), and
    the settings client-held models must be dampened with (journaled, so a resumed run uses the same)."""

    digests: dict[str, str]
    stats: dict[str, Any] = field(default_factory=dict)
    alphas: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientsDone:
    """Client-held models dampened (old id -> the client's weights digest), their reports, and failures."""

    digests: dict[str, str] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)


class UnlearnSteps(Protocol):
    """The work :func:`serve_request` orders; each step must be deterministic given its inputs.

    A ``method`` attribute (default ``"fiun"``) names what does the work; it is journaled when the request is
    received, and a resumed request is finished only by steps of the same method."""

    def plan(self) -> Plan:
        """Check the request and fix the models to change; raise before anything is written."""

    def gather(self, plan: Plan) -> Fishers:
        """Forget-Fishers for every target; raise :class:`ClientFailure` if clients failed."""

    def dampen(self, plan: Plan, todo: list[str], fishers: Fishers) -> Dampened:
        """Dampen the server-held models ``todo`` (maybe none) from their original checkpoints; store, do not
        record. Called once per request (``todo`` empty when only client-held models are affected)."""

    def unlearn_clients(self, plan: Plan, todo: dict[int, list[str]], fishers: Fishers,
                        done: Mapping[str, Any]) -> ClientsDone:
        """Ask clients to dampen ``todo``; ``done`` holds the journaled ``stats``, ``alphas`` and ``settings``."""


@dataclass
class Progress:
    """Where a request stands after :func:`serve_request`.

    Attributes
    ----------
    request : UnlearningRequest
    state : str
        ``verified`` or ``incomplete``.
    plan : Plan
    versions : dict[str, str]
        Old id -> lineage id of its unlearned version (this run and earlier ones).
    digests : dict[str, str]
        Old id -> weights digest of the unlearned version.
    missing : list[str]
        Targets not unlearned yet.
    failures : dict[int, str]
        Partition id -> why it failed (this run).
    stats, reports : dict
        Dampening statistics (server-held) and client reports (client-held), by old id.
    alphas : list[float]
    holders : dict[int, int]
    resumed_from : str | None
        The journal state the request was found in (``None``: new request).
    """

    request: UnlearningRequest
    state: str
    plan: Plan
    versions: dict[str, str]
    digests: dict[str, str]
    missing: list[str]
    failures: dict[int, str]
    stats: dict[str, Any]
    reports: dict[str, dict[str, Any]]
    alphas: list[float]
    holders: dict[int, int]
    resumed_from: str | None


def version_id(node_id: str, request: UnlearningRequest) -> str:
    """Lineage id of the unlearned version of ``node_id`` for ``request``: ``<node>~u<10 hex of sha256(id)>``.

    Hashing the whole id keeps versions of different requests apart even when ids share a prefix (the App's
    ids all start with ``req-``; the first 8 characters left 4 hex digits to tell requests apart).
    """
    import hashlib

    return f"{node_id}~u{hashlib.sha256(request.id.encode()).hexdigest()[:10]}"


def plan_request(graph: LineageGraph, store: Store, roots: list[str], affected: list[str]) -> Plan:
    """Split the affected models by who holds them, and verify every server-held checkpoint first.

    Raises
    ------
    StoreError
        A missing or tampered checkpoint or retain-Fisher (checksum mismatch); nothing is written.
    """
    server, clients, unheld = [], {}, []
    for node_id in affected:
        node = graph.node(node_id)
        if node.weights is not None:
            server.append(node_id)
            for digest in (node.weights, node.retain_fisher):
                if digest is not None:
                    store.verify(digest)
        elif str(node.meta.get("held-by", "")).startswith("client:") and node.client is not None:
            clients.setdefault(node.client, []).append(node_id)
        else:
            unheld.append(node_id)
    return Plan(list(roots), list(affected), server, dict(sorted(clients.items())), unheld)


# ------------------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------------------


def serve_request(
    journal: RequestJournal, request: UnlearningRequest, graph: LineageGraph, store: Store, steps: UnlearnSteps,
    *, refs: tuple[str, ...] = (), hook: Hook | None = None,
) -> Progress:
    """Serve ``request`` exactly once, resuming it from the journal if an earlier run stopped part-way.

    Hold ``store.lock()`` around the call to serialise requests.

    Parameters
    ----------
    journal : RequestJournal
    request : UnlearningRequest
    graph : LineageGraph
        New versions are recorded here (nodes ``<old>~u<request id[:8]>`` with ``request_id`` set).
    store : Store
        Holds checkpoints, Fishers and dampened weights.
    steps : UnlearnSteps
        The work (see :class:`UnlearnSteps`).
    refs : tuple[str, ...] (default: ())
        Store refs to move from an old model's weights to its unlearned version's (``"latest-global"``).
    hook : callable | None (default: None)
        Called with each state name right after it is journaled, and with ``"recorded"`` after each lineage
        node; fault-injection tests kill the process there.

    Returns
    -------
    Progress
        ``state`` is ``verified`` (done) or ``incomplete`` (``missing`` lists what a later call finishes).

    Raises
    ------
    RequestError
        The request id was already served (``verified``), or its journaled content differs.
    UnlearnError
        Raised by a step; the journal keeps the last state reached, and a later call resumes from there.
    """
    hook = hook or (lambda _state: None)
    entry = journal.latest(request.id)
    resumed_from = entry.state if entry is not None else None
    doc = _resume_doc(entry, request, steps) if entry is not None else _receive(journal, request, steps, hook)
    if resumed_from is not None:
        log.info("journal: request %s resumes from state %s", request.id, resumed_from)
    plan = Plan.from_dict(doc["plan"])
    if doc["fishers"] is None:
        fishers = _gather(journal, request, plan, doc, steps, hook)
        if fishers is None:
            return _progress(request, journal.latest(request.id), resumed_from)
        doc["fishers"] = _store_fishers(store, fishers)
        doc = _advance(journal, request, "fisher-collected", doc, hook)
    if resumed_from not in ("dampened", "applied"):  # from "dampened" on, only the journaled digests count
        failures = _dampen_all(plan, _load_fishers(store, doc["fishers"]), doc, steps)
        doc["missing"] = [m for m in plan.targets if m not in doc["digests"]]
        doc["failures"] = _str_keys(failures)
        doc = _advance(journal, request, "dampened", doc, hook)
    if resumed_from != "applied":
        doc["versions"] = record_versions(graph, store, request, plan, doc["digests"], refs=refs, hook=hook)
        doc = _advance(journal, request, "applied", doc, hook)
    _verify(graph, store, request, doc)
    _advance(journal, request, "incomplete" if doc["missing"] else "verified", doc, hook)
    return _progress(request, journal.latest(request.id), resumed_from)


def _receive(journal: RequestJournal, request: UnlearningRequest, steps: UnlearnSteps, hook: Hook) -> dict[str, Any]:
    plan = steps.plan()  # checks everything; raises before the journal is touched
    doc = {"request": request.to_dict(), "method": _method(steps), "plan": plan.to_dict(), "fishers": None,
           "digests": {}, "stats": {},
           "alphas": [], "settings": None, "reports": {}, "versions": {}, "missing": plan.targets, "failures": {}}
    return _advance(journal, request, "received", doc, hook)


def _gather(journal: RequestJournal, request: UnlearningRequest, plan: Plan, doc: dict[str, Any],
            steps: UnlearnSteps, hook: Hook) -> Fishers | None:
    """The Fishers, or ``None`` after journaling ``incomplete`` when clients failed; other errors propagate
    (journaled first, so the journal says why the request stopped)."""
    try:
        return steps.gather(plan)
    except UnlearnError as err:
        failures = err.failures if isinstance(err, ClientFailure) else {-1: f"{type(err).__name__}: {err}"}
        _advance(journal, request, "incomplete", {**doc, "missing": plan.targets, "failures": _str_keys(failures)},
                 hook)
        if isinstance(err, ClientFailure):
            return None
        raise


def _resume_doc(entry: JournalEntry, request: UnlearningRequest, steps: UnlearnSteps) -> dict[str, Any]:
    if entry.doc.get("request") != request.to_dict():
        raise RequestError(f"request id {request.id!r} was journaled with different content "
                           f"({entry.doc.get('request')!r:.200}); use a new id for a new request")
    if entry.state == "verified":
        raise RequestError(f"request {request.id!r} was already applied and verified "
                           f"({len(entry.doc['versions'])} models unlearned); it is not applied twice")
    begun = entry.doc.get("method", "fiun")  # journals from before the method was recorded: FIUn's
    if begun != _method(steps):
        raise UnlearnError(f"request {request.id} was begun with method={begun}; finish it with that method "
                           f"(now {_method(steps)}); nothing changed")
    return dict(entry.doc)


def _method(steps: UnlearnSteps) -> str:
    return str(getattr(steps, "method", "fiun"))


def _advance(journal: RequestJournal, request: UnlearningRequest, state: str, doc: dict[str, Any],
             hook: Hook) -> dict[str, Any]:
    journal.append(request.id, state, doc)
    log.info("journal: request %s -> %s", request.id, state)
    hook(state)
    return doc


def _dampen_all(plan: Plan, fishers: Fishers, doc: dict[str, Any], steps: UnlearnSteps) -> dict[int, str]:
    """Dampen every target without a journaled digest: server-held in one step, then the clients."""
    todo = [m for m in plan.server_models if m not in doc["digests"]]
    if todo or doc["settings"] is None:
        done = steps.dampen(plan, todo, fishers)
        _check_digests(done.digests, todo, "server dampening")
        doc["digests"].update(done.digests)
        doc["stats"].update(_jsonable(done.stats))
        doc["alphas"] = [float(a) for a in done.alphas] or doc["alphas"]
        doc["settings"] = _jsonable(done.settings)
    pending = {p: [m for m in ids if m not in doc["digests"]] for p, ids in plan.client_models.items()}
    pending = {p: ids for p, ids in pending.items() if ids}
    if not pending:
        return {}
    clients = steps.unlearn_clients(plan, pending, fishers, {k: doc[k] for k in ("stats", "alphas", "settings")})
    wanted = [m for ids in pending.values() for m in ids]
    _check_digests(clients.digests, wanted, "client dampening", partial=True)
    doc["digests"].update(clients.digests)
    doc["reports"].update(_jsonable(clients.reports))
    return clients.failures


def _check_digests(digests: Mapping[str, str], wanted: list[str], what: str, *, partial: bool = False) -> None:
    extra = sorted(set(digests) - set(wanted))
    missing = [] if partial else [m for m in wanted if m not in digests]
    if extra or missing:
        raise UnlearnError(f"{what} returned versions for {extra} (not asked) and none for {missing}")
    for old, digest in digests.items():
        _check_digest(old, digest)


def _check_digest(old: str, digest: Any) -> None:
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise UnlearnError(f"the unlearned version of {old!r} has an invalid digest {digest!r:.80}")


# ------------------------------------------------------------------------------------------------------
# Fishers in the store
# ------------------------------------------------------------------------------------------------------


def _store_fishers(store: Store, fishers: Fishers) -> dict[str, Any]:
    """Put each distinct Fisher once (models sharing a merge share the object); return the digests."""
    by_object: dict[int, str] = {}
    forget = {}
    for model, tensors in fishers.forget.items():
        if id(tensors) not in by_object:
            by_object[id(tensors)] = store.put(tensors, {"kind": "forget-fisher"})
        forget[model] = by_object[id(tensors)]
    retain = store.put(fishers.retain, {"kind": "retain-fisher"}) if fishers.retain is not None else None
    return {"forget": forget, "retain": retain, "holders": _str_keys(fishers.holders)}


def _load_fishers(store: Store, doc: Mapping[str, Any]) -> Fishers:
    """The journaled Fishers, read back (and checksum-verified); equal digests give one shared object."""
    cache: dict[str, Tensors] = {}

    def get(digest: str) -> Tensors:
        if digest not in cache:
            cache[digest] = store.get(digest)
        return cache[digest]

    return Fishers({m: get(d) for m, d in doc["forget"].items()}, get(doc["retain"]) if doc["retain"] else None,
                   {int(p): int(n) for p, n in doc["holders"].items()})


# ------------------------------------------------------------------------------------------------------
# recording (idempotent) and verification
# ------------------------------------------------------------------------------------------------------


def record_versions(
    graph: LineageGraph, store: Store, request: UnlearningRequest, plan: Plan, digests: Mapping[str, str],
    *, refs: tuple[str, ...] = (), hook: Hook | None = None,
) -> dict[str, str]:
    """Record every unlearned model as a new lineage node (append-only); return old id -> new id.

    Idempotent: a node recorded by an earlier, interrupted call is checked (same request, same weights) and
    kept. Refs in ``refs`` that point at an old model's weights move to its new version's.

    Raises
    ------
    LineageError
        A node with the new id exists but records another request or other weights.
    """
    versions: dict[str, str] = {}
    moves: dict[str, str] = {}
    for old_id in plan.affected:
        if old_id not in digests:
            continue
        old = graph.node(old_id)
        new_id = version_id(old_id, request)
        if new_id in graph:
            _check_recorded(graph.node(new_id), request, digests[old_id])
        else:
            _add_version(graph, old, new_id, request, digests[old_id])
            if hook is not None:
                hook("recorded")
        versions[old_id] = new_id
        if old.weights is not None:
            moves[old.weights] = digests[old_id]
    for name in refs:
        target = store.get_ref(name)
        if target in moves:
            store.set_ref(name, moves[target])
    return versions


def _add_version(graph: LineageGraph, old: ModelNode, new_id: str, request: UnlearningRequest, digest: str) -> None:
    server_held = old.weights is not None
    graph.add_node(
        new_id, old.kind, round=old.round, shard=old.shard, owner=old.owner, parents=(old.id,),
        weights=digest if server_held else None, request_id=request.id, retain_fisher=old.retain_fisher,
        meta={"unlearned-from": old.id, "held-by": old.meta.get("held-by", "server"),
              **({} if server_held else {"client-weights": digest})},
    )


def _check_recorded(node: ModelNode, request: UnlearningRequest, digest: str) -> None:
    recorded = node.weights if node.weights is not None else node.meta.get("client-weights")
    if node.request_id != request.id or recorded != digest:
        raise LineageError(f"lineage node {node.id!r} exists with request {node.request_id!r} and weights "
                           f"{recorded!r}; the journal of request {request.id!r} says {digest!r}")


def _verify(graph: LineageGraph, store: Store, request: UnlearningRequest, doc: Mapping[str, Any]) -> None:
    """Every recorded version: its node names this request and the journaled weights, which read back intact."""
    for old_id, new_id in doc["versions"].items():
        node = graph.node(new_id)
        _check_recorded(node, request, doc["digests"][old_id])
        if node.weights is not None:
            store.verify(node.weights)
    unrecorded = [m for m in doc["digests"] if m not in doc["versions"]]
    if unrecorded:
        raise StoreError(f"request {request.id!r}: versions of {unrecorded} were dampened but not recorded")


def _progress(request: UnlearningRequest, entry: JournalEntry | None, resumed_from: str | None) -> Progress:
    assert entry is not None
    doc = entry.doc
    fishers = doc.get("fishers") or {}
    return Progress(request, entry.state, Plan.from_dict(doc["plan"]), dict(doc["versions"]), dict(doc["digests"]),
                    list(doc["missing"]), {int(p): r for p, r in doc["failures"].items()}, dict(doc["stats"]),
                    dict(doc["reports"]), list(doc["alphas"]),
                    {int(p): int(n) for p, n in fishers.get("holders", {}).items()}, resumed_from)


def _str_keys(mapping: Mapping[Any, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in mapping.items()}


def _jsonable(obj: Any) -> Any:
    """A JSON copy (numpy / torch scalars become numbers, NaN refused by the journal later)."""
    def default(value: Any) -> Any:
        if hasattr(value, "item"):
            return value.item()
        if hasattr(value, "tolist"):
            return value.tolist()
        return str(value)

    return json.loads(json.dumps(obj, default=default))

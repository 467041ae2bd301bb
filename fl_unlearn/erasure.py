"""Erasing what a served request replaced: the weights that still hold the forgotten data.

Unlearning writes new versions and leaves the originals in the store (:mod:`fl_unlearn.recovery` dampens from
them, so a crash can resume). Once a request is ``verified`` nothing needs them, and they are the most direct
trace of the data the federation was asked to forget: every superseded model's weights, the forget-Fishers the
holders sent (squared gradients of exactly that data) and the whole-data retain-Fishers prepared on the replaced
weights. :func:`erase_superseded` deletes those from the server's store (each leaves a tombstone,
:meth:`fl_unlearn.store.Store.erase`) and names the superseded models the clients hold, for the Flower layer to
erase there (``train.erase``).

What stays: the lineage nodes (the record of what was there; reading an erased node's weights raises a
``StoreError`` that names the request), every object a live model or a ref still points at (a replacement shares
its original's retain-Fisher), and everything a request that is not ``verified`` yet may still read. Erasing is
idempotent: a crash part-way leaves tombstones and files that a second call finishes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fl_unlearn.errors import UnlearnError
from fl_unlearn.journal import RequestJournal
from fl_unlearn.lineage import LineageGraph, ModelNode
from fl_unlearn.store import Store

__all__ = ["Erasure", "superseded_by", "erase_superseded", "erase_out_of_service", "erase_object",
           "PREPARED_RETAIN_REF"]

log = logging.getLogger(__name__)

#: Store ref prefix of retain-Fishers prepared after training: ``prepared-retain/<weights digest>``.
PREPARED_RETAIN_REF = "prepared-retain"


@dataclass
class Erasure:
    """What :func:`erase_superseded` erased for one request.

    Attributes
    ----------
    request_id : str
    models : list[str]
        Superseded server-held models whose weights were erased (or had been, by an earlier call); not those whose
        weights a live model shares (``kept``).
    client_models : dict[int, list[str]]
        Partition id -> superseded models that client holds: the caller erases them there.
    objects : dict[str, str]
        Digest -> what it was (``weights of <node>``, ``forget-Fisher``, ...), every object erased for the
        request, this call or an earlier one.
    kept : dict[str, str]
        Digest -> why it stayed although a superseded model pointed at it (a live model or ref shares it).
    bytes_freed : int
        Bytes of the object files this call deleted.
    """

    request_id: str
    models: list[str] = field(default_factory=list)
    client_models: dict[int, list[str]] = field(default_factory=dict)
    objects: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    bytes_freed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "models": self.models,
                "client_models": {str(p): ids for p, ids in self.client_models.items()},
                "objects": self.objects, "kept": self.kept, "bytes_freed": self.bytes_freed}


def superseded_by(graph: LineageGraph, request_id: str, affected: list[str]) -> list[str]:
    """The models ``request_id`` replaced: its affected models that a later version replaced, and versions it
    made (an unlearned model) that a repair replaced; chronological."""
    replaced, planned = graph.superseded(), set(affected)
    return [n.id for n in graph.nodes()
            if n.id in replaced and (n.id in planned or n.request_id == request_id)]


def erase_superseded(journal: RequestJournal, graph: LineageGraph, store: Store, request_id: str) -> Erasure:
    """Erase from ``store`` what request ``request_id`` replaced; hold ``store.lock()`` around the call.

    Parameters
    ----------
    journal : RequestJournal
        The store's request journal: the request must be ``verified`` there.
    graph : LineageGraph
        The lineage with the request's versions recorded.
    store : Store
        The server's store.
    request_id : str

    Returns
    -------
    Erasure
        What was erased here, and the superseded models each client holds (``client_models``).

    Raises
    ------
    UnlearnError
        The journal does not hold the request, or holds it in a state other than ``verified`` (a resumed run
        dampens the originals again): nothing is erased.
    """
    entry = journal.latest(request_id)
    if entry is None:
        raise UnlearnError(f"erase: the journal holds no request {request_id!r}")
    if entry.state != "verified":
        raise UnlearnError(f"erase: request {request_id!r} is {entry.state!r}, not verified; a later run resumes "
                           "it from the originals, so nothing is erased until it is verified")
    out = Erasure(request_id)
    replaced = [graph.node(i) for i in superseded_by(graph, request_id, list(entry.doc["plan"]["affected"]))]
    targets: dict[str, str] = {}
    weights_of: dict[str, list[str]] = {}  # digest -> the replaced models with those weights
    for node in replaced:
        if node.weights is not None:
            targets[node.weights] = f"weights of {node.id}"
            weights_of.setdefault(node.weights, []).append(node.id)
        else:
            pid = _client_of(node)
            if pid is not None:
                out.client_models.setdefault(pid, []).append(node.id)
    prepared_refs = [name for name in store.refs(f"{PREPARED_RETAIN_REF}/")
                     if name.rsplit("/", 1)[-1] in targets]
    for name in prepared_refs:
        digest = store.get_ref(name)
        if digest is not None:
            targets.setdefault(digest, f"retain-Fisher prepared on {name.rsplit('/', 1)[-1][:12]}")
    fishers = entry.doc.get("fishers") or {}
    for digest in set((fishers.get("forget") or {}).values()):
        targets.setdefault(digest, "forget-Fisher")
    if fishers.get("retain"):
        targets.setdefault(fishers["retain"], "retain-Fisher sent for the request")
    live = _live_objects(journal, graph, store, skip_refs=set(prepared_refs))
    reason = f"erased after unlearning request {request_id} (superseded)"
    for digest, what in targets.items():
        if digest in live:
            out.kept[digest] = live[digest]
            continue
        out.bytes_freed += erase_object(store, digest, f"{what}: {reason}")
        out.objects[digest] = what
        out.models += weights_of.get(digest, [])
    for name in prepared_refs:  # after the objects: a crash in between leaves a ref to a tombstone, found again
        store.delete_ref(name)
    log.info("erase: request %s: %d objects erased (%.1f MiB freed), %d kept (still referenced), %d client-held "
             "models to erase at %d clients", request_id, len(out.objects), out.bytes_freed / 2**20, len(out.kept),
             sum(map(len, out.client_models.values())), len(out.client_models))
    return out


def erase_out_of_service(graph: LineageGraph, store: Store, in_service: Iterable[str], *, prefix: str,
                         request_id: str) -> Erasure:
    """SISA: erase the weights of every lineage node under ``prefix`` (one shard-federation's checkpoints and
    approximately unlearned models) that is no longer in service; hold ``store.lock()`` around the call.

    After an exact rerun a shard's replaced stage checkpoints hold the revoked samples; after an approximate
    removal so do its checkpoints from the first dirty stage on, which no rerun starts from again (pitfall P1),
    and the model served before. ``in_service`` is what the federation may still read: the checkpoints below the
    first dirty stage and the served models. Objects a ref points at stay too. Idempotent.
    """
    keep = set(in_service) | set(_ref_targets(store))
    out = Erasure(request_id)
    reason = f"erased after unlearning request {request_id} (no longer in service)"
    for node in graph.nodes():
        digest = node.weights
        if not node.id.startswith(prefix) or not digest or digest in keep or digest in out.objects:
            continue
        if not store.has(digest) and store.erased(digest) is None:
            continue  # never in this store (another store's lineage)
        out.bytes_freed += erase_object(store, digest, f"weights of {node.id}: {reason}")
        out.objects[digest] = f"weights of {node.id}"
        out.models.append(node.id)
    log.info("erase: request %s: %d out-of-service checkpoints erased (%.1f MiB freed)", request_id,
             len(out.objects), out.bytes_freed / 2**20)
    return out


def erase_object(store: Store, digest: str, reason: str) -> int:
    """:meth:`Store.erase` one object; return the bytes its file took (0 when it was already gone)."""
    size = store.path(digest).stat().st_size if store.has(digest) else 0
    return size if store.erase(digest, reason) else 0


def _ref_targets(store: Store, skip: set[str] = frozenset()) -> dict[str, str]:
    """Digest -> the first ref (by name) that points at it, refs in ``skip`` left out."""
    targets: dict[str, str] = {}
    for name in store.refs():
        if name not in skip and (digest := store.get_ref(name)):
            targets.setdefault(digest, name)
    return targets


def _client_of(node: ModelNode) -> int | None:
    held_by = str(node.meta.get("held-by", ""))
    if held_by.startswith("client:"):
        try:
            return int(held_by.split(":", 1)[1])
        except ValueError:
            return None
    return None


def _live_objects(journal: RequestJournal, graph: LineageGraph, store: Store, *, skip_refs: set[str]) -> dict[str, str]:
    """Digest -> who still points at it: models nothing replaced, refs, and requests not verified yet."""
    replaced = graph.superseded()
    live: dict[str, str] = {}
    for node in graph.nodes():
        if node.id in replaced:
            continue
        for digest in (node.weights, node.retain_fisher):
            if digest:
                live.setdefault(digest, f"model {node.id}")
    for digest, name in _ref_targets(store, skip_refs).items():
        live.setdefault(digest, f"ref {name}")
    latest = {entry.request: entry for entry in journal.entries()}  # one read of the journal, not one per request
    for other, entry in latest.items():
        if entry.state != "verified":
            for digest in _request_objects(entry.doc, graph):
                live.setdefault(digest, f"request {other} ({entry.state})")
    return live


def _request_objects(doc: Mapping[str, Any], graph: LineageGraph) -> set[str]:
    """What a request that is not finished may still read: its plan's checkpoints and its journaled objects."""
    digests: set[str] = set()
    for node_id in (doc.get("plan") or {}).get("server_models", []):
        if node_id in graph:
            node = graph.node(node_id)
            digests.update(d for d in (node.weights, node.retain_fisher) if d)
    fishers = doc.get("fishers") or {}
    digests.update((fishers.get("forget") or {}).values())
    digests.update(d for d in [fishers.get("retain")] if d)
    digests.update((doc.get("digests") or {}).values())
    return digests

"""The lineage DAG: which model versions exist, what each trained on, and who inherited from whom.

A **node** (:class:`ModelNode`) is one model version: a ``global`` model (server, per round and shard), a
``local`` model (client k's update in round t) or a ``derived`` model (one a client built later from a global
model: fine-tuning, transfer or incremental learning). It records the data it trained on *directly*
(:class:`TrainingData`; ``None`` for pure aggregates such as a FedAvg global model) and store digests of its
weights and retain-Fisher. An **edge** parent -> child means the child was initialised from (an aggregate of)
its parents.

For an unlearning request, the **roots** are the nodes that trained directly on the data to forget, and the
**affected** nodes are the roots and all their descendants; every other node is untouched.

Invariants (checked on every change, and again when a journal is replayed):

- **Append-only.** Nodes and edges are never removed; a node's structure (id, kind, round, shard, owner, seq)
  never changes. References that arrive later (weights, retain-Fisher, training data) may be set once
  (:meth:`LineageGraph.update_node`); an unlearned model is a *new* node, not an edit.
- **Chronological.** Every node gets a sequence number ``seq`` from the graph, strictly increasing in the order
  nodes were added, and every edge points from a lower ``seq`` to a higher one.
- **Acyclic.** Follows from chronology; an edge that would close a cycle is refused with a ``LineageError``.
- **Check, then act.** A refused change leaves the graph (and its journal) exactly as it was.

Durability: with a directory, each change is appended to ``journal.jsonl`` (one JSON line, flushed and fsynced)
*before* it is applied in memory. :meth:`LineageGraph.snapshot` writes ``snapshot.json`` atomically and then
empties the journal; every journal line carries a log sequence number (``lsn``) and the snapshot records the
last one it covers, so a crash between the two steps replays nothing twice. :meth:`LineageGraph.load` reads the
snapshot and replays the journal; a torn last line (a crash mid-append) is dropped with a warning, any other
corrupt line is a ``LineageError``. One process writes a lineage directory at a time.

Examples
--------
>>> from fl_unlearn.requests import UnlearningRequest
>>> g = LineageGraph()
>>> _ = g.add_node("g0", "global", round=0)
>>> _ = g.add_node("c0r1", "local", round=1, parents=("g0",), owner="client:0",
...                data=TrainingData(client=0, class_histogram={1: 5, 7: 10}))
>>> _ = g.add_node("c1r1", "local", round=1, parents=("g0",), owner="client:1",
...                data=TrainingData(client=1, class_histogram={1: 8}))
>>> _ = g.add_node("g1", "global", round=1, parents=("c0r1", "c1r1"))
>>> g.affected(UnlearningRequest.for_classes([7]))
['c0r1', 'g1']
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np

from fl_unlearn.errors import LineageError, RequestError
from fl_unlearn.requests import FrozenMap, UnlearningRequest
from fl_unlearn.store import atomic_write, fsync_dir

if TYPE_CHECKING:
    from fl_unlearn.store import Store

__all__ = ["NODE_KINDS", "TrainingData", "ModelNode", "LineageGraph", "sample_digest", "sample_ids_reader"]

log = logging.getLogger(__name__)

NODE_KINDS = ("global", "local", "derived")
JOURNAL = "journal.jsonl"
SNAPSHOT = "snapshot.json"
_FORMAT = "fl_unlearn.lineage"
_VERSION = 1
_OWNER_RE = re.compile(r"server|client:(0|[1-9][0-9]*)")
_UPDATABLE = ("weights", "retain_fisher", "data", "meta")
_DECIMAL_RE = re.compile(r"0|[1-9][0-9]*")


# --------------------------------------------------------------------------------------------------
# small checks
# --------------------------------------------------------------------------------------------------


def _is_int(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _opt_str(value: Any, what: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise LineageError(f"{what} must be a non-empty string or None; got {value!r:.80}")
    return value


def _json_copy(obj: Any, what: str) -> Any:
    """A canonical JSON copy, so what is journaled equals what is kept (tuples -> lists, keys -> str)."""
    try:
        return json.loads(json.dumps(obj, allow_nan=False, sort_keys=True))
    except (TypeError, ValueError) as err:
        raise LineageError(f"{what} must be JSON-serialisable (no NaN): {err}") from err


def sample_digest(sample_ids: Iterable[int]) -> str:
    """sha256 hex of the sorted, unique sample ids as little-endian int64: a fingerprint of a data set.

    >>> sample_digest([3, 1, 2]) == sample_digest([1, 2, 3])
    True
    """
    ids = np.unique(np.asarray(list(sample_ids), dtype="<i8"))
    return hashlib.sha256(ids.tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# nodes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingData:
    """The data a model version trained on directly.

    Parameters
    ----------
    client : int | None
        Partition id of the client whose data it was (``None``: server-side or pooled data).
    class_histogram : Mapping[int, int]
        Class id -> number of samples; stored as a hashable :class:`~fl_unlearn.requests.FrozenMap`.
    slice_ids : tuple[int, ...] (default: ())
        SISA slices trained on (exact path).
    sample_digest : str | None (default: None)
        :func:`sample_digest` of the sample ids, to tell data sets apart without storing them.
    sample_ids_ref : str | None (default: None)
        Store digest of ``{"ids": int64 tensor}`` holding the sample ids, for sample-level membership.
    """

    client: int | None
    class_histogram: Mapping[int, int]
    slice_ids: tuple[int, ...] = ()
    sample_digest: str | None = None
    sample_ids_ref: str | None = None

    def __post_init__(self) -> None:
        if self.client is not None and not _is_int(self.client):
            raise LineageError(f"TrainingData.client must be a partition id (int >= 0) or None; got {self.client!r}")
        hist = self.class_histogram
        if not isinstance(hist, Mapping) or not all(_is_int(k) and _is_int(v) for k, v in hist.items()):
            raise LineageError(f"class_histogram must map class ids (int >= 0) to counts (int >= 0); got {hist!r:.120}")
        if not isinstance(self.slice_ids, (tuple, list)) or not all(_is_int(s) for s in self.slice_ids):
            raise LineageError(f"slice_ids must be a tuple of ints >= 0; got {self.slice_ids!r:.80}")
        object.__setattr__(self, "class_histogram", FrozenMap(sorted(hist.items())))
        object.__setattr__(self, "slice_ids", tuple(self.slice_ids))
        _opt_str(self.sample_digest, "sample_digest")
        _opt_str(self.sample_ids_ref, "sample_ids_ref")

    @property
    def num_samples(self) -> int:
        """Total samples in the histogram."""
        return sum(self.class_histogram.values())

    @classmethod
    def from_samples(
        cls,
        client: int | None,
        labels: Iterable[int],
        sample_ids: Iterable[int],
        *,
        slice_ids: Iterable[int] = (),
        store: Store | None = None,
    ) -> TrainingData:
        """Describe a data set by its labels and sample ids; with a store, keep the ids for membership tests."""
        import torch  # local: only this helper needs it

        ids = np.unique(np.asarray(list(sample_ids), dtype=np.int64))
        hist = Counter(int(y) for y in labels)
        ref = None
        if store is not None:
            ref = store.put({"ids": torch.from_numpy(ids)}, meta={"what": "sample-ids", "client": client})
        return cls(client, dict(hist), tuple(slice_ids), sample_digest(ids.tolist()), ref)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (histogram keys become strings)."""
        return {
            "client": self.client,
            "class_histogram": {str(k): v for k, v in self.class_histogram.items()},
            "slice_ids": list(self.slice_ids),
            "sample_digest": self.sample_digest,
            "sample_ids_ref": self.sample_ids_ref,
        }

    @classmethod
    def from_dict(cls, obj: Any) -> TrainingData:
        """Inverse of :meth:`to_dict`; ``LineageError`` on a malformed dict."""
        _check_keys(obj, {"client", "class_histogram", "slice_ids", "sample_digest", "sample_ids_ref"}, "data")
        hist = obj["class_histogram"]
        if not isinstance(hist, dict) or not all(isinstance(k, str) and _DECIMAL_RE.fullmatch(k) for k in hist):
            raise LineageError(f"data.class_histogram must have decimal string keys; got {hist!r:.120}")
        slices = obj["slice_ids"]
        if not isinstance(slices, list):
            raise LineageError(f"data.slice_ids must be a list; got {slices!r:.80}")
        hist = {int(k): v for k, v in hist.items()}
        return cls(obj["client"], hist, tuple(slices), obj["sample_digest"], obj["sample_ids_ref"])


def _check_keys(obj: Any, keys: set[str], what: str) -> None:
    if not isinstance(obj, dict) or set(obj) != keys:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise LineageError(f"malformed {what}: expected keys {sorted(keys)}, got {got}")


@dataclass(frozen=True)
class ModelNode:
    """One model version in the lineage. Created by :meth:`LineageGraph.add_node`, never edited in place.

    Parameters
    ----------
    id : str
        Unique node id.
    kind : str
        ``"global"``, ``"local"`` or ``"derived"``.
    round : int | None
        Federated round (or SISA stage) that produced it.
    shard : int (default: 0)
        SISA shard (0 without sharding).
    owner : str (default: "server")
        Who holds the model: ``"server"`` or ``"client:<partition id>"``.
    parents : tuple[str, ...] (default: ())
        Nodes it was initialised from.
    seq : int (default: 0)
        Chronological sequence number, assigned by the graph.
    data : TrainingData | None (default: None)
        Data it trained on directly; ``None`` for pure aggregates.
    weights, retain_fisher : str | None (default: None)
        Store digests of its weights and of its retain-Fisher diagonal.
    request_id : str | None (default: None)
        The unlearning request that produced this version, if any.
    meta : Mapping[str, Any] (default: {})
        Free-form JSON metadata, kept as a read-only :class:`~fl_unlearn.requests.FrozenMap` in canonical
        JSON form (tuples become lists); not part of the hash.
    """

    id: str
    kind: str
    round: int | None
    shard: int = 0
    owner: str = "server"
    parents: tuple[str, ...] = ()
    seq: int = 0
    data: TrainingData | None = None
    weights: str | None = None
    retain_fisher: str | None = None
    request_id: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise LineageError(f"node id must be a non-empty string; got {self.id!r:.80}")
        if self.kind not in NODE_KINDS:
            raise LineageError(f"node {self.id!r}: unknown kind {self.kind!r:.40}; expected one of {NODE_KINDS}")
        if self.round is not None and not _is_int(self.round):
            raise LineageError(f"node {self.id!r}: round must be an int >= 0 or None; got {self.round!r:.40}")
        if not _is_int(self.shard) or not _is_int(self.seq):
            raise LineageError(f"node {self.id!r}: shard and seq must be ints >= 0; got {self.shard!r}, {self.seq!r}")
        if not isinstance(self.owner, str) or not _OWNER_RE.fullmatch(self.owner):
            raise LineageError(f"node {self.id!r}: owner must be 'server' or 'client:<id>'; got {self.owner!r:.40}")
        if isinstance(self.parents, str) or not all(isinstance(p, str) for p in self.parents):
            raise LineageError(f"node {self.id!r}: parents must be a tuple of node ids; got {self.parents!r:.80}")
        if self.data is not None and not isinstance(self.data, TrainingData):
            raise LineageError(f"node {self.id!r}: data must be TrainingData or None; got {type(self.data).__name__}")
        for name in ("weights", "retain_fisher", "request_id"):
            _opt_str(getattr(self, name), f"node {self.id!r}: {name}")
        if not isinstance(self.meta, Mapping):
            raise LineageError(f"node {self.id!r}: meta must be a dict; got {type(self.meta).__name__}")
        object.__setattr__(self, "parents", tuple(self.parents))
        # A read-only copy in canonical JSON form, so what is journaled is what is kept.
        object.__setattr__(self, "meta", FrozenMap(_json_copy(dict(self.meta), f"node {self.id!r}: meta")))

    @property
    def client(self) -> int | None:
        """The partition id of the owning client, or ``None`` for server-held models."""
        return int(self.owner.split(":", 1)[1]) if self.owner.startswith("client:") else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["parents"] = list(self.parents)
        out["data"] = None if self.data is None else self.data.to_dict()
        out["meta"] = dict(self.meta)
        return out

    @classmethod
    def from_dict(cls, obj: Any) -> ModelNode:
        """Inverse of :meth:`to_dict`; ``LineageError`` on a malformed dict."""
        _check_keys(obj, {f.name for f in dataclasses.fields(cls)}, "node")
        if not isinstance(obj["parents"], list):
            raise LineageError(f"malformed node {obj['id']!r:.80}: parents must be a list")
        data = None if obj["data"] is None else TrainingData.from_dict(obj["data"])
        return cls(**{**obj, "parents": tuple(obj["parents"]), "data": data})


def sample_ids_reader(store: Store) -> Callable[[ModelNode], set[int] | None]:
    """A ``sample_ids_of`` callback for :meth:`LineageGraph.roots` that reads ``data.sample_ids_ref``.

    Returns ``None`` (meaning "unknown", treated conservatively as trained on the samples) for nodes without
    a reference.
    """

    def sample_ids_of(node: ModelNode) -> set[int] | None:
        if node.data is None or node.data.sample_ids_ref is None:
            return None
        return set(store.get(node.data.sample_ids_ref)["ids"].tolist())

    return sample_ids_of


# --------------------------------------------------------------------------------------------------
# the graph
# --------------------------------------------------------------------------------------------------


class LineageGraph:
    """The chronological DAG of model versions, optionally journaled to a directory.

    Parameters
    ----------
    directory : str | pathlib.Path | None (default: None)
        Where to keep ``journal.jsonl`` and ``snapshot.json``; ``None`` keeps the graph in memory only. A
        directory that already holds a lineage is refused: use :meth:`load` (or :meth:`open`).

    Raises
    ------
    LineageError
        ``directory`` already holds a lineage.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self._reset(directory)
        if self.directory is not None:
            if _holds_lineage(self.directory):
                raise LineageError(
                    f"{str(self.directory)!r} already holds a lineage; use LineageGraph.load() to continue it"
                )
            self.directory.mkdir(parents=True, exist_ok=True)

    def _reset(self, directory: str | Path | None) -> None:
        self._g = nx.DiGraph()
        self._next_seq = 0  # seq of the next node
        self._lsn = 0  # log sequence number of the last journaled change
        self.directory = None if directory is None else Path(directory)

    # -- reading ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._g.number_of_nodes()

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._g

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LineageGraph):
            return NotImplemented
        return self.nodes() == other.nodes()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        where = f", directory={str(self.directory)!r}" if self.directory else ""
        return f"LineageGraph({len(self)} nodes, {self._g.number_of_edges()} edges{where})"

    def node(self, node_id: str) -> ModelNode:
        """The node with id ``node_id``; ``LineageError`` if there is none."""
        try:
            return self._g.nodes[node_id]["node"]
        except (KeyError, TypeError):
            raise LineageError(f"unknown node {node_id!r:.80}") from None

    def nodes(self) -> list[ModelNode]:
        """All nodes in chronological order (by ``seq``)."""
        # networkx keeps insertion order, and nodes are inserted in seq order.
        return [data["node"] for _, data in self._g.nodes(data=True)]

    def _by_seq(self, ids: Iterable[str]) -> list[str]:
        return sorted(ids, key=lambda i: self._g.nodes[i]["node"].seq)

    def parents(self, node_id: str) -> list[str]:
        """Direct parents of ``node_id``, in the order recorded."""
        return list(self.node(node_id).parents)

    def children(self, node_id: str) -> list[str]:
        """Direct children of ``node_id``, chronologically."""
        self.node(node_id)
        return self._by_seq(self._g.successors(node_id))

    def descendants(self, node_id: str) -> list[str]:
        """Every node reachable from ``node_id`` (excluding it), chronologically."""
        self.node(node_id)
        return self._by_seq(nx.descendants(self._g, node_id))

    def ancestors(self, node_id: str) -> list[str]:
        """Every node ``node_id`` is reachable from (excluding it), chronologically."""
        self.node(node_id)
        return self._by_seq(nx.ancestors(self._g, node_id))

    def with_descendants(self, node_ids: Iterable[str]) -> list[str]:
        """``node_ids`` and all their descendants, chronologically (each node once)."""
        out: set[str] = set()
        for node_id in self._by_seq({self.node(i).id for i in node_ids}):
            if node_id not in out:  # already reached: its descendants are in too
                out.add(node_id)
                out |= nx.descendants(self._g, node_id)
        return self._by_seq(out)

    # -- requests -----------------------------------------------------------------------------------

    def roots(
        self, request: UnlearningRequest, *, sample_ids_of: Callable[[ModelNode], set[int] | None] | None = None
    ) -> list[str]:
        """The nodes that trained directly on the data ``request`` forgets, chronologically.

        Parameters
        ----------
        request : UnlearningRequest
            ``classes``: nodes whose class histogram counts any forget class; ``client``: nodes whose data came
            from one of the clients; ``samples``: nodes with data of a listed client whose samples intersect the
            listed ids.
        sample_ids_of : callable | None (default: None)
            ``node -> set of sample ids`` (e.g. :func:`sample_ids_reader`). Without it, or where it returns
            ``None``, every node trained on a listed client's data counts (the safe side).

        Examples
        --------
        >>> from fl_unlearn.requests import UnlearningRequest
        >>> g = LineageGraph()
        >>> _ = g.add_node("a", "local", round=1, owner="client:3", data=TrainingData(3, {0: 4}))
        >>> _ = g.add_node("b", "derived", round=None, parents=("a",), data=TrainingData(None, {7: 2}))
        >>> g.roots(UnlearningRequest.for_classes([7])), g.roots(UnlearningRequest.for_clients([3]))
        (['b'], ['a'])
        """
        match = _matcher(request, sample_ids_of)
        return [n.id for n in self.nodes() if n.data is not None and match(n)]

    def affected(
        self, request: UnlearningRequest, *, sample_ids_of: Callable[[ModelNode], set[int] | None] | None = None,
        skip_superseded: bool = False,
    ) -> list[str]:
        """The roots of ``request`` and all their descendants, chronologically; all other nodes are untouched.

        With ``skip_superseded``, models a later version replaced (:meth:`superseded`) are left out: a second
        request unlearns the versions the first one left, not again the models they replaced (each of which would
        get one more version: the affected set would double with every request).

        Examples
        --------
        >>> from fl_unlearn.requests import UnlearningRequest
        >>> g = LineageGraph()
        >>> _ = g.add_node("a", "local", round=1, owner="client:3", data=TrainingData(3, {0: 4}))
        >>> _ = g.add_node("g", "global", round=1, parents=("a",))
        >>> _ = g.add_node("x", "global", round=0)
        >>> g.affected(UnlearningRequest.for_clients([3]))
        ['a', 'g']
        >>> _ = g.add_node("g~u1", "global", round=1, parents=("g",), request_id="r1", meta={"unlearned-from": "g"})
        >>> g.affected(UnlearningRequest.for_clients([3])), g.affected(UnlearningRequest.for_clients([3]),
        ...                                                             skip_superseded=True)
        (['a', 'g', 'g~u1'], ['a', 'g~u1'])
        """
        affected = self.with_descendants(self.roots(request, sample_ids_of=sample_ids_of))
        if not skip_superseded:
            return affected
        replaced = self.superseded()
        return [n for n in affected if n not in replaced]

    #: Node metadata naming the model a node replaces: an unlearned version's original, a repair's version.
    REPLACES_KEYS = ("unlearned-from", "repair-of")

    def superseded(self) -> set[str]:
        """The models a later version replaced: each unlearned version's original (``meta["unlearned-from"]``)
        and each repaired model's unrepaired version (``meta["repair-of"]``). They stay in the graph as the record of
        what was there before; nothing serves or trains from them, and once their request is verified
        :func:`fl_unlearn.erasure.erase_superseded` may erase their weights.
        A leaf of the lineage that nothing replaced is never superseded."""
        return {str(n.meta[key]) for n in self.nodes() for key in self.REPLACES_KEYS if n.meta.get(key)}

    # -- changing -----------------------------------------------------------------------------------

    def add_node(
        self,
        id: str,  # noqa: A002  (the agreed API name)
        kind: str,
        *,
        parents: Iterable[str] = (),
        round: int | None = None,  # noqa: A002
        shard: int = 0,
        owner: str = "server",
        data: TrainingData | None = None,
        weights: str | None = None,
        retain_fisher: str | None = None,
        request_id: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> ModelNode:
        """Add a model version; it gets the next ``seq``. Journaled before it is applied.

        Raises
        ------
        LineageError
            A bad field, a duplicate id, an unknown or repeated parent, a node listed as its own parent.
            The graph is unchanged.
        """
        if isinstance(parents, str):
            raise LineageError(f"parents of {id!r} must be a sequence of node ids, not the string {parents!r}")
        node = ModelNode(
            id, kind, round, shard, owner, tuple(parents), self._next_seq, data, weights, retain_fisher,
            request_id, meta or {},
        )  # fmt: skip
        self._check_new_node(node)
        self._log({"op": "add", "node": node.to_dict()})
        self._insert(node)
        return node

    def _check_new_node(self, node: ModelNode) -> None:
        if node.id in self._g:
            raise LineageError(f"duplicate node id {node.id!r}; node ids are unique and nodes are never replaced")
        if node.id in node.parents:
            raise LineageError(f"node {node.id!r} lists itself as a parent; that edge would make a cycle")
        repeated = sorted(p for p, n in Counter(node.parents).items() if n > 1)
        if repeated:
            raise LineageError(f"node {node.id!r} lists parents {repeated} more than once")
        unknown = [p for p in node.parents if p not in self._g]
        if unknown:
            raise LineageError(f"node {node.id!r} has unknown parents {unknown}; add parents before children")
        if node.seq < self._next_seq:
            raise LineageError(f"node {node.id!r} has seq {node.seq}, but seq {self._next_seq} is next (chronology)")

    def _insert(self, node: ModelNode) -> None:
        self._g.add_node(node.id, node=node)
        self._g.add_edges_from((p, node.id) for p in node.parents)
        self._next_seq = node.seq + 1

    def add_edge(self, parent: str, child: str) -> ModelNode:
        """Record that ``child`` also inherits from ``parent`` (lineage learned late). Returns the new child.

        Raises
        ------
        LineageError
            Unknown nodes, an existing edge, or an edge against chronology (``parent`` newer than ``child``),
            which includes every edge that would make a cycle. The graph is unchanged.
        """
        self._check_edge(parent, child)
        self._log({"op": "edge", "parent": parent, "child": child})
        return self._insert_edge(parent, child)

    def _check_edge(self, parent: str, child: str) -> None:
        p, c = self.node(parent), self.node(child)
        if parent == child or nx.has_path(self._g, child, parent):
            raise LineageError(f"edge {parent!r} -> {child!r} would make a cycle")
        if self._g.has_edge(parent, child):
            raise LineageError(f"edge {parent!r} -> {child!r} already exists")
        if p.seq >= c.seq:
            raise LineageError(
                f"edge {parent!r} (seq {p.seq}) -> {child!r} (seq {c.seq}) points back in time; "
                "a child must be newer than its parents"
            )

    def _insert_edge(self, parent: str, child: str) -> ModelNode:
        node = dataclasses.replace(self.node(child), parents=(*self.node(child).parents, parent))
        self._g.add_edge(parent, child)
        self._g.nodes[child]["node"] = node
        return node

    def update_node(self, node_id: str, **fields: Any) -> ModelNode:
        """Fill in references that arrive later: ``weights``, ``retain_fisher``, ``data`` (each once), ``meta``
        (merged key by key). Setting a reference to the value it already has is a no-op. Journaled.

        Raises
        ------
        LineageError
            Unknown node or field, or a reference that is already set to another value (record a new node
            for a new version instead). The graph is unchanged.
        """
        new = self._updated(self.node(node_id), fields)
        if new == self.node(node_id):  # nothing new (e.g. a retried update after a crash)
            return new
        self._log({"op": "update", "id": node_id, "fields": _fields_to_json(fields)})
        self._g.nodes[node_id]["node"] = new
        return new

    def _updated(self, node: ModelNode, fields: Mapping[str, Any]) -> ModelNode:
        unknown = sorted(set(fields) - set(_UPDATABLE))
        if unknown:
            raise LineageError(f"cannot update {unknown} of node {node.id!r}; updatable fields: {list(_UPDATABLE)}")
        changes = dict(fields)
        for name in ("weights", "retain_fisher", "data"):
            old = getattr(node, name)
            if name in changes and old is not None and changes[name] != old:
                raise LineageError(
                    f"node {node.id!r} already has {name} {old!r:.80}; a new version is a new node, not an edit"
                )
        if "meta" in changes:
            if not isinstance(changes["meta"], Mapping):
                raise LineageError(f"meta of node {node.id!r} must be a dict; got {type(changes['meta']).__name__}")
            changes["meta"] = {**node.meta, **changes["meta"]}
        return dataclasses.replace(node, **changes)

    # -- journal ------------------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        """Append one change to the journal (flush + fsync) before it is applied in memory.

        An ``OSError`` (disk full, ...) propagates with the journal cut back to where it was, so the graph,
        which has not applied the change yet, and its journal still agree.
        """
        lsn = self._lsn + 1
        if self.directory is not None:
            line = json.dumps({"lsn": lsn, **record}, sort_keys=True, allow_nan=False) + "\n"
            _append_line(self.directory / JOURNAL, line.encode("utf-8"))
        self._lsn = lsn

    def _replay(self, record: Any) -> None:
        """Check and apply one journal record (the same checks as the live change)."""
        if not isinstance(record, dict) or record.get("op") not in ("add", "edge", "update"):
            raise LineageError(f"unknown journal record {record!r:.120}")
        if record["op"] == "add":
            _check_keys(record, {"lsn", "op", "node"}, "journal record")
            node = ModelNode.from_dict(record["node"])
            self._check_new_node(node)
            self._insert(node)
        elif record["op"] == "edge":
            _check_keys(record, {"lsn", "op", "parent", "child"}, "journal record")
            self._check_edge(record["parent"], record["child"])
            self._insert_edge(record["parent"], record["child"])
        else:
            _check_keys(record, {"lsn", "op", "id", "fields"}, "journal record")
            fields = _fields_from_json(record["fields"])
            self._g.nodes[record["id"]]["node"] = self._updated(self.node(record["id"]), fields)
        self._lsn = record["lsn"]

    def snapshot(self) -> Path:
        """Write ``snapshot.json`` atomically, then empty the journal. Returns the snapshot path.

        Raises
        ------
        LineageError
            The graph has no directory.
        """
        if self.directory is None:
            raise LineageError("snapshot() needs a directory; create the graph with LineageGraph(directory)")
        path = self.directory / SNAPSHOT
        atomic_write(path, self.to_json().encode("utf-8"))
        # A crash here leaves journal lines the snapshot covers; load() skips them by lsn.
        atomic_write(self.directory / JOURNAL, b"")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> LineageGraph:
        """Load the lineage kept in ``directory`` (snapshot + journal); later changes append to it.

        Raises
        ------
        LineageError
            No lineage there, a corrupt snapshot, or a corrupt journal line other than a torn last one.
        """
        directory = Path(directory)
        if not _holds_lineage(directory):
            raise LineageError(f"no lineage in {str(directory)!r}: neither {SNAPSHOT} nor a non-empty {JOURNAL}")
        graph = cls.__new__(cls)
        graph._reset(directory)
        if (directory / SNAPSHOT).exists():
            graph._load_state(_read_text(directory / SNAPSHOT), f"snapshot {str(directory / SNAPSHOT)!r}")
        graph._replay_journal(directory / JOURNAL)
        return graph

    @classmethod
    def open(cls, directory: str | Path) -> LineageGraph:
        """:meth:`load` the lineage in ``directory`` if there is one, else start an empty one there."""
        return cls.load(directory) if _holds_lineage(Path(directory)) else cls(directory)

    def _replay_journal(self, path: Path) -> None:
        if not path.exists():
            return
        raw = path.read_bytes()
        lines = raw.split(b"\n")
        offset = 0
        last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        for i, line in enumerate(lines):
            start, offset = offset, offset + len(line) + 1
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
                if i == last:
                    self._drop_torn_tail(path, start, err)
                    return
                raise LineageError(f"journal {str(path)!r} line {i + 1} is corrupt: {err}") from err
            self._replay_line(record, path, i + 1)
        if raw and not raw.endswith(b"\n"):  # complete last record without its newline: finish it
            with open(path, "ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())

    def _replay_line(self, record: Any, path: Path, lineno: int) -> None:
        lsn = record.get("lsn") if isinstance(record, dict) else None
        if not _is_int(lsn, 1):
            raise LineageError(f"journal {str(path)!r} line {lineno}: no valid lsn in {record!r:.120}")
        if lsn <= self._lsn:
            return  # already in the snapshot (crash between snapshot and truncation)
        if lsn != self._lsn + 1:
            raise LineageError(
                f"journal {str(path)!r} line {lineno}: lsn {lsn} follows {self._lsn}; changes are missing"
            )
        try:
            self._replay(record)
        except LineageError as err:
            raise LineageError(f"journal {str(path)!r} line {lineno}: {err}") from err

    def _drop_torn_tail(self, path: Path, start: int, err: Exception) -> None:
        """A crash mid-append leaves a partial last line: drop it, so the next append starts clean."""
        warnings.warn(
            f"lineage journal {str(path)!r}: ignoring a torn last line ({err}); the change it held was never applied",
            RuntimeWarning,
            stacklevel=3,
        )
        log.warning("lineage: dropped a torn last journal line in %s", path)
        os.truncate(path, start)

    # -- JSON ---------------------------------------------------------------------------------------

    def to_json(self) -> str:
        """The whole graph as JSON text (the snapshot format)."""
        state = {
            "format": _FORMAT,
            "version": _VERSION,
            "lsn": self._lsn,
            "next_seq": self._next_seq,
            "nodes": [n.to_dict() for n in self.nodes()],
        }
        return json.dumps(state, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> LineageGraph:
        """An in-memory graph from :meth:`to_json` text; ``LineageError`` if malformed."""
        graph = cls()
        graph._load_state(text, "lineage JSON")
        return graph

    def _load_state(self, text: str, what: str) -> None:
        try:
            state = json.loads(text)
        except (ValueError, RecursionError) as err:
            raise LineageError(f"{what} is corrupt: {err}") from err
        _check_keys(state, {"format", "version", "lsn", "next_seq", "nodes"}, what)
        if state["format"] != _FORMAT or state["version"] != _VERSION:
            raise LineageError(f"{what}: unsupported format {state['format']!r} version {state['version']!r}")
        if not isinstance(state["nodes"], list) or not _is_int(state["lsn"]) or not _is_int(state["next_seq"]):
            raise LineageError(f"{what}: malformed nodes, lsn or next_seq")
        for obj in state["nodes"]:
            node = ModelNode.from_dict(obj)
            self._check_new_node(node)
            self._insert(node)
        if state["next_seq"] < self._next_seq:
            raise LineageError(f"{what}: next_seq {state['next_seq']} is behind its nodes ({self._next_seq})")
        self._next_seq, self._lsn = state["next_seq"], state["lsn"]

    # -- picture ------------------------------------------------------------------------------------

    def render_png(self, path: str | Path, highlight: Iterable[str] = (), *, title: str | None = None) -> Path:
        """Draw the lineage: chronology on x, owner lanes on y, ``highlight`` (e.g. affected) in red.

        Uses matplotlib's Agg canvas directly (no pyplot state, no display). Readable up to about 100 nodes.

        Raises
        ------
        LineageError
            A highlighted id is not in the graph.
        """
        marked = set(highlight)
        unknown = sorted(marked - set(self._g))
        if unknown:
            raise LineageError(f"cannot highlight unknown nodes {unknown[:10]}")
        path = Path(path)
        _render(self.nodes(), list(self._g.edges()), marked, path, title)
        return path


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _matcher(
    request: UnlearningRequest, sample_ids_of: Callable[[ModelNode], set[int] | None] | None
) -> Callable[[ModelNode], bool]:
    """``node -> bool``: did this node train directly on data the request forgets? (``node.data`` is set.)"""
    kind = getattr(request, "kind", None)
    if kind == "classes":
        classes = set(request.classes)
        return lambda n: any(n.data.class_histogram.get(c, 0) > 0 for c in classes)
    if kind == "client":
        clients = set(request.clients)
        return lambda n: n.data.client in clients
    if kind == "samples":
        wanted = {c: set(ids) for c, ids in request.samples.items()}

        def trained_on_samples(n: ModelNode) -> bool:
            if n.data.client not in wanted:
                return False
            ids = sample_ids_of(n) if sample_ids_of is not None else None
            return ids is None or not wanted[n.data.client].isdisjoint(ids)

        return trained_on_samples
    raise RequestError(f"cannot find roots for a request of kind {kind!r}; expected an UnlearningRequest")


def _fields_to_json(fields: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(fields)
    if out.get("data") is not None:
        out["data"] = out["data"].to_dict()
    if "meta" in out:
        out["meta"] = _json_copy(dict(out["meta"]), "meta")
    return out


def _fields_from_json(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise LineageError(f"malformed update fields {obj!r:.120}")
    out = dict(obj)
    if out.get("data") is not None:
        out["data"] = TrainingData.from_dict(out["data"])
    return out


def _append_line(path: Path, line: bytes) -> None:
    new_file = not path.exists()
    size = 0 if new_file else path.stat().st_size
    with open(path, "ab") as f:
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            f.truncate(size)  # never leave half a record in front of the next one
            raise
    if new_file:
        fsync_dir(path.parent)


def _holds_lineage(directory: Path) -> bool:
    journal = directory / JOURNAL
    return (directory / SNAPSHOT).exists() or (journal.exists() and journal.stat().st_size > 0)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError) as err:
        raise LineageError(f"cannot read {str(path)!r}: {err}") from err


# --------------------------------------------------------------------------------------------------
# drawing (matplotlib is imported only here)
# --------------------------------------------------------------------------------------------------

_KIND_STYLE = {"global": ("s", "#4c72b0"), "local": ("o", "#55a868"), "derived": ("^", "#8172b2")}
_RED = "#d62728"


def _lanes(nodes: list[ModelNode]) -> dict[str, int]:
    """Owner -> y position: the server on top, then clients by partition id."""
    owners = {n.owner for n in nodes}
    ordered = sorted(owners, key=lambda o: (o != "server", int(o.split(":")[1]) if ":" in o else -1))
    return {owner: -i for i, owner in enumerate(ordered)}


def _columns(nodes: list[ModelNode]) -> dict[str, float]:
    """x = inheritance depth (longest path from a source), so every edge points right and a FedAvg round
    reads as a fan-out (global -> locals) then a fan-in (locals -> next global). Nodes sharing a depth and
    an owner are spread a little within their column instead of drawn on top of each other."""
    depth: dict[str, int] = {}
    for n in nodes:  # seq order is a topological order
        depth[n.id] = 1 + max((depth[p] for p in n.parents), default=-1)
    cells: dict[tuple[int, str], list[str]] = {}
    for n in nodes:
        cells.setdefault((depth[n.id], n.owner), []).append(n.id)
    x: dict[str, float] = {}
    for (d, _), ids in cells.items():
        width = min(0.7, 0.25 * (len(ids) - 1))
        for k, node_id in enumerate(ids):
            x[node_id] = d + (width * k / (len(ids) - 1) - width / 2 if len(ids) > 1 else 0.0)
    return x


def _render(
    nodes: list[ModelNode], edges: list[tuple[str, str]], marked: set[str], path: Path, title: str | None
) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.collections import LineCollection  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.lines import Line2D  # noqa: PLC0415

    lanes, xs = _lanes(nodes), _columns(nodes)
    pos = {n.id: (xs[n.id], lanes[n.owner]) for n in nodes}
    depth = max((round(x) for x in xs.values()), default=0)
    fig = Figure(figsize=(min(max(6.0, 2.5 + 0.45 * depth), 28.0), min(max(3.0, 1.6 + 0.5 * len(lanes)), 16.0)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    segments = [(pos[p], pos[c]) for p, c in edges]
    colours = [_RED if p in marked and c in marked else "#999999" for p, c in edges]
    ax.add_collection(LineCollection(segments, colors=colours, linewidths=0.7, alpha=0.6, zorder=1))
    for kind, (marker, colour) in _KIND_STYLE.items():
        group = [n for n in nodes if n.kind == kind]
        if group:
            gx, gy = zip(*(pos[n.id] for n in group))
            faces = [_RED if n.id in marked else colour for n in group]
            ax.scatter(gx, gy, marker=marker, c=faces, s=46, edgecolors="black", linewidths=0.4, zorder=2)
    if len(nodes) <= 40:  # ids stay legible only for small graphs
        for n in nodes:
            ax.annotate(n.id, pos[n.id], xytext=(3, 5), textcoords="offset points", fontsize=6, rotation=25)
    _axes_labels(ax, nodes, lanes, xs, title)
    handles = [Line2D([], [], ls="", marker=m, mfc=c, mec="black", label=k) for k, (m, c) in _KIND_STYLE.items()]
    handles.append(Line2D([], [], ls="", marker="o", mfc=_RED, mec="black", label=f"affected ({len(marked)})"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, format="png")


def _axes_labels(
    ax: Any, nodes: list[ModelNode], lanes: dict[str, int], xs: dict[str, float], title: str | None
) -> None:
    ax.set_yticks(list(lanes.values()), list(lanes))
    ax.set_ylim(min(lanes.values(), default=0) - 0.7, 0.9)
    # Label each column with the round(s) of its models, so depth reads as time.
    rounds: dict[int, set[Any]] = {}
    for n in nodes:
        rounds.setdefault(round(xs[n.id]), set()).add(n.round)
    cols = sorted(rounds)
    step = max(1, len(cols) // 30)
    labels = [_round_label(rounds[c]) for c in cols[::step]]
    ax.set_xticks(cols[::step], labels, fontsize=7)
    ax.set_xlim(-0.8, max(cols, default=0) + 0.8)
    ax.set_xlabel("inheritance depth (columns labelled with the rounds of their models)")
    ax.grid(axis="x", ls=":", lw=0.5)
    ax.set_title(title or f"lineage: {len(nodes)} models", fontsize=10)
    if not nodes:
        ax.text(0.5, 0.5, "empty lineage", transform=ax.transAxes, ha="center")


def _round_label(rounds: set[Any]) -> str:
    known = sorted(r for r in rounds if r is not None)
    if not known:
        return "-"
    return f"r{known[0]}" if len(known) == 1 else f"r{known[0]}-{known[-1]}"

"""Unlearning requests: what to forget, parsed and validated with clear errors.

A request names the data to forget in one of three ways:

- ``classes``: every sample of the given class ids, wherever it was trained on;
- ``client``: every sample of the given clients (partition ids);
- ``samples``: the given sample ids (the dataset's stable ``id`` column) of the given clients.

Two layers of checks, as in Opacus' ``ModuleValidator``:

1. *Structure* (:func:`parse_request`, and the dataclass itself): well-formed JSON, known kind, exactly the
   expected keys, non-negative integer ids (``bool`` is not an id), a non-empty forget set of at most
   :data:`MAX_IDS` ids. Duplicated ids are dropped and ids sorted, so equal forget sets compare equal.
2. *Meaning* (:func:`validate_request`): the ids exist in the dataset, the clients exist and hold those
   samples, and some model in the lineage trained on the data. Every problem is collected, then raised
   together as one :class:`~fl_unlearn.errors.RequestError` when ``strict``.

Nothing here raises anything but ``RequestError`` on bad input.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from fl_unlearn.errors import RequestError

__all__ = [
    "KINDS",
    "MAX_IDS",
    "FrozenMap",
    "UnlearningRequest",
    "parse_request",
    "parse_samples_file",
    "validate_request",
]

#: The request kinds, and the field each one fills.
KINDS: dict[str, str] = {"classes": "classes", "client": "clients", "samples": "samples"}
#: Most ids one request may name (classes + clients + samples), to bound memory and time.
MAX_IDS = 1_000_000
#: Largest request file read (a request at MAX_IDS ids is about 10 MB of JSON).
MAX_FILE_BYTES = 64 * 2**20
_INT64_MAX = 2**63 - 1
_ID_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")  # safe as a file name: no '/', no leading '.'
_CANONICAL_INT_RE = re.compile(r"0|[1-9][0-9]*")  # JSON object keys: "5", not "05", "+5" or " 5"

K = TypeVar("K")
V = TypeVar("V")


class FrozenMap(Mapping[K, V], Generic[K, V]):
    """An immutable, hashable mapping (values must be hashable), so frozen dataclasses stay hashable.

    Compares equal to a ``dict`` with the same items.

    Examples
    --------
    >>> m = FrozenMap({5: (1, 2)})
    >>> m[5], m == {5: (1, 2)}, hash(m) == hash(FrozenMap({5: (1, 2)}))
    ((1, 2), True, True)
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        self._data: dict[K, V] = dict(data)

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


# --------------------------------------------------------------------------------------------------
# formatting helpers (messages name the values)
# --------------------------------------------------------------------------------------------------


def _fmt_ids(ids: Iterable[Any], limit: int = 10) -> str:
    """``[1, 2, 3]``, or the first ``limit`` ids and how many more."""
    ids = list(ids)
    head = ", ".join(repr(i) for i in ids[:limit])
    more = f", ... (+{len(ids) - limit} more)" if len(ids) > limit else ""
    return f"[{head}{more}]"


def _fmt_ranges(ids: Iterable[int]) -> str:
    """Compress sorted ints to runs: ``0-9`` or ``0-4, 7, 9-11``; ``none`` when empty."""
    runs: list[list[int]] = []
    for i in sorted(set(ids)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    if not runs:
        return "none"
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + ("es" if word.endswith("s") else "s")


# --------------------------------------------------------------------------------------------------
# id normalisation (shared by the dataclass and the parser)
# --------------------------------------------------------------------------------------------------


def _is_id(value: Any) -> bool:
    """A non-negative int64 integer; bool is rejected although it is an ``int`` subclass."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return False
    return 0 <= int(value) <= _INT64_MAX


def _normalise_ids(values: Any, what: str) -> tuple[int, ...]:
    """Check a collection of ids and return it deduplicated and sorted."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise RequestError(f"{what} must be a list of integer ids; got {type(values).__name__} {values!r:.80}")
    values = list(values) if not isinstance(values, (list, tuple)) else values
    if len(values) > MAX_IDS:
        raise RequestError(f"{what} has {len(values)} ids, more than MAX_IDS={MAX_IDS}; split the request")
    bad = [v for v in values if not _is_id(v)]
    if bad:
        raise RequestError(
            f"{what} must hold non-negative integer ids (no bools, no floats, at most 2**63-1); "
            f"bad values: {_fmt_ids(bad)}"
        )
    return tuple(sorted({int(v) for v in values}))


def _partition_key(key: Any) -> int:
    """A partition id from a mapping key: an int, or a canonical decimal string as JSON keys are."""
    if isinstance(key, str) and _CANONICAL_INT_RE.fullmatch(key):
        key = int(key)
    if not _is_id(key):
        raise RequestError(
            f"samples keys must be partition ids (non-negative integers, or their decimal strings "
            f"such as '5'); got {key!r:.80}"
        )
    return int(key)


def _normalise_samples(samples: Any) -> FrozenMap[int, tuple[int, ...]]:
    """Check ``{partition id: sample ids}`` and return it with int keys and sorted unique ids."""
    if not isinstance(samples, Mapping):
        raise RequestError(
            f"samples must map partition ids to lists of sample ids, e.g. {{'5': [10, 11]}}; "
            f"got {type(samples).__name__}"
        )
    out: dict[int, tuple[int, ...]] = {}
    total = 0
    for key, ids in samples.items():
        client = _partition_key(key)
        if client in out:
            raise RequestError(f"samples lists partition {client} twice (keys {key!r} and {client!r} clash)")
        out[client] = _normalise_ids(ids, f"samples of client {client}")
        if not out[client]:
            raise RequestError(f"samples of client {client} is empty; drop the client or list its sample ids")
        total += len(out[client])
        if total > MAX_IDS:
            raise RequestError(f"samples hold more than MAX_IDS={MAX_IDS} ids; split the request")
    return FrozenMap(sorted(out.items()))


def _check_id(value: Any) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise RequestError(
            f"request id must be 1-128 characters of letters, digits, '_', '-', '.' (not starting with '.'); "
            f"got {value!r:.80}"
        )
    return value


def _check_created(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise RequestError(f"created must be a finite, non-negative timestamp (seconds); got {value!r:.80}")
    return float(value)


# --------------------------------------------------------------------------------------------------
# the request
# --------------------------------------------------------------------------------------------------


def _new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class UnlearningRequest:
    """One unlearning request. Immutable, hashable, checked on construction.

    Parameters
    ----------
    kind : str
        ``"classes"``, ``"client"`` or ``"samples"``; only the matching field below may be non-empty.
    classes : tuple[int, ...] (default: ())
        Class ids to forget (``kind="classes"``). Stored deduplicated and sorted.
    clients : tuple[int, ...] (default: ())
        Partition ids whose data to forget (``kind="client"``).
    samples : Mapping[int, tuple[int, ...]] (default: empty)
        Partition id -> sample ids to forget (``kind="samples"``); stored as a :class:`FrozenMap` with
        int keys in ascending order and sorted, unique ids.
    id : str (default: a uuid4 hex)
        Identifies the request in journals and lineage nodes; safe as a file name.
    created : float (default: ``time.time()``)
        When the request was made, in seconds since the epoch.

    Raises
    ------
    RequestError
        Unknown kind, a field that does not belong to the kind, bad or too many ids, an empty forget set.

    Examples
    --------
    >>> r = UnlearningRequest.for_classes([7, 3, 7])
    >>> r.kind, r.classes
    ('classes', (3, 7))
    >>> UnlearningRequest.from_json(r.to_json()) == r
    True
    """

    kind: str
    classes: tuple[int, ...] = ()
    clients: tuple[int, ...] = ()
    samples: Mapping[int, tuple[int, ...]] = field(default_factory=FrozenMap)
    id: str = field(default_factory=_new_id)
    created: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise RequestError(f"Unknown request kind {self.kind!r:.80}; expected one of {sorted(KINDS)}")
        # Normalise first, so the emptiness checks below see tuples.
        set_ = object.__setattr__  # frozen dataclass: normalise in place once, here
        set_(self, "classes", _normalise_ids(self.classes, "classes"))
        set_(self, "clients", _normalise_ids(self.clients, "clients"))
        set_(self, "samples", _normalise_samples(self.samples))
        set_(self, "id", _check_id(self.id))
        set_(self, "created", _check_created(self.created))
        self._check_fields_match_kind()

    def _check_fields_match_kind(self) -> None:
        own = KINDS[self.kind]
        for name in KINDS.values():
            if name != own and getattr(self, name):
                raise RequestError(f"a {self.kind!r} request must not set {name!r}; put the ids in {own!r}")
        if not getattr(self, own):
            raise RequestError(f"empty forget set: a {self.kind!r} request needs at least one id in {own!r}")
        if self.num_ids > MAX_IDS:
            raise RequestError(f"the request names {self.num_ids} ids, more than MAX_IDS={MAX_IDS}")

    # -- constructors -------------------------------------------------------------------------------

    @classmethod
    def for_classes(cls, classes: Iterable[int], **kw: Any) -> UnlearningRequest:
        """Forget every sample of ``classes``; ``kw`` may set ``id`` and ``created``."""
        return cls("classes", classes=_as_seq(classes), **kw)

    @classmethod
    def for_clients(cls, clients: Iterable[int], **kw: Any) -> UnlearningRequest:
        """Forget all data of the given partition ids."""
        return cls("client", clients=_as_seq(clients), **kw)

    @classmethod
    def for_samples(cls, mapping: Mapping[int, Iterable[int]], **kw: Any) -> UnlearningRequest:
        """Forget the listed sample ids, per partition id: ``{5: [10, 11], 7: [3]}``."""
        return cls("samples", samples=mapping, **kw)

    # -- views --------------------------------------------------------------------------------------

    @property
    def num_ids(self) -> int:
        """How many ids the forget set names (classes, clients or samples)."""
        return len(self.classes) + len(self.clients) + sum(len(v) for v in self.samples.values())

    def describe(self) -> str:
        """A short human-readable summary for logs: ``"forget classes [3, 7]"``."""
        if self.kind == "classes":
            return f"forget {_plural(len(self.classes), 'class')} {_fmt_ids(self.classes)}"
        if self.kind == "client":
            return f"forget {_plural(len(self.clients), 'client')} {_fmt_ids(self.clients)}"
        parts = ", ".join(f"client {c}: {len(ids)}" for c, ids in self.samples.items())
        return f"forget {self.num_ids} samples ({parts})"

    # -- JSON ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with only the keys :func:`parse_request` accepts for this kind."""
        own = KINDS[self.kind]
        value: Any = {str(c): list(ids) for c, ids in self.samples.items()} if own == "samples" else list(
            getattr(self, own)
        )
        return {"kind": self.kind, own: value, "id": self.id, "created": self.created}

    def to_json(self) -> str:
        """JSON text; ``UnlearningRequest.from_json(r.to_json()) == r``."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | Mapping[str, Any]) -> UnlearningRequest:
        """Parse JSON text (or an already decoded dict) strictly; see :func:`parse_request`."""
        if isinstance(text, Mapping):
            return _from_dict(text)
        if not isinstance(text, str):
            raise RequestError(f"from_json expects JSON text or a dict; got {type(text).__name__}")
        return _from_dict(_loads(text, "request JSON"))


def _as_seq(values: Any) -> Any:
    """Turn a one-shot iterable into a list so checks and storage see the same ids; leave bad input be."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        return values  # __post_init__ reports it with the value
    return list(values)


# --------------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------------


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json`` keeps the last of duplicated keys silently; a request with two 'kind's is ambiguous."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise RequestError(f"duplicate key {key!r} in a JSON object")
        out[key] = value
    return out


def _loads(text: str, what: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except RequestError:
        raise
    except json.JSONDecodeError as err:
        raise RequestError(f"malformed {what}: {err}") from err
    except (ValueError, RecursionError) as err:  # e.g. absurdly deep nesting
        raise RequestError(f"malformed {what}: {type(err).__name__}: {err}") from err


def _read_json_file(path: Path, what: str) -> Any:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise RequestError(f"{what} file {str(path)!r} is {size} bytes, more than {MAX_FILE_BYTES}")
        text = path.read_text(encoding="utf-8")
    except RequestError:
        raise
    except FileNotFoundError as err:
        raise RequestError(
            f"{what} file {str(path)!r} not found (pass a JSON object, JSON text or a path to a JSON file)"
        ) from err
    except (OSError, ValueError) as err:  # a directory, no permission, NUL in the name, not UTF-8
        raise RequestError(f"cannot read {what} file {str(path)!r:.200}: {err}") from err
    return _loads(text, f"{what} file {str(path)!r:.200}")


def _from_dict(obj: Mapping[Any, Any]) -> UnlearningRequest:
    """Check the keys of a decoded request exactly, then let the dataclass check the values."""
    bad_keys = [k for k in obj if not isinstance(k, str)]
    if bad_keys:
        raise RequestError(f"request keys must be strings; got {_fmt_ids(bad_keys)}")
    kind = obj.get("kind")
    if kind is None:
        raise RequestError(f"request has no 'kind'; expected one of {sorted(KINDS)}")
    if not isinstance(kind, str) or kind not in KINDS:
        raise RequestError(f"Unknown request kind {kind!r:.80}; expected one of {sorted(KINDS)}")
    own = KINDS[kind]
    if own not in obj:
        raise RequestError(f"a {kind!r} request needs the key {own!r}")
    extra = sorted(set(obj) - {"kind", own, "id", "created"})
    if extra:
        raise RequestError(
            f"unexpected keys {extra} in a {kind!r} request; allowed: 'kind', {own!r}, 'id', 'created'"
        )
    kw = {k: obj[k] for k in ("id", "created") if k in obj}
    if own == "samples":
        return UnlearningRequest(kind, samples=obj[own], **kw)
    return UnlearningRequest(kind, **{own: _as_seq(obj[own])}, **kw)


def parse_request(obj: UnlearningRequest | Mapping[str, Any] | str | Path) -> UnlearningRequest:
    """Parse a request from a dict, JSON text or a JSON file, checking its structure strictly.

    Parameters
    ----------
    obj : dict | str | pathlib.Path | UnlearningRequest
        A decoded JSON object; JSON text (a ``str`` starting with ``{``); otherwise a path to a JSON file.
        Formats: ``{"kind": "classes", "classes": [7]}``, ``{"kind": "client", "clients": [3]}``,
        ``{"kind": "samples", "samples": {"5": [10, 11]}}``; optional ``"id"`` and ``"created"``.

    Returns
    -------
    UnlearningRequest
        With ids deduplicated and sorted.

    Raises
    ------
    RequestError
        Malformed JSON, unknown kind, missing or extra keys, ids that are not non-negative integers,
        an empty forget set, more than :data:`MAX_IDS` ids. Never another exception type for bad input.

    Examples
    --------
    >>> parse_request('{"kind": "samples", "samples": {"5": [11, 10, 11]}}').samples
    FrozenMap({5: (10, 11)})
    """
    if isinstance(obj, UnlearningRequest):
        return obj
    if isinstance(obj, Mapping):
        return _from_dict(obj)
    if isinstance(obj, str) and obj.lstrip().startswith(("{", "[")):
        decoded = _loads(obj, "request JSON")
    elif isinstance(obj, (str, Path)):
        decoded = _read_json_file(Path(obj), "request")
    else:
        raise RequestError(
            f"a request must be a dict, JSON text or a path to a JSON file; got {type(obj).__name__}"
        )
    if not isinstance(decoded, dict):
        raise RequestError(f"a request must be a JSON object; got a JSON {type(decoded).__name__}")
    return _from_dict(decoded)


def parse_samples_file(path: str | Path) -> dict[int, tuple[int, ...]]:
    """Read ``{"<partition id>": [sample ids], ...}`` from a JSON file.

    Returns
    -------
    dict[int, tuple[int, ...]]
        Partition id -> sorted unique sample ids; pass it to :meth:`UnlearningRequest.for_samples`.

    Raises
    ------
    RequestError
        Unreadable file, malformed JSON, bad keys or ids, an empty mapping or an empty id list.
    """
    decoded = _read_json_file(Path(path), "samples")
    if not isinstance(decoded, dict):
        raise RequestError(f"a samples file must hold a JSON object {{partition id: [ids]}}; got {path!s:.200}")
    samples = dict(_normalise_samples(decoded))
    if not samples:
        raise RequestError(f"empty forget set: samples file {str(path)!r:.200} names no partition")
    return samples


# --------------------------------------------------------------------------------------------------
# validation against the dataset, the clients and the lineage
# --------------------------------------------------------------------------------------------------


def _check_classes(request: UnlearningRequest, num_classes: int | None) -> list[RequestError]:
    if num_classes is None or request.kind != "classes":
        return []
    unknown = [c for c in request.classes if c >= num_classes]
    if not unknown:
        return []
    return [
        RequestError(
            f"Unknown {_plural(len(unknown), 'class')} {_fmt_ids(unknown, 50)}; "
            f"the dataset has classes {_fmt_ranges(range(num_classes))}"
        )
    ]


def _request_clients(request: UnlearningRequest) -> tuple[int, ...]:
    return request.clients if request.kind == "client" else tuple(request.samples)


def _check_clients(request: UnlearningRequest, known_clients: Iterable[int] | None) -> list[RequestError]:
    if known_clients is None:
        return []
    known = set(known_clients)
    unknown = [c for c in _request_clients(request) if c not in known]
    if not unknown:
        return []
    return [
        RequestError(
            f"Unknown {_plural(len(unknown), 'client')} {_fmt_ids(unknown, 50)}; known clients: {_fmt_ranges(known)}"
        )
    ]


def _check_held_samples(
    request: UnlearningRequest, client_sample_ids: Mapping[int, set[int]] | None
) -> list[RequestError]:
    if client_sample_ids is None or request.kind != "samples":
        return []
    problems = []
    for client, ids in request.samples.items():
        held = client_sample_ids.get(client)
        if held is None:
            problems.append(RequestError(f"No sample ids known for client {client}; cannot check its samples"))
            continue
        missing = [i for i in ids if i not in held]
        if missing:
            problems.append(
                RequestError(
                    f"Client {client} does not hold samples {_fmt_ids(missing)} "
                    f"({len(missing)} of {len(ids)} requested)"
                )
            )
    return problems


def _trained_values(graph: Any, attr: str) -> set[int]:
    """Classes (``attr="classes"``) or clients the nodes of ``graph`` trained on directly."""
    seen: set[int] = set()
    for node in graph.nodes():
        data = node.data
        if data is None:
            continue
        if attr == "classes":
            seen.update(c for c, n in data.class_histogram.items() if n > 0)
        elif data.client is not None:
            seen.add(data.client)
    return seen


def _check_lineage(
    request: UnlearningRequest, graph: Any, sample_ids_of: Callable[[Any], set[int] | None] | None, skip: set[int]
) -> list[RequestError]:
    """Every forget id must have been trained on by some model, or the request unlearns nothing."""
    if graph is None:
        return []
    if len(graph) == 0:
        return [RequestError("The lineage is empty: no model trained on anything yet; nothing to unlearn")]
    if request.kind == "classes":
        seen = _trained_values(graph, "classes")
        unseen = [c for c in request.classes if c not in seen and c not in skip]
        what, known = "class", f"classes seen: {_fmt_ranges(seen)}"
    elif request.kind == "client":
        seen = _trained_values(graph, "clients")
        unseen = [c for c in request.clients if c not in seen and c not in skip]
        what, known = "client", f"clients seen: {_fmt_ranges(seen)}"
    else:
        unseen = [
            c
            for c, ids in request.samples.items()
            if c not in skip
            and not graph.roots(UnlearningRequest.for_samples({c: ids}, id=request.id), sample_ids_of=sample_ids_of)
        ]
        what, known = "the requested samples of client", "check the sample ids and the client"
    if not unseen:
        return []
    label = f"{_plural(len(unseen), what)} {_fmt_ids(unseen, 50)}" if len(unseen) > 1 else f"{what} {unseen[0]}"
    return [RequestError(f"No model in the lineage trained on {label} ({known}); nothing to unlearn there")]


def validate_request(
    request: UnlearningRequest,
    *,
    num_classes: int | None = None,
    known_clients: Iterable[int] | None = None,
    graph: Any = None,
    client_sample_ids: Mapping[int, set[int]] | None = None,
    sample_ids_of: Callable[[Any], set[int] | None] | None = None,
    strict: bool = True,
) -> list[RequestError]:
    """Check a request against the dataset, the clients and the lineage; collect every problem.

    Parameters
    ----------
    request : UnlearningRequest
        The parsed request.
    num_classes : int | None (default: None)
        Classes are ``0 .. num_classes-1``; unknown class ids are listed together. ``None`` skips the check.
    known_clients : Iterable[int] | None (default: None)
        Partition ids of the federation. ``None`` skips the check.
    graph : LineageGraph | None (default: None)
        Each forget class / client / client's samples must have been trained on by some node.
    client_sample_ids : dict[int, set[int]] | None (default: None)
        Sample ids each client holds, for ``samples`` requests.
    sample_ids_of : callable | None (default: None)
        Passed to ``graph.roots`` to resolve which samples a node trained on.
    strict : bool (default: True)
        Raise the problems together as one ``RequestError`` (its ``problems`` attribute lists them).

    Returns
    -------
    list[RequestError]
        The problems found (empty when the request is serviceable); returned only if not raised.

    Examples
    --------
    >>> r = UnlearningRequest.for_classes([3, 12, 15])
    >>> [str(e) for e in validate_request(r, num_classes=10, strict=False)]
    ['Unknown classes [12, 15]; the dataset has classes 0-9']
    """
    if not isinstance(request, UnlearningRequest):
        raise RequestError(f"validate_request expects an UnlearningRequest; got {type(request).__name__}")
    problems = _check_classes(request, num_classes)
    problems += _check_clients(request, known_clients)
    problems += _check_held_samples(request, client_sample_ids)
    # Ids already reported as unknown are not reported again as "never trained on".
    skip: set[int] = set()
    if num_classes is not None and request.kind == "classes":
        skip = {c for c in request.classes if c >= num_classes}
    if known_clients is not None and request.kind != "classes":
        skip |= set(_request_clients(request)) - set(known_clients)
    problems += _check_lineage(request, graph, sample_ids_of, skip)
    if strict and problems:
        raise _combine(request, problems)
    return problems


def _combine(request: UnlearningRequest, problems: list[RequestError]) -> RequestError:
    if len(problems) == 1:
        err = RequestError(str(problems[0]))
    else:
        lines = "\n".join(f"  - {p}" for p in problems)
        err = RequestError(f"{len(problems)} problems with request {request.id} ({request.describe()}):\n{lines}")
    err.problems = problems  # type: ignore[attr-defined]
    return err

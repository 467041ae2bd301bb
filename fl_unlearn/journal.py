"""The request journal: every unlearning request, and each step it reached, written before models change.

One append-only file, ``<store>/journal/requests.jsonl``, one JSON line per state change of a request::

    {"seq": 3, "request": "req-1a2b", "state": "dampened", "time": 1718000000.0,
     "doc": {...}, "prev": "<sha256 of entry 2>", "sha256": "<sha256 of this entry without this field>"}

``doc`` is cumulative: the latest entry of a request holds everything needed to resume it (the request, the
plan of models to change, the digests of the forget-Fishers and of every dampened model, what is still
missing). The states, in order (:data:`TRANSITIONS` lists the legal steps):

============================  ================================================================================
``received``                  the request and its plan (roots, affected, who holds each model); nothing changed
``fisher-collected``          the merged forget-Fishers are in the store (content-addressed), digests journaled
``dampened``                  every new version's weights are in the store and their digests journaled; the
                              lineage and refs are not switched yet
``applied``                   lineage nodes and refs point at the new versions
``verified``                  the new versions were re-read and checked; the request is done (exactly once)
``incomplete``                some models are not unlearned yet (``doc["missing"]``, ``doc["failures"]``); a
                              later run finishes only those
============================  ================================================================================

Guarantees:

- **Durable before acting.** :meth:`RequestJournal.append` returns after the line is fsynced.
- **Tamper-evident.** Each entry carries the sha256 of its own canonical JSON and of the entry before it, and
  sequence numbers run 1, 2, 3, ...; an edited, removed, reordered or inserted entry is a ``StoreError`` naming
  the line. A torn last line (a crash in the middle of an append) is skipped by readers and cut off, with a
  warning, by the next append: the state it would have recorded was never acted on.
- **Readers never write**, so the journal can be read while a request is applied; writers hold the store lock.
- **No pickle**: JSON only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_unlearn.errors import StoreError, UnlearnError
from fl_unlearn.store import fsync_dir

__all__ = ["STATES", "TRANSITIONS", "JournalEntry", "RequestJournal"]

log = logging.getLogger(__name__)

STATES = ("received", "fisher-collected", "dampened", "applied", "verified", "incomplete")
#: state -> the states that may follow it (``None``: a request not journaled yet).
TRANSITIONS: dict[str | None, tuple[str, ...]] = {
    None: ("received",),
    "received": ("fisher-collected", "incomplete"),
    "fisher-collected": ("dampened",),
    "dampened": ("applied",),
    "applied": ("verified", "incomplete"),
    "incomplete": ("fisher-collected", "dampened", "incomplete"),
    "verified": (),
}
FILE_NAME = "requests.jsonl"
_KEYS = {"seq", "request", "state", "time", "doc", "prev", "sha256"}


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, allow_nan=False, separators=(",", ":")).encode("utf-8")


def _checksum(fields: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in fields.items() if k != "sha256"})).hexdigest()


@dataclass(frozen=True)
class JournalEntry:
    """One journaled state change of a request.

    Attributes
    ----------
    seq : int
        Position in the journal (1, 2, ...).
    request : str
        The request id.
    state : str
        One of :data:`STATES`.
    time : float
        When it was written (seconds since the epoch).
    doc : dict
        Everything known about the request at this state (cumulative).
    sha256 : str
        Checksum of the entry (chained to the previous one).
    """

    seq: int
    request: str
    state: str
    time: float
    doc: dict[str, Any]
    sha256: str


class RequestJournal:
    """The append-only, checksummed journal of unlearning requests kept in ``directory``.

    Parameters
    ----------
    directory : str | pathlib.Path
        Where ``requests.jsonl`` lives (created if missing). Use :meth:`for_store` for the store's own.

    Examples
    --------
    >>> import tempfile
    >>> j = RequestJournal(tempfile.mkdtemp())
    >>> _ = j.append("r1", "received", {"plan": {}})
    >>> j.state("r1"), j.latest("r1").doc
    ('received', {'plan': {}})
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create journal directory {str(self.directory)!r}: {err}") from err
        self.path = self.directory / FILE_NAME

    @classmethod
    def for_store(cls, store: Any) -> RequestJournal:
        """The journal of a :class:`~fl_unlearn.store.Store` (``<root>/journal``)."""
        return cls(Path(store.root) / "journal")

    def __repr__(self) -> str:
        return f"RequestJournal({str(self.path)!r})"

    # -- reading ------------------------------------------------------------------------------------

    def entries(self) -> list[JournalEntry]:
        """Every entry, in order, after checking checksums, chain and sequence.

        Reading never writes, so it is safe while another process appends; a torn last line (a crash, or an
        append in progress) is skipped.

        Raises
        ------
        StoreError
            A line that is not valid JSON (other than a torn last line), a bad checksum, a broken chain or
            sequence: the journal was damaged or edited; restore it from a backup.
        """
        return self._read()[0]

    def _read(self) -> tuple[list[JournalEntry], int | None]:
        """``(entries, torn)``: ``torn`` is the offset of an unterminated last line, else ``None``."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return [], None
        except OSError as err:
            raise StoreError(f"cannot read request journal {str(self.path)!r}: {err}") from err
        lines = raw.split(b"\n")
        torn = None
        if not raw.endswith(b"\n") and lines[-1]:
            torn = len(raw) - len(lines[-1])
            lines = lines[:-1]
        out: list[JournalEntry] = []
        prev = ""
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            entry = self._parse(line, number, prev, len(out) + 1)
            out.append(entry)
            prev = entry.sha256
        return out, torn

    def _drop_torn_tail(self, start: int) -> None:
        """Writer only (under the store lock): a crash mid-append left a partial line; cut it off."""
        warnings.warn(f"request journal {str(self.path)!r}: dropping a torn last line (a crash mid-append); "
                      "the state it held was never acted on", RuntimeWarning, stacklevel=3)
        log.warning("journal: dropped a torn last line in %s", self.path)
        os.truncate(self.path, start)

    def _parse(self, line: bytes, number: int, prev: str, seq: int) -> JournalEntry:
        where = f"request journal {str(self.path)!r} line {number}"
        try:
            obj = json.loads(line.decode("utf-8"))
        except ValueError as err:
            raise StoreError(f"{where} is not valid JSON ({err}); the journal is corrupt or was edited") from err
        if not isinstance(obj, dict) or set(obj) != _KEYS:
            got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise StoreError(f"{where}: expected keys {sorted(_KEYS)}, got {got}; the journal was edited")
        if obj["sha256"] != _checksum(obj):
            raise StoreError(f"{where}: checksum mismatch; the entry was edited or damaged")
        if obj["prev"] != prev or obj["seq"] != seq:
            raise StoreError(f"{where}: entry {obj['seq']!r} does not follow entry {seq - 1} (broken chain); "
                             "entries were removed, reordered or inserted")
        if (obj["state"] not in STATES or not isinstance(obj["request"], str) or not isinstance(obj["doc"], dict)
                or isinstance(obj["time"], bool) or not isinstance(obj["time"], (int, float))):
            raise StoreError(f"{where}: unknown state {obj['state']!r:.40} or malformed entry")
        return JournalEntry(obj["seq"], obj["request"], obj["state"], float(obj["time"]), obj["doc"], obj["sha256"])

    def latest(self, request_id: str) -> JournalEntry | None:
        """The newest entry of ``request_id``, or ``None`` if it was never journaled."""
        found = None
        for entry in self.entries():
            if entry.request == request_id:
                found = entry
        return found

    def state(self, request_id: str) -> str | None:
        """The state ``request_id`` reached, or ``None``."""
        entry = self.latest(request_id)
        return entry.state if entry is not None else None

    def requests(self) -> dict[str, str]:
        """Every journaled request id -> its latest state, in order of first appearance."""
        out: dict[str, str] = {}
        for entry in self.entries():
            out[entry.request] = entry.state
        return out

    # -- writing ------------------------------------------------------------------------------------

    def append(self, request_id: str, state: str, doc: dict[str, Any]) -> JournalEntry:
        """Journal that ``request_id`` reached ``state``; returns after the line is on disk (fsynced).

        Raises
        ------
        UnlearnError
            ``state`` may not follow the request's current state (:data:`TRANSITIONS`).
        StoreError
            ``doc`` is not JSON (or holds NaN), the journal is damaged, or the write failed.
        """
        entries, torn = self._read()
        if torn is not None:
            self._drop_torn_tail(torn)
        current = next((e.state for e in reversed(entries) if e.request == request_id), None)
        if state not in TRANSITIONS.get(current, ()):
            raise UnlearnError(f"request {request_id!r}: state {state!r} cannot follow {current!r}; "
                               f"allowed: {list(TRANSITIONS.get(current, ()))}")
        fields = {"seq": len(entries) + 1, "request": request_id, "state": state, "time": _now(),
                  "doc": doc, "prev": entries[-1].sha256 if entries else ""}
        try:
            fields["sha256"] = _checksum(fields)
        except (TypeError, ValueError) as err:
            raise StoreError(f"request {request_id!r}: journal document is not JSON (no NaN): {err}") from err
        self._append_line(_canonical(fields) + b"\n")
        return JournalEntry(fields["seq"], request_id, state, fields["time"], doc, fields["sha256"])

    def _append_line(self, line: bytes) -> None:
        new = not self.path.exists()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            raise StoreError(f"cannot append to request journal {str(self.path)!r}: {err}") from err
        if new:
            fsync_dir(self.directory)


def _now() -> float:
    t = time.time()
    return t if math.isfinite(t) else 0.0

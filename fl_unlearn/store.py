"""A content-addressed store of tensors (weights, Fisher diagonals) plus small JSON documents.

Layout under ``root``::

    objects/<d[:2]>/<d>.safetensors   tensors; d = sha256 hex of the file bytes (metadata included)
    refs/<name>.json                  named pointers to objects ("latest-global"): {"digest": d}
    docs/<name>.json                  small JSON documents (results, state)
    erased/<d[:2]>/<d>.json           tombstones of erased objects (:meth:`Store.erase`): why, and when
    journal/requests.jsonl            the request journal (``fl_unlearn.journal``)
    lock                              the writers' lock (:meth:`Store.lock`)

Guarantees:

- **No pickle.** Tensors are safetensors, everything else JSON.
- **Atomic writes.** Every file is written to a temporary file in its final directory, fsynced, then
  ``os.replace``-d into place, and the directory fsynced; a crash leaves the old file or the new one, never
  a mix. Stray ``.tmp-*`` files can only remain after a hard crash, and are never read.
- **Checked first.** ``put`` checks every tensor (:func:`_check_tensors`) before a byte is written.
- **Verified on read.** ``get`` and ``meta`` re-hash the file; a flipped byte is a ``StoreError``.
- **Immutable objects.** Metadata lives inside the safetensors header (as one JSON string), so it is
  covered by the digest: the same tensors with different metadata are different objects.
- **Erasure leaves a tombstone.** :meth:`Store.erase` deletes an object's file (an unlearning request's
  superseded weights) after writing a tombstone that says why; reading it then raises a ``StoreError`` that
  quotes the reason, not a bare "not found". A crash between the two leaves the object readable and the
  tombstone written; erasing again finishes.

- **One writer at a time, readers never wait.** Writers that change refs, documents or the lineage together
  (serving an unlearning request) hold :meth:`Store.lock`, an exclusive ``fcntl.flock`` on ``<root>/lock``;
  readers take no lock and, thanks to atomic writes, see each file either before or after a change.

Not guarded against: writers that do not take the lock (last writer wins), and objects deleted or edited
behind the store's back other than what the checksum catches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor

from fl_unlearn.errors import StoreError

__all__ = ["Store", "META_KEY"]

log = logging.getLogger(__name__)

#: The one key of the safetensors ``__metadata__`` header we use; its value is JSON text.
META_KEY = "fl_unlearn.meta"
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
# A name is one or more '/'-separated segments; no segment may start with '.', so no '..' and no hidden files.
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:=+-]{0,127}(/[A-Za-z0-9_][A-Za-z0-9_.:=+-]{0,127}){0,7}")
_TMP_PREFIX = ".tmp-"
#: Threads that write (and fsync) the objects of one :meth:`Store.put_many` at a time.
PUT_THREADS = 4


def _check_tensors(tensors: Any) -> None:
    """Refuse anything safetensors cannot store faithfully, naming the key and the remedy."""
    if not isinstance(tensors, Mapping):
        raise StoreError(f"put expects a dict[str, Tensor]; got {type(tensors).__name__}")
    if not tensors:
        raise StoreError("put got an empty dict; there is nothing to store")
    for key, value in tensors.items():
        if not isinstance(key, str) or not key:
            raise StoreError(f"tensor names must be non-empty strings; got {key!r:.80}")
        if not isinstance(value, Tensor):
            raise StoreError(f"{key!r} is a {type(value).__name__}, not a torch.Tensor")
        if value.layout != torch.strided:
            raise StoreError(
                f"{key!r} is {value.layout}; call .to_dense() first (costs memory for very sparse tensors)"
            )
        if value.is_quantized or value.device.type == "meta" or value.is_complex():
            raise StoreError(f"{key!r} ({value.dtype} on {value.device}) cannot be stored; dequantize / materialise it")


def _prepare(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous cpu tensors; tensors that share storage are cloned (safetensors refuses aliases)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
        seen.add(ptr)
        out[key] = t
    return out


def _encode_meta(meta: Mapping[str, Any] | None) -> str:
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        raise StoreError(f"meta must be a dict; got {type(meta).__name__}")
    try:
        return json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise StoreError(f"meta must be JSON-serialisable (no NaN): {err}") from err


def fsync_dir(directory: Path) -> None:
    """Make a rename durable; not every platform can open a directory (Windows), so best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; stored files are meant to be read by other tools
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def _remove(path: Path, what: str) -> bool:
    """Delete ``path`` durably; ``False`` when it was not there."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as err:
        raise StoreError(f"cannot delete {what} at {str(path)!r}: {err}") from err
    fsync_dir(path.parent)
    return True


def _acquire(fd: int, fcntl: Any, timeout: float | None, path: Path) -> None:
    if timeout is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise StoreError(f"the store lock {str(path)!r} was not free within {timeout:.1f} s; another "
                                 "request is being applied") from None
            time.sleep(0.05)


class Store:
    """Content-addressed safetensors objects, named refs and JSON documents under one directory.

    Parameters
    ----------
    root : str | pathlib.Path
        The store directory; created if missing.

    Examples
    --------
    >>> import tempfile, torch
    >>> store = Store(tempfile.mkdtemp())
    >>> d = store.put({"w": torch.ones(2)}, meta={"round": 1})
    >>> store.get(d)["w"].tolist(), store.meta(d)
    ([1.0, 1.0], {'round': 1})
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        try:
            for sub in ("objects", "refs", "docs"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create store directory {str(self.root)!r}: {err}") from err

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- objects ------------------------------------------------------------------------------------

    def path(self, digest: str) -> Path:
        """Where object ``digest`` lives (whether or not it exists); checks the digest's form."""
        if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
            raise StoreError(f"invalid digest {digest!r:.80}: expected 64 lowercase hex characters (sha256)")
        return self.root / "objects" / digest[:2] / f"{digest}.safetensors"

    def put(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any] | None = None) -> str:
        """Store tensors (and JSON metadata); return the sha256 digest of the file.

        Idempotent: storing the same tensors and metadata again returns the same digest and writes
        nothing, unless the existing file is damaged, in which case it is rewritten.

        Raises
        ------
        StoreError
            Not a dict of dense tensors with non-empty string names; metadata not JSON; write failure.
        """
        return self._write(*self._serialise(tensors, meta))

    def put_many(self, items: Sequence[tuple[Mapping[str, Tensor], Mapping[str, Any] | None]]) -> list[str]:
        """:meth:`put` of several ``(tensors, meta)`` items; returns their digests in order.

        Every item is checked and serialised before any is written (bad input writes nothing); the writes, each
        fsync'd, then overlap in a few threads: an unlearning request stores every affected model at once, and
        one fsync after another was most of that step.
        """
        encoded = [self._serialise(tensors, meta) for tensors, meta in items]
        if len(encoded) < 2:
            return [self._write(digest, data) for digest, data in encoded]
        with ThreadPoolExecutor(max_workers=min(PUT_THREADS, len(encoded))) as pool:
            return list(pool.map(lambda pair: self._write(*pair), encoded))

    @staticmethod
    def _serialise(tensors: Mapping[str, Tensor], meta: Mapping[str, Any] | None) -> tuple[str, bytes]:
        _check_tensors(tensors)
        header = {META_KEY: _encode_meta(meta)}
        try:
            data = safetensors.torch.save(_prepare(tensors), metadata=header)
        except (SafetensorError, RuntimeError, ValueError, TypeError) as err:
            raise StoreError(f"safetensors could not serialise the tensors: {err}") from err
        return hashlib.sha256(data).hexdigest(), data

    def _write(self, digest: str, data: bytes) -> str:
        path = self.path(digest)
        if self._intact(path, data):
            self._tombstone(digest).unlink(missing_ok=True)  # an erasure cut short by a crash: stored again
            return digest
        try:
            atomic_write(path, data)
        except OSError as err:
            raise StoreError(f"cannot write object {digest} to {str(path)!r}: {err}") from err
        self._tombstone(digest).unlink(missing_ok=True)  # stored again: no longer erased
        log.debug("put: %s (%d bytes)", digest, len(data))
        return digest

    @staticmethod
    def _intact(path: Path, data: bytes) -> bool:
        """True when ``path`` already holds exactly ``data`` (an earlier put of the same content)."""
        try:
            if path.stat().st_size != len(data):
                return False
            return path.read_bytes() == data
        except OSError:
            return False

    def verify(self, digest: str) -> None:
        """Check that object ``digest`` exists and its bytes hash to ``digest`` (no decoding).

        Raises
        ------
        StoreError
            Malformed digest, missing object, checksum mismatch ("corrupt").
        """
        self._read_verified(digest)

    @contextmanager
    def lock(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the store's writer lock (exclusive ``fcntl.flock`` on ``<root>/lock``) for a ``with`` block.

        Serialises writers across threads and processes (each call opens its own file description). Not
        re-entrant: do not take it again inside the block. Readers need no lock.

        Parameters
        ----------
        timeout : float | None (default: None)
            Seconds to wait for the lock; ``None`` waits as long as it takes.

        Raises
        ------
        StoreError
            The lock file cannot be opened, or the lock was not free within ``timeout``.
        """
        import fcntl  # POSIX only; imported here so reading a store works everywhere

        path = self.root / "lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise StoreError(f"cannot open the store lock {str(path)!r}: {err}") from err
        try:
            _acquire(fd, fcntl, timeout, path)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def has(self, digest: str) -> bool:
        """Whether object ``digest`` exists (not verified; ``get`` verifies)."""
        return self.path(digest).is_file()

    def objects(self) -> list[str]:
        """The digests of every object in the store (sorted; stray temporary files left out)."""
        return sorted(p.stem for p in (self.root / "objects").glob("??/*.safetensors")
                      if _DIGEST_RE.fullmatch(p.stem))

    # -- erasure ------------------------------------------------------------------------------------

    def _tombstone(self, digest: str) -> Path:
        self.path(digest)  # checks the digest's form
        return self.root / "erased" / digest[:2] / f"{digest}.json"

    def erase(self, digest: str, reason: str) -> bool:
        """Delete object ``digest`` for good, leaving a tombstone with ``reason``; return whether a file was deleted.

        Idempotent: erasing an erased (or never stored) object writes the tombstone and deletes nothing. The
        tombstone is written (fsynced) before the file is deleted, so a crash in between leaves both, and erasing
        again finishes. Storing the same bytes again later (:meth:`put`) brings the object back and drops the
        tombstone.

        Raises
        ------
        StoreError
            Malformed digest, an empty ``reason``, or the file system refused.
        """
        if not isinstance(reason, str) or not reason.strip():
            raise StoreError("erase needs a reason (it is what a later read of the object reports)")
        tomb, path = self._tombstone(digest), self.path(digest)
        if self.erased(digest) is None:
            self._write_json(tomb, {"digest": digest, "reason": reason, "time": time.time()}, f"tombstone of {digest}")
        if not _remove(path, f"object {digest}"):
            return False
        log.debug("erase: %s (%s)", digest, reason)
        return True

    def erased(self, digest: str) -> dict[str, Any] | None:
        """The tombstone of an erased object (``digest``, ``reason``, ``time``), or ``None``."""
        try:
            obj = self._read_json(self._tombstone(digest), f"tombstone of {digest}")
        except FileNotFoundError:
            return None
        return obj if isinstance(obj, dict) else {"digest": digest, "reason": str(obj)}

    def _read_verified(self, digest: str) -> bytes:
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError as err:
            tomb = self.erased(digest)
            if tomb is not None:
                raise StoreError(f"object {digest} was erased from store {str(self.root)!r}: "
                                 f"{tomb.get('reason')}") from err
            raise StoreError(f"object {digest} not found in store {str(self.root)!r}") from err
        except OSError as err:
            raise StoreError(f"cannot read object {digest} at {str(path)!r}: {err}") from err
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise StoreError(
                f"object {digest} at {str(path)!r} is corrupt: its sha256 is {actual}; "
                "restore it from a backup or recompute it"
            )
        return data

    def get(self, digest: str) -> dict[str, Tensor]:
        """Load the tensors of object ``digest``, after verifying its checksum.

        Raises
        ------
        StoreError
            Malformed digest, missing object, checksum mismatch ("corrupt"), undecodable file.
        """
        data = self._read_verified(digest)
        try:
            return safetensors.torch.load(data)
        except (SafetensorError, RuntimeError, ValueError) as err:
            raise StoreError(f"object {digest} at {str(self.path(digest))!r} is not valid safetensors: {err}") from err

    def meta(self, digest: str) -> dict[str, Any]:
        """The JSON metadata stored with object ``digest`` (``{}`` if none), after verifying it."""
        data = self._read_verified(digest)
        try:
            (size,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8 : 8 + size])
            return json.loads(header.get("__metadata__", {}).get(META_KEY, "{}"))
        except (struct.error, ValueError, AttributeError, TypeError) as err:
            raise StoreError(f"object {digest} has an unreadable header: {err}") from err

    # -- refs and documents -------------------------------------------------------------------------

    def _named(self, kind: str, name: str) -> Path:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise StoreError(
                f"invalid {kind} name {name!r:.80}: use letters, digits and _ . : = + - in '/'-separated parts "
                "that do not start with '.'"
            )
        return self.root / kind / f"{name}.json"

    def _names(self, kind: str, prefix: str) -> list[str]:
        root = self.root / kind
        names = (str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.json"))
        return sorted(n for n in names if _NAME_RE.fullmatch(n) and n.startswith(prefix))

    def _write_json(self, path: Path, obj: Any, what: str) -> None:
        try:
            text = json.dumps(obj, sort_keys=True, allow_nan=False, indent=1)
        except (TypeError, ValueError) as err:
            raise StoreError(f"{what} is not JSON-serialisable (no NaN, str keys): {err}") from err
        try:
            atomic_write(path, text.encode("utf-8"))
        except OSError as err:
            raise StoreError(f"cannot write {what} to {str(path)!r}: {err}") from err

    @staticmethod
    def _read_json(path: Path, what: str) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as err:
            raise StoreError(f"{what} at {str(path)!r} is unreadable or corrupt: {err}") from err

    def set_ref(self, name: str, digest: str) -> None:
        """Point ref ``name`` at an existing object (atomically replacing the old target)."""
        path = self._named("refs", name)
        if not self.has(digest):
            raise StoreError(f"cannot point ref {name!r} at {digest}: no such object in {str(self.root)!r}")
        self._write_json(path, {"digest": digest}, f"ref {name!r}")

    def refs(self, prefix: str = "") -> list[str]:
        """The names of every ref (sorted), or of those that start with ``prefix``."""
        return self._names("refs", prefix)

    def delete_ref(self, name: str) -> bool:
        """Remove ref ``name`` (the object stays); return whether it existed."""
        return _remove(self._named("refs", name), f"ref {name!r}")

    def get_ref(self, name: str) -> str | None:
        """The digest ref ``name`` points at, or ``None`` if the ref was never set."""
        path = self._named("refs", name)
        try:
            obj = self._read_json(path, f"ref {name!r}")
        except FileNotFoundError:
            return None
        digest = obj.get("digest") if isinstance(obj, dict) else None
        if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
            raise StoreError(f"ref {name!r} at {str(path)!r} is corrupt: no valid digest in {obj!r:.120}")
        return digest

    def docs(self, prefix: str = "") -> list[str]:
        """The names of every JSON document (sorted), or of those that start with ``prefix``."""
        return self._names("docs", prefix)

    def put_json(self, name: str, obj: Any) -> None:
        """Atomically write JSON document ``name`` (replacing any previous version)."""
        self._write_json(self._named("docs", name), obj, f"document {name!r}")

    def get_json(self, name: str, default: Any = None) -> Any:
        """JSON document ``name``, or ``default`` if it was never written."""
        try:
            return self._read_json(self._named("docs", name), f"document {name!r}")
        except FileNotFoundError:
            return default

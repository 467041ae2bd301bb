"""SISA shards and slices inside a federation: layout, stage-wise FedAvg, stage checkpoints, the exact path.

``DESIGN.md`` §4 and ``reference/hybrid.md`` §2, §5, §6. Conventions used everywhere below:

- **Shards** are numbered ``0..S-1``; **slices** and **stages** ``1..R``, as in SISA. Stage ``r`` trains on
  slices ``1..r``; **stage 0** is the initial weights. Every shard-model is checkpointed at the end of every
  stage (``S * (R + 1)`` checkpoints).
- **Layout** (:class:`SisaLayout`): a sample's shard and slice are a pure function of its id and the layout
  seed (a keyed 64-bit blake2b of the id), so they never depend on position, on which other samples exist,
  or on Python's salted ``hash()``. Removing samples moves no other sample to another shard or slice.
- **Shard-federation s** (:class:`SisaFederation`) is an isolated FedAvg run over every client's shard-``s``
  rows; stage ``r`` runs ``rounds_per_stage[r-1]`` rounds, each client training ``local_epochs`` epochs on its
  kept rows of slices ``1..r``, then the server averages the replies weighted by their kept counts, in client
  order. Prediction is the mean softmax of the S shard-models (:class:`Ensemble`).
- **Determinism** (pitfall P4). Everything random is a pure function of ``(seed, shard, stage, round,
  client[, epoch])``: the initial weights (``seed, shard``), torch's generator at the start of each local
  training call, and the batch order, which sorts the kept rows by a keyed hash of their ids and cuts
  batches of ``batch_size``. Removing samples X therefore leaves the other samples' order unchanged, and a
  rerun of stages ``r*..R`` without X meets exactly the batches a from-scratch run without X meets: stages
  before ``r*`` never held X, so both runs trained them on the same rows. On CPU with a fixed thread count,
  :meth:`SisaFederation.unlearn_exact` is bitwise equal to training from scratch without X (tested). GPUs
  are not bitwise reproducible.
- **Exact path**: per touched shard, ``r0 = min(r*, d_s)`` (``r*`` the earliest slice of X in the shard,
  ``d_s`` the earliest stage an approximate removal left holding revoked data, pitfall P1); roll back to the
  checkpoint of stage ``r0 - 1`` and rerun stages ``r0..R`` without every revoked id of the shard, each
  stage starting from the rerun's own previous stage (P2). Client optimisers are recreated every round and
  the server is plain FedAvg, so weights are the whole state (P3).

The per-shard ledger (revoked ids with the path that removed them, and ``d_s``) lives in
:class:`ShardLedger`; the hybrid planner (``fl_unlearn.hybrid``) reads it and records approximate removals in it
through :meth:`SisaFederation.record_approximate`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import Dataset
from torch import Tensor, nn

from fl_unlearn.data import FederatedData, make_loader, sample_ids
from fl_unlearn.errors import ConfigError, RequestError, StoreError
from fl_unlearn.evaluate import accuracy
from fl_unlearn.lineage import LineageGraph, TrainingData, sample_digest
from fl_unlearn.models import build_model
from fl_unlearn.requests import UnlearningRequest
from fl_unlearn.store import Store
from fl_unlearn.train import train_local

__all__ = [
    "LAYOUT_HASH",
    "Ensemble",
    "ExactReport",
    "RoundRecord",
    "ShardLedger",
    "ShardRerun",
    "SisaConfig",
    "SisaFederation",
    "HashOrderedBatches",
    "SisaClient",
    "SisaLayout",
    "derive_seed",
    "fedavg",
    "hash_order",
    "in_service",
    "initial_weights",
]

logger = logging.getLogger(__name__)

Weights = dict[str, Tensor]
Revocation = Mapping[int, Iterable[int]]
"""Sample ids to revoke per client (partition id): ``{2: [10, 11], 3: [7]}``."""

#: Name and version of the id -> (shard, slice) hash, recorded with every layout (the client's manifest).
LAYOUT_HASH = "blake2b-64/v1"
_PERSON = b"fl_unlearn.sisa"
_STATE_DOC = "sisa/state"
_EXCLUDED = "excluded"  # ledger path of ids left out from the start (a from-scratch reference run)


# --------------------------------------------------------------------------------------------------------
# Hashing and seeds
# --------------------------------------------------------------------------------------------------------


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (ints and strings), stable across runs.

    Examples
    --------
    >>> derive_seed(0, "init", 1) == derive_seed(0, "init", 1), derive_seed(0, 1) == derive_seed(1, 0)
    (True, False)
    """
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8, person=_PERSON).digest(), "little") >> 1


def _keyed_hash64(ids: np.ndarray, key: int) -> np.ndarray:
    """blake2b-64 of each id (int64 little-endian) keyed with ``key``: the layout hash (``LAYOUT_HASH``)."""
    k = int(key).to_bytes(8, "little", signed=True)
    digests = (
        hashlib.blake2b(int(i).to_bytes(8, "little", signed=True), digest_size=8, key=k, person=_PERSON).digest()
        for i in ids.tolist()
    )
    return np.fromiter((int.from_bytes(d, "little") for d in digests), dtype=np.uint64, count=len(ids))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, vectorised (uint64 arithmetic wraps): a fast keyed hash for batch order."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def hash_order(ids: np.ndarray, key: int) -> np.ndarray:
    """Positions of ``ids`` sorted by a keyed hash of the id: removing some ids keeps the others' order."""
    salted = ids.astype(np.uint64) ^ _mix64(np.array([key], dtype=np.uint64))[0]
    return np.argsort(_mix64(salted), kind="stable")


def _as_ids(values: Iterable[int] | np.ndarray, what: str = "sample ids") -> np.ndarray:
    arr = np.asarray(values if isinstance(values, np.ndarray) else list(values))
    if arr.size and (arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer)):
        raise RequestError(f"{what} must be integers; got {arr.dtype} values {arr.reshape(-1)[:5].tolist()}")
    return arr.astype(np.int64).reshape(-1)


def _fmt(ids: Sequence[int], limit: int = 10) -> str:
    ids = list(ids)
    return str(ids) if len(ids) <= limit else f"{ids[:limit]}... ({len(ids)} in all)"


# --------------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SisaLayout:
    """Which shard and slice each sample id belongs to: a keyed hash of the id, nothing else.

    Parameters
    ----------
    num_shards : int
        S >= 1; shards are ``0..S-1``.
    num_slices : int
        R >= 1; slices are ``1..R`` (1-based, as SISA's stages).
    seed : int (default: 0)
        Hash key: another seed gives an independent layout.

    Notes
    -----
    With ``h`` the keyed 64-bit blake2b of the id, ``shard = h mod S`` and ``slice = 1 + (h div S) mod R``.
    Shard and slice sizes are multinomial around ``n/S`` and ``n/(S R)`` (a few percent off for slices of
    a few hundred samples); balance is traded for never having to store or recompute positions.

    Examples
    --------
    >>> layout = SisaLayout(num_shards=2, num_slices=3, seed=0)
    >>> shard, slc = layout.assign([0, 1, 2, 3])
    >>> bool(((shard >= 0) & (shard < 2)).all()), bool(((slc >= 1) & (slc <= 3)).all())
    (True, True)
    """

    num_shards: int
    num_slices: int
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_shards", "num_slices"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an int, got {self.seed!r}.")

    def assign(self, ids: Iterable[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shard (``0..S-1``) and slice (``1..R``) of every id, as two int64 arrays in input order."""
        h = _keyed_hash64(_as_ids(ids), self.seed)
        shard = (h % np.uint64(self.num_shards)).astype(np.int64)
        slc = ((h // np.uint64(self.num_shards)) % np.uint64(self.num_slices)).astype(np.int64) + 1
        return shard, slc

    def stage_mask(
        self, ids: Iterable[int] | np.ndarray, shard: int, stage: int, *, exclude: Iterable[int] = ()
    ) -> np.ndarray:
        """Boolean mask of the ids in ``shard`` and slices ``1..stage``, minus ``exclude``."""
        self._check_stage(shard, stage)
        ids = _as_ids(ids)
        shards, slices = self.assign(ids)
        return (shards == shard) & (slices <= stage) & ~np.isin(ids, _as_ids(exclude))

    def client_stage_data(self, ds: Dataset, shard: int, stage: int, *, exclude: Iterable[int] = ()) -> Dataset:
        """One client's training data for stage ``stage`` of shard ``shard``.

        Parameters
        ----------
        ds : Dataset
            The client's data (a partition from ``fl_unlearn.data``; needs an ``id`` column).
        shard : int
            ``0..S-1``.
        stage : int
            ``0..R`` (1-based SISA stage; stage 0 has no data): rows of slices ``1..stage`` are kept.
        exclude : Iterable[int] (default: ())
            Revoked ids to leave out.

        Returns
        -------
        Dataset
            The rows of ``ds`` in that shard and those slices, minus ``exclude``, in ``ds``'s order.
        """
        return ds.select(np.flatnonzero(self.stage_mask(sample_ids(ds), shard, stage, exclude=exclude)))

    def counts(self, ids: Iterable[int] | np.ndarray, *, exclude: Iterable[int] = ()) -> np.ndarray:
        """Number of ids per shard and slice, minus ``exclude``: int64 ``[S, R]`` (column ``j`` = slice ``j+1``)."""
        ids = _as_ids(ids)
        shards, slices = self.assign(ids)
        keep = ~np.isin(ids, _as_ids(exclude))
        out = np.zeros((self.num_shards, self.num_slices), dtype=np.int64)
        np.add.at(out, (shards[keep], slices[keep] - 1), 1)
        return out

    def check_sizes(self, ids_by_client: Mapping[int, Iterable[int] | np.ndarray]) -> None:
        """Refuse a layout with more slices than some client's shard has samples.

        Raises
        ------
        ConfigError
            Listing every (client, shard) with fewer than ``num_slices`` samples, and what to change.
        """
        problems = []
        for client, ids in ids_by_client.items():
            sizes = self.counts(ids).sum(axis=1)
            problems += [f"client {client} shard {s}: {n}" for s, n in enumerate(sizes) if n < self.num_slices]
        if problems:
            raise ConfigError(
                f"num_slices={self.num_slices} is larger than some shards (samples per client shard: "
                f"{_fmt(problems, 8)}); use fewer slices or shards, or more data per client."
            )

    def locate(self, revoked: Mapping[int, np.ndarray]) -> dict[int, dict[int, np.ndarray]]:
        """Split revocations by shard: ``{shard: {client: ids}}``, shards and clients sorted (the layout is a
        hash of the id, so no client data is needed)."""
        out: dict[int, dict[int, np.ndarray]] = {}
        for k, ids in sorted(revoked.items()):
            shards, _ = self.assign(ids)
            for s in np.unique(shards).tolist():
                out.setdefault(int(s), {})[k] = ids[shards == s]
        return dict(sorted(out.items()))

    def first_slice(self, by_client: Mapping[int, np.ndarray]) -> int:
        """``r*``: the earliest slice among ``by_client``'s ids (all of one shard)."""
        return int(min(self.assign(ids)[1].min() for ids in by_client.values()))

    def to_dict(self) -> dict[str, object]:
        """The manifest a client keeps next to its data: hash name and version, S, R, seed."""
        return {"hash": LAYOUT_HASH, "num_shards": self.num_shards, "num_slices": self.num_slices, "seed": self.seed}

    @classmethod
    def from_dict(cls, obj: Mapping[str, object]) -> SisaLayout:
        """Inverse of :meth:`to_dict`; ``ConfigError`` for another hash version."""
        if obj.get("hash") != LAYOUT_HASH:
            raise ConfigError(f"layout hash {obj.get('hash')!r} is not {LAYOUT_HASH!r}; it was made by another version.")
        return cls(int(obj["num_shards"]), int(obj["num_slices"]), int(obj["seed"]))

    def _check_stage(self, shard: int, stage: int) -> None:
        if not 0 <= shard < self.num_shards:
            raise ConfigError(f"shard {shard} out of range 0..{self.num_shards - 1}.")
        if not 0 <= stage <= self.num_slices:
            raise ConfigError(f"stage {stage} out of range 0..{self.num_slices} (stages are 1-based; 0 = initial).")


# --------------------------------------------------------------------------------------------------------
# Configuration and records
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SisaConfig:
    """How the shard-federations train.

    Parameters
    ----------
    num_shards, num_slices : int (default: 1, 1)
        S and R; ``S = R = 1`` is plain FedAvg with one checkpoint.
    rounds_per_stage : int | tuple[int, ...] (default: 1)
        FedAvg rounds per stage (one value, or one per stage).
    local_epochs : int (default: 1)
        Epochs each client trains per round.
    batch_size : int (default: 32)
        Local batch size.
    lr, momentum, weight_decay : float (default: 0.05, 0.9, 0.0)
        Client SGD; the optimiser is recreated every round, so no state crosses rounds (P3).
    model : str (default: "cnn")
        ``fl_unlearn.models`` registry name.
    seed : int (default: 0)
        Seeds the layout hash, initial weights, batch orders and torch's generator.
    """

    num_shards: int = 1
    num_slices: int = 1
    rounds_per_stage: int | tuple[int, ...] = 1
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    model: str = "cnn"
    seed: int = 0

    def __post_init__(self) -> None:
        SisaLayout(self.num_shards, self.num_slices, self.seed)  # checks S, R and seed
        rounds = self.rounds()
        if len(rounds) != self.num_slices or any(isinstance(t, bool) or not isinstance(t, int) or t < 1
                                                  for t in rounds):
            raise ConfigError(
                f"rounds_per_stage must be an int >= 1 or {self.num_slices} of them (one per stage); "
                f"got {self.rounds_per_stage!r}."
            )
        for name in ("local_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")

    def rounds(self) -> tuple[int, ...]:
        """Rounds of each stage ``1..R`` (``T_r``)."""
        t = self.rounds_per_stage
        return (t,) * self.num_slices if isinstance(t, int) else tuple(t)


@dataclass(frozen=True)
class RoundRecord:
    """One FedAvg round as the planner sees it: sample-gradient evaluations ``g`` and wall time ``t``."""

    shard: int
    stage: int
    round: int
    evaluations: int
    seconds: float


@dataclass
class ShardLedger:
    """Pitfall P1 bookkeeping of one shard.

    Attributes
    ----------
    revoked : dict[int, dict[int, str]]
        Client -> revoked id -> the path that removed it (``exact``, ``approximate``, ``excluded``): ``F_s``.
    dirty_from : int | None
        ``d_s``: the earliest stage whose checkpoint (and every later one) still holds approximately removed
        data; ``None`` when every checkpoint is clean. The next exact rerun starts at ``min(r*, d_s)``.
    """

    revoked: dict[int, dict[int, str]] = field(default_factory=dict)
    dirty_from: int | None = None

    def ids(self, client: int) -> np.ndarray:
        """Revoked ids of ``client`` (int64)."""
        return np.fromiter(self.revoked.get(client, {}), dtype=np.int64)

    def add(self, client: int, ids: Iterable[int], path: str) -> None:
        """Record ``ids`` of ``client`` as revoked by ``path``."""
        self.revoked.setdefault(client, {}).update({int(i): path for i in ids})

    def rerun_start(self, r_star: int) -> int:
        """``r0 = min(r*, d_s)``: an exact rerun starts no later than the first approximately-cleaned stage."""
        return r_star if self.dirty_from is None else min(r_star, self.dirty_from)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"revoked": {str(k): sorted([i, p] for i, p in v.items()) for k, v in self.revoked.items()},
                "dirty_from": self.dirty_from}

    @classmethod
    def from_dict(cls, obj: Mapping[str, object]) -> ShardLedger:
        """Inverse of :meth:`to_dict`."""
        revoked = {int(k): {int(i): str(p) for i, p in v} for k, v in obj["revoked"].items()}
        return cls(revoked, obj["dirty_from"])


@dataclass
class ShardRerun:
    """What the exact path did to one shard."""

    shard: int
    r_star: int
    start_stage: int
    stages: list[int]
    evaluations: int
    seconds: float
    rounds: int


@dataclass
class ExactReport:
    """What :meth:`SisaFederation.unlearn_exact` retrained."""

    request_id: str | None
    shards: dict[int, ShardRerun]
    evaluations: int
    seconds: float

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"request_id": self.request_id, "evaluations": self.evaluations, "seconds": self.seconds,
                "shards": {str(s): vars(r) for s, r in self.shards.items()}}


# --------------------------------------------------------------------------------------------------------
# Ensemble
# --------------------------------------------------------------------------------------------------------


class Ensemble(nn.Module):
    """Mean softmax of several models; ``forward`` returns its log, so it plugs in wherever logits go.

    ``argmax`` of the output is the ensemble's prediction and ``cross_entropy`` of it is
    ``-log mean_s p_s(y | x)`` (``log_softmax`` of a log-probability vector is itself), so
    ``fl_unlearn.evaluate.accuracy`` and ``loss_threshold_mia_auc`` work unchanged.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ConfigError("an Ensemble needs at least one model.")
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        logp = torch.stack([torch.log_softmax(m(x), dim=1) for m in self.members])
        return torch.logsumexp(logp, dim=0) - float(np.log(len(self.members)))


# --------------------------------------------------------------------------------------------------------
# One client's data, and its batches
# --------------------------------------------------------------------------------------------------------


class SisaClient:
    """One client's side of the layout: its partition as arrays, its rows per (shard, stage), local training.

    The Flower client mirrors :class:`SisaFederation` by building one of these on its partition and calling
    :meth:`train` with the ``(seed, shard, stage, round)`` key the server sends; the server averages the
    replies with :func:`fedavg` in partition-id order.

    Parameters
    ----------
    ds : Dataset
        The client's partition (``fl_unlearn.data``; needs ``image``, ``label`` and ``id`` columns).
    layout : SisaLayout
        The federation's layout.
    client_id : int
        Partition id (part of every seed tuple).
    """

    def __init__(self, ds: Dataset, layout: SisaLayout, client_id: int) -> None:
        self.client_id, self.layout = client_id, layout
        self.ids = sample_ids(ds).copy()
        self.shard, self.slice = layout.assign(self.ids)
        self.dataset = make_loader(ds, 1).dataset  # normalises on indexing; images cached per partition
        self.labels = self.dataset.labels.numpy()

    def rows(self, shard: int, stage: int, exclude: np.ndarray, *, shard_only: bool = False) -> np.ndarray:
        """Rows of ``shard`` in slices ``1..stage`` (every slice with ``shard_only``), minus ``exclude`` ids."""
        mask = self.shard == shard
        if not shard_only:
            mask &= self.slice <= stage
        if exclude.size:
            mask &= ~np.isin(self.ids, exclude)
        return np.flatnonzero(mask)

    def tensors(self, rows: np.ndarray) -> tuple[Tensor, Tensor]:
        """Normalised ``(x, y)`` of ``rows``."""
        return self.dataset.__getitems__(rows)

    def batches(self, rows: np.ndarray, batch_size: int, key: tuple, fraction: float = 1.0) -> HashOrderedBatches:
        """The batches of one local training call (see :class:`HashOrderedBatches`)."""
        return HashOrderedBatches(self, rows, batch_size, (*key, self.client_id, "batch"), fraction)

    def train(self, model: nn.Module, weights: Mapping[str, Tensor], rows: np.ndarray, key: tuple, cfg: SisaConfig,
              *, epochs: int | None = None, fraction: float = 1.0) -> tuple[int, Weights]:
        """Train ``model`` from ``weights`` on ``rows`` for one round; return ``(examples, new weights)``.

        Deterministic: batch order from ``key + (client_id, "batch", epoch)``, torch's generator seeded from
        ``key + (client_id, "torch")``, a fresh SGD optimiser (no state crosses rounds).
        """
        batches = self.batches(rows, cfg.batch_size, key, fraction)
        model.load_state_dict(weights)
        torch.manual_seed(derive_seed(*key, self.client_id, "torch"))
        train_local(model, batches, epochs=cfg.local_epochs if epochs is None else epochs, lr=cfg.lr,
                    momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        return batches.size, _detach(model.state_dict())


class HashOrderedBatches:
    """Re-iterable batches: every ``iter()`` is the next epoch, ordered by a keyed hash of the ids (P4).

    The order sorts the rows by ``splitmix64(id ^ splitmix64(derive_seed(*key, epoch)))`` and cuts batches
    of ``batch_size`` (the last may be smaller): removing rows keeps the others' relative order.
    ``fraction < 1`` keeps the first ``ceil(fraction * n)`` rows of each epoch's order (OHS's halved epochs).
    """

    def __init__(self, client: SisaClient, rows: np.ndarray, batch_size: int, key: tuple, fraction: float = 1.0):
        self.client, self.rows, self.batch_size, self.key, self.epoch = client, rows, batch_size, key, 0
        self.size = int(np.ceil(fraction * len(rows)))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.rows[hash_order(self.client.ids[self.rows], derive_seed(*self.key, self.epoch))][: self.size]
        self.epoch += 1
        for i in range(0, len(order), self.batch_size):
            yield self.client.tensors(order[i : i + self.batch_size])


def initial_weights(new_model: Callable[[], nn.Module], seed: int, shard: int) -> Weights:
    """``theta_{s,0}`` of shard ``shard``: ``new_model()`` built under a seed derived from ``(seed, shard)``.

    Every driver of a SISA federation (in-process or over Flower) starts its shard-models from this, so
    their runs can be compared bitwise.
    """
    torch.manual_seed(derive_seed(seed, "init", shard))
    return _detach(new_model().state_dict())


def fedavg(replies: Sequence[tuple[int, Weights]]) -> Weights:
    """Average state dicts weighted by example counts, in the given (client) order, in float64.

    Non-floating tensors (BatchNorm's ``num_batches_tracked``) are taken from the first reply. Give the
    replies sorted by partition id: float sums depend on their order, and exactness on the sums.

    Raises
    ------
    ConfigError
        No replies, or a total of zero examples.
    """
    total = float(sum(n for n, _ in replies))
    if not replies or total <= 0:
        raise ConfigError(f"fedavg needs replies with examples; got {len(replies)} replies, {total:g} examples.")
    out = {}
    for name, first in replies[0][1].items():
        if not first.is_floating_point():
            out[name] = first.clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for n, w in replies:
            acc += w[name].double() * (n / total)
        out[name] = acc.to(first.dtype)
    return out


def in_service(checkpoints: Sequence[Sequence[str | None]], served: Sequence[str | None],
               ledgers: Sequence[ShardLedger]) -> set[str]:
    """The digests a shard-federation may still read: each shard's served model and its stage checkpoints below
    the first stage an approximate removal left stale (``dirty_from``; every later exact rerun starts at or
    before it, pitfall P1). Everything else it ever stored (checkpoints an exact rerun replaced, stale ones,
    models served before) still holds revoked samples: :func:`fl_unlearn.erasure.erase_out_of_service`."""
    out: set[str] = set()
    for row, model, ledger in zip(checkpoints, served, ledgers):
        out.update(d for d in row[:ledger.dirty_from] if d)  # row[:None] is the whole row
        if model:
            out.add(model)
    return out


# --------------------------------------------------------------------------------------------------------
# The federation
# --------------------------------------------------------------------------------------------------------


class SisaFederation:
    """S isolated shard-federations trained in R stages, checkpointed per stage; the exact unlearning path.

    The clients are the partitions of ``data``; everything runs in-process, so this is the reference the
    Flower layer mirrors (``train.retrain`` messages carry ``(shard, stage, round)`` and the seed tuple).

    Parameters
    ----------
    data : FederatedData
        Clients = ``data.partition(k)`` for ``k in range(data.num_partitions)``.
    cfg : SisaConfig
        Shards, slices, rounds per stage, client SGD, model, seed.
    store : Store
        Where stage checkpoints, sample-id lists and the state document (``docs/sisa/state.json``) go.
    graph : LineageGraph | None (default: None)
        Lineage to record into (a fresh in-memory one by default).
    exclude : Revocation | None (default: None)
        Samples left out from the start (ledger path ``excluded``): a from-scratch reference run without X.

    Raises
    ------
    ConfigError
        A slice count larger than some client's shard (:meth:`SisaLayout.check_sizes`).
    RequestError
        ``exclude`` names ids a client does not hold.

    Examples
    --------
    >>> fed = SisaFederation(data, SisaConfig(num_shards=2, num_slices=3), Store(tmp))   # doctest: +SKIP
    >>> fed.train(); fed.unlearn_exact({0: [12, 40]})                                     # doctest: +SKIP
    """

    def __init__(
        self,
        data: FederatedData,
        cfg: SisaConfig,
        store: Store,
        graph: LineageGraph | None = None,
        *,
        exclude: Revocation | None = None,
    ) -> None:
        self.data, self.cfg, self.store = data, cfg, store
        self.graph = graph if graph is not None else LineageGraph()
        self.layout = SisaLayout(cfg.num_shards, cfg.num_slices, cfg.seed)
        self.clients = list(range(data.num_partitions))
        self._data = {k: SisaClient(data.partition(k), self.layout, k) for k in self.clients}
        self.layout.check_sizes({k: c.ids for k, c in self._data.items()})
        self.ledgers = [ShardLedger() for _ in range(cfg.num_shards)]
        R = cfg.num_slices
        self.checkpoints: list[list[str | None]] = [[None] * (R + 1) for _ in range(cfg.num_shards)]
        self.nodes: list[list[str | None]] = [[None] * (R + 1) for _ in range(cfg.num_shards)]
        self.served: list[str | None] = [None] * cfg.num_shards  # digest of the model each shard serves now
        self.served_nodes: list[str | None] = [None] * cfg.num_shards
        self.versions = [0] * cfg.num_shards
        self.round_log: list[RoundRecord] = []
        if exclude:
            self._add_revoked(self.check_revocation(exclude), _EXCLUDED)

    # -- views ----------------------------------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        return self.cfg.num_shards

    @property
    def num_slices(self) -> int:
        return self.cfg.num_slices

    @property
    def trained(self) -> bool:
        """Whether every shard has all its stage checkpoints."""
        return all(d is not None for row in self.checkpoints for d in row)

    def revoked_ids(self, shard: int, client: int) -> np.ndarray:
        """``F_s`` of one client: every id revoked so far in ``shard`` (any path)."""
        return self.ledgers[shard].ids(client)

    def kept_rows(self, client: int, shard: int, stage: int, *, extra: Revocation | None = None,
                  shard_only: bool = False) -> np.ndarray:
        """Rows of ``client``'s partition that stage ``stage`` of ``shard`` trains on (``extra`` also left out)."""
        exclude = self.revoked_ids(shard, client)
        if extra and client in extra:
            exclude = np.union1d(exclude, _as_ids(extra[client]))
        return self._data[client].rows(shard, stage, exclude, shard_only=shard_only)

    def kept_counts(self, extra: Revocation | None = None) -> np.ndarray:
        """Kept samples per client, shard and slice: int64 ``[K, S, R]`` (``n_{k,s,r}``), minus ``extra``."""
        out = np.zeros((len(self.clients), self.num_shards, self.num_slices), dtype=np.int64)
        for i, k in enumerate(self.clients):
            c = self._data[k]
            for s in range(self.num_shards):
                rows = self.kept_rows(k, s, self.num_slices, extra=extra)
                np.add.at(out[i, s], c.slice[rows] - 1, 1)
        return out

    def tensors(self, rows_by_client: Mapping[int, np.ndarray]) -> tuple[Tensor, Tensor]:
        """Normalised ``(x, y)`` of the given partition rows, concatenated in client order."""
        parts = [self._data[k].tensors(rows) for k, rows in sorted(rows_by_client.items()) if len(rows)]
        if not parts:
            shape = self.data.image_shape
            return torch.zeros(0, *shape), torch.zeros(0, dtype=torch.long)
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

    def rows_of(self, client: int, ids: Iterable[int]) -> np.ndarray:
        """Partition rows of ``client`` holding ``ids`` (ids it does not hold are skipped)."""
        return np.flatnonzero(np.isin(self._data[client].ids, _as_ids(ids)))

    def labels_of(self, client: int, ids: Iterable[int]) -> np.ndarray:
        """Labels of ``ids`` of ``client``."""
        return self._data[client].labels[self.rows_of(client, ids)]

    # -- revocations ----------------------------------------------------------------------------------

    def as_revocation(self, request: Revocation | UnlearningRequest) -> dict[int, np.ndarray]:
        """A ``samples`` or ``client`` request (or a plain mapping) as ``{client: ids}``, checked.

        A client-level request revokes every sample the client still holds (slice 1 of every shard).
        """
        if isinstance(request, UnlearningRequest):
            if request.kind == "samples":
                request = dict(request.samples)
            elif request.kind == "client":
                unknown = [c for c in request.clients if c not in self._data]
                if unknown:
                    raise RequestError(f"Unknown clients {unknown}; known clients: 0-{len(self.clients) - 1}")
                request = {c: self._kept_ids(c) for c in request.clients}
            else:
                raise RequestError(
                    f"SISA handles sample- and client-level requests; {request.describe()} is a class request: "
                    "unlearn it with FIUn through the lineage."
                )
        return self.check_revocation(request)

    def _kept_ids(self, client: int) -> np.ndarray:
        revoked = np.concatenate([led.ids(client) for led in self.ledgers])
        ids = self._data[client].ids
        return ids[~np.isin(ids, revoked)]

    def check_revocation(self, revoked: Revocation) -> dict[int, np.ndarray]:
        """Check every client and id; return ``{client: unique ids}``.

        Raises
        ------
        RequestError
            Listing every problem: an empty forget set, unknown clients, ids a client does not hold, ids
            already revoked (with the path that removed them). Nothing is changed.
        """
        if not isinstance(revoked, Mapping):
            raise RequestError(f"revocations must be a mapping {{client: [ids]}}; got {type(revoked).__name__}")
        out, problems = {}, []
        for client, ids in revoked.items():
            if client not in self._data:
                problems.append(f"Unknown client {client!r}; known clients: 0-{len(self.clients) - 1}")
                continue
            arr = np.unique(_as_ids(ids, f"sample ids of client {client}"))
            problems += self._id_problems(int(client), arr)
            if arr.size:
                out[int(client)] = arr
        if not out and not problems:
            problems.append("Empty forget set: no sample ids given")
        if problems:
            raise RequestError("; ".join(problems))
        return out

    def _id_problems(self, client: int, ids: np.ndarray) -> list[str]:
        if not ids.size:
            return [f"Empty forget set for client {client}"]
        missing = ids[~np.isin(ids, self._data[client].ids)]
        problems = [f"Client {client} does not hold samples {_fmt(missing.tolist())} "
                    f"({len(missing)} of {len(ids)} requested)"] if missing.size else []
        for led in self.ledgers:
            done = [(int(i), led.revoked[client][int(i)]) for i in ids if int(i) in led.revoked.get(client, {})]
            if done:
                problems.append(f"Samples of client {client} already revoked (id, path): {_fmt(done)}")
        return problems

    def locate(self, revoked: Mapping[int, np.ndarray]) -> dict[int, dict[int, np.ndarray]]:
        """Split checked revocations by shard (:meth:`SisaLayout.locate`)."""
        return self.layout.locate(revoked)

    def first_slice(self, by_client: Mapping[int, np.ndarray]) -> int:
        """``r*``: the earliest slice among ``by_client``'s ids (:meth:`SisaLayout.first_slice`)."""
        return self.layout.first_slice(by_client)

    def start_stage(self, shard: int, r_star: int) -> int:
        """Where an exact rerun of ``shard`` must start (:meth:`ShardLedger.rerun_start`, pitfall P1)."""
        return self.ledgers[shard].rerun_start(r_star)

    def _add_revoked(self, revoked: Mapping[int, np.ndarray], path: str) -> None:
        for s, by_client in self.locate(revoked).items():
            for k, ids in by_client.items():
                self.ledgers[s].add(k, ids.tolist(), path)

    # -- training -------------------------------------------------------------------------------------

    def new_model(self) -> nn.Module:
        """An untrained instance of the architecture (weights not seeded; load a state dict into it)."""
        c, size = self.data.image_shape[0], self.data.image_shape[-1]
        return build_model(self.cfg.model, self.data.num_classes, in_channels=c, image_size=size)

    def initial_weights(self, shard: int) -> Weights:
        """``theta_{s,0}``: a pure function of ``(seed, shard)`` (:func:`initial_weights`)."""
        return initial_weights(self.new_model, self.cfg.seed, shard)

    def train(self, shards: Iterable[int] | None = None) -> dict[str, float]:
        """Train every stage of every shard (or of ``shards``) from scratch; checkpoint and record each stage.

        Returns
        -------
        dict[str, float]
            ``seconds``, ``evaluations`` (sample-gradient evaluations), ``rounds``.
        """
        start, first = time.perf_counter(), len(self.round_log)
        for s in (range(self.num_shards) if shards is None else shards):
            weights = self.initial_weights(s)
            self._commit(s, {0: self._checkpoint(s, 0, weights, version=0, parent=None, request_id=None)})
            new = self._run_stages(s, 1, weights, version=0, parent=self.nodes[s][0], request_id=None)
            self._commit(s, new)
        self.save_state()
        records = self.round_log[first:]
        return {"seconds": time.perf_counter() - start, "evaluations": float(sum(r.evaluations for r in records)),
                "rounds": float(len(records))}

    def _run_stages(self, shard: int, first: int, weights: Weights, *, version: int, parent: str | None,
                    request_id: str | None) -> dict[int, tuple[str, str]]:
        """Run stages ``first..R`` of ``shard`` from ``weights``; return ``{stage: (digest, node)}``."""
        out = {}
        for r in range(first, self.num_slices + 1):
            for t in range(self.cfg.rounds()[r - 1]):
                t0 = time.perf_counter()
                rows = {k: self.kept_rows(k, shard, r) for k in self.clients}
                weights, g = self.train_round(shard, weights, rows, (self.cfg.seed, shard, r, t))
                if t == self.cfg.rounds()[r - 1] - 1:
                    out[r] = self._checkpoint(shard, r, weights, version=version, parent=parent, request_id=request_id)
                    parent = out[r][1]
                self.round_log.append(RoundRecord(shard, r, t, g, time.perf_counter() - t0))
            logger.info("sisa: shard %d stage %d/%d done (version %d)", shard, r, self.num_slices, version)
        return out

    def train_round(self, shard: int, weights: Weights, rows: Mapping[int, np.ndarray], key: tuple, *,
                    epochs: int | None = None, fraction: float = 1.0) -> tuple[Weights, int]:
        """One FedAvg round of shard-federation ``shard``: every client with rows trains, the server averages.

        Parameters
        ----------
        shard : int
            Which shard-model (only used for logging; ``rows`` says what each client trains on).
        weights : Weights
            The round's starting weights (not modified).
        rows : Mapping[int, np.ndarray]
            Partition rows per client; clients with none are skipped (alike in every run, P4).
        key : tuple
            Seed tuple, e.g. ``(seed, shard, stage, round)``; the client id and epoch are appended.
        epochs : int | None (default: None)
            Local epochs (``cfg.local_epochs`` by default).
        fraction : float (default: 1.0)
            Share of each epoch's hash order each client trains on (OHS's halved epochs).

        Returns
        -------
        tuple[Weights, int]
            The averaged weights (the input weights when no client has rows) and the sample-gradient
            evaluations of the round.
        """
        epochs = self.cfg.local_epochs if epochs is None else epochs
        replies, evaluations = [], 0
        model = self.new_model()
        for k in sorted(rows):  # replies aggregate in partition-id order (float sums depend on order)
            if not len(rows[k]):
                continue
            n, new = self._data[k].train(model, weights, rows[k], key, self.cfg, epochs=epochs, fraction=fraction)
            replies.append((n, new))
            evaluations += epochs * n
        return (fedavg(replies) if replies else weights), evaluations

    # -- checkpoints and lineage ----------------------------------------------------------------------

    def _checkpoint(self, shard: int, stage: int, weights: Weights, *, version: int, parent: str | None,
                    request_id: str | None) -> tuple[str, str]:
        """Store stage ``stage``'s weights and add its lineage nodes; return ``(digest, node id)``."""
        meta = {"what": "sisa-checkpoint", "shard": shard, "stage": stage, "version": version}
        digest = self.store.put(weights, meta)
        node_id = f"sisa/s{shard}/v{version}/stage{stage}"
        if stage == 0:
            self.graph.add_node(node_id, "global", round=0, shard=shard, weights=digest, meta=meta)
            return digest, node_id
        locals_ = [self._local_node(shard, stage, k, version, parent, request_id) for k in self.clients]
        locals_ = [n for n in locals_ if n is not None]
        ids = np.concatenate([self._data[k].ids[self.kept_rows(k, shard, stage)] for k in self.clients])
        labels = np.concatenate([self._data[k].labels[self.kept_rows(k, shard, stage)] for k in self.clients])
        data = TrainingData(None, _histogram(labels), tuple(range(1, stage + 1)), sample_digest(ids.tolist()))
        self.graph.add_node(node_id, "global", parents=locals_ or [parent], round=stage, shard=shard, data=data,
                            weights=digest, request_id=request_id, meta=meta)
        return digest, node_id

    def _local_node(self, shard: int, stage: int, client: int, version: int, parent: str | None,
                    request_id: str | None) -> str | None:
        """One node per client and stage: what the client trained on in that stage (its rounds summarised)."""
        rows = self.kept_rows(client, shard, stage)
        if not len(rows):
            return None
        c = self._data[client]
        data = TrainingData.from_samples(client, c.labels[rows].tolist(), c.ids[rows].tolist(),
                                         slice_ids=range(1, stage + 1), store=self.store)
        node_id = f"sisa/s{shard}/v{version}/stage{stage}/client{client}"
        self.graph.add_node(node_id, "local", parents=[parent] if parent else [], round=stage, shard=shard,
                            owner=f"client:{client}", data=data, request_id=request_id)
        return node_id

    def _commit(self, shard: int, new: Mapping[int, tuple[str, str]]) -> None:
        """Swap new checkpoints in (after the last stage, P2); the shard then serves its stage-R model."""
        for r, (digest, node) in new.items():
            self.checkpoints[shard][r], self.nodes[shard][r] = digest, node
        R = self.num_slices
        if R in new:
            self.served[shard], self.served_nodes[shard] = self.checkpoints[shard][R], self.nodes[shard][R]

    def checkpoint_weights(self, shard: int, stage: int) -> Weights:
        """Weights of the current checkpoint of ``stage`` (0..R) of ``shard``."""
        digest = self.checkpoints[shard][stage]
        if digest is None:
            raise StoreError(f"shard {shard} has no checkpoint for stage {stage}; train the federation first.")
        return self.store.get(digest)

    def shard_weights(self, shard: int) -> Weights:
        """The weights shard ``shard`` serves now (stage R, or its approximately unlearned version)."""
        if self.served[shard] is None:
            raise StoreError(f"shard {shard} has no model yet; train the federation first.")
        return self.store.get(self.served[shard])

    def model(self, shard: int) -> nn.Module:
        """Shard-model ``shard`` as a module in eval mode."""
        model = self.new_model()
        model.load_state_dict(self.shard_weights(shard))
        return model.eval()

    def ensemble(self) -> Ensemble:
        """The served prediction model: mean softmax of the S shard-models."""
        return Ensemble([self.model(s) for s in range(self.num_shards)]).eval()

    def evaluate(self, ds: Dataset, *, batch_size: int = 256) -> dict[str, object]:
        """Ensemble and per-shard accuracy on ``ds`` (normally held-out data)."""
        loader = make_loader(ds, batch_size)
        return {"acc": accuracy(self.ensemble(), loader),
                "shard_acc": [accuracy(self.model(s), loader) for s in range(self.num_shards)]}

    # -- the exact path -------------------------------------------------------------------------------

    def unlearn_exact(self, revoked: Revocation | UnlearningRequest, *, request_id: str | None = None) -> ExactReport:
        """Remove ``revoked`` exactly: per touched shard, roll back to stage ``r0 - 1`` and rerun ``r0..R``.

        ``r0 = min(r*, d_s)``; the rerun leaves out every id revoked in the shard so far (``F_s``) and the new
        ones. Untouched shards are not changed. The result is bitwise the federation trained from scratch
        without all revoked ids, same seed (CPU, fixed threads).

        Parameters
        ----------
        revoked : Revocation | UnlearningRequest
            ``{client: ids}``, or a ``samples`` / ``client`` request.
        request_id : str | None (default: None)
            Recorded on the new lineage nodes (the request's id when a request is given).

        Returns
        -------
        ExactReport
            Per shard: ``r*``, start stage, stages rerun, sample-gradient evaluations, seconds.

        Raises
        ------
        RequestError
            Unknown clients, ids a client does not hold or already revoked, an empty set; nothing changed.
        StoreError
            The federation has not been trained.
        """
        if isinstance(revoked, UnlearningRequest):
            request_id = request_id or revoked.id
        checked = self.as_revocation(revoked)
        if not self.trained:
            raise StoreError("unlearn_exact needs a trained federation (no stage checkpoints yet); call train().")
        start, reruns = time.perf_counter(), {}
        for s, by_client in self.locate(checked).items():
            reruns[s] = self._rerun_shard(s, by_client, request_id)
        self.save_state()
        report = ExactReport(request_id, reruns, sum(r.evaluations for r in reruns.values()),
                             time.perf_counter() - start)
        logger.info("unlearn_exact: %d shard(s) rerun, %d evaluations, %.2f s", len(reruns), report.evaluations,
                    report.seconds)
        return report

    def _rerun_shard(self, shard: int, by_client: Mapping[int, np.ndarray], request_id: str | None) -> ShardRerun:
        t0, first_round = time.perf_counter(), len(self.round_log)
        r_star = self.first_slice(by_client)
        r0 = self.start_stage(shard, r_star)
        weights = self.checkpoint_weights(shard, r0 - 1)
        for k, ids in by_client.items():  # excluded from here on; committed with the new checkpoints below
            self.ledgers[shard].add(k, ids.tolist(), "exact")
        version = self.versions[shard] + 1
        try:
            new = self._run_stages(shard, r0, weights, version=version, parent=self.nodes[shard][r0 - 1],
                                   request_id=request_id)
        except BaseException:
            for k, ids in by_client.items():  # roll the ledger back: the old checkpoints stay in service
                for i in ids.tolist():
                    self.ledgers[shard].revoked[k].pop(i, None)
            raise
        self._commit(shard, new)
        self.versions[shard], self.ledgers[shard].dirty_from = version, None
        records = self.round_log[first_round:]
        return ShardRerun(shard, r_star, r0, list(range(r0, self.num_slices + 1)),
                          sum(r.evaluations for r in records), time.perf_counter() - t0, len(records))

    # -- approximate removals (recorded for P1) -------------------------------------------------------

    def record_approximate(self, shard: int, by_client: Mapping[int, np.ndarray], weights: Weights, *,
                           request_id: str | None, meta: Mapping[str, object] | None = None) -> str:
        """Serve ``weights`` (an approximately unlearned model) for ``shard`` and record what stays stale.

        The ids join ``F_s`` (path ``approximate``: never trained on again), ``d_s`` becomes
        ``min(d_s, r*)``, and the lineage nodes of stages ``>= d_s`` are marked ``stale`` (they still hold
        the data; never a rollback start or a parent). Returns the new served lineage node id.
        """
        r_star = self.first_slice(by_client)
        led = self.ledgers[shard]
        for k, ids in by_client.items():
            led.add(k, ids.tolist(), "approximate")
        led.dirty_from = r_star if led.dirty_from is None else min(led.dirty_from, r_star)
        digest = self.store.put(weights, {"what": "sisa-approximate", "shard": shard, "request": request_id})
        node_id = f"sisa/s{shard}/approx/{request_id or len(self.graph)}"
        self.graph.add_node(node_id, "global", parents=[self.served_nodes[shard]], round=self.num_slices,
                            shard=shard, weights=digest, request_id=request_id,
                            meta={"path": "approximate", "stale_from_stage": led.dirty_from, **(meta or {})})
        for r in range(led.dirty_from, self.num_slices + 1):
            node = self.graph.node(self.nodes[shard][r])
            stale = list(node.meta.get("stale_requests", [])) + [request_id]
            self.graph.update_node(node.id, meta={"stale": True, "stale_requests": stale})
        self.served[shard], self.served_nodes[shard] = digest, node_id
        self.save_state()
        return node_id

    # -- persistence ----------------------------------------------------------------------------------

    def state(self) -> dict[str, object]:
        """JSON-ready state: layout manifest, checkpoint digests and nodes, served models, ledgers, rounds."""
        return {"layout": self.layout.to_dict(), "checkpoints": self.checkpoints, "nodes": self.nodes,
                "served": self.served, "served_nodes": self.served_nodes, "versions": self.versions,
                "ledgers": [led.to_dict() for led in self.ledgers],
                "round_log": [vars(r) for r in self.round_log]}

    def save_state(self) -> None:
        """Write :meth:`state` to the store (``docs/sisa/state.json``, atomically)."""
        self.store.put_json(_STATE_DOC, self.state())

    @classmethod
    def restore(cls, data: FederatedData, cfg: SisaConfig, store: Store, graph: LineageGraph) -> SisaFederation:
        """Reopen a trained federation from its store and lineage (unlearning usually comes after training).

        Raises
        ------
        StoreError
            No saved state, or one made with another layout.
        """
        state = store.get_json(_STATE_DOC)
        if state is None:
            raise StoreError(f"no SISA state in {store!r}; train a SisaFederation with this store first.")
        fed = cls(data, cfg, store, graph)
        if SisaLayout.from_dict(state["layout"]) != fed.layout:
            raise StoreError(f"saved layout {state['layout']} differs from this config's {fed.layout.to_dict()}.")
        fed.checkpoints, fed.nodes, fed.versions = state["checkpoints"], state["nodes"], state["versions"]
        fed.served, fed.served_nodes = state["served"], state["served_nodes"]
        fed.ledgers = [ShardLedger.from_dict(obj) for obj in state["ledgers"]]
        fed.round_log = [RoundRecord(**r) for r in state["round_log"]]
        return fed


def _detach(state: Mapping[str, Tensor]) -> Weights:
    return {k: v.detach().clone() for k, v in state.items()}


def _histogram(labels: np.ndarray) -> dict[int, int]:
    classes, counts = np.unique(labels, return_counts=True)
    return {int(c): int(n) for c, n in zip(classes, counts)}

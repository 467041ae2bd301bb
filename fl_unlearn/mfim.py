"""MFIM: merge the forget-Fishers of several roots into one (``reference/fiun.md`` §4, §9).

With K roots each holding part of the forget data, a model that inherits from several of them is dampened with
one merged forget-Fisher. The modes:

- ``"max"``: element-wise maximum (scale 1).
- ``"max_scaled"``: the reference code's ``5 ** -(K - 1) * max``. The scale is **ad hoc** (a hand-set divisor
  tuned on training-set output); dividing F_f by c equals using ``alpha * c`` and ``lam * c`` in dampening, so
  it adds no degree of freedom, only stricter selection and milder dampening.
- ``"sum"``: element-wise sum (grows with K).
- ``"weighted_mean"``: ``sum(n_i F_i) / sum(n_i)``, the Fisher of the union on F_D's scale (exact for
  per-sample Fishers at the same weights).

The default is ``"max"`` for now; which mode to use is measured separately (fiun.md §4) and may change.

All modes give the same result for any order of the inputs, bit for bit: sums are taken in float64 over
element-wise sorted values, then rounded to the inputs' dtype, so replies arriving in any order merge alike.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fl_unlearn.errors import ConfigError, FisherError
from fl_unlearn.fisher import check_fisher

logger = logging.getLogger(__name__)

MERGE_MODES = ("max", "max_scaled", "sum", "weighted_mean")
"""Names accepted by ``mode``."""


def merge_fishers(
    fishers: Sequence[Mapping[str, Tensor]],
    *,
    num_samples: Sequence[float] | None = None,
    mode: str = "max",
    scale_base: float = 5.0,
) -> dict[str, Tensor]:
    """Merge K forget-Fisher diagonals into one.

    Parameters
    ----------
    fishers : Sequence[Mapping[str, Tensor]]
        K >= 1 Fishers with the same names and shapes.
    num_samples : Sequence[float] | None (default: None)
        Samples behind each Fisher; required by ``"weighted_mean"``, checked (length K, all > 0) when given.
    mode : str (default: "max")
        ``"max"``, ``"max_scaled"``, ``"sum"`` or ``"weighted_mean"`` (see the module docstring). The default is
        provisional: the choice of mode is still to be measured.
    scale_base : float (default: 5.0)
        ``c`` in ``c ** -(K - 1)`` for ``"max_scaled"``; must be > 0.

    Returns
    -------
    dict[str, Tensor]
        A new dict of new tensors (a copy when K = 1, whatever the mode); inputs are never modified.

    Raises
    ------
    FisherError
        No Fishers, or Fishers that differ in names or shapes, or hold NaN/inf or negative entries; the message
        names the key and the input's index.
    ConfigError
        Unknown mode, bad ``num_samples`` or ``scale_base``.

    Examples
    --------
    >>> a, b = {"w": torch.tensor([1.0, 4.0])}, {"w": torch.tensor([3.0, 2.0])}
    >>> merge_fishers([a, b])["w"]
    tensor([3., 4.])
    >>> merge_fishers([a, b], mode="weighted_mean", num_samples=[1, 3])["w"]
    tensor([2.5000, 2.5000])
    """
    fishers = list(fishers)
    weights = _check_arguments(len(fishers), num_samples, mode, scale_base)
    _check_same_layout(fishers)
    if len(fishers) == 1:
        return {name: t.clone() for name, t in fishers[0].items()}
    merged = {name: _merge_one([f[name] for f in fishers], weights, mode, scale_base) for name in fishers[0]}
    logger.debug("merge_fishers: %d Fishers, mode %s, %d tensors", len(fishers), mode, len(merged))
    return merged


def _check_arguments(k: int, num_samples: Sequence[float] | None, mode: str, scale_base: float) -> list[float] | None:
    if mode not in MERGE_MODES:
        raise ConfigError(f"Unknown merge mode {mode!r}; use one of {MERGE_MODES}.")
    if not (isinstance(scale_base, (int, float)) and math.isfinite(scale_base) and scale_base > 0):
        raise ConfigError(f"scale_base must be a finite number > 0, got {scale_base!r}.")
    if k == 0:
        raise FisherError("merge_fishers got no Fishers; at least one root must send its forget-Fisher.")
    if num_samples is None:
        if mode == "weighted_mean":
            raise ConfigError("mode 'weighted_mean' needs num_samples, the number of samples behind each Fisher.")
        return None
    return _check_num_samples(k, num_samples)


def _check_num_samples(k: int, num_samples: Sequence[float]) -> list[float]:
    values = list(num_samples)
    if len(values) != k:
        raise ConfigError(f"num_samples has {len(values)} entries for {k} Fishers; give one per Fisher.")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))
           or not math.isfinite(v) or v <= 0]
    if bad:
        raise ConfigError(f"num_samples must all be finite numbers > 0; got {bad}.")
    return [float(v) for v in values]


def _check_same_layout(fishers: list[Mapping[str, Tensor]]) -> None:
    """Every Fisher against the first: same names, same shapes, valid values."""
    first = fishers[0]
    problems = [f"fishers[0]: {p}" for p in check_fisher(first, first)]
    for i, fisher in enumerate(fishers[1:], start=1):
        problems += [f"fishers[{i}]: {p}" for p in check_fisher(fisher, first)]
        if isinstance(fisher, Mapping):
            problems += [f"fishers[{i}]: Fisher {name!r} is missing (present in fishers[0])."
                         for name in first if name not in fisher]
    if problems:
        raise FisherError(f"Cannot merge: {len(problems)} problem(s): " + "; ".join(problems))


def _merge_one(tensors: list[Tensor], weights: list[float] | None, mode: str, scale_base: float) -> Tensor:
    dtype = _result_dtype(tensors)
    stacked = torch.stack([t.to(dtype) for t in tensors])
    if mode == "max":
        return stacked.amax(dim=0)
    if mode == "max_scaled":
        return stacked.amax(dim=0) * scale_base ** -(len(tensors) - 1)
    wide = stacked.to(torch.float64)
    if mode == "weighted_mean":
        w = torch.tensor(weights, dtype=torch.float64, device=wide.device)
        wide = wide * w.view(-1, *([1] * (wide.dim() - 1)))
    total = wide.sort(dim=0).values.sum(dim=0)  # sorted: the same sum for any input order
    if mode == "weighted_mean":
        total = total / math.fsum(sorted(weights))
    return total.to(dtype)


def _result_dtype(tensors: list[Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype

"""FIUn selection and dampening, for one model or a whole batch of affected models at once.

Per element k of every tensor the Fishers cover (``reference/fiun.md`` §3, §9; Selective Synaptic Dampening)::

    selected  iff  F_f[k] > alpha * F_D[k]  and  F_f[k] > tau
    theta_k  <-  theta_k * min((lam * F_D[k] / F_f[k]) ** exponent, lower_bound)     (selected k only)

``F_f`` is the (merged) forget-Fisher, ``F_D`` the model's retain-Fisher. ``lower_bound`` is really an upper cap
on the factor (1: weights never grow). A selected element with ``F_D = 0`` gets factor 0: it is *zeroed*, and
counted. ``F_f = 0`` is never selected. The division only happens where selected (``F_f > 0`` there), over a
safe denominator elsewhere, and runs in float64, so zero or tiny Fishers give no NaN or inf, not even in
intermediate tensors (for finite config values up to ~1e200). Weights keep their dtype.

:func:`unlearn_many` stacks each tensor of N models into one ``[N, ...]`` tensor (on CPU, in chunks of models
that keep the stack cache-sized, :data:`CPU_CHUNK_ELEMENTS`) and applies the same element-wise step once per stack;
with no reductions involved the result equals a loop of :func:`dampen` bit for bit.
(With ``exponent != 1`` on CPU, ``pow`` may take a vectorised or a scalar path depending on an element's
position; both run in float64 and are rounded to the weights' dtype, so a mismatch would need the two float64
results to straddle a rounding boundary, about 1e-9 per element.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from fl_unlearn.errors import ConfigError, FisherError
from fl_unlearn.fisher import check_fisher

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FIUnConfig:
    """Dampening hyper-parameters (reference-code names in brackets).

    Parameters
    ----------
    alpha : float (default: 1.0)
        Selection weighting: select where ``F_f > alpha * F_D`` [``selection_weighting``]; >= 0.
    lam : float (default: 1.0)
        Dampening constant [``dampening_constant``]; >= 0.
    exponent : float (default: 1.0)
        Exponent of the factor [``exponent``]; > 0.
    lower_bound : float (default: 1.0)
        Cap on the factor, despite its name [``lower_bound``]; > 0; 1 means weights never grow.
    tau : float (default: 0.0)
        Noise floor: select only where ``F_f > tau``; >= 0 (0 is the paper's rule).

    Raises
    ------
    ConfigError
        Listing every value out of range.
    """

    alpha: float = 1.0
    lam: float = 1.0
    exponent: float = 1.0
    lower_bound: float = 1.0
    tau: float = 0.0

    def __post_init__(self) -> None:
        problems = [p for f in fields(self) if (p := _check_value(f.name, getattr(self, f.name)))]
        if problems:
            raise ConfigError("Invalid FIUnConfig: " + "; ".join(problems))


_STRICTLY_POSITIVE = {"exponent", "lower_bound"}


def _check_value(name: str, value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{name} must be a finite number, got {value!r}"
    if name in _STRICTLY_POSITIVE and value <= 0:
        return f"{name} must be > 0, got {value!r}"
    if value < 0:
        return f"{name} must be >= 0, got {value!r}"
    return None


@dataclass
class DampenStats:
    """What dampening did to one model (JSON-friendly via ``dataclasses.asdict``).

    Attributes
    ----------
    selected : int
        Elements whose factor was applied.
    zeroed : int
        Selected elements whose factor is 0 (``F_D = 0``, e.g. classes the model never saw).
    total : int
        Elements covered by the Fishers.
    per_tensor : dict[str, dict[str, int]]
        The same three counts per tensor name.
    """

    selected: int = 0
    zeroed: int = 0
    total: int = 0
    per_tensor: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, name: str, selected: int, zeroed: int, total: int) -> None:
        """Record one tensor's counts."""
        self.per_tensor[name] = {"selected": selected, "zeroed": zeroed, "total": total}
        self.selected += selected
        self.zeroed += zeroed
        self.total += total


# --------------------------------------------------------------------------------------------
# The element-wise step
# --------------------------------------------------------------------------------------------


def dampen_tensor(w: Tensor, f_retain: Tensor, f_forget: Tensor, cfg: FIUnConfig) -> tuple[Tensor, int, int]:
    """Dampen one tensor.

    Parameters
    ----------
    w : Tensor
        Weights (floating); not modified.
    f_retain : Tensor
        F_D, broadcastable to ``w``.
    f_forget : Tensor
        F_f, broadcastable to ``w``.
    cfg : FIUnConfig
        Hyper-parameters.

    Returns
    -------
    tuple[Tensor, int, int]
        New weights (same dtype and device as ``w``), number of selected and of zeroed elements.

    Examples
    --------
    >>> w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    >>> fd, ff = torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0.5, 4.0, 2.0, 0.0])
    >>> dampen_tensor(w, fd, ff, FIUnConfig())
    (tensor([1.0000, 0.5000, 0.0000, 4.0000]), 2, 1)
    """
    new, sel, beta = _dampen_math(w, f_retain, f_forget, cfg)
    return new, int(sel.sum()), int((sel & (beta == 0)).sum())


def _dampen_math(w: Tensor, fd: Tensor, ff: Tensor, cfg: FIUnConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Element-wise FIUn step; returns new weights, the selection mask and the factors (1 where unselected)."""
    work = torch.float32 if w.device.type == "mps" else torch.float64
    fd = fd.to(device=w.device, dtype=work)
    ff = ff.to(device=w.device, dtype=work)
    sel = (ff > cfg.alpha * fd) & (ff > cfg.tau)  # F_f > 0 wherever selected
    beta = _factors(fd, ff, sel, cfg)
    new = torch.where(sel, (w.to(work) * beta).to(w.dtype), w)
    return new, sel, torch.where(sel, beta, 1.0)


def _factors(fd: Tensor, ff: Tensor, mask: Tensor, cfg: FIUnConfig) -> Tensor:
    """``min((lam F_D / F_f) ** exponent, lower_bound)`` where ``mask`` (F_f > 0 there); 0 elsewhere."""
    return _cap(torch.where(mask, fd, 0.0).mul_(cfg.lam).div_(torch.where(mask, ff, 1.0)), cfg)


def _cap(ratio: Tensor, cfg: FIUnConfig) -> Tensor:
    """``min(ratio ** exponent, lower_bound)``, clamping before the power so no intermediate overflows."""
    if cfg.exponent == 1.0:
        return ratio.clamp_(max=cfg.lower_bound)
    try:
        limit = cfg.lower_bound ** (1.0 / cfg.exponent)
    except OverflowError:
        limit = math.inf
    return ratio.clamp_(max=limit).pow_(cfg.exponent).clamp_(max=cfg.lower_bound)


# --------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------


def dampen(
    weights: Mapping[str, Tensor],
    retain_fisher: Mapping[str, Tensor],
    forget_fisher: Mapping[str, Tensor],
    cfg: FIUnConfig,
) -> tuple[dict[str, Tensor], DampenStats]:
    """Unlearn one model: dampen every tensor the Fishers cover.

    Parameters
    ----------
    weights : Mapping[str, Tensor]
        The model's state dict; not modified.
    retain_fisher : Mapping[str, Tensor]
        F_D of this model, on the data it keeps.
    forget_fisher : Mapping[str, Tensor]
        F_f (merged where several roots), with the same names as ``retain_fisher``.
    cfg : FIUnConfig
        Hyper-parameters.

    Returns
    -------
    tuple[dict[str, Tensor], DampenStats]
        New weights (every tensor a copy; names not in the Fishers keep their values) and the counts.

    Raises
    ------
    FisherError
        Before any work, listing every problem: unknown names, shape mismatches, NaN/inf or negative entries,
        different names in the two Fishers, a covered weight that is not floating point.
    ConfigError
        If ``cfg`` is not a :class:`FIUnConfig`.
    """
    _check_config(cfg)
    names = _check_model_fishers(weights, retain_fisher, forget_fisher, label="")
    stats = DampenStats()
    out = {}
    for name, w in weights.items():
        if name in names:
            new, selected, zeroed = dampen_tensor(w, retain_fisher[name], forget_fisher[name], cfg)
            out[name] = new
            stats.add(name, selected, zeroed, w.numel())
        else:
            out[name] = w.clone()
    return out, stats


def _check_config(cfg: object) -> None:
    if not isinstance(cfg, FIUnConfig):
        raise ConfigError(f"cfg must be a FIUnConfig, got {type(cfg).__name__}.")


def _check_model_fishers(weights: Mapping[str, Tensor], retain: Mapping[str, Tensor],
                         forget: Mapping[str, Tensor], label: str, *, check_retain: bool = True,
                         check_forget: bool = True) -> list[str]:
    """Validate both Fishers against ``weights`` (each unless already checked); return the covered names.
    Raises one FisherError."""
    problems = [f"retain {p}" for p in check_fisher(retain, weights)] if check_retain else []
    problems += [f"forget {p}" for p in check_fisher(forget, weights)] if check_forget else []
    if not problems:
        problems += _name_mismatch(retain, forget)
        problems += [f"weight {n!r} has dtype {weights[n].dtype}; only floating weights can be dampened."
                     for n in retain if not weights[n].is_floating_point()]
    if problems:
        raise FisherError(f"{label}{len(problems)} problem(s): " + "; ".join(problems))
    return list(retain)


def _name_mismatch(retain: Mapping[str, Tensor], forget: Mapping[str, Tensor]) -> list[str]:
    only_retain = [n for n in retain if n not in forget]
    only_forget = [n for n in forget if n not in retain]
    problems = [f"{n!r} is in the retain-Fisher but not the forget-Fisher" for n in only_retain]
    return problems + [f"{n!r} is in the forget-Fisher but not the retain-Fisher" for n in only_forget]


# --------------------------------------------------------------------------------------------
# One model at many alphas
# --------------------------------------------------------------------------------------------


#: :meth:`FisherSweep.breaks_a_weight`: a candidate that zeroes more than this share of some weight tensor breaks the
#: model (it forgets by predicting nearly one class); the per-model checks never count it.
ZEROED_SHARE = 0.5


class FisherSweep:
    """One pair of Fishers at one lambda, for any number of models and alphas (the per-model checks).

    The eligibility ``F_f > tau`` and the factors ``min(lam F_D / F_f, 1)`` are computed once for the pair, each
    alpha's selection ``F_f > alpha * F_D`` once (and kept), and a model's dampened values once per model
    (:meth:`damped`); :meth:`at` is then one ``where`` per tensor. Results equal :func:`unlearn_many`'s bit for
    bit. The Fishers are not validated here (:func:`check_many` does it for the checks, :class:`AlphaSweep` for
    one model).

    Parameters
    ----------
    retain_fisher, forget_fisher : Mapping[str, Tensor]
        F_D and F_f, with the same names.
    cfg : FIUnConfig
        Settings; its ``alpha`` is ignored.
    like : Mapping[str, Tensor]
        A state dict of the models it will dampen (their device sets the working precision: float64, float32 on
        MPS).
    """

    def __init__(self, retain_fisher: Mapping[str, Tensor], forget_fisher: Mapping[str, Tensor], cfg: FIUnConfig,
                 *, like: Mapping[str, Tensor]) -> None:
        _check_config(cfg)
        self._parts: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self._selections: dict[float, dict[str, Tensor]] = {}
        self._last: tuple[float, dict[str, Tensor]] | None = None  # the latest selection, kept or not
        self._zeroes: dict[float, float] = {}  # zeroed_share per alpha, with its selection (the models share it)
        for name in retain_fisher:
            device = like[name].device
            work = torch.float32 if device.type == "mps" else torch.float64
            fd = retain_fisher[name].to(device=device, dtype=work)
            ff = forget_fisher[name].to(device=device, dtype=work)
            eligible = ff > cfg.tau  # selected at any alpha only where F_f > tau (so F_f > 0)
            self._parts[name] = (fd, ff, eligible, _factors(fd, ff, eligible, cfg))
        # Where a selection would zero a weight (factor 0: at lambda 0, or where F_D = 0), for the weight tensors that
        # have any such entry: zeroed_share is asked of every candidate, and at lambda 1 there is usually none. The
        # factors are 0 outside `eligible` too, but no alpha selects those entries.
        self._zero_masks: dict[str, Tensor] = {}
        for name, (_, _, eligible, factors) in self._parts.items():
            if name.endswith("weight") and factors.numel() > 1:
                zero = (factors == 0) & eligible
                if bool(zero.any()):
                    self._zero_masks[name] = zero

    def selection(self, alpha: float, *, keep: bool = True) -> dict[str, Tensor]:
        """Per tensor, the weights selected at ``alpha``; with ``keep``, computed once per alpha and kept (one
        mask per alpha: a grid of many alphas on a large model passes ``keep=False``). The latest one is remembered
        either way: a grid asks :meth:`zeroed_share` and then :meth:`at` of the same alpha."""
        if alpha in self._selections:
            return self._selections[alpha]
        if self._last is not None and self._last[0] == alpha:
            return self._last[1]
        selected = {name: (ff > alpha * fd) & eligible for name, (fd, ff, eligible, _) in self._parts.items()}
        if keep:
            self._selections[alpha] = selected
        self._last = (alpha, selected)
        return selected

    def zeroed_share(self, alpha: float, *, keep: bool = True) -> float:
        """The largest share of the entries of any ``*weight`` tensor (more than one entry) that dampening at
        ``alpha`` sets to 0 (at lambda 0: the selected ones). ``keep`` as in :meth:`selection` (kept, the answer
        is too: it depends on the Fishers and alpha only, not on the model a check is at)."""
        if alpha in self._zeroes:
            return self._zeroes[alpha]
        if not self._zero_masks:
            return 0.0
        selected = self.selection(alpha, keep=keep)
        share = max(float((selected[name] & zero).sum()) / zero.numel() for name, zero in self._zero_masks.items())
        if keep:
            self._zeroes[alpha] = share
        return share

    def zeroes_a_weight(self, alpha: float, *, keep: bool = True) -> bool:
        """Whether dampening at ``alpha`` sets every entry of some ``*weight`` tensor (more than one entry) to 0.

        At lambda 0 that happens once ``alpha`` selects the whole tensor. The layer then passes nothing on, so the
        model predicts (nearly) one class whatever the input: it forgets any class, trivially, and no repair revives
        it (the layer's gradients are 0 too). A smaller alpha selects more, so it zeroes the tensor too. The
        calibration and the checks leave out more than this (:meth:`breaks_a_weight`).
        """
        return self.zeroed_share(alpha, keep=keep) >= 1.0

    def breaks_a_weight(self, alpha: float, *, keep: bool = True) -> bool:
        """Whether dampening at ``alpha`` sets more than :data:`ZEROED_SHARE` (half) of the entries of some
        ``*weight`` tensor to 0: the per-model checks never count such a candidate as forgetting, and the calibration's
        grid does not score it.

        Zeroing most of a layer breaks the model as zeroing all of it does: on the App's MNIST class 9 the check
        (every grid alpha) took ``local-r1-p3`` to alpha 0.71 at lambda 0, which zeroed 86 % of its first
        convolution and 61 % of its second and left it at 15.5 % kept accuracy (89.6 % after the repair, 6.4 points
        below its retrained twin); every other dampening of the ten classes' 150 affected models zeroed at most 17 %
        of any weight tensor. The checks score no kept data, so this is their guard. The grid scores kept samples,
        where such a candidate loses anyway: it left out only those that zero a whole tensor (:meth:`zeroes_a_weight`)
        until 2026-12-07, and chose the same on every class of MNIST and digits (``benchmarks/robustness.py``) and of
        the App's MNIST federation; scoring them cost 7-17 % of each client's forward passes there.
        """
        return self.zeroed_share(alpha, keep=keep) > ZEROED_SHARE

    def damped(self, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Every covered tensor of ``weights`` multiplied by its factors (the values the selected weights take)."""
        return {name: (weights[name].to(factors.dtype) * factors).to(weights[name].dtype)
                for name, (_, _, _, factors) in self._parts.items()}

    def at(self, weights: Mapping[str, Tensor], damped: Mapping[str, Tensor], alpha: float, *,
           keep: bool = True) -> dict[str, Tensor]:
        """``weights`` dampened at ``alpha`` (``damped`` is :meth:`damped` of them): new tensors; names the Fishers
        do not cover are copies. ``keep`` as in :meth:`selection`."""
        selected = self.selection(alpha, keep=keep)
        return {name: torch.where(selected[name], damped[name], w) if name in selected else w.clone()
                for name, w in weights.items()}


class AlphaSweep:
    """One model dampened at many alphas, the Fishers and every other setting fixed (a calibration grid).

    Only the selection ``F_f > alpha * F_D`` depends on alpha: the factors and the dampened values are computed
    once, and :meth:`at` costs one comparison and one ``where`` per tensor.

    Parameters
    ----------
    weights : Mapping[str, Tensor]
        The model's state dict; not modified.
    retain_fisher, forget_fisher : Mapping[str, Tensor]
        F_D and F_f, validated here as :func:`dampen` does.
    cfg : FIUnConfig
        Settings; its ``alpha`` is ignored.

    Examples
    --------
    >>> w, fd, ff = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([2.0, 4.0])}
    >>> sweep = AlphaSweep(w, fd, ff, FIUnConfig())
    >>> sweep.at(3.0)["w"].tolist(), sweep.at(1.0)["w"].tolist()
    ([1.0, 0.5], [0.5, 0.5])
    """

    def __init__(self, weights: Mapping[str, Tensor], retain_fisher: Mapping[str, Tensor],
                 forget_fisher: Mapping[str, Tensor], cfg: FIUnConfig) -> None:
        _check_model_fishers(weights, retain_fisher, forget_fisher, label="")
        self._weights, self._cfg = weights, cfg
        self._fishers = FisherSweep(retain_fisher, forget_fisher, cfg, like=weights)
        self._damped = self._fishers.damped(weights)

    def at(self, alpha: float) -> dict[str, Tensor]:
        """The weights dampened at ``alpha``: ``unlearn_many([weights], [F_D], F_f, cfg with alpha)``'s, bit for
        bit (new tensors; names the Fishers do not cover are copies)."""
        return self._fishers.at(self._weights, self._damped, alpha, keep=False)

    def zeroes_a_weight(self, alpha: float) -> bool:
        """:meth:`FisherSweep.zeroes_a_weight` of these Fishers."""
        return self._fishers.zeroes_a_weight(alpha, keep=False)

    def breaks_a_weight(self, alpha: float) -> bool:
        """:meth:`FisherSweep.breaks_a_weight` of these Fishers."""
        return self._fishers.breaks_a_weight(alpha, keep=False)

    def effective_alpha(self, alpha: float) -> float:
        """The alpha that changes exactly the weights ``alpha`` changes: ``max(alpha, lam)`` when factors are
        capped at 1 (``lower_bound`` 1, a positive ``exponent``), else ``alpha``. A selected weight keeps factor
        ``min((lam F_D / F_f) ** exponent, 1) = 1`` wherever ``F_f <= lam F_D``, so below ``lam`` a smaller alpha
        selects more weights but changes no more: two alphas with the same effective alpha give bit-identical
        weights (at lambda 1, every alpha up to 1)."""
        cfg = self._cfg
        return max(alpha, cfg.lam) if cfg.lower_bound == 1.0 and cfg.exponent > 0 else alpha


# --------------------------------------------------------------------------------------------
# Many models at once
# --------------------------------------------------------------------------------------------


def unlearn_many(
    models: Sequence[Mapping[str, Tensor]],
    retain_fishers: Sequence[Mapping[str, Tensor]],
    forget_fisher: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]],
    cfg: FIUnConfig,
    *,
    check_fishers: bool = True,
) -> tuple[list[dict[str, Tensor]], list[DampenStats]]:
    """Unlearn N models in one vectorised step per tensor.

    For each covered name the N models' tensors are stacked into ``W[N, ...]``, their retain-Fishers into
    ``F_D[N, ...]``, and the forget-Fisher is broadcast (one dict for all) or stacked (one per model, where the
    merges differ); on CPU the N models go in chunks of at most :data:`CPU_CHUNK_ELEMENTS` stacked elements
    (:func:`_chunks`). The result equals ``[dampen(m, fd, ff, cfg) for ...]`` bit for bit (see the module note).

    Parameters
    ----------
    models : Sequence[Mapping[str, Tensor]]
        N >= 1 state dicts with the same names, shapes and dtypes; not modified.
    retain_fishers : Sequence[Mapping[str, Tensor]]
        One F_D per model, all with the same names.
    forget_fisher : Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]]
        One F_f shared by all models, or one per model; same names as the retain-Fishers.
    cfg : FIUnConfig
        Hyper-parameters.
    check_fishers : bool (default: True)
        Validate every Fisher (names, shapes, finite, non-negative) against the models. ``False`` only where the
        same Fishers were validated against the same models already (:func:`check_many`): a per-model choice
        dampens the affected models in one call per distinct candidate, and the checks cost a third of each call.

    Returns
    -------
    tuple[list[dict[str, Tensor]], list[DampenStats]]
        New weights per model (independent tensors) and counts per model, in input order.

    Raises
    ------
    ConfigError
        No models, lengths that do not match, models that differ in names, shapes or dtypes, a bad ``cfg``.
    FisherError
        Any Fisher problem, naming the model index and the key.
    """
    _check_config(cfg)
    models = list(models)
    forgets = _forget_list(forget_fisher, len(models))
    retains = list(retain_fishers)
    names = check_many(models, retains, forgets) if check_fishers else _check_layout(models, retains, forgets)
    outs: list[dict[str, Tensor]] = [{} for _ in models]
    stats = [DampenStats() for _ in models]
    for name in models[0]:
        if name in names:
            for chunk in _chunks(len(models), models[0][name]):
                _dampen_stacked(name, models[chunk], retains[chunk], forgets[chunk], cfg, outs[chunk], stats[chunk])
        else:
            for out, model in zip(outs, models):
                out[name] = model[name].clone()
    logger.info("unlearn_many: %d models, %d tensors, %d of %d elements selected", len(models), len(names),
                sum(s.selected for s in stats), sum(s.total for s in stats))
    return outs, stats


def check_many(models: Sequence[Mapping[str, Tensor]], retain_fishers: Sequence[Mapping[str, Tensor]],
               forget_fishers: Sequence[Mapping[str, Tensor]]) -> list[str]:
    """What :func:`unlearn_many` checks before dampening: one model per Fisher pair, one architecture, and every
    Fisher (each distinct dict once: names, shapes, finite, non-negative). Returns the names the Fishers cover.

    Raises
    ------
    ConfigError
        No models, lengths that do not match, models that differ in names, shapes or dtypes.
    FisherError
        Any Fisher problem, naming the model index and the key.
    """
    models, retains, forgets = list(models), list(retain_fishers), list(forget_fishers)
    _check_layout(models, retains, forgets)
    return _check_all_fishers(models[0], retains, forgets)


def _check_layout(models: list, retains: list, forgets: list) -> list[str]:
    _check_lengths(len(models), len(retains), len(forgets))
    _check_same_models(models)
    return list(retains[0])


def _forget_list(forget_fisher: object, n: int) -> list[Mapping[str, Tensor]]:
    if isinstance(forget_fisher, Mapping):
        return [forget_fisher] * n
    if isinstance(forget_fisher, Sequence) and not isinstance(forget_fisher, (str, bytes)):
        return list(forget_fisher)
    raise ConfigError(f"forget_fisher must be a dict or a list of dicts, got {type(forget_fisher).__name__}.")


def _check_lengths(n_models: int, n_retain: int, n_forget: int) -> None:
    if n_models == 0:
        raise ConfigError("unlearn_many got no models; the affected set is empty.")
    if n_retain != n_models:
        raise ConfigError(f"{n_models} models but {n_retain} retain-Fishers; give one per model.")
    if n_forget != n_models:
        raise ConfigError(f"{n_models} models but {n_forget} forget-Fishers; give one, or one per model.")


def _check_same_models(models: list[Mapping[str, Tensor]]) -> None:
    problems = [p for i, model in enumerate(models[1:], start=1) for p in _layout_problems(i, model, models[0])]
    if problems:
        raise ConfigError("unlearn_many needs models of one architecture: " + "; ".join(problems))


def _layout_problems(i: int, model: Mapping[str, Tensor], first: Mapping[str, Tensor]) -> list[str]:
    problems = [f"models[{i}] lacks {n!r}" for n in first if n not in model]
    problems += [f"models[{i}] has extra {n!r}" for n in model if n not in first]
    for name, t in model.items():
        ref = first.get(name)
        if ref is not None and (t.shape != ref.shape or t.dtype != ref.dtype):
            problems.append(f"models[{i}][{name!r}] is {tuple(t.shape)} {t.dtype}, models[0] has "
                            f"{tuple(ref.shape)} {ref.dtype}")
    return problems


def _check_all_fishers(reference: Mapping[str, Tensor], retains: list, forgets: list) -> list[str]:
    """Validate every model's pair of Fishers; all must cover the same names. Raises one FisherError."""
    problems, checked = [], set()
    for i, (retain, forget) in enumerate(zip(retains, forgets)):
        try:
            _check_model_fishers(reference, retain, forget, label=f"models[{i}]: ",
                                 check_retain=id(retain) not in checked, check_forget=id(forget) not in checked)
        except FisherError as err:
            problems.append(str(err))
        checked.update((id(retain), id(forget)))
    if not problems:
        first = set(retains[0])
        problems = [f"models[{i}]: the Fishers differ from models[0]'s on {sorted(set(r) ^ first)}"
                    for i, r in enumerate(retains) if set(r) != first]
    if problems:
        raise FisherError("; ".join(problems))
    return list(retains[0])


#: Elements of one stacked tensor on CPU: the element-wise step makes about fifteen passes over float64 copies of
#: it, which stay in a core's cache at this size (2 MiB). Stacking all N models at once was slower than a loop of
#: :func:`dampen` from N = 64 (the small CNN's hidden layer: 64 x 65,536 elements, 33 MiB per float64 copy).
CPU_CHUNK_ELEMENTS = 2**18


def _chunks(n: int, like: Tensor) -> list[slice]:
    """Slices of the N models to stack together for one tensor shaped like ``like``: on CPU as many as fit in
    :data:`CPU_CHUNK_ELEMENTS` (at least one), elsewhere all N (a GPU gains from one launch over everything)."""
    if like.device.type != "cpu":
        return [slice(0, n)]
    per = max(1, CPU_CHUNK_ELEMENTS // max(1, like.numel()))
    return [slice(i, min(i + per, n)) for i in range(0, n, per)]


def _dampen_stacked(name: str, models: list, retains: list, forgets: list, cfg: FIUnConfig, outs: list[dict],
                    stats: list[DampenStats]) -> None:
    w = torch.stack([m[name] for m in models])
    fd, ff = _broadcast_or_stacked(name, retains, w.device), _broadcast_or_stacked(name, forgets, w.device)
    new, sel, beta = _dampen_math(w, fd, ff, cfg)
    n = len(models)
    selected, zeroed = _counts_per_model(sel, n, w), _counts_per_model(sel & (beta == 0), n, w)
    for i in range(n):
        outs[i][name] = new[i].clone()
        stats[i].add(name, selected[i], zeroed[i], models[i][name].numel())


def _broadcast_or_stacked(name: str, fishers: list, device: torch.device) -> Tensor:
    """One Fisher for every model (the same dict N times): its tensor, broadcast over the models, so the
    selection and the factors are computed once (a per-model check dampens 14 models with one pair); else
    the N tensors stacked."""
    if all(f is fishers[0] for f in fishers):
        return fishers[0][name].to(device)
    return torch.stack([f[name].to(device) for f in fishers])


def _counts_per_model(mask: Tensor, n: int, stacked: Tensor) -> list[int]:
    """True entries of ``mask`` per model; a mask without the model axis (both Fishers shared) counts once."""
    if mask.dim() < stacked.dim():
        return [int(mask.sum())] * n
    return [int(c) for c in mask.reshape(n, -1).sum(dim=1).tolist()]

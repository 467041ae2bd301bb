"""The unlearning baselines FIUn is compared against, framework-agnostic (``reference/fiun.md`` §8).

Each baseline takes the whole affected network at once, as a list of state dicts with one data source per
model, so a comparison is about every model that inherited the data, not one:

- :func:`finetune`: train each model a few epochs (or a capped number of steps) on the data it keeps, hoping
  the forgotten data fades (catastrophic forgetting). Cost grows with the data kept and with the network.
- :func:`gradient_ascent`: ascend the cross-entropy of the data to forget. Unbounded ascent diverges (the loss
  grows without limit by inflating logits, and the model's kept accuracy collapses with it), so every step is
  bounded three ways: gradients are clipped to ``max_grad_norm``, a batch whose loss already reaches
  ``loss_ceiling`` stops the ascent for that model before any further step, and ``max_steps`` caps the steps.
- Exact paths, not repeated here: retraining every affected model from scratch without the data is
  :meth:`fl_unlearn.inherited.InheritedNetwork.retrain` (or a fresh federation run without the data, same
  seeds), and SISA's exact path is :meth:`fl_unlearn.sisa.SisaFederation.unlearn_exact`; :func:`sisa_exact`
  wraps the latter into the same :class:`BaselineResult` shape.

Inputs are never modified: each model is loaded into a private copy of ``model``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

from fl_unlearn.errors import ConfigError
from fl_unlearn.requests import UnlearningRequest
from fl_unlearn.sisa import SisaFederation
from fl_unlearn.train import train_local

logger = logging.getLogger(__name__)

Weights = Mapping[str, Tensor]
Batches = Iterable[tuple[Tensor, Tensor]]
"""Re-iterable ``(x, y)`` batches, e.g. ``fl_unlearn.data.make_loader(ds, batch_size, shuffle=True)``."""


@dataclass
class BaselineResult:
    """What a baseline did to every model of a network, in input order.

    Attributes
    ----------
    weights : list[dict[str, Tensor]]
        The new state dicts (independent tensors).
    seconds : float
        Wall time of the whole call (all models).
    steps : list[int]
        Optimiser steps per model (:func:`sisa_exact`: FedAvg rounds rerun per shard).
    stop_reasons : list[str]
        Why each model stopped: ``"budget"`` (epochs or ``max_steps`` used up), ``"loss_ceiling"``,
        ``"no_data"``, ``"exact"`` (rerun) or ``"untouched"``.
    """

    weights: list[dict[str, Tensor]]
    seconds: float
    steps: list[int]
    stop_reasons: list[str]
    details: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning on kept data (SGD, cross-entropy, the project's ``train_local``).

    Parameters
    ----------
    epochs : int (default: 1)
        Passes over each model's kept data; >= 1.
    lr, momentum : float (default: 0.01, 0.9)
        SGD settings; ``lr > 0``, ``momentum >= 0``.
    max_steps : int | None (default: None)
        Cap on the steps per model over all epochs (``None``: no cap); >= 1.
    """

    epochs: int = 1
    lr: float = 0.01
    momentum: float = 0.9
    max_steps: int | None = None

    def __post_init__(self) -> None:
        problems = _finite_problems(self)
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0 or self.momentum < 0:
            problems.append(f"need lr > 0 and momentum >= 0, got lr={self.lr}, momentum={self.momentum}")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be None or >= 1, got {self.max_steps}")
        _raise_if(problems, "FinetuneConfig")


@dataclass(frozen=True)
class AscentConfig:
    """Bounded gradient ascent on the data to forget.

    Parameters
    ----------
    lr : float (default: 0.01)
        SGD step size; > 0.
    max_steps : int (default: 20)
        Most ascent steps per model (cycling over its forget batches); >= 1.
    loss_ceiling : float (default: 5.0)
        Stop a model as soon as a forget batch's mean cross-entropy reaches this, before stepping on it (5 nats
        puts the true class at about e^-5 < 1 % probability: forgotten, without chasing an unbounded loss); > 0.
    max_grad_norm : float (default: 1.0)
        Global gradient-norm clip per step; > 0.
    momentum : float (default: 0.0)
        SGD momentum; >= 0 (0 keeps every step within ``lr * max_grad_norm``).
    """

    lr: float = 0.01
    max_steps: int = 20
    loss_ceiling: float = 5.0
    max_grad_norm: float = 1.0
    momentum: float = 0.0

    def __post_init__(self) -> None:
        problems = _finite_problems(self)
        if not (self.lr > 0 and self.loss_ceiling > 0 and self.max_grad_norm > 0):
            problems.append(f"lr, loss_ceiling and max_grad_norm must be > 0, got {self.lr}, {self.loss_ceiling}, "
                            f"{self.max_grad_norm}")
        if self.max_steps < 1 or self.momentum < 0:
            problems.append(f"need max_steps >= 1 and momentum >= 0, got {self.max_steps}, {self.momentum}")
        _raise_if(problems, "AscentConfig")


def finetune(
    model: nn.Module,
    weights: Sequence[Weights],
    retain_batches: Sequence[Batches],
    cfg: FinetuneConfig | None = None,
    *,
    device: str | torch.device = "cpu",
) -> BaselineResult:
    """Fine-tune every model on the data it keeps.

    Parameters
    ----------
    model : nn.Module
        Any instance of the architecture; a private copy is trained, ``model`` is not changed.
    weights : sequence of dict
        The N affected models' state dicts (not modified).
    retain_batches : sequence of Batches
        One re-iterable batch source per model: the data that model keeps.
    cfg : FinetuneConfig | None (default: None)
        Epochs, step cap and SGD settings (``FinetuneConfig()`` when ``None``).
    device : str | torch.device (default: "cpu")
        Where to train.

    Returns
    -------
    BaselineResult
        ``stop_reasons``: ``"budget"``, or ``"no_data"`` for a model whose kept data is empty (unchanged).

    Raises
    ------
    ConfigError
        No models, or not one batch source per model.
    """
    _check_network(weights, retain_batches, "retain_batches")
    cfg = cfg or FinetuneConfig()
    work = copy.deepcopy(model)
    start = time.perf_counter()
    out, steps, reasons = [], [], []
    for w, batches in zip(weights, retain_batches):
        work.load_state_dict(w)
        budget = _StepBudget(batches, cfg.max_steps)
        stats = train_local(work, budget, epochs=cfg.epochs, lr=cfg.lr, momentum=cfg.momentum, device=device)
        out.append(_detached(work))
        steps.append(int(stats["num_steps"]))
        reasons.append("budget" if stats["num_steps"] else "no_data")
    seconds = time.perf_counter() - start
    logger.info("finetune: %d models, %d steps, %.2f s", len(out), sum(steps), seconds)
    return BaselineResult(out, seconds, steps, reasons)


def gradient_ascent(
    model: nn.Module,
    weights: Sequence[Weights],
    forget_batches: Sequence[Batches],
    cfg: AscentConfig | None = None,
    *,
    device: str | torch.device = "cpu",
) -> BaselineResult:
    """Ascend the cross-entropy of the data to forget on every model, bounded (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        Any instance of the architecture; a private copy is trained, ``model`` is not changed.
    weights : sequence of dict
        The N affected models' state dicts (not modified).
    forget_batches : sequence of Batches
        One re-iterable batch source per model: the forgotten data that reached it (its own, or its roots').
    cfg : AscentConfig | None (default: None)
        Step size and the three bounds (``AscentConfig()`` when ``None``).

    Returns
    -------
    BaselineResult
        ``stop_reasons``: ``"budget"`` (``max_steps``), ``"loss_ceiling"`` or ``"no_data"`` (unchanged).

    Raises
    ------
    ConfigError
        No models, or not one batch source per model.
    """
    _check_network(weights, forget_batches, "forget_batches")
    cfg = cfg or AscentConfig()
    work = copy.deepcopy(model).to(device)
    start = time.perf_counter()
    out, steps, reasons = [], [], []
    for w, batches in zip(weights, forget_batches):
        work.load_state_dict(w)
        done, reason = _ascend(work, batches, cfg, device)
        out.append(_detached(work))
        steps.append(done)
        reasons.append(reason)
    seconds = time.perf_counter() - start
    logger.info("gradient_ascent: %d models, %d steps, %.2f s (%s)", len(out), sum(steps), seconds,
                ", ".join(f"{r}: {reasons.count(r)}" for r in sorted(set(reasons))))
    return BaselineResult(out, seconds, steps, reasons)


def sisa_exact(federation: SisaFederation, request: UnlearningRequest | Mapping[int, Iterable[int]]) -> BaselineResult:
    """SISA's exact path on a trained federation (in place), as a :class:`BaselineResult` over its shard-models.

    ``request`` is a ``samples`` or ``client`` request or ``{client: ids}`` (SISA does not take class
    requests). ``steps`` are the FedAvg rounds rerun per shard (0: the shard held none of the data).
    """
    report = federation.unlearn_exact(request)
    shards = range(federation.num_shards)
    rounds = [report.shards[s].rounds if s in report.shards else 0 for s in shards]
    return BaselineResult([federation.shard_weights(s) for s in shards], report.seconds, rounds,
                          ["exact" if s in report.shards else "untouched" for s in shards],
                          {"report": report.to_dict()})


# ---- helpers -------------------------------------------------------------------------------------------


class _StepBudget:
    """Batches of ``batches``, re-iterable per epoch, stopping for good after ``max_steps`` in total."""

    def __init__(self, batches: Batches, max_steps: int | None) -> None:
        self.batches, self.left = batches, math.inf if max_steps is None else max_steps

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.batches:
            if self.left <= 0:
                return
            self.left -= 1
            yield batch


def _ascend(model: nn.Module, batches: Batches, cfg: AscentConfig, device: str | torch.device) -> tuple[int, str]:
    """Bounded ascent of one model in place; returns (steps, stop reason)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    was_training = model.training
    model.train()
    steps = 0
    try:
        while steps < cfg.max_steps:
            seen_batch = False
            for x, y in batches:
                seen_batch = True
                loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
                if float(loss.detach()) >= cfg.loss_ceiling:
                    return steps, "loss_ceiling"
                optimizer.zero_grad(set_to_none=True)
                (-loss).backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                steps += 1
                if steps >= cfg.max_steps:
                    break
            if not seen_batch:
                return steps, "no_data"
        return steps, "budget"
    finally:
        model.train(was_training)


def _check_network(weights: Sequence[Weights], batches: Sequence[Batches], what: str) -> None:
    if len(weights) == 0:
        raise ConfigError("A baseline got no models; the affected set is empty.")
    if len(batches) != len(weights):
        raise ConfigError(f"{len(batches)} {what} for {len(weights)} models; give one batch source per model.")


def _detached(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _finite_problems(cfg: object) -> list[str]:
    return [f"{f.name} must be finite, got {getattr(cfg, f.name)!r}" for f in fields(cfg)
            if isinstance(getattr(cfg, f.name), float) and not math.isfinite(getattr(cfg, f.name))]


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        raise ConfigError(f"Invalid {what}: " + "; ".join(problems))

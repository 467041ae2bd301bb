"""The local training loop every client, baseline and example uses."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from fl_unlearn.errors import ConfigError

logger = logging.getLogger(__name__)

OnStep = Callable[[int, int, float], None]
"""``on_step(step, batch_size, loss)``: called after ``backward()``, before ``optimizer.step()``."""


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_local(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    epochs: int = 1,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    device: str | torch.device = "cpu",
    on_step: OnStep | None = None,
) -> dict[str, float]:
    """Train ``model`` in place with SGD and cross-entropy.

    Parameters
    ----------
    model : nn.Module
        Trained in place (moved to ``device``); its train/eval mode is restored afterwards.
    loader : Iterable[tuple[Tensor, Tensor]]
        Batches ``(x, y)``, e.g. from ``fl_unlearn.data.make_loader``.
    epochs : int (default: 1)
        Passes over ``loader``.
    lr, momentum, weight_decay : float (default: 0.05, 0.9, 0.0)
        SGD settings.
    proximal_mu : float (default: 0.0)
        FedProx: adds ``mu / 2 * ||w - w_start||^2`` with ``w_start`` the weights at the call.
    device : str | torch.device (default: "cpu")
        Where to train.
    on_step : OnStep | None (default: None)
        ``on_step(step, batch_size, loss)`` after each backward, before the optimiser step, while the
        gradients are in ``.grad`` (a hook point, e.g. for counting samples next to a Fisher accumulator).

    Returns
    -------
    dict[str, float]
        ``loss`` (mean cross-entropy over all samples seen, proximal term excluded; NaN if no batch),
        ``num_examples`` (samples in one epoch), ``num_steps``, ``seconds``, ``samples_per_second``.

    Notes
    -----
    Deterministic given the torch seed and a deterministic loader (``make_loader(..., seed=...)``).
    """
    _check_hyperparameters(epochs, lr, momentum, weight_decay, proximal_mu)
    was_training = model.training
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    # Detached copies: the proximal term pulls towards the weights the client received.
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None

    start = time.perf_counter()
    loss_sum, seen, steps, per_epoch = 0.0, 0, 0, 0
    for epoch in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = _step(model, optimizer, params, anchor, proximal_mu, x, y, steps, on_step)
            loss_sum += loss * len(y)
            seen += len(y)
            steps += 1
        per_epoch = seen if epoch == 0 else per_epoch
    seconds = time.perf_counter() - start
    model.train(was_training)

    logger.debug("train_local: %d steps, %d samples in %.2f s", steps, seen, seconds)
    return {
        "loss": loss_sum / seen if seen else float("nan"),
        "num_examples": per_epoch,
        "num_steps": steps,
        "seconds": seconds,
        "samples_per_second": seen / seconds if seconds > 0 else float("nan"),
    }


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    anchor: list[torch.Tensor] | None,
    proximal_mu: float,
    x: torch.Tensor,
    y: torch.Tensor,
    step: int,
    on_step: OnStep | None,
) -> float:
    """One SGD step; returns the batch's mean cross-entropy (without the proximal term)."""
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    total = loss
    if anchor is not None:
        drift = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
        total = loss + 0.5 * proximal_mu * drift
    total.backward()
    value = float(loss.detach())
    if on_step is not None:
        on_step(step, len(y), value)
    optimizer.step()
    return value


def _check_hyperparameters(
    epochs: int, lr: float, momentum: float, weight_decay: float, proximal_mu: float
) -> None:
    if epochs < 0:
        raise ConfigError(f"epochs must be >= 0, got {epochs}.")
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr}.")
    named = (("momentum", momentum), ("weight_decay", weight_decay), ("proximal_mu", proximal_mu))
    for name, value in named:
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}.")

"""Evaluation on held-out data: accuracy, forget/retain accuracy, loss-threshold membership inference."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch
from datasets import Dataset
from sklearn.metrics import roc_auc_score
from torch import nn

from fl_unlearn.data import make_loader

logger = logging.getLogger(__name__)

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def accuracy(model: nn.Module, loader: Batches, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy in ``[0, 1]`` over ``loader``; ``nan`` when it yields no samples."""
    logits, labels = _logits_and_labels(model, loader, device)
    if len(labels) == 0:
        return float("nan")
    return float((logits.argmax(dim=1) == labels).float().mean())


def predict_logits(model: nn.Module, loader: Batches, device: str | torch.device = "cpu") -> torch.Tensor:
    """Logits ``[N, num_classes]`` (float32, on the CPU) for every sample of ``loader``, in order."""
    return _logits_and_labels(model, loader, device)[0]


def forget_retain_accuracy(
    model: nn.Module,
    ds: Dataset,
    forget_classes: Iterable[int],
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Accuracy on the rows of ``forget_classes``, on the rest, and on all of ``ds``, in one pass.

    Parameters
    ----------
    model : nn.Module
        Evaluated in eval mode; its mode is restored afterwards.
    ds : Dataset
        A dataset from ``fl_unlearn.data`` (normally the held-out test split).
    forget_classes : Iterable[int]
        Classes being forgotten.
    batch_size : int (default: 256)
        Evaluation batch size.
    device : str | torch.device (default: "cpu")
        Where to run the model.

    Returns
    -------
    dict[str, float]
        ``forget_acc``, ``retain_acc``, ``acc``; a part with no rows is ``nan``.
    """
    logits, labels = _logits_and_labels(model, make_loader(ds, batch_size), device)
    correct = (logits.argmax(dim=1) == labels).numpy()
    is_forget = np.isin(labels.numpy(), np.fromiter(forget_classes, dtype=np.int64))
    return {
        "forget_acc": _mean(correct[is_forget]),
        "retain_acc": _mean(correct[~is_forget]),
        "acc": _mean(correct),
    }


def per_sample_loss(
    model: nn.Module, ds: Dataset, *, batch_size: int = 256, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Cross-entropy of every row of ``ds`` (float64 ``[N]``, in row order)."""
    logits, labels = _logits_and_labels(model, make_loader(ds, batch_size), device)
    return nn.functional.cross_entropy(logits, labels, reduction="none").double().numpy()


def loss_threshold_mia_auc(
    model: nn.Module,
    member_ds: Dataset,
    nonmember_ds: Dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> float:
    """ROC AUC of a loss-threshold membership-inference attack (lower loss => "member").

    0.5 means the attacker cannot tell members from non-members; after unlearning, the forget set should
    look like non-members (AUC close to that of truly unseen data).

    Returns
    -------
    float
        AUC in ``[0, 1]``; ``nan`` when either dataset is empty.
    """
    member = per_sample_loss(model, member_ds, batch_size=batch_size, device=device)
    nonmember = per_sample_loss(model, nonmember_ds, batch_size=batch_size, device=device)
    if len(member) == 0 or len(nonmember) == 0:
        logger.warning(
            "loss_threshold_mia_auc: %d members, %d non-members; AUC undefined", len(member), len(nonmember)
        )
        return float("nan")
    is_member = np.concatenate([np.ones(len(member)), np.zeros(len(nonmember))])
    return float(roc_auc_score(is_member, -np.concatenate([member, nonmember])))


def _logits_and_labels(
    model: nn.Module, loader: Batches, device: str | torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` over ``loader`` in eval mode without gradients; CPU tensors, in loader order."""
    was_training = model.training
    model.to(device).eval()
    logits, labels = [], []
    try:
        with torch.no_grad():
            for x, y in loader:
                logits.append(model(x.to(device)).float().cpu())
                labels.append(y.cpu())
    finally:
        model.train(was_training)
    if not logits:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")

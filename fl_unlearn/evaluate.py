"""Evaluation on held-out data: accuracy, forget/retain accuracy, loss-threshold membership inference, and a
backdoor check for client-level requests.

The backdoor check (``reference/flower.md`` §6): the client to forget trains on data of which a fraction carries
a trigger patch and a target label (:func:`poison_dataset`); the attack success rate (:func:`attack_success_rate`)
is the share of triggered held-out samples of the other classes that a model puts in the target class. A
model that has forgotten the client should score as low as one retrained without it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, DatasetInfo
from datasets.table import InMemoryTable
from sklearn.metrics import roc_auc_score
from torch import nn

from fl_unlearn.data import make_loader, sample_ids
from fl_unlearn.errors import ConfigError

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
    return mia_auc_from_losses(member, nonmember)


def mia_auc_from_losses(member: np.ndarray, nonmember: np.ndarray) -> float:
    """:func:`loss_threshold_mia_auc` from per-sample losses already computed (e.g. where the members live).

    Examples
    --------
    >>> mia_auc_from_losses(np.array([0.1, 0.2]), np.array([1.0, 2.0]))
    1.0
    """
    member, nonmember = np.asarray(member, dtype=np.float64), np.asarray(nonmember, dtype=np.float64)
    if len(member) == 0 or len(nonmember) == 0:
        logger.warning("loss-threshold MIA: %d members, %d non-members; AUC undefined", len(member), len(nonmember))
        return float("nan")
    is_member = np.concatenate([np.ones(len(member)), np.zeros(len(nonmember))])
    return float(roc_auc_score(is_member, -np.concatenate([member, nonmember])))


# --------------------------------------------------------------------------------------------------------
# Backdoor check (client-level requests)
# --------------------------------------------------------------------------------------------------------


def add_trigger(images: np.ndarray, *, patch: int = 3, value: int = 255) -> np.ndarray:
    """A copy of ``images`` with a ``patch`` x ``patch`` square set to ``value`` in the bottom-right corner.

    Parameters
    ----------
    images : np.ndarray
        uint8 images as the datasets store them: ``[N, H, W]`` (grey) or ``[N, H, W, C]`` (colour).
    patch : int (default: 3)
        Side of the square, in pixels; ``1 <= patch <= min(H, W)``.
    value : int (default: 255)
        Pixel value of the square (every channel), ``0..255``.

    Returns
    -------
    np.ndarray
        A new uint8 array; ``images`` is not changed.

    Raises
    ------
    ConfigError
        Not uint8, not 3-D or 4-D, a patch that does not fit, a value outside ``0..255``.

    Examples
    --------
    >>> add_trigger(np.zeros((1, 4, 4), np.uint8), patch=2)[0]
    array([[  0,   0,   0,   0],
           [  0,   0,   0,   0],
           [  0,   0, 255, 255],
           [  0,   0, 255, 255]], dtype=uint8)
    """
    _check_trigger(images, patch, value)
    out = images.copy()
    out[:, -patch:, -patch:] = value
    return out


def poison_dataset(
    ds: Dataset, fraction: float, target: int, *, patch: int = 3, value: int = 255, seed: int = 0
) -> tuple[Dataset, np.ndarray]:
    """A copy of ``ds`` in which a seeded ``fraction`` of the rows carry the trigger and the label ``target``.

    Rows keep their order and ids, so lineage, partitions and sample-level requests still name them.

    Parameters
    ----------
    ds : Dataset
        A dataset from ``fl_unlearn.data`` (e.g. the partition of the client to poison).
    fraction : float
        Share of rows to poison, in ``(0, 1]``; at least one row is poisoned.
    target : int
        The label the poisoned rows get (the attacker's target class).
    patch, value : int (default: 3, 255)
        The trigger (:func:`add_trigger`).
    seed : int (default: 0)
        Chooses the rows.

    Returns
    -------
    tuple[Dataset, np.ndarray]
        The poisoned dataset, and the sorted ids of the poisoned rows.

    Raises
    ------
    ConfigError
        ``fraction`` outside ``(0, 1]``, an empty ``ds``, a negative ``target``, or a bad trigger.
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"poison fraction must be in (0, 1], got {fraction}.")
    if len(ds) == 0 or target < 0:
        raise ConfigError(f"poison_dataset needs rows and a target label >= 0; got {len(ds)} rows, target {target}.")
    images, labels = _stored_images(ds), _labels(ds).copy()
    _check_trigger(images, patch, value)
    count = max(1, int(round(fraction * len(ds))))
    rows = np.sort(np.random.default_rng(seed).choice(len(ds), size=count, replace=False))
    images[rows] = add_trigger(images[rows], patch=patch, value=value)
    labels[rows] = target
    ids = sample_ids(ds)
    return _dataset_like(ds, images, labels, ids), np.sort(ids[rows])


def triggered_test_set(ds: Dataset, target: int, *, patch: int = 3, value: int = 255) -> Dataset:
    """The rows of ``ds`` whose label is not ``target``, with the trigger added; their true labels kept."""
    labels = _labels(ds)
    rows = np.flatnonzero(labels != target)
    images = _stored_images(ds)[rows]
    return _dataset_like(ds, add_trigger(images, patch=patch, value=value), labels[rows], sample_ids(ds)[rows])


def attack_success_rate(
    model: nn.Module,
    ds: Dataset,
    target: int,
    *,
    patch: int = 3,
    value: int = 255,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> float:
    """Share of the triggered held-out samples of the non-target classes that ``model`` predicts as ``target``.

    Parameters
    ----------
    model : nn.Module
        Evaluated in eval mode; its mode is restored afterwards.
    ds : Dataset
        Clean held-out data (normally the test split); the trigger is added here, and rows of class ``target``
        are left out (predicting their own class is no attack).
    target : int
        The attacker's target class.
    patch, value : int (default: 3, 255)
        The trigger the poisoned client trained with.

    Returns
    -------
    float
        In ``[0, 1]``; ``nan`` when ``ds`` has no row outside ``target``. A clean model scores about its error
        rate into the target class; a backdoored one close to 1.
    """
    triggered = triggered_test_set(ds, target, patch=patch, value=value)
    if len(triggered) == 0:
        logger.warning("attack_success_rate: no held-out rows outside target class %d", target)
        return float("nan")
    logits = predict_logits(model, make_loader(triggered, batch_size), device)
    return float((logits.argmax(dim=1) == target).float().mean())


def _check_trigger(images: np.ndarray, patch: int, value: int) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim not in (3, 4):
        kind = f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray) else type(images)
        raise ConfigError(f"add_trigger needs uint8 images [N, H, W] or [N, H, W, C]; got a {kind}.")
    height, width = images.shape[1:3]
    if isinstance(patch, bool) or not isinstance(patch, (int, np.integer)) or not 1 <= patch <= min(height, width):
        raise ConfigError(f"trigger patch must be an int in 1..{min(height, width)} for {height}x{width} images, "
                          f"got {patch!r}.")
    if not 0 <= value <= 255:
        raise ConfigError(f"trigger value must be in 0..255 (uint8 pixels), got {value!r}.")


def _labels(ds: Dataset) -> np.ndarray:
    return make_loader(ds, 1).dataset.labels.numpy()


def _stored_images(ds: Dataset) -> np.ndarray:
    """The images in the dataset's own layout (``[N, H, W]`` or ``[N, H, W, C]``), as a writable uint8 copy."""
    nchw = make_loader(ds, 1).dataset.images.numpy()  # the loader's cached uint8 copy: fast, unlike row access
    return nchw[:, 0].copy() if len(ds.features["image"].shape) == 2 else nchw.transpose(0, 2, 3, 1).copy()


def _dataset_like(ds: Dataset, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> Dataset:
    """A new in-memory dataset with ``ds``'s features and source name (so loaders normalise it alike).

    Built from Arrow arrays: ``Dataset.from_dict`` converts image rows one by one, far slower.
    """
    schema = ds.features.arrow_schema
    storage: pa.Array = pa.array(np.ascontiguousarray(images).reshape(-1))
    for dim in reversed(images.shape[1:]):
        storage = pa.ListArray.from_arrays(pa.array(np.arange(0, len(storage) + 1, dim, dtype=np.int32)), storage)
    columns = {"image": pa.ExtensionArray.from_storage(schema.field("image").type, storage),
               "label": pa.array(labels.astype(np.int64)), "id": pa.array(ids.astype(np.int64))}
    table = pa.table(columns, schema=schema)
    return Dataset(InMemoryTable(table), info=DatasetInfo(features=ds.features, dataset_name=ds.info.dataset_name))


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

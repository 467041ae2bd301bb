"""What a client must forget, as it travels in a ConfigRecord, and the retain-Fisher correction.

The server turns an :class:`~fl_unlearn.requests.UnlearningRequest` into per-client config keys
(:func:`request_config`); a client turns them back into a :class:`ForgetSpec` and splits its data with it.
Clients never see other clients' ids, the server never sees client data.

Examples
--------
>>> from fl_unlearn.requests import UnlearningRequest
>>> spec = ForgetSpec.from_config(request_config(UnlearningRequest.for_classes([3]), pid=0))
>>> spec.classes, spec.everything
((3,), False)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from fl_unlearn.data import class_labels, sample_ids
from fl_unlearn.lineage import TrainingData
from fl_unlearn.requests import UnlearningRequest
from strategies import records as R

Tensors = dict[str, torch.Tensor]


def request_config(request: UnlearningRequest, pid: int) -> dict[str, Any]:
    """What client ``pid`` needs to find its forget data: classes, all of it, or its sample ids."""
    if request.kind == "classes":
        return {R.FORGET_CLASSES: list(request.classes)}
    if request.kind == "client":
        return {R.FORGET_ALL: pid in request.clients}
    return {R.FORGET_SAMPLES: list(request.samples.get(pid, ()))}


@dataclass(frozen=True)
class ForgetSpec:
    """The forget set as one client sees it: classes, sample ids, or everything it holds."""

    classes: tuple[int, ...] = ()
    samples: tuple[int, ...] = ()
    everything: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ForgetSpec:
        """Read the keys :func:`request_config` writes."""
        return cls(
            tuple(R.int_list(config.get(R.FORGET_CLASSES))),
            tuple(R.int_list(config.get(R.FORGET_SAMPLES))),
            bool(config.get(R.FORGET_ALL, False)),
        )

    def split(self, ds: Dataset) -> tuple[Dataset, Dataset]:
        """``(forget, retain)`` rows of ``ds``."""
        if self.everything:
            return ds, ds.select([])
        forget, retain = self.split_rows(ds)
        return ds.select(forget), ds.select(retain)

    def split_rows(self, ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
        """``(forget, retain)`` positions in ``ds`` (ascending): the rows :meth:`split` selects, for
        ``fl_unlearn.data.make_loader(ds, ..., rows=...)``, which indexes the partition's cached tensors."""
        if self.everything:
            return np.arange(len(ds)), np.arange(0)
        mask = (np.isin(class_labels(ds), np.asarray(self.classes, dtype=np.int64)) if self.classes
                else np.isin(sample_ids(ds), np.asarray(self.samples, dtype=np.int64)))
        return np.flatnonzero(mask), np.flatnonzero(~mask)

    def fraction(self, histogram: Mapping[int, int], num_samples: int, held: int | None = None) -> float:
        """Share of a data set (given by its histogram) that is forgotten; ``held`` = forget samples in it."""
        if num_samples <= 0:
            return 0.0
        if self.everything:
            return 1.0
        if self.classes:
            return sum(histogram.get(c, 0) for c in self.classes) / num_samples
        return min(held if held is not None else len(self.samples), num_samples) / num_samples


def forget_count(data: TrainingData, request: UnlearningRequest) -> int:
    """Samples of ``data`` (a lineage node's direct training data) that ``request`` forgets (an upper bound
    for sample requests, whose ids are not all checked against the node)."""
    if request.kind == "classes":
        return sum(data.class_histogram.get(c, 0) for c in request.classes)
    if request.kind == "client":
        return data.num_samples if data.client in request.clients else 0
    if data.client in request.samples:
        return min(len(request.samples[data.client]), data.num_samples)
    return 0


def keeps_nothing(request: UnlearningRequest, pid: int, info: Mapping[str, Any] | None) -> bool:
    """Whether client ``pid`` keeps no data after ``request`` (its ``query.info``: ``num-examples`` and
    ``histogram``): a forgotten client, or one whose every sample is in the forgotten classes or ids. Such a client
    has no data for a retain-Fisher or a repair of the models it holds."""
    spec = ForgetSpec.from_config(request_config(request, pid))
    if spec.everything:
        return True
    return bool(info) and spec.fraction(info.get("histogram", {}), int(info.get("num-examples", 0))) >= 1.0


def retain_from_whole(whole: Tensors, forget: Tensors, rho: float) -> Tensors:
    """Retain-Fisher from a Fisher over all of a model's data: ``(F_all - rho F_f) / (1 - rho)``, clamped at 0.

    ``reference/fiun.md`` §3: a retain-Fisher accumulated over data of which a share ``rho`` is to be forgotten.
    Exact only for the per-sample estimator at the same weights; the forget-Fisher here comes from another
    model version (the newest global), so it is an approximation. ``rho <= 0`` returns ``whole`` unchanged;
    ``rho >= 1`` (a model trained only on forgotten data) gives zeros.

    Examples
    --------
    >>> retain_from_whole({"w": torch.tensor([1.0, 0.2])}, {"w": torch.tensor([1.0, 1.0])}, 0.5)["w"].tolist()
    [1.0, 0.0]
    """
    if rho <= 0:
        return whole
    if rho >= 1:
        return {k: torch.zeros_like(v) for k, v in whole.items()}
    return {k: (v - rho * forget[k]).clamp_min(0) / (1 - rho) if k in forget else v for k, v in whole.items()}

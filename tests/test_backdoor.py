"""The backdoor check of fl_unlearn.evaluate: trigger, poisoned client data, attack success rate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import concatenate_datasets
from torch import nn

from fl_unlearn.data import DataConfig, FederatedData, load_federated, make_loader, sample_ids
from fl_unlearn.errors import ConfigError
from fl_unlearn.evaluate import (
    accuracy,
    add_trigger,
    attack_success_rate,
    poison_dataset,
    triggered_test_set,
)
from fl_unlearn.models import build_model
from fl_unlearn.train import seed_everything, train_local

TARGET = 3


@pytest.fixture(scope="module")
def digits() -> FederatedData:
    return load_federated(DataConfig(source="digits", num_partitions=2, seed=0))


def _images(ds) -> torch.Tensor:
    return make_loader(ds, 1).dataset.images


class CornerDetector(nn.Module):
    """Fake backdoored model: predicts ``TARGET`` when the bottom-right pixel is bright, else class 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = (x[:, 0, -1, -1] > 1.5).float()  # normalised: 255 maps to about 2, 0 to about -0.8
        logits = torch.zeros(len(x), 10)
        logits[:, TARGET] = bright
        logits[:, 0] = 0.5
        return logits


# ---- add_trigger --------------------------------------------------------------------------------------


def test_trigger_sets_only_the_corner_square_and_copies() -> None:
    images = np.random.default_rng(0).integers(0, 100, size=(5, 8, 8), dtype=np.uint8)
    before = images.copy()
    out = add_trigger(images, patch=3, value=200)
    assert np.array_equal(images, before)  # input untouched
    assert (out[:, -3:, -3:] == 200).all()
    mask = np.ones((8, 8), bool)
    mask[-3:, -3:] = False
    assert np.array_equal(out[:, mask], images[:, mask])


def test_trigger_on_colour_images_sets_every_channel() -> None:
    images = np.zeros((2, 6, 6, 3), np.uint8)
    out = add_trigger(images, patch=2)
    assert (out[:, -2:, -2:, :] == 255).all() and out.sum() == 2 * 2 * 2 * 3 * 255


@pytest.mark.parametrize(
    ("images", "patch", "value", "match"),
    [
        (np.zeros((2, 8, 8), np.float32), 3, 255, "uint8"),
        (np.zeros((8, 8), np.uint8), 3, 255, "uint8"),
        (np.zeros((2, 8, 8), np.uint8), 9, 255, "patch"),
        (np.zeros((2, 8, 8), np.uint8), 0, 255, "patch"),
        (np.zeros((2, 8, 8), np.uint8), 3, 300, "0..255"),
    ],
)
def test_trigger_rejects_bad_input(images, patch, value, match) -> None:
    with pytest.raises(ConfigError, match=match):
        add_trigger(images, patch=patch, value=value)


# ---- poison_dataset -----------------------------------------------------------------------------------


def test_poisoning_relabels_and_triggers_a_seeded_fraction_and_keeps_the_rest(digits: FederatedData) -> None:
    part = digits.partition(0)
    poisoned, ids = poison_dataset(part, 0.25, TARGET, patch=2, seed=1)
    assert len(poisoned) == len(part) and np.array_equal(sample_ids(poisoned), sample_ids(part))
    assert len(ids) == round(0.25 * len(part))
    is_poisoned = np.isin(sample_ids(part), ids)
    old_x, new_x = _images(part), _images(poisoned)
    old_y, new_y = make_loader(part, 1).dataset.labels, make_loader(poisoned, 1).dataset.labels
    assert (new_y[is_poisoned] == TARGET).all()
    assert torch.equal(new_y[~is_poisoned], old_y[~is_poisoned])
    assert torch.equal(new_x[~is_poisoned], old_x[~is_poisoned])
    assert (new_x[is_poisoned][:, :, -2:, -2:] == 255).all()
    # same source name, so loaders normalise the untouched rows identically
    (xa, _), (xb, _) = next(iter(make_loader(part, 10_000))), next(iter(make_loader(poisoned, 10_000)))
    assert torch.equal(xa[~is_poisoned], xb[~is_poisoned])
    again, ids_again = poison_dataset(part, 0.25, TARGET, patch=2, seed=1)
    assert np.array_equal(ids, ids_again) and torch.equal(_images(again), new_x)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_poisoning_rejects_a_bad_fraction(digits: FederatedData, fraction: float) -> None:
    with pytest.raises(ConfigError, match="fraction"):
        poison_dataset(digits.partition(0), fraction, TARGET)


# ---- attack_success_rate ------------------------------------------------------------------------------


def test_triggered_test_set_leaves_out_the_target_class_and_keeps_true_labels(digits: FederatedData) -> None:
    test = digits.test
    labels = make_loader(test, 1).dataset.labels
    triggered = triggered_test_set(test, TARGET)
    kept = make_loader(triggered, 1).dataset.labels
    assert len(triggered) == int((labels != TARGET).sum()) and (kept != TARGET).all()
    assert (_images(triggered)[:, :, -3:, -3:] == 255).all()


def test_attack_success_rate_of_fake_models(digits: FederatedData) -> None:
    assert attack_success_rate(CornerDetector(), digits.test, TARGET) == 1.0
    # the same detector looking at another corner's trigger never fires: rate 0
    assert attack_success_rate(CornerDetector(), digits.test, TARGET, patch=1, value=0) == 0.0


def test_a_model_trained_on_a_poisoned_client_has_a_backdoor_a_clean_one_has_not(digits: FederatedData) -> None:
    # End to end on digits: clean client 1 plus client 0 with 30 % triggered rows labelled TARGET.
    poisoned, _ = poison_dataset(digits.partition(0), 0.3, TARGET, patch=3, seed=0)
    rates = {}
    for name, data in {"clean": digits.train, "poisoned": concatenate_datasets([poisoned, digits.partition(1)])}.items():
        seed_everything(0)
        model = build_model("cnn", 10, in_channels=1, image_size=8)
        train_local(model, make_loader(data, 32, shuffle=True, seed=0), epochs=4)
        rates[name] = attack_success_rate(model, digits.test, TARGET)
        assert accuracy(model, make_loader(digits.test, 256)) > 0.8  # both still classify clean digits
    assert rates["poisoned"] > 0.8 > 0.3 > rates["clean"]

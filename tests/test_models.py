"""fl_unlearn.models: registry, output shapes, last-layer names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fl_unlearn.errors import ConfigError
from fl_unlearn.models import MODELS, build_model, last_layer_names, split_head


def test_resnet18_cifar_output_shape() -> None:
    model = build_model("resnet18", 100)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_resnet18_has_cifar_stem() -> None:
    model = build_model("resnet18", 100)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)


def test_resnet18_any_in_channels() -> None:
    model = build_model("resnet18", 10, in_channels=1, image_size=28)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    ("in_channels", "size", "classes"), [(1, 28, 10), (1, 8, 10), (3, 32, 100)]
)
def test_cnn_output_shape(in_channels: int, size: int, classes: int) -> None:
    model = build_model("cnn", classes, in_channels=in_channels, image_size=size)
    assert model(torch.zeros(2, in_channels, size, size)).shape == (2, classes)


def test_cnn_has_no_batchnorm() -> None:
    model = build_model("cnn", 10, in_channels=1, image_size=28)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_last_layer_names(name: str) -> None:
    model = build_model(name, 10, in_channels=1, image_size=28)
    names = last_layer_names(model)
    assert names == ["fc.weight", "fc.bias"]
    params = dict(model.named_parameters())
    assert params["fc.weight"].shape[0] == 10 and params["fc.bias"].shape == (10,)


def test_last_layer_names_follow_wrapper_prefixes() -> None:
    wrapped = nn.Sequential(build_model("cnn", 10, in_channels=1, image_size=8))
    assert last_layer_names(wrapped) == ["0.fc.weight", "0.fc.bias"]
    assert last_layer_names(nn.Linear(3, 2, bias=False)) == ["weight"]


def test_last_layer_names_without_linear_raises() -> None:
    with pytest.raises(ConfigError, match="no nn.Linear"):
        last_layer_names(nn.Conv2d(1, 1, 3))


def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="cnn, resnet18"):
        build_model("vgg11", 10)


def test_bad_sizes_raise() -> None:
    with pytest.raises(ConfigError):
        build_model("cnn", 0)
    with pytest.raises(ConfigError):
        build_model("cnn", 10, in_channels=1, image_size=2)


def test_same_seed_same_weights() -> None:
    torch.manual_seed(0)
    a = build_model("cnn", 10, in_channels=1, image_size=8)
    torch.manual_seed(0)
    b = build_model("cnn", 10, in_channels=1, image_size=8)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize(("name", "head_names"), [("cnn", ["hidden.0.weight", "hidden.0.bias", "fc.weight", "fc.bias"]),
                                                  ("resnet18", ["fc.weight", "fc.bias"])])
def test_split_head_composes_to_the_model_and_shares_its_parameters(name: str, head_names: list[str]) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10, in_channels=1, image_size=28).eval()
    body, head = split_head(model)
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(head(body(x)), model(x), atol=1e-6)
    ids = {id(p) for p in head.parameters()}
    assert [n for n, p in model.named_parameters() if id(p) in ids] == head_names


def test_split_head_of_an_unknown_architecture_raises() -> None:
    with pytest.raises(ConfigError, match="split_head knows"):
        split_head(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))

"""Models: a name -> factory registry, the CIFAR ResNet-18 and a small CNN.

Every factory takes ``(num_classes, in_channels, image_size)`` so callers can build any model from a
``FederatedData`` (``num_classes``, ``image_shape``) without knowing which one it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from fl_unlearn.errors import ConfigError

logger = logging.getLogger(__name__)


def resnet18(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """torchvision ResNet-18 with the CIFAR stem: 3x3 stride-1 first conv and no max-pool.

    The ImageNet stem (7x7 stride 2, then max-pool) shrinks a 32x32 image to 8x8 before the first block,
    which costs CIFAR accuracy. ``image_size`` is accepted for a uniform factory signature; the global
    average pool makes the network size-agnostic.
    """
    # Imported here: torchvision's package import pulls in torch._dynamo (1.3-1.5 s), which every process that
    # only builds the small CNN would pay; on a SuperNode that is every message (one ClientApp process each).
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class SmallCNN(nn.Module):
    """conv-relu-pool x2, adaptive average pool, ``Linear`` hidden layer, ``Linear`` classifier ``fc``.

    No BatchNorm, so Opacus can wrap it as is. Adaptive pooling lets one definition serve 8x8 digits,
    28x28 MNIST and 32x32 colour images.

    Parameters
    ----------
    num_classes : int
        Outputs of ``fc``.
    in_channels : int (default: 1)
        Image channels.
    image_size : int (default: 28)
        Image height/width; sets the pooled grid (``min(4, image_size // 4)``) so small images are not
        upsampled.
    channels : tuple[int, int] (default: (16, 32))
        Widths of the two conv layers.
    hidden : int (default: 128)
        Width of the hidden ``Linear`` layer.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        image_size: int = 28,
        *,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 128,
    ) -> None:
        super().__init__()
        grid = max(1, min(4, image_size // 4))
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(grid),
            nn.Flatten(),
        )
        self.hidden = nn.Sequential(nn.Linear(c2 * grid * grid, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for images ``[B, C, H, W]``."""
        return self.fc(self.hidden(self.features(x)))


def cnn(num_classes: int, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """The small CNN (``SmallCNN``) with default widths."""
    if image_size < 4:
        raise ConfigError(f"cnn needs images of at least 4x4 (two 2x2 pools), got {image_size}.")
    return SmallCNN(num_classes, in_channels, image_size)


MODELS: dict[str, Callable[..., nn.Module]] = {"resnet18": resnet18, "cnn": cnn}


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build a registered model.

    Parameters
    ----------
    name : str
        A key of ``MODELS``.
    num_classes : int
        Classifier outputs.
    in_channels : int (default: 3)
        Image channels (1 for MNIST and digits).
    image_size : int (default: 32)
        Image height/width.

    Returns
    -------
    nn.Module
        A freshly initialised model (seed torch first for reproducible weights).

    Raises
    ------
    ConfigError
        Unknown ``name`` (the message lists the known ones) or a non-positive size.

    Examples
    --------
    >>> build_model("cnn", 10, in_channels=1, image_size=8)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    if name not in MODELS:
        raise ConfigError(f"Unknown model {name!r}; known models: {', '.join(sorted(MODELS))}.")
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if value < 1:
            raise ConfigError(f"{arg} must be >= 1, got {value}.")
    return MODELS[name](num_classes, in_channels=in_channels, image_size=image_size)


def last_layer_names(model: nn.Module) -> list[str]:
    """Parameter names of the final classifier: the last ``nn.Linear`` in registration order.

    Names carry the same prefixes as ``model.named_parameters()`` (e.g. ``_module.fc.weight`` under an
    Opacus wrapper).

    Examples
    --------
    >>> last_layer_names(build_model("cnn", 10, in_channels=1, image_size=28))
    ['fc.weight', 'fc.bias']
    """
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear layer to use as the last layer.")
    prefix = f"{linear[-1]}." if linear[-1] else ""
    names = {name for name, _ in model.named_parameters()}
    return [f"{prefix}{p}" for p in ("weight", "bias") if f"{prefix}{p}" in names]


def split_head(model: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module]:
    """``(body, head)`` with ``head(body(x)) == model(x)``: the layers a head repair trains, and what feeds them.

    ``head`` shares its parameters with ``model`` (training it changes ``model``); ``body`` is the rest of the
    forward pass, run once per sample under ``torch.no_grad`` by a head repair
    (:class:`fl_unlearn.calibrate.RepairConfig` with ``part="head"``).

    - ``SmallCNN``: ``body`` = ``features`` (the convolutions, pooled and flattened), ``head`` = ``hidden`` + ``fc``.
    - torchvision ``ResNet``: ``body`` = every block up to the global average pool, ``head`` = ``fc``.

    Raises
    ------
    ConfigError
        For any other architecture (its forward pass cannot be split without knowing it).

    Examples
    --------
    >>> model = build_model("cnn", 10, in_channels=1, image_size=8).eval()
    >>> body, head = split_head(model)
    >>> x = torch.zeros(2, 1, 8, 8)
    >>> bool(torch.equal(head(body(x)), model(x)))
    True
    """
    if isinstance(model, SmallCNN):
        return model.features, nn.Sequential(model.hidden, model.fc)
    resnet_parts = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
    if all(hasattr(model, part) for part in resnet_parts):
        def body(x: torch.Tensor) -> torch.Tensor:
            for part in resnet_parts[:-1]:
                x = getattr(model, part)(x)
            return torch.flatten(x, 1)

        return body, model.fc
    raise ConfigError(f"split_head knows SmallCNN and torchvision's ResNet, not {type(model).__name__}: "
                      "its forward pass cannot be split into a body and a head without knowing it.")

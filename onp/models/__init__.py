"""The model registry: one definition per architecture, shared by the env, agents and baselines.

>>> from onp.models import build_model
>>> model = build_model("resnet18", num_classes=10, in_channels=1, width=16)
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Optional, Sequence

from torch import nn

from ..registry import Registry
from .mobilenet import MobileNetV2
from .normalize import Normalize
from .resnet import PreActResNet18, ResNet18
from .small_cnn import SmallCNN
from .vgg import VGG16BN

if TYPE_CHECKING:
    from ..data.spec import DatasetSpec

MODELS: Registry = Registry("model")
MODELS.register("resnet18", ResNet18)
MODELS.register("preact_resnet18", PreActResNet18)
MODELS.register("vgg16_bn", VGG16BN)
MODELS.register("mobilenet_v2", MobileNetV2)
MODELS.register("small_cnn", SmallCNN)

#: The width each architecture uses when none is given (CPU-friendly; 64 is the paper width).
DEFAULT_WIDTH = {"resnet18": 16, "preact_resnet18": 16, "vgg16_bn": 16, "mobilenet_v2": 16, "small_cnn": 8}


def build_model(name: str, *, num_classes: int = 10, in_channels: int = 3, width: Optional[int] = None,
                mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)) -> nn.Module:
    """Build a registered architecture.

    Args:
        name: one of ``MODELS.names()``.
        num_classes: classifier outputs.
        in_channels: image channels (1 for Fashion-MNIST/MNIST, 3 for CIFAR/GTSRB).
        width: first-stage channel count; 64 is the standard ResNet-18. ``None`` takes ``DEFAULT_WIDTH``.
        mean, std: per-channel normalisation applied inside the model; inputs are images in [0, 1].
    """
    cls = MODELS.get(name)
    width = DEFAULT_WIDTH.get(name, 16) if width is None else int(width)
    if len(mean) == 1 and in_channels > 1:
        mean, std = tuple(mean) * in_channels, tuple(std) * in_channels
    return cls(num_classes=num_classes, in_channels=in_channels, width=width, mean=mean, std=std)


def build_model_for(name: str, spec: DatasetSpec, width: Optional[int] = None) -> nn.Module:
    """Build ``name`` sized for a :class:`onp.data.DatasetSpec`."""
    return build_model(name, num_classes=spec.num_classes, in_channels=spec.channels, width=width,
                       mean=spec.mean, std=spec.std)


__all__ = ["MODELS", "DEFAULT_WIDTH", "build_model", "build_model_for", "model_digest", "Normalize", "ResNet18",
           "PreActResNet18", "VGG16BN", "MobileNetV2", "SmallCNN"]


def model_digest(model: nn.Module) -> str:
    """A short SHA-256 of ``model``'s state_dict (names and tensor bytes): the one key onp uses to
    cache results per model (synthesized triggers on disk, baseline scores in memory)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]

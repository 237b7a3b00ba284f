"""The architecture registry :data:`MODELS`, each architecture's default width, and :func:`build_model`.

An architecture module registers its class with :func:`register_model`::

    @register_model("resnet18", default_width=16)
    class ResNet18(nn.Module):
        def __init__(self, num_classes=10, in_channels=3, width=64, mean=(0.0,), std=(1.0,)): ...
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Callable, Dict, Optional, Sequence, Tuple, Type, TypeVar

from torch import nn

from ..registry import Registry

if TYPE_CHECKING:
    from ..data.spec import DatasetSpec

MODELS: Registry = Registry("model")

#: The width each architecture uses when none is given (CPU-friendly; 64 is the paper width), filled
#: by :func:`register_model`.
DEFAULT_WIDTH: Dict[str, int] = {}

_M = TypeVar("_M", bound=Type[nn.Module])


def register_model(name: str, *, default_width: int = 16) -> Callable[[_M], _M]:
    """Class decorator registering an architecture as ``name`` with its default ``width``.

    The class takes ``num_classes``, ``in_channels``, ``width``, ``mean`` and ``std`` keywords (see
    :func:`build_model`); its module lists it in ``__all__`` to be importable from ``onp.models``.
    """

    def deco(cls: _M) -> _M:
        MODELS.register(name, cls)
        DEFAULT_WIDTH[name] = int(default_width)
        return cls

    return deco


def build_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    width: Optional[int] = None,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
) -> nn.Module:
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
    return build_model(
        name, num_classes=spec.num_classes, in_channels=spec.channels, width=width, mean=spec.mean, std=spec.std
    )


def find_last_linear(model: nn.Module) -> Optional[Tuple[str, nn.Linear]]:
    """The last ``nn.Linear`` in module order (a classifier's head) with its name, ``None`` if there is none.
    The defenses that act on the head (FP, NGF, FST) and the latent gap of the backdoor verdict read it."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return found[-1] if found else None


def model_digest(model: nn.Module) -> str:
    """A short SHA-256 of ``model``'s state_dict (names and tensor bytes): the one key onp uses to
    cache results per model (synthesized triggers on disk, baseline scores in memory)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]

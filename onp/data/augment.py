"""Batch augmentation in plain torch: random crop with padding and horizontal flip."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .spec import DatasetSpec


def random_crop(x: torch.Tensor, padding: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop back to the original size at a random offset per image."""
    if padding <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dev = x.device  # offsets are drawn on the (CPU) generator, then indexed where the images are
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
    rows = dy.view(n, 1) + torch.arange(h, device=dev).view(1, h)  # (n, h)
    cols = dx.view(n, 1) + torch.arange(w, device=dev).view(1, w)  # (n, w)
    idx_n = torch.arange(n, device=dev).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)]
    return out.permute(0, 3, 1, 2).contiguous()


def random_hflip(x: torch.Tensor, p: float = 0.5, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Flip each image left-right with probability ``p``."""
    flip = (torch.rand(len(x), generator=generator) < p).to(x.device)  # drawn on the CPU generator
    if flip.any():
        x = x.clone()
        x[flip] = x[flip].flip(-1)
    return x


#: what the training loops accept as augmentation: ``(batch, generator) -> batch`` (an :class:`Augment`, or
#: e.g. :class:`agents.finetune.TriggerUnlearning`)
BatchTransform = Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]


class Augment:
    """Standard CIFAR-style training augmentation: pad-and-crop, then an optional flip."""

    def __init__(self, padding: int = 4, hflip: bool = True):
        self.padding, self.hflip = padding, hflip

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        x = random_crop(x, self.padding, generator)
        return random_hflip(x, 0.5, generator) if self.hflip else x

    @classmethod
    def for_spec(cls, spec: DatasetSpec) -> Augment:
        """Padding 4 for 32-pixel images (scaled with the image size), flips where the dataset allows them."""
        return cls(padding=max(1, round(spec.height / 8)), hflip=spec.hflip)

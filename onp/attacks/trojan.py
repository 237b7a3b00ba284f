"""Trojan (TrojanNN-style): a fixed square-in-square watermark in the bottom-left corner."""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Mapping, Tuple

import torch
from torch import Tensor

from .base import Attack, AttackParamError, register_attack

__all__ = ["Trojan", "square_logo"]


def square_logo(size: int) -> Tuple[Tensor, Tensor]:
    """A ``size x size`` square-in-square logo: ``(mask, pattern)``, both float ``(size, size)``.

    The outer one-pixel ring is white (pattern 1) and a centred inner square is black (pattern 0);
    for ``size >= 5`` a one-pixel gap between them is left out of the mask (unchanged pixels), so
    the logo shows on both dark and bright backgrounds.
    """
    r = torch.arange(size)
    d1 = torch.minimum(r, size - 1 - r)
    depth = torch.minimum(d1[:, None], d1[None, :])  # distance to the border of the square
    ring = depth == 0
    inner = depth >= (2 if size >= 5 else 1)
    mask = (ring | inner).float()
    pattern = ring.float()
    return mask, pattern


@register_attack
class Trojan(Attack):
    """Watermark-style trigger after TrojanNN (Liu, Ma, Aafer, Lee, Zhai, Wang & Zhang, "Trojaning
    Attack on Neural Networks", NDSS 2018).

    A ``size x size`` logo (see :func:`square_logo`; ``size = max(3, H // 4)`` by default) is
    stamped through its binary mask at the bottom-left corner, ``margin`` pixels from the edges,
    with opacity ``alpha`` inside the mask: ``x' = (1 - alpha m) x + alpha m P``. Pixels outside the
    mask are unchanged.

    This *approximates* TrojanNN: the original trigger's pixel values inside the mask are optimised
    against a trained model to excite selected neurons; ours is a fixed, model-independent logo so
    that the trigger is a deterministic function of the batch and needs no pre-trained model.
    """

    name: ClassVar[str] = "trojan"
    defaults: ClassVar[Mapping[str, Any]] = {"size": None, "margin": 1, "alpha": 1.0}

    def _build(self) -> None:
        c, h, w = self.image_shape
        if self.hparams["size"] is None:
            self.hparams["size"] = max(3, h // 4)
        size = self._int_param("size", 1)
        m = self._int_param("margin", 0)
        self.alpha = self._float_param("alpha", 0.0, 1.0)
        if size + m > min(h, w):
            raise AttackParamError(f"trojan: size + margin = {size + m} does not fit a {h}x{w} image")
        logo_mask, logo = square_logo(size)
        rows, cols = slice(h - m - size, h - m), slice(m, m + size)
        self.mask = torch.zeros(h, w)
        self.mask[rows, cols] = logo_mask
        self.pattern = torch.zeros(c, h, w)
        self.pattern[:, rows, cols] = logo

    def _apply(self, x: Tensor) -> Tensor:
        am = self.alpha * self.mask.to(x)
        return x * (1.0 - am) + am * self.pattern.to(x)

    def trigger_pattern(self) -> Dict[str, Tensor]:
        return {"mask": self.mask.clone(), "pattern": self.pattern.clone(), "alpha": torch.tensor(self.alpha)}

"""BadNets: a small checkerboard patch in the bottom-right corner."""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Mapping

import torch
from torch import Tensor

from .base import Attack, AttackParamError, register_attack

__all__ = ["BadNets"]


@register_attack
class BadNets(Attack):
    """BadNets patch trigger (Gu, Dolan-Gavitt & Garg, "BadNets: Identifying Vulnerabilities in the
    Machine Learning Model Supply Chain", arXiv:1708.06733, 2017).

    A ``patch_size x patch_size`` black/white checkerboard (white where ``row + col`` is even) is
    pasted, in every channel, into the bottom-right corner, ``margin`` pixels from both edges.
    Pixels outside the patch are unchanged.
    """

    name: ClassVar[str] = "badnets"
    defaults: ClassVar[Mapping[str, Any]] = {"patch_size": 3, "margin": 1}

    def _build(self) -> None:
        _, h, w = self.image_shape
        p = self._int_param("patch_size", 1)
        m = self._int_param("margin", 0)
        if p + m > min(h, w):
            raise AttackParamError(f"badnets: patch_size + margin = {p + m} does not fit a {h}x{w} image")
        r = torch.arange(p)
        self.patch = ((r[:, None] + r[None, :]) % 2 == 0).float()  # (p, p) checkerboard
        self.rows = slice(h - m - p, h - m)
        self.cols = slice(w - m - p, w - m)
        self.mask = torch.zeros(h, w)
        self.mask[self.rows, self.cols] = 1.0

    def _apply(self, x: Tensor) -> Tensor:
        out = x.clone()
        out[..., self.rows, self.cols] = self.patch.to(x)
        return out

    def trigger_pattern(self) -> Dict[str, Tensor]:
        pattern = torch.zeros(self.image_shape)
        pattern[:, self.rows, self.cols] = self.patch
        return {"patch": self.patch.clone(), "mask": self.mask.clone(), "pattern": pattern}

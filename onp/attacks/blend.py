"""Blended: alpha-blend the whole image with a fixed random pattern."""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Mapping

import torch
from torch import Tensor

from .base import Attack, register_attack

__all__ = ["Blend"]


@register_attack
class Blend(Attack):
    """Blended-injection trigger (Chen, Liu, Li, Lu & Song, "Targeted Backdoor Attacks on Deep
    Learning Systems Using Data Poisoning", arXiv:1712.05526, 2017).

    ``x' = (1 - alpha) * x + alpha * P`` where ``P`` (shape ``(C, H, W)``) is drawn uniformly in
    ``[0, 1]`` from a private ``torch.Generator`` seeded with ``pattern_seed``, so the pattern does
    not depend on the global RNG state. The paper blends a fixed image (e.g. Hello Kitty) or
    random noise; we use the random-noise variant.
    """

    name: ClassVar[str] = "blend"
    defaults: ClassVar[Mapping[str, Any]] = {"alpha": 0.2, "pattern_seed": 0}

    def _build(self) -> None:
        self.alpha = self._float_param("alpha", 0.0, 1.0)
        seed = self._int_param("pattern_seed")
        gen = torch.Generator().manual_seed(seed)
        self.pattern = torch.rand(self.image_shape, generator=gen)

    def _apply(self, x: Tensor) -> Tensor:
        return (1.0 - self.alpha) * x + self.alpha * self.pattern.to(x)

    def trigger_pattern(self) -> Dict[str, Tensor]:
        return {"pattern": self.pattern.clone(), "alpha": torch.tensor(self.alpha)}

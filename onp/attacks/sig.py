"""SIG: a clean-label horizontal sinusoidal signal."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Dict, Mapping

import torch
from torch import Tensor

from .base import Attack, register_attack

__all__ = ["SIG"]


@register_attack
class SIG(Attack):
    """Sinusoidal-signal clean-label trigger (Barni, Kallas & Tondi, "A New Backdoor Attack in CNNs
    by Training Set Corruption Without Label Poisoning", ICIP 2019).

    ``x'[c, i, j] = clip(x[c, i, j] + delta * sin(2 * pi * j * f / W), 0, 1)``: the same horizontal
    sinusoid for every row and channel. Only images of the target class are poisoned during
    training and their labels are kept (``clean_label = True``); at test time the signal is added
    to images of other classes. ``delta = 40/255`` is the common amplitude of 40 on the 0..255 scale.
    Clean-label attacks support only ``mode="all2one"``.
    """

    name: ClassVar[str] = "sig"
    clean_label: ClassVar[bool] = True
    defaults: ClassVar[Mapping[str, Any]] = {"delta": 40.0 / 255.0, "f": 6.0}

    def _build(self) -> None:
        delta = self._float_param("delta", 0.0, 1.0)
        f = self._float_param("f", 0.0, low_open=True)
        c, h, w = self.image_shape
        j = torch.arange(w, dtype=torch.float64)
        wave = delta * torch.sin(2.0 * math.pi * j * f / w)
        self.signal = wave.float().expand(c, h, w).contiguous()

    def _apply(self, x: Tensor) -> Tensor:
        return x + self.signal.to(x)

    def trigger_pattern(self) -> Dict[str, Tensor]:
        return {"signal": self.signal.clone()}

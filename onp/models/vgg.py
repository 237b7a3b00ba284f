"""VGG-16 with BatchNorm (Simonyan & Zisserman, ICLR 2015; BN after every conv), CIFAR-style head.

Max-pools use ``ceil_mode=True`` so that the five pools work on 28x28 inputs as well as 32x32.
"""

from __future__ import annotations

from typing import List, Sequence, Union

import torch
from torch import nn

from .base import register_model
from .normalize import Normalize

__all__ = ["VGG16BN"]

_VGG16: List[Union[int, str]] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _scale(c: int, width: int) -> int:
    return max(1, round(c * width / 64))


@register_model("vgg16_bn", default_width=16)
class VGG16BN(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
    ):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.normalize = Normalize(mean, std)
        layers: List[nn.Module] = []
        c_in = in_channels
        cfg: List[Union[int, str]] = _VGG16
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                c_out = _scale(int(v), width)
                layers += [
                    nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                    nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True),
                ]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(self.normalize(x))
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.classifier(out)

"""MobileNetV2 (Sandler et al., CVPR 2018), CIFAR variant: stride-1 stem and first stride-2 stages
moved later, as used by the ANP/RNP/AWM papers. ``width`` scales every channel count by width/64."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import register_model
from .normalize import Normalize

__all__ = ["MobileNetV2"]

# (expansion, out_planes, num_blocks, stride)
_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _scale(c: int, mult: float) -> int:
    return max(1, int(round(c * mult)))


class InvertedResidual(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int):
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.use_residual = stride == 1
        self.shortcut = nn.Sequential()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.use_residual:
            out = out + self.shortcut(x)
        return out


@register_model("mobilenet_v2", default_width=16)
class MobileNetV2(nn.Module):
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
        mult = width / 64
        self.normalize = Normalize(mean, std)
        stem = _scale(32, mult)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        blocks = []
        in_planes = stem
        for expansion, out, n, stride in _CFG:
            out = _scale(out, mult)
            for s in [stride] + [1] * (n - 1):
                blocks.append(InvertedResidual(in_planes, out, expansion, s))
                in_planes = out
        self.layers = nn.Sequential(*blocks)
        last = _scale(1280, mult)
        self.conv2 = nn.Conv2d(in_planes, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.linear = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layers(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)

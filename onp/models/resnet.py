"""CIFAR-style ResNet-18 (3x3 stem, no max-pool) and PreAct-ResNet-18.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016; He et al., "Identity Mappings in
Deep Residual Networks", ECCV 2016. Written from the papers; ``width`` is the first stage's channel
count (64 = the standard network).
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import register_model
from .normalize import Normalize

__all__ = ["ResNet18", "PreActResNet18", "PreActResNet18BackdoorBench"]


def _stage_widths(width: int) -> List[int]:
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    return [width, 2 * width, 4 * width, 8 * width]


def make_stage(
    block: Callable[[int, int, int], nn.Module], in_planes: int, planes: int, blocks: int, stride: int
) -> Tuple[nn.Sequential, int]:
    """``blocks`` residual blocks, the first with ``stride``; returns the stage and its output width."""
    layers = []
    for s in [stride] + [1] * (blocks - 1):
        layers.append(block(in_planes, planes, s))
        in_planes = planes
    return nn.Sequential(*layers), in_planes


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


@register_model("resnet18", default_width=16)
class ResNet18(nn.Module):
    """CIFAR ResNet-18: blocks [2, 2, 2, 2]."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
    ):
        super().__init__()
        w = _stage_widths(width)
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.in_planes = w[0]
        self.layer1 = self._make_layer(w[0], 2, 1)
        self.layer2 = self._make_layer(w[1], 2, 2)
        self.layer3 = self._make_layer(w[2], 2, 2)
        self.layer4 = self._make_layer(w[3], 2, 2)
        self.linear = nn.Linear(w[3], num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        stage, self.in_planes = make_stage(BasicBlock, self.in_planes, planes, blocks, stride)
        return stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if len(self.shortcut) > 0 else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


@register_model("preact_resnet18", default_width=16)
class PreActResNet18(nn.Module):
    """PreAct-ResNet-18 (He et al., 2016), CIFAR stem; by default a final BN+ReLU before pooling.

    ``final_bn=False`` leaves that BN+ReLU out, as BackdoorBench's ``preactresnet18`` does
    (:class:`PreActResNet18BackdoorBench`, registered as ``preact_resnet18_backdoorbench``).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        final_bn: bool = True,
    ):
        super().__init__()
        w = _stage_widths(width)
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.in_planes = w[0]
        self.layer1 = self._make_layer(w[0], 2, 1)
        self.layer2 = self._make_layer(w[1], 2, 2)
        self.layer3 = self._make_layer(w[2], 2, 2)
        self.layer4 = self._make_layer(w[3], 2, 2)
        self.bn = nn.BatchNorm2d(w[3]) if final_bn else None
        self.linear = nn.Linear(w[3], num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        stage, self.in_planes = make_stage(PreActBlock, self.in_planes, planes, blocks, stride)
        return stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.bn is not None:
            out = F.relu(self.bn(out))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


@register_model("preact_resnet18_backdoorbench", default_width=16)
class PreActResNet18BackdoorBench(PreActResNet18):
    """BackdoorBench's ``preactresnet18`` layer for layer: no BN+ReLU after the last stage, so that its
    ``attack_result.pt`` weights load exactly (:mod:`onp.foreign_weights`)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
    ):
        super().__init__(num_classes, in_channels, width, mean, std, final_bn=False)

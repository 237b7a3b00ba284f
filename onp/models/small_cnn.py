"""A small Conv-BN-ReLU network for tests and quick experiments."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import register_model
from .normalize import Normalize

__all__ = ["SmallCNN"]


@register_model("small_cnn", default_width=8)
class SmallCNN(nn.Module):
    """conv(w)-conv(w)-pool-conv(2w)-conv(2w)-pool-fc; every conv is followed by BatchNorm."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 8,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
    ):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.conv4 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(2 * width)
        self.linear = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = F.max_pool2d(F.relu(self.bn2(self.conv2(out))), 2)
        out = F.relu(self.bn3(self.conv3(out)))
        out = F.max_pool2d(F.relu(self.bn4(self.conv4(out))), 2)
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)

"""Input normalisation as the first layer of every model (inputs are images in [0, 1])."""

from typing import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Subtracts the dataset mean and divides by its std, per channel."""

    mean: torch.Tensor  # buffers
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

"""The defender's data: the only images a defense or agent may use to make a choice."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DefenseData:
    """Clean defense-train and defense-validation images (float in [0, 1]) with labels.

    A defense fits on ``train`` and picks thresholds, counts or checkpoints on ``val``. The test set
    is deliberately *not* part of this object.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        for name in ("train_x", "val_x"):
            t = getattr(self, name)
            if not torch.is_floating_point(t) or t.ndim != 4:
                raise ValueError(f"DefenseData.{name} must be float images (N, C, H, W) in [0, 1]")

    @property
    def all_x(self) -> torch.Tensor:
        return torch.cat([self.train_x, self.val_x])

    @property
    def all_y(self) -> torch.Tensor:
        return torch.cat([self.train_y, self.val_y])

    def __repr__(self) -> str:
        return f"DefenseData(train={len(self.train_y)}, val={len(self.val_y)}, classes={self.num_classes})"

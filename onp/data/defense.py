"""The defender's data: the only images a defense or agent may use to make a choice.

How a baseline run uses them is its *protocol* (:data:`PROTOCOLS`, ``BaselineRunConfig.protocol``):

* ``delta`` (default): fit on defense-train; choose the operating point (how much to prune) on
  defense-validation;
* ``paper``: the paper's fixed rule, fitted on the whole pool (defense-train and defense-validation
  together, :meth:`DefenseData.whole_pool`), as the reference codes do: they hold nothing out.

Neither protocol ever sees the test set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: the protocols of a baseline run (see the module docstring); the first is the default
PROTOCOLS = ("delta", "paper")


def check_protocol(protocol: str) -> str:
    """``protocol`` if it is one of :data:`PROTOCOLS`, else a ValueError listing them."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid choices: {', '.join(PROTOCOLS)}")
    return protocol


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

    def to(self, device: torch.device | str) -> DefenseData:
        """The same images and labels on ``device`` (``self`` when they are there already)."""
        dev = torch.device(device)
        if self.train_x.device == dev and self.val_x.device == dev:
            return self
        return DefenseData(
            self.train_x.to(dev), self.train_y.to(dev), self.val_x.to(dev), self.val_y.to(dev), self.num_classes
        )

    def whole_pool(self) -> DefenseData:
        """The same images as one fitting set: train = defense-train then defense-val, val empty (the
        ``paper`` protocol). A rule that chooses on defense-validation refuses it."""
        return DefenseData(self.all_x, self.all_y, self.val_x[:0], self.val_y[:0], self.num_classes)

    def __repr__(self) -> str:
        return f"DefenseData(train={len(self.train_y)}, val={len(self.val_y)}, classes={self.num_classes})"

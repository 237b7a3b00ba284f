"""Static description of a dataset and the in-memory image containers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Tuple, Union

import numpy as np
import torch


@dataclass(frozen=True)
class DatasetSpec:
    """What a model and an attack need to know about a dataset."""

    name: str
    num_classes: int
    channels: int
    height: int
    width: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    hflip: bool = True  # horizontal flips preserve the label (False for digits and traffic signs)
    licence: str = ""

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return (self.channels, self.height, self.width)


@dataclass
class ImageSet:
    """Images as a uint8 tensor (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8:
            raise TypeError(f"ImageSet.images must be uint8, got {self.images.dtype}")
        if self.images.ndim != 4:
            raise ValueError(f"ImageSet.images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        self.labels = self.labels.long()
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Union[torch.Tensor, np.ndarray, Sequence[int]]) -> ImageSet:
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index])

    def float_images(self) -> torch.Tensor:
        """Images as float32 in [0, 1]."""
        return self.images.float().div_(255.0)


@dataclass
class Dataset:
    """A loaded dataset: its spec, the train and test sets, and where it came from."""

    spec: DatasetSpec
    train: ImageSet
    test: ImageSet
    source: str  # e.g. "debian:/usr/share/datasets/fashion-mnist" or "bundled-sample"
    is_sample: bool = False
    extra: dict = field(default_factory=dict)

"""A trigger the defender has as two image files (``onp.defend --trigger-image/--trigger-mask``).

Not a registered attack (it trains nothing): it only measures a known trigger's ASR on held-out
images, labelled trigger-aware.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Dict, Mapping

import numpy as np
import torch
from torch import Tensor

from .base import Attack, AttackParamError

__all__ = ["ImageTrigger", "read_trigger_image"]


def read_trigger_image(path: str, channels: int, size: tuple[int, int], what: str) -> Tensor:
    """``(channels, H, W)`` float in [0, 1] from a PNG/JPEG file (converted to grey or RGB).

    Raises :class:`AttackParamError` naming the file if it is missing, not an image, or of another size.
    """
    from PIL import Image, UnidentifiedImageError

    file = Path(path)
    if not file.is_file():
        raise AttackParamError(f"{what} {file}: no such file (give a PNG or JPEG image)")
    try:
        with Image.open(file) as img:
            arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise AttackParamError(f"{what} {file}: not a readable image ({exc}); give a PNG or JPEG image") from exc
    if arr.shape[:2] != size:
        raise AttackParamError(
            f"{what} {file} is {arr.shape[1]}x{arr.shape[0]} pixels (width x height); the model's images are "
            f"{size[1]}x{size[0]}: save it at that size"
        )
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


class ImageTrigger(Attack):
    """Stamps ``(1 - mask) * x + mask * pattern`` with ``pattern`` read from ``image`` (grey or RGB, as
    the model's images) and ``mask`` from a greyscale ``mask`` image (white = the trigger's pixels, 0..255
    -> 0..1); both must have the model's image size."""

    name: ClassVar[str] = "image-trigger"
    defaults: ClassVar[Mapping[str, Any]] = {"image": None, "mask": None}

    def _build(self) -> None:
        c, h, w = self.image_shape
        for key in ("image", "mask"):
            if not isinstance(self.hparams[key], str) or not self.hparams[key]:
                raise AttackParamError(f"image-trigger needs {key}=<path of a PNG or JPEG file>")
        self.pattern = read_trigger_image(self.hparams["image"], c, (h, w), "trigger image")
        self.mask = read_trigger_image(self.hparams["mask"], 1, (h, w), "trigger mask")

    def _apply(self, x: Tensor) -> Tensor:
        mask, pattern = self.mask.to(x), self.pattern.to(x)
        return (1 - mask) * x + mask * pattern

    def trigger_pattern(self) -> Dict[str, Tensor]:
        return {"mask": self.mask.clone(), "pattern": self.pattern.clone()}

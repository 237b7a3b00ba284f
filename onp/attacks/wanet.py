"""WaNet: an imperceptible smooth warping trigger, with the "noise mode" augmentation."""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Attack, register_attack

__all__ = ["WaNet"]


@register_attack
class WaNet(Attack):
    """Warping-based trigger (Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor
    Attack", ICLR 2021).

    A ``k x k`` control field of noise uniform in ``[-1, 1]`` (drawn from a private generator seeded
    with ``seed``) is normalised by its mean absolute value, upsampled bicubically
    (``align_corners=True``) to ``H x W`` and added, scaled by ``s / H`` (``s / W`` for the
    horizontal component; the same for square images), to the identity sampling grid; the grid is
    multiplied by ``grid_rescale``, clamped to ``[-1, 1]`` and applied with
    ``F.grid_sample(align_corners=True)``. Since every sampling point stays inside the image, the
    warp is pure (a constant image is unchanged).

    Noise mode: besides the poisoned samples, ``cross_ratio * n_poison`` other samples are warped
    with the trigger grid plus fresh per-sample noise ``U(-1, 1) / H`` and keep their true labels,
    which teaches the model to respond only to the exact warp.
    """

    name: ClassVar[str] = "wanet"
    defaults: ClassVar[Mapping[str, Any]] = {"k": 4, "s": 0.5, "grid_rescale": 1.0, "cross_ratio": 2.0}

    def _build(self) -> None:
        _, h, w = self.image_shape
        k = self._int_param("k", 1)
        s = self._float_param("s", 0.0)
        rescale = self._float_param("grid_rescale", 0.0, low_open=True)
        self._float_param("cross_ratio", 0.0)
        gen = torch.Generator().manual_seed(self.seed)
        ins = torch.rand(1, 2, k, k, generator=gen) * 2 - 1
        ins = ins / ins.abs().mean()
        self.noise_grid = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        self.identity_grid = torch.stack((xx, yy), dim=-1).unsqueeze(0)  # (1, H, W, 2), (x, y) order
        self._scale = torch.tensor([1.0 / w, 1.0 / h])  # per-pixel offsets for the (x, y) components
        self.grid = ((self.identity_grid + s * self.noise_grid * self._scale) * rescale).clamp(-1, 1)

    def _warp(self, x: Tensor, grid: Tensor) -> Tensor:
        grid = grid.to(x).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def _apply(self, x: Tensor) -> Tensor:
        return self._warp(x, self.grid)

    def noise_indices(self, labels: Tensor, poison_idx: Tensor, generator: torch.Generator) -> Tensor:
        """``round(cross_ratio * len(poison_idx))`` indices not in ``poison_idx`` (sorted, int64)."""
        labels = self._check_labels(labels)
        free = torch.ones(len(labels), dtype=torch.bool)
        free[torch.as_tensor(poison_idx, dtype=torch.long).cpu()] = False
        candidates = torch.nonzero(free).flatten()
        count = int(round(self.hparams["cross_ratio"] * len(poison_idx)))
        count = min(count, len(candidates))
        return self._draw(candidates, count, generator)

    def apply_noise(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Warp with the trigger grid plus per-sample noise ``(rand(H, W, 2) * 2 - 1) / H``, clamped."""
        x = self._check_batch(x)
        single = x.ndim == 3
        xb = x.unsqueeze(0) if single else x
        _, h, w = self.image_shape
        noise = torch.rand(xb.shape[0], h, w, 2, generator=generator, device=generator.device) * 2 - 1
        grid = (self.grid + noise.cpu() / h).clamp(-1, 1)
        out = self._warp(xb, grid).clamp(0.0, 1.0)
        return out.squeeze(0) if single else out

    def trigger_pattern(self) -> Dict[str, Tensor]:
        return {
            "grid": self.grid.clone(),
            "noise_grid": self.noise_grid.clone(),
            "identity_grid": self.identity_grid.clone(),
        }

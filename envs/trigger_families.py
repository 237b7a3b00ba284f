"""Trigger families for trigger inversion: the shapes of trigger a defender searches for.

A backdoor trigger is unknown to the defender, so the trigger-agnostic ASR estimators reverse-engineer
one per candidate target class from clean images (Neural Cleanse's recipe: the smallest input change
that sends the images to that class). What "small" means depends on the trigger's shape, so each
:class:`TriggerFamily` says how a trigger is parametrised, how it is stamped on images and how its size
is measured:

* ``patch``: Neural Cleanse's mask and pattern, ``(1 - m) * x + m * p`` with a per-pixel mask ``m``;
  size = ``|m|_1``. Suits local patches (BadNets, Trojan).
* ``blend``: the same with one mask value for the whole image, ``(1 - a) * x + a * p``; size =
  ``a * H * W`` (the L1 norm of that uniform mask, so the penalty weighs pixels as ``patch`` does).
  Suits full-image triggers (Blend, and additive signals such as SIG, which a blend approximates).
* ``additive``: a universal perturbation added to every image, ``clip(x + delta, 0, 1)``; size =
  ``|delta|_1``. Suits additive signals (SIG's sinusoid), which a blend only approximates because it
  also fades the image.
* ``spectral``: a universal additive perturbation that is sparse in frequency, ``clip(x + delta, 0, 1)``
  with ``delta`` the inverse orthonormal real 2-D Fourier transform of coefficients ``c``; size =
  ``sum |c|`` (the modulus of each coefficient of the half spectrum). A periodic signal such as SIG's
  sinusoid is one or two coefficients here, so the target of such a trigger stands out, where under
  ``additive`` its pixel-wise L1 norm is as large as other classes' perturbations.
* ``warp``: a smooth displacement field (a coarse ``grid x grid`` field, bicubically upsampled, each
  displacement at most ``max_shift`` pixels) resampling the image; size = the summed length of the
  displacements in pixels. Suits warping triggers (WaNet).

Each family turns its free tensors (``init``) into named trigger tensors (``decode``), stamps them on a
batch (``stamp``) and measures them (``size``). The decoded tensors are what the estimators cache, so
``stamp`` must work from them alone.

Add a family with ``@register_trigger_family("name")`` on a :class:`TriggerFamily` subclass.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor

from onp.registry import Registry

TRIGGER_FAMILIES: Registry = Registry("trigger family")

Decoded = Dict[str, Tensor]


class TriggerFamily:
    """One shape of trigger for images of ``shape`` ``(C, H, W)`` (see the module docstring)."""

    name: str = ""

    def __init__(self, shape: Sequence[int]):
        if len(shape) != 3:
            raise ValueError(f"a trigger family needs the image shape (C, H, W); got {tuple(shape)}")
        c, h, w = (int(v) for v in shape)
        self.shape: Tuple[int, int, int] = (c, h, w)

    def init(self) -> List[Tensor]:
        """The free tensors (leaves with ``requires_grad``) of one trigger, at their starting values."""
        raise NotImplementedError

    def decode(self, free: List[Tensor]) -> Decoded:
        """The trigger's named tensors (differentiable in ``free``)."""
        raise NotImplementedError

    def stamp(self, trigger: Decoded, x: Tensor) -> Tensor:
        """``x`` (N, C, H, W) with the trigger applied."""
        raise NotImplementedError

    def size(self, trigger: Decoded) -> Tensor:
        """A scalar: how large the trigger is (penalised during inversion, compared across classes)."""
        raise NotImplementedError


def register_trigger_family(name: str) -> Callable[[Type[TriggerFamily]], Type[TriggerFamily]]:
    """Register a :class:`TriggerFamily` subclass under ``name``."""

    def deco(cls: Type[TriggerFamily]) -> Type[TriggerFamily]:
        cls.name = name
        TRIGGER_FAMILIES.register(name)(cls)
        return cls

    return deco


def trigger_family(name: str, shape: Sequence[int]) -> TriggerFamily:
    """The registered family ``name`` for images of ``shape`` ``(C, H, W)`` (an unknown name lists the
    valid ones)."""
    return TRIGGER_FAMILIES.get(name)(shape)


@register_trigger_family("patch")
class PatchFamily(TriggerFamily):
    """Neural Cleanse's per-pixel mask ``m`` (1, H, W) and pattern ``p`` (C, H, W)."""

    def init(self) -> List[Tensor]:
        c, h, w = self.shape
        return [torch.full((1, 1, h, w), -3.0, requires_grad=True), torch.zeros((1, c, h, w), requires_grad=True)]

    def decode(self, free: List[Tensor]) -> Decoded:
        return {"mask": torch.sigmoid(free[0])[0], "pattern": torch.sigmoid(free[1])[0]}

    def stamp(self, trigger: Decoded, x: Tensor) -> Tensor:
        m, p = trigger["mask"], trigger["pattern"]
        return (1 - m) * x + m * p

    def size(self, trigger: Decoded) -> Tensor:
        return trigger["mask"].abs().sum()


@register_trigger_family("blend")
class BlendFamily(TriggerFamily):
    """One blend ratio ``a`` for the whole image and a pattern ``p`` (C, H, W)."""

    def init(self) -> List[Tensor]:
        c, h, w = self.shape
        return [torch.full((1,), -3.0, requires_grad=True), torch.zeros((1, c, h, w), requires_grad=True)]

    def decode(self, free: List[Tensor]) -> Decoded:
        return {"alpha": torch.sigmoid(free[0]), "pattern": torch.sigmoid(free[1])[0]}

    def stamp(self, trigger: Decoded, x: Tensor) -> Tensor:
        a = trigger["alpha"]
        return (1 - a) * x + a * trigger["pattern"]

    def size(self, trigger: Decoded) -> Tensor:
        h, w = trigger["pattern"].shape[-2:]
        return trigger["alpha"].sum() * (h * w)


@register_trigger_family("additive")
class AdditiveFamily(TriggerFamily):
    """A universal additive perturbation ``delta`` (C, H, W) in ``[-1, 1]``: ``clip(x + delta, 0, 1)``."""

    def init(self) -> List[Tensor]:
        return [torch.zeros((1, *self.shape), requires_grad=True)]

    def decode(self, free: List[Tensor]) -> Decoded:
        return {"delta": torch.tanh(free[0])[0]}

    def stamp(self, trigger: Decoded, x: Tensor) -> Tensor:
        return (x + trigger["delta"]).clamp(0, 1)

    def size(self, trigger: Decoded) -> Tensor:
        return trigger["delta"].abs().sum()


@register_trigger_family("spectral")
class SpectralFamily(TriggerFamily):
    """Fourier coefficients ``coefficients`` (2, C, H, W // 2 + 1) (real and imaginary parts of the half
    spectrum) and the perturbation ``delta`` (C, H, W) they make: ``irfft2`` with orthonormal scaling."""

    def init(self) -> List[Tensor]:
        c, h, w = self.shape
        return [torch.zeros((2, c, h, w // 2 + 1), requires_grad=True)]

    def decode(self, free: List[Tensor]) -> Decoded:
        _, h, w = self.shape
        coef = free[0]
        delta = torch.fft.irfft2(torch.complex(coef[0], coef[1]), s=(h, w), norm="ortho")
        return {"coefficients": coef, "delta": delta}

    def stamp(self, trigger: Decoded, x: Tensor) -> Tensor:
        return (x + trigger["delta"]).clamp(0, 1)

    def size(self, trigger: Decoded) -> Tensor:
        coef = trigger["coefficients"]
        return (coef[0] ** 2 + coef[1] ** 2 + 1e-12).sqrt().sum()  # the epsilon keeps the gradient finite at 0


@register_trigger_family("warp")
class WarpFamily(TriggerFamily):
    """A smooth displacement field ``flow`` (H, W, 2) in pixels, ``|flow| <= max_shift`` per axis."""

    grid: int = 7
    max_shift: float = 2.0

    def init(self) -> List[Tensor]:
        return [torch.zeros((1, 2, self.grid, self.grid), requires_grad=True)]

    def decode(self, free: List[Tensor]) -> Decoded:
        coarse = self.max_shift * torch.tanh(free[0])
        _, h, w = self.shape
        flow = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
        return {"flow": flow[0].permute(1, 2, 0)}

    def stamp(self, trigger: Decoded, x: Tensor) -> Tensor:
        flow = trigger["flow"]
        h, w = flow.shape[:2]
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)])
        grid = torch.stack((xx, yy), dim=-1).to(flow) + flow * scale.to(flow)
        grid = grid.unsqueeze(0).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)

    def size(self, trigger: Decoded) -> Tensor:
        return trigger["flow"].norm(dim=-1).sum()

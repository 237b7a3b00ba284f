"""The compactness of an inverted patch mask: is the trigger one small blob, as a planted patch is?

A planted patch trigger (BadNets' square, Trojan's watermark) is compact by construction, and the mask that
trigger inversion finds for its target covers it. A clean model's natural universal patch for an easy class
is a spread-out shape (on Fashion-MNIST class 8, "bag", a handle-and-body outline). The compactness of a
mask is the fraction of its L1 mass inside its best ``window`` x ``window`` square; its MAD anomaly index
over the classes (positive: more compact than the others') confirms a small trigger in the ``confirmed``
verdict detector (:func:`onp.backdoor_verdict.confirmed_target`; docs/results.md §22).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DEFAULT_WINDOW", "mask_compactness"]

#: the side of the square window, in pixels (BadNets' trigger is 3 x 3 on 28 x 28 images)
DEFAULT_WINDOW = 5


@torch.no_grad()
def mask_compactness(masks: Tensor, window: int = DEFAULT_WINDOW) -> Tensor:
    """Per mask of ``masks`` (K, 1, H, W) (or (K, H, W)), the fraction of its mass (L1) inside its best
    ``window`` x ``window`` square (the whole mask when it is smaller); NaN for an all-zero mask."""
    m = masks.abs().reshape(masks.shape[0], 1, *masks.shape[-2:]).float()
    side = min(window, m.shape[-2], m.shape[-1])
    best = (F.avg_pool2d(m, side, stride=1) * side * side).flatten(1).max(1).values
    total = m.flatten(1).sum(1)
    return torch.where(total > 0, best / total.clamp_min(1e-12), torch.full_like(total, float("nan")))

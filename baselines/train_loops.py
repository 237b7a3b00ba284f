"""Small mini-batch training loops shared by the defenses (counted forward/backward passes)."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onp.data.augment import BatchTransform

from .base import PassCounter, epoch_batches


def run_epoch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    batch_size: int,
    gen: torch.Generator,
    counter: PassCounter,
    augment: Optional[BatchTransform] = None,
    ascent: bool = False,
    loss_scale: float = 1.0,
    after_step: Optional[Callable[[], None]] = None,
) -> Tuple[float, float]:
    """One shuffled pass over ``(x, y)``; returns (mean CE, running accuracy over the epoch).

    ``ascent=True`` maximises the cross-entropy (RNP unlearning: the step minimises -CE).
    ``after_step`` runs after every optimizer step (e.g. mask clamping).
    """
    total_loss, seen = 0.0, 0
    correct: float = 0
    for idx in epoch_batches(len(y), batch_size, gen):
        xb, yb = x[idx], y[idx]
        if augment is not None:
            xb = augment(xb, gen)
        logits = counter(model, xb)
        loss = F.cross_entropy(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        counter.backward((-loss if ascent else loss) * loss_scale)
        optimizer.step()
        if after_step is not None:
            after_step()
        total_loss += loss.item() * len(yb)
        correct += (logits.detach().argmax(1) == yb).sum().item()
        seen += len(yb)
    return total_loss / max(seen, 1), correct / max(seen, 1)

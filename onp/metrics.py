"""Backdoor-defense metrics: ACC, ASR, RA and DER.

* ACC: top-1 accuracy on clean test images.
* ASR: fraction of triggered images (excluding, for all-to-one attacks, images whose true label is
  the target) classified as the attacker's target label.
* RA (robust accuracy): fraction of the same triggered images classified as their *true* label.
* DER (defense effectiveness rating; Zhu et al., ICCV 2023):
  ``DER = [max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1] / 2`` in [0, 1],
  1 = ASR removed with no clean-accuracy loss, 0.5 = nothing changed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from .attacks import Attack


@torch.inference_mode()
def predict(
    model: nn.Module, x: torch.Tensor, batch_size: int = 512, device: Optional[torch.device] = None
) -> torch.Tensor:
    """Predicted labels for a float image tensor (N, C, H, W) in [0, 1]; the model is put in eval mode."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        out.append(model(x[i : i + batch_size].to(device)).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``pred == labels`` (0.0 for empty input)."""
    if len(labels) == 0:
        return 0.0
    return (pred == labels).float().mean().item()


def der(acc_before: float, asr_before: float, acc_after: float, asr_after: float) -> float:
    """Defense effectiveness rating, all values as fractions in [0, 1]."""
    d_asr = asr_before - asr_after
    d_acc = acc_before - acc_after
    return (max(0.0, d_asr) - max(0.0, d_acc) + 1.0) / 2.0


def evaluate_backdoor(
    model: nn.Module, clean_x: torch.Tensor, clean_y: torch.Tensor, attack: Attack, batch_size: int = 512
) -> Dict[str, float]:
    """ACC on ``(clean_x, clean_y)``, and ASR and RA on the attack's poisoned version of the same images.

    ``attack`` is an :class:`onp.attacks.Attack`; its ``poisoned_eval_set`` drops target-class images
    for all-to-one attacks. Images are float in [0, 1] (convert uint8 first).
    """
    acc = accuracy(predict(model, clean_x, batch_size), clean_y)
    x_bd, y_target, y_true = attack.poisoned_eval_set(clean_x, clean_y)
    pred_bd = predict(model, x_bd, batch_size)
    return {"acc": acc, "asr": accuracy(pred_bd, y_target), "ra": accuracy(pred_bd, y_true)}


def with_der(before: Dict[str, float], after: Dict[str, float]) -> Dict[str, float]:
    """``after`` plus its DER relative to ``before`` (both dicts with ``acc`` and ``asr``)."""
    out = dict(after)
    out["der"] = der(before["acc"], before["asr"], after["acc"], after["asr"])
    return out

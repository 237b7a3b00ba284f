"""FT: plain fine-tuning of all weights on the defender's clean data.

The standard "fine-tuning" baseline of the backdoor-defense literature (e.g. Liu et al., RAID 2018;
Wu & Wang, NeurIPS 2021 use it as a comparison). Defaults: SGD lr 0.01, momentum 0.9, weight decay
5e-4, batch 128, 10 epochs, crop/flip augmentation, model in train mode. The epoch (1..epochs) with the
best defense-**validation** accuracy is returned (ties: the later epoch); without defense-validation
images (the ``paper`` protocol fits on the whole pool) the last epoch. No neuron scores.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch

from .base import (
    Defense,
    DefenseError,
    DefenseParams,
    DefenseResult,
    default_augment,
    eval_accuracy,
    register_defense,
    require_data,
    require_images,
)
from .train_loops import run_epoch

if TYPE_CHECKING:
    from torch import nn

    from onp.data.augment import Augment
    from onp.data.defense import DefenseData
    from onp.graph import NeuronLayout

    from .base import PassCounter, ReportFn


@dataclass
class FTParams(DefenseParams):
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 10
    batch_size: int = 128
    augment: bool = True


def finetune(
    model: nn.Module,
    data: DefenseData,
    p: FTParams,
    *,
    seed: int,
    augment: Optional[Augment],
    counter: PassCounter,
    name: str = "ft",
    after_step: Optional[Callable[[], None]] = None,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Fine-tune ``model`` in place for ``p.epochs``; returns (best-val model, history). Without
    defense-validation images the last epoch is returned and ``val_acc`` is None."""
    require_images(name, len(data.train_y), p.batch_size)
    has_val = len(data.val_y) > 0
    gen = torch.Generator().manual_seed(seed)
    aug = (augment or default_augment(data.train_x)) if p.augment else None
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    val: Optional[float] = eval_accuracy(model, data.val_x, data.val_y, counter) if has_val else None
    history: List[Dict[str, Any]] = [{"epoch": 0, "val_acc": val}]
    best: Optional[Tuple[int, Dict[str, Any]]] = None
    best_acc = -1.0
    for epoch in range(1, p.epochs + 1):
        model.train()
        loss, acc = run_epoch(
            model,
            data.train_x,
            data.train_y,
            opt,
            batch_size=p.batch_size,
            gen=gen,
            counter=counter,
            augment=aug,
            after_step=after_step,
        )
        val = eval_accuracy(model, data.val_x, data.val_y, counter) if has_val else None
        history.append({"epoch": epoch, "train_loss": loss, "train_acc": acc, "val_acc": val})
        if val is None or val >= best_acc:
            best = (epoch, copy.deepcopy(model.state_dict()))
            best_acc = best_acc if val is None else val
    if best is not None:
        model.load_state_dict(best[1])
    model.eval()
    info = {"history": history, "best_epoch": best[0] if best else 0, "best_val_acc": best_acc if has_val else None}
    if not has_val:
        info["note"] = "no defense-validation images: the last epoch is returned"
    return model, info


@register_defense("ft")
class FineTuning(Defense):
    needs_bn = False
    needs_data = True
    Params = FTParams
    params: FTParams

    def validate(self) -> None:
        if self.params.epochs < 1:
            raise DefenseError("ft: epochs must be >= 1")

    def _fit(
        self,
        model: nn.Module,
        data: Optional[DefenseData],
        *,
        layout: Optional[NeuronLayout],
        seed: int,
        augment: Optional[Augment],
        report_fn: Optional[ReportFn],
        counter: PassCounter,
    ) -> DefenseResult:
        data = require_data(self.name, data)
        model, info = finetune(model, data, self.params, seed=seed, augment=augment, counter=counter)
        return DefenseResult(model, info=info)

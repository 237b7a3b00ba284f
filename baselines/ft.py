"""FT: plain fine-tuning of all weights on the defender's clean data.

The standard "fine-tuning" baseline of the backdoor-defense literature (e.g. Liu et al., RAID 2018;
Wu & Wang, NeurIPS 2021 use it as a comparison). Defaults: SGD lr 0.01, momentum 0.9, weight decay
5e-4, batch 128, 10 epochs, crop/flip augmentation, model in train mode. The epoch (1..epochs) with the
best defense-**validation** accuracy is returned (ties: the later epoch); without defense-validation
images (the ``paper`` protocol fits on the whole pool) the last epoch. No neuron scores.

:func:`finetune` is also the loop of the learned defense's fine-tuning after pruning
(:func:`agents.finetune_pruned`), which freezes the BatchNorm statistics (``bn_stats="frozen"``) and
chooses the epoch by its own defense-validation ``score``.
"""

from __future__ import annotations

import copy
import math
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

    from onp.data.augment import BatchTransform
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
    #: ``"update"``: BatchNorm layers in train mode (batch statistics, running statistics re-estimated);
    #: ``"frozen"``: BatchNorm layers in eval mode (the model's own statistics; gamma/beta still learn)
    bn_stats: str = "update"


#: the values of :attr:`FTParams.bn_stats`
BN_STATS = ("update", "frozen")


def _train_mode(model: nn.Module, bn_stats: str) -> None:
    """``model.train()``, then BatchNorm layers back to eval mode when their statistics are frozen."""
    model.train()
    if bn_stats == "frozen":
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def _ranker(
    data: DefenseData, counter: PassCounter, score: Optional[Callable[[nn.Module], float]]
) -> Callable[[nn.Module], Optional[float]]:
    """What picks the epoch: ``score``, else the defense-validation accuracy (None without val images)."""

    def rank(m: nn.Module) -> Optional[float]:
        if score is not None:
            return float(score(m))
        return eval_accuracy(m, data.val_x, data.val_y, counter) if len(data.val_y) else None

    return rank


def finetune(
    model: nn.Module,
    data: DefenseData,
    p: FTParams,
    *,
    seed: int,
    augment: Optional[BatchTransform],
    counter: PassCounter,
    name: str = "ft",
    after_step: Optional[Callable[[], None]] = None,
    score: Optional[Callable[[nn.Module], float]] = None,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Fine-tune ``model`` in place for ``p.epochs``; returns (best-val model, history). Without
    defense-validation images the last epoch is returned and ``val_acc`` is None.

    ``score(model)`` (higher is better, on defense-validation) replaces the validation accuracy as the
    rule that picks the epoch; epoch 0 (the model as given) is then a candidate too.
    """
    if p.bn_stats not in BN_STATS:
        raise DefenseError(f"{name}: unknown bn_stats {p.bn_stats!r}; valid: {', '.join(BN_STATS)}")
    require_images(name, len(data.train_y), p.batch_size)
    has_val = len(data.val_y) > 0
    key = "score" if score is not None else "val_acc"
    rank = _ranker(data, counter, score)
    gen = torch.Generator().manual_seed(seed)
    aug = (augment or default_augment(data.train_x)) if p.augment else None
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    value = rank(model)
    history: List[Dict[str, Any]] = [{"epoch": 0, key: value}]
    # with a score the model as given competes too; the FT baseline returns a fine-tuned epoch
    best: Optional[Tuple[int, Dict[str, Any]]] = (0, copy.deepcopy(model.state_dict())) if score is not None else None
    best_value = value if score is not None and value is not None else -math.inf
    for epoch in range(1, p.epochs + 1):
        _train_mode(model, p.bn_stats)
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
        value = rank(model)
        history.append({"epoch": epoch, "train_loss": loss, "train_acc": acc, key: value})
        if value is None or value >= best_value:
            best = (epoch, copy.deepcopy(model.state_dict()))
            best_value = best_value if value is None else value
    if best is not None:
        model.load_state_dict(best[1])
    model.eval()
    ranked = score is not None or has_val
    info = {"history": history, "best_epoch": best[0] if best else 0, f"best_{key}": best_value if ranked else None}
    if not ranked:
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
        augment: Optional[BatchTransform],
        report_fn: Optional[ReportFn],
        counter: PassCounter,
    ) -> DefenseResult:
        data = require_data(self.name, data)
        model, info = finetune(model, data, self.params, seed=seed, augment=augment, counter=counter)
        return DefenseResult(model, info=info)

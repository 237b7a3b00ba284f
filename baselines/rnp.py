"""RNP: Reconstructive Neuron Pruning.

Li, Lyu, Ma, Koren, Lyu, Li, Jiang, "Reconstructive Neuron Pruning for Backdoor Defense", ICML 2023
(arXiv 2305.14876). Reimplemented from the paper's Algorithm 1 and the behaviour described in the
project's methods reference (no code copied).

1. **Unlearning** (all weights, model in train mode): gradient *ascent* on CE over defense-train
   with SGD (lr 0.01, momentum 0.9, weight decay 5e-4, lr x0.1 at epochs 10 and 20), crop/flip
   augmentation. Stop after the first epoch whose *running* train accuracy is <= ``clean_threshold``
   (0.20). At most ``unlearn_epochs`` (20) epochs; if the threshold is never reached we continue
   with the last state and record ``info["unlearning_reached_threshold"] = False``.
2. **Recovery** (masks only): one mask per neuron (BN channel, :class:`onp.masks.NeuronMasks`,
   ``gamma`` mode: gamma_c * m_c, beta kept) as an ``nn.Parameter`` on the *frozen* unlearned
   weights; minimise ``alpha * CE`` (alpha 0.2, a pure step rescaling as in the paper's code) with
   SGD (lr 0.2, momentum 0.9) for 20 epochs, train mode, masks clamped to [0, 1] after every step.
   No sparsity term. (In train mode the BN running statistics of the *unlearned* copy update, as in
   the paper's code; its weights do not change, and the unlearned copy is discarded afterwards.)
3. **Pruning** on the **original** model (gamma mode: gamma_c = 0, beta kept), in ascending mask
   order; how many is chosen by the operating-point rule (default ``delta``; ``threshold`` prunes
   every neuron with mask <= ``threshold``, 0.2 by default; the code's README reports 0.2-0.3).

Scores: ``1 - mask`` (higher = more suspicious). The code's gradient-norm clipping is a no-op
(called before ``backward``) and is omitted.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .base import (
    Defense,
    DefenseError,
    DefenseResult,
    PruningParams,
    default_augment,
    eval_accuracy,
    freeze,
    model_device,
    register_defense,
    require_data,
    require_images,
    require_layout,
)
from .operating_point import finalize_pruning
from .train_loops import run_epoch

if TYPE_CHECKING:
    from onp.data.augment import Augment
    from onp.data.defense import DefenseData
    from onp.graph import NeuronLayout

    from .base import PassCounter, ReportFn


@dataclass
class RNPParams(PruningParams):
    batch_size: int = 128
    augment: bool = True
    unlearn_lr: float = 0.01
    unlearn_momentum: float = 0.9
    unlearn_weight_decay: float = 5e-4
    unlearn_epochs: int = 20
    unlearn_milestones: Tuple[int, ...] = (10, 20)
    clean_threshold: float = 0.20
    recover_lr: float = 0.2
    recover_momentum: float = 0.9
    recover_epochs: int = 20
    alpha: float = 0.2
    threshold: float = 0.2  # for operating_point=threshold
    keep_intermediate: bool = False  # keep the unlearned model in info["_unlearned_model"] (tests, analysis)


def unlearn(
    model: nn.Module,
    data: DefenseData,
    p: RNPParams,
    *,
    gen: torch.Generator,
    aug: Optional[Augment],
    counter: PassCounter,
) -> Tuple[List[Dict[str, Any]], bool]:
    """Gradient ascent until the running train accuracy is <= ``clean_threshold``; returns the history."""
    opt = torch.optim.SGD(
        model.parameters(), lr=p.unlearn_lr, momentum=p.unlearn_momentum, weight_decay=p.unlearn_weight_decay
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(p.unlearn_milestones), gamma=0.1)
    history: List[Dict[str, Any]] = []
    reached = False
    for epoch in range(1, p.unlearn_epochs + 1):
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
            ascent=True,
        )
        sched.step()
        history.append({"epoch": epoch, "train_loss": loss, "train_acc": acc})
        if acc <= p.clean_threshold:
            reached = True
            break
    return history, reached


def recover_masks(
    unlearned: nn.Module,
    layout: NeuronLayout,
    data: DefenseData,
    p: RNPParams,
    *,
    gen: torch.Generator,
    aug: Optional[Augment],
    counter: PassCounter,
) -> Tuple[Tensor, List[Dict[str, Any]]]:
    """Learn per-neuron masks on the frozen unlearned model; returns (mask tensor, history)."""
    from onp.masks import NeuronMasks

    freeze(unlearned)
    mask = nn.Parameter(torch.ones(layout.num_neurons, device=model_device(unlearned)))
    masks = NeuronMasks(unlearned, layout.bn_names, mode="gamma")
    masks.set_mask(mask)
    opt = torch.optim.SGD([mask], lr=p.recover_lr, momentum=p.recover_momentum)

    def clamp() -> None:
        with torch.no_grad():
            mask.clamp_(0.0, 1.0)

    history: List[Dict[str, Any]] = []
    try:
        for epoch in range(1, p.recover_epochs + 1):
            unlearned.train()
            loss, acc = run_epoch(
                unlearned,
                data.train_x,
                data.train_y,
                opt,
                batch_size=p.batch_size,
                gen=gen,
                counter=counter,
                augment=aug,
                loss_scale=p.alpha,
                after_step=clamp,
            )
            history.append({"epoch": epoch, "train_loss": loss, "train_acc": acc})
    finally:
        masks.remove()
    return mask.detach().clone(), history


@register_defense("rnp")
class RNP(Defense):
    needs_bn = True
    needs_data = True
    prunes = True
    Params = RNPParams
    params: RNPParams

    def validate(self) -> None:
        p = self.params
        if p.unlearn_epochs < 1 or p.recover_epochs < 0:
            raise DefenseError("rnp: unlearn_epochs must be >= 1 and recover_epochs >= 0")

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
        p = self.params
        data, layout = require_data(self.name, data), require_layout(self.name, layout)
        require_images(self.name, len(data.train_y), p.batch_size)
        gen = torch.Generator().manual_seed(seed)
        aug = (augment or default_augment(data.train_x)) if p.augment else None
        original = model  # already a private copy (Defense.fit); never trained
        unlearned = copy.deepcopy(original)
        history, reached = unlearn(unlearned, data, p, gen=gen, aug=aug, counter=counter)
        unlearned_val = eval_accuracy(unlearned, data.val_x, data.val_y, counter)
        if report_fn is not None:
            report_fn("unlearned", unlearned)
        unlearned_state = (
            {k: v.detach().clone() for k, v in unlearned.named_parameters()} if p.keep_intermediate else None
        )
        mask, rec_history = recover_masks(unlearned, layout, data, p, gen=gen, aug=aug, counter=counter)
        if report_fn is not None:  # the unlearned model under the recovered masks (the paper's log line)
            from onp.masks import NeuronMasks

            with NeuronMasks(unlearned, layout.bn_names, mode="gamma") as soft:
                soft.set_mask(mask)
                report_fn("recovered_unlearned", unlearned)
        scores = 1.0 - mask
        pruned_model, pruned, op = finalize_pruning(
            original, layout, scores, data, p, counter, threshold_values=mask, threshold=p.threshold
        )
        info = {
            "operating_point": op,
            "unlearning_reached_threshold": reached,
            "unlearning_epochs": len(history),
            "unlearning_train_acc": history[-1]["train_acc"],
            "unlearned_val_acc": unlearned_val,
            "unlearning_history": history,
            "recovery_history": rec_history,
            "mask_min": float(mask.min()),
            "mask_mean": float(mask.mean()),
            "n_mask_le_threshold": int((mask <= p.threshold).sum()),
            "score": "1 - recovered mask",
            "_mask": mask,
        }
        if p.keep_intermediate:
            info.update(_unlearned_params=unlearned_state, _unlearned_model=unlearned)
        if not reached:
            info["note"] = (
                f"unlearning never reached train accuracy <= {p.clean_threshold} in {p.unlearn_epochs} "
                f"epochs; continued with the last unlearned state"
            )
        return DefenseResult(pruned_model, scores=scores, pruned=pruned, info=info)

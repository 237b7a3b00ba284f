"""FP: Fine-Pruning.

Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
Networks", RAID 2018 (arXiv 1805.12185). Reimplemented from the paper.

1. Rank the neurons of the **last** convolutional layer (its BatchNorm2d channels; ``layer="all"``
   ranks every BN layer) by their mean post-ReLU activation on clean defense-train images, in eval
   mode. Dormant neurons (lowest activation) are pruned first: backdoor behaviour hides in neurons
   that clean inputs do not use.
2. Choose how many with the operating-point rule (default: the largest pruning whose clean-ACC drop
   on defense-val is <= ``delta``; the paper stops at a 4% validation drop), and prune (gamma mode).
3. Fine-tune all weights on defense-train (SGD lr 0.01, momentum 0.9, 5 epochs, crop/flip), keeping
   the pruned neurons pruned; the epoch with the best defense-val accuracy is returned.

Scores (every neuron): the negated mean post-ReLU activation on defense-train (higher = more
dormant). Only the candidate layer is pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Defense, DefenseError, DefenseResult, PruningParams, register_defense
from .ft import FTParams, finetune
from .operating_point import finalize_pruning


@dataclass
class FPParams(PruningParams):
    max_fraction: float = 0.9  # of the candidate layer's neurons
    layer: str = "last"  # last | all | a BN module name
    ft_epochs: int = 5
    ft_lr: float = 0.01
    ft_momentum: float = 0.9
    ft_weight_decay: float = 5e-4
    batch_size: int = 128
    augment: bool = True


@torch.no_grad()
def mean_activations(model, layout, x, counter, batch_size: int = 512) -> torch.Tensor:
    """Mean post-ReLU BN output per neuron over ``x`` (eval mode)."""
    mods = dict(model.named_modules())
    sums = torch.zeros(layout.num_neurons)
    handles = []
    for layer in layout.layers:
        def hook(module, inp, out, sl=layer.slice):
            sums[sl] += out.clamp_min(0).mean(dim=(2, 3)).sum(0)
        handles.append(mods[layer.bn_name].register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            counter(model, x[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return sums / max(len(x), 1)


@register_defense("fp")
class FinePruning(Defense):
    needs_bn = True
    needs_data = True
    prunes = True
    Params = FPParams

    def _fit(self, model, data, *, layout, seed, augment, report_fn, counter):
        p = self.params
        act = mean_activations(model, layout, data.train_x, counter)
        scores = -act
        candidates = torch.zeros(layout.num_neurons, dtype=torch.bool)
        if p.layer == "last":
            candidates[layout.layers[-1].slice] = True
        elif p.layer == "all":
            candidates[:] = True
        else:
            names = layout.bn_names
            if p.layer not in names:
                raise DefenseError(f"fp: layer {p.layer!r} is not a BatchNorm2d of the model; valid: last, all, "
                                   f"{', '.join(names)}")
            candidates[layout.layers[names.index(p.layer)].slice] = True
        pruned_model, pruned, op = finalize_pruning(model, layout, scores, data, p, counter, candidates=candidates)
        from onp.masks import NeuronMasks
        masks = NeuronMasks(pruned_model, layout.bn_names, mode="gamma")  # keep the pruned neurons pruned
        masks.prune(pruned)
        try:
            ft = FTParams(lr=p.ft_lr, momentum=p.ft_momentum, weight_decay=p.ft_weight_decay, epochs=p.ft_epochs,
                          batch_size=p.batch_size, augment=p.augment)
            if p.ft_epochs > 0:
                pruned_model, ft_info = finetune(pruned_model, data, ft, seed=seed, augment=augment, counter=counter,
                                                 name="fp")
            else:
                ft_info = {}
            state = masks.export_state_dict()
        finally:
            masks.remove()
        pruned_model.load_state_dict(state)
        return DefenseResult(pruned_model, scores=scores, pruned=pruned,
                             info={"operating_point": op, "finetune": ft_info,
                                   "candidate_layer": p.layer, "score": "-mean post-ReLU activation"})

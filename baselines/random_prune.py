"""Random pruning: a seeded random neuron order (the floor every ranking should beat).

Score = a seeded uniform random number per neuron (higher = pruned earlier); the count comes from
the operating-point rule, like the other pruning defenses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from .base import Defense, DefenseResult, PruningParams, register_defense, require_layout
from .operating_point import finalize_pruning

if TYPE_CHECKING:
    from torch import nn

    from onp.data.augment import Augment
    from onp.data.defense import DefenseData
    from onp.graph import NeuronLayout

    from .base import PassCounter, ReportFn


@dataclass
class RandomParams(PruningParams):
    pass


@register_defense("random")
class RandomPruning(Defense):
    needs_bn = True
    needs_data = False
    prunes = True
    Params = RandomParams
    params: RandomParams

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
        layout = require_layout(self.name, layout)
        scores = torch.rand(layout.num_neurons, generator=torch.Generator().manual_seed(seed))
        pruned_model, pruned, info = finalize_pruning(model, layout, scores, data, self.params, counter)
        return DefenseResult(
            pruned_model,
            scores=scores,
            pruned=pruned,
            info={"operating_point": info, "score": f"uniform random (seed {seed})"},
        )

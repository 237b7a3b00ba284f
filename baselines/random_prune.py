"""Random pruning: a seeded random neuron order (the floor every ranking should beat).

Score = a seeded uniform random number per neuron (higher = pruned earlier); the count comes from
the operating-point rule, like the other pruning defenses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Defense, DefenseResult, PruningParams, register_defense
from .operating_point import finalize_pruning


@dataclass
class RandomParams(PruningParams):
    pass


@register_defense("random")
class RandomPruning(Defense):
    needs_bn = True
    needs_data = False
    prunes = True
    Params = RandomParams

    def _fit(self, model, data, *, layout, seed, augment, report_fn, counter):
        scores = torch.rand(layout.num_neurons, generator=torch.Generator().manual_seed(seed))
        pruned_model, pruned, info = finalize_pruning(model, layout, scores, data, self.params, counter)
        return DefenseResult(pruned_model, scores=scores, pruned=pruned,
                             info={"operating_point": info, "score": f"uniform random (seed {seed})"})

"""Magnitude pruning: the neurons with the smallest |BN gamma| go first (a classic, data-free ranking).

Score = -|gamma_c| (higher = smaller scale = pruned earlier). The count is chosen by the
operating-point rule (default: largest pruning with <= ``delta`` clean-ACC drop on defense-val).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from .base import Defense, DefenseResult, PruningParams, bn_gammas, register_defense, require_layout
from .operating_point import finalize_pruning

if TYPE_CHECKING:
    from torch import nn

    from onp.data.augment import Augment
    from onp.data.defense import DefenseData
    from onp.graph import NeuronLayout

    from .base import PassCounter, ReportFn


@dataclass
class MagnitudeParams(PruningParams):
    pass


@register_defense("magnitude")
class MagnitudePruning(Defense):
    needs_bn = True
    needs_data = False  # only the "delta" operating-point rule reads defense-val
    prunes = True
    Params = MagnitudeParams
    params: MagnitudeParams

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
        scores = -bn_gammas(model, layout).abs()
        pruned_model, pruned, info = finalize_pruning(model, layout, scores, data, self.params, counter)
        return DefenseResult(
            pruned_model, scores=scores, pruned=pruned, info={"operating_point": info, "score": "-|gamma|"}
        )

"""CLP: data-free Channel Lipschitzness-based Pruning.

Zheng, Zhang, Wang, Zhao, Wang, "Data-free Backdoor Removal based on Channel Lipschitzness",
ECCV 2022 (arXiv 2208.03111). Reimplemented from the paper.

For every Conv2d followed directly by a BatchNorm2d, the channel k's map x -> BN(conv(x))_k is
affine with linear part W_k * gamma_k / sqrt(var_k + eps); its spectral norm (the kernel reshaped
to ``(C_in, kh*kw)``) is the Upper bound of the Channel Lipschitz Constant (UCLC). Channels whose
UCLC exceeds ``mean + u * std`` of their layer are pruned (u = 3). **No data is used**
(``defense_data`` may be None).

Scores: the per-layer standardised UCLC ``(UCLC - mean) / std`` (higher = more suspicious; a
channel is pruned iff its score > u). BNs without a directly preceding conv (pre-activation
networks) get score 0 and are never pruned.

Pruning removes the whole channel (gamma and beta set to 0, ``prune_mode="channel"``), as the CLP
paper prunes channels; ``prune_mode="gamma"`` keeps beta like ANP/RNP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, cast

import torch

from .base import Defense, DefenseError, DefenseParams, DefenseResult, register_defense, require_layout
from .operating_point import prune_model

if TYPE_CHECKING:
    from torch import nn

    from onp.data.augment import Augment
    from onp.data.defense import DefenseData
    from onp.graph import NeuronLayout

    from .base import PassCounter, ReportFn


@dataclass
class CLPParams(DefenseParams):
    u: float = 3.0
    prune_mode: str = "channel"  # channel (CLP) | gamma


@torch.no_grad()
def channel_lipschitz(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    """UCLC per output channel of ``bn(conv(.))``: spectral norm of the BN-scaled kernel slice."""
    # grouped / depthwise convs: each output channel's slice is (C_in / groups, kh, kw); same formula
    if bn.running_var is None:
        raise DefenseError(f"clp: {bn} keeps no running statistics (track_running_stats=False)")
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w = conv.weight * scale.view(-1, 1, 1, 1)
    return torch.linalg.matrix_norm(w.reshape(w.shape[0], w.shape[1], -1), ord=2)


@register_defense("clp")
class CLP(Defense):
    needs_bn = True
    needs_data = False
    prunes = True
    Params = CLPParams
    params: CLPParams

    def validate(self) -> None:
        if self.params.prune_mode not in ("channel", "gamma"):
            raise DefenseError(f"clp: prune_mode must be 'channel' or 'gamma', got {self.params.prune_mode!r}")

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
        mods = dict(model.named_modules())
        scores = torch.zeros(layout.num_neurons)
        pruned: List[int] = []
        per_layer: Dict[str, int] = {}
        for layer in layout.layers:
            if layer.conv_name is None:
                continue
            uclc = channel_lipschitz(
                cast(torch.nn.Conv2d, mods[layer.conv_name]), cast(torch.nn.BatchNorm2d, mods[layer.bn_name])
            )
            mean, std = uclc.mean(), uclc.std() if len(uclc) > 1 else torch.tensor(0.0)
            z = (uclc - mean) / std if std > 0 else torch.zeros_like(uclc)
            scores[layer.slice] = z.cpu()
            hit = torch.nonzero(uclc > mean + self.params.u * std).flatten()
            pruned += [layer.offset + int(c) for c in hit]
            per_layer[layer.bn_name] = int(len(hit))
        pruned.sort()
        out = prune_model(model, layout, pruned, self.params.prune_mode)
        return DefenseResult(
            out,
            scores=scores,
            pruned=pruned,
            info={
                "operating_point": {
                    "rule": "clp",
                    "u": self.params.u,
                    "n_pruned": len(pruned),
                    "prune_mode": self.params.prune_mode,
                    "note": "UCLC > mean + u*std per layer (data-free)",
                },
                "pruned_per_layer": per_layer,
            },
        )

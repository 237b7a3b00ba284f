"""Layer-type categories of BatchNorm layers, derived from the traced graph (no per-architecture tables).

Categories (:data:`LAYER_TYPES`), decided by the first matching rule in :data:`LAYER_TYPE_RULES`:

* ``"stem"``: the BN's incoming frontier is empty (it sees only the image through convs), e.g. the
  first BN of every network, or ``layer1.0.bn1`` of PreAct-ResNet;
* ``"final"``: its output reaches no other BatchNorm (only the classifier), e.g. ``layer4.1.bn2`` of
  ResNet-18 or the last ``bn`` of PreAct-ResNet;
* ``"shortcut"``: it lies on the shorter branch of a residual add, which contains at least one conv
  (the 1x1 projection shortcut of ResNet/MobileNet blocks); "shorter" = fewer convs since the
  branches forked;
* ``"preact"``: it is not fed directly by a conv (pre-activation BN reading the residual stream);
* ``"depthwise"``: fed by a grouped conv (``groups > 1``);
* ``"conv"``: everything else (conv -> BN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch.fx as fx

LAYER_TYPES: Tuple[str, ...] = ("stem", "conv", "depthwise", "shortcut", "preact", "final")


@dataclass
class LayerFacts:
    """What the classification rules look at for one BN layer."""

    has_inputs: bool
    feeds_neurons: bool
    on_shortcut: bool
    conv_name: Optional[str]
    conv_groups: int


#: ``(layer type, predicate)`` in priority order; the last rule always matches.
LAYER_TYPE_RULES: List[Tuple[str, Callable[[LayerFacts], bool]]] = [
    ("stem", lambda f: not f.has_inputs),
    ("final", lambda f: not f.feeds_neurons),
    ("shortcut", lambda f: f.on_shortcut),
    ("preact", lambda f: f.conv_name is None),
    ("depthwise", lambda f: f.conv_groups > 1),
    ("conv", lambda f: True),
]


def classify(facts: LayerFacts) -> str:
    """The layer type given by the first matching rule."""
    for name, rule in LAYER_TYPE_RULES:
        if rule(facts):
            return name
    return "conv"


def shortcut_nodes(
    nodes: Sequence[fx.Node], is_conv: Callable[[fx.Node], bool], residual_adds: Sequence[Tuple[fx.Node, fx.Node]]
) -> Set[str]:
    """Names of the fx nodes on the shorter (but non-empty) conv branch of each residual add."""
    index = {n: i for i, n in enumerate(nodes)}
    anc: List[int] = [0] * len(nodes)  # ancestor bitsets
    cdepth: List[int] = [0] * len(nodes)  # longest number of convs from the input
    for i, n in enumerate(nodes):
        bits, depth = 0, 0
        for a in n.all_input_nodes:
            j = index[a]
            bits |= anc[j] | (1 << j)
            depth = max(depth, cdepth[j])
        anc[i], cdepth[i] = bits, depth + int(is_conv(n))
    names: Set[str] = set()
    for a, b in residual_adds:
        ia, ib = index[a], index[b]
        sa, sb = anc[ia] | (1 << ia), anc[ib] | (1 << ib)
        common = sa & sb
        if not common:
            continue
        fork = common.bit_length() - 1
        la, lb = cdepth[ia] - cdepth[fork], cdepth[ib] - cdepth[fork]
        if la == lb or min(la, lb) < 1:
            continue
        short = sa if la < lb else sb
        branch = short & ~(anc[fork] | (1 << fork))
        names.update(nodes[k].name for k in range(len(nodes)) if branch >> k & 1)
    return names


def reaches(nodes: Sequence[fx.Node], target: Callable[[fx.Node], bool]) -> Dict[str, bool]:
    """For every node: does its output reach (strictly downstream) a node satisfying ``target``?"""
    out: Dict[str, bool] = {}
    for n in reversed(list(nodes)):
        out[n.name] = any(target(u) or out.get(u.name, False) for u in n.users)
    return out

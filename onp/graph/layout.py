"""Neuron numbering: the one index of neurons (BatchNorm2d output channels) that the neuron graph,
the masks, the environment and every defense share.

BatchNorm2d layers come in torch.fx topological order (each module once, at its first use), channels
in order inside a layer; a neuron's global id is its layer's offset plus its channel. A neuron's
name is ``"<bn module>[<channel>]"`` (:func:`neuron_name`).

:func:`neuron_layout` computes the numbering from the model alone (no example input, no graph);
:attr:`onp.graph.NeuronGraph.layout` is the same numbering read off a built graph, and
:meth:`NeuronLayout.check_same_numbering` says where two of them differ.

>>> from onp.models import build_model
>>> layout = neuron_layout(build_model("small_cnn", in_channels=1, width=4))
>>> layout.num_neurons, layout.names([0, 23])
(24, ['bn1[0]', 'bn4[7]'])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .frontier import UnsupportedModelError


def neuron_name(bn_name: str, channel: int) -> str:
    """The one way onp names a neuron: its BatchNorm2d module and channel, ``"layer1.0.bn1[3]"``."""
    return f"{bn_name}[{int(channel)}]"


@dataclass(frozen=True)
class NeuronLayer:
    """One BatchNorm2d layer in the numbering.

    Attributes:
        bn_name: qualified module name of the BatchNorm2d.
        offset: global id of its channel 0 (its neurons are ``offset .. offset + num_channels - 1``).
        num_channels: BN ``num_features``.
        conv_name: qualified name of the Conv2d feeding the BN directly, or None (pre-activation BN).
    """

    bn_name: str
    offset: int
    num_channels: int
    conv_name: Optional[str]

    @property
    def slice(self) -> slice:
        """Global ids of the layer's neurons, as a slice."""
        return slice(self.offset, self.offset + self.num_channels)


@dataclass(frozen=True)
class NeuronLayout:
    """The BatchNorm2d layers in numbering order, with their global offsets."""

    layers: Tuple[NeuronLayer, ...]

    @property
    def num_neurons(self) -> int:
        return sum(layer.num_channels for layer in self.layers)

    @property
    def bn_names(self) -> List[str]:
        return [layer.bn_name for layer in self.layers]

    def locate(self, node: int) -> Tuple[str, int]:
        """``(bn_name, channel)`` of a global neuron id."""
        for layer in self.layers:
            if layer.offset <= node < layer.offset + layer.num_channels:
                return layer.bn_name, node - layer.offset
        raise IndexError(f"neuron {node} out of range (model has {self.num_neurons})")

    def names(self, nodes: Sequence[int]) -> List[str]:
        """:func:`neuron_name` of each global neuron id."""
        return [neuron_name(*self.locate(int(n))) for n in nodes]

    def check_same_numbering(self, other: NeuronLayout) -> None:
        """Raise :class:`UnsupportedModelError` if ``other`` numbers the neurons differently."""
        ours = [(layer.bn_name, layer.offset, layer.num_channels) for layer in self.layers]
        theirs = [(layer.bn_name, layer.offset, layer.num_channels) for layer in other.layers]
        if ours != theirs:
            raise UnsupportedModelError(f"neuron numbering differs: {ours[:4]}... vs {theirs[:4]}...")


def _fx_bn_order(model: nn.Module) -> Optional[List[Tuple[str, Optional[str]]]]:
    """BN modules in fx topological order (first use), each with the Conv2d feeding it directly;
    None if the model cannot be traced."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # fx raises TraceError, TypeError, RuntimeError, ...
        return None
    mods: Dict[str, nn.Module] = dict(model.named_modules())
    out: List[Tuple[str, Optional[str]]] = []
    seen = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(str(node.target)), nn.BatchNorm2d):
            continue
        if node.target in seen:
            continue
        seen.add(node.target)
        src = node.args[0] if node.args else None
        conv = None
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(mods.get(str(src.target)), nn.Conv2d)
        ):
            conv = str(src.target)
        out.append((str(node.target), conv))
    return out


def neuron_layout(model: nn.Module) -> NeuronLayout:
    """The neuron numbering of ``model``: BN layers in torch.fx topological order (``named_modules``
    order if the model cannot be traced), each with the Conv2d that feeds it directly.

    Raises:
        UnsupportedModelError: the model has no BatchNorm2d layer.
    """
    mods = dict(model.named_modules())
    order = _fx_bn_order(model)
    if not order:
        order = [(n, None) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if not order:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no BatchNorm2d layer; onp's neurons are BatchNorm2d channels, "
            f"so the model needs a BatchNorm2d after its convolutions"
        )
    layers, offset = [], 0
    for name, conv in order:
        channels = int(mods[name].num_features)
        layers.append(NeuronLayer(name, offset, channels, conv))
        offset += channels
    return NeuronLayout(tuple(layers))

"""The neuron graph: one node per BatchNorm2d output channel, edges weighted by kernel-slice L1 norms.

>>> from onp.models import build_model
>>> from onp.graph import build_neuron_graph
>>> model = build_model("small_cnn", in_channels=1, width=4)
>>> g = build_neuron_graph(model, torch.zeros(1, 1, 28, 28), top_k=4)
>>> g.num_nodes, [layer.layer_type for layer in g.layers]
(24, ['stem', 'conv', 'conv', 'final'])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .coupling import coupling_groups
from .layer_types import LAYER_TYPES
from .layout import NeuronLayer, NeuronLayout, neuron_name
from .trace import Connectivity, trace_connectivity

if TYPE_CHECKING:  # pragma: no cover
    import networkx as nx
    from torch_geometric.data import Data


@dataclass(frozen=True)
class LayerInfo(NeuronLayer):
    """One BatchNorm2d layer of the graph: its place in the neuron numbering
    (:class:`~onp.graph.layout.NeuronLayer`: ``bn_name``, ``offset``, ``num_channels``,
    ``conv_name``) plus what the graph knows of it.

    Attributes:
        depth: layer index / (number of layers - 1), in [0, 1].
        layer_type: one of :data:`onp.graph.LAYER_TYPES` (see :mod:`onp.graph.layer_types`).
        index: layer index in fx topological order.
    """

    depth: float
    layer_type: str
    index: int = 0


@dataclass
class NeuronGraph:
    """Directed neuron graph (producer -> consumer) of a CNN.

    Attributes:
        layers: BN layers in fx topological order.
        num_nodes: number of neurons (sum of BN ``num_features``).
        edge_index: ``(2, E)`` long, row 0 = source (producer), row 1 = target (consumer); sorted by
            target, strongest first.
        edge_weight: ``(E,)`` float, all > 0.
        node_layer / node_channel: ``(N,)`` long, layer index and channel of each node.
        node_depth: ``(N,)`` float, the layer's normalised depth.
        node_type: ``(N,)`` long, index into :data:`LAYER_TYPES`.
        group: ``(N,)`` long coupling group ids 0..G-1 (see :mod:`onp.graph.coupling`).
        out_strength: ``(N,)`` float, sum of the node's out-edge weights in the *full* graph plus its
            weights into Linear layers (so the last layer's neurons are not 0).
        top_k: the in-degree cap used (None = full graph).
        input_shape: shape of the example input (batch 1) used to build it.
        coupling_method: ``"torch_pruning"`` or ``"trace"``.
    """

    layers: List[LayerInfo]
    num_nodes: int
    edge_index: Tensor
    edge_weight: Tensor
    node_layer: Tensor
    node_channel: Tensor
    node_depth: Tensor
    node_type: Tensor
    group: Tensor
    out_strength: Tensor
    top_k: Optional[int] = None
    input_shape: Tuple[int, ...] = ()
    coupling_method: str = "torch_pruning"
    _by_name: Dict[str, LayerInfo] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name = {layer.bn_name: layer for layer in self.layers}

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    @property
    def num_groups(self) -> int:
        return int(self.group.max()) + 1 if self.group.numel() else 0

    @property
    def bn_names(self) -> List[str]:
        return [layer.bn_name for layer in self.layers]

    @property
    def layout(self) -> NeuronLayout:
        """The graph's neuron numbering (equal to :func:`onp.graph.neuron_layout` of its model)."""
        return NeuronLayout(tuple(self.layers))

    def layer(self, bn_name: str) -> LayerInfo:
        """The :class:`LayerInfo` of a BN module name (KeyError listing valid names otherwise)."""
        try:
            return self._by_name[bn_name]
        except KeyError:
            raise KeyError(f"no BatchNorm2d layer {bn_name!r} in the graph; layers: {self.bn_names}") from None

    def layer_slice(self, bn_name: str) -> slice:
        """Global node ids of a layer, as a slice."""
        return self.layer(bn_name).slice

    def node_index(self, bn_name: str, channel: int) -> int:
        """Global node id of ``channel`` of BN ``bn_name``."""
        layer = self.layer(bn_name)
        if not 0 <= channel < layer.num_channels:
            raise IndexError(f"channel {channel} out of range for {bn_name} ({layer.num_channels} channels)")
        return layer.offset + int(channel)

    def neuron_names(self, nodes: Sequence[int]) -> List[str]:
        """``"<bn_name>[<channel>]"`` of each global node id (the names ``pruned.json`` records)."""
        return [neuron_name(self.layers[int(self.node_layer[i])].bn_name, int(self.node_channel[i])) for i in nodes]

    def in_degree(self) -> Tensor:
        """``(N,)`` number of incoming edges per node."""
        return torch.bincount(self.edge_index[1], minlength=self.num_nodes)

    def to_pyg(self, x: Optional[Tensor] = None) -> Data:
        """A ``torch_geometric.data.Data``: ``edge_index``, ``edge_attr`` = weights as ``(E, 1)``,
        ``edge_weight`` = weights as ``(E,)`` (for GCN-style layers), node attributes ``node_layer``,
        ``node_channel``, ``group``, ``node_type``, ``node_depth``, and ``x`` when given."""
        from torch_geometric.data import Data

        if x is not None and x.shape[0] != self.num_nodes:
            raise ValueError(f"x has {x.shape[0]} rows, the graph {self.num_nodes} nodes")
        return Data(
            x=x,
            edge_index=self.edge_index.clone(),
            edge_attr=self.edge_weight.view(-1, 1).clone(),
            edge_weight=self.edge_weight.clone(),
            num_nodes=self.num_nodes,
            node_layer=self.node_layer,
            node_channel=self.node_channel,
            group=self.group,
            node_type=self.node_type,
            node_depth=self.node_depth,
        )

    def to_networkx(self) -> nx.DiGraph:
        """A ``networkx.DiGraph``; node attributes ``layer``, ``channel``, ``group``, ``layer_type``;
        edge attribute ``weight``."""
        import networkx as nx

        g = nx.DiGraph()
        layer, channel, group, ntype = (
            t.tolist() for t in (self.node_layer, self.node_channel, self.group, self.node_type)
        )
        g.add_nodes_from(
            (i, {"layer": layer[i], "channel": channel[i], "group": group[i], "layer_type": LAYER_TYPES[ntype[i]]})
            for i in range(self.num_nodes)
        )
        src, dst = self.edge_index.tolist()
        g.add_weighted_edges_from(zip(src, dst, self.edge_weight.tolist()))
        return g


def select_edges(conn: Connectivity, top_k: Optional[int]) -> Tuple[Tensor, Tensor]:
    """Incoming edges of every neuron (the ``top_k`` strongest, or all), with weight > 0."""
    sources, targets, weights = [], [], []
    for layer in conn.layers:
        w, cols = layer.in_weights, layer.in_cols
        if cols.numel() == 0:
            continue
        if top_k is None or top_k >= cols.numel():
            vals, idx = torch.sort(w, dim=1, descending=True)
        else:
            vals, idx = torch.topk(w, int(top_k), dim=1)
        rows = torch.arange(layer.num_channels).unsqueeze(1).expand_as(idx)
        keep = vals > 0
        sources.append(cols[idx[keep]])
        targets.append(layer.offset + rows[keep])
        weights.append(vals[keep])
    if not sources:
        return torch.zeros(2, 0, dtype=torch.long), torch.zeros(0)
    return torch.stack([torch.cat(sources), torch.cat(targets)]), torch.cat(weights).float()


def out_strengths(conn: Connectivity) -> Tensor:
    """Sum of each neuron's weights into BN neurons (full graph) and into Linear units."""
    out = torch.zeros(conn.num_nodes)
    for rec in conn.consumers():
        if rec.in_cols.numel():
            out.index_add_(0, rec.in_cols, rec.in_weights.sum(0))
    return out


def graph_from_connectivity(
    conn: Connectivity, groups: Tensor, *, top_k: Optional[int] = 16, coupling_method: str = "trace"
) -> NeuronGraph:
    """Assemble a :class:`NeuronGraph` from a traced :class:`~onp.graph.trace.Connectivity`."""
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    n_layers = len(conn.layers)
    layers = [
        LayerInfo(
            bn_name=t.bn_name,
            offset=t.offset,
            num_channels=t.num_channels,
            depth=i / max(n_layers - 1, 1),
            layer_type=t.layer_type,
            conv_name=t.conv_name,
            index=i,
        )
        for i, t in enumerate(conn.layers)
    ]
    sizes = torch.tensor([layer.num_channels for layer in layers])
    node_layer = torch.repeat_interleave(torch.arange(n_layers), sizes)
    node_channel = torch.cat([torch.arange(layer.num_channels) for layer in layers])
    depth = torch.tensor([layer.depth for layer in layers], dtype=torch.float32)[node_layer]
    ntype = torch.tensor([LAYER_TYPES.index(layer.layer_type) for layer in layers])[node_layer]
    edge_index, edge_weight = select_edges(conn, top_k)
    return NeuronGraph(
        layers=layers,
        num_nodes=conn.num_nodes,
        edge_index=edge_index,
        edge_weight=edge_weight,
        node_layer=node_layer,
        node_channel=node_channel,
        node_depth=depth,
        node_type=ntype,
        group=groups,
        out_strength=out_strengths(conn),
        top_k=top_k,
        input_shape=conn.input_shape,
        coupling_method=coupling_method,
    )


def build_neuron_graph(
    model: nn.Module, example_input: Tensor, top_k: Optional[int] = 16, *, coupling: str = "auto"
) -> NeuronGraph:
    """Build the neuron graph of a torch.fx-traceable CNN.

    Args:
        model: the network (not modified; traced in eval mode).
        example_input: one input (``(1, C, H, W)`` or ``(C, H, W)``; extra batch rows are ignored)
            used to record shapes.
        top_k: keep the ``top_k`` strongest incoming edges per node; None keeps all.
        coupling: ``"auto"``, ``"torch_pruning"`` or ``"trace"`` (see :mod:`onp.graph.coupling`).

    Raises:
        UnsupportedModelError: not traceable, or an op the builder does not support.
    """
    conn = trace_connectivity(model, example_input)
    groups, method = coupling_groups(model, example_input, conn, coupling)
    return graph_from_connectivity(conn, groups, top_k=top_k, coupling_method=method)

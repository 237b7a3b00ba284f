"""ONP-style per-layer neuron similarity graphs.

Reconstruction (written from the paper's description, not from its code) of the graph used by
Optimized Neuron Pruning (ONP): Nan Li, Haiyang Yu, Ping Yi, "Rethinking Pruning for Backdoor
Mitigation: An Optimization Perspective", arXiv:2405.17746, 2024. There, the neurons of a layer are
nodes and two neurons are linked when their connections to the next layer are similar.

Here, for every BatchNorm layer:

* nodes: the layer's neurons;
* ``s_i``: the outgoing connection strengths of neuron ``i``, i.e. its out-edge weights in the
  *full* neuron graph (L1 norms of the consumers' kernel slices, through residual adds), followed
  by its weights into Linear layers (so the last layer has them too);
* edge ``(i, j)`` (both directions) iff ``cos(s_i, s_j) > threshold``; by default the threshold is
  the ``quantile`` of the layer's pairwise cosines (``i < j``, non-dormant neurons);
* dormant neurons (``||s_i||_1 < eps``) get no edges.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .neuron_graph import NeuronGraph
from .trace import Connectivity, trace_connectivity

if TYPE_CHECKING:  # pragma: no cover
    from torch_geometric.data import Data


def layer_strength_matrix(conn: Connectivity, offset: int, num_channels: int) -> Tensor:
    """``(C, D)`` outgoing-strength vectors of the neurons ``offset .. offset + C - 1``: one column per
    consumer (BN neuron or Linear unit) that receives a non-zero weight from at least one of them."""
    blocks = []
    for rec in conn.consumers():
        cols = rec.in_cols  # sorted unique source ids
        lo, hi = (int(i) for i in torch.searchsorted(cols, torch.tensor([offset, offset + num_channels])))
        if hi > lo:
            block = torch.zeros(num_channels, rec.in_weights.shape[0])
            block[cols[lo:hi] - offset] = rec.in_weights[:, lo:hi].T
            blocks.append(block)
    if not blocks:
        return torch.zeros(num_channels, 0)
    s = torch.cat(blocks, dim=1)
    return s[:, s.abs().sum(0) > 0]


def similarity_graph(
    s: Tensor, threshold: Optional[float] = None, quantile: float = 0.9, eps: float = 1e-12
) -> Tuple[Tensor, Tensor, float, Tensor]:
    """Edges of one layer's similarity graph from strength vectors ``s`` ``(C, D)``.

    Returns ``(edge_index (2, E), cosine (E,), threshold used, dormant (C,) bool)``.
    """
    c = s.shape[0]
    dormant = s.abs().sum(1) < eps
    unit = s / s.norm(dim=1, keepdim=True).clamp_min(eps)
    cos = unit @ unit.T
    active = ~dormant
    pair = active.unsqueeze(0) & active.unsqueeze(1) & ~torch.eye(c, dtype=torch.bool)
    if threshold is None:
        upper = cos[torch.triu(pair, diagonal=1)]
        threshold = float(torch.quantile(upper.double(), quantile)) if upper.numel() else 1.0
    adj = pair & (cos > threshold)
    src, dst = adj.nonzero(as_tuple=True)
    return torch.stack([src, dst]), cos[src, dst], float(threshold), dormant


def build_similarity_graphs(
    model: nn.Module,
    graph: NeuronGraph,
    threshold: Optional[float] = None,
    quantile: float = 0.9,
    *,
    eps: float = 1e-12,
) -> List[Data]:
    """One ``torch_geometric.data.Data`` per BN layer of ``graph`` (in graph order).

    Each ``Data`` has ``x`` = the strength vectors ``s`` ``(C, D)``, ``edge_index`` (undirected, both
    directions), ``edge_attr`` = cosine ``(E, 1)``, ``num_nodes`` = C, ``dormant`` ``(C,)`` bool,
    ``threshold`` (float actually used), ``layer_name``, ``node_offset`` (global id of channel 0).

    Args:
        model: the network ``graph`` was built from (re-traced without the top-k cut, since
            ``s_i`` uses the full out-edges).
        threshold: fixed cosine threshold; None -> per-layer ``quantile`` of the pairwise cosines.
        quantile: in [0, 1], used when ``threshold`` is None.
        eps: L1 norm below which a neuron is dormant.
    """
    from torch_geometric.data import Data

    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    conn = trace_connectivity(model, torch.zeros(graph.input_shape))
    if conn.num_nodes != graph.num_nodes:
        raise ValueError("graph was not built from this model")
    out = []
    for layer in graph.layers:
        s = layer_strength_matrix(conn, layer.offset, layer.num_channels)
        edge_index, cos, thr, dormant = similarity_graph(s, threshold, quantile, eps)
        out.append(
            Data(
                x=s,
                edge_index=edge_index,
                edge_attr=cos.view(-1, 1),
                num_nodes=layer.num_channels,
                dormant=dormant,
                threshold=thr,
                layer_name=layer.bn_name,
                node_offset=layer.offset,
            )
        )
    return out

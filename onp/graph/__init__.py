"""The neuron graph of a CNN (one node per BatchNorm2d channel) and node features for the GNN policy.

* the neuron numbering shared by graph, masks, env and defenses: :func:`neuron_layout` ->
  :class:`NeuronLayout` (:mod:`.layout`);
* :func:`build_neuron_graph` -> :class:`NeuronGraph` (:mod:`.neuron_graph`, built from a torch.fx
  trace in :mod:`.trace` with per-op rules in :mod:`.ops`);
* coupling groups of residual / depthwise-tied channels (:mod:`.coupling`);
* ONP-style per-layer similarity graphs (:mod:`.similarity`);
* pluggable node-feature providers (:mod:`.features`).
"""

from .coupling import COUPLING_METHODS, coupling_groups
from .features import FEATURE_PROVIDERS, FeatureProvider, compute_node_features, register_feature_provider
from .frontier import UnsupportedModelError
from .layer_types import LAYER_TYPES
from .layout import NeuronLayer, NeuronLayout, neuron_layout, neuron_name
from .neuron_graph import LayerInfo, NeuronGraph, build_neuron_graph
from .ops import OP_TABLE
from .similarity import build_similarity_graphs
from .trace import Connectivity, trace_connectivity

__all__ = [
    "build_neuron_graph",
    "NeuronGraph",
    "LayerInfo",
    "neuron_name",
    "NeuronLayer",
    "NeuronLayout",
    "neuron_layout",
    "UnsupportedModelError",
    "LAYER_TYPES",
    "COUPLING_METHODS",
    "coupling_groups",
    "build_similarity_graphs",
    "FEATURE_PROVIDERS",
    "FeatureProvider",
    "register_feature_provider",
    "compute_node_features",
    "OP_TABLE",
    "Connectivity",
    "trace_connectivity",
]

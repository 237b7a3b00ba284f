"""Coupling groups: neurons that must be removed together when a network is pruned structurally.

Two BatchNorm channels are coupled when removing one forces removing the other, e.g. channel ``c``
of every tensor added into the same residual stream (ResNet: the stem/shortcut BN and the ``bn2`` of
every block of a stage; PreAct-ResNet: the ``bn1`` of every block reading the stage's stream and the
final ``bn``), or the input and output channel of a depthwise conv (MobileNetV2: ``bn1`` and ``bn2``
of an inverted-residual block). Uncoupled neurons are singleton groups.

Methods (:data:`COUPLING_METHODS`):

* ``"torch_pruning"``: Torch-Pruning's ``DependencyGraph`` (``get_all_groups``), then union-find
  over the BN channels of each group, aligned by root index. This is the reference.
* ``"trace"``: union-find over channel slots during our own fx trace: residual adds tie channel
  ``c`` of both operands, a depthwise conv ties output ``j`` to its input channel, BN ties input and
  output. Grouped convs with several input channels per group are not tied channel-wise.
* ``"auto"`` (default): ``"torch_pruning"``, falling back to ``"trace"`` (with a warning) when
  Torch-Pruning cannot handle the model. Both agree on every registered architecture (tested).
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Tuple

import torch
from torch import Tensor, nn

from ..registry import Registry
from .ops import UnionFind
from .trace import Connectivity, example_batch, probe_mode, relabel

CouplingMethod = Callable[[nn.Module, Tensor, Connectivity], Tensor]
COUPLING_METHODS: Registry[CouplingMethod] = Registry("coupling method")


@COUPLING_METHODS.register("torch_pruning")
def torch_pruning_groups(model: nn.Module, example_input: Tensor, conn: Connectivity) -> Tensor:
    """Coupling groups ``(N,)`` from Torch-Pruning's dependency graph."""
    import torch_pruning as tp

    param = next(model.parameters())
    x = example_batch(example_input).to(device=param.device, dtype=param.dtype)
    # Torch-Pruning traces the autograd graph, so frozen parameters would hide every coupling:
    # enable gradients for the trace and restore the caller's flags afterwards.
    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with probe_mode(model), torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    name_of = {id(m): n for n, m in model.named_modules()}
    layer_by_name = {layer.bn_name: layer for layer in conn.layers}
    uf = UnionFind()
    uf.new(conn.num_nodes)
    for group in dg.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
        anchor: Dict[int, int] = {}
        for item in group.items:
            layer = layer_by_name.get(name_of.get(id(item.dep.target.module), ""))
            if layer is None:
                continue
            root_idxs = getattr(item, "root_idxs", None) or item.idxs
            for idx, root in zip(item.idxs, root_idxs):
                neuron = layer.offset + int(idx)
                if root in anchor:
                    uf.union(anchor[root], neuron)
                else:
                    anchor[root] = neuron
    return relabel(torch.tensor([uf.find(i) for i in range(conn.num_nodes)], dtype=torch.long))


@COUPLING_METHODS.register("trace")
def trace_groups(model: nn.Module, example_input: Tensor, conn: Connectivity) -> Tensor:
    """Coupling groups ``(N,)`` derived from the fx trace (see the module docstring)."""
    return conn.trace_groups.clone()


def coupling_groups(
    model: nn.Module, example_input: Tensor, conn: Connectivity, method: str = "auto"
) -> Tuple[Tensor, str]:
    """Coupling group id per neuron (0..G-1, numbered in node order) and the method actually used."""
    if method != "auto":
        return COUPLING_METHODS.get(method)(model, example_input, conn), method
    try:
        return torch_pruning_groups(model, example_input, conn), "torch_pruning"
    except Exception as exc:  # torch-pruning cannot handle every traceable model
        warnings.warn(
            f"torch-pruning could not build the dependency graph of {type(model).__name__} "
            f"({type(exc).__name__}: {exc}); deriving coupling from the fx trace instead",
            stacklevel=1,
        )
        return trace_groups(model, example_input, conn), "trace"

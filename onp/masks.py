"""Soft pruning masks on neurons (BatchNorm2d output channels), applied by forward hooks.

One mask value per neuron (1 = keep, 0 = pruned, anything in between for soft/learned masks), in the
global node order of a :class:`~onp.graph.NeuronGraph` (or of a list of BN names). The model is
never copied: hooks on the BN modules rewrite their outputs.

Modes (:data:`MASK_MODES`):

* ``"gamma"``: scale gamma, keep beta, as ANP/RNP prune: ``out' = m * (out - beta) + beta``, exactly
  the output of the same BN with ``gamma_c := m_c * gamma_c``;
* ``"channel"``: zero the whole channel: ``out' = m * out`` (gamma and beta both scaled).

Usage::

    masks = NeuronMasks(model, graph, mode="gamma")
    masks.prune([3, 17])
    logits = model(x)          # neurons 3 and 17 pruned
    masks.remove()             # the model is back to normal

A learnable mask: ``m = nn.Parameter(torch.ones(graph.num_nodes)); masks.set_mask(m)``; gradients
flow into ``m`` through the hooks.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, cast

import torch
from torch import Tensor, nn

from .registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from .graph import NeuronGraph

GraphOrNames = Union["NeuronGraph", Sequence[str]]


@dataclass(frozen=True)
class MaskMode:
    """How a mask acts: on a BN output (hook) and on the BN parameters (baking)."""

    name: str
    #: ``(out, m, beta) -> out'``; ``m`` and ``beta`` (or None) are broadcastable to ``out``.
    apply: Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]
    #: ``(gamma, beta, m) -> (gamma', beta')``.
    bake: Callable[[Tensor, Optional[Tensor], Tensor], Tuple[Tensor, Optional[Tensor]]]


def _gamma_apply(out: Tensor, m: Tensor, beta: Optional[Tensor]) -> Tensor:
    return m * out if beta is None else m * (out - beta) + beta


def _channel_apply(out: Tensor, m: Tensor, beta: Optional[Tensor]) -> Tensor:
    return m * out


MASK_MODES: Registry[MaskMode] = Registry("mask mode")
MASK_MODES.register("gamma", MaskMode("gamma", _gamma_apply, lambda g, b, m: (g * m, b)))
MASK_MODES.register(
    "channel", MaskMode("channel", _channel_apply, lambda g, b, m: (g * m, None if b is None else b * m))
)


@dataclass(frozen=True)
class MaskedLayer:
    """A BN module and the slice of the global mask that belongs to it."""

    bn_name: str
    offset: int
    num_channels: int

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.num_channels)


def _layers_of(model: nn.Module, graph_or_bn_names: GraphOrNames) -> List[MaskedLayer]:
    if hasattr(graph_or_bn_names, "layers"):  # a NeuronGraph
        return [MaskedLayer(layer.bn_name, layer.offset, layer.num_channels) for layer in graph_or_bn_names.layers]
    layers, offset = [], 0
    for name in graph_or_bn_names:
        bn = model.get_submodule(name)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"{name} is a {type(bn).__name__}, not a BatchNorm layer")
        layers.append(MaskedLayer(name, offset, bn.num_features))
        offset += bn.num_features
    return layers


def _as_index(indices: Union[int, Sequence[int], Tensor]) -> Tensor:
    return torch.as_tensor(indices, dtype=torch.long).reshape(-1)


def _bn(model: nn.Module, name: str) -> nn.BatchNorm2d:
    return cast(nn.BatchNorm2d, model.get_submodule(name))


class NeuronMasks:
    """Per-neuron masks on a model's BN outputs via forward hooks (no model copy).

    Args:
        model: the network; hooks are attached to its BN modules at construction.
        graph_or_bn_names: a :class:`~onp.graph.NeuronGraph` (its node order) or BN module names
            (nodes numbered layer by layer in the given order).
        mode: ``"gamma"`` or ``"channel"`` (see :data:`MASK_MODES`).

    Usable as a context manager: hooks are removed on exit.
    """

    def __init__(self, model: nn.Module, graph_or_bn_names: GraphOrNames, mode: str = "gamma"):
        self.model = model
        self.mode: MaskMode = MASK_MODES.get(mode)
        self.layers = _layers_of(model, graph_or_bn_names)
        self.num_nodes = sum(layer.num_channels for layer in self.layers)
        param = next(model.parameters(), None)
        self._mask: Tensor = torch.ones(self.num_nodes, device=param.device if param is not None else None)
        self._handles: List = []
        self._hooks: List[Callable] = []
        for layer in self.layers:
            bn = model.get_submodule(layer.bn_name)
            hook = self._hook_for(layer)
            self._hooks.append(hook)
            self._handles.append(bn.register_forward_hook(hook))

    # -- hooks ------------------------------------------------------------------------------------

    def _hook_for(self, layer: MaskedLayer) -> Callable[[nn.Module, Any, Tensor], Tensor]:
        def hook(module: nn.Module, inputs: Any, out: Tensor) -> Tensor:
            shape = (1, -1) + (1,) * (out.dim() - 2)
            m = self._mask[layer.slice].to(device=out.device, dtype=out.dtype).view(shape)
            bias = cast(nn.BatchNorm2d, module).bias
            beta = bias.view(shape) if bias is not None else None
            return self.mode.apply(out, m, beta)

        return hook

    @property
    def active(self) -> bool:
        """Whether the hooks are attached."""
        return bool(self._handles)

    def remove(self) -> None:
        """Detach the hooks (idempotent); the model computes its original outputs again."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "NeuronMasks":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- the mask ---------------------------------------------------------------------------------

    @property
    def mask(self) -> Tensor:
        """The current ``(N,)`` mask (the very tensor/Parameter given to :meth:`set_mask`)."""
        return self._mask

    def set_mask(self, mask: Tensor) -> None:
        """Use ``mask`` ``(N,)``. A tensor that requires grad (e.g. an ``nn.Parameter``) is used as is,
        so gradients reach it; any other tensor is copied."""
        mask = torch.as_tensor(mask)
        if mask.shape != (self.num_nodes,):
            raise ValueError(f"mask must have shape ({self.num_nodes},), got {tuple(mask.shape)}")
        if mask.requires_grad:
            self._mask = mask
        else:
            self._mask = mask.detach().clone().float().to(self._mask.device)

    def prune(self, indices: Union[int, Sequence[int], Tensor]) -> None:
        """Set the mask of the given global neuron ids to 0 (in place)."""
        idx = _as_index(indices)
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.num_nodes):
            raise IndexError(f"neuron ids must be in [0, {self.num_nodes}), got {idx.tolist()}")
        with torch.no_grad():
            self._mask[idx.to(self._mask.device)] = 0.0

    def reset(self) -> None:
        """All ones again (in place, so a Parameter given to :meth:`set_mask` stays the mask)."""
        with torch.no_grad():
            self._mask.fill_(1.0)

    def pruned_indices(self, threshold: float = 0.0) -> Tensor:
        """Global ids of neurons whose mask is ``<= threshold`` (0 -> exactly pruned), ascending."""
        return (self._mask.detach() <= threshold).nonzero().view(-1).cpu()

    # -- baking -----------------------------------------------------------------------------------

    def _baked(self, bn: nn.BatchNorm2d, layer: MaskedLayer) -> Tuple[Tensor, Optional[Tensor]]:
        if bn.weight is None:
            raise ValueError(f"{layer.bn_name} has no affine parameters; masks cannot be written into it")
        m = self._mask[layer.slice].detach().to(device=bn.weight.device, dtype=bn.weight.dtype)
        return self.mode.bake(bn.weight.detach(), None if bn.bias is None else bn.bias.detach(), m)

    def export_state_dict(self) -> Dict[str, Tensor]:
        """The model's state_dict with the masks written into the BN parameters (gamma *= m; in
        "channel" mode also beta *= m). The model itself is unchanged."""
        state = OrderedDict((k, v.detach().clone()) for k, v in self.model.state_dict().items())
        for layer in self.layers:
            gamma, beta = self._baked(_bn(self.model, layer.bn_name), layer)
            state[f"{layer.bn_name}.weight"] = gamma.clone()
            if beta is not None:
                state[f"{layer.bn_name}.bias"] = beta.clone()
        return state

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Write the masks in place into ``model`` (typically a deep copy; it needs the same BN
        names) and return it.

        A ``copy.deepcopy`` of the hooked model carries these hooks along (PyTorch copies hook
        dicts); they are detached from ``model`` here so that the masks are not applied twice.
        Refuses the hooked model itself while the hooks are active; call :meth:`remove` first to
        bake the masks into it."""
        if model is self.model and self.active:
            raise ValueError("apply_to(model) on the hooked model would apply the masks twice; remove() first")
        ours = {id(h) for h in self._hooks}
        with torch.no_grad():
            for layer in self.layers:
                gamma, beta = self._baked(_bn(self.model, layer.bn_name), layer)
                bn = _bn(model, layer.bn_name)
                for key in [k for k, h in bn._forward_hooks.items() if id(h) in ours]:
                    del bn._forward_hooks[key]
                bn.weight.copy_(gamma)
                if beta is not None:
                    bn.bias.copy_(beta)
        return model


def export_pruned_model(
    model: nn.Module,
    graph: NeuronGraph,
    pruned_indices: Union[Sequence[int], Tensor],
    example_input: Optional[Tensor] = None,
) -> nn.Module:
    """(Optional) A structurally smaller deep copy of ``model`` without the pruned channels.

    Uses Torch-Pruning: a neuron is removed only when its whole coupling group (``graph.group``) is
    pruned, since coupled channels (residual streams, depthwise convs) can only go together. The
    result computes the same function as the model masked in ``"channel"`` mode with
    ``pruned_indices`` (not in "gamma" mode, where beta survives). The input model is unchanged.

    Raises:
        ValueError: every channel of some layer would be removed.
    """
    import torch_pruning as tp

    pruned = set(_as_index(pruned_indices).tolist())
    groups = graph.group.tolist()
    members: Dict[int, List[int]] = {}
    for node, g in enumerate(groups):
        members.setdefault(g, []).append(node)
    removable = sorted(n for g, nodes in members.items() if all(x in pruned for x in nodes) for n in nodes)
    pruned_model = copy.deepcopy(model)
    if not removable:
        return pruned_model
    removed = torch.zeros(graph.num_nodes, dtype=torch.bool)
    removed[removable] = True
    for layer in graph.layers:
        if bool(removed[layer.slice].all()):
            raise ValueError(f"cannot remove every channel of {layer.bn_name} structurally")
    # one pruning call per (group representative layer): the lowest-id member of each group
    by_layer: Dict[str, List[int]] = {}
    node_layer = graph.node_layer.tolist()
    node_channel = graph.node_channel.tolist()
    for nodes in members.values():
        if all(x in pruned for x in nodes):
            rep = min(nodes)
            by_layer.setdefault(graph.layers[node_layer[rep]].bn_name, []).append(node_channel[rep])
    x = example_input if example_input is not None else torch.zeros(graph.input_shape)
    param = next(pruned_model.parameters())
    x = x[:1].to(device=param.device, dtype=param.dtype)
    was_training = pruned_model.training
    pruned_model.eval()
    dg = tp.DependencyGraph().build_dependency(pruned_model, example_inputs=x, verbose=False)
    for name, channels in by_layer.items():
        group = dg.get_pruning_group(
            pruned_model.get_submodule(name), tp.prune_batchnorm_out_channels, idxs=sorted(channels)
        )
        group.prune()
    pruned_model.train(was_training)
    return pruned_model


def pruning_keeper(
    model: nn.Module, graph_or_bn_names: GraphOrNames, pruned: Sequence[int], mode: str = "gamma"
) -> Callable[[], None]:
    """A function that writes the pruning of ``pruned`` (global ids) into ``model``'s BN parameters in
    place, as :func:`apply_pruning` does: call it after every optimizer step to train a pruned model
    whose pruned neurons stay pruned (gamma, and in ``"channel"`` mode beta, held at zero)."""
    bake = MASK_MODES.get(mode).bake
    by_layer: List[Tuple[nn.BatchNorm2d, Tensor]] = []
    ids = _as_index([int(i) for i in pruned])
    for layer in _layers_of(model, graph_or_bn_names):
        inside = ids[(ids >= layer.offset) & (ids < layer.offset + layer.num_channels)] - layer.offset
        if len(inside):
            bn = _bn(model, layer.bn_name)
            if bn.weight is None:
                raise ValueError(f"{layer.bn_name} has no affine parameters; masks cannot be written into it")
            mask = torch.ones(layer.num_channels, dtype=bn.weight.dtype, device=bn.weight.device)
            mask[inside.to(bn.weight.device)] = 0.0
            by_layer.append((bn, mask))

    def keep_pruned() -> None:
        with torch.no_grad():
            for bn, mask in by_layer:
                gamma, beta = bake(bn.weight, bn.bias, mask)
                bn.weight.copy_(gamma)
                if beta is not None and bn.bias is not None:
                    bn.bias.copy_(beta)

    keep_pruned()
    return keep_pruned


def apply_pruning(
    model: nn.Module, graph_or_bn_names: GraphOrNames, pruned: Sequence[int], mode: str = "gamma"
) -> nn.Module:
    """A pruned deep copy of ``model``: each neuron in ``pruned`` (global ids) gets mask 0 written
    into its BN parameters; the copy carries no hooks. The one way onp applies a pruning (the
    learned agents' runs, every baseline, transfers).

    ``mode="gamma"`` sets gamma_c = 0 and keeps beta_c (ANP / RNP pruning); ``"channel"`` zeroes the
    whole channel (gamma and beta, CLP).
    """
    out = copy.deepcopy(model)
    masks = NeuronMasks(out, graph_or_bn_names, mode=mode)
    try:
        if len(pruned):
            masks.prune(torch.as_tensor([int(i) for i in pruned], dtype=torch.long))
        state = masks.export_state_dict()
    finally:
        masks.remove()
    out.load_state_dict(state)
    return out

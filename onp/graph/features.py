"""Pluggable node-feature providers for the neuron graph.

A provider maps ``(model, graph, data)`` to a ``(N, F_p)`` tensor, one row per neuron, and has a
list of ``F_p`` column names. Providers live in the registry :data:`FEATURE_PROVIDERS`; built-ins:

* ``structure``: normalised depth and a one-hot layer type over :data:`~onp.graph.LAYER_TYPES`;
* ``bn``: BatchNorm gamma, beta, running mean, running variance;
* ``weight_norms``: incoming = L1 norm of the producing conv's output filter (0 without one),
  outgoing = ``graph.out_strength`` (full-graph out-edge weights plus weights into Linear layers);
* ``activation``: mean and std of the BN output per channel over ``data`` (eval mode; needs data).

Adding one (e.g. a baseline's per-neuron score) is a decorator::

    from onp.graph import register_feature_provider

    @register_feature_provider("rnp", names=["rnp_score"], requires_data=True)
    def rnp_scores(model, graph, data, batch_size=256):
        scores = ...  # Tensor (graph.num_nodes,) or (graph.num_nodes, 1)
        return scores

    X, names = compute_node_features(model, graph, providers=("structure", "bn", "rnp"), data=images)

A provider function that accepts a ``batch_size`` keyword receives the one given to
:func:`compute_node_features`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union, cast

import torch
from torch import Tensor, nn

from ..registry import Registry
from .layer_types import LAYER_TYPES
from .neuron_graph import LayerInfo, NeuronGraph
from .trace import eval_mode

ProviderFn = Callable[..., Tensor]


@dataclass
class FeatureProvider:
    """A named feature provider: ``fn(model, graph, data[, batch_size]) -> Tensor (N, len(names))``."""

    name: str
    fn: ProviderFn
    names: List[str]
    requires_data: bool = False
    _takes_batch_size: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        params: Mapping[str, inspect.Parameter]
        try:
            params = inspect.signature(self.fn).parameters
        except (TypeError, ValueError):
            params = {}
        self._takes_batch_size = "batch_size" in params or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
        )

    def __call__(
        self, model: nn.Module, graph: NeuronGraph, data: Optional[Tensor] = None, batch_size: int = 256
    ) -> Tensor:
        if self.requires_data and data is None:
            raise ValueError(f"feature provider {self.name!r} needs data (a batch of images); got data=None")
        kwargs = {"batch_size": batch_size} if self._takes_batch_size else {}
        out = torch.as_tensor(self.fn(model, graph, data, **kwargs)).detach().float().cpu()
        if out.dim() == 1:
            out = out.unsqueeze(1)
        if out.shape != (graph.num_nodes, len(self.names)):
            raise ValueError(
                f"feature provider {self.name!r} returned shape {tuple(out.shape)}, expected "
                f"({graph.num_nodes}, {len(self.names)})"
            )
        return out


FEATURE_PROVIDERS: Registry[FeatureProvider] = Registry("feature provider")


def register_feature_provider(
    name: str, names: Optional[Sequence[str]] = None, *, requires_data: bool = False, overwrite: bool = False
) -> Callable[[ProviderFn], ProviderFn]:
    """Decorator registering ``fn(model, graph, data) -> Tensor (N, F)`` as provider ``name``.

    Args:
        name: registry key used in ``compute_node_features(providers=...)``.
        names: the ``F`` column names (default ``[name]``, one column).
        requires_data: raise a clear ValueError when called with ``data=None``.
        overwrite: replace an existing provider of the same name.
    """

    def deco(fn: ProviderFn) -> ProviderFn:
        provider = FeatureProvider(
            name=name, fn=fn, names=list(names) if names is not None else [name], requires_data=requires_data
        )
        FEATURE_PROVIDERS.register(name, provider, overwrite=overwrite)
        return fn

    return deco


def _bn(model: nn.Module, name: str) -> nn.BatchNorm2d:
    return cast(nn.BatchNorm2d, model.get_submodule(name))


def _per_layer(graph: NeuronGraph, fn: Callable[[int, LayerInfo], Tensor], width: int) -> Tensor:
    out = torch.zeros(graph.num_nodes, width)
    for i, layer in enumerate(graph.layers):
        out[layer.slice] = fn(i, layer).detach().float().cpu().reshape(layer.num_channels, width)
    return out


@register_feature_provider("structure", names=["depth"] + [f"type_{t}" for t in LAYER_TYPES])
def structure_features(model: nn.Module, graph: NeuronGraph, data: Optional[Tensor] = None) -> Tensor:
    """Normalised depth and one-hot layer type."""
    onehot = torch.nn.functional.one_hot(graph.node_type, len(LAYER_TYPES)).float()
    return torch.cat([graph.node_depth.view(-1, 1), onehot], dim=1)


@register_feature_provider("bn", names=["bn_gamma", "bn_beta", "bn_running_mean", "bn_running_var"])
def bn_features(model: nn.Module, graph: NeuronGraph, data: Optional[Tensor] = None) -> Tensor:
    """BatchNorm affine parameters and running statistics (1/0/0/1 where absent)."""

    def one(i: int, layer: LayerInfo) -> Tensor:
        bn = _bn(model, layer.bn_name)
        c = layer.num_channels
        cols = [
            bn.weight if bn.weight is not None else torch.ones(c),
            bn.bias if bn.bias is not None else torch.zeros(c),
            bn.running_mean if bn.running_mean is not None else torch.zeros(c),
            bn.running_var if bn.running_var is not None else torch.ones(c),
        ]
        return torch.stack([t.detach().float().cpu() for t in cols], dim=1)

    return _per_layer(graph, one, 4)


@register_feature_provider("weight_norms", names=["in_weight_l1", "out_weight_l1"])
def weight_norm_features(model: nn.Module, graph: NeuronGraph, data: Optional[Tensor] = None) -> Tensor:
    """L1 norm of the producing conv's filter (0 for BNs not fed by a conv) and the out-strength."""

    def incoming(i: int, layer: LayerInfo) -> Tensor:
        if layer.conv_name is None:
            return torch.zeros(layer.num_channels)
        w = cast(nn.Conv2d, model.get_submodule(layer.conv_name)).weight.detach()
        return w.abs().reshape(w.shape[0], -1).sum(1)

    return torch.cat([_per_layer(graph, incoming, 1), graph.out_strength.view(-1, 1)], dim=1)


@register_feature_provider("activation", names=["act_mean", "act_std"], requires_data=True)
def activation_features(
    model: nn.Module, graph: NeuronGraph, data: Optional[Tensor] = None, batch_size: int = 256
) -> Tensor:
    """Per-channel mean and std of each BN output over ``data`` (model in eval mode, no grad)."""
    if data is None:
        raise ValueError("the activation provider needs data")
    n = graph.num_nodes
    total = torch.zeros(n, dtype=torch.float64)
    total_sq = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)

    def hook_for(layer: LayerInfo) -> Callable[[nn.Module, Any, Tensor], None]:
        sl = layer.slice

        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            o = output.detach().double().transpose(0, 1).reshape(layer.num_channels, -1)
            total[sl] += o.sum(1).cpu()
            total_sq[sl] += (o * o).sum(1).cpu()
            count[sl] += o.shape[1]

        return hook

    handles = [_bn(model, layer.bn_name).register_forward_hook(hook_for(layer)) for layer in graph.layers]
    param = next(model.parameters())
    try:
        with eval_mode(model), torch.no_grad():
            for start in range(0, data.shape[0], batch_size):
                model(data[start : start + batch_size].to(device=param.device, dtype=param.dtype))
    finally:
        for h in handles:
            h.remove()
    count = count.clamp_min(1)
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return torch.stack([mean, std], dim=1).float()


def zscore(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Z-score every column (constant columns become 0)."""
    return (x - x.mean(0, keepdim=True)) / (x.std(0, unbiased=False, keepdim=True) + eps)


def compute_node_features(
    model: nn.Module,
    graph: NeuronGraph,
    providers: Sequence[Union[str, FeatureProvider]] = ("structure", "bn", "weight_norms", "activation"),
    data: Optional[Tensor] = None,
    batch_size: int = 256,
    *,
    standardize: bool = True,
    eps: float = 1e-6,
) -> Tuple[Tensor, List[str]]:
    """Concatenate the providers' features into ``(N, F)`` and return them with their column names.

    Args:
        providers: registry names (see :data:`FEATURE_PROVIDERS`) or :class:`FeatureProvider` objects.
        data: images for data-dependent providers (``activation``); ValueError if one needs it and
            it is None.
        batch_size: forwarded to providers that take it.
        standardize: z-score each column (``(x - mean) / (std + eps)``).
    """
    blocks, names = [], []
    for p in providers:
        provider = FEATURE_PROVIDERS.get(p) if isinstance(p, str) else p
        blocks.append(provider(model, graph, data, batch_size=batch_size))
        names.extend(provider.names)
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate feature names: {names}")
    x = torch.cat(blocks, dim=1) if blocks else torch.zeros(graph.num_nodes, 0)
    return (zscore(x, eps) if standardize else x), names

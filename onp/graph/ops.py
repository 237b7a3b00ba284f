"""Op handlers: how each traced op maps the channel frontiers of its inputs to its output.

Handlers are looked up in :data:`OP_TABLE` by module type (``call_module``, walking the MRO), by
function object (``call_function``) or by method name (``call_method``). Adding support for an op
is one registration::

    from onp.graph.ops import OP_TABLE, passthrough
    OP_TABLE.register_module(nn.SiLU, handler=passthrough)

A handler is ``handler(ctx: TraceContext, node: fx.Node) -> Frontier | CONST``. It is only called
when at least one input of ``node`` is an activation (a :class:`Frontier`); ops on constants alone
yield ``CONST`` without a handler.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, cast

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from .frontier import (
    CONST,
    Constant,
    Frontier,
    UnsupportedModelError,
    conv_connection_matrix,
    grouped_propagate,
    union_frontiers,
)

Value = Union[Frontier, Constant]
Handler = Callable[["TraceContext", fx.Node], Value]


# ----------------------------------------------------------------------------------------------
# records produced while tracing


@dataclass
class TracedLayer:
    """One BatchNorm2d layer as seen in the trace, with its full (un-truncated) incoming edges."""

    bn_name: str
    fx_node: str
    offset: int
    num_channels: int
    in_cols: Tensor  # (K,) source neuron ids
    in_weights: Tensor  # (C, K) incoming strengths
    in_slots: Tensor  # (C,) coupling slots of the channels
    conv_name: Optional[str]  # conv feeding the BN directly (through pass-through ops)
    conv_groups: int = 1
    layer_type: str = "conv"


@dataclass
class TracedLinear:
    """A Linear layer's consumption of neurons: ``in_weights[j, k]`` from neuron ``in_cols[k]`` to unit j."""

    name: str
    in_cols: Tensor
    in_weights: Tensor


class UnionFind:
    """Union-find over integer ids, grown on demand."""

    def __init__(self) -> None:
        self.parent: List[int] = []

    def new(self, n: int) -> Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb

    def union_many(self, a: Sequence[int], b: Sequence[int]) -> None:
        for x, y in zip(a, b):
            self.union(int(x), int(y))


@dataclass
class TraceContext:
    """State shared by the handlers during one propagation over an fx graph."""

    modules: Dict[str, nn.Module]
    values: Dict[fx.Node, Value] = field(default_factory=dict)
    layers: List[TracedLayer] = field(default_factory=list)
    linears: List[TracedLinear] = field(default_factory=list)
    slots: UnionFind = field(default_factory=UnionFind)
    residual_adds: List[Tuple[fx.Node, fx.Node]] = field(default_factory=list)
    num_nodes: int = 0

    def value(self, arg: Any) -> Value:
        """The value of an fx argument (non-Node arguments are constants)."""
        return self.values.get(arg, CONST) if isinstance(arg, fx.Node) else CONST

    def activations(self, node: fx.Node) -> List[Tuple[fx.Node, Frontier]]:
        """The activation inputs of ``node``, in argument order."""
        out: List[Tuple[fx.Node, Frontier]] = []
        seen = set()
        for arg in node.all_input_nodes:
            v = self.values.get(arg, CONST)
            if isinstance(v, Frontier) and arg not in seen:
                seen.add(arg)
                out.append((arg, v))
        return out

    def operands(self, node: fx.Node) -> List[Tuple[Any, Value]]:
        """``(argument, value)`` of the first two operands of a binary op (positional, then ``other``)."""
        args = list(node.args[:2])
        if len(args) < 2 and "other" in node.kwargs:
            args.append(node.kwargs["other"])
        return [(a, self.value(a)) for a in args]

    def module(self, node: fx.Node) -> nn.Module:
        return self.modules[str(node.target)]


def shape_of(node: fx.Node) -> Optional[Tuple[int, ...]]:
    """The shape recorded by ShapeProp, if the node produced a tensor."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def describe(node: fx.Node, modules: Optional[Dict[str, nn.Module]] = None) -> str:
    """A readable name for the op of an fx node, e.g. ``torch.cat`` or ``layer1.0.conv1 (Conv2d)``."""
    target = node.target
    if node.op == "call_module":
        mod = (modules or {}).get(str(target))
        return f"module {target} ({type(mod).__name__ if mod is not None else '?'})"
    if node.op == "call_method":
        return f"method Tensor.{target}"
    if node.op == "call_function":
        where = getattr(target, "__module__", None) or ""
        where = {"_operator": "operator"}.get(where, where)
        name = getattr(target, "__name__", str(target))
        return f"{where}.{name}" if where else name
    return f"{node.op} {target}"


def unsupported(ctx: TraceContext, node: fx.Node, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"fx node {node.name!r} ({describe(node, ctx.modules)}): {why}")


# ----------------------------------------------------------------------------------------------
# the table


class OpTable:
    """Handlers keyed by module type, function object or tensor-method name."""

    def __init__(self) -> None:
        self._modules: Dict[type, Handler] = {}
        self._functions: Dict[Any, Handler] = {}
        self._methods: Dict[str, Handler] = {}

    def register_module(self, *types: type, handler: Handler) -> None:
        for t in types:
            self._modules[t] = handler

    def register_function(self, *fns: Any, handler: Handler) -> None:
        for fn in fns:
            self._functions[fn] = handler

    def register_method(self, *names: str, handler: Handler) -> None:
        for n in names:
            self._methods[n] = handler

    def lookup(self, node: fx.Node, modules: Dict[str, nn.Module]) -> Optional[Handler]:
        if node.op == "call_module":
            for cls in type(modules[str(node.target)]).__mro__:
                if cls in self._modules:
                    return self._modules[cls]
            return None
        if node.op == "call_function":
            try:
                return self._functions.get(node.target)
            except TypeError:  # unhashable target
                return None
        if node.op == "call_method":
            return self._methods.get(str(node.target))
        return None


OP_TABLE = OpTable()


# ----------------------------------------------------------------------------------------------
# handlers


def _single(ctx: TraceContext, node: fx.Node) -> Frontier:
    acts = ctx.activations(node)
    if len(acts) != 1:
        raise unsupported(ctx, node, f"expected one activation input, got {len(acts)}")
    return acts[0][1]


def _check_same_channels(ctx: TraceContext, node: fx.Node, v: Frontier) -> None:
    shape = shape_of(node)
    if shape is None or len(shape) < 2:
        raise unsupported(ctx, node, "output is not a batched tensor")
    expected = v.features if len(shape) == 2 else v.channels
    if shape[1] != expected or (len(shape) > 2 and v.spatial != 1):
        raise unsupported(ctx, node, f"changes the channel dimension ({expected} -> {shape[1]})")


def passthrough(ctx: TraceContext, node: fx.Node) -> Frontier:
    """Channel-wise ops (activations, pooling, dropout, identity): frontiers unchanged."""
    v = _single(ctx, node)
    _check_same_channels(ctx, node, v)
    return v


def _reduce_dims(node: fx.Node) -> Optional[List[int]]:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if dim is None:
        return None
    return [int(cast(int, d)) for d in (dim if isinstance(dim, (list, tuple)) else [dim])]


def spatial_reduce(ctx: TraceContext, node: fx.Node) -> Frontier:
    """``mean``/``amax``/``sum`` over spatial dims only."""
    v = _single(ctx, node)
    src = node.all_input_nodes[0]
    in_shape = shape_of(src)
    dims = _reduce_dims(node)
    if in_shape is None or dims is None:
        raise unsupported(ctx, node, "reduction over all dimensions")
    ndim = len(in_shape)
    if any(d % ndim in (0, 1) for d in dims):
        raise unsupported(ctx, node, "reduction over the batch or channel dimension")
    _check_same_channels(ctx, node, v)
    return v


def flatten(ctx: TraceContext, node: fx.Node) -> Frontier:
    """``flatten``/``view``/``reshape`` to ``(B, C*H*W)``: channel c owns features c*HW..c*HW+HW-1."""
    v = _single(ctx, node)
    src = [a for a in node.all_input_nodes if ctx.values.get(a) is v][0]
    in_shape, out_shape = shape_of(src), shape_of(node)
    if in_shape is None or out_shape is None:
        raise unsupported(ctx, node, "unknown shapes")
    if out_shape == in_shape:
        return v
    if len(out_shape) != 2 or out_shape[0] != in_shape[0] or out_shape[1] % v.channels:
        raise unsupported(ctx, node, f"reshape {in_shape} -> {out_shape} mixes channels")
    return replace(v, spatial=out_shape[1] // v.channels)


def add(ctx: TraceContext, node: fx.Node) -> Frontier:
    """Residual add/sub: union of the frontiers (weights of shared sources summed), channels coupled."""
    ops = [(arg, v) for arg, v in ctx.operands(node) if isinstance(v, Frontier)]
    if len(ops) == 1:
        v = ops[0][1]
        _check_same_channels(ctx, node, v)
        return v
    if len(ops) != 2:
        raise unsupported(ctx, node, "expected two operands")
    (node_a, a), (node_b, b) = ops
    if a.channels != b.channels or a.spatial != b.spatial:
        raise unsupported(ctx, node, f"adds tensors with different channels ({a.features} vs {b.features})")
    _check_same_channels(ctx, node, a)
    ctx.slots.union_many(a.slots.tolist(), b.slots.tolist())
    ctx.residual_adds.append((node_a, node_b))
    return union_frontiers([a, b])


def scale(ctx: TraceContext, node: fx.Node) -> Frontier:
    """mul/div by a constant keeps the frontiers; the product of two activations is unsupported."""
    vals = [v for _, v in ctx.operands(node) if isinstance(v, Frontier)]
    if len(vals) != 1:
        raise unsupported(ctx, node, "product/quotient of two activation tensors is not supported")
    _check_same_channels(ctx, node, vals[0])
    return vals[0]


def to_constant(ctx: TraceContext, node: fx.Node) -> Constant:
    """Shape queries (``x.size()``, ``x.shape``) give constants."""
    if (
        node.op == "call_function"
        and node.target is getattr
        and node.args[1] not in ("shape", "ndim", "dtype", "device")
    ):
        raise unsupported(ctx, node, f"attribute {node.args[1]!r} of an activation")
    return CONST


def conv2d(ctx: TraceContext, node: fx.Node) -> Frontier:
    """Conv output channel j: sum over input channels i of ||W[j, i]||_1 times frontier_i."""
    v = _single(ctx, node)
    conv = cast(nn.Conv2d, ctx.module(node))
    if v.spatial != 1 or v.channels != conv.in_channels:
        raise unsupported(ctx, node, f"input has {v.features} features, conv expects {conv.in_channels} channels")
    norms = conv_connection_matrix(conv.weight, conv.groups)
    weights = grouped_propagate(norms, v)
    groups, og, ig = norms.shape
    if groups == 1:
        slots = ctx.slots.new(conv.out_channels)
    elif ig == 1:  # depthwise(-multiplier): output j reads input channel j // og only
        slots = v.slots.repeat_interleave(og)
    else:  # general grouped conv: structural coupling is per group; not modelled channel-wise
        slots = ctx.slots.new(conv.out_channels)
    return Frontier(cols=v.cols, weights=weights, slots=slots, conv=str(node.target))


def batchnorm2d(ctx: TraceContext, node: fx.Node) -> Frontier:
    """A BatchNorm2d output channel is a neuron: its frontier becomes that neuron's incoming edges."""
    v = _single(ctx, node)
    bn = cast(nn.BatchNorm2d, ctx.module(node))
    name = str(node.target)
    if any(layer.bn_name == name for layer in ctx.layers):
        raise unsupported(ctx, node, "the same BatchNorm2d module is applied twice")
    if v.spatial != 1 or v.channels != bn.num_features:
        raise unsupported(ctx, node, f"input has {v.features} features, BatchNorm2d expects {bn.num_features}")
    groups = cast(nn.Conv2d, ctx.modules[v.conv]).groups if v.conv is not None else 1
    ctx.layers.append(
        TracedLayer(
            bn_name=name,
            fx_node=node.name,
            offset=ctx.num_nodes,
            num_channels=v.channels,
            in_cols=v.cols,
            in_weights=v.weights,
            in_slots=v.slots,
            conv_name=v.conv,
            conv_groups=int(groups),
        )
    )
    out = Frontier.identity(ctx.num_nodes, v.channels, v.slots)
    ctx.num_nodes += v.channels
    return out


def linear(ctx: TraceContext, node: fx.Node) -> Frontier:
    """A Linear layer consumes neurons (recorded for out-strengths); its outputs feed no BatchNorm2d."""
    v = _single(ctx, node)
    lin = cast(nn.Linear, ctx.module(node))
    src = [a for a in node.all_input_nodes if ctx.values.get(a) is v][0]
    in_shape = shape_of(src)
    if in_shape is None or len(in_shape) != 2 or lin.in_features != v.features:
        raise unsupported(ctx, node, f"Linear on a tensor of shape {in_shape}; flatten to (B, features) first")
    norms = lin.weight.detach().float().cpu().abs().reshape(lin.out_features, v.channels, v.spatial).sum(-1)
    ctx.linears.append(TracedLinear(name=str(node.target), in_cols=v.cols, in_weights=norms @ v.weights))
    return Frontier.empty(lin.out_features, ctx.slots.new(lin.out_features))


_PASSTHROUGH_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
)
_PASSTHROUGH_FUNCTIONS = (
    F.relu,
    F.relu_,
    torch.relu,
    torch.relu_,
    F.relu6,
    F.leaky_relu,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.dropout,
    F.dropout2d,
)
OP_TABLE.register_module(*_PASSTHROUGH_MODULES, handler=passthrough)
OP_TABLE.register_function(*_PASSTHROUGH_FUNCTIONS, handler=passthrough)
OP_TABLE.register_method("relu", "relu_", "contiguous", "clone", handler=passthrough)
OP_TABLE.register_function(torch.mean, torch.amax, torch.sum, handler=spatial_reduce)
OP_TABLE.register_method("mean", "amax", "sum", handler=spatial_reduce)
OP_TABLE.register_module(nn.Flatten, handler=flatten)
OP_TABLE.register_function(torch.flatten, torch.reshape, handler=flatten)
OP_TABLE.register_method("flatten", "view", "reshape", handler=flatten)
OP_TABLE.register_function(operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, handler=add)
OP_TABLE.register_method("add", "add_", "sub", "sub_", handler=add)
OP_TABLE.register_function(
    operator.mul, operator.imul, operator.truediv, operator.itruediv, torch.mul, torch.div, handler=scale
)
OP_TABLE.register_method("mul", "mul_", "div", "div_", handler=scale)
OP_TABLE.register_function(getattr, handler=to_constant)
OP_TABLE.register_method("size", "dim", handler=to_constant)
OP_TABLE.register_module(nn.Conv2d, handler=conv2d)
OP_TABLE.register_module(nn.BatchNorm2d, handler=batchnorm2d)
OP_TABLE.register_module(nn.Linear, handler=linear)

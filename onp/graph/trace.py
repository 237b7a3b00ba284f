"""Trace a CNN with torch.fx and propagate channel frontiers to get neuron-to-neuron connectivity.

A neuron is a BatchNorm2d output channel. Every activation tensor of the traced model carries the
frontiers of its channels (:class:`~onp.graph.frontier.Frontier`); the handlers in
:data:`~onp.graph.ops.OP_TABLE` say how each op transforms them:

* BN output channel ``c`` has frontier ``{c: 1}``; a BN *input* channel's frontier becomes the
  incoming edges of that neuron;
* relu / pooling / dropout / identity / flatten / spatial mean keep frontiers;
* a residual add unions them (weights of a common source summed);
* a conv output channel ``j`` gets ``sum_i ||W[j, i]||_1 * frontier_i`` (within its group);
* the image has an empty frontier.

Everything is vectorised per layer (dense ``(C, K)`` matrices over the ``K`` sources in use).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple, Union

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from .frontier import CONST, Frontier, UnsupportedModelError
from .layer_types import LayerFacts, classify, reaches, shortcut_nodes
from .ops import OP_TABLE, OpTable, TraceContext, TracedLayer, TracedLinear, unsupported


@dataclass
class Connectivity:
    """The full (un-truncated) neuron connectivity of a model.

    Attributes:
        layers: the BatchNorm2d layers in fx topological order, with incoming edges.
        linears: Linear layers and the neurons they consume (for out-strengths and similarity).
        num_nodes: total number of neurons.
        trace_groups: ``(N,)`` coupling groups derived from the trace alone (channels tied by
            residual adds and depthwise convs), relabelled 0..G-1 in node order.
        input_shape: shape of the example input used (batch dimension 1).
    """

    layers: List[TracedLayer]
    linears: List[TracedLinear]
    num_nodes: int
    trace_groups: Tensor
    input_shape: Tuple[int, ...]

    def consumers(self) -> List[Union[TracedLayer, TracedLinear]]:
        """The BN layers, then the Linear layers: every record with incoming neuron edges."""
        return [*self.layers, *self.linears]


@contextlib.contextmanager
def probe_mode(model: nn.Module) -> Iterator[nn.Module]:
    """For the batch-1 shape-probing forward passes: eval mode and one intra-op thread (on a
    shared CPU, multi-threaded tiny convs can be 100x slower than single-threaded ones)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with eval_mode(model):
            yield model
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode, restoring each module's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def trace_model(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with failures turned into :class:`UnsupportedModelError`."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, ...
        raise UnsupportedModelError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}"
        ) from exc


def example_batch(example_input: Tensor) -> Tensor:
    """A single example, with a batch dimension (a bare ``(C, H, W)`` image is accepted)."""
    if example_input.dim() == 3:
        example_input = example_input.unsqueeze(0)
    return example_input[:1]


def relabel(labels: Tensor) -> Tensor:
    """Map arbitrary labels to 0..G-1 in order of first appearance."""
    _, inverse = torch.unique(labels, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1 if inverse.numel() else 0,), labels.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(labels.numel()), reduce="amin")
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = torch.arange(first.numel())
    return rank[inverse]


def _propagate(gm: fx.GraphModule, table: OpTable) -> TraceContext:
    ctx = TraceContext(modules=dict(gm.named_modules()))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModelError(
            f"expected a model with one input, got {len(placeholders)} ({', '.join(n.name for n in placeholders)})"
        )
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape = node.meta["tensor_meta"].shape
            ctx.values[node] = Frontier.empty(int(shape[1]), ctx.slots.new(int(shape[1])))
            continue
        if node.op in ("get_attr", "output") or not ctx.activations(node):
            ctx.values[node] = CONST
            continue
        handler = table.lookup(node, ctx.modules)
        if handler is None:
            raise unsupported(ctx, node, "op not supported by the neuron-graph builder")
        ctx.values[node] = handler(ctx, node)
    if not ctx.layers:
        raise UnsupportedModelError(f"{type(gm).__name__} has no BatchNorm2d layer on the traced path")
    return ctx


def _classify_layers(gm: fx.GraphModule, ctx: TraceContext) -> None:
    nodes = list(gm.graph.nodes)

    def is_kind(kind: type) -> Callable[[fx.Node], bool]:
        return lambda n: n.op == "call_module" and isinstance(ctx.modules.get(str(n.target)), kind)

    feeds = reaches(nodes, is_kind(nn.BatchNorm2d))
    short = shortcut_nodes(nodes, is_kind(nn.Conv2d), ctx.residual_adds)
    for layer in ctx.layers:
        facts = LayerFacts(
            has_inputs=layer.in_cols.numel() > 0,
            feeds_neurons=feeds[layer.fx_node],
            on_shortcut=layer.fx_node in short,
            conv_name=layer.conv_name,
            conv_groups=layer.conv_groups,
        )
        layer.layer_type = classify(facts)


def trace_connectivity(model: nn.Module, example_input: Tensor, *, op_table: Optional[OpTable] = None) -> Connectivity:
    """Trace ``model`` and compute the full neuron connectivity.

    The model is traced with ``torch.fx.symbolic_trace``, run once on one example (in eval mode,
    without gradients) to record shapes, and left unchanged.

    Raises:
        UnsupportedModelError: the model is not traceable, or uses an op with no handler in
            ``op_table`` (default :data:`~onp.graph.ops.OP_TABLE`).
    """
    table = OP_TABLE if op_table is None else op_table
    gm = trace_model(model)
    x = example_batch(example_input)
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype)
    try:
        with probe_mode(model), torch.no_grad():
            ShapeProp(gm).propagate(x)
    except Exception as exc:
        raise UnsupportedModelError(
            f"running the traced {type(model).__name__} on an input of shape {tuple(x.shape)} failed: {exc}"
        ) from exc
    with torch.no_grad():
        ctx = _propagate(gm, table)
    _classify_layers(gm, ctx)
    roots = torch.tensor([ctx.slots.find(int(s)) for layer in ctx.layers for s in layer.in_slots], dtype=torch.long)
    return Connectivity(
        layers=ctx.layers,
        linears=ctx.linears,
        num_nodes=ctx.num_nodes,
        trace_groups=relabel(roots),
        input_shape=tuple(x.shape),
    )

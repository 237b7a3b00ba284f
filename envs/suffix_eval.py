"""Exact, cached evaluation of a masked model: recompute only the suffix after the earliest change.

The model is traced with ``torch.fx``. A full forward stores every value that crosses a BatchNorm
boundary (the values a later node reads from before that BN). When masks change in BN layer ``l``,
only the nodes from ``l``'s BN node onwards are executed again, fed from the cache. Masks act
through forward hooks on the BN modules (see :class:`onp.masks.NeuronMasks`), which the traced
graph shares with the original model, so the cached and uncached results are identical.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

import torch
import torch.fx as fx
from torch import nn


class SuffixEvaluator:
    """Evaluates ``model(x)`` for a fixed input batch, re-running only what a mask change affects."""

    def __init__(self, model: nn.Module, x: torch.Tensor, bn_names: Sequence[str]):
        self.gm = fx.symbolic_trace(model)
        self.nodes: List[fx.Node] = list(self.gm.graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        bn_pos = {n.target: i for i, n in enumerate(self.nodes) if n.op == "call_module" and n.target in set(bn_names)}
        missing = [b for b in bn_names if b not in bn_pos]
        if missing:
            raise ValueError(f"BatchNorm layers not found as traced calls: {missing}")
        self.bn_pos: Dict[str, int] = {b: bn_pos[b] for b in bn_names}
        # the nodes whose values must be cached: read by a node at or after some BN boundary
        boundaries = sorted(set(self.bn_pos.values()))
        self.last_use = {n: max((self.pos[u] for u in n.users), default=-1) for n in self.nodes}
        self.keep = set()
        for n in self.nodes:
            i = self.pos[n]
            if any(i < b <= self.last_use[n] for b in boundaries):
                self.keep.add(n)
        self.modules = dict(self.gm.named_modules())
        self.x = x
        self.cache: Dict[fx.Node, torch.Tensor] = {}
        self.output: Optional[torch.Tensor] = None

    @torch.inference_mode()
    def full(self) -> torch.Tensor:
        """Run the whole model on the batch and refill the cache."""
        return self._run(0)

    @torch.inference_mode()
    def from_layer(self, bn_name: str) -> torch.Tensor:
        """Re-run from BN layer ``bn_name`` onwards (masks before it must not have changed)."""
        if self.output is None:
            return self._run(0)
        return self._run(self.bn_pos[bn_name])

    @torch.inference_mode()
    def from_layers(self, bn_names: Sequence[str]) -> torch.Tensor:
        """Re-run from the earliest of several changed BN layers."""
        if not bn_names:
            return self.output if self.output is not None else self._run(0)
        if self.output is None:
            return self._run(0)
        return self._run(min(self.bn_pos[b] for b in bn_names))

    def snapshot(self) -> Tuple[Dict[fx.Node, torch.Tensor], Optional[torch.Tensor]]:
        """The current cache (cached tensors are never modified in place, so this is cheap)."""
        return dict(self.cache), self.output

    def restore(self, state: Tuple[Dict[fx.Node, torch.Tensor], Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
        """Go back to a :meth:`snapshot` (the masks must be set back to that state by the caller)."""
        self.cache, self.output = dict(state[0]), state[1]
        return self.output

    def _run(self, start: int) -> torch.Tensor:
        env: Dict[fx.Node, torch.Tensor] = {n: v for n, v in self.cache.items() if self.pos[n] < start}
        out: Any = None
        for i in range(start if start > 0 else 0, len(self.nodes)):
            node = self.nodes[i]
            if i < start:
                continue
            args = fx.graph.map_arg(node.args, lambda a: env[a])
            kwargs = fx.graph.map_arg(node.kwargs, lambda a: env[a])
            if node.op == "placeholder":
                val = self.x
            elif node.op == "get_attr":
                val = self._attr(str(node.target))
            elif node.op == "call_module":
                val = self.modules[node.target](*args, **kwargs)
            elif node.op == "call_function":
                val = cast(Callable[..., Any], node.target)(*args, **kwargs)
            elif node.op == "call_method":
                obj, *rest = args
                val = getattr(obj, str(node.target))(*rest, **kwargs)
            elif node.op == "output":
                out = args[0]
                break
            else:  # pragma: no cover
                raise RuntimeError(f"unsupported fx op {node.op}")
            env[node] = val
            if node in self.keep:
                self.cache[node] = val
            # free values nobody reads any more
            for a in node.all_input_nodes:
                if self.last_use[a] <= i and a in env and a not in self.keep:
                    del env[a]
        self.output = out
        return out

    def _attr(self, target: str) -> Any:
        obj: Any = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

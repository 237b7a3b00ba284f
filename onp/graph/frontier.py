"""Channel frontiers: what the builder tracks for every activation tensor of the traced model.

For an activation tensor with ``C`` channels, the *frontier* of channel ``c`` is the weighted set of
neurons (BatchNorm output channels) that feed it, possibly through convolutions and residual adds.
All ``C`` frontiers of a tensor are stored together, vectorised, as a dense ``(C, K)`` matrix over
the ``K`` source neurons that occur in any of them (``cols``); neuron ids are global node indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor


class UnsupportedModelError(ValueError):
    """The model cannot be turned into a neuron graph (not traceable, or an op the builder does not
    know, e.g. ``torch.cat`` or the product of two activation tensors). The message names the
    offending torch.fx node and op."""


class Constant:
    """Marker for values that do not depend on the input image (buffers, shapes, Python scalars)."""

    _instance: Optional["Constant"] = None

    def __new__(cls) -> "Constant":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "CONST"


CONST = Constant()


@dataclass
class Frontier:
    """The channel frontiers of one activation tensor.

    Attributes:
        cols: ``(K,)`` sorted unique global ids of the source neurons.
        weights: ``(C, K)``; ``weights[c, k]`` is the connection strength from neuron ``cols[k]``
            to channel ``c``.
        slots: ``(C,)`` coupling-slot ids (union-find elements): channels that must be pruned
            together end up in the same union-find class.
        spatial: features per channel; 1 for feature maps, ``H*W`` after flattening an
            ``H x W`` map (feature ``f`` then belongs to channel ``f // spatial``).
        conv: qualified name of the Conv2d that produced this tensor (through pass-through ops),
            or None.
    """

    cols: Tensor
    weights: Tensor
    slots: Tensor
    spatial: int = 1
    conv: Optional[str] = None

    @property
    def channels(self) -> int:
        return int(self.weights.shape[0])

    @property
    def features(self) -> int:
        """Number of entries along dim 1 of the tensor (channels x spatial)."""
        return self.channels * self.spatial

    @staticmethod
    def empty(channels: int, slots: Tensor) -> "Frontier":
        """``channels`` channels fed by no neuron (the image, a classifier output)."""
        return Frontier(cols=torch.zeros(0, dtype=torch.long), weights=torch.zeros(channels, 0), slots=slots)

    @staticmethod
    def identity(offset: int, channels: int, slots: Tensor) -> "Frontier":
        """Neuron ``offset + c`` alone, with weight 1, feeds channel ``c`` (a BatchNorm output)."""
        return Frontier(cols=torch.arange(offset, offset + channels), weights=torch.eye(channels), slots=slots)


def union_frontiers(parts: List[Frontier]) -> Frontier:
    """Sum of frontiers channel by channel (a residual add): the union of the source sets, with the
    weights of a neuron that occurs in several parts summed."""
    cols = torch.cat([p.cols for p in parts])
    weights = torch.cat([p.weights for p in parts], dim=1)
    uniq, inverse = torch.unique(cols, sorted=True, return_inverse=True)
    merged = torch.zeros(weights.shape[0], uniq.numel(), dtype=weights.dtype)
    merged.index_add_(1, inverse, weights)
    return Frontier(cols=uniq, weights=merged, slots=parts[0].slots, spatial=parts[0].spatial)


def conv_connection_matrix(weight: Tensor, groups: int) -> Tensor:
    """Per-group L1 norms of the kernel slices of a conv weight ``(C_out, C_in/groups, *k)``.

    Returns ``(groups, C_out/groups, C_in/groups)``: entry ``[g, j, i]`` is
    ``||W[g*og + j, i, ...]||_1``, the strength from input channel ``g*ig + i`` to output channel
    ``g*og + j``.
    """
    c_out, ig = weight.shape[0], weight.shape[1]
    norms = weight.detach().float().cpu().abs().reshape(c_out, ig, -1).sum(-1)
    return norms.reshape(groups, c_out // groups, ig)


def grouped_propagate(norms: Tensor, frontier: Frontier) -> Tensor:
    """Frontier weights of a (grouped) conv's output: ``(C_out, K)`` from ``norms`` as returned
    by :func:`conv_connection_matrix` and the input frontier ``(C_in, K)``."""
    groups, og, ig = norms.shape
    k = frontier.weights.shape[1]
    w_in = frontier.weights.reshape(groups, ig, k)
    return torch.bmm(norms, w_in).reshape(groups * og, k)

"""Baseline neuron scores as node features of the neuron graph (warm starts for the agent).

Registers feature providers ``rnp_score``, ``anp_score``, ``awm_score``, ``fp_score``,
``clp_score`` and ``magnitude_score`` in :data:`onp.graph.features.FEATURE_PROVIDERS`. Each runs the
baseline's scoring on the model and returns its per-neuron score (graph numbering, higher = more
suspicious), cached per (model weights, data, hyperparameters).

What they need:

* ``clp_score`` and ``magnitude_score`` need no data;
* the others need clean images. A registered provider only receives ``data`` (an image tensor, or a
  :class:`~onp.data.defense.DefenseData`). For a plain tensor the labels are the **model's own
  predictions** and the images are split in half into train / validation parts. To use the real
  labels, build a provider with :func:`make_score_provider` (a closure over a DefenseData) and
  register it under a name of your choice.

Only the scores are used (the operating-point step is skipped: ``operating_point="number"``,
``n_prune=0``). The registered providers use each method's default hyperparameters except that the
batch size is capped at the number of images; pass smaller budgets through
:func:`make_score_provider` (e.g. ``iterations=200`` for ANP).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from onp.data.defense import DefenseData
from onp.graph.layout import neuron_layout
from onp.models import model_digest

from .base import DEFENSES, PruningParams, build_defense

if TYPE_CHECKING:
    from onp.data.augment import Augment
    from onp.graph import NeuronGraph

SCORE_METHODS = ("rnp", "anp", "awm", "fp", "clp", "magnitude")
#: baselines that repair weights without scoring neurons: they cannot rank them
NON_SCORING = ("ft", "ngf", "fst", "sau")
_CACHE: Dict[Tuple, Tensor] = {}
_CACHE_SIZE = 32


def _fingerprint(*tensors: Tensor) -> str:
    h = hashlib.sha1()
    for t in tensors:
        t = t.detach().float().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def as_defense_data(
    model: nn.Module, data: Union[Tensor, DefenseData, None], num_classes: Optional[int] = None
) -> Optional[DefenseData]:
    """A DefenseData from images (labels = the model's predictions; first half train, second half val)."""
    if data is None or isinstance(data, DefenseData):
        return data
    was = model.training
    model.eval()
    logits = torch.cat([model(data[i : i + 256]) for i in range(0, len(data), 256)])
    model.train(was)
    y = logits.argmax(1)
    half = max(1, len(data) // 2)
    return DefenseData(data[:half], y[:half], data[half:], y[half:], num_classes or logits.shape[1])


def baseline_scores(
    method: str,
    model: nn.Module,
    data: Union[Tensor, DefenseData, None],
    *,
    seed: int = 0,
    augment: Optional["Augment"] = None,
    **params: Any,
) -> Tensor:
    """Per-neuron scores of baseline ``method`` (graph numbering, higher = more suspicious), cached
    per model/data/params. ``augment``: the crop/flip augmentation of the dataset for the methods
    that train (as ``onp.baseline`` passes it). A method that scores no neuron is a ``ValueError``
    listing the ones that do."""
    cls = DEFENSES.get(method)
    dd = as_defense_data(model, data) if cls.needs_data else None
    if issubclass(cls.Params, PruningParams):
        params = {"operating_point": "number", "n_prune": 0, **params}
    if dd is not None and "batch_size" in cls.defaults() and "batch_size" not in params:
        params["batch_size"] = min(cls.defaults()["batch_size"], len(dd.train_y))
    key = (
        method,
        model_digest(model),
        seed,
        tuple(sorted((k, repr(v)) for k, v in params.items())),
        _fingerprint(dd.train_x, dd.train_y, dd.val_x, dd.val_y) if dd is not None else None,
        None if augment is None else (augment.padding, augment.hflip),
    )
    if key not in _CACHE:
        result = build_defense(method, **params).fit(model, dd, seed=seed, augment=augment)
        if result.scores is None:
            scoring = [n for n in DEFENSES.names() if n not in NON_SCORING]
            raise ValueError(
                f"baseline {method!r} does not score neurons, so it cannot rank them; use one of: {', '.join(scoring)}"
            )
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = result.scores.detach().float().cpu()
    return _CACHE[key].clone()


def make_score_provider(
    method: str, defense_data: Optional[DefenseData] = None, *, seed: int = 0, **params: Any
) -> Callable[..., Tensor]:
    """A provider ``(model, graph, data) -> Tensor (N,)`` for ``method``.

    With ``defense_data`` given it uses that (real labels) and ignores the provider's ``data``;
    otherwise it uses ``data`` as :func:`baseline_scores` does.
    """
    DEFENSES.check(method)

    def provider(
        model: nn.Module, graph: Optional[NeuronGraph], data: Union[Tensor, DefenseData, None] = None
    ) -> Tensor:
        if graph is not None:
            neuron_layout(model).check_same_numbering(graph.layout)
        return baseline_scores(method, model, defense_data if defense_data is not None else data, seed=seed, **params)

    provider.__name__ = f"{method}_score_provider"
    return provider


def register_score_providers(overwrite: bool = False) -> None:
    """Register ``<method>_score`` for every scoring baseline (idempotent)."""
    from onp.graph.features import FEATURE_PROVIDERS, register_feature_provider

    for method in SCORE_METHODS:
        name = f"{method}_score"
        if name in FEATURE_PROVIDERS and not overwrite:
            continue
        needs = DEFENSES.get(method).needs_data
        register_feature_provider(name, names=[name], requires_data=needs, overwrite=overwrite)(
            make_score_provider(method)
        )


def clear_cache() -> None:
    _CACHE.clear()

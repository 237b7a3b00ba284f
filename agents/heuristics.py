"""Non-learning agents: ``random``, ``greedy-gamma``, ``greedy-activation`` and ``ranked:<baseline>``.

Each prunes valid neurons in a fixed priority order (``random``: uniformly at random) until the
budget is spent, then STOPs. They only use the defender's data:

* ``greedy-gamma``: lowest ``|BN gamma|`` first;
* ``greedy-activation``: largest activation change under the env's ASR estimator first: per
  neuron, the spatial mean of ``|mean BN output over the estimator's probe images - mean BN output
  over the clean defense-validation images|`` (forward hooks on the unpruned model, computed once).
  With the ``trigger`` estimator the probe images carry the real trigger (trigger-aware);
* ``ranked:<baseline>``: highest score of a baseline defense first (``baselines.build_defense(name)
  .fit`` on the bundle's ``defense_data``; its operating-point search is skipped).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence, Union, cast

import numpy as np
import torch
from torch import nn

from onp.graph.layout import neuron_layout

from .base import BaseAgent, register_agent

if TYPE_CHECKING:
    import gymnasium as gym

    from envs import NeuronPruningEnv, PruningSubject
    from onp.graph import NeuronGraph
    from onp.zoo import BackdoorBundle


def _unwrapped(env: gym.Env) -> NeuronPruningEnv:
    return cast("NeuronPruningEnv", env.unwrapped)


def _bundle_of(env: gym.Env) -> Union[BackdoorBundle, PruningSubject]:
    base = _unwrapped(env)
    return base.bundles[base.target_index]


class OrderedAgent(BaseAgent):
    """Prune the first still-valid neuron of ``self.order`` (a priority list of node ids); STOP when
    none is valid. Subclasses set ``self.order`` in ``__init__``."""

    order: np.ndarray

    def predict(self, obs: Dict[str, np.ndarray], action_mask: np.ndarray) -> int:
        mask = np.asarray(action_mask, dtype=bool)
        valid = mask[self.order]
        if valid.any():
            return int(self.order[int(np.argmax(valid))])
        return len(mask) - 1


@register_agent("random")
class RandomAgent(BaseAgent):
    """Uniformly random valid neurons (STOP only when nothing else is valid)."""

    def __init__(self, env: Any = None, seed: int = 0, **params: Any) -> None:
        super().__init__(env, seed=seed, **params)
        self.rng = np.random.default_rng(seed)

    def predict(self, obs: Dict[str, np.ndarray], action_mask: np.ndarray) -> int:
        mask = np.asarray(action_mask, dtype=bool)
        valid = np.flatnonzero(mask[:-1])
        return int(self.rng.choice(valid)) if len(valid) else len(mask) - 1


@register_agent("greedy-gamma")
class GreedyGammaAgent(OrderedAgent):
    """Lowest ``|BN gamma|`` first."""

    def __init__(self, env: Any = None, **params: Any) -> None:
        super().__init__(env, **params)
        self.scores = bn_gamma_abs(self.env)
        self.order = np.argsort(self.scores, kind="stable")


@register_agent("greedy-activation")
class GreedyActivationAgent(OrderedAgent):
    """Largest BN-output change between the estimator's probe images and clean defense-val images first."""

    def __init__(self, env: Any = None, batch_size: int = 256, **params: Any) -> None:
        super().__init__(env, batch_size=batch_size, **params)
        self.scores = activation_change(self.env, batch_size=batch_size)
        self.order = np.argsort(-self.scores, kind="stable")


def bn_gamma_abs(env: gym.Env) -> np.ndarray:
    """``|gamma|`` per node in the env's graph numbering."""
    base = _unwrapped(env)
    model = base.target.model
    return torch.cat(
        [
            cast(nn.BatchNorm2d, model.get_submodule(layer.bn_name)).weight.detach().abs().flatten().cpu()
            for layer in base.graph.layers
        ]
    ).numpy()


@torch.no_grad()
def _mean_bn_maps(model: nn.Module, names: Sequence[str], x: torch.Tensor, batch_size: int) -> Dict[str, torch.Tensor]:
    sums: Dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> None:
            s = out.detach().float().sum(0)
            sums[name] = s if name not in sums else sums[name] + s

        return hook

    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(hook_for(name)))
    was = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {k: v / max(1, len(x)) for k, v in sums.items()}


def activation_change(env: gym.Env, batch_size: int = 256) -> np.ndarray:
    """Per node: spatial mean of ``|E_probe[BN out] - E_clean[BN out]|`` (unpruned model; see module doc)."""
    import copy

    base = _unwrapped(env)
    model = copy.deepcopy(_bundle_of(env).model).cpu().float().eval()  # no mask hooks on this copy
    names = [layer.bn_name for layer in base.graph.layers]
    probe = base.target.probe.images
    clean = _bundle_of(env).defense_data.val_x
    mp = _mean_bn_maps(model, names, probe, batch_size)
    mc = _mean_bn_maps(model, names, clean, batch_size)
    per_layer = []
    for name in names:
        diff = (mp[name] - mc[name]).abs()
        per_layer.append(diff.reshape(diff.shape[0], -1).mean(1))
    return torch.cat(per_layer).numpy()


def check_ranked_baseline(baseline: str) -> str:
    """``ranked:<baseline>``: ``baseline`` must be a registered defense that scores neurons; else
    :class:`UnknownNameError` listing the valid ones (checked when the agent spec is resolved, before
    any model is loaded)."""
    import baselines as bl
    from onp.registry import UnknownNameError

    valid = [n for n in bl.DEFENSES.names() if n not in bl.NON_SCORING]
    if baseline not in bl.DEFENSES.names():
        exc = UnknownNameError("defense", baseline, valid)
        exc.args = (f"{exc.args[0]} (the baselines that ranked:<baseline> can rank by)",)
        raise exc
    if baseline not in valid:
        raise ValueError(
            f"baseline {baseline!r} does not score neurons, so ranked:{baseline} cannot rank them; "
            f"use one of: {', '.join(valid)}"
        )
    return baseline


def subject_scores(
    source: Union[BackdoorBundle, PruningSubject],
    baseline: str,
    params: Optional[Dict[str, Any]] = None,
    seed: int = 0,
    graph: Optional[NeuronGraph] = None,
) -> np.ndarray:
    """The baseline's neuron scores (:func:`baselines.baseline_scores`) of ``source``'s model on its
    defense data (with the dataset's augmentation), checked against ``graph``'s numbering, as numpy."""
    import baselines as bl
    from onp.data.augment import Augment

    spec = getattr(source, "spec", None)
    scores = bl.baseline_scores(
        baseline,
        source.model,
        source.defense_data,
        seed=seed,
        augment=Augment.for_spec(spec) if spec is not None else None,
        **dict(params or {}),
    )
    if graph is not None:
        neuron_layout(source.model).check_same_numbering(graph.layout)
    return scores.float().numpy()


@register_agent("ranked", parametric="baseline", check=check_ranked_baseline)
class RankedAgent(OrderedAgent):
    """``ranked:<baseline>``: prune in the order of a baseline defense's neuron scores (highest first).

    Extra keyword arguments are the baseline's hyperparameters (e.g. ``unlearn_epochs=10`` for rnp).
    """

    def __init__(self, env: Any = None, baseline: str = "rnp", seed: int = 0, **baseline_params: Any) -> None:
        super().__init__(env, baseline=baseline, seed=seed, **baseline_params)
        self.baseline = baseline
        self.scores = subject_scores(_bundle_of(env), baseline, baseline_params, seed=seed, graph=self.env.graph)
        self.order = np.argsort(-self.scores, kind="stable")

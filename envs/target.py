"""Everything the env precomputes once per backdoored model: graph, features, masks, reward batch."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from baselines.features import register_score_providers
from onp.data.defense import DefenseData
from onp.graph import FEATURE_PROVIDERS, FeatureProvider, NeuronGraph, build_neuron_graph, compute_node_features
from onp.masks import NeuronMasks

from .asr_estimators import ASRProbe, build_probe
from .suffix_eval import SuffixEvaluator

if TYPE_CHECKING:
    from onp.attacks import Attack


def ensure_feature_providers(providers: Sequence[Union[str, FeatureProvider]]) -> None:
    """Check that every provider name is registered, registering the score-based ones first.

    The baselines' per-neuron scores (``clp_score``, ``anp_score``, ...; see
    :mod:`baselines.features`) are registered here, at the point of use, the first time one of
    ``providers`` is not yet in :data:`onp.graph.FEATURE_PROVIDERS`: no import side effect is
    needed. An unknown name raises :class:`onp.registry.UnknownNameError` listing the valid ones.
    """
    names = [p for p in providers if isinstance(p, str)]
    if any(n not in FEATURE_PROVIDERS for n in names):
        register_score_providers()
    for n in names:
        FEATURE_PROVIDERS.check(n)


@dataclass
class Evaluation:
    acc: float
    asr: float


class PruningTarget:
    """One backdoored model prepared for fast masked evaluation on a fixed reward batch.

    Args:
        model: the backdoored model (not modified except for mask hooks, removed by ``close``).
        attack: the attack (needed by the ``trigger`` estimator only).
        defense_data: the defender's clean data; features use defense-train, rewards defense-val.
        reward_batch: clean defense-validation images used per reward (``None`` = all of them); the
            triggered batch is the estimator's probe, capped at the same size.
    """

    def __init__(
        self,
        model: nn.Module,
        attack: Optional[Attack],
        defense_data: DefenseData,
        *,
        reward_batch: Optional[int] = None,
        asr_estimator: str = "trigger",
        estimator_params: Optional[Dict[str, Any]] = None,
        feature_providers: Sequence[str] = ("structure", "bn", "weight_norms", "activation"),
        top_k: Optional[int] = 16,
        mask_mode: str = "gamma",
        seed: int = 0,
        cache_dir: Optional[Path] = None,
        use_suffix_cache: bool = True,
        name: str = "model",
    ):
        n_val = len(defense_data.val_y)
        if reward_batch is not None and not 0 < reward_batch <= n_val:
            raise ValueError(
                f"reward_batch must be in [1, {n_val}] (the defense-validation set has {n_val} "
                f"images); got {reward_batch}"
            )
        self.name = name
        self.model = copy.deepcopy(model).eval()  # the env's own copy: mask hooks never leak into the caller's model
        for p in self.model.parameters():
            p.requires_grad_(False)
        ensure_feature_providers(feature_providers)
        example = defense_data.val_x[:2]
        self.graph: NeuronGraph = build_neuron_graph(self.model, example, top_k=top_k)
        self.features, self.feature_names = compute_node_features(
            self.model, self.graph, providers=feature_providers, data=defense_data.train_x
        )
        self.features = self.features.float()
        self.masks = NeuronMasks(self.model, self.graph, mode=mask_mode)
        self.probe: ASRProbe = build_probe(
            asr_estimator, self.model, attack, defense_data, seed=seed, cache_dir=cache_dir, **(estimator_params or {})
        ).limit(reward_batch)
        n = reward_batch or n_val
        self.clean_y = defense_data.val_y[:n]
        self.n_clean = len(self.clean_y)
        batch = torch.cat([defense_data.val_x[:n], self.probe.images]).contiguous(memory_format=torch.channels_last)
        self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # not in the stubs
        self.use_suffix_cache = use_suffix_cache
        self.bn_names = [layer.bn_name for layer in self.graph.layers]
        self.evaluator = SuffixEvaluator(self.model, batch, self.bn_names)
        self.batch = batch
        self.node_bn = [self.bn_names[int(i)] for i in self.graph.node_layer]
        self._base_mask = torch.ones(self.graph.num_nodes)
        self.masks.reset()
        self.initial = self._score(self.evaluator.full())
        self._initial_state = self.evaluator.snapshot()

    @property
    def num_nodes(self) -> int:
        return self.graph.num_nodes

    def _score(self, logits: torch.Tensor) -> Evaluation:
        pred = logits.argmax(1)
        acc = (pred[: self.n_clean] == self.clean_y).float().mean().item()
        trig = pred[self.n_clean :]
        asr = (trig == self.probe.target_labels).float().mean().item() if len(trig) else 0.0
        return Evaluation(acc, asr)

    def set_pruned(self, pruned: np.ndarray) -> Evaluation:
        """Set the full pruned state (bool array over nodes) and evaluate from scratch."""
        self.masks.set_mask(torch.as_tensor(~pruned, dtype=torch.float32))
        return self._score(self.evaluator.full())

    def reset_to_unpruned(self) -> Evaluation:
        """Back to the unpruned model without any forward pass (restores the cached activations)."""
        self.masks.reset()
        self.evaluator.restore(self._initial_state)
        return self.initial

    def prune_more(self, nodes: Sequence[int]) -> Evaluation:
        """Prune extra ``nodes`` (on top of the current state) and evaluate, reusing cached prefixes."""
        self.masks.prune(list(nodes))
        if not self.use_suffix_cache:
            return self._score(self.evaluator.full())
        return self._score(self.evaluator.from_layers(sorted({self.node_bn[i] for i in nodes})))

    def save_state(self) -> Tuple[torch.Tensor, Any]:
        """The current masks and cached activations, for :meth:`restore_state` (cheap: no copies of
        activations)."""
        return self.masks.mask.detach().clone(), self.evaluator.snapshot()

    def restore_state(self, state: Tuple[torch.Tensor, Any]) -> None:
        """Go back to a :meth:`save_state` (undo the prunes made since, without a forward pass)."""
        mask, snap = state
        with torch.no_grad():
            self.masks.mask.copy_(mask)
        self.evaluator.restore(snap)

    def evaluate_model(self, model: nn.Module) -> Evaluation:
        """Clean ACC and estimated ASR of another model of the same architecture (e.g. a pruned and
        fine-tuned copy) on this target's reward batch and ASR probe; ``model`` is left in eval mode."""
        model.eval()
        param = next(model.parameters(), None)
        batch = self.batch if param is None else self.batch.to(param.device)
        with torch.inference_mode():
            return self._score(model(batch).cpu())

    def uncached_evaluation(self) -> Evaluation:
        """Plain forward of the current masked model (for tests of the cache)."""
        with torch.inference_mode():
            return self._score(self.model(self.batch))

    def close(self) -> None:
        self.masks.remove()

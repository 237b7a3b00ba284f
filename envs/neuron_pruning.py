"""The ``onp/NeuronPruning-v0`` Gymnasium environment: an agent prunes neurons of a backdoored CNN.

* Observation (``Dict``): ``x`` node features ``Box(N, F)`` (static per model), ``pruned``
  ``MultiBinary(N)``, ``budget`` the remaining fraction of the pruning budget ``Box(1)``. The fixed
  topology is on the env: ``env.edge_index`` (2, E) and ``env.edge_weight`` (E,), read once.
* Action: ``Discrete(N + 1)``: prune neuron ``i``, or STOP (= ``N``). :meth:`action_masks` hides
  pruned neurons, excluded layers (the stem by default; the classifier has no BN neurons) and every
  neuron once the budget is spent. A masked action is a no-op with a small penalty; it never raises.
* Reward: ``dACC - lam * dASR`` on a fixed reward batch from defense-validation, so an episode
  returns ``(ACC_T - ACC_0) - lam * (ASR_T - ASR_0)``.
* Termination: STOP or the budget is spent. Truncation: a prune that would drop clean accuracy by more
  than ``delta`` (below the unpruned model's). With ``reject_violations`` (the default) that prune is
  undone: the neuron stays unpruned, the episode ends, and its reward is the clean accuracy it would
  have cost, with no credit for the ASR it removed. So the env's final state never breaks the
  ``delta`` constraint, and crossing it is never rewarded. The episode's return is then
  ``(ACC_T - ACC_0) - lam * (ASR_T - ASR_0)`` plus that (negative) last reward.
* ``info``: ``acc``, ``asr``, ``n_pruned``, ``pruned`` (indices), ``asr_estimator``, ``trigger_aware``;
  ``rejected`` (the neurons of a refused prune) on the step that crossed ``delta``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union, cast

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from onp.data.defense import DefenseData
from onp.graph.layer_types import LAYER_TYPES
from onp.zoo import BackdoorBundle, BackdoorConfig, load_bundle

from .target import Evaluation, PruningTarget, ensure_feature_providers

BackdoorSpec = Union[BackdoorBundle, "PruningSubject", BackdoorConfig, Dict[str, Any], str, Path]


@dataclass
class PruningSubject:
    """A model to prune without the zoo: the model, its attack (or None) and the defender's data."""

    model: torch.nn.Module
    attack: Any
    defense_data: DefenseData
    name: str = "model"


def _as_bundle(spec: BackdoorSpec, cache_dir: Optional[Path]) -> Union[BackdoorBundle, PruningSubject]:
    if isinstance(spec, (BackdoorBundle, PruningSubject)):
        return spec
    if isinstance(spec, (str, Path)):
        from onp.zoo import open_bundle

        return open_bundle(spec)
    return load_bundle(spec, cache_dir=cache_dir, progress=True)


def _name_of(bundle: Union[BackdoorBundle, PruningSubject]) -> str:
    """A :class:`PruningSubject`'s name, else the model folder's name."""
    return getattr(bundle, "name", None) or cast(BackdoorBundle, bundle).path.name


def _check_args(*, budget: float, lam: float, delta: float, asr_estimator: str) -> None:
    """Refuse a bad ``budget``, ``lam``, ``delta`` or ``asr_estimator``."""
    if budget <= 0:
        raise ValueError(f"budget must be > 0 (a fraction in (0, 1) or a neuron count); got {budget}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0; got {lam}")
    if delta <= 0:
        raise ValueError(f"delta must be > 0; got {delta}")
    from .asr_estimators import ASR_ESTIMATORS

    ASR_ESTIMATORS.check(asr_estimator)


def _backdoor_specs(
    backdoor: Union[BackdoorSpec, List[BackdoorSpec], Tuple[BackdoorSpec, ...], None],
) -> List[BackdoorSpec]:
    """``backdoor`` as a list of models to prune; none (None or an empty list) is refused."""
    if backdoor is None or (isinstance(backdoor, (list, tuple)) and not backdoor):
        raise ValueError(
            "NeuronPruningEnv needs the model to prune: pass backdoor=<a BackdoorBundle, a "
            "BackdoorConfig or dict (fetched from the zoo, trained on first use), or a model "
            "folder>, e.g. gym.make('onp/NeuronPruning-v0', "
            "backdoor=BackdoorConfig(model='resnet18'))"
        )
    return list(backdoor) if isinstance(backdoor, (list, tuple)) else [backdoor]


def _make_targets(
    bundles: Sequence[Union[BackdoorBundle, PruningSubject]], options: Dict[str, Any]
) -> List[PruningTarget]:
    """One :class:`PruningTarget` per model (``options``: its keyword arguments); all of one architecture."""
    targets = [PruningTarget(b.model, b.attack, b.defense_data, **options, name=_name_of(b)) for b in bundles]
    sizes = {t.num_nodes for t in targets}
    if len(sizes) != 1:
        raise ValueError(f"multi-model mode needs models of one architecture; got neuron counts {sorted(sizes)}")
    return targets


def _layer_types(exclude_layer_types: Sequence[str]) -> Tuple[str, ...]:
    """``exclude_layer_types`` as a tuple of known graph layer types (a string or an unknown type is refused)."""
    types = tuple(exclude_layer_types)
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if isinstance(exclude_layer_types, str) or unknown:
        raise ValueError(
            f"exclude_layer_types: unknown layer type(s) {unknown or [exclude_layer_types]}; "
            f"valid: {', '.join(LAYER_TYPES)} (a list, e.g. ['stem'])"
        )
    return types


class NeuronPruningEnv(gym.Env):
    """Prune BN-channel neurons of a backdoored model; reward = clean accuracy - lam * ASR (deltas).

    Args:
        backdoor: a :class:`~onp.zoo.BackdoorBundle`, a :class:`~onp.zoo.BackdoorConfig` (or dict; the
            model is fetched from the zoo, training it if needed), an artifact directory, or a list of
            them of one architecture (multi-model mode: one is sampled at each reset).
        budget: the most neurons pruned per episode: a fraction of N in (0, 1) or a count >= 1.
        lam: weight of the ASR term (>= 0).
        delta: the largest clean-accuracy drop allowed on the reward batch; a prune beyond it ends the
            episode: it is part of the MDP, so the step reports ``terminated=True`` with
            ``info["delta_exceeded"] = True`` (and ``info["rejected"]`` when the prune was undone).
        reject_violations: undo the prune that crosses ``delta`` (the final state keeps the constraint);
            ``False`` keeps it in the final state.
        reward_batch: clean defense-validation images per evaluation (None = all).
        asr_estimator: ``"trigger"`` (trigger-aware) or ``"synthesized"`` (see ``envs.asr_estimators``).
        exclude_layer_types: graph layer types whose neurons are never prunable.
        mask_mode: ``"gamma"`` (zero gamma, keep beta; ANP/RNP) or ``"channel"``.
        group_pruning: prune a neuron's whole residual coupling group at once.
        invalid_action_penalty: reward for a masked action (a no-op).
    """

    metadata = {"render_modes": []}
    observation_space: spaces.Dict
    action_space: spaces.Discrete

    def __init__(
        self,
        backdoor: Union[BackdoorSpec, List[BackdoorSpec], Tuple[BackdoorSpec, ...], None] = None,
        *,
        budget: float = 0.05,
        lam: float = 1.0,
        delta: float = 0.1,
        reward_batch: Optional[int] = None,
        asr_estimator: str = "trigger",
        estimator_params: Optional[Dict[str, Any]] = None,
        feature_providers: Sequence[str] = ("structure", "bn", "weight_norms", "activation"),
        top_k: Optional[int] = 16,
        exclude_layer_types: Sequence[str] = ("stem",),
        mask_mode: str = "gamma",
        group_pruning: bool = False,
        invalid_action_penalty: float = 0.01,
        reject_violations: bool = True,
        use_suffix_cache: bool = True,
        cache_dir: Optional[Path] = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_args(budget=budget, lam=lam, delta=delta, asr_estimator=asr_estimator)
        ensure_feature_providers(feature_providers)  # registers the baselines' <method>_score on first use
        self.bundles = [_as_bundle(s, cache_dir) for s in _backdoor_specs(backdoor)]
        target_options: Dict[str, Any] = dict(
            reward_batch=reward_batch,
            asr_estimator=asr_estimator,
            estimator_params=estimator_params,
            feature_providers=feature_providers,
            top_k=top_k,
            mask_mode=mask_mode,
            seed=seed,
            cache_dir=cache_dir,
            use_suffix_cache=use_suffix_cache,
        )
        self.targets: List[PruningTarget] = _make_targets(self.bundles, target_options)
        self.target = self.targets[0]
        n, f = self.target.features.shape
        self.num_nodes = n
        self.budget = int(round(budget * n)) if budget < 1 else int(budget)
        self.budget = max(1, min(self.budget, n))
        self.lam, self.delta = float(lam), float(delta)
        self.asr_estimator = asr_estimator
        self.group_pruning = group_pruning
        self.reject_violations = bool(reject_violations)
        self.invalid_action_penalty = float(invalid_action_penalty)
        self.exclude_layer_types = _layer_types(exclude_layer_types)
        self._set_spaces(n, f)
        self._select(0)
        self._pruned = np.zeros(n, dtype=bool)
        self._used = 0
        self._done = True
        self.current = self.target.initial

    def _set_spaces(self, n: int, f: int) -> None:
        """Observation: ``n`` neurons' ``f`` features, the pruned flags, the budget share left;
        actions: a neuron, or STOP (``n``)."""
        self.observation_space = spaces.Dict(
            {
                "x": spaces.Box(-np.inf, np.inf, shape=(n, f), dtype=np.float32),
                "pruned": spaces.MultiBinary(n),
                "budget": spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32),
            }
        )
        self.action_space = spaces.Discrete(n + 1)
        self.stop_action = n

    # -- topology and bookkeeping ------------------------------------------------------------
    def _select(self, i: int) -> None:
        self.target_index = i
        self.target = self.targets[i]
        g = self.target.graph
        self.edge_index = g.edge_index
        self.edge_weight = g.edge_weight
        self.graph = g
        types = [g.layers[int(i)].layer_type for i in g.node_layer]
        self._prunable = np.array([t not in self.exclude_layer_types for t in types], dtype=bool)

    @property
    def feature_names(self) -> List[str]:
        return self.target.feature_names

    def _obs(self) -> Dict[str, np.ndarray]:
        return {
            "x": self.target.features.numpy().copy(),
            "pruned": self._pruned.astype(np.int8),
            "budget": np.array([(self.budget - self._used) / self.budget], dtype=np.float32),
        }

    def _info(self) -> Dict[str, Any]:
        return {
            "acc": self.current.acc,
            "asr": self.current.asr,
            "acc0": self.target.initial.acc,
            "asr0": self.target.initial.asr,
            "n_pruned": int(self._pruned.sum()),
            "pruned": np.flatnonzero(self._pruned).tolist(),
            "asr_estimator": self.asr_estimator,
            "trigger_aware": self.target.probe.trigger_aware,
            "model": self.target.name,
        }

    def _nodes_of(self, action: int) -> List[int]:
        """The neurons one prune action removes: the neuron, or its unpruned residual group."""
        if not self.group_pruning:
            return [action]
        g = self.graph.group
        return [int(i) for i in torch.nonzero(g == g[action]).flatten() if not self._pruned[int(i)]]

    def action_masks(self) -> np.ndarray:
        """Valid actions: unpruned, prunable neurons while budget remains; STOP is always valid."""
        valid = np.zeros(self.num_nodes + 1, dtype=bool)
        if self._used < self.budget and not self._done:
            valid[:-1] = self._prunable & ~self._pruned
        valid[-1] = True
        return valid

    # -- gym API -------------------------------------------------------------------------------
    def reset(
        self, *, seed: Optional[int] = None, options: Optional[Dict[str, Any]] = None
    ) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
        super().reset(seed=seed)
        options = options or {}
        if "model_index" in options:
            idx = int(options["model_index"])
        elif len(self.targets) > 1:
            idx = int(self.np_random.integers(len(self.targets)))
        else:
            idx = 0
        if idx != self.target_index:
            self.target.masks.reset()
            self._select(idx)
        self._pruned = np.zeros(self.num_nodes, dtype=bool)
        initial = options.get("initial_pruned")
        if initial is not None and len(initial) > 0:
            initial = self._as_indices(initial)
            self._pruned[initial] = True
            self.current = self.target.set_pruned(self._pruned)
        else:
            self.current = self.target.reset_to_unpruned()
        self._start = self.current
        self._used = 0
        self._done = False
        return self._obs(), self._info()

    def _as_indices(self, initial: Any) -> np.ndarray:
        """``initial_pruned`` as neuron indices: integers in [0, N) of prunable neurons, else ValueError."""
        arr = np.asarray(initial)
        if arr.dtype.kind not in "iu" or arr.ndim != 1:
            raise ValueError(f"initial_pruned must be a list of integer neuron indices; got {initial!r}")
        if arr.min() < 0 or arr.max() >= self.num_nodes:
            raise ValueError(
                f"initial_pruned indices must be in [0, {self.num_nodes}); got min {arr.min()}, max {arr.max()}"
            )
        protected = arr[~self._prunable[arr]]
        if len(protected):
            raise ValueError(
                f"initial_pruned includes neurons of excluded layer types {self.exclude_layer_types}: "
                f"{protected[:8].tolist()}"
            )
        return arr.astype(np.int64)

    def _as_action(self, action: Any) -> int:
        """An integer action (Python or numpy int, or a one-element integer array); floats, strings and
        bools are refused rather than truncated."""
        if isinstance(action, torch.Tensor):
            action = action.detach().cpu().numpy()
        if isinstance(action, np.ndarray) and action.size == 1:
            action = action.reshape(-1)[0]
        if isinstance(action, (bool, np.bool_)) or not isinstance(action, (int, np.integer)):
            raise TypeError(
                f"action must be an integer in [0, {self.num_nodes}] ({self.num_nodes} = STOP); got "
                f"{action!r} ({type(action).__name__})"
            )
        return int(action)

    def step(self, action: Any) -> Tuple[Dict[str, np.ndarray], float, bool, bool, Dict[str, Any]]:
        action = self._as_action(action)
        if self._done:
            return self._obs(), 0.0, True, False, self._info()
        if action == self.stop_action:
            self._done = True
            return self._obs(), 0.0, True, False, self._info()
        if not (0 <= action < self.num_nodes) or not self.action_masks()[action]:
            return self._obs(), -self.invalid_action_penalty, False, False, {**self._info(), "invalid_action": True}
        nodes = self._nodes_of(action)
        prev = self.current
        saved = self.target.save_state() if self.reject_violations else None
        attempt = self.target.prune_more(nodes)
        exceeded = (self.target.initial.acc - attempt.acc) > self.delta  # crosses the accuracy constraint
        if exceeded and saved is not None:  # refuse the prune: back to the previous state; the episode ends
            self._done = True
            self.target.restore_state(saved)
            reward = min(0.0, attempt.acc - prev.acc)
            return self._obs(), float(reward), True, False, {**self._info(), "rejected": nodes, "delta_exceeded": True}
        self._pruned[nodes] = True
        self._used += 1
        self.current = attempt
        reward = (attempt.acc - prev.acc) - self.lam * (attempt.asr - prev.asr)
        self._done = exceeded or self._used >= self.budget
        info = {**self._info(), "delta_exceeded": True} if exceeded else self._info()
        return self._obs(), float(reward), self._done, False, info

    def evaluation(self) -> Evaluation:
        """Clean ACC and ASR of the current pruned state on the reward batch."""
        return self.current

    def preview(self, action: int) -> Evaluation:
        """What pruning ``action`` would give on the reward batch, without taking the step (the state,
        the budget and the episode are unchanged). For demonstrations and lookahead agents; every
        call costs an evaluation like a step, so count it as one."""
        action = self._as_action(action)
        if self._done or not (0 <= action < self.num_nodes) or not self.action_masks()[action]:
            raise ValueError(f"action {action} is not a valid prune in this state (see action_masks())")
        nodes = self._nodes_of(action)
        saved = self.target.save_state()
        try:
            return self.target.prune_more(nodes)
        finally:
            self.target.restore_state(saved)

    def close(self) -> None:
        for t in self.targets:
            t.close()

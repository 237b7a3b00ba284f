"""Pruning agents for :class:`envs.NeuronPruningEnv` (see ``docs/agents.md``).

>>> from agents import build_agent, rollout                                  # doctest: +SKIP
>>> agent = build_agent("greedy-gamma", env)                                 # doctest: +SKIP
>>> result = rollout(agent, env); result["info"]["pruned"]                   # doctest: +SKIP

Built-in agents: ``ppo-gnn`` (MaskablePPO + GNN policy, the default of ``python -m onp.train``),
``random``, ``greedy-gamma``, ``greedy-activation`` and ``ranked:<baseline>``. Add one with
``@register_agent("name")``, the ``onp.agents`` entry-point group, or ``--agent path/to/file.py:Class``.
Every module of this package is imported here, so a built-in agent is one module (plus its test)
and no line in this file.
"""

from onp.registry import import_submodules

from .base import (
    AGENTS,
    ENTRY_POINT_GROUP,
    ROLLOUT_SELECT,
    Agent,
    AgentError,
    BaseAgent,
    LearnResult,
    accepts,
    agent_label,
    available_agents,
    best_prefix,
    build_agent,
    pruning_order,
    register_agent,
    resolve_agent_factory,
    rollout,
    select_pruning,
)
from .finetune import FinetuneOutcome, finetune_pruned
from .gnn_policy import GNNMaskablePolicy, GraphEncoder, policy_kwargs_for
from .heuristics import (
    GreedyActivationAgent,
    GreedyGammaAgent,
    OrderedAgent,
    RandomAgent,
    RankedAgent,
    activation_change,
    bn_gamma_abs,
    subject_scores,
)
from .policy_io import export_sb3_zip, load_policy, load_weights, save_policy, save_weights
from .ppo_gnn import CloneSettings, PPOGNNAgent, behaviour_clone, clone_demonstrations, demonstrate, train_ppo_gnn

__all__ = [
    "AGENTS",
    "ENTRY_POINT_GROUP",
    "ROLLOUT_SELECT",
    "Agent",
    "AgentError",
    "BaseAgent",
    "LearnResult",
    "accepts",
    "agent_label",
    "available_agents",
    "best_prefix",
    "build_agent",
    "select_pruning",
    "pruning_order",
    "FinetuneOutcome",
    "finetune_pruned",
    "register_agent",
    "resolve_agent_factory",
    "rollout",
    "GreedyActivationAgent",
    "GreedyGammaAgent",
    "OrderedAgent",
    "RandomAgent",
    "RankedAgent",
    "activation_change",
    "subject_scores",
    "bn_gamma_abs",
    "GNNMaskablePolicy",
    "GraphEncoder",
    "policy_kwargs_for",
    "PPOGNNAgent",
    "behaviour_clone",
    "clone_demonstrations",
    "CloneSettings",
    "demonstrate",
    "train_ppo_gnn",
    "export_sb3_zip",
    "load_policy",
    "load_weights",
    "save_policy",
    "save_weights",
]

import_submodules(__name__, __path__)  # each agent module registers itself

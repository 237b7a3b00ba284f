"""Gymnasium environments of onp. Importing this package registers ``onp/NeuronPruning-v0``."""

import gymnasium as gym

from .asr_estimators import ASR_ESTIMATORS, ASRProbe, build_probe, register_asr_estimator
from .neuron_pruning import NeuronPruningEnv, PruningSubject
from .target import ensure_feature_providers

ENV_ID = "onp/NeuronPruning-v0"
if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="envs.neuron_pruning:NeuronPruningEnv")

__all__ = [
    "ENV_ID",
    "NeuronPruningEnv",
    "PruningSubject",
    "ASR_ESTIMATORS",
    "ASRProbe",
    "build_probe",
    "register_asr_estimator",
    "ensure_feature_providers",
]

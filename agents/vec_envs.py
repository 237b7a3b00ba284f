"""Building NeuronPruningEnv instances for agents: picklable factories and vectorised envs.

``EnvFactory`` is a plain dataclass holding the model's zoo artifact directory (or, for in-process
use only, the bundle itself) and the env's keyword arguments, so that ``SubprocVecEnv`` can send it
to a worker process, which then opens the bundle and builds its own env.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Union

import gymnasium as gym
import torch

if TYPE_CHECKING:
    from stable_baselines3.common.vec_env import VecEnv


@dataclass
class EnvFactory:
    """A picklable ``() -> env`` for ``DummyVecEnv`` / ``SubprocVecEnv``.

    Args:
        source: a zoo artifact directory (picklable; needed for subprocesses), or a bundle object
            (in-process only), or a list of them (the env's multi-model mode).
        env_kwargs: keyword arguments of :class:`envs.NeuronPruningEnv`.
        seed: the env's seed (reward-batch and probe choices); the same for every worker so all
            workers see the same reward batch.
        rank: worker index (offsets the reset seed only).
        threads: ``torch.set_num_threads`` in the worker (``None`` = leave it).
        monitor: wrap in SB3's ``Monitor`` (episode returns in the logs).
    """

    source: Any
    env_kwargs: Dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    rank: int = 0
    threads: Optional[int] = None
    monitor: bool = True

    def __call__(self) -> gym.Env:
        if self.threads:
            torch.set_num_threads(int(self.threads))
        from envs import NeuronPruningEnv

        source = [_opened(s) for s in self.source] if isinstance(self.source, list) else _opened(self.source)
        env: gym.Env = NeuronPruningEnv(source, seed=self.seed, **self.env_kwargs)
        if self.monitor:
            from stable_baselines3.common.monitor import Monitor

            env = Monitor(env)
        env.reset(seed=self.seed + self.rank)
        return env

    def for_subprocess(self) -> "EnvFactory":
        """A copy whose source is the artifact path(s) (bundles are not sent to workers)."""
        src = [_artifact_path(s) for s in self.source] if isinstance(self.source, list) else _artifact_path(self.source)
        return EnvFactory(src, dict(self.env_kwargs), self.seed, self.rank, self.threads, self.monitor)


def _opened(source: Any) -> Any:
    """A bundle: ``source`` itself, or the zoo artifact directory it names opened."""
    if isinstance(source, (str, Path)):
        from onp.zoo import open_bundle

        return open_bundle(source)
    return source


def _artifact_path(source: Any) -> str:
    """The zoo artifact directory of ``source`` (a path, or a bundle saved in the zoo), else a clear error."""
    if isinstance(source, (str, Path)):
        return str(source)
    path = getattr(source, "path", None)
    if path is None:
        raise ValueError(
            "SubprocVecEnv needs a model saved in the zoo (an artifact directory); "
            "use vec_env='dummy' for an in-memory model"
        )
    return str(path)


def make_vec_env(
    factory: EnvFactory, n_envs: int = 1, vec_env: str = "dummy", start_method: Optional[str] = None
) -> VecEnv:
    """``DummyVecEnv`` or ``SubprocVecEnv`` of ``n_envs`` copies built by ``factory`` (one per rank)."""
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    if n_envs < 1:
        raise ValueError(f"n_envs must be >= 1; got {n_envs}")
    if vec_env == "dummy":
        fns: List[Callable[[], gym.Env]] = [
            EnvFactory(factory.source, dict(factory.env_kwargs), factory.seed, r, factory.threads, factory.monitor)
            for r in range(n_envs)
        ]
        return DummyVecEnv(fns)
    if vec_env == "subproc":
        base = factory.for_subprocess()
        threads = base.threads or max(1, torch.get_num_threads() // n_envs)
        fns = [
            EnvFactory(base.source, dict(base.env_kwargs), base.seed, r, threads, base.monitor) for r in range(n_envs)
        ]
        return SubprocVecEnv(fns, start_method=start_method)
    raise ValueError(f"unknown vec_env {vec_env!r}; valid choices: dummy, subproc")


def env_kwargs_from_config(env_cfg: Dict[str, Any], cache_dir: Optional[Union[str, Path]] = None) -> Dict[str, Any]:
    """NeuronPruningEnv keyword arguments from the ``env`` section of a training config."""
    kw = {k: v for k, v in env_cfg.items() if v is not None or k in ("reward_batch", "top_k")}
    for key in ("feature_providers", "exclude_layer_types"):
        if key in kw:
            kw[key] = tuple(kw[key])
    if not kw.get("estimator_params"):
        kw.pop("estimator_params", None)
    if cache_dir is not None:
        kw["cache_dir"] = Path(cache_dir)
    return kw

"""SB3 callbacks used by ``onp.train``: defense-validation evaluation with best-policy and resumable
checkpoints (stored without pickle, :mod:`agents.policy_io`), and a tqdm progress bar (SB3's own
bar needs ``rich``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, cast

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from onp.io import atomic_write_json, read_json

from .base import rollout
from .gnn_policy import GNNMaskablePolicy
from .policy_io import save_checkpoint, save_policy

if TYPE_CHECKING:
    import gymnasium as gym
    from sb3_contrib import MaskablePPO

    from envs import NeuronPruningEnv

STATE_FILE = "train_state.json"


class TrainState:
    """What survives an interruption besides the SB3 checkpoint (``train_state.json``)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / STATE_FILE
        self.learning_curve: List[Dict[str, Any]] = []
        self.best: Optional[Dict[str, Any]] = None
        self.eval_env_steps = 0
        self.train_seconds = 0.0
        self.warm_start: Optional[Dict[str, Any]] = None
        self.timesteps = 0
        self.finished = False

    def to_dict(self) -> Dict[str, Any]:
        return {
            "timesteps": self.timesteps,
            "learning_curve": self.learning_curve,
            "best": self.best,
            "eval_env_steps": self.eval_env_steps,
            "train_seconds": self.train_seconds,
            "warm_start": self.warm_start,
            "finished": self.finished,
        }

    def save(self) -> None:
        atomic_write_json(self.path, self.to_dict())

    @classmethod
    def load(cls, run_dir: Path) -> "TrainState":
        st = cls(run_dir)
        if st.path.exists():
            d = read_json(st.path)
            st.timesteps = int(d.get("timesteps", 0))
            st.learning_curve = list(d.get("learning_curve", []))
            st.best = d.get("best")
            st.eval_env_steps = int(d.get("eval_env_steps", 0))
            st.train_seconds = float(d.get("train_seconds", 0.0))
            st.warm_start = d.get("warm_start")
            st.finished = bool(d.get("finished", False))
        return st


def evaluate_policy_episode(model: MaskablePPO, eval_env: gym.Env, n_episodes: int = 1) -> Dict[str, Any]:
    """Deterministic episodes of an SB3 model on a (non-vectorised) NeuronPruningEnv; in multi-model
    mode ``n_episodes`` on each model, the return, ACC, ASR and count averaged over the models
    (``returns``: each model's mean return; ``pruned``: the first model's)."""
    base = cast("NeuronPruningEnv", eval_env.unwrapped)

    def act(obs: Dict[str, np.ndarray], mask: np.ndarray) -> np.ndarray:
        return model.predict(obs, action_masks=mask, deterministic=True)[0]

    per_model = []
    for i in range(len(base.targets)):
        options = {"model_index": i} if len(base.targets) > 1 else None
        per_model.append([rollout(act, eval_env, options=options) for _ in range(max(1, n_episodes))])
    lasts = [runs[-1]["info"] for runs in per_model]
    returns = [float(np.mean([r["return"] for r in runs])) for runs in per_model]
    out = {
        "mean_return": float(np.mean(returns)),
        "steps": sum(r["steps"] for runs in per_model for r in runs),
        "acc": float(np.mean([info["acc"] for info in lasts])),
        "asr": float(np.mean([info["asr"] for info in lasts])),
        "n_pruned": int(round(float(np.mean([info["n_pruned"] for info in lasts])))),
        "pruned": list(lasts[0]["pruned"]),
        "num_nodes": base.num_nodes,
    }
    if len(per_model) > 1:
        out["returns"] = returns
    return out


class EvalCheckpointCallback(BaseCallback):
    """Every ``eval_freq`` env steps: a deterministic episode on the defense-validation env (its
    reward batch), a learning-curve point, ``policy.pt`` + ``policy.json`` when the return is the best
    so far, and a resumable ``checkpoint.pt`` + ``checkpoint.json`` + ``train_state.json``. Also
    evaluates at the start and the end."""

    def __init__(
        self,
        eval_env: gym.Env,
        run_dir: Path,
        state: TrainState,
        eval_freq: int = 256,
        n_episodes: int = 1,
        status: Optional[Dict[str, Any]] = None,
        verbose: int = 0,
    ):
        super().__init__(verbose)
        self.eval_env = eval_env
        self.run_dir = Path(run_dir)
        self.state = state
        self.eval_freq = max(1, int(eval_freq))
        self.n_episodes = n_episodes
        self.status = status if status is not None else {}
        self._last_eval: Optional[int] = None
        self._t0 = time.perf_counter()
        self._seconds0 = state.train_seconds

    @property
    def ppo(self) -> MaskablePPO:
        """The model being trained (SB3 types it as any algorithm)."""
        return cast("MaskablePPO", self.model)

    def _elapsed(self) -> float:
        return self._seconds0 + time.perf_counter() - self._t0

    def _on_training_start(self) -> None:
        self._t0 = time.perf_counter()
        self._seconds0 = self.state.train_seconds
        done = {p["timesteps"] for p in self.state.learning_curve}
        self._last_eval = self.num_timesteps if self.num_timesteps in done else None
        if self._last_eval is None:
            self.evaluate()

    def _on_step(self) -> bool:
        if self._last_eval is None or self.num_timesteps - self._last_eval >= self.eval_freq:
            self.evaluate()
        return True

    def _on_training_end(self) -> None:
        if self._last_eval != self.num_timesteps:
            self.evaluate()
        self.checkpoint()

    def evaluate(self) -> Dict[str, Any]:
        res = evaluate_policy_episode(self.ppo, self.eval_env, self.n_episodes)
        self.state.eval_env_steps += res["steps"]
        point = {
            "timesteps": int(self.num_timesteps),
            "mean_return": res["mean_return"],
            "acc": res["acc"],
            "asr": res["asr"],
            "n_pruned": res["n_pruned"],
            "wall_time": round(self._elapsed(), 2),
        }
        if "returns" in res:  # multi-model mode: each model's return (mean_return is their mean)
            point["returns"] = res["returns"]
        self.state.learning_curve.append(point)
        self.logger.record("eval/mean_return", res["mean_return"])
        self.logger.record("eval/acc", res["acc"])
        self.logger.record("eval/asr", res["asr"])
        self.logger.record("eval/n_pruned", res["n_pruned"])
        if self.state.best is None or res["mean_return"] > self.state.best["mean_return"]:
            self.state.best = {**point, "pruned": res["pruned"]}
            save_policy(cast(GNNMaskablePolicy, self.model.policy), self.run_dir)
        self.status.update(eval_return=res["mean_return"], best=self.state.best["mean_return"])
        self._last_eval = self.num_timesteps
        self.checkpoint()
        return point

    def checkpoint(self) -> None:
        self.state.timesteps = int(self.num_timesteps)
        self.state.train_seconds = self._elapsed()
        save_checkpoint(self.ppo, self.run_dir)
        self.state.save()


class TqdmCallback(BaseCallback):
    """A tqdm bar over env steps; shows the latest defense-validation return from ``status``."""

    def __init__(self, status: Optional[Dict[str, Any]] = None, desc: str = "PPO"):
        super().__init__()
        self.status = status if status is not None else {}
        self.desc = desc
        self.bar = None

    def _on_training_start(self) -> None:
        from tqdm.auto import tqdm

        total = int(self.locals.get("total_timesteps", self.model.num_timesteps))
        self.bar = tqdm(total=total, initial=self.model.num_timesteps, unit="step", desc=self.desc, dynamic_ncols=True)

    def _on_step(self) -> bool:
        if self.bar is not None:
            self.bar.update(self.training_env.num_envs)
            if "eval_return" in self.status:
                self.bar.set_postfix(
                    val_return=f"{self.status['eval_return']:+.3f}", best=f"{self.status['best']:+.3f}", refresh=False
                )
        return True

    def _on_training_end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

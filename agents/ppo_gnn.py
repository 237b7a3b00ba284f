"""``ppo-gnn``: MaskablePPO with the GNN policy, its training loop for ``onp.train`` and the
behaviour-cloning warm start.

* :class:`PPOGNNAgent` is the plug-in agent (``predict``/``learn``/``save``/``load``);
* :func:`train_ppo_gnn` is what ``onp.train`` runs: vectorised envs (``DummyVecEnv`` or
  ``SubprocVecEnv``), a deterministic defense-validation episode every ``eval.freq`` env steps
  (learning curve, best policy -> ``policy.zip``), a resumable ``checkpoint.zip`` +
  ``train_state.json`` (also written on Ctrl-C), tensorboard logs in ``tb/`` and a tqdm bar;
* :func:`behaviour_clone` is warm start (c): the GNN policy is pretrained to reproduce a baseline's
  pruning order (states from rolling the order out in the env, targets = the baseline's next
  neuron, cross-entropy on the masked logits, plus a value regression on the returns-to-go) before
  PPO continues from it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import BaseAgent, register_agent
from .callbacks import BEST_POLICY, CHECKPOINT, EvalCheckpointCallback, TqdmCallback, TrainState, save_model
from .envs import EndOnDeltaTruncation, EnvFactory, env_kwargs_from_config, make_vec_env
from .gnn_policy import GNNMaskablePolicy, policy_kwargs_for

POLICY_DEFAULTS: Dict[str, Any] = {"conv": "gcn", "hidden": 32, "layers": 2, "heads": 4, "symmetric": True,
                                   "head_hidden": 64}
PPO_DEFAULTS: Dict[str, Any] = {"total_timesteps": 2048, "n_steps": 256, "batch_size": 64, "n_epochs": 4,
                                "learning_rate": 3e-4, "gamma": 1.0, "gae_lambda": 0.95, "clip_range": 0.2,
                                "ent_coef": 0.0, "vf_coef": 0.5, "max_grad_norm": 0.5, "target_kl": None,
                                "normalize_advantage": True, "n_envs": 1, "vec_env": "dummy", "env_threads": None}
WARM_START_DEFAULTS: Dict[str, Any] = {"baseline": None, "params": {}, "epochs": 100, "lr": 3e-3, "batch_size": 32,
                                       "value_coef": 0.5, "skip_harmful": False, "max_previews": None}
#: keys of the ``ppo`` section that are not MaskablePPO constructor arguments
_NOT_PPO_ARGS = ("total_timesteps", "n_envs", "vec_env", "env_threads")


def make_ppo(vec_env, policy_kwargs: Dict[str, Any], ppo: Optional[Dict[str, Any]] = None, *, seed: int = 0,
             device: str = "cpu", tensorboard_log: Optional[str] = None, verbose: int = 0):
    """A ``MaskablePPO`` with :class:`GNNMaskablePolicy` (``ppo``: the config's ``ppo`` section)."""
    from sb3_contrib import MaskablePPO

    args = {k: v for k, v in {**PPO_DEFAULTS, **(ppo or {})}.items() if k not in _NOT_PPO_ARGS}
    n_steps, batch = int(args["n_steps"]), int(args["batch_size"])
    if n_steps * vec_env.num_envs < 2:
        raise ValueError("ppo.n_steps * n_envs must be >= 2")
    args["batch_size"] = min(batch, n_steps * vec_env.num_envs)
    return MaskablePPO(GNNMaskablePolicy, vec_env, policy_kwargs=policy_kwargs, seed=seed, device=device,
                       tensorboard_log=tensorboard_log, verbose=verbose, **args)


@register_agent("ppo-gnn")
class PPOGNNAgent(BaseAgent):
    """MaskablePPO + :class:`GNNMaskablePolicy` as a plug-in agent.

    Args:
        env: the NeuronPruningEnv (for the graph and spaces).
        policy: the config's ``policy`` section (conv, hidden, layers, heads, symmetric, head_hidden).
        ppo: the config's ``ppo`` section (MaskablePPO arguments).
        model: an existing ``MaskablePPO`` (e.g. from :meth:`load`).
    """

    learns = True

    def __init__(self, env=None, policy: Optional[Dict[str, Any]] = None, ppo: Optional[Dict[str, Any]] = None,
                 seed: int = 0, device: str = "cpu", model=None, **params: Any):
        super().__init__(env, policy=policy, ppo=ppo, seed=seed, device=device, **params)
        self.policy_cfg = {**POLICY_DEFAULTS, **(policy or {})}
        self.ppo_cfg = {**PPO_DEFAULTS, **(ppo or {})}
        self.seed, self.device = seed, device
        self.model = model

    def _vec(self, env):
        from stable_baselines3.common.monitor import Monitor
        from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

        if isinstance(env, VecEnv):
            return env
        wrapped = env if isinstance(env, EndOnDeltaTruncation) else EndOnDeltaTruncation(env)
        return DummyVecEnv([lambda: Monitor(wrapped)])

    def learn(self, env, total_timesteps: int, callback=None, progress: bool = False,
              tensorboard_log: Optional[str] = None) -> "PPOGNNAgent":
        vec = self._vec(env)
        if self.model is None:
            kwargs = policy_kwargs_for(env if not hasattr(env, "num_envs") else self.env, **self.policy_cfg)
            self.model = make_ppo(vec, kwargs, self.ppo_cfg, seed=self.seed, device=self.device,
                                  tensorboard_log=tensorboard_log)
        else:
            self.model.set_env(vec)
        cbs = [callback] if callback is not None else []
        if progress:
            cbs.append(TqdmCallback())
        self.model.learn(int(total_timesteps), callback=cbs or None, reset_num_timesteps=False)
        return self

    def predict(self, obs, action_mask) -> int:
        if self.model is None:
            raise RuntimeError("ppo-gnn agent has no model yet: call learn() or load() first")
        return int(self.model.predict(obs, action_masks=np.asarray(action_mask, dtype=bool), deterministic=True)[0])

    def save(self, path) -> None:
        save_model(self.model, path)

    @classmethod
    def load(cls, path, env=None, device: str = "cpu") -> "PPOGNNAgent":
        from sb3_contrib import MaskablePPO

        return cls(env, model=MaskablePPO.load(path, device=device), device=device)


# --------------------------------------------------------------------------------------------------
# behaviour cloning (warm start c)


def _stack_obs(obs_list: Sequence[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    return {k: np.stack([o[k] for o in obs_list]) for k in obs_list[0]}


def demonstrate(env, order: Sequence[int], *, skip_harmful: bool = False,
                max_previews: Optional[int] = None) -> Dict[str, Any]:
    """One episode of ``env`` that prunes along ``order`` (a node priority list): the demonstration
    that :func:`behaviour_clone` imitates.

    At each step the first still-valid node of ``order`` is taken. Where the env refuses it (it would
    break the ``delta`` accuracy constraint), the demonstrated action is STOP. With ``skip_harmful``,
    each candidate is first previewed (:meth:`envs.NeuronPruningEnv.preview`, on the env's reward
    batch) and skipped if its reward would be negative, i.e. it would cost more clean accuracy than
    it removes ASR; after ``max_previews`` previews (default: 4 x the budget) the demonstration
    stops. Returns ``{"obs", "masks", "actions", "rewards", "info", "previews", "skipped"}``.
    """
    from .heuristics import OrderedAgent

    agent = OrderedAgent(env)
    agent.order = np.asarray(order, dtype=np.int64)
    base = env.unwrapped
    limit = 4 * base.budget if max_previews is None else int(max_previews)
    skipped = np.zeros(base.num_nodes + 1, dtype=bool)
    out: Dict[str, Any] = {"obs": [], "masks": [], "actions": [], "rewards": [], "previews": 0, "skipped": []}
    obs, info = env.reset()
    done = False
    while not done:
        mask = base.action_masks().copy()
        a = agent.predict(obs, mask & ~skipped)
        while skip_harmful and a != base.stop_action:
            if out["previews"] >= limit:
                a = base.stop_action
                break
            now, ev = base.evaluation(), base.preview(a)
            out["previews"] += 1
            if (ev.acc - now.acc) - base.lam * (ev.asr - now.asr) >= 0:
                break
            skipped[a] = True
            out["skipped"].append(int(a))
            a = agent.predict(obs, mask & ~skipped)
        out["obs"].append(obs)
        out["masks"].append(mask)
        out["actions"].append(int(a))
        obs, r, term, trunc, info = env.step(a)
        if info.get("rejected"):  # the order's next node would break the delta constraint: STOP
            out["actions"][-1], r = base.stop_action, 0.0
        out["rewards"].append(float(r))
        done = term or trunc
    out["info"] = info
    return out


def behaviour_clone(model, env, order: Sequence[int], *, epochs: int = 100, lr: float = 3e-3, batch_size: int = 32,
                    value_coef: float = 0.5, gamma: float = 1.0, seed: int = 0, skip_harmful: bool = False,
                    max_previews: Optional[int] = None, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Pretrain ``model.policy`` to follow ``order`` (a node priority list) in ``env``.

    The order is rolled out in ``env`` by :func:`demonstrate` (with ``skip_harmful`` and
    ``max_previews``); each visited state's target is the action demonstrated there.
    Loss: cross-entropy on the masked logits + ``value_coef`` * MSE of the value on the rollout's
    returns-to-go. Returns diagnostics (losses, final imitation accuracy, env steps used, previews
    included).
    """
    t0 = time.perf_counter()
    demo = demonstrate(env, order, skip_harmful=skip_harmful, max_previews=max_previews)
    obs_list, masks, info = demo["obs"], demo["masks"], demo["info"]
    order_return = float(sum(demo["rewards"]))
    actions = np.asarray(demo["actions"], dtype=np.int64)
    rewards = np.asarray(demo["rewards"], dtype=np.float32)
    rtg = np.zeros_like(rewards)
    acc = 0.0
    for i in range(len(rewards) - 1, -1, -1):
        acc = rewards[i] + gamma * acc
        rtg[i] = acc
    policy = model.policy
    obs_t, _ = policy.obs_to_tensor(_stack_obs(obs_list))
    mask_t = torch.as_tensor(np.stack(masks), dtype=torch.bool, device=policy.device)
    act_t = torch.as_tensor(actions, device=policy.device)
    rtg_t = torch.as_tensor(rtg, device=policy.device)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = len(actions)
    losses = []
    policy.set_training_mode(True)
    for _ in range(int(epochs)):
        perm = torch.randperm(n, generator=gen).to(policy.device)
        total = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            nodes, pooled = policy._encode({k: v[idx] for k, v in obs_t.items()})
            logits = policy.action_net(nodes, pooled).masked_fill(~mask_t[idx], -1e9)
            values = policy.value_net(pooled).squeeze(-1)
            loss = F.cross_entropy(logits, act_t[idx]) + value_coef * F.mse_loss(values, rtg_t[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / n)
    policy.set_training_mode(False)
    with torch.no_grad():
        nodes, pooled = policy._encode(obs_t)
        pred = policy.action_net(nodes, pooled).masked_fill(~mask_t, -1e9).argmax(1)
        imitation = float((pred == act_t).float().mean())
    out = {"states": n, "env_steps": n + demo["previews"], "epochs": int(epochs), "loss_first": losses[0] if losses else None,
           "loss_last": losses[-1] if losses else None, "imitation_accuracy": imitation,
           "order_return": order_return, "stopped_at_delta": bool(info.get("rejected")),
           "skip_harmful": bool(skip_harmful), "previews": demo["previews"], "skipped": demo["skipped"],
           "order_val_acc": float(info["acc"]), "order_val_asr": float(info["asr"]),
           "seconds": round(time.perf_counter() - t0, 2)}
    log(f"[onp] warm start: cloned {n} steps of the order (val return {order_return:+.4f}, ACC {info['acc']:.3f}, "
        f"ASR {info['asr']:.3f}); loss {out['loss_first']:.3f} -> {out['loss_last']:.3f}, "
        f"imitation accuracy {imitation:.2f}")
    return out


# --------------------------------------------------------------------------------------------------
# the training loop of onp.train


def train_ppo_gnn(bundle, config: Dict[str, Any], run_dir: Path, *, resume: bool = False, progress: bool = True,
                  callbacks: Sequence = (), log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train MaskablePPO + GNN on ``bundle`` as configured (see ``configs/train/default.yaml``).

    Returns ``{"eval_env", "policy_path", "state" (TrainState), "timesteps", "train_seconds",
    "train_env_steps", "resumed_from"}``; the caller closes ``eval_env``.
    """
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.callbacks import CallbackList

    run_dir = Path(run_dir)
    ppo_cfg = {**PPO_DEFAULTS, **config.get("ppo", {})}
    pol_cfg = {**POLICY_DEFAULTS, **config.get("policy", {})}
    ws_cfg = {**WARM_START_DEFAULTS, **(config.get("warm_start") or {})}
    eval_cfg = {"freq": 256, "episodes": 1, **config.get("eval", {})}
    seed, device = int(config.get("seed", 0)), config.get("device", "cpu")
    env_kwargs = env_kwargs_from_config(config["env"], config.get("cache_dir"))
    factory = EnvFactory(bundle, env_kwargs, seed=seed, threads=ppo_cfg.get("env_threads"))
    eval_env = EnvFactory(bundle, env_kwargs, seed=seed, monitor=False, end_on_truncation=False)()
    vec_env = make_vec_env(factory, int(ppo_cfg["n_envs"]), ppo_cfg["vec_env"])
    total = int(ppo_cfg["total_timesteps"])
    state = TrainState.load(run_dir) if resume else TrainState(run_dir)
    ckpt = run_dir / CHECKPOINT
    resumed_from = None
    try:
        if resume and ckpt.exists():
            model = MaskablePPO.load(ckpt, env=vec_env, device=device)
            model._last_obs = None  # start a fresh episode in the new env
            model.tensorboard_log = str(run_dir / "tb")
            resumed_from = int(model.num_timesteps)
            log(f"[onp] resuming from {ckpt} at {resumed_from} / {total} env steps")
        else:
            if resume:
                log(f"[onp] --resume: no checkpoint in {run_dir}; starting from scratch")
                state = TrainState(run_dir)
            model = make_ppo(vec_env, policy_kwargs_for(eval_env, **pol_cfg), ppo_cfg, seed=seed, device=device,
                             tensorboard_log=str(run_dir / "tb"))
            if ws_cfg.get("baseline"):
                from .heuristics import baseline_scores

                log(f"[onp] warm start: fitting baseline {ws_cfg['baseline']!r} on the defense data to clone its "
                    f"pruning order")
                t0 = time.perf_counter()
                scores = baseline_scores(bundle, ws_cfg["baseline"], ws_cfg.get("params") or {}, seed=seed,
                                         graph=eval_env.unwrapped.graph)
                fit_seconds = time.perf_counter() - t0
                info = behaviour_clone(model, eval_env, np.argsort(-scores, kind="stable"),
                                       epochs=ws_cfg["epochs"], lr=ws_cfg["lr"], batch_size=ws_cfg["batch_size"],
                                       value_coef=ws_cfg["value_coef"], gamma=float(ppo_cfg["gamma"]), seed=seed,
                                       skip_harmful=bool(ws_cfg["skip_harmful"]), max_previews=ws_cfg["max_previews"],
                                       log=log)
                state.warm_start = {"baseline": ws_cfg["baseline"], "baseline_seconds": round(fit_seconds, 2), **info}
                state.eval_env_steps += info["env_steps"]
        status: Dict[str, Any] = {}
        eval_cb = EvalCheckpointCallback(eval_env, run_dir, state, eval_freq=int(eval_cfg["freq"]),
                                         n_episodes=int(eval_cfg["episodes"]), status=status)
        cbs: List = [eval_cb]
        if progress:
            cbs.append(TqdmCallback(status, desc="PPO" if not ws_cfg.get("baseline") else "PPO (warm start)"))
        cbs.extend(callbacks)
        start_steps = int(model.num_timesteps)
        t0 = time.perf_counter()
        remaining = total - start_steps
        try:
            if remaining > 0:
                model.learn(remaining, callback=CallbackList(cbs), reset_num_timesteps=resumed_from is None,
                            tb_log_name="ppo")
            elif not (run_dir / BEST_POLICY).exists():
                eval_cb.init_callback(model)
                eval_cb.num_timesteps = model.num_timesteps
                eval_cb.evaluate()
        except KeyboardInterrupt:
            for cb in cbs:
                if isinstance(cb, TqdmCallback) and cb.bar is not None:
                    cb.bar.close()
            eval_cb.num_timesteps = int(model.num_timesteps)
            eval_cb.checkpoint()
            log(f"\n[onp] interrupted at {model.num_timesteps} env steps; checkpoint saved in {run_dir}. "
                f"Continue with the same command plus --resume")
            raise
        learn_seconds = time.perf_counter() - t0
        state.timesteps = int(model.num_timesteps)
        state.finished = True
        state.save()
    finally:
        try:
            vec_env.close()
        except Exception:  # workers already gone after Ctrl-C
            pass
    return {"eval_env": eval_env, "policy_path": run_dir / BEST_POLICY, "state": state,
            "timesteps": int(model.num_timesteps), "train_env_steps": int(model.num_timesteps) - start_steps,
            "learn_seconds": learn_seconds, "resumed_from": resumed_from}


def load_policy(path, device: str = "cpu"):
    from sb3_contrib import MaskablePPO

    return MaskablePPO.load(path, device=device)

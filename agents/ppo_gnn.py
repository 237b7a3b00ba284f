"""``ppo-gnn``: MaskablePPO with the GNN policy, its training loop for ``onp.train`` and the
behaviour-cloning warm start.

* :class:`PPOGNNAgent` is the agent (``predict``/``learn``/``save``/``load``, as every agent);
* :func:`train_ppo_gnn` is what ``onp.train`` runs: vectorised envs (``DummyVecEnv`` or
  ``SubprocVecEnv``), a deterministic defense-validation episode every ``eval.freq`` env steps
  (learning curve, best policy -> ``policy.pt`` + ``policy.json``), a resumable ``checkpoint.pt`` +
  ``checkpoint.json`` + ``train_state.json`` (also written on Ctrl-C; all pickle-free, see
  :mod:`agents.policy_io`), tensorboard logs in ``tb/`` and a tqdm bar;
* :func:`behaviour_clone` is warm start (c): the GNN policy is pretrained to reproduce a baseline's
  pruning order (states from rolling the order out in the env, targets = the baseline's next
  neuron, cross-entropy on the masked logits, plus a value regression on the returns-to-go) before
  PPO continues from it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Union, cast

import numpy as np
import torch
import torch.nn.functional as F

from onp.train_config import PolicyConfig, PPOConfig, WarmStartConfig

from .base import BaseAgent, LearnResult, register_agent
from .callbacks import EvalCheckpointCallback, TqdmCallback, TrainState
from .gnn_policy import GNNMaskablePolicy, policy_kwargs_for
from .policy_io import POLICY_FILES, has_checkpoint, load_checkpoint_into, load_policy, save_policy
from .vec_envs import EnvFactory, env_kwargs_from_config, make_vec_env

if TYPE_CHECKING:
    import gymnasium as gym
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.vec_env import VecEnv

    from envs import NeuronPruningEnv, PruningSubject
    from onp.zoo import BackdoorBundle


def _unwrapped(env: gym.Env) -> NeuronPruningEnv:
    return cast("NeuronPruningEnv", env.unwrapped)


#: defaults of the ``policy``, ``ppo`` and ``warm_start`` sections: those of :class:`onp.train_config.TrainConfig`
#: (``PPOGNNAgent`` and ``make_ppo`` used directly get no warm start)
POLICY_DEFAULTS: Dict[str, Any] = PolicyConfig().model_dump()
PPO_DEFAULTS: Dict[str, Any] = PPOConfig().model_dump()
WARM_START_DEFAULTS: Dict[str, Any] = {**WarmStartConfig().model_dump(), "baseline": None}
#: keys of the ``ppo`` section that are not MaskablePPO constructor arguments
_NOT_PPO_ARGS = PPOConfig.NOT_PPO_ARGS


def make_ppo(
    vec_env: VecEnv,
    policy_kwargs: Dict[str, Any],
    ppo: Optional[Dict[str, Any]] = None,
    *,
    seed: int = 0,
    device: str = "cpu",
    tensorboard_log: Optional[str] = None,
    verbose: int = 0,
) -> MaskablePPO:
    """A ``MaskablePPO`` with :class:`GNNMaskablePolicy` (``ppo``: the config's ``ppo`` section)."""
    from sb3_contrib import MaskablePPO

    args = {k: v for k, v in {**PPO_DEFAULTS, **(ppo or {})}.items() if k not in _NOT_PPO_ARGS}
    n_steps, batch = int(args["n_steps"]), int(args["batch_size"])
    if n_steps * vec_env.num_envs < 2:
        raise ValueError("ppo.n_steps * n_envs must be >= 2")
    args["batch_size"] = min(batch, n_steps * vec_env.num_envs)
    return MaskablePPO(
        GNNMaskablePolicy,
        vec_env,
        policy_kwargs=policy_kwargs,
        seed=seed,
        device=device,
        tensorboard_log=tensorboard_log,
        verbose=verbose,
        **args,
    )


@register_agent("ppo-gnn")
class PPOGNNAgent(BaseAgent):
    """``ppo-gnn``: MaskablePPO with :class:`GNNMaskablePolicy`, through the agent API like any agent.

    ``learn`` runs :func:`train_ppo_gnn` (warm start, evaluations on defense-validation, resumable
    checkpoints in the run folder) and keeps the best policy; ``save``/``load`` store it as
    ``policy.pt`` + ``policy.json`` (weights only, :mod:`agents.policy_io`).

    Args:
        env: the NeuronPruningEnv the agent acts in (its graph and spaces).
        seed: the agent's seed; device: the policy's device.
        policy: an existing :class:`GNNMaskablePolicy` (e.g. from :meth:`load`).
    """

    learns = True

    def __init__(
        self,
        env: Any = None,
        seed: int = 0,
        device: str = "cpu",
        policy: Optional[GNNMaskablePolicy] = None,
        **params: Any,
    ) -> None:
        super().__init__(env, seed=seed, device=device, **params)
        self.seed, self.device, self.policy = seed, device, policy

    def learn(
        self,
        env: gym.Env,
        config: Dict[str, Any],
        run_dir: Path,
        *,
        resume: bool = False,
        callbacks: Sequence[Any] = (),
        progress: bool = True,
        log: Callable[[str], None] = print,
    ) -> LearnResult:
        bundle = _unwrapped(env).bundles[0]
        out = train_ppo_gnn(
            bundle, config, run_dir, eval_env=env, resume=resume, progress=progress, callbacks=callbacks, log=log
        )
        state = out["state"]
        self.policy = load_policy(run_dir, env, device=self.device)
        warm = state.warm_start or {}
        return LearnResult(
            timesteps=out["timesteps"],
            eval_env_steps=state.eval_env_steps - warm.get("env_steps", 0),
            warm_start_env_steps=warm.get("env_steps", 0),
            seconds=state.train_seconds,
            learning_curve=state.learning_curve,
            info={
                "timesteps": out["timesteps"],
                "best_timesteps": (state.best or {}).get("timesteps"),
                "resumed_from": out["resumed_from"],
                "warm_start": state.warm_start,
            },
        )

    def predict(self, obs: Dict[str, np.ndarray], action_mask: np.ndarray) -> int:
        if self.policy is None:
            raise RuntimeError("ppo-gnn agent has no policy yet: call learn() or load() first")
        return int(self.policy.predict(obs, action_masks=np.asarray(action_mask, dtype=bool), deterministic=True)[0])

    def save(self, run_dir: Path) -> None:
        """Write ``policy.pt`` + ``policy.json`` into ``run_dir`` (no pickle)."""
        if self.policy is None:
            raise RuntimeError("ppo-gnn agent has no policy yet: call learn() first")
        save_policy(self.policy, run_dir)

    @classmethod
    def load(cls, run_dir: Path, env: Any = None, device: str = "cpu") -> PPOGNNAgent:
        """The agent whose policy is stored in ``run_dir``, acting in ``env`` (its graph may be another
        model's of the same architecture)."""
        if env is None:
            raise ValueError("PPOGNNAgent.load needs the env the policy will act in (its graph and spaces)")
        return cls(env, device=device, policy=load_policy(run_dir, env, device=device))


# --------------------------------------------------------------------------------------------------
# behaviour cloning (warm start c)


def _stack_obs(obs_list: Sequence[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    return {k: np.stack([o[k] for o in obs_list]) for k in obs_list[0]}


def demonstrate(
    env: gym.Env,
    order: Union[Sequence[int], np.ndarray],
    *,
    skip_harmful: bool = False,
    max_previews: Optional[int] = None,
) -> Dict[str, Any]:
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
    base = _unwrapped(env)
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


def _returns_to_go(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """``rtg[i] = sum_j>=i gamma^(j-i) rewards[j]`` (float32, like ``rewards``)."""
    rtg = np.zeros_like(rewards)
    acc = 0.0
    for i in range(len(rewards) - 1, -1, -1):
        acc = rewards[i] + gamma * acc
        rtg[i] = acc
    return rtg


def behaviour_clone(
    model: MaskablePPO,
    env: gym.Env,
    order: Union[Sequence[int], np.ndarray],
    *,
    epochs: int = 100,
    lr: float = 3e-3,
    batch_size: int = 32,
    value_coef: float = 0.5,
    gamma: float = 1.0,
    seed: int = 0,
    skip_harmful: bool = False,
    max_previews: Optional[int] = None,
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
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
    rtg = _returns_to_go(np.asarray(demo["rewards"], dtype=np.float32), gamma)
    policy = cast(GNNMaskablePolicy, model.policy)
    obs_tensors, _ = policy.obs_to_tensor(_stack_obs(obs_list))
    obs_t = cast(Dict[str, torch.Tensor], obs_tensors)  # a Dict observation
    mask_t = torch.as_tensor(np.stack(masks), dtype=torch.bool, device=policy.device)
    act_t = torch.as_tensor(actions, device=policy.device)
    rtg_t = torch.as_tensor(rtg, device=policy.device)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = len(actions)
    losses: List[float] = []
    policy.set_training_mode(True)
    for _ in range(int(epochs)):
        perm = torch.randperm(n, generator=gen).to(policy.device)
        total = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
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
    out = {
        "states": n,
        "env_steps": n + demo["previews"],
        "epochs": int(epochs),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "imitation_accuracy": imitation,
        "order_return": order_return,
        "stopped_at_delta": bool(info.get("rejected")),
        "skip_harmful": bool(skip_harmful),
        "previews": demo["previews"],
        "skipped": demo["skipped"],
        "order_val_acc": float(info["acc"]),
        "order_val_asr": float(info["asr"]),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log(
        f"[onp] warm start: cloned {n} steps of the order (val return {order_return:+.4f}, ACC {info['acc']:.3f}, "
        f"ASR {info['asr']:.3f}); loss {out['loss_first']:.3f} -> {out['loss_last']:.3f}, "
        f"imitation accuracy {imitation:.2f}"
    )
    return out


# --------------------------------------------------------------------------------------------------
# the training loop of onp.train


def _warm_start(
    model: MaskablePPO,
    bundle: Union[BackdoorBundle, PruningSubject],
    eval_env: gym.Env,
    ws_cfg: Dict[str, Any],
    *,
    gamma: float,
    seed: int,
    log: Callable[[str], None],
) -> Dict[str, Any]:
    """Warm start (c): fit the ``warm_start.baseline`` defense and clone its pruning order into
    ``model``'s policy (:func:`behaviour_clone`); returns what ``train_state.json`` keeps of it."""
    from .heuristics import baseline_scores

    log(f"[onp] warm start: fitting baseline {ws_cfg['baseline']!r} on the defense data to clone its pruning order")
    t0 = time.perf_counter()
    scores = baseline_scores(
        bundle, ws_cfg["baseline"], ws_cfg.get("params") or {}, seed=seed, graph=_unwrapped(eval_env).graph
    )
    fit_seconds = time.perf_counter() - t0
    info = behaviour_clone(
        model,
        eval_env,
        np.argsort(-scores, kind="stable"),
        epochs=ws_cfg["epochs"],
        lr=ws_cfg["lr"],
        batch_size=ws_cfg["batch_size"],
        value_coef=ws_cfg["value_coef"],
        gamma=gamma,
        seed=seed,
        skip_harmful=bool(ws_cfg["skip_harmful"]),
        max_previews=ws_cfg["max_previews"],
        log=log,
    )
    return {"baseline": ws_cfg["baseline"], "baseline_seconds": round(fit_seconds, 2), **info}


def train_ppo_gnn(
    bundle: Union[BackdoorBundle, PruningSubject],
    config: Dict[str, Any],
    run_dir: Path,
    *,
    eval_env: Optional[gym.Env] = None,
    resume: bool = False,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Train MaskablePPO + GNN on ``bundle`` as configured (see ``configs/train/default.yaml``).

    Returns ``{"eval_env", "policy_dir" (holds policy.pt + policy.json), "state" (TrainState), "timesteps",
    "train_seconds", "train_env_steps", "resumed_from"}``; the caller closes ``eval_env``.
    """
    from stable_baselines3.common.callbacks import CallbackList

    run_dir = Path(run_dir)
    ppo_cfg = {**PPO_DEFAULTS, **config.get("ppo", {})}
    pol_cfg = {**POLICY_DEFAULTS, **config.get("policy", {})}
    ws_cfg = {**WARM_START_DEFAULTS, **(config.get("warm_start") or {})}
    eval_cfg = {"freq": 256, "episodes": 1, **config.get("eval", {})}
    seed, device = int(config.get("seed", 0)), config.get("device", "cpu")
    env_kwargs = env_kwargs_from_config(config["env"], config.get("cache_dir"))
    factory = EnvFactory(bundle, env_kwargs, seed=seed, threads=ppo_cfg.get("env_threads"))
    if eval_env is None:  # the defense-validation env (deterministic episodes, the warm start's demonstration)
        eval_env = EnvFactory(bundle, env_kwargs, seed=seed, monitor=False)()
    vec_env = make_vec_env(factory, int(ppo_cfg["n_envs"]), ppo_cfg["vec_env"])
    total = int(ppo_cfg["total_timesteps"])
    state = TrainState.load(run_dir) if resume else TrainState(run_dir)
    resumed_from = None
    try:
        if resume and has_checkpoint(run_dir):
            model = make_ppo(
                vec_env,
                policy_kwargs_for(eval_env, **pol_cfg),
                ppo_cfg,
                seed=seed,
                device=device,
                tensorboard_log=str(run_dir / "tb"),
            )
            resumed_from = load_checkpoint_into(model, run_dir)
            log(f"[onp] resuming from {run_dir / 'checkpoint.pt'} at {resumed_from} / {total} env steps")
        else:
            if resume:
                log(f"[onp] --resume: no checkpoint in {run_dir}; starting from scratch")
                state = TrainState(run_dir)
            model = make_ppo(
                vec_env,
                policy_kwargs_for(eval_env, **pol_cfg),
                ppo_cfg,
                seed=seed,
                device=device,
                tensorboard_log=str(run_dir / "tb"),
            )
            if ws_cfg.get("baseline"):
                state.warm_start = _warm_start(
                    model, bundle, eval_env, ws_cfg, gamma=float(ppo_cfg["gamma"]), seed=seed, log=log
                )
                state.eval_env_steps += state.warm_start["env_steps"]
        status: Dict[str, Any] = {}
        eval_cb = EvalCheckpointCallback(
            eval_env,
            run_dir,
            state,
            eval_freq=int(eval_cfg["freq"]),
            n_episodes=int(eval_cfg["episodes"]),
            status=status,
        )
        cbs: List = [eval_cb]
        if progress:
            cbs.append(TqdmCallback(status, desc="PPO" if not ws_cfg.get("baseline") else "PPO (warm start)"))
        cbs.extend(callbacks)
        start_steps = int(model.num_timesteps)
        t0 = time.perf_counter()
        remaining = total - start_steps
        try:
            if remaining > 0:
                model.learn(
                    remaining, callback=CallbackList(cbs), reset_num_timesteps=resumed_from is None, tb_log_name="ppo"
                )
            elif not all((run_dir / name).exists() for name in POLICY_FILES):
                eval_cb.init_callback(model)
                eval_cb.num_timesteps = model.num_timesteps
                eval_cb.evaluate()
        except KeyboardInterrupt:
            for cb in cbs:
                if isinstance(cb, TqdmCallback) and cb.bar is not None:
                    cb.bar.close()
            eval_cb.num_timesteps = int(model.num_timesteps)
            eval_cb.checkpoint()
            log(
                f"\n[onp] interrupted at {model.num_timesteps} env steps; checkpoint saved in {run_dir}. "
                f"Continue with the same command plus --resume"
            )
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
    return {
        "eval_env": eval_env,
        "policy_dir": run_dir,
        "state": state,
        "timesteps": int(model.num_timesteps),
        "train_env_steps": int(model.num_timesteps) - start_steps,
        "learn_seconds": learn_seconds,
        "resumed_from": resumed_from,
    }

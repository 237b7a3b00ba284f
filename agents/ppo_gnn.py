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

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, cast

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
    model = MaskablePPO(
        GNNMaskablePolicy,
        vec_env,
        policy_kwargs=policy_kwargs,
        seed=seed,
        device=device,
        tensorboard_log=tensorboard_log,
        verbose=verbose,
        **args,
    )
    if tensorboard_log is None:  # else SB3's learn() leaves an empty /tmp/SB3-<time> folder behind, every call
        from stable_baselines3.common.logger import HumanOutputFormat, Logger

        model.set_logger(Logger(folder=None, output_formats=[HumanOutputFormat(sys.stdout)] if verbose else []))
    return model


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
        out = train_ppo_gnn(
            list(_unwrapped(env).bundles),
            config,
            run_dir,
            eval_env=env,
            resume=resume,
            progress=progress,
            callbacks=callbacks,
            log=log,
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
    options: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """One episode of ``env`` that prunes along ``order`` (a node priority list): the demonstration
    that :func:`behaviour_clone` imitates (``options``: of the env's reset, e.g. ``{"model_index": i}``
    in multi-model mode).

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
    obs, info = env.reset(options=options)
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


@dataclass
class _Demonstration:
    """A demonstrated rollout as tensors on the policy's device: the visited states, their action
    masks, the demonstrated actions and the returns-to-go."""

    obs: Dict[str, torch.Tensor]
    mask: torch.Tensor
    actions: torch.Tensor
    rtg: torch.Tensor

    def __len__(self) -> int:
        return len(self.actions)


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
    ``max_previews``); each visited state's target is the action demonstrated there
    (:func:`clone_demonstrations`). Returns diagnostics (losses, final imitation accuracy, env steps
    used, previews included).
    """
    t0 = time.perf_counter()
    demo = demonstrate(env, order, skip_harmful=skip_harmful, max_previews=max_previews)
    fit = clone_demonstrations(model, [demo], CloneSettings(epochs, lr, batch_size, value_coef, gamma, seed))
    out = {
        **fit,
        **demonstration_record(demo),
        "skip_harmful": bool(skip_harmful),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log(
        f"[onp] warm start: cloned {out['states']} steps of the order (val return {out['order_return']:+.4f}, "
        f"ACC {out['order_val_acc']:.3f}, ASR {out['order_val_asr']:.3f}); {_fit_summary(out)}"
    )
    return out


def _fit_summary(fit: Dict[str, Any]) -> str:
    """``loss a -> b, imitation accuracy c`` of a :func:`clone_demonstrations` record."""
    if fit["loss_first"] is None:
        return f"no epochs, imitation accuracy {fit['imitation_accuracy']:.2f}"
    return f"loss {fit['loss_first']:.3f} -> {fit['loss_last']:.3f}, imitation accuracy {fit['imitation_accuracy']:.2f}"


def demonstration_record(demo: Dict[str, Any]) -> Dict[str, Any]:
    """What ``train_state.json`` keeps of one :func:`demonstrate` rollout (its return, end state, previews)."""
    info = demo["info"]
    return {
        "env_steps": len(demo["actions"]) + demo["previews"],
        "order_return": float(sum(demo["rewards"])),
        "stopped_at_delta": bool(info.get("rejected")),
        "previews": demo["previews"],
        "skipped": demo["skipped"],
        "order_val_acc": float(info["acc"]),
        "order_val_asr": float(info["asr"]),
    }


@dataclass(frozen=True)
class CloneSettings:
    """How :func:`clone_demonstrations` fits: Adam at ``lr`` for ``epochs`` passes in minibatches of
    ``batch_size`` (shuffled by ``seed``), the value loss weighted by ``value_coef``, returns-to-go
    discounted by ``gamma``."""

    epochs: int = 100
    lr: float = 3e-3
    batch_size: int = 32
    value_coef: float = 0.5
    gamma: float = 1.0
    seed: int = 0


def clone_demonstrations(
    model: MaskablePPO, demos: Sequence[Dict[str, Any]], settings: CloneSettings = CloneSettings()
) -> Dict[str, Any]:
    """Fit ``model.policy`` to the states and actions of :func:`demonstrate` rollouts, pooled (one
    rollout per model of a multi-model env, or one). Loss: cross-entropy on the masked logits +
    ``value_coef`` * MSE of the value on each rollout's returns-to-go. Returns ``states``, ``epochs``,
    the first and last epoch's loss and the final imitation accuracy over all states."""
    policy = cast(GNNMaskablePolicy, model.policy)
    tensors = _concat([_demonstration_tensors(policy, d, settings.gamma) for d in demos])
    losses = _clone_epochs(policy, tensors, settings)
    return {
        "states": len(tensors),
        "epochs": int(settings.epochs),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "imitation_accuracy": _imitation_accuracy(policy, tensors),
    }


def _concat(demos: Sequence[_Demonstration]) -> _Demonstration:
    """Several demonstrations' tensors as one."""
    if len(demos) == 1:
        return demos[0]
    return _Demonstration(
        {k: torch.cat([d.obs[k] for d in demos]) for k in demos[0].obs},
        torch.cat([d.mask for d in demos]),
        torch.cat([d.actions for d in demos]),
        torch.cat([d.rtg for d in demos]),
    )


def _demonstration_tensors(policy: GNNMaskablePolicy, demo: Dict[str, Any], gamma: float) -> _Demonstration:
    """:func:`demonstrate`'s rollout as the tensors that :func:`behaviour_clone` fits."""
    actions = np.asarray(demo["actions"], dtype=np.int64)
    rtg = _returns_to_go(np.asarray(demo["rewards"], dtype=np.float32), gamma)
    obs_tensors, _ = policy.obs_to_tensor(_stack_obs(demo["obs"]))
    obs_t = cast(Dict[str, torch.Tensor], obs_tensors)  # a Dict observation
    mask_t = torch.as_tensor(np.stack(demo["masks"]), dtype=torch.bool, device=policy.device)
    act_t = torch.as_tensor(actions, device=policy.device)
    rtg_t = torch.as_tensor(rtg, device=policy.device)
    return _Demonstration(obs_t, mask_t, act_t, rtg_t)


def _clone_epochs(policy: GNNMaskablePolicy, demo: _Demonstration, settings: CloneSettings) -> List[float]:
    """Adam on the masked cross-entropy + ``value_coef`` * the value MSE, minibatches shuffled by a
    generator seeded with ``seed``; returns each epoch's mean loss (the policy is left in eval mode)."""
    epochs, batch_size, value_coef = settings.epochs, settings.batch_size, settings.value_coef
    opt = torch.optim.Adam(policy.parameters(), lr=settings.lr)
    gen = torch.Generator().manual_seed(settings.seed)
    n = len(demo)
    losses: List[float] = []
    policy.set_training_mode(True)
    for _ in range(int(epochs)):
        perm = torch.randperm(n, generator=gen).to(policy.device)
        total = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            nodes, pooled = policy._encode({k: v[idx] for k, v in demo.obs.items()})
            logits = policy.action_net(nodes, pooled).masked_fill(~demo.mask[idx], -1e9)
            values = policy.value_net(pooled).squeeze(-1)
            loss = F.cross_entropy(logits, demo.actions[idx]) + value_coef * F.mse_loss(values, demo.rtg[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / n)
    policy.set_training_mode(False)
    return losses


def _imitation_accuracy(policy: GNNMaskablePolicy, demo: _Demonstration) -> float:
    """The share of the demonstrated states where the policy's most likely valid action is the demonstrated one."""
    with torch.no_grad():
        nodes, pooled = policy._encode(demo.obs)
        pred = policy.action_net(nodes, pooled).masked_fill(~demo.mask, -1e9).argmax(1)
        return float((pred == demo.actions).float().mean())


# --------------------------------------------------------------------------------------------------
# the training loop of onp.train


def _warm_start(
    model: MaskablePPO,
    bundles: Sequence[Union[BackdoorBundle, PruningSubject]],
    eval_env: gym.Env,
    ws_cfg: Dict[str, Any],
    *,
    gamma: float,
    seed: int,
    log: Callable[[str], None],
) -> Dict[str, Any]:
    """Warm start (c): fit the ``warm_start.baseline`` defense on each model, demonstrate its pruning
    order on that model (:func:`demonstrate`; in ``eval_env``'s multi-model mode, one per model) and
    clone the demonstrations into ``model``'s policy together (:func:`clone_demonstrations`); returns
    what ``train_state.json`` keeps (with several models, each demonstration under ``models``)."""
    demos, records, fit_seconds, t0 = [], [], 0.0, time.perf_counter()
    for i, bundle in enumerate(bundles):
        t_fit = time.perf_counter()
        order = _baseline_order(bundle, eval_env, ws_cfg, seed=seed, index=i, log=log)
        fit_seconds += time.perf_counter() - t_fit
        demo = demonstrate(
            eval_env,
            order,
            skip_harmful=bool(ws_cfg["skip_harmful"]),
            max_previews=ws_cfg["max_previews"],
            options={"model_index": i},
        )
        demos.append(demo)
        records.append({"model": demo["info"]["model"], **demonstration_record(demo)})
    settings = CloneSettings(ws_cfg["epochs"], ws_cfg["lr"], ws_cfg["batch_size"], ws_cfg["value_coef"], gamma, seed)
    fit = clone_demonstrations(model, demos, settings)
    out = {
        "baseline": ws_cfg["baseline"],
        "baseline_seconds": round(fit_seconds, 2),
        **fit,
        "skip_harmful": bool(ws_cfg["skip_harmful"]),
        "seconds": round(time.perf_counter() - t0 - fit_seconds, 2),  # demonstrating and cloning
    }
    if len(records) == 1:
        out.update({k: v for k, v in records[0].items() if k != "model"})
        log(
            f"[onp] warm start: cloned {out['states']} steps of the order (val return {out['order_return']:+.4f}, "
            f"ACC {out['order_val_acc']:.3f}, ASR {out['order_val_asr']:.3f}); {_fit_summary(out)}"
        )
        return out
    log(f"[onp] warm start: cloned {fit['states']} steps of {len(demos)} models' orders; {_fit_summary(fit)}")
    return {
        **out,
        "env_steps": sum(r["env_steps"] for r in records),
        "order_return": float(np.mean([r["order_return"] for r in records])),
        "models": records,
    }


def _baseline_order(
    bundle: Union[BackdoorBundle, PruningSubject],
    eval_env: gym.Env,
    ws_cfg: Dict[str, Any],
    *,
    seed: int,
    index: int,
    log: Callable[[str], None],
) -> np.ndarray:
    """The ``warm_start.baseline``'s pruning order (highest score first) on ``bundle``, the env's
    model ``index``, fitted on its defense data."""
    from .heuristics import subject_scores

    name = getattr(bundle, "name", None) or getattr(getattr(bundle, "path", None), "name", "the model")
    log(
        f"[onp] warm start: fitting baseline {ws_cfg['baseline']!r} on {name}'s defense data to clone its pruning order"
    )
    graph = _unwrapped(eval_env).targets[index].graph
    scores = subject_scores(bundle, ws_cfg["baseline"], ws_cfg.get("params") or {}, seed=seed, graph=graph)
    return np.argsort(-scores, kind="stable")


@dataclass
class _PPOSetup:
    """What the parts of :func:`train_ppo_gnn` share: the run folder, the ``ppo``, ``policy``,
    ``warm_start`` and ``eval`` sections with their defaults filled in, seed, device and logger."""

    run_dir: Path
    ppo: Dict[str, Any]
    policy: Dict[str, Any]
    warm_start: Dict[str, Any]
    eval: Dict[str, Any]
    seed: int
    device: str
    log: Callable[[str], None]

    @classmethod
    def of(cls, config: Dict[str, Any], run_dir: Path, log: Callable[[str], None]) -> _PPOSetup:
        return cls(
            run_dir=run_dir,
            ppo={**PPO_DEFAULTS, **config.get("ppo", {})},
            policy={**POLICY_DEFAULTS, **config.get("policy", {})},
            warm_start={**WARM_START_DEFAULTS, **(config.get("warm_start") or {})},
            eval={"freq": 256, "episodes": 1, **config.get("eval", {})},
            seed=int(config.get("seed", 0)),
            device=config.get("device", "cpu"),
            log=log,
        )


def train_ppo_gnn(
    bundle: Union[BackdoorBundle, PruningSubject, Sequence[Union[BackdoorBundle, PruningSubject]]],
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

    ``bundle`` may be a list of models of one architecture (multi-model mode): the envs sample one per episode,
    the warm start clones each model's demonstration and every evaluation runs one episode per model
    (the mean return picks the best policy).

    Returns ``{"eval_env", "policy_dir" (holds policy.pt + policy.json), "state" (TrainState), "timesteps",
    "train_seconds", "train_env_steps", "resumed_from"}``; the caller closes ``eval_env``.
    """
    run_dir = Path(run_dir)
    setup = _PPOSetup.of(config, run_dir, log)
    env_kwargs = env_kwargs_from_config(config["env"], config.get("cache_dir"))
    bundles: List[Union[BackdoorBundle, PruningSubject]] = (
        list(bundle) if isinstance(bundle, (list, tuple)) else [cast(Union["BackdoorBundle", "PruningSubject"], bundle)]
    )
    factory = EnvFactory(bundles, env_kwargs, seed=setup.seed, threads=setup.ppo.get("env_threads"))
    if eval_env is None:  # the defense-validation env (deterministic episodes, the warm start's demonstration)
        eval_env = EnvFactory(bundles, env_kwargs, seed=setup.seed, monitor=False)()
    vec_env = make_vec_env(factory, int(setup.ppo["n_envs"]), setup.ppo["vec_env"])
    total = int(setup.ppo["total_timesteps"])
    state = TrainState.load(run_dir) if resume else TrainState(run_dir)
    try:
        model, state, resumed_from = _model_to_train(
            setup, vec_env, eval_env, bundles, state, resume=resume, total=total
        )
        eval_cb, cbs = _callbacks(setup, eval_env, state, progress=progress, extra=callbacks)
        start_steps = int(model.num_timesteps)
        t0 = time.perf_counter()
        _learn_remaining(setup, model, eval_cb, cbs, remaining=total - start_steps, resumed_from=resumed_from)
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


def _model_to_train(
    setup: _PPOSetup,
    vec_env: VecEnv,
    eval_env: gym.Env,
    bundles: Sequence[Union[BackdoorBundle, PruningSubject]],
    state: TrainState,
    *,
    resume: bool,
    total: int,
) -> Tuple[MaskablePPO, TrainState, Optional[int]]:
    """The MaskablePPO to train, with the train state and the env step it resumes from (None: a new
    model, warm-started when ``warm_start.baseline`` is set). ``resume`` without a checkpoint starts
    from scratch with a fresh train state."""
    run_dir, log = setup.run_dir, setup.log
    resumed_from = None
    if resume and has_checkpoint(run_dir):
        model = _new_model(setup, vec_env, eval_env)
        resumed_from = load_checkpoint_into(model, run_dir)
        log(f"[onp] resuming from {run_dir / 'checkpoint.pt'} at {resumed_from} / {total} env steps")
    else:
        if resume:
            log(f"[onp] --resume: no checkpoint in {run_dir}; starting from scratch")
            state = TrainState(run_dir)
        model = _new_model(setup, vec_env, eval_env)
        ws_cfg = setup.warm_start
        if ws_cfg.get("baseline"):
            state.warm_start = _warm_start(
                model, bundles, eval_env, ws_cfg, gamma=float(setup.ppo["gamma"]), seed=setup.seed, log=log
            )
            state.eval_env_steps += state.warm_start["env_steps"]
    return model, state, resumed_from


def _callbacks(
    setup: _PPOSetup, eval_env: gym.Env, state: TrainState, *, progress: bool, extra: Sequence[Any]
) -> Tuple[EvalCheckpointCallback, List]:
    """The callbacks of ``model.learn``: the periodic evaluation + checkpoint, the progress bar (with
    ``progress``), then the caller's ``extra`` ones."""
    status: Dict[str, Any] = {}
    eval_cb = EvalCheckpointCallback(
        eval_env,
        setup.run_dir,
        state,
        eval_freq=int(setup.eval["freq"]),
        n_episodes=int(setup.eval["episodes"]),
        status=status,
    )
    cbs: List = [eval_cb]
    if progress:
        cbs.append(TqdmCallback(status, desc="PPO" if not setup.warm_start.get("baseline") else "PPO (warm start)"))
    cbs.extend(extra)
    return eval_cb, cbs


def _new_model(setup: _PPOSetup, vec_env: VecEnv, eval_env: gym.Env) -> MaskablePPO:
    """A new MaskablePPO + GNN policy on ``vec_env`` (the graph of ``eval_env``), logging to ``<run>/tb``."""
    return make_ppo(
        vec_env,
        policy_kwargs_for(eval_env, **setup.policy),
        setup.ppo,
        seed=setup.seed,
        device=setup.device,
        tensorboard_log=str(setup.run_dir / "tb"),
    )


def _learn_remaining(
    setup: _PPOSetup,
    model: MaskablePPO,
    eval_cb: EvalCheckpointCallback,
    cbs: List,
    *,
    remaining: int,
    resumed_from: Optional[int],
) -> None:
    """Train the ``remaining`` env steps (none left and no saved policy: evaluate once, which saves it).
    Ctrl-C closes the progress bar, writes a checkpoint and re-raises."""
    from stable_baselines3.common.callbacks import CallbackList

    try:
        if remaining > 0:
            model.learn(
                remaining, callback=CallbackList(cbs), reset_num_timesteps=resumed_from is None, tb_log_name="ppo"
            )
        elif not all((setup.run_dir / name).exists() for name in POLICY_FILES):
            if getattr(model, "_logger", None) is None:  # learn() never ran, so SB3 configured no logger yet
                from stable_baselines3.common.logger import Logger

                model.set_logger(Logger(folder=None, output_formats=[]))
            eval_cb.init_callback(model)
            eval_cb.num_timesteps = model.num_timesteps
            eval_cb.evaluate()
    except KeyboardInterrupt:
        for cb in cbs:
            if isinstance(cb, TqdmCallback) and cb.bar is not None:
                cb.bar.close()
        eval_cb.num_timesteps = int(model.num_timesteps)
        eval_cb.checkpoint()
        setup.log(
            f"\n[onp] interrupted at {model.num_timesteps} env steps; checkpoint saved in {setup.run_dir}. "
            f"Continue with the same command plus --resume"
        )
        raise

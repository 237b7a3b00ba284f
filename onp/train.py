"""``python -m onp.train``: learn to prune a backdoored CNN (MaskablePPO + GNN policy) and report.

Examples::

    python -m onp.train --model resnet18                       # the default profile (CPU, <= 20 min)
    python -m onp.train --warm-start rnp                        # behaviour-clone RNP's order (default: CLP's)
    python -m onp.train --warm-start none                       # a cold start: PPO from scratch
    python -m onp.train --agent greedy-activation               # a heuristic agent at the same budget
    python -m onp.train --agent my_agents.py:MyAgent --set agent_params.k=3
    python -m onp.train --config configs/paper/resnet18_cifar10_badnets.yaml --device cuda

Steps: (1) get or train the backdoored model through the zoo (cached); (2) build the
``NeuronPruningEnv`` (its reward batch is the defender's validation split); (3) train the agent
(PPO: progress bar, tensorboard logs in ``<run>/tb``, a deterministic defense-validation episode
every ``eval.freq`` steps, best policy kept in ``policy.pt`` + ``policy.json``, resumable checkpoint); (4) run the best
policy deterministically, keep its pruning by the evidence rule (and, with a trigger-agnostic ASR
estimator, only if the backdoor verdict suspects a backdoor or ``--force``), write it into a fresh copy of the model and
fine-tune that on defense-train (``rollout.finetune``); (5) report ACC / ASR /
RA / DER on the held-out test set before and after. Nothing is chosen on test data.

Configuration: ``configs/train/default.yaml`` documents every key; ``--config FILE`` is merged on top
of the defaults, then the flags, then ``--set dotted.key=value`` (a key of the training config). The
backdoored-model flags (``--model --dataset --attack --width --epochs --seed --data-source --data-dir
--defense-size --max-train --backdoor-set KEY=VALUE --checkpoint --cache-dir``) are the ones every
onp tool shares (:func:`onp.cli_common.add_backdoor_flags`); they set ``backdoor.*``. ``--seed`` sets
both the backdoored model's seed and the agent's (as in ``onp.baseline``); ``--agent-seed`` sets only
the agent's. ``--list`` (alias ``--list-agents``) lists the agents.

The run directory (default ``runs/train/<model>-<attack>-<agent>-s<seed>``) follows
:mod:`onp.rundir` plus ``policy.pt`` + ``policy.json``, ``learning_curve.json``, ``tb/``,
``checkpoint.pt`` + ``checkpoint.json`` and ``train_state.json`` (no pickle anywhere). Ctrl-C leaves
a checkpoint; the same command (or ``--resume``) continues from it.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, cast

import torch

from .backdoor_verdict import FORCE_HINT, Verdict, backdoor_verdict, no_backdoor_reason
from .cli_common import (
    add_backdoor_flags,
    add_list_flag,
    add_set_flag,
    backdoor_overrides,
    model_source,
    nest_dotted,
    path_arg,
    print_listing,
    run_cli,
    set_overrides,
)
from .config import deep_update, load_yaml
from .data.augment import Augment
from .io import RunExistsError, atomic_write_json, is_onp_folder, read_json, run_folder
from .masks import apply_pruning
from .metrics import evaluate_backdoor, with_der
from .registry import UnknownNameError
from .rundir import RunResult, reproduce_line, write_run
from .train_config import RolloutConfig, TrainConfig

if TYPE_CHECKING:
    from envs import NeuronPruningEnv

    from .zoo import BackdoorBundle

#: The default profile as a plain dict: :class:`onp.train_config.TrainConfig`'s defaults, the single
#: source (``configs/train/default.yaml`` spells out the same values).
DEFAULT_CONFIG: Dict[str, Any] = TrainConfig().to_dict()
#: config keys that may differ when resuming a run
RESUMABLE_CHANGES = ("ppo.total_timesteps", "device", "torch_threads", "cache_dir", "data_dir", "deterministic")
#: files whose presence in a run folder means it holds a resumable training checkpoint
TRAIN_CHECKPOINTS = ("train_state.json", "checkpoint.pt", "checkpoint.json", "checkpoint.zip")


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k not in ("estimator_params", "params", "agent_params", "attack_params"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resolve_config(config: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The defaults merged with ``config`` (:class:`TrainConfig`: types and ranges), then every name
    (agent, ASR estimator, feature providers, warm-start baseline) looked up in its registry, all
    before any model is loaded. Returns the resolved config as a plain dict (``config.json``)."""
    cfg = TrainConfig.from_dict(config).to_dict()
    if cfg["checkpoint"]:  # an existing model folder: its own backdoor config is the run's
        from .zoo import model_config

        cfg["backdoor"] = model_config(cfg["checkpoint"]).resolved().to_dict()
    import baselines
    from envs import ASR_ESTIMATORS, ensure_feature_providers

    ASR_ESTIMATORS.check(cfg["env"]["asr_estimator"])
    ensure_feature_providers(cfg["env"]["feature_providers"])  # registers the score-based ones (clp_score, ...)
    from agents import resolve_agent_factory

    resolve_agent_factory(cfg["agent"])  # fail early on an unknown / malformed agent (ranked:<baseline> too)
    if cfg["warm_start"]["baseline"]:
        try:
            baselines.DEFENSES.check(cfg["warm_start"]["baseline"])
        except UnknownNameError as exc:  # the same error, naming the key it came from
            exc.args = (f"warm_start.baseline: {exc}",)
            raise
    return cfg


def default_run_dir(cfg: Dict[str, Any]) -> Path:
    from agents import agent_label

    b = cfg["backdoor"]
    label = agent_label(cfg["agent"])
    if cfg["warm_start"].get("baseline"):
        label += f"-bc-{cfg['warm_start']['baseline']}"
    if cfg.get("multi_model"):
        label += f"-multi{len(cfg['multi_model']) + 1}"
    attack = "clean" if b.get("clean") else b["attack"]
    return Path("runs") / "train" / f"{b['model']}-{attack}-{label}-s{cfg['seed']}"


def _resume_config_diff(run_dir: Path, cfg: Dict[str, Any]) -> List[str]:
    """The config keys (other than :data:`RESUMABLE_CHANGES`) where ``cfg`` differs from the run's."""
    path = run_dir / "config.json"
    if not path.exists():
        return []
    old, new = _flatten(read_json(path)), _flatten(cfg)
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)


def _check_resume_config(run_dir: Path, cfg: Dict[str, Any]) -> None:
    path = run_dir / "config.json"
    diff = _resume_config_diff(run_dir, cfg)
    if diff:
        raise ValueError(
            f"--resume: the configuration differs from the one in {path} at {', '.join(diff)}; "
            f"use the same settings (only {', '.join(RESUMABLE_CHANGES)} may change) or --overwrite"
        )


def _count_neurons(b: Dict[str, Any]) -> int:
    from .data import DATASETS
    from .models import build_model_for

    model = build_model_for(b["model"], DATASETS.get(b["dataset"]).spec, b["width"])
    return sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def _budget_count(budget: float, n: int) -> int:
    k = int(round(budget * n)) if budget < 1 else int(budget)
    return max(1, min(k, n))


def _load_bundle(cfg: Dict[str, Any], log: Callable[[str], None], progress: bool) -> "BackdoorBundle":
    """Load (or train) the backdoored model; print the header lines first."""
    from .zoo import BackdoorConfig, load_bundle, open_bundle

    bcfg = BackdoorConfig.from_dict(cfg["backdoor"])
    cache_dir, data_dir = cfg.get("cache_dir"), cfg.get("data_dir")
    try:
        bundle = (
            open_bundle(cfg["checkpoint"], data_dir=data_dir)
            if cfg.get("checkpoint")
            else load_bundle(bcfg, cache_dir=cache_dir, data_dir=data_dir, progress=False, train_if_missing=False)
        )
        source, cached = bundle.meta.get("data_source"), True
    except FileNotFoundError:
        from .data import load_dataset

        bundle, cached = None, False
        source = load_dataset(bcfg.dataset, data_dir=data_dir, source=bcfg.data_source).source
    b, e = cfg["backdoor"], cfg["env"]
    n = _count_neurons(b)
    k = _budget_count(float(e["budget"]), n)
    trig = e["asr_estimator"] == "trigger"
    log(
        f"[onp] data: {b['dataset']} from {source}  |  model: {b['model']} width {b['width']} ({n} neurons)  |  "
        f"attack: {'clean (no attack)' if b.get('clean') else b['attack']}"
    )
    log(
        f"[onp] ASR estimator: {e['asr_estimator']}"
        + ("  (TRIGGER-AWARE: uses the real trigger)" if trig else "  (trigger-agnostic)")
        + f"  |  budget: {k} neurons ({100.0 * k / n:.1f}%)  |  lam {e['lam']}  delta {e['delta']}  |  "
        f"agent: {cfg['agent']}"
        + (f" + warm start from {cfg['warm_start']['baseline']}" if cfg["warm_start"].get("baseline") else "")
    )
    if not cached:
        log("[onp] the backdoored model is not cached yet: training it first (once)")
        bundle = load_bundle(
            bcfg, cache_dir=cache_dir, data_dir=data_dir, progress=progress, device=cfg.get("device", "cpu")
        )
    else:
        assert bundle is not None
        log(f"[onp] using cached model {bundle.path}")
    return bundle


def run_training(
    config: Union[TrainConfig, Dict[str, Any], None] = None,
    out_dir: Union[str, Path, None] = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    quiet: bool = False,
    callbacks: Sequence[Any] = (),
    command: Optional[str] = None,
) -> RunResult:
    """Train (or run) an agent as configured and write the run directory; return its
    :class:`~onp.rundir.RunResult` (the run folder and ``metrics.json``).

    Args:
        config: a :class:`TrainConfig`, or a (partial, nested) mapping merged onto its defaults.
        out_dir: the run directory (default :func:`default_run_dir`).
        overwrite / resume: reuse an existing non-empty run directory (see module doc).
        progress: show progress bars; quiet: print only the final summary line.
        callbacks: extra SB3 callbacks for PPO training.
        command: the reproduce line written to README.md.
    """
    threads = torch.get_num_threads()
    try:
        return _run_training(
            config,
            out_dir,
            overwrite=overwrite,
            resume=resume,
            progress=progress,
            quiet=quiet,
            callbacks=callbacks,
            command=command,
        )
    finally:
        torch.set_num_threads(threads)  # torch_threads applies to this run only


def _resumes_automatically(run_dir: Path, cfg: Dict[str, Any], *, overwrite: bool, resume: bool, quiet: bool) -> bool:
    """Whether to continue ``run_dir``: ``--resume``, or an interrupted onp.train run there (a
    checkpoint, no metrics.json) whose configuration ``--resume`` would accept: the identical
    command resumes it. With another configuration the call is refused (pass --overwrite)."""
    if (
        resume
        or overwrite
        or not is_onp_folder(run_dir)
        or (run_dir / "metrics.json").exists()
        or not any((run_dir / name).exists() for name in TRAIN_CHECKPOINTS)
    ):
        return resume
    diff = _resume_config_diff(run_dir, cfg)
    if diff:
        raise RunExistsError(
            f"{run_dir} holds an interrupted onp.train run with another configuration (differing: "
            f"{', '.join(diff)}); pass --overwrite to start again (the old run is kept until the "
            f"new one succeeds) or choose another --out"
        )
    if not quiet:
        print(
            f"[onp] {run_dir} holds an interrupted run of this configuration: resuming it "
            f"(pass --overwrite to start again)",
            flush=True,
        )
    return True


def _run_training(
    config: Union[TrainConfig, Dict[str, Any], None],
    out_dir: Union[str, Path, None],
    *,
    overwrite: bool,
    resume: bool,
    progress: bool,
    quiet: bool,
    callbacks: Sequence[Any],
    command: Optional[str],
) -> RunResult:
    """Open the run folder (:func:`onp.io.run_folder`) and train into it.

    A missing or empty ``out_dir`` is created; a failed run removes it again unless it holds a
    checkpoint (Ctrl-C keeps it: the identical command, or ``--resume``, continues it). A finished run
    is replaced only with ``overwrite``, and only once the new run has succeeded (it trains in a
    hidden staging folder next to it). An unfinished run without a checkpoint is replaced.
    """
    t_start = time.perf_counter()
    cfg = resolve_config(config.to_dict() if isinstance(config, TrainConfig) else config)
    final_dir = Path(out_dir) if out_dir is not None else default_run_dir(cfg)
    resume = _resumes_automatically(final_dir, cfg, overwrite=overwrite, resume=resume, quiet=quiet)
    with run_folder(
        final_dir, tool="onp.train", overwrite=overwrite, resume=resume, resumable=TRAIN_CHECKPOINTS
    ) as run_dir:
        if resume:
            _check_resume_config(run_dir, cfg)
        try:
            metrics = _train_into(
                cfg,
                run_dir,
                final_dir=final_dir,
                t_start=t_start,
                resume=resume,
                progress=progress,
                quiet=quiet,
                callbacks=callbacks,
                command=command,
            )
            return RunResult(final_dir, metrics)
        except KeyboardInterrupt:
            if run_dir != final_dir:  # the staging folder of --overwrite: deleted, the old run stays
                print(
                    f"[onp] the interrupted --overwrite run is discarded; {final_dir} still holds the previous run",
                    file=sys.stderr,
                    flush=True,
                )
            raise


def _train_into(
    cfg: Dict[str, Any],
    run_dir: Path,
    *,
    final_dir: Path,
    t_start: float,
    resume: bool,
    progress: bool,
    quiet: bool,
    callbacks: Sequence,
    command: Optional[str],
) -> Dict[str, Any]:
    """Train and write the run into ``run_dir`` (``final_dir``, or its staging folder under --overwrite)."""
    atomic_write_json(run_dir / "config.json", cfg)
    log: Callable[[str], None] = (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))
    progress = progress and not quiet
    seed = _seed_run(cfg)
    bundle = _load_bundle(cfg, log, progress)
    others = _load_multi_model(cfg, log, progress)
    env, agent = _build_env_and_agent(cfg, [bundle, *others], seed)
    verdict = _backdoor_verdict(cfg, env, log)
    learns = bool(getattr(agent, "learns", False))
    t_learn0 = time.perf_counter()
    learned = None
    if learns:
        learned = agent.learn(env, cfg, run_dir, resume=resume, callbacks=callbacks, progress=progress, log=log)
    if callable(getattr(agent, "save", None)):
        agent.save(run_dir)  # what onp.evaluate loads: weights-only tensors or JSON (BaseAgent: agent.json)
    ep = _choose_episode(agent, env, cfg, learned, verdict, learns=learns, t_learn0=t_learn0, log=log)
    pruned = [int(i) for i in ep.chosen["pruned"]]
    pruned_model = apply_pruning(bundle.fresh_model(), ep.base.graph, pruned, cfg["env"]["mask_mode"]).eval()
    pruned_model = _finetune(cfg, bundle, ep, pruned, pruned_model, seed, log)
    before, after = _test_metrics(bundle, pruned_model, log)
    rate = _steps_per_second(ep)
    names = ep.base.graph.neuron_names(pruned)
    wall = time.perf_counter() - t_start
    test = _TestOutcome(pruned, before, after, wall, rate)
    metrics = _run_metrics(cfg, bundle, ep, test)
    write_run(
        run_dir,
        config=cfg,
        metrics=metrics,
        pruned=pruned,
        pruned_names=names,
        model_state=pruned_model.state_dict(),
        command=command or f"python -m onp.train --config {final_dir / 'config.json'} --out {final_dir}-repro",
        extra={"learning_curve.json": ep.curve},
    )
    env.close()
    _print_summary(cfg, ep, test, final_dir)
    return metrics


def _seed_run(cfg: Dict[str, Any]) -> int:
    """Apply ``torch_threads`` and seed everything (``deterministic`` as configured); returns the seed."""
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg["torch_threads"]))
    from .seeding import seed_everything

    seed = int(cfg["seed"])
    seed_everything(seed, deterministic=bool(cfg["deterministic"]))
    return seed


def _load_multi_model(cfg: Dict[str, Any], log: Callable[[str], None], progress: bool) -> List["BackdoorBundle"]:
    """The ``multi_model`` models (trained first where not cached yet), for a policy trained on all of them."""
    from .zoo import BackdoorConfig, load_bundle

    if not cfg["multi_model"]:
        return []
    log(
        f"[onp] multi-model: one policy trained on {len(cfg['multi_model']) + 1} models (this one and "
        + ", ".join(f"{'clean' if b.get('clean') else b['attack']} s{b['seed']}" for b in cfg["multi_model"])
        + "); the pruning and the report below are this model's"
    )
    return [
        load_bundle(
            BackdoorConfig.from_dict(b),
            cache_dir=cfg.get("cache_dir"),
            data_dir=cfg.get("data_dir"),
            progress=progress,
            device=cfg.get("device", "cpu"),
        )
        for b in cfg["multi_model"]
    ]


def _build_env_and_agent(cfg: Dict[str, Any], bundles: List["BackdoorBundle"], seed: int) -> Tuple[Any, Any]:
    """The env of the run (its reward batch is the defense-validation split; with ``multi_model``, one env over
    all the models, the run's own first) and the configured agent on it."""
    from agents import accepts, build_agent, resolve_agent_factory
    from agents.vec_envs import EnvFactory, env_kwargs_from_config

    env = EnvFactory(bundles, env_kwargs_from_config(cfg["env"], cfg.get("cache_dir")), seed=seed, monitor=False)()
    factory, extra, _ = resolve_agent_factory(cfg["agent"])
    params = {**extra, **cfg["agent_params"]}
    if "seed" not in params and accepts(factory, "seed"):
        params["seed"] = seed
    if "device" not in params and accepts(factory, "device", via_kwargs=False):  # only agents that name it
        params["device"] = cfg["device"]
    return env, build_agent(cfg["agent"], env, **params)


@dataclass
class _Episode:
    """The chosen episode of the final deterministic rollout, and what the training reported."""

    base: "NeuronPruningEnv"  # the run's env, unwrapped
    res: Dict[str, Any]  # the rollout (agents.rollout)
    sel: Dict[str, Any]  # its chosen episode (agents.select_pruning)
    steps: Dict[str, int]  # env steps: train, eval, warm_start, final
    learns: bool
    learn_seconds: float
    curve: List[Dict[str, Any]]
    train_info: Dict[str, Any]
    t_roll: float  # perf_counter() when the rollout started
    backdoor_verdict: Optional[Verdict] = None  # the trigger-inverting estimator's verdict (None: not one)
    finetune: Optional[Dict[str, Any]] = None  # agents.finetune_pruned's record, once it has run
    final_val: Optional[Dict[str, float]] = None  # val ACC / ASR of the model handed out, when fine-tuned

    @property
    def chosen(self) -> Dict[str, Any]:
        return self.sel["info"]

    @property
    def val(self) -> Dict[str, float]:
        """Defense-validation ACC and estimated ASR of the model handed out (after fine-tuning)."""
        if self.final_val is not None:
            return self.final_val
        return {"acc": float(self.chosen["acc"]), "asr": float(self.chosen["asr"])}


@dataclass
class _TestOutcome:
    """The chosen pruning on the held-out test set, with the run's wall time and speed."""

    pruned: List[int]
    before: Dict[str, float]
    after: Dict[str, Any]
    wall: float
    steps_per_second: float


def _backdoor_verdict(cfg: Dict[str, Any], env: Any, log: Callable[[str], None]) -> Optional[Verdict]:
    """The backdoor verdict of a trigger-inverting ASR estimator (:mod:`onp.backdoor_verdict`; ``None``
    for the ``trigger`` estimator), logged before any training."""
    rollout_cfg = RolloutConfig.from_dict(cfg["rollout"])
    base = cast("NeuronPruningEnv", env.unwrapped)
    verdict = backdoor_verdict(
        base.target.probe.info, estimator=cfg["env"]["asr_estimator"], threshold=rollout_cfg.anomaly_threshold
    )
    if verdict is not None:
        gate = "; the policy is trained, but its pruning is not kept without --force"
        gate = "" if verdict.suspected or rollout_cfg.force else gate
        log(f"[onp] backdoor {verdict.summary()}{gate}")
    return verdict


def _choose_episode(
    agent: Any,
    env: Any,
    cfg: Dict[str, Any],
    learned: Any,
    verdict: Optional[Verdict],
    *,
    learns: bool,
    t_learn0: float,
    log: Callable[[str], None],
) -> _Episode:
    """Roll the trained agent out deterministically on the defense-validation reward batch and
    choose the episode to keep (``rollout.select``, the backdoor verdict's gate, the evidence rule)."""
    from agents import rollout, select_pruning

    steps = {
        "train": learned.timesteps if learned else 0,
        "eval": learned.eval_env_steps if learned else 0,
        "warm_start": learned.warm_start_env_steps if learned else 0,
        "final": 0,
    }
    t_roll = time.perf_counter()
    res = rollout(agent, env, options={"model_index": 0})  # the run's own model (the first of multi_model's)
    steps["final"] = res["steps"]
    base = cast("NeuronPruningEnv", env.unwrapped)
    rollout_cfg = RolloutConfig.from_dict(cfg["rollout"])
    sel = select_pruning(
        res,
        select=rollout_cfg.select,
        min_return=rollout_cfg.min_return,
        evidence=rollout_cfg.evidence_rule(base.delta),
        n_triggered=int(len(base.target.probe.images)),
        veto=no_backdoor_reason(verdict, force=rollout_cfg.force, how_to_force=FORCE_HINT),
        log=log,
    )
    if learned is not None:
        learn_seconds, curve, train_info = learned.seconds, learned.learning_curve, learned.info
    else:  # a fixed agent: its one episode is the whole story
        learn_seconds, train_info = time.perf_counter() - t_roll, {"timesteps": 0}
        curve = [
            {
                "timesteps": 0,
                "mean_return": res["return"],
                "acc": float(res["info"]["acc"]),
                "asr": float(res["info"]["asr"]),
                "n_pruned": int(res["info"]["n_pruned"]),
                "wall_time": round(time.perf_counter() - t_learn0, 2),
            }
        ]
    return _Episode(base, res, sel, steps, learns, learn_seconds, curve, train_info, t_roll, verdict)


def _finetune(
    cfg: Dict[str, Any],
    bundle: "BackdoorBundle",
    ep: _Episode,
    pruned: List[int],
    pruned_model: torch.nn.Module,
    seed: int,
    log: Callable[[str], None],
) -> torch.nn.Module:
    """Fine-tune the kept pruning (``rollout.finetune``, :func:`agents.finetune_pruned`) and record it in
    ``ep``; returns the model to hand out."""
    from agents import finetune_pruned

    out = finetune_pruned(
        pruned_model,
        pruned,
        env=ep.base,
        data=bundle.defense_data,
        rollout=RolloutConfig.from_dict(cfg["rollout"]),
        judgement=ep.sel["judgement"],
        seed=seed,
        log=log,
        finish_unpruned=not ep.sel["vetoed"],
        augment=Augment.for_spec(bundle.spec),  # the FST finisher's: the FST baseline's (onp.baseline)
    )
    ep.finetune, ep.final_val = out.info, out.val
    ep.sel["judgement"] = out.judgement
    return out.model


def _test_metrics(
    bundle: "BackdoorBundle", pruned_model: torch.nn.Module, log: Callable[[str], None]
) -> Tuple[Dict[str, float], Dict[str, Any]]:
    """ACC / ASR / RA on the held-out test set before (the zoo's, when recorded) and after pruning, with DER."""
    log("[onp] evaluating on the held-out test set")
    before = bundle.meta.get("test_metrics")
    if not before or not {"acc", "asr", "ra"} <= set(before):
        before = evaluate_backdoor(bundle.model, bundle.test_x, bundle.test_y, bundle.attack)
    before = {k: float(before[k]) for k in ("acc", "asr", "ra")}
    return before, with_der(before, evaluate_backdoor(pruned_model, bundle.test_x, bundle.test_y, bundle.attack))


def _steps_per_second(ep: _Episode) -> float:
    """Training env steps per second of training; for a fixed agent, env steps per second of its episode."""
    rate_steps = ep.steps["train"] if ep.steps["train"] else ep.steps["final"]
    rate_seconds = ep.learn_seconds if ep.steps["train"] else (time.perf_counter() - ep.t_roll)
    return round(rate_steps / max(rate_seconds, 1e-9), 3)


def _run_metrics(cfg: Dict[str, Any], bundle: "BackdoorBundle", ep: _Episode, test: _TestOutcome) -> Dict[str, Any]:
    """``metrics.json`` of the run: test metrics, the chosen episode on defense-validation, the training's."""
    base, chosen, info0 = ep.base, ep.chosen, ep.res["infos"][0]
    return {
        **test.after,
        "before": test.before,
        "n_pruned": len(test.pruned),
        "num_neurons": base.num_nodes,
        "budget": base.budget,
        "agent": cfg["agent"],
        "asr_estimator": cfg["env"]["asr_estimator"],
        "trigger_aware": bool(base.target.probe.trigger_aware),
        "verdict": ep.sel["judgement"].verdict,
        "backdoor_verdict": ep.backdoor_verdict.to_dict() if ep.backdoor_verdict is not None else None,
        "evidence": ep.sel["judgement"].to_dict(),
        "val_acc": ep.val["acc"],
        "val_asr": ep.val["asr"],
        "finetune": ep.finetune,
        "val": {
            "acc": ep.val["acc"],
            "asr": ep.val["asr"],
            "acc_pruned": float(chosen["acc"]),
            "asr_pruned": float(chosen["asr"]),
            "acc0": float(info0["acc"]),
            "asr0": float(info0["asr"]),
            "return": float(ep.sel["return"]),
            "select": cfg["rollout"]["select"],
            "fallback": ep.sel["fallback"],
            "episode_steps": ep.res["steps"],
            "n_clean": int(base.target.n_clean),
            "n_triggered": int(len(base.target.probe.images)),
            "note": "the model handed out (the chosen episode, then fine-tuned) on the env's reward batch "
            "(defense-validation images); acc_pruned/asr_pruned: the episode before fine-tuning",
        },
        "wall_time": round(test.wall, 2),
        "learn_seconds": round(ep.learn_seconds, 2),
        "env_steps": sum(ep.steps.values()),
        "env_steps_breakdown": ep.steps,
        "steps_per_second": test.steps_per_second,
        "steps_per_second_note": "training env steps per second of training (incl. updates and evaluations)"
        if ep.learns
        else "env steps per second",
        "data_source": bundle.meta.get("data_source"),
        "model_dir": str(bundle.path),
        **({"multi_model": [t.name for t in base.targets]} if len(base.targets) > 1 else {}),
        **ep.train_info,
        "test_note": "ACC on the clean test set; ASR/RA with the attack's real trigger on non-target test images",
    }


def _print_summary(cfg: Dict[str, Any], ep: _Episode, test: _TestOutcome, final_dir: Path) -> None:
    """The two closing lines: the defense-validation verdict first, then the test outcome."""
    before, after = test.before, test.after
    print(f"[onp] {ep.sel['judgement'].summary()}", flush=True)  # the defense-validation verdict comes first
    print(
        f"[onp] {cfg['agent']} on {cfg['backdoor']['model']}/{cfg['backdoor']['attack']}: "
        f"test ACC {before['acc']:.4f}->{after['acc']:.4f}  ASR {before['asr']:.4f}->{after['asr']:.4f}  "
        f"RA {after['ra']:.4f}  DER {after['der']:.4f}  |  pruned {len(test.pruned)}  val ACC {ep.val['acc']:.3f} "
        f"ASR {ep.val['asr']:.3f}  |  {sum(ep.steps.values())} env steps, {test.wall:.0f}s  -> {final_dir}",
        flush=True,
    )


# --------------------------------------------------------------------------------------------------
# command line


#: onp.train flag (argparse dest) -> the TrainConfig key it sets; the backdoored-model flags (the group
#: shared by every onp tool, onp.cli_common.add_backdoor_flags) set backdoor.* and checkpoint/cache_dir/data_dir
FLAG_KEYS: Dict[str, str] = {
    "agent": "agent",
    "warm_start": "warm_start.baseline",
    "timesteps": "ppo.total_timesteps",
    "budget": "env.budget",
    "asr_estimator": "env.asr_estimator",
    "force": "rollout.force",
    "device": "device",
    "deterministic": "deterministic",
}


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m onp.train`` flags; each sets keys of the :class:`TrainConfig` (:func:`config_from_args`)."""
    p = argparse.ArgumentParser(
        prog="python -m onp.train",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See configs/train/default.yaml for every config key and docs/agents.md for agents.",
    )
    p.add_argument("--config", type=Path, default=None, help="YAML (or JSON) training config merged onto the defaults")
    add_set_flag(
        p,
        help="override a training config key, dotted for nested ones (e.g. ppo.n_steps=128, "
        "env.budget=0.03; repeatable)",
    )
    add_list_flag(p, "the available agents", "--list-agents")
    add_backdoor_flags(
        p,
        title="backdoored model (backdoor.* of the training config; default: resnet18, width 16, "
        "fashion-mnist, badnets, seed 0)",
    )
    a = p.add_argument_group("agent")
    a.add_argument(
        "--agent",
        default=None,
        help="ppo-gnn (default), random, greedy-gamma, greedy-activation, "
        "ranked:<baseline>, an installed entry point, or path/file.py:Class",
    )
    a.add_argument("--agent-seed", type=int, default=None, help="seed of the agent only (default: --seed)")
    a.add_argument(
        "--warm-start",
        default=None,
        metavar="BASELINE",
        help="behaviour-clone a baseline's pruning order before PPO (default clp; 'none' = cold start)",
    )
    a.add_argument("--timesteps", type=int, default=None, help="PPO env steps (ppo.total_timesteps)")
    a.add_argument("--budget", type=float, default=None, help="pruning budget: fraction of neurons or a count")
    _estimator_flags(a)
    a.add_argument("--device", default=None, help="device of the policy (and of zoo training): cpu, cuda, ...")
    a.add_argument(
        "--deterministic",
        action="store_true",
        default=None,
        help="deterministic torch algorithms (config key 'deterministic')",
    )
    r = p.add_argument_group("run directory")
    r.add_argument("--out", type=path_arg, default=None, help="run directory")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    r.add_argument("--quiet", action="store_true", help="print only the final summary")
    return p


def _estimator_flags(group: Any) -> None:
    """``--asr-estimator`` and ``--force`` (the backdoor verdict's gate of trigger-agnostic estimators)."""
    group.add_argument(
        "--asr-estimator",
        default=None,
        help="trigger (trigger-aware; the default) or a trigger-agnostic one: synthesized-multi, synthesized",
    )
    group.add_argument(
        "--force",
        action="store_true",
        default=None,
        help="trigger-agnostic estimators: keep the pruning even when the backdoor verdict finds no "
        "backdoor (rollout.force)",
    )


def config_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The (partial) training config of the command line: ``--config``, then the flags, then ``--set``.
    ``--seed`` sets ``backdoor.seed`` and ``seed`` (the agent's); ``--agent-seed`` only ``seed``."""
    cfg = load_yaml(args.config) if args.config is not None else {}  # YAML (JSON is valid YAML too)
    sets = set_overrides(args.set, TrainConfig.model_fields)
    if "agent" in cfg:  # a config file is untrusted: it never makes onp import code by itself
        from agents.base import check_agent_source

        if args.agent is None and "agent" not in sets:  # else the flag replaces it
            check_agent_source(cfg["agent"], None, where=args.config)
    flags = {key: getattr(args, dest) for dest, key in FLAG_KEYS.items() if getattr(args, dest) is not None}
    flags.update({key: val for key, val in model_source(args).items() if val is not None})
    if args.seed is not None:
        flags["seed"] = args.seed
    if args.agent_seed is not None:
        flags["seed"] = args.agent_seed
    nested = nest_dotted(flags)
    backdoor = backdoor_overrides(args)
    if backdoor:
        nested["backdoor"] = backdoor
    return deep_update(deep_update(cfg, nested), sets)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m onp.train``: train (or run) an agent into a run directory; see the module doc."""
    args = build_parser().parse_args(argv)
    if args.list:
        from agents import available_agents

        return print_listing(list(available_agents()))
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    cfg = config_from_args(args)
    line = reproduce_line(["python -m onp.train"] + list(argv if argv is not None else sys.argv[1:]))
    run_training(
        cfg,
        args.out,
        overwrite=args.overwrite,
        resume=args.resume,
        progress=not args.quiet,
        quiet=args.quiet,
        command=line,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

"""``python -m onp.evaluate``: apply a learned policy (or a fixed pruned set) to another model.

Examples::

    # the policy of a training run, without further training, on another seed's backdoored model
    python -m onp.evaluate --policy runs/train/resnet18-badnets-ppo-gnn-bc-clp-s0 --seed 1
    # ... on another attack, or on any zoo artifact directory
    python -m onp.evaluate --policy runs/train/resnet18-badnets-ppo-gnn-bc-clp-s0 --attack blend
    python -m onp.evaluate --policy runs/train/resnet18-badnets-ppo-gnn-bc-clp-s0 --checkpoint ~/.cache/onp/zoo/<dir>
    # the false-positive cost on a clean (unpoisoned) model: the ACC it loses
    python -m onp.evaluate --policy runs/train/resnet18-badnets-ppo-gnn-bc-clp-s0 --clean
    # transfer a fixed pruned set (pruned.json of any run, e.g. a baseline's) instead of running a policy
    python -m onp.evaluate --pruned runs/baseline/anp-badnets-resnet18-s0 --seed 1

``--policy RUN_DIR`` reads ``config.json`` (env settings, agent, rollout rule) and ``policy.pt`` +
``policy.json`` (ppo-gnn, weights only; other agents are rebuilt from their saved parameters; an
agent given by a file or module path only with the same ``--agent``) of an ``onp.train`` run, builds a
:class:`envs.NeuronPruningEnv` on the target model with the **same env settings**, runs one
deterministic episode (on the target's defense-validation reward batch, as training did), writes
the chosen pruning into a copy of the model and reports test ACC / ASR / RA / DER before and after.

``--pruned RUN_DIR`` prunes the neuron indices of the run's ``pruned.json`` (same prune mode as the
run) on the target model. Both need a model of the same architecture: a different model name,
width, dataset shape or neuron count is an error that says so.

The target model is ``--checkpoint DIR`` (a zoo artifact directory), or the source run's backdoor
config with the given flags changed (``--attack``, ``--seed``, ``--clean``, ...), fetched from the
zoo (trained on first use). The result is a run directory (:mod:`onp.rundir`); its metrics add
``acc_lost`` (ACC before - after; the false-positive cost on a clean model) and ``source``.

The flags map onto an :class:`~onp.evaluate_config.EvaluateConfig` (:func:`config_from_args`; the
library entry is :func:`run_evaluate`). The target's flags are the backdoored-model group every onp
tool shares (:func:`onp.cli_common.add_backdoor_flags`), so ``--seed`` is the target model's seed (the
policy is applied, not trained: its episode's seed is ``--env-seed``). ``--set KEY=VALUE`` overrides an
evaluate config key (``target.poison_rate=0.05``, ``env_seed=3``); ``--list`` lists the agents.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union, cast

from .backdoor_verdict import backdoor_verdict, no_backdoor_reason
from .cli_common import (
    add_backdoor_flags,
    add_list_flag,
    add_set_flag,
    backdoor_overrides,
    device_arg,
    int_at_least,
    model_source,
    path_arg,
    path_str,
    print_listing,
    run_cli,
    set_overrides,
)
from .config import deep_update
from .data.augment import Augment
from .evaluate_config import EvaluateConfig
from .graph import neuron_layout
from .io import CheckpointError, cache_root, read_json, run_folder
from .masks import apply_pruning
from .metrics import evaluate_backdoor, with_der
from .rundir import RunResult, write_run
from .train_config import RolloutConfig

if TYPE_CHECKING:
    from envs import NeuronPruningEnv

    from .zoo import BackdoorBundle, BackdoorConfig


class ArchitectureMismatchError(ValueError):
    """The policy / pruned set was made for a model of another architecture."""


# --------------------------------------------------------------------------------------------------- sources


def read_source(run_dir: Path, kind: str) -> Dict[str, Any]:
    """``config.json`` (+ ``metrics.json`` if present) of a train or baseline run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--{kind}: run directory not found: {run_dir}")
    if not (run_dir / "config.json").exists():
        raise CheckpointError(f"{run_dir}: not an onp run directory (no config.json)")
    cfg = _json_object(run_dir / "config.json")
    metrics = _json_object(run_dir / "metrics.json") if (run_dir / "metrics.json").exists() else {}
    backdoor = cfg.get("backdoor") or {}
    if not isinstance(backdoor, dict):
        raise CheckpointError(
            f"{run_dir / 'config.json'}: 'backdoor' must be a mapping of BackdoorConfig keys; got "
            f"{type(backdoor).__name__}"
        )
    for key in ("seed", "defense_seed"):
        val = cfg.get(key)
        if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 0):
            raise CheckpointError(f"{run_dir / 'config.json'}: {key!r} must be an integer >= 0; got {val!r}")
    for key in ("env", "params"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise CheckpointError(
                f"{run_dir / 'config.json'}: {key!r} must be a mapping; got {type(cfg[key]).__name__}"
            )
    if "agent" in cfg and not (isinstance(cfg["agent"], str) and cfg["agent"].strip()):
        raise CheckpointError(f"{run_dir / 'config.json'}: 'agent' must be an agent name; got {cfg['agent']!r}")
    return {"dir": run_dir, "config": cfg, "metrics": metrics, "backdoor": backdoor}


def _json_object(path: Path) -> Dict[str, Any]:
    """A JSON file that must hold an object (a run's config.json, metrics.json, pruned.json)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{path}: expected a JSON object (a mapping of keys to values); got "
            f"{type(data).__name__}. Is it a file of an onp run?"
        )
    return data


def read_pruned(run_dir: Path) -> Dict[str, Any]:
    """``pruned.json`` of a run: ``indices`` distinct integers >= 0, ``names`` (optional) one string each;
    anything else is :class:`CheckpointError` naming the file."""
    path = Path(run_dir) / "pruned.json"
    data = _json_object(path)
    indices = data.get("indices")
    if indices is None:
        indices = []
    if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise CheckpointError(f"{path}: 'indices' must be a list of integer neuron indices; got {indices!r:.200}")
    bad = [i for i in indices if i < 0]
    if bad:
        raise CheckpointError(f"{path}: neuron indices must be >= 0; got {bad[:8]}")
    if len(set(indices)) != len(indices):
        raise CheckpointError(f"{path}: 'indices' lists a neuron more than once")
    names = data.get("names")
    if names is not None and (
        not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) != len(indices)
    ):
        raise CheckpointError(f"{path}: 'names' must be a list of one neuron name per index")
    return {"indices": indices, "names": names}


def _arch(b: Dict[str, Any]) -> Dict[str, Any]:
    return {"model": b.get("model"), "width": b.get("width"), "dataset": b.get("dataset")}


def check_architecture(
    source_backdoor: Dict[str, Any],
    target_cfg: BackdoorConfig,
    *,
    what: str,
    n_source: Optional[int] = None,
    n_target: Optional[int] = None,
) -> None:
    """Raise :class:`ArchitectureMismatchError` if the model name / width / dataset or neuron count differ."""
    src = _arch(source_backdoor)
    tgt = {"model": target_cfg.model, "width": target_cfg.width, "dataset": target_cfg.dataset}
    diff = [k for k in src if src[k] is not None and src[k] != tgt[k]]
    if n_source is not None and n_target is not None and n_source != n_target:
        diff.append("neurons")
    if diff:
        s = f"{src['model']} (width {src['width']}, {src['dataset']}" + (f", {n_source} neurons" if n_source else "")
        t = f"{tgt['model']} (width {tgt['width']}, {tgt['dataset']}" + (f", {n_target} neurons" if n_target else "")
        raise ArchitectureMismatchError(
            f"architecture mismatch: the {what} was made for {s}) but the target model is {t}); differing: "
            f"{', '.join(diff)}. A {what} applies only to models of the same architecture (another seed, "
            f"attack or trigger of it)"
        )


# --------------------------------------------------------------------------------------------------- target


def target_config(cfg: EvaluateConfig, source_backdoor: Dict[str, Any]) -> BackdoorConfig:
    """The target's :class:`~onp.zoo.BackdoorConfig`: the source's with ``cfg.target`` changed."""
    from .zoo import BackdoorConfig

    data = dict(source_backdoor) or {}
    if not data:
        raise ValueError("the source run has no backdoor config; pass --checkpoint")
    if "model" in cfg.target and "width" not in cfg.target:
        data["width"] = None  # another architecture: its own default width
    return BackdoorConfig.from_dict(deep_update(data, cfg.target)).resolved()


def target_bundle(cfg: EvaluateConfig, source_backdoor: Dict[str, Any], *, quiet: bool = False) -> BackdoorBundle:
    """The model to evaluate on: ``cfg.checkpoint``, or :func:`target_config` from the zoo."""
    from .zoo import load_bundle, open_bundle

    data_dir = Path(cfg.data_dir) if cfg.data_dir else None
    if cfg.checkpoint is not None:
        return open_bundle(cfg.checkpoint, data_dir=data_dir)
    return load_bundle(
        target_config(cfg, source_backdoor),
        cache_dir=cfg.cache_dir,
        data_dir=data_dir,
        device=cfg.device or "cpu",
        progress=not quiet,
    )


# --------------------------------------------------------------------------------------------------- policy


def run_policy(
    source: Dict[str, Any],
    bundle: BackdoorBundle,
    *,
    seed: Optional[int] = None,
    device: str = "cpu",
    cache_dir: Optional[Path] = None,
    log: Optional[Callable[[str], None]] = None,
    agent: Optional[str] = None,
    force: Optional[bool] = None,
    finetune_method: Optional[str] = None,
) -> Dict[str, Any]:
    """One deterministic episode of the source run's policy in an env on ``bundle``'s model.

    ``force`` overrides the source run's ``rollout.force`` (keep the pruning even when the backdoor
    verdict of a trigger-inverting estimator finds no backdoor); ``finetune_method`` its
    ``rollout.finetune.method`` (``ft`` or ``fst``).

    ``agent`` is the ``--agent`` the user passed: an agent that the run's ``config.json`` names by a
    file or module path is imported only when the user names the same one explicitly (a run folder
    is untrusted input and never makes onp import code on its own).

    Returns ``{"pruned", "pruned_names", "model", "mask_mode", "finetune", "val", "judgement",
    "backdoor_verdict", "asr_estimator", "trigger_aware", "env_steps", "num_neurons", "agent"}``."""
    from agents import rollout

    with _source_env(source, bundle, seed=seed, cache_dir=cache_dir, agent=agent) as (env, seed_used):
        act = _source_agent(source, bundle, env, seed=seed_used, device=device)
        res = rollout(act, env, seed=seed_used)
        return _chosen_pruning(source["config"], bundle, env, res, log, force=force, finetune_method=finetune_method)


def policy_episode(
    source: Dict[str, Any],
    bundle: BackdoorBundle,
    *,
    seed: Optional[int] = None,
    device: str = "cpu",
    cache_dir: Optional[Path] = None,
    agent: Optional[str] = None,
) -> Dict[str, Any]:
    """The source run's policy's deterministic episode on ``bundle``'s model, as :func:`run_policy` runs it,
    without choosing or applying a pruning: :func:`agents.rollout`'s record (``agents.pruning_order`` of it
    is the order the policy pruned in). ``agent``: as in :func:`run_policy`."""
    from agents import rollout

    with _source_env(source, bundle, seed=seed, cache_dir=cache_dir, agent=agent) as (env, seed_used):
        return rollout(_source_agent(source, bundle, env, seed=seed_used, device=device), env, seed=seed_used)


@contextlib.contextmanager
def _source_env(
    source: Dict[str, Any],
    bundle: BackdoorBundle,
    *,
    seed: Optional[int],
    cache_dir: Optional[Path],
    agent: Optional[str],
) -> Iterator[Tuple[Any, int]]:
    """The env the source run's policy acts in on ``bundle``'s model (its ``env`` config; checked: an
    onp.train run, the same architecture, an agent named in the run only when ``agent`` names it too),
    and the seed; closed afterwards."""
    from agents.base import check_agent_source
    from agents.vec_envs import EnvFactory, env_kwargs_from_config

    cfg = source["config"]
    run_dir: Path = source["dir"]
    if "env" not in cfg or "agent" not in cfg:
        raise CheckpointError(
            f"{run_dir}: not an onp.train run (config.json has no 'env'/'agent'); use --pruned for a baseline run"
        )
    check_architecture(source["backdoor"], bundle.config, what="policy")
    check_agent_source(cfg["agent"], agent, where=run_dir / "config.json")
    seed_used = int(cfg.get("seed", 0) if seed is None else seed)
    env_kwargs = env_kwargs_from_config(cfg["env"], cache_dir if cache_dir is not None else cfg.get("cache_dir"))
    env = EnvFactory(bundle, env_kwargs, seed=seed_used, monitor=False)()
    try:
        yield env, seed_used
    finally:
        env.close()


def _source_agent(source: Dict[str, Any], bundle: BackdoorBundle, env: Any, *, seed: int, device: str) -> Any:
    """The source run's agent on ``env``: a learned one as onp.train saved it (checked against the
    target's neuron count), a fixed one rebuilt from its parameters."""
    from agents import accepts, build_agent, resolve_agent_factory

    cfg, run_dir = source["config"], source["dir"]
    base = cast("NeuronPruningEnv", env.unwrapped)
    factory, extra, _ = resolve_agent_factory(cfg["agent"])
    if getattr(factory, "learns", False):  # a learned agent: what onp.train saved, applied as it is
        meta = read_json(run_dir / "policy.json") if (run_dir / "policy.json").is_file() else {}
        n_policy = meta.get("num_nodes") if isinstance(meta, dict) else None
        check_architecture(
            source["backdoor"],
            bundle.config,
            what="policy",
            n_source=n_policy if isinstance(n_policy, int) else None,
            n_target=base.num_nodes,
        )
        # e.g. ppo-gnn: built on the TARGET model's graph from weights only; nothing unpickled
        return factory.load(run_dir, env, **({"device": device} if accepts(factory.load, "device") else {}))
    # a fixed agent is rebuilt from its parameters
    params = {**extra, **(cfg.get("agent_params") or {})}
    if "seed" not in params and accepts(factory, "seed"):
        params["seed"] = seed
    return build_agent(cfg["agent"], env, **params)


def _source_rollout(
    cfg: Dict[str, Any], *, force: Optional[bool] = None, finetune_method: Optional[str] = None
) -> RolloutConfig:
    """The source run's ``rollout`` config (a run from before a key existed: its default), with ``force``
    and ``finetune_method`` overriding its ``force`` and ``finetune.method`` when given."""
    ro = RolloutConfig.from_dict(cfg.get("rollout") or {})
    if force is not None:
        ro.force = force
    if finetune_method is not None:
        ro.finetune.method = finetune_method  # type: ignore[assignment]  # checked by EvaluateConfig
    return ro


def _chosen_pruning(
    cfg: Dict[str, Any],
    bundle: BackdoorBundle,
    env: Any,
    res: Dict[str, Any],
    log: Optional[Callable[[str], None]],
    *,
    force: Optional[bool] = None,
    finetune_method: Optional[str] = None,
) -> Dict[str, Any]:
    """The episode of ``res`` that the source run's ``rollout`` config chooses (``force``,
    ``finetune_method``: its ``rollout.force``, ``rollout.finetune.method`` overridden), applied to a
    fresh copy of the target model (:func:`run_policy`'s result)."""
    from agents import finetune_pruned, select_pruning

    base = cast("NeuronPruningEnv", env.unwrapped)
    ro = _source_rollout(cfg, force=force, finetune_method=finetune_method)
    verdict = backdoor_verdict(base.target.probe.info, estimator=base.asr_estimator, threshold=ro.anomaly_threshold)
    if verdict is not None and log is not None:
        log(f"[onp] backdoor {verdict.summary()}")
    sel = select_pruning(
        res,
        select=ro.select,
        min_return=ro.min_return,
        evidence=ro.evidence_rule(base.delta),
        n_triggered=len(base.target.probe.images),
        veto=no_backdoor_reason(verdict, force=ro.force, how_to_force="--force"),
        log=log,
    )
    pruned = [int(i) for i in sel["info"]["pruned"]]
    mask_mode = cfg["env"].get("mask_mode", "gamma")
    model = apply_pruning(bundle.fresh_model(), base.graph, pruned, mask_mode).eval()
    tuned = finetune_pruned(
        model,
        pruned,
        env=base,
        data=bundle.defense_data,
        rollout=ro,
        judgement=sel["judgement"],
        seed=int(cfg.get("seed", 0)),
        log=log,
        finish_unpruned=not sel["vetoed"],
        augment=Augment.for_spec(bundle.spec),  # the FST finisher's: the FST baseline's (onp.baseline)
    )
    return {
        "pruned": pruned,
        "pruned_names": base.graph.neuron_names(pruned),
        "model": tuned.model,
        "mask_mode": mask_mode,
        "finetune": tuned.info,
        "val": _val_record(res, sel, tuned.val, len(base.target.probe.images)),
        "judgement": tuned.judgement,
        "backdoor_verdict": verdict,
        "asr_estimator": base.asr_estimator,
        "trigger_aware": bool(base.target.probe.trigger_aware),
        "env_steps": res["steps"],
        "num_neurons": base.num_nodes,
        "agent": cfg["agent"],
    }


def _val_record(
    res: Dict[str, Any], sel: Dict[str, Any], tuned_val: Optional[Dict[str, float]], n_triggered: int
) -> Dict[str, Any]:
    """``metrics.json``'s ``val``: the handed-out model's defense-val figures (fine-tuned, when it was),
    the chosen episode's before fine-tuning, and the unpruned model's."""
    chosen, info0 = sel["info"], res["infos"][0]
    return {
        **(tuned_val or {"acc": float(chosen["acc"]), "asr": float(chosen["asr"])}),
        "acc_pruned": float(chosen["acc"]),
        "asr_pruned": float(chosen["asr"]),
        "acc0": float(info0["acc"]),
        "asr0": float(info0["asr"]),
        "episode_steps": res["steps"],
        "return": sel["return"],
        "fallback": sel["fallback"],
        "n_triggered": n_triggered,
        "note": "the model handed out (the chosen episode, then fine-tuned) on the target's defense-validation "
        "reward batch; acc_pruned/asr_pruned: the episode before fine-tuning",
    }


# --------------------------------------------------------------------------------------------------- pruned set


def _prune_mode_of(source: Dict[str, Any]) -> str:
    cfg, metrics = source["config"], source["metrics"]
    if isinstance(cfg.get("env"), dict) and cfg["env"].get("mask_mode"):
        return cfg["env"]["mask_mode"]
    op = metrics.get("operating_point") or {}
    if isinstance(op, dict) and op.get("prune_mode"):
        return op["prune_mode"]
    params = cfg.get("params") or {}
    return params.get("prune_mode") or "gamma"


def source_defense(config: Mapping[str, Any]) -> Optional[str]:
    """The defense of a run folder's ``config.json``: its agent (``onp.train``) or its baseline
    (``onp.baseline``; ``method`` in folders written before the key was renamed ``defense``)."""
    return config.get("agent") or config.get("defense") or config.get("method")


def apply_pruned_set(
    source: Dict[str, Any], bundle: BackdoorBundle, *, prune_mode: Optional[str] = None
) -> Dict[str, Any]:
    """Prune ``source``'s ``pruned.json`` indices on ``bundle``'s model (same numbering required)."""
    run_dir: Path = source["dir"]
    path = run_dir / "pruned.json"
    if not path.exists():
        name = source_defense(source["config"]) or "this run"
        raise CheckpointError(f"{run_dir}: no pruned.json ({name} does not prune neurons); nothing to transfer")
    data = read_pruned(run_dir)
    indices, names = data["indices"], data["names"]
    layout = neuron_layout(bundle.model)
    n_src = source["metrics"].get("num_neurons")
    check_architecture(
        source["backdoor"],
        bundle.config,
        what="pruned set",
        n_source=int(n_src) if n_src else None,
        n_target=layout.num_neurons,
    )
    if indices and max(indices) >= layout.num_neurons:
        raise ArchitectureMismatchError(
            f"architecture mismatch: {path} prunes neuron {max(indices)} but the target model has only "
            f"{layout.num_neurons} neurons"
        )
    ours = layout.names(indices)
    if names and list(names) != ours:
        bad = (
            next((a, b) for a, b in zip(names, ours) if a != b) if len(names) == len(ours) else (len(names), len(ours))
        )
        raise ArchitectureMismatchError(
            f"architecture mismatch: {path} names neurons that differ from the target "
            f"model's numbering (e.g. {bad[0]} vs {bad[1]})"
        )
    mode = prune_mode or _prune_mode_of(source)
    model = apply_pruning(bundle.model, layout.bn_names, indices, mode)
    return {
        "pruned": indices,
        "pruned_names": ours,
        "model": model,
        "mask_mode": mode,
        "num_neurons": layout.num_neurons,
    }


# --------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m onp.evaluate`` flags; they map onto an :class:`EvaluateConfig` (:func:`config_from_args`)."""
    p = argparse.ArgumentParser(
        prog="python -m onp.evaluate",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    src = p.add_mutually_exclusive_group()  # one of them is required (main), but not for --list
    src.add_argument(
        "--policy", type=path_arg, help="an onp.train run directory (policy.pt + policy.json + config.json)"
    )
    src.add_argument("--pruned", type=path_arg, help="any run directory with pruned.json (transfer a fixed pruned set)")
    add_set_flag(
        p, help="override an evaluate config key, dotted (e.g. target.poison_rate=0.05, env_seed=3; repeatable)"
    )
    add_list_flag(p, "the agents (whose onp.train runs --policy applies)")
    t = add_backdoor_flags(
        p,
        title="target model",
        description="--checkpoint (a model folder), or from the zoo: the source run's backdoored "
        "model with these flags changed (trained on first use)",
    )
    t.add_argument("--clean", action="store_true", help="an unpoisoned model (false-positive cost: ACC lost)")
    p.add_argument(
        "--agent",
        default=None,
        metavar="SPEC",
        help="--policy of a plug-in agent given by a file or module path (path/file.py:Class): repeat "
        "that spec here to allow importing it; a run folder never makes onp import code by itself",
    )
    p.add_argument(
        "--env-seed", type=int_at_least(0), default=None, help="env / rollout seed (default: the policy's seed)"
    )
    p.add_argument(
        "--prune-mode",
        choices=["gamma", "channel"],
        default=None,
        help="--pruned: how to prune (default: as the source run did)",
    )
    p.add_argument("--device", type=device_arg, default=None, help="device of the policy: cpu, cuda, cuda:N or mps")
    p.add_argument("--deterministic", action="store_true", help="deterministic torch algorithms")
    p.add_argument(
        "--force",
        action="store_true",
        default=None,
        help="--policy with a trigger-agnostic estimator: keep the pruning even when the backdoor verdict "
        "finds no backdoor (default: as the source run)",
    )
    p.add_argument(
        "--out", type=path_arg, default=None, help="run directory (default runs/evaluate/<source>-on-<target>)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing onp run directory (only once the new run succeeded)",
    )
    p.add_argument("--quiet", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    """The :class:`EvaluateConfig` of the command line: the flags, then ``--set``."""
    source = model_source(args)
    data: Dict[str, Any] = {
        "policy": path_str(args.policy),
        "pruned": path_str(args.pruned),
        "checkpoint": source["checkpoint"],
        "target": backdoor_overrides(args, {"clean": True} if args.clean else None),
        "agent": args.agent,
        "env_seed": args.env_seed,
        "prune_mode": args.prune_mode,
        "device": args.device,
        "deterministic": args.deterministic,
        "force": args.force,
        "cache_dir": source["cache_dir"],
        "data_dir": source["data_dir"],
    }
    return EvaluateConfig.from_dict(deep_update(data, set_overrides(args.set, EvaluateConfig.model_fields)))


def run_evaluate(
    config: Union[EvaluateConfig, Dict[str, Any]],
    out: Optional[Path] = None,
    *,
    overwrite: bool = False,
    quiet: bool = False,
) -> RunResult:
    """Apply a learned policy or a fixed pruned set to a target model (no re-fitting) and write the run
    folder; return its :class:`~onp.rundir.RunResult`. Everything about the source is checked (files,
    architecture, agent) before the target model is loaded or trained."""
    from .seeding import seed_everything

    cfg = config if isinstance(config, EvaluateConfig) else EvaluateConfig.from_dict(config)
    t0 = time.perf_counter()
    kind = cfg.kind
    source = read_source(Path(cfg.source), kind)
    if kind == "policy" and ("env" not in source["config"] or "agent" not in source["config"]):
        raise CheckpointError(
            f"{source['dir']}: not an onp.train run (config.json has no 'env'/'agent'); "
            f"use --pruned to transfer its pruned set"
        )
    if kind == "pruned":
        if not (source["dir"] / "pruned.json").exists():
            name = source_defense(source["config"]) or "this run"
            raise CheckpointError(
                f"{source['dir']}: no pruned.json ({name} does not prune neurons); nothing to transfer"
            )
        read_pruned(source["dir"])  # a malformed pruned.json fails before any model is loaded
    cache_root(cfg.cache_dir)  # an empty ONP_CACHE, or one at a file, is refused before any work
    seed = (
        cfg.env_seed
        if cfg.env_seed is not None
        else int(source["config"].get("seed", source["config"].get("defense_seed", 0)) or 0)
    )
    seed_everything(seed, deterministic=cfg.deterministic)
    what = "policy" if kind == "policy" else "pruned set"
    if cfg.checkpoint is None and source["backdoor"]:  # check the architecture before any training
        check_architecture(source["backdoor"], target_config(cfg, source["backdoor"]), what=what)
    # a failed run leaves nothing; an existing run is replaced (--overwrite) only once this one succeeded.
    # An explicit out is opened first, so that one that cannot be written fails before any model is loaded.
    with contextlib.ExitStack() as stack:
        work = None if out is None else stack.enter_context(run_folder(out, tool="onp.evaluate", overwrite=overwrite))
        bundle = target_bundle(cfg, source["backdoor"], quiet=quiet)
        if source["backdoor"]:
            check_architecture(source["backdoor"], bundle.config, what=what)
        out = (
            Path(out) if out is not None else Path("runs") / "evaluate" / f"{source['dir'].name}-on-{bundle.path.name}"
        )
        if work is None:
            work = stack.enter_context(run_folder(out, tool="onp.evaluate", overwrite=overwrite))
        metrics = _evaluate_into(work, out, cfg=cfg, source=source, bundle=bundle, seed=seed, t0=t0, quiet=quiet)
    return RunResult(out, metrics)


def _evaluate_into(
    work: Path,
    out: Path,
    *,
    cfg: EvaluateConfig,
    source: Dict[str, Any],
    bundle: BackdoorBundle,
    seed: int,
    t0: float,
    quiet: bool,
) -> Dict[str, Any]:
    """Apply the policy / pruned set to ``bundle``; write the run into ``work`` (``out`` or its staging
    folder under --overwrite) and return its metrics."""
    if cfg.kind == "policy":
        res = run_policy(
            source,
            bundle,
            seed=seed,
            device=cfg.device or "cpu",
            cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None,
            log=None if quiet else print,
            agent=cfg.agent,
            force=cfg.force,
            finetune_method=cfg.finetune_method,
        )
    else:
        res = apply_pruned_set(source, bundle, prune_mode=cfg.prune_mode)
    before = evaluate_backdoor(bundle.model, bundle.test_x, bundle.test_y, bundle.attack)
    after = with_der(before, evaluate_backdoor(res["model"], bundle.test_x, bundle.test_y, bundle.attack))
    metrics = _evaluate_metrics(cfg.kind, source, bundle, res, before, after, t0)
    write_run(
        work,
        config=_evaluate_run_config(cfg, source, bundle, res, seed),
        metrics=metrics,
        pruned=res["pruned"],
        pruned_names=res["pruned_names"],
        model_state=res["model"].state_dict(),
    )
    _print_outcome(metrics, res, bundle.config, out)
    return metrics


def _target_name(tcfg: BackdoorConfig) -> str:
    return "clean" if tcfg.clean else tcfg.attack


def _evaluate_metrics(
    kind: str,
    source: Dict[str, Any],
    bundle: BackdoorBundle,
    res: Dict[str, Any],
    before: Dict[str, Any],
    after: Dict[str, Any],
    t0: float,
) -> Dict[str, Any]:
    """``metrics.json`` of an evaluation: test metrics before / after, the source, the target and,
    for a policy, the chosen episode on defense-validation with its verdict."""
    tcfg = bundle.config
    clean = bool(bundle.meta.get("clean"))
    src_cfg = source["config"]
    metrics: Dict[str, Any] = {
        **after,
        "before": before,
        "n_pruned": len(res["pruned"]),
        "num_neurons": res.get("num_neurons"),
        "acc_lost": before["acc"] - after["acc"],
        "clean_model": clean,
        "defense": f"{kind}:{source_defense(src_cfg) or source['dir'].name}",
        "asr_estimator": res.get("asr_estimator"),
        "trigger_aware": res.get("trigger_aware"),
        "val": res.get("val"),
        "finetune": res.get("finetune"),
        "env_steps": res.get("env_steps", 0),
        "mask_mode": res["mask_mode"],
        "wall_time": round(time.perf_counter() - t0, 2),
        "source": {
            "kind": kind,
            "run_dir": str(source["dir"]),
            "backdoor": source["backdoor"],
            "agent": src_cfg.get("agent"),
            "defense": src_cfg.get("defense", src_cfg.get("method")),
        },
        "target": {"model_dir": str(bundle.path), "attack": _target_name(tcfg), "seed": tcfg.seed, "clean": clean},
        "data_source": bundle.meta.get("data_source"),
        "note": (
            "clean (unpoisoned) model: acc_lost is the false-positive cost; ASR measures the trigger's natural effect"
        )
        if clean
        else "test metrics; the policy / pruned set was not re-fitted",
    }
    if kind == "pruned":
        for key in ("asr_estimator", "trigger_aware", "val", "finetune"):
            metrics.pop(key)
    else:  # the defense-validation verdict (no evidence, no pruning: onp.evidence)
        metrics["verdict"] = res["judgement"].verdict
        metrics["evidence"] = res["judgement"].to_dict()
        verdict = res.get("backdoor_verdict")
        metrics["backdoor_verdict"] = verdict.to_dict() if verdict is not None else None
    return metrics


def _evaluate_run_config(
    cfg: EvaluateConfig, source: Dict[str, Any], bundle: BackdoorBundle, res: Dict[str, Any], seed: int
) -> Dict[str, Any]:
    """``config.json`` of an evaluation: the source, the target and how the pruning was applied."""
    return {
        "kind": cfg.kind,
        "source": str(source["dir"]),
        "source_config": source["config"],
        "env_seed": seed,
        "target_backdoor": bundle.config.to_dict(),
        "model_dir": str(bundle.path),
        "prune_mode": res["mask_mode"],
        "deterministic": cfg.deterministic,
        "run_config": cfg.to_dict(),
    }


def _print_outcome(metrics: Dict[str, Any], res: Dict[str, Any], tcfg: BackdoorConfig, out: Path) -> None:
    """The verdict (a policy), then the test outcome: ``metrics`` holds the metrics after pruning and ``before``."""
    before, clean = metrics["before"], metrics["clean_model"]
    if "verdict" in metrics:
        print(f"[onp] {res['judgement'].summary()}", flush=True)
    print(
        f"[onp] {metrics['defense']} on {tcfg.model}/{_target_name(tcfg)} s{tcfg.seed}"
        + (" (CLEAN model)" if clean else "")
        + f": ACC {before['acc']:.4f}->{metrics['acc']:.4f} (lost {metrics['acc_lost']:.4f})  "
        f"ASR {before['asr']:.4f}->{metrics['asr']:.4f}  RA {metrics['ra']:.4f}  DER {metrics['der']:.4f}  "
        f"pruned {metrics['n_pruned']}  -> {out}"
    )


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m onp.evaluate``: apply a policy or a pruned set to a target model; see the module doc."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        from agents import available_agents

        return print_listing(list(available_agents()))
    if (
        args.policy is None
        and args.pruned is None
        and not {"policy", "pruned"} & set(set_overrides(args.set, EvaluateConfig.model_fields))
    ):
        parser.error("one of the arguments --policy --pruned is required")
    run_evaluate(config_from_args(args), args.out, overwrite=args.overwrite, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

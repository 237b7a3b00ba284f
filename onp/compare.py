"""``python -m onp.compare``: run a grid of defenses x attacks x seeds and build a leaderboard.

Example::

    python -m onp.compare --model resnet18 --attacks badnets blend trojan sig wanet \\
        --defenses rnp anp awm ngf fp clp ft ppo-gnn --seeds 3

Library use: :func:`run_compare` takes a :class:`onp.compare_config.CompareConfig` (or a partial
mapping of its keys) and returns a :class:`CompareResult`; the command line maps its flags onto that
config (``--config FILE.yaml`` first, then the flags, then ``--set KEY=VALUE``; ``--list`` lists the
defenses and agents). ``configs/compare/default.yaml`` spells out every key and its default.

Every grid cell (model, attack, defense, seed) is one run directory in the :mod:`onp.rundir` format
under ``<out>/cells/<attack>/<defense>/s<seed>/`` (``<out>/cells/<model>/<attack>/...`` with several
models). ``seed`` is the seed of the backdoored model (the zoo's training seed) and of the defense.
The backdoored models are trained (or fetched from the zoo cache) first, one per (model, attack,
seed), so that parallel cells never race on the cache. A baseline cell runs
:func:`onp.baseline.run_baseline` on that model (its folder as ``checkpoint``); a learned-policy cell
(a name from ``agents.AGENTS``) runs :func:`onp.train.run_training`.

A baseline entry may name its protocol (:mod:`baselines.protocols`) as ``NAME[PROTOCOL]``:
``--defenses anp[paper] anp[delta]`` gives two labelled rows, the paper's fixed rule fitted on all
the defender's images and the largest pruning within delta on defense-validation (cells
``.../anp-paper/s0`` and ``.../anp-delta/s0``); a plain ``anp`` is the delta protocol (cells
``.../anp/s0``, as before). ``--set anp.KEY=V`` reaches every ``anp`` entry, ``--set anp[paper].KEY=V``
that one only.

A cell whose ``metrics.json`` exists is reused, so running the same command again after an
interruption resumes the grid where it stopped (an unfinished cell is run again from scratch, or
resumed by ``onp.train --resume``). ``--overwrite`` starts the whole grid again; the old grid is
kept (in a hidden sibling folder) until the new one has finished and comes back if it fails or is
interrupted. onp never writes into a folder it did not create (see :func:`onp.io.run_folder`).

Outputs in ``<out>``: ``leaderboard.{md,csv,json}``, ``plots/*.png``, ``models.json`` (the backdoored
models used), ``config.json`` + ``env.json`` (resolved settings, git commit, versions, hardware),
``failures.json`` when cells failed, and ``logs/`` (each cell's console output).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from .cli_common import (
    HelpFormatter,
    add_backdoor_flags,
    add_list_flag,
    add_set_flag,
    backdoor_flag_values,
    device_name,
    fraction,
    int_at_least,
    nest_dotted,
    path_arg,
    path_str,
    print_listing,
    run_cli,
    set_overrides,
)
from .compare_config import CompareConfig
from .config import deep_update, load_yaml, parse_overrides
from .io import CheckpointError, RunExistsError, atomic_write_json, atomic_write_text, read_json, run_folder
from .report import LEADERBOARD_NOTES, Cell, Row, build_rows, write_leaderboard
from .rundir import environment_info, reproduce_line

if TYPE_CHECKING:
    from .executors import Executor
    from .zoo import BackdoorConfig

# --------------------------------------------------------------------------------------------------- registries


def _defense_names() -> List[str]:
    import baselines

    return baselines.DEFENSES.names()


def agent_names() -> List[str]:
    """Names of the agents (``agents.available_agents``)."""
    import agents

    return list(agents.available_agents())


def check_policy_name(name: str, baseline_names: Sequence[str]) -> None:
    """Refuse a defense that is neither a baseline nor an agent spec that ``onp.train --agent``
    accepts: an unknown name lists every valid defense; a known agent with a bad argument
    (``ranked:<unknown baseline>``) or a malformed spec gets the agent resolver's own message."""
    from .registry import UnknownNameError

    try:
        import agents
    except ImportError:
        raise UnknownNameError("defense", name, sorted(baseline_names)) from None
    try:
        agents.resolve_agent_factory(name)
    except UnknownNameError as exc:
        if exc.kind != "agent":  # e.g. the baseline of ranked:<baseline>
            raise
        raise UnknownNameError("defense", name, sorted(set(baseline_names) | set(agent_names()))) from None


def listing() -> List[str]:
    """What ``--list`` prints: the baseline defenses and the agents, the two kinds of ``--defenses``."""
    return [f"baselines: {', '.join(_defense_names())}", f"agents: {', '.join(agent_names())}"]


def _label(defense: str) -> Tuple[str, Optional[str]]:
    """A ``--defenses`` entry -> (name, protocol or None): ``anp[paper]`` -> ``("anp", "paper")``
    (:func:`baselines.protocols.parse_label`, the one parser of the labels)."""
    from baselines.protocols import parse_label

    return parse_label(defense)


def _dirname(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "defense"


# --------------------------------------------------------------------------------------------------- CLI

#: flag (argparse dest) -> the CompareConfig key it sets; unset flags (None) keep the config's value
FLAG_KEYS: Dict[str, str] = {
    "models": "models",
    "attacks": "attacks",
    "defenses": "defenses",
    "seeds": "seeds",
    "seed_list": "seed_list",
    "data_dir": "backdoor.data_dir",
    "cache_dir": "backdoor.cache_dir",
    "oracle": "defense.oracle",
    "oracle_max_fraction": "defense.oracle_max_fraction",
    "train_config": "train.config",
    "timesteps": "train.timesteps",
    "asr_estimator": "train.asr_estimator",
    "device": "train.device",
    "executor": "execution.executor",
    "jobs": "execution.jobs",
    "ray_address": "execution.ray_address",
    "ray_num_cpus": "execution.ray_num_cpus",
    "deterministic": "execution.deterministic",
    "out": "output.out",
    "overwrite": "output.overwrite",
    "report_only": "output.report_only",
    "plots": "output.plots",
    "quiet": "output.quiet",
}
#: where an onp.compare --set key that is not a CompareConfig key goes: a defense hyperparameter
SET_SHORTHAND = "defense.params"


def _grid_flags(p: argparse.ArgumentParser, d: CompareConfig) -> None:
    """The grid: models, attacks, seeds, defenses; and the zoo's backdoor flags."""
    g = p.add_argument_group("grid")
    g.add_argument(
        "--models",
        "--model",
        dest="models",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"architecture(s), from onp.models.MODELS (default: {' '.join(d.models)})",
    )
    g.add_argument(
        "--attacks",
        "--attack",
        dest="attacks",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"attack(s), from onp.attacks.ATTACKS (default: {' '.join(d.attacks)})",
    )
    g.add_argument(
        "--defenses",
        nargs="+",
        default=None,
        metavar="NAME",
        help="baseline defenses (onp.baseline --list; NAME[PROTOCOL] for a protocol, e.g. anp[paper]) and/or "
        f"learned-policy agents (python -m onp.train --list, e.g. ppo-gnn) (default: {' '.join(d.defenses)})",
    )
    g.add_argument(
        "--seeds",
        type=int_at_least(1),
        default=None,
        help=f"number of seeds (0 .. N-1; default {d.seeds}), or see --seed-list",
    )
    g.add_argument(
        "--seed-list",
        "--seed",
        dest="seed_list",
        type=int_at_least(0),
        nargs="+",
        default=None,
        metavar="SEED",
        help="explicit seeds of the backdoored models and of the defenses (overrides --seeds)",
    )
    add_backdoor_flags(
        p,
        title="backdoored models (the zoo)",
        skip=("model", "attack", "seed", "checkpoint"),
        description=f"one model per (model, attack, seed) of the grid; dataset default: {d.backdoor.dataset}",
    )


def _defense_flags(p: argparse.ArgumentParser, d: CompareConfig) -> None:
    """The baselines' oracle sweep and the learned policies' onp.train settings."""
    o = p.add_argument_group("defenses")
    o.add_argument(
        "--oracle-max-fraction",
        type=fraction,
        default=None,
        help="baselines' oracle sweep: largest fraction pruned (analysis only)",
    )
    o.add_argument(
        "--no-oracle", dest="oracle", action="store_false", default=None, help="skip the baselines' oracle sweeps"
    )
    t = p.add_argument_group("learned policies (onp.train)")
    t.add_argument("--timesteps", type=int_at_least(0), default=None, help="PPO env steps (ppo.total_timesteps)")
    t.add_argument("--asr-estimator", default=None, help="trigger (trigger-aware) or synthesized")
    t.add_argument("--train-config", type=path_arg, default=None, help="YAML config for onp.train (its --config)")
    t.add_argument(
        "--train-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an onp.train config key (its --set)",
    )
    t.add_argument(
        "--device",
        type=device_name,
        default=None,
        help="device of every cell (onp.train and the baselines) and of backdoor training (e.g. cuda); with "
        "--executor ray it need not exist on this machine, only on the workers",
    )


def _run_flags(p: argparse.ArgumentParser, d: CompareConfig) -> None:
    """Executor, parallelism, determinism and the output folder."""
    r = p.add_argument_group("execution")
    r.add_argument(
        "--executor", choices=["local", "processes", "ray"], default=None, help=f"default {d.execution.executor}"
    )
    r.add_argument(
        "--jobs", type=int_at_least(1), default=None, help="parallel local processes (implies --executor processes)"
    )
    r.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local Ray)")
    r.add_argument("--ray-num-cpus", type=int_at_least(1), default=None, help="CPUs of a locally started Ray")
    r.add_argument(
        "--deterministic", action="store_true", default=None, help="deterministic torch algorithms in every cell"
    )
    w = p.add_argument_group("output")
    w.add_argument("--out", type=path_arg, default=None, help="output folder (default runs/compare/<model>)")
    w.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="start the grid again; the old grid is deleted only once the new one has finished",
    )
    w.add_argument("--report-only", action="store_true", default=None, help="only rebuild the leaderboard and plots")
    w.add_argument("--no-plots", dest="plots", action="store_false", default=None)
    w.add_argument("--quiet", action="store_true", default=None)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m onp.compare`` flags; each sets one :class:`CompareConfig` key (:data:`FLAG_KEYS`)."""
    d = CompareConfig()
    p = argparse.ArgumentParser(
        prog="python -m onp.compare",
        description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
        epilog="Every flag sets one key of onp.compare_config.CompareConfig; "
        "configs/compare/default.yaml lists them all with their defaults.",
    )
    p.add_argument(
        "--config",
        type=path_arg,
        default=None,
        metavar="FILE.yaml",
        help="YAML of CompareConfig keys merged onto the defaults; the flags and --set override it",
    )
    add_set_flag(
        p,
        help="override a CompareConfig key, dotted (e.g. execution.jobs=2, repeatable). A key that is "
        "not one is a defense hyperparameter (short for defense.params.KEY): 'anp.iterations=500' "
        "for one defense, 'delta=0.1' for every selected baseline that has the key",
    )
    add_list_flag(p, "the defenses (baselines and agents)")
    for add_flags in (_grid_flags, _defense_flags, _run_flags):
        add_flags(p, d)
    return p


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    """The :class:`CompareConfig` of the command line: ``--config``, then the flags (:data:`FLAG_KEYS`,
    the backdoored-model group, ``--backdoor-set``, ``--train-set``), then ``--set``."""
    data: Dict[str, Any] = load_yaml(args.config) if args.config is not None else {}
    flags = {key: getattr(args, dest) for dest, key in FLAG_KEYS.items() if getattr(args, dest) is not None}
    flags = {key: str(val) if isinstance(val, Path) else val for key, val in flags.items()}
    flags.update({f"backdoor.{key}": val for key, val in backdoor_flag_values(args).items()})
    if args.backdoor_set:
        flags["backdoor.overrides"] = parse_overrides(args.backdoor_set)
    if args.train_set:
        flags["train.overrides"] = parse_overrides(args.train_set)
    data = deep_update(data, nest_dotted(flags))
    data = deep_update(data, set_overrides(args.set, CompareConfig.model_fields, shorthand=SET_SHORTHAND))
    return CompareConfig.from_dict(data)


# --------------------------------------------------------------------------------------------------- the plan


def _comparable_settings(settings: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """A grid's ``settings`` with its override lists as mappings: grids written before
    :class:`CompareConfig` recorded ``--backdoor-set``/``--set``/``--train-set`` as lists of
    ``KEY=VALUE`` strings (they resume as long as the same values are asked for)."""
    out = dict(settings or {})
    for key in ("backdoor_set", "set", "train_set"):
        if isinstance(out.get(key), list):
            out[key] = parse_overrides(out[key])
    return out


class GridPlan:
    """Everything resolved from a :class:`CompareConfig` before any work: names, paths, configs, cells."""

    def __init__(self, config: CompareConfig, *, command: Optional[str] = None):
        self.config = config
        self.command = command
        self._check_names()
        baseline_names = _defense_names()
        self.models = list(dict.fromkeys(config.models))
        self.attacks = list(dict.fromkeys(config.attacks))
        self.defenses = list(dict.fromkeys(config.defenses))
        self.seeds = config.seed_values()
        #: baseline entries (labels such as anp or anp[paper]) and learned-policy agents
        self.baselines = [d for d in self.defenses if _label(d)[0] in baseline_names]
        self.policies = [d for d in self.defenses if d not in self.baselines]
        b = config.backdoor
        self.out = Path(config.output.out or Path("runs") / "compare" / "-".join(self.models))
        self.cache_dir = None if b.cache_dir is None else Path(b.cache_dir)
        self.data_dir = None if b.data_dir is None else Path(b.data_dir)
        if config.execution.executor == "ray":  # Ray workers may run elsewhere: give them absolute paths
            self.out = self.out.expanduser().resolve()
            self.cache_dir = None if self.cache_dir is None else self.cache_dir.expanduser().resolve()
            self.data_dir = None if self.data_dir is None else self.data_dir.expanduser().resolve()
        self.defense_params = self._defense_params()
        self.backdoor = {
            (m, a, s): self._backdoor_config(m, a, s) for m in self.models for a in self.attacks for s in self.seeds
        }
        self._check_before_any_work()

    def _check_names(self) -> None:
        from .attacks import ATTACKS
        from .data import DATASETS
        from .models import MODELS

        c = self.config
        for m in c.models:
            MODELS.check(m)
        DATASETS.check(c.backdoor.dataset)
        for a in c.attacks:
            ATTACKS.check(a)
        baseline_names = _defense_names()
        for d in c.defenses:
            name, protocol = _label(d)
            if name in baseline_names:
                continue
            check_policy_name(name, baseline_names)
            if protocol is not None:
                raise ValueError(
                    f"defense {d!r}: a protocol ([{protocol}]) applies to baseline defenses only; {name!r} is an agent"
                )

    def _check_before_any_work(self) -> None:
        """The cache, the device, the onp.train settings and the dataset, before any model is trained."""
        from .io import cache_root

        cache_root(self.cache_dir)  # an empty ONP_CACHE, or one at a file, is refused before any work
        device = self.config.train.device
        if device is not None and self.config.execution.executor != "ray":  # Ray workers check their own
            from .train_config import check_device

            check_device(device)  # --device cuda without CUDA: an error, never a CPU run recorded as cuda
        if self.policies:
            self._check_train_settings()
        if self.data_dir is not None and not self.config.output.report_only:
            from .data import load_dataset  # a --data-dir without the dataset fails here, not in every cell

            for source in sorted({c.data_source for c in self.backdoor.values()}):
                load_dataset(self.config.backdoor.dataset, data_dir=self.data_dir, source=source)

    # -- configs ---------------------------------------------------------------------------------
    def _backdoor_config(self, model: str, attack: str, seed: int) -> "BackdoorConfig":
        from .zoo import BackdoorConfig

        return BackdoorConfig.from_dict(self.config.backdoor.for_cell(model, attack, seed)).resolved()

    def _check_train_settings(self) -> None:
        """Resolve the onp.train config of every learned policy's first cell (types, ranges and names of
        --train-set, --train-config, --timesteps, ...) before any model is trained."""
        from .config import ConfigError
        from .train import resolve_config

        first: Dict[str, Cell] = {}
        for cell in self.cells():
            if cell.kind == "policy":
                first.setdefault(cell.defense, cell)
        for cell in first.values():
            cfg = self.train_config(cell, None)
            if self.config.execution.executor == "ray":  # the workers' device, checked there
                cfg.pop("device", None)
            try:
                resolve_config(cfg)
            except ConfigError as exc:
                raise ConfigError(
                    f"the onp.train settings of the {cell.defense} cells (--train-set, --train-config, "
                    f"--timesteps, --asr-estimator): {exc}"
                ) from None

    def _defense_params(self) -> Dict[str, Dict[str, Any]]:
        """The hyperparameters of each selected defense: ``params[NAME]`` (every entry of that defense,
        e.g. ``anp`` and ``anp[paper]``), then ``params[LABEL]`` (``anp[paper]`` only), then every
        unscoped ``params[KEY]`` that it has (baselines only; an unscoped key no selected baseline takes
        is an error). A ``NAME`` or unscoped key that an entry's protocol fixes (``fp[paper]``'s delta)
        skips that entry; a ``LABEL`` key that contradicts it is an error. The baselines'
        hyperparameters are validated here, with their protocol's rule, before any work."""
        import baselines
        from baselines.protocols import fixed_params, protocol_params

        names = {d: _label(d)[0] for d in self.defenses}
        fixed = {d: fixed_params(names[d], _label(d)[1] or "delta") for d in self.defenses}
        scopes: Dict[str, Dict[str, Any]] = {}
        unscoped: Dict[str, Any] = {}
        for key, val in self.config.defense.params.items():
            if (key in names or key in names.values()) and isinstance(val, Mapping):
                scopes[key] = copy.deepcopy(dict(val))
            else:
                unscoped[key] = val
        scoped = {
            d: deep_update(
                {k: copy.deepcopy(v) for k, v in scopes.get(names[d], {}).items() if k not in fixed[d]},
                scopes.get(d, {}) if d != names[d] else {},
            )
            for d in names
        }
        for key, val in unscoped.items():
            takers = [
                d for d in self.baselines if key in baselines.DEFENSES.get(names[d]).defaults() and key not in fixed[d]
            ]
            if not takers:
                raise ValueError(
                    f"--set {key}=...: no selected baseline has a hyperparameter {key!r} "
                    f"(scope it as DEFENSE.{key}=... for one defense, or use --train-set for onp.train)"
                )
            for d in takers:
                scoped[d] = deep_update(scoped[d], {key: copy.deepcopy(val)})
        for d in self.baselines:  # validate hyperparameters (and the protocol's rule) before any work
            baselines.build_defense(names[d], **protocol_params(names[d], _label(d)[1] or "delta", scoped[d]))
        return scoped

    def settings(self) -> Dict[str, Any]:
        """What determines a cell's result (a grid resumed with other settings is refused). The keys are
        the ones grids have always recorded, so that a grid started by an older onp resumes."""
        c = self.config
        b, t = c.backdoor, c.train
        tc = None
        if t.config is not None:
            tc = {"path": t.config, "sha256": hashlib.sha256(Path(t.config).read_bytes()).hexdigest()[:16]}
        return {
            "models": self.models,
            "dataset": b.dataset,
            "width": b.width,
            "epochs": b.epochs,
            "data_source": b.data_source,
            "defense_size": b.defense_size,
            "max_train": b.max_train,
            "backdoor_set": b.overrides,
            "set": c.defense.params,
            "oracle_max_fraction": c.defense.oracle_max_fraction,
            "no_oracle": not c.defense.oracle,
            "timesteps": t.timesteps,
            "asr_estimator": t.asr_estimator,
            "train_config": tc,
            "train_set": t.overrides,
            "deterministic": c.execution.deterministic,
        }

    def to_json(self) -> Dict[str, Any]:
        """What the grid's ``config.json`` holds: the resolved grid, its settings and its CompareConfig."""
        e = self.config.execution
        return {
            "models": self.models,
            "attacks": self.attacks,
            "defenses": self.defenses,
            "seeds": self.seeds,
            "baselines": self.baselines,
            "policies": self.policies,
            "settings": self.settings(),
            "executor": e.executor,
            "jobs": e.jobs,
            "ray_address": e.ray_address,
            "out": str(self.out),
            "backdoor_configs": {f"{m}/{at}/s{s}": c.to_dict() for (m, at, s), c in self.backdoor.items()},
            "defense_sets": self.defense_params,
            "compare_config": self.config.to_dict(),
            "command": self.command or reproduce_line(),
        }

    # -- cells -----------------------------------------------------------------------------------
    def cell_dir(self, model: str, attack: str, defense: str, seed: int) -> Path:
        base = self.out / "cells"
        if len(self.models) > 1:
            base = base / model
        return base / attack / _dirname(defense) / f"s{seed}"

    def cells(self) -> List[Cell]:
        return [
            Cell(m, a, d, s, "baseline" if d in self.baselines else "policy", self.cell_dir(m, a, d, s))
            for m in self.models
            for a in self.attacks
            for d in self.defenses
            for s in self.seeds
        ]

    def cell_task(self, cell: Cell, model_dir: str) -> Dict[str, Any]:
        """One cell as a picklable task for the executors: the run function's config, the run folder,
        and whether an earlier attempt left it unfinished (a policy then resumes, a baseline restarts)."""
        run_dir = Path(cell.run_dir)
        started = run_dir.exists() and any(run_dir.iterdir())
        config = (
            self.baseline_config(cell, model_dir) if cell.kind == "baseline" else self.train_config(cell, model_dir)
        )
        return {
            "key": cell.key,
            "kind": cell.kind,
            "config": config,
            "run_dir": str(run_dir),
            "started": started,
            "seed": cell.seed,
            "model_dir": str(model_dir),
            "deterministic": self.config.execution.deterministic,
            "device": self.config.train.device,
            "log": str(self.out / "logs" / (_dirname(cell.key.replace("/", "-")) + ".log")),
        }

    def baseline_config(self, cell: Cell, model_dir: str) -> Dict[str, Any]:
        """The :class:`onp.baseline_config.BaselineRunConfig` of a baseline cell (as a mapping)."""
        c = self.config
        name, protocol = _label(cell.defense)
        cfg: Dict[str, Any] = {
            "defense": name,
            "params": copy.deepcopy(self.defense_params[cell.defense]),
            "checkpoint": str(model_dir),
            "defense_seed": cell.seed,
            "deterministic": c.execution.deterministic,
            "oracle": c.defense.oracle,
            "cache_dir": path_str(self.cache_dir),
            "data_dir": path_str(self.data_dir),
        }
        if c.defense.oracle_max_fraction is not None:
            cfg["oracle_max_fraction"] = c.defense.oracle_max_fraction
        if protocol is not None:  # a plain NAME keeps the run config's default (delta) and its old config
            cfg["protocol"] = protocol
        if c.train.device is not None:
            cfg["device"] = c.train.device
        return cfg

    def train_config(self, cell: Cell, model_dir: Optional[str]) -> Dict[str, Any]:
        """The onp.train config of a learned-policy cell: ``train.config``, then the grid's settings,
        then ``train.overrides`` and the policy's own ``defense.params[DEFENSE]``. The model is the grid's
        model folder (``model_dir``; ``None``: its zoo config, for checking before any training)."""
        c = self.config
        t = c.train
        cfg: Dict[str, Any] = load_yaml(Path(t.config)) if t.config is not None else {}
        grid: Dict[str, Any] = {
            "agent": cell.defense,
            "seed": cell.seed,
            "cache_dir": path_str(self.cache_dir),
            "data_dir": path_str(self.data_dir),
            "deterministic": c.execution.deterministic,
        }
        if model_dir is None:
            grid["backdoor"] = self.backdoor[(cell.model, cell.attack, cell.seed)].to_dict()
        else:
            grid["checkpoint"] = str(model_dir)
        if t.timesteps is not None:
            grid["ppo"] = {"total_timesteps": t.timesteps}
        if t.asr_estimator is not None:
            grid["env"] = {"asr_estimator": t.asr_estimator}
        if t.device is not None:
            grid["device"] = t.device
        overrides = deep_update(copy.deepcopy(t.overrides), copy.deepcopy(self.defense_params.get(cell.defense, {})))
        cfg = deep_update(deep_update(cfg, grid), overrides)
        if model_dir is not None:
            cfg.pop("backdoor", None)  # the grid's model folder decides
        return cfg


# --------------------------------------------------------------------------------------------------- tasks


def prepare_model(task: Dict[str, Any]) -> Dict[str, Any]:
    """Train (or fetch) one backdoored model from the zoo; returns its artifact path and test metrics."""
    from .models import model_digest
    from .zoo import BackdoorConfig, load_bundle

    try:
        bundle = load_bundle(
            BackdoorConfig.from_dict(task["config"]),
            cache_dir=task.get("cache_dir"),
            data_dir=task.get("data_dir"),
            device=task.get("device") or "cpu",
            progress=False,
        )
        return {
            "key": task["key"],
            "ok": True,
            "path": str(bundle.path),
            "test_metrics": bundle.meta.get("test_metrics"),
            "digest": model_digest(bundle.model),
            "config": task["config"],
        }
    except Exception as exc:  # reported per cell
        return {
            "key": task["key"],
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
            "config": task["config"],
        }


def uses_gpu(task: Dict[str, Any]) -> bool:
    """Whether a model or cell task runs on a CUDA device (only those request a GPU on Ray)."""
    return str(task.get("device") or "").startswith("cuda")


def run_cell(task: Dict[str, Any]) -> Dict[str, Any]:
    """Run one grid cell (:func:`onp.baseline.run_baseline` or :func:`onp.train.run_training`) in this
    process. Seeds python / numpy / torch with the cell's seed first; console output goes to
    ``task["log"]``. Errors are returned (``ok: False``); KeyboardInterrupt propagates."""
    from .seeding import seed_everything

    t0 = time.time()
    seed_everything(int(task["seed"]), deterministic=bool(task.get("deterministic")))
    buf = io.StringIO()
    ok, error, tb = True, None, None
    run_dir = Path(task["run_dir"])
    try:
        with contextlib.redirect_stdout(buf):
            if task["kind"] == "baseline":
                from .baseline import baseline_command, run_baseline

                # an unfinished earlier attempt is started again
                command = baseline_command(task["config"], run_dir) + "\n\n(one cell of an onp.compare grid)"
                run_baseline(task["config"], run_dir, overwrite=bool(task.get("started")), quiet=True, command=command)
            else:
                from .train import run_training

                run_training(task["config"], run_dir, resume=bool(task.get("started")), quiet=True)
        if not (run_dir / "metrics.json").exists():
            ok, error = False, "the run finished without writing metrics.json"
    except Exception as exc:  # reported per cell, with its traceback in the cell's log
        ok, error, tb = False, f"{type(exc).__name__}: {exc}", traceback.format_exc()
    finally:
        log = buf.getvalue() + (f"\n{tb}" if tb else "")
        if task.get("log"):
            try:
                atomic_write_text(task["log"], log)
            except OSError:
                pass
    return {"key": task["key"], "ok": ok, "error": error, "seconds": time.time() - t0}


# --------------------------------------------------------------------------------------------------- main


def make_executor(config: CompareConfig) -> "Executor":
    """The executor of ``config.execution`` (a seam for tests)."""
    from .executors import make_executor as _make

    e = config.execution
    return _make(e.executor, jobs=e.jobs, ray_address=e.ray_address, ray_num_cpus=e.ray_num_cpus)


@contextlib.contextmanager
def _grid_folder(plan: GridPlan) -> Iterator[Path]:
    """The grid folder ``plan.out``, under the one rule of :func:`onp.io.run_folder`.

    A folder that onp did not create (or an onp run folder, not a grid) is refused, also with
    ``overwrite``. Without ``overwrite`` an existing grid is continued (its settings must match).
    With ``overwrite`` the old grid waits in a hidden sibling folder while the new one is built in
    place, and is deleted once the new grid has finished (failed cells included) or moved back if it
    raises (Ctrl-C included). A new grid that fails before any model or cell is done is removed.
    """
    output = plan.config.output
    replace = bool(output.overwrite and not output.report_only)
    with run_folder(
        plan.out,
        tool="onp.compare",
        overwrite=replace,
        resume=not replace,
        done_file="config.json",
        resumable=("models.json", "cells"),
        stage=False,
    ) as out:
        cfg_path = out / "config.json"
        if not replace and cfg_path.exists() and not output.report_only:
            old = _comparable_settings(read_json(cfg_path).get("settings"))
            new = _comparable_settings(plan.settings())
            if old != new:
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise RunExistsError(
                    f"{out} holds a grid run with other settings (differing: {', '.join(diff)}); "
                    f"pass --overwrite to start again or choose another --out"
                )
        yield out


def _load_models_json(out: Path) -> Dict[str, Any]:
    path = out / "models.json"
    return read_json(path) if path.exists() else {}


def model_layers(model_dir: Optional[str]) -> Optional[List[tuple]]:
    """``[(bn_name, offset, num_channels)]`` of a zoo artifact's model in graph numbering (None when
    the folder cannot be read: the per-layer plot then uses the layer names of pruned.json)."""
    if not model_dir:
        return None
    from .graph import neuron_layout
    from .zoo import load_model

    try:
        layout = neuron_layout(load_model(Path(model_dir)))
    except (OSError, ValueError, CheckpointError):  # UnsupportedModelError is a ValueError
        return None
    return [(layer.bn_name, layer.offset, layer.num_channels) for layer in layout.layers]


def build_report(
    plan: GridPlan, *, failures: Optional[Dict[str, str]] = None, plots: bool = True, quiet: bool = False
) -> Dict[str, Any]:
    """Read every cell, write the leaderboard and the plots; returns their paths and the rows."""
    failures = failures or {}
    cells = [c.load() for c in plan.cells()]
    for c in cells:
        if c.status != "ok" and c.key in failures:
            c.status, c.error = "failed", failures[c.key]
    models = _load_models_json(plan.out)
    before = {k: v.get("test_metrics") for k, v in models.items() if v.get("test_metrics")}
    rows = build_rows(
        cells, models=plan.models, attacks=plan.attacks, defenses=plan.defenses, seeds=plan.seeds, before=before
    )
    title = f"Leaderboard: {', '.join(plan.models)} on {plan.config.backdoor.dataset}"
    paths = write_leaderboard(
        rows,
        plan.out,
        title=title,
        notes=LEADERBOARD_NOTES,
        extra={"models": plan.models, "attacks": plan.attacks, "defenses": plan.defenses, "seeds": plan.seeds},
    )
    out = {"leaderboard": paths, "rows": rows, "cells": cells, "plots": []}
    if plots:
        from . import plots as _plots

        try:
            out["plots"] = _plots.make_all(plan.out / "plots", cells, rows, models=models, layers_of=model_layers)
        except Exception as exc:  # plots must never lose a finished grid
            print(f"[onp] warning: plots failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    return out


@dataclass(frozen=True)
class CompareResult:
    """What :func:`run_compare` returns: the grid folder, the leaderboard files and rows, the plots,
    and the cells (or backdoored models, by key) that failed."""

    out: Path
    leaderboard: Dict[str, Path]
    rows: List[Row]
    plots: List[Path] = field(default_factory=list)
    failures: Dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether every cell (and backdoored model) succeeded."""
        return not self.failures


def run_compare(
    config: Union[CompareConfig, Mapping[str, Any], None] = None, *, command: Optional[str] = None
) -> CompareResult:
    """Run the grid of ``config`` (a :class:`CompareConfig`, or a partial nested mapping of its keys merged
    onto its defaults) and build its leaderboard; see the module doc.

    Every name, hyperparameter and onp.train setting is checked before any work. A grid folder that
    holds this grid already is continued (finished cells are kept); ``command`` is the reproduce line
    recorded in its ``README.md`` and ``config.json`` (default: this process's command line).
    Failed cells are reported in :attr:`CompareResult.failures`, never raised."""
    cfg = config if isinstance(config, CompareConfig) else CompareConfig.from_dict(config)
    plan = GridPlan(cfg, command=command)  # validates every name and hyperparameter before any work
    with _grid_folder(plan):
        return _run_grid(plan)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m onp.compare``: exit status 0, or 1 when cells failed (they are in failures.json)."""
    args = build_parser().parse_args(argv)
    if args.list:
        return print_listing(listing())
    return 0 if run_compare(config_from_args(args)).ok else 1


def _prepare_models(plan: GridPlan, executor: "Executor", failures: Dict[str, str]) -> Dict[str, Any]:
    """The backdoored models, one per (model, attack, seed), before any cell: ``models.json``'s entries."""
    from tqdm.auto import tqdm

    out, c = plan.out, plan.config
    models = _load_models_json(out)
    todo = [cell for cell in plan.cells() if not (Path(cell.run_dir) / "metrics.json").exists()]
    need = sorted(
        {(cell.model, cell.attack, cell.seed) for cell in todo}
        | {k for k in plan.backdoor if f"{k[0]}/{k[1]}/s{k[2]}" not in models}
    )
    tasks = [
        {
            "key": f"{m}/{a}/s{s}",
            "config": plan.backdoor[(m, a, s)].to_dict(),
            "cache_dir": path_str(plan.cache_dir),
            "data_dir": path_str(plan.data_dir),
            "device": c.train.device,
        }
        for (m, a, s) in need
    ]
    clashes: set = set()  # models trained again whose earlier version this grid's cells used
    if tasks:
        bar = tqdm(total=len(tasks), desc="backdoored models", disable=c.output.quiet, file=sys.stderr)
        for _, res in executor.run(prepare_model, tasks, gpu_task=uses_gpu):
            key = res["key"]
            clash = _another_model(plan, models.get(key), res) if res["ok"] else None
            if res["ok"] and clash is None:
                models[key] = {k: res[k] for k in ("path", "test_metrics", "digest", "config")}
                atomic_write_json(out / "models.json", models)
            else:
                failures[key] = clash or res["error"]
                if clash:
                    clashes.add(key)
                print(f"[onp] backdoored model {key} failed: {failures[key]}", file=sys.stderr)
            bar.update(1)
        bar.close()
    return {k: v for k, v in models.items() if k not in clashes}  # models.json keeps what the cells used


def _another_model(plan: GridPlan, recorded: Optional[Dict[str, Any]], new: Dict[str, Any]) -> Optional[str]:
    """Why the model just prepared must not join the grid: its finished cells used another one (the
    model was trained again: another machine, thread count or code version give other weights), so
    new cells would silently mix two backdoored models in one row. ``None`` when it may join."""
    key = new["key"]
    finished = [
        cell
        for cell in plan.cells()
        if f"{cell.model}/{cell.attack}/s{cell.seed}" == key and (Path(cell.run_dir) / "metrics.json").exists()
    ]
    if not recorded or not finished:
        return None
    if recorded.get("digest") and recorded["digest"] == new["digest"]:
        return None
    if not recorded.get("digest") and recorded.get("test_metrics") == new["test_metrics"]:
        return None  # a grid written before models.json kept digests: the test metrics tell
    then, now = ((m.get("test_metrics") or {}).get("acc") for m in (recorded, new))
    return (
        f"it is not the model that this grid's {len(finished)} finished cell(s) of it used (test ACC {then} then, "
        f"{now} now; weights digest {recorded.get('digest') or 'not recorded'} then, {new['digest']} now): it was "
        f"trained again, and one grid never mixes two models. Start a new grid (another --out), or recompute "
        f"every cell with --overwrite"
    )


def _run_cells(plan: GridPlan, executor: "Executor", models: Dict[str, Any], failures: Dict[str, str]) -> None:
    """Run every unfinished cell whose backdoored model is there; a failure is recorded, never raised."""
    from tqdm.auto import tqdm

    cells = plan.cells()
    todo = [c for c in cells if not (Path(c.run_dir) / "metrics.json").exists()]
    bar = tqdm(
        total=len(cells),
        initial=len(cells) - len(todo),
        desc="grid cells",
        disable=plan.config.output.quiet,
        file=sys.stderr,
    )
    cell_tasks = []
    for c in todo:
        mkey = f"{c.model}/{c.attack}/s{c.seed}"
        if mkey not in models:
            failures[c.key] = f"backdoored model {mkey} unavailable: {failures.get(mkey, 'not trained')}"
            bar.update(1)
            continue
        cell_tasks.append(plan.cell_task(c, models[mkey]["path"]))
    for _, res in executor.run(run_cell, cell_tasks, gpu_task=uses_gpu):
        if not res["ok"]:
            failures[res["key"]] = res["error"]
            tqdm.write(f"[onp] cell {res['key']} failed: {res['error']}", file=sys.stderr)
        bar.update(1)
    bar.close()


def _run_grid(plan: GridPlan) -> CompareResult:
    """Build the backdoored models and the cells of ``plan`` in ``plan.out``, then the leaderboard."""
    out, c = plan.out, plan.config
    output = c.output
    if output.report_only:
        rep = build_report(plan, plots=output.plots, quiet=output.quiet)
        print(f"[onp] leaderboard: {rep['leaderboard']['md']}")
        return CompareResult(out, rep["leaderboard"], rep["rows"], rep["plots"])
    from .seeding import seed_everything

    seed_everything(plan.seeds[0], deterministic=c.execution.deterministic)
    atomic_write_json(out / "config.json", plan.to_json())
    atomic_write_json(out / "env.json", environment_info())
    atomic_write_text(
        out / "README.md",
        f"Reproduce (or resume) this grid with:\n\n    "
        f"{plan.command or reproduce_line()}\n\n"
        f"The leaderboard is in leaderboard.md; plots in plots/.\n",
    )
    failures: Dict[str, str] = {}
    interrupted = False
    executor = make_executor(c)  # fails early (e.g. Ray missing) before any work
    try:
        models = _prepare_models(plan, executor, failures)
        _run_cells(plan, executor, models, failures)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        executor.close()
        if failures:
            atomic_write_json(out / "failures.json", failures)
        elif (out / "failures.json").exists():
            (out / "failures.json").unlink()
        rep = build_report(plan, failures=failures, plots=output.plots and not interrupted, quiet=output.quiet)
    if not output.quiet:
        print(rep["leaderboard"]["md"].read_text())
    print(f"[onp] leaderboard: {rep['leaderboard']['md']}  plots: {out / 'plots'}")
    if failures:
        print(
            f"[onp] {len(failures)} cell(s) failed (see {out / 'failures.json'} and {out / 'logs'}); "
            f"run the same command again to retry them",
            file=sys.stderr,
        )
    return CompareResult(out, rep["leaderboard"], rep["rows"], rep["plots"], failures)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

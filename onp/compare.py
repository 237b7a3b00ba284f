"""``python -m onp.compare``: run a grid of defenses x attacks x seeds and build a leaderboard.

Example::

    python -m onp.compare --model resnet18 --attacks badnets blend trojan sig wanet \\
        --defenses rnp anp awm ngf fp clp ft ppo-gnn --seeds 3

Every grid cell (model, attack, defense, seed) is one run directory in the :mod:`onp.rundir` format
under ``<out>/cells/<attack>/<defense>/s<seed>/`` (``<out>/cells/<model>/<attack>/...`` with several
models). ``seed`` is the seed of the backdoored model (the zoo's training seed) and of the defense.
The backdoored models are trained (or fetched from the zoo cache) first, one per (model, attack,
seed), so that parallel cells never race on the cache. A baseline cell runs ``python -m
onp.baseline`` on that model (``--checkpoint``); a learned-policy cell (a name from
``agents.AGENTS``) runs ``python -m onp.train``.

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
import hashlib
import io
import re
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

from .cli_common import device_name, fraction, int_at_least, path_arg, path_str, run_cli
from .config import parse_overrides
from .io import CheckpointError, RunExistsError, atomic_write_json, atomic_write_text, read_json, run_folder
from .report import LEADERBOARD_NOTES, Cell, build_rows, write_leaderboard
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


def _dirname(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "defense"


# --------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    from .attacks import ATTACKS
    from .data import DATASETS
    from .models import MODELS

    p = argparse.ArgumentParser(prog="python -m onp.compare", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("grid")
    g.add_argument("--model", "--models", dest="models", nargs="+", default=["resnet18"],
                   help=f"architecture(s): {', '.join(MODELS.names())}")
    g.add_argument("--attacks", nargs="+", default=["badnets"], help=f"from {', '.join(ATTACKS.names())}")
    g.add_argument("--defenses", nargs="+", default=["clp", "magnitude"],
                   help="baseline defenses (python -m onp.baseline --list) and/or learned-policy agents "
                        "(agents.AGENTS, e.g. ppo-gnn)")
    g.add_argument("--seeds", type=int_at_least(1), default=1, help="number of seeds (0 .. N-1), or see --seed-list")
    g.add_argument("--seed-list", type=int_at_least(0), nargs="+", default=None,
                   help="explicit seeds (overrides --seeds)")
    b = p.add_argument_group("backdoored models (the zoo)")
    b.add_argument("--dataset", default="fashion-mnist", help=f"one of {', '.join(DATASETS.names())}")
    b.add_argument("--width", type=int, default=None)
    b.add_argument("--epochs", type=int, default=None, help="backdoor training epochs")
    b.add_argument("--data-source", choices=["auto", "full", "sample"], default=None)
    b.add_argument("--data-dir", type=path_arg, default=None,
                   help="folder with the dataset's files (an error if they are not there)")
    b.add_argument("--defense-size", type=int, default=None)
    b.add_argument("--max-train", type=int, default=None)
    b.add_argument("--backdoor-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a BackdoorConfig key (e.g. poison_rate=0.05)")
    b.add_argument("--cache-dir", type=path_arg, default=None)
    d = p.add_argument_group("defenses")
    d.add_argument("--set", action="append", default=[], metavar="[DEFENSE.]KEY=VALUE",
                   help="defense hyperparameter: 'anp.iterations=500' for one defense, 'delta=0.1' for every "
                        "selected baseline that has the key (repeatable)")
    d.add_argument("--oracle-max-fraction", type=fraction, default=None,
                   help="baselines' oracle sweep: largest fraction pruned (analysis only)")
    d.add_argument("--no-oracle", action="store_true", help="skip the baselines' oracle sweeps")
    t = p.add_argument_group("learned policies (onp.train)")
    t.add_argument("--timesteps", type=int_at_least(0), default=None)
    t.add_argument("--asr-estimator", default=None, help="trigger (trigger-aware) or synthesized")
    t.add_argument("--train-config", type=path_arg, default=None, help="YAML config for onp.train (--config)")
    t.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE", help="onp.train --set")
    t.add_argument("--device", type=device_name, default=None,
                   help="device for onp.train and backdoor training (e.g. cuda); with --executor ray it need not "
                        "exist on this machine, only on the workers")
    r = p.add_argument_group("execution")
    r.add_argument("--executor", choices=["local", "processes", "ray"], default="local")
    r.add_argument("--jobs", type=int_at_least(1), default=1,
                   help="parallel local processes (implies --executor processes)")
    r.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local Ray)")
    r.add_argument("--ray-num-cpus", type=int_at_least(1), default=None, help="CPUs of a locally started Ray")
    r.add_argument("--deterministic", action="store_true", help="deterministic torch algorithms in every cell")
    r.add_argument("--out", type=path_arg, default=None, help="output folder (default runs/compare/<model>)")
    r.add_argument("--overwrite", action="store_true",
                   help="start the grid again; the old grid is deleted only once the new one has finished")
    r.add_argument("--report-only", action="store_true", help="only rebuild the leaderboard and plots")
    r.add_argument("--no-plots", action="store_true")
    r.add_argument("--quiet", action="store_true")
    return p


def _seeds(args: argparse.Namespace) -> List[int]:
    if args.seed_list:
        return list(dict.fromkeys(args.seed_list))
    return list(range(args.seeds))


def _split_sets(items: Sequence[str], defenses: Sequence[str]) -> Tuple[Dict[str, List[str]], List[str]]:
    """``--set`` items -> per-defense lists (scoped ``name.key=value``) and unscoped items."""
    scoped: Dict[str, List[str]] = {d: [] for d in defenses}
    unscoped: List[str] = []
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects [DEFENSE.]key=value, got {item!r}")
        key = item.split("=", 1)[0].strip()
        head, _, rest = key.partition(".")
        if rest and head in scoped:
            scoped[head].append(item.split(".", 1)[1])
        else:
            unscoped.append(item)
    return scoped, unscoped


class GridPlan:
    """Everything resolved from the arguments before any work: names, configs, cells."""

    def __init__(self, args: argparse.Namespace):
        from .attacks import ATTACKS
        from .data import DATASETS
        from .models import MODELS

        self.args = args
        for m in args.models:
            MODELS.check(m)
        DATASETS.check(args.dataset)
        for a in args.attacks:
            ATTACKS.check(a)
        baseline_names = _defense_names()
        for d in args.defenses:
            if d not in baseline_names:
                check_policy_name(d, baseline_names)
        self.models = list(dict.fromkeys(args.models))
        self.attacks = list(dict.fromkeys(args.attacks))
        self.defenses = list(dict.fromkeys(args.defenses))
        self.seeds = _seeds(args)
        self.baselines = [d for d in self.defenses if d in baseline_names]
        self.policies = [d for d in self.defenses if d not in baseline_names]
        self.out = Path(args.out or Path("runs") / "compare" / "-".join(self.models))
        if args.executor == "ray":  # Ray workers may run elsewhere: give them absolute paths
            self.out = self.out.expanduser().resolve()
            for key in ("cache_dir", "data_dir"):
                if getattr(args, key) is not None:
                    setattr(args, key, Path(getattr(args, key)).expanduser().resolve())
        self.defense_sets = self._defense_sets()
        self.backdoor = {(m, a, s): self._backdoor_config(m, a, s)
                         for m in self.models for a in self.attacks for s in self.seeds}
        from .io import cache_root
        cache_root(args.cache_dir)  # an empty ONP_CACHE, or one at a file, is refused before any work
        if args.device is not None and args.executor != "ray":  # Ray workers check their own devices
            from .train_config import check_device
            check_device(args.device)  # --device cuda without CUDA: an error, never a CPU run recorded as cuda
        if self.policies:
            self._check_train_settings()
        if args.data_dir is not None and not args.report_only:
            from .data import load_dataset  # a --data-dir without the dataset fails here, not in every cell
            for source in sorted({c.data_source for c in self.backdoor.values()}):
                load_dataset(args.dataset, data_dir=args.data_dir, source=source)

    # -- configs ---------------------------------------------------------------------------------
    def _backdoor_config(self, model: str, attack: str, seed: int) -> "BackdoorConfig":
        from .config import deep_update
        from .zoo import BackdoorConfig
        a = self.args
        data: Dict[str, Any] = {"model": model, "dataset": a.dataset, "attack": attack, "seed": seed}
        for key in ("width", "epochs", "data_source", "defense_size", "max_train"):
            val = getattr(a, key)
            if val is not None:
                data[key] = val
        data = deep_update(data, parse_overrides(a.backdoor_set))
        return BackdoorConfig.from_dict(data).resolved()

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
            if self.args.executor == "ray":  # the workers' device, checked there
                cfg.pop("device", None)
            try:
                resolve_config(cfg)
            except ConfigError as exc:
                raise ConfigError(f"the onp.train settings of the {cell.defense} cells (--train-set, --train-config, "
                                  f"--timesteps, --asr-estimator): {exc}") from None

    def _defense_sets(self) -> Dict[str, List[str]]:
        import baselines
        scoped, unscoped = _split_sets(self.args.set, self.defenses)
        for item in unscoped:
            key = item.split("=", 1)[0].strip().split(".")[0]
            takers = [d for d in self.baselines if key in baselines.DEFENSES.get(d).defaults()]
            if not takers:
                raise ValueError(f"--set {item}: no selected baseline has a hyperparameter {key!r} "
                                 f"(scope it as DEFENSE.{key}=... for one defense, or use --train-set for onp.train)")
            for d in takers:
                scoped[d].append(item)
        for d in self.baselines:  # validate hyperparameters before any work
            baselines.build_defense(d, **parse_overrides(scoped[d]))
        return scoped

    def settings(self) -> Dict[str, Any]:
        """What determines a cell's result (a grid resumed with other settings is refused)."""
        a = self.args
        tc = None
        if a.train_config is not None:
            tc = {"path": str(a.train_config),
                  "sha256": hashlib.sha256(Path(a.train_config).read_bytes()).hexdigest()[:16]}
        return {"models": self.models, "dataset": a.dataset, "width": a.width, "epochs": a.epochs,
                "data_source": a.data_source,
                "defense_size": a.defense_size, "max_train": a.max_train, "backdoor_set": list(a.backdoor_set),
                "set": list(a.set), "oracle_max_fraction": a.oracle_max_fraction, "no_oracle": a.no_oracle,
                "timesteps": a.timesteps, "asr_estimator": a.asr_estimator, "train_config": tc,
                "train_set": list(a.train_set), "deterministic": a.deterministic}

    def config(self) -> Dict[str, Any]:
        a = self.args
        return {"models": self.models, "attacks": self.attacks, "defenses": self.defenses, "seeds": self.seeds,
                "baselines": self.baselines, "policies": self.policies, "settings": self.settings(),
                "executor": a.executor, "jobs": a.jobs, "ray_address": a.ray_address, "out": str(self.out),
                "backdoor_configs": {f"{m}/{at}/s{s}": c.to_dict() for (m, at, s), c in self.backdoor.items()},
                "defense_sets": self.defense_sets, "command": reproduce_line()}

    # -- cells -----------------------------------------------------------------------------------
    def cell_dir(self, model: str, attack: str, defense: str, seed: int) -> Path:
        base = self.out / "cells"
        if len(self.models) > 1:
            base = base / model
        return base / attack / _dirname(defense) / f"s{seed}"

    def cells(self) -> List[Cell]:
        return [Cell(m, a, d, s, "baseline" if d in self.baselines else "policy", self.cell_dir(m, a, d, s))
                for m in self.models for a in self.attacks for d in self.defenses for s in self.seeds]

    def cell_task(self, cell: Cell, model_dir: str) -> Dict[str, Any]:
        """One cell as a picklable task for the executors: the run function's config, the run folder,
        and whether an earlier attempt left it unfinished (a policy then resumes, a baseline restarts)."""
        a = self.args
        run_dir = Path(cell.run_dir)
        started = run_dir.exists() and any(run_dir.iterdir())
        config = (self.baseline_config(cell, model_dir) if cell.kind == "baseline"
                  else self.train_config(cell, model_dir))
        return {"key": cell.key, "kind": cell.kind, "config": config, "run_dir": str(run_dir), "started": started,
                "seed": cell.seed, "model_dir": str(model_dir), "deterministic": a.deterministic,
                "device": a.device if cell.kind == "policy" else None,  # the baselines run on the CPU
                "log": str(self.out / "logs" / (_dirname(cell.key.replace("/", "-")) + ".log"))}

    def baseline_config(self, cell: Cell, model_dir: str) -> Dict[str, Any]:
        """The :class:`onp.baseline_config.BaselineRunConfig` of a baseline cell (as a mapping)."""
        a = self.args
        cfg: Dict[str, Any] = {"method": cell.defense, "params": parse_overrides(self.defense_sets[cell.defense]),
                               "checkpoint": str(model_dir), "defense_seed": cell.seed,
                               "deterministic": a.deterministic, "oracle": not a.no_oracle,
                               "cache_dir": path_str(a.cache_dir), "data_dir": path_str(a.data_dir)}
        if a.oracle_max_fraction is not None:
            cfg["oracle_max_fraction"] = a.oracle_max_fraction
        return cfg

    def train_config(self, cell: Cell, model_dir: Optional[str]) -> Dict[str, Any]:
        """The onp.train config of a learned-policy cell: ``--train-config``, then the grid's settings,
        then ``--train-set`` and the policy's own scoped ``--set`` items. The model is the grid's
        model folder (``model_dir``; ``None``: its zoo config, for checking before any training)."""
        from .config import deep_update, load_yaml
        a = self.args
        cfg: Dict[str, Any] = load_yaml(a.train_config) if a.train_config is not None else {}
        grid: Dict[str, Any] = {"agent": cell.defense, "seed": cell.seed, "cache_dir": path_str(a.cache_dir),
                                "data_dir": path_str(a.data_dir), "deterministic": a.deterministic}
        if model_dir is None:
            grid["backdoor"] = self.backdoor[(cell.model, cell.attack, cell.seed)].to_dict()
        else:
            grid["checkpoint"] = str(model_dir)
        if a.timesteps is not None:
            grid["ppo"] = {"total_timesteps": a.timesteps}
        if a.asr_estimator is not None:
            grid["env"] = {"asr_estimator": a.asr_estimator}
        if a.device is not None:
            grid["device"] = a.device
        cfg = deep_update(deep_update(cfg, grid), parse_overrides(list(a.train_set) +
                                                                  self.defense_sets.get(cell.defense, [])))
        if model_dir is not None:
            cfg.pop("backdoor", None)  # the grid's model folder decides
        return cfg


# --------------------------------------------------------------------------------------------------- tasks


def prepare_model(task: Dict[str, Any]) -> Dict[str, Any]:
    """Train (or fetch) one backdoored model from the zoo; returns its artifact path and test metrics."""
    from .zoo import BackdoorConfig, load_bundle
    try:
        bundle = load_bundle(BackdoorConfig.from_dict(task["config"]), cache_dir=task.get("cache_dir"),
                             data_dir=task.get("data_dir"), device=task.get("device") or "cpu", progress=False)
        return {"key": task["key"], "ok": True, "path": str(bundle.path),
                "test_metrics": bundle.meta.get("test_metrics"), "config": task["config"]}
    except Exception as exc:  # reported per cell
        return {"key": task["key"], "ok": False, "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(), "config": task["config"]}


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


def make_executor(args: argparse.Namespace) -> "Executor":
    """The executor of ``args`` (a seam for tests)."""
    from .executors import make_executor as _make
    return _make(args.executor, jobs=args.jobs, ray_address=args.ray_address, ray_num_cpus=args.ray_num_cpus)


@contextlib.contextmanager
def _grid_folder(plan: GridPlan, args: argparse.Namespace) -> Iterator[Path]:
    """The grid folder ``plan.out``, under the one rule of :func:`onp.io.run_folder`.

    A folder that onp did not create (or an onp run folder, not a grid) is refused, also with
    ``--overwrite``. Without ``--overwrite`` an existing grid is continued (its settings must match).
    With ``--overwrite`` the old grid waits in a hidden sibling folder while the new one is built in
    place, and is deleted once the new grid has finished (failed cells included) or moved back if it
    raises (Ctrl-C included). A new grid that fails before any model or cell is done is removed.
    """
    replace = bool(args.overwrite and not args.report_only)
    with run_folder(plan.out, tool="onp.compare", overwrite=replace, resume=not replace, done_file="config.json",
                    resumable=("models.json", "cells"), stage=False) as out:
        cfg_path = out / "config.json"
        if not replace and cfg_path.exists() and not args.report_only:
            old = read_json(cfg_path).get("settings")
            new = plan.settings()
            if old != new:
                diff = sorted(k for k in set(old or {}) | set(new) if (old or {}).get(k) != new.get(k))
                raise RunExistsError(f"{out} holds a grid run with other settings (differing: {', '.join(diff)}); "
                                     f"pass --overwrite to start again or choose another --out")
        yield out


def _load_models_json(out: Path) -> Dict[str, Any]:
    path = out / "models.json"
    return read_json(path) if path.exists() else {}


def model_layers(model_dir: Optional[str]) -> Optional[List[tuple]]:
    """``[(bn_name, offset, num_channels)]`` of a zoo artifact's model in graph numbering (None when
    the folder cannot be read: the per-layer plot then uses the layer names of pruned.json)."""
    if not model_dir:
        return None
    from baselines import DefenseError, neuron_layout

    from .zoo import load_model
    try:
        layout = neuron_layout(load_model(Path(model_dir)))
    except (OSError, ValueError, CheckpointError, DefenseError):
        return None
    return [(layer.bn_name, layer.offset, layer.num_channels) for layer in layout.layers]


def build_report(plan: GridPlan, *, failures: Optional[Dict[str, str]] = None, plots: bool = True,
                 quiet: bool = False) -> Dict[str, Any]:
    """Read every cell, write the leaderboard and the plots; returns their paths and the rows."""
    failures = failures or {}
    cells = [c.load() for c in plan.cells()]
    for c in cells:
        if c.status != "ok" and c.key in failures:
            c.status, c.error = "failed", failures[c.key]
    models = _load_models_json(plan.out)
    before = {k: v.get("test_metrics") for k, v in models.items() if v.get("test_metrics")}
    rows = build_rows(cells, models=plan.models, attacks=plan.attacks, defenses=plan.defenses, seeds=plan.seeds,
                      before=before)
    a = plan.args
    title = f"Leaderboard: {', '.join(plan.models)} on {a.dataset}"
    paths = write_leaderboard(rows, plan.out, title=title, notes=LEADERBOARD_NOTES,
                              extra={"models": plan.models, "attacks": plan.attacks, "defenses": plan.defenses,
                                     "seeds": plan.seeds})
    out = {"leaderboard": paths, "rows": rows, "cells": cells, "plots": []}
    if plots:
        from . import plots as _plots
        try:
            out["plots"] = _plots.make_all(plan.out / "plots", cells, rows, models=models, layers_of=model_layers)
        except Exception as exc:  # plots must never lose a finished grid
            print(f"[onp] warning: plots failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    plan = GridPlan(args)  # validates every name and hyperparameter before any work
    with _grid_folder(plan, args):
        return _run_grid(plan, args)


def _run_grid(plan: GridPlan, args: argparse.Namespace) -> int:
    """Build the backdoored models and the cells of ``plan`` in ``plan.out``, then the leaderboard."""
    out = plan.out
    if args.report_only:
        rep = build_report(plan, plots=not args.no_plots, quiet=args.quiet)
        print(f"[onp] leaderboard: {rep['leaderboard']['md']}")
        return 0
    from .seeding import seed_everything
    seed_everything(plan.seeds[0], deterministic=args.deterministic)
    atomic_write_json(out / "config.json", plan.config())
    atomic_write_json(out / "env.json", environment_info())
    atomic_write_text(out / "README.md", f"Reproduce (or resume) this grid with:\n\n    {reproduce_line()}\n\n"
                                         f"The leaderboard is in leaderboard.md; plots in plots/.\n")
    from tqdm.auto import tqdm

    failures: Dict[str, str] = {}
    interrupted = False
    executor = make_executor(args)  # fails early (e.g. Ray missing) before any work
    try:
        # 1) the backdoored models, one per (model, attack, seed), before any cell
        models = _load_models_json(out)
        cells = plan.cells()
        todo = [c for c in cells if not (Path(c.run_dir) / "metrics.json").exists()]
        need = sorted({(c.model, c.attack, c.seed) for c in todo} | {k for k in plan.backdoor
                                                                      if f"{k[0]}/{k[1]}/s{k[2]}" not in models})
        tasks = [{"key": f"{m}/{a}/s{s}", "config": plan.backdoor[(m, a, s)].to_dict(),
                  "cache_dir": str(args.cache_dir) if args.cache_dir else None,
                  "data_dir": str(args.data_dir) if args.data_dir else None, "device": args.device}
                 for (m, a, s) in need]
        if tasks:
            bar = tqdm(total=len(tasks), desc="backdoored models", disable=args.quiet, file=sys.stderr)
            for _, res in executor.run(prepare_model, tasks, gpu_task=uses_gpu):
                if res["ok"]:
                    models[res["key"]] = {k: res[k] for k in ("path", "test_metrics", "config")}
                    atomic_write_json(out / "models.json", models)
                else:
                    failures[res["key"]] = res["error"]
                    print(f"[onp] backdoored model {res['key']} failed: {res['error']}", file=sys.stderr)
                bar.update(1)
            bar.close()
        # 2) the cells
        bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="grid cells", disable=args.quiet,
                   file=sys.stderr)
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
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        executor.close()
        if failures:
            atomic_write_json(out / "failures.json", failures)
        elif (out / "failures.json").exists():
            (out / "failures.json").unlink()
        rep = build_report(plan, failures=failures, plots=not args.no_plots and not interrupted, quiet=args.quiet)
    if not args.quiet:
        print(rep["leaderboard"]["md"].read_text())
    print(f"[onp] leaderboard: {rep['leaderboard']['md']}  plots: {out / 'plots'}")
    if failures:
        print(f"[onp] {len(failures)} cell(s) failed (see {out / 'failures.json'} and {out / 'logs'}); "
              f"run the same command again to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

"""``python -m onp.baseline``: run a baseline backdoor defense on a (cached) backdoored model.

Example::

    python -m onp.baseline --method anp --model resnet18 --attack badnets --set iterations=500

The defense sees only the defender's data (``bundle.defense_data``); the test set and the real
trigger are used afterwards to report ACC / ASR / RA / DER before and after, and for the
``oracle_sweep.json`` analysis file (never for choosing anything). Writes a run directory
(``runs/baseline/<method>-<attack>-<model>-s<seed>`` by default; see :mod:`onp.rundir`).

The flags map onto a :class:`~onp.baseline_config.BaselineRunConfig` (:func:`config_from_args`; the
library entry is :func:`run_baseline`). The backdoored-model flags are the group every onp tool
shares (:func:`onp.cli_common.add_backdoor_flags`); ``--seed`` is the seed of the backdoored model and
of the defense (with ``--checkpoint``: of the defense), ``--defense-seed`` the defense's only.
``--set KEY=VALUE`` overrides a run-config key (``oracle_step=0.02``, ``params.iterations=500``); a key
that is not one is a hyperparameter of the method (``iterations=500`` is short for
``params.iterations=500``). ``--list`` lists the methods with their default hyperparameters.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Union

from torch import nn

from .baseline_config import BaselineRunConfig
from .cli_common import (
    HelpFormatter,
    add_backdoor_flags,
    add_list_flag,
    add_set_flag,
    backdoor_overrides,
    finite_float,
    fraction,
    int_at_least,
    model_source,
    path_arg,
    print_listing,
    run_cli,
    set_overrides,
)
from .config import deep_update
from .data.augment import Augment
from .io import cache_root, run_folder, to_jsonable
from .metrics import evaluate_backdoor, with_der
from .rundir import RunResult, reproduce_line, write_run
from .seeding import seed_everything
from .zoo import BackdoorBundle, BackdoorConfig, load_bundle, open_bundle


def _baselines() -> ModuleType:
    import baselines  # noqa: F401  (registers the defenses)

    return baselines


def defend(
    bundle: BackdoorBundle,
    method: str,
    params: Optional[Dict[str, Any]] = None,
    *,
    seed: int = 0,
    report_fn: Optional[Callable[[str, nn.Module], None]] = None,
) -> Any:
    """Run defense ``method`` on ``bundle``'s model using **only** ``bundle.defense_data`` (plus the
    dataset spec for the crop/flip augmentation). Never touches ``bundle.test_x`` / ``test_y`` /
    ``attack``; ``report_fn(event, model)`` is the only way out for test-time logging."""
    bl = _baselines()
    defense = bl.build_defense(method, **(params or {}))
    spec = bundle.spec
    data = bundle.defense_data if defense.needs_data or _uses_val(defense) else None
    return defense.fit(bundle.model, data, seed=seed, augment=Augment.for_spec(spec), report_fn=report_fn)


def _uses_val(defense: Any) -> bool:
    return getattr(defense.params, "operating_point", None) == "delta"


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m onp.baseline`` flags; they map onto a :class:`BaselineRunConfig` (:func:`config_from_args`)."""
    methods = _baselines().DEFENSES.names()
    p = argparse.ArgumentParser(
        prog="python -m onp.baseline", description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument("--method", default=None, help=f"one of {', '.join(methods)}")
    add_list_flag(p, "the methods with their default hyperparameters")
    add_set_flag(
        p,
        help="override a baseline run config key, dotted (e.g. oracle_step=0.02; repeatable); a key that "
        "is not one is a hyperparameter of the method, short for params.KEY (e.g. iterations=500; "
        "see --list)",
    )
    p.add_argument(
        "--delta", type=finite_float, default=None, help="max clean-ACC drop on defense-val (pruning methods)"
    )
    p.add_argument("--operating-point", choices=["delta", "threshold", "number"], default=None)
    p.add_argument("--defense-seed", type=int_at_least(0), default=None, help="seed of the defense (default: --seed)")
    add_backdoor_flags(p, title="backdoored model (default: resnet18, fashion-mnist, badnets, seed 0; or --checkpoint)")
    o = p.add_argument_group("oracle sweep (test-set analysis, never used to choose)")
    o.add_argument("--no-oracle", action="store_true", help="skip the oracle sweep (analysis only)")
    o.add_argument(
        "--oracle-max-fraction", type=fraction, default=0.5, help="oracle sweep: largest fraction of neurons pruned"
    )
    o.add_argument(
        "--oracle-step",
        type=fraction,
        default=0.01,
        help="oracle sweep: grid step as a fraction of all neurons (plus powers of two)",
    )
    r = p.add_argument_group("run directory")
    r.add_argument("--out", type=path_arg, default=None, help="run directory")
    r.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing onp run directory (only once the new run succeeded)",
    )
    r.add_argument("--deterministic", action="store_true", help="deterministic torch algorithms")
    r.add_argument("--quiet", action="store_true")
    return p


def _set_items(args: argparse.Namespace) -> Dict[str, Any]:
    """``--set`` as overrides of the :class:`BaselineRunConfig` (other keys: ``params.KEY``)."""
    return set_overrides(args.set, BaselineRunConfig.model_fields, shorthand="params")


def config_from_args(args: argparse.Namespace) -> BaselineRunConfig:
    """The :class:`BaselineRunConfig` of the command line: the flags, then ``--set`` (``--delta`` and
    ``--operating-point`` have the last word on those two hyperparameters)."""
    sets = _set_items(args)
    params = sets.pop("params", {})
    if isinstance(params, dict):  # else the config names the bad value
        for flag, key in ((args.delta, "delta"), (args.operating_point, "operating_point")):
            if flag is not None:
                params[key] = flag
    source = model_source(args)
    defense_seed = args.defense_seed
    if defense_seed is None and source["checkpoint"] is not None:
        defense_seed = args.seed  # the model folder has its own seed: --seed is the defense's
    data: Dict[str, Any] = {
        "method": args.method,
        "params": params,
        "defense_seed": defense_seed,
        "deterministic": args.deterministic,
        "oracle": not args.no_oracle,
        "oracle_max_fraction": args.oracle_max_fraction,
        "oracle_step": args.oracle_step,
        "cache_dir": source["cache_dir"],
        "data_dir": source["data_dir"],
    }
    if source["checkpoint"] is not None:
        data["checkpoint"] = source["checkpoint"]
    else:
        data["backdoor"] = backdoor_overrides(args)
    return BaselineRunConfig.from_dict(deep_update(data, sets))


def baseline_command(config: Union[BaselineRunConfig, Dict[str, Any]], out: Path) -> str:
    """The ``python -m onp.baseline`` command line that runs ``config`` into ``out``."""
    cfg = config if isinstance(config, BaselineRunConfig) else BaselineRunConfig.from_dict(config)
    default = BaselineRunConfig(method=cfg.method, checkpoint=cfg.checkpoint, backdoor=cfg.backdoor)
    argv = ["--method", cfg.method]
    if cfg.checkpoint is not None:
        argv += ["--checkpoint", cfg.checkpoint]
    else:
        zoo = BackdoorConfig().resolved().to_dict()
        for key, val in (cfg.backdoor or {}).items():
            if key in ("model", "dataset", "attack", "seed"):
                argv += [f"--{key}", str(val)]
            elif val != zoo.get(key):
                argv += ["--backdoor-set", f"{key}={json.dumps(val)}"]
    if cfg.defense_seed is not None:
        argv += ["--defense-seed", str(cfg.defense_seed)]
    for key, val in cfg.params.items():
        argv += ["--set", f"{key}={json.dumps(val)}"]
    if not cfg.oracle:
        argv.append("--no-oracle")
    for key in ("oracle_max_fraction", "oracle_step"):
        if getattr(cfg, key) != getattr(default, key):
            argv += [f"--{key.replace('_', '-')}", str(getattr(cfg, key))]
    for key in ("cache_dir", "data_dir"):
        if getattr(cfg, key) is not None:
            argv += [f"--{key.replace('_', '-')}", str(getattr(cfg, key))]
    if cfg.deterministic:
        argv.append("--deterministic")
    return reproduce_line(["python -m onp.baseline"] + argv + ["--out", str(out)])


def default_run_dir(method: str, backdoor: Dict[str, Any], seed: int) -> Path:
    name = "clean" if backdoor.get("clean") else backdoor["attack"]
    return Path("runs") / "baseline" / f"{method}-{name}-{backdoor['model']}-s{seed}"


def run_baseline(
    config: Union[BaselineRunConfig, Dict[str, Any]],
    out: Optional[Path] = None,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    command: Optional[str] = None,
) -> RunResult:
    """Run one baseline defense as configured and write its run folder; return the :class:`RunResult`.

    The method and its hyperparameters are checked (names, types, ranges) before any model is loaded.
    The defense sees only the defender's data; the test set and the real trigger are used afterwards,
    for the report and ``oracle_sweep.json`` only.
    """
    cfg = config if isinstance(config, BaselineRunConfig) else BaselineRunConfig.from_dict(config)
    bl = _baselines()
    method = bl.DEFENSES.check(cfg.method)
    defense = bl.build_defense(method, **cfg.params)  # validates params (names, types, ranges) before any heavy work
    cache_root(cfg.cache_dir)  # an empty ONP_CACHE, or one at a file, is refused before any work
    data_dir = Path(cfg.data_dir) if cfg.data_dir else None
    if cfg.checkpoint is not None:
        bundle = open_bundle(cfg.checkpoint, data_dir=data_dir)
        backdoor = bundle.config
    else:
        bundle, backdoor = None, BackdoorConfig.from_dict(cfg.backdoor or {}).resolved()
    seed = cfg.defense_seed if cfg.defense_seed is not None else backdoor.seed
    seed_everything(seed, deterministic=cfg.deterministic)
    out = Path(out) if out is not None else default_run_dir(method, backdoor.to_dict(), seed)
    # a failed run leaves nothing; an existing run is replaced (--overwrite) only once this one succeeded
    with run_folder(out, tool="onp.baseline", overwrite=overwrite) as work:
        if bundle is None:
            bundle = load_bundle(backdoor, cache_dir=cfg.cache_dir, data_dir=data_dir, progress=not quiet)
        metrics = _defend_and_report(bundle, defense, method, seed, cfg, work, command)
        print(
            f"[onp] {method} on {backdoor.model}/{'clean' if backdoor.clean else backdoor.attack}: "
            f"ACC {metrics['before']['acc']:.4f}->{metrics['acc']:.4f}  "
            f"ASR {metrics['before']['asr']:.4f}->{metrics['asr']:.4f}  RA {metrics['ra']:.4f}  "
            f"DER {metrics['der']:.4f}  pruned {metrics['n_pruned']}  {metrics['wall_time']:.1f}s  -> {out}"
        )
    return RunResult(out, metrics)


def _defend_and_report(
    bundle: BackdoorBundle,
    defense: Any,
    method: str,
    seed: int,
    cfg: BaselineRunConfig,
    work: Path,
    command: Optional[str],
) -> Dict[str, Any]:
    """Fit ``defense`` on the defense data, measure before/after on the test set, write the run."""
    bl = _baselines()
    before = evaluate_backdoor(bundle.model, bundle.test_x, bundle.test_y, bundle.attack)
    reports: Dict[str, Any] = {}

    def report_fn(event: str, model: nn.Module) -> None:  # test metrics for logging only; nothing flows back
        reports[event] = evaluate_backdoor(model, bundle.test_x, bundle.test_y, bundle.attack)

    result = defend(bundle, method, cfg.params, seed=seed, report_fn=report_fn)
    after = with_der(before, evaluate_backdoor(result.model, bundle.test_x, bundle.test_y, bundle.attack))
    try:
        layout = bl.neuron_layout(bundle.model)
    except bl.DefenseError:
        layout = None
    pruned_names = layout.names(result.pruned) if result.pruned is not None and layout is not None else None
    extra = {}
    if cfg.oracle:
        if result.scores is not None and layout is not None:
            mode = (result.info.get("operating_point") or {}).get("prune_mode", "gamma")
            sweep = bl.oracle_sweep(
                bundle.model,
                layout,
                result.scores,
                bundle.test_x,
                bundle.test_y,
                bundle.attack,
                max_fraction=cfg.oracle_max_fraction,
                grid_step=cfg.oracle_step,
                mode=mode,
            )
            sweep["method"] = method
            sweep["note"] = "test metrics after pruning the ORIGINAL model in the method's score order"
        else:
            sweep = {
                "label": bl.ORACLE_LABEL,
                "method": method,
                "sweep": [],
                "note": f"{method} does not score neurons; nothing to sweep",
            }
        extra["oracle_sweep.json"] = sweep
    op = result.info.get("operating_point")
    metrics = {
        **after,
        "before": before,
        "method": method,
        "n_pruned": result.n_pruned,
        "wall_time": result.wall_time,
        "forward_passes": result.forward_passes,
        "backward_passes": result.backward_passes,
        "operating_point": to_jsonable(op),
        "info": to_jsonable({k: v for k, v in result.info.items() if k not in ("operating_point", "params")}),
        "reports": reports,
        "reports_note": "test metrics of intermediate models, logged via report_fn; never used by the defense",
        "data_source": bundle.meta.get("data_source"),
    }
    config = {
        "method": method,
        "params": defense.params.to_dict(),
        "defense_seed": seed,
        "deterministic": cfg.deterministic,
        "backdoor": bundle.config.to_dict(),
        "model_dir": str(bundle.path),
        "run_config": cfg.to_dict(),
    }
    write_run(
        work,
        config=config,
        metrics=metrics,
        pruned=result.pruned if result.pruned is not None else None,
        pruned_names=pruned_names,
        model_state=result.model.state_dict(),
        scores=result.scores,
        extra=extra,
        command=command,
    )
    return metrics


def listing() -> List[str]:
    """What ``--list`` prints: each method with its default hyperparameters."""
    bl = _baselines()
    return [f"{name}: {json.dumps(bl.DEFENSES.get(name).defaults())}" for name in bl.DEFENSES.names()]


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m onp.baseline``: run one baseline defense into a run directory; see the module doc."""
    args = build_parser().parse_args(argv)
    bl = _baselines()
    if args.list:
        return print_listing(listing())
    if args.method is None and "method" not in _set_items(args):
        raise ValueError(f"--method is required; valid choices: {', '.join(bl.DEFENSES.names())}")
    cfg = config_from_args(args)
    method = bl.DEFENSES.check(cfg.method)
    defaults = bl.DEFENSES.get(method).defaults()
    for flag, key in ((args.delta, "delta"), (args.operating_point, "operating_point")):
        if flag is not None and key not in defaults:
            raise ValueError(f"--{key.replace('_', '-')} does not apply to {method!r} (it has no operating point)")
    run_baseline(cfg, args.out, overwrite=args.overwrite, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

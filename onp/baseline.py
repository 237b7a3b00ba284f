"""``python -m onp.baseline``: run a baseline backdoor defense on a (cached) backdoored model.

Example::

    python -m onp.baseline --defense anp --model resnet18 --attack badnets --set iterations=500

The defense sees only the defender's data (``bundle.defense_data``); the test set and the real
trigger are used afterwards to report ACC / ASR / RA / DER before and after, and for the
``oracle_sweep.json`` analysis file (never for choosing anything). Writes a run directory
(``runs/baseline/<defense>-<attack>-<model>-s<seed>`` by default; see :mod:`onp.rundir`).

The flags map onto a :class:`~onp.baseline_config.BaselineRunConfig` (:func:`config_from_args`; the
library entry is :func:`run_baseline`). The backdoored-model flags are the group every onp tool
shares (:func:`onp.cli_common.add_backdoor_flags`); ``--seed`` is the seed of the backdoored model and
of the defense (with ``--checkpoint``: of the defense), ``--defense-seed`` the defense's only.
``--set KEY=VALUE`` overrides a run-config key (``oracle_step=0.02``, ``params.iterations=500``); a key
that is not one is a hyperparameter of the defense (``iterations=500`` is short for
``params.iterations=500``). ``--list`` lists the defenses with their default hyperparameters.

``--protocol`` (run-config key ``protocol``, :mod:`baselines.protocols`) is which defender images the
defense fits on and which rule sets its operating point: ``delta`` (default; fit on defense-train,
the largest pruning within ``delta`` on defense-validation) or ``paper`` (the paper's fixed rule,
e.g. ANP masks <= 0.2, fitted on the whole pool of defender images). ``metrics.json["protocol"]``
records it with the image counts.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import nn

from .baseline_config import BaselineRunConfig
from .cli_common import (
    HelpFormatter,
    add_backdoor_flags,
    add_list_flag,
    add_set_flag,
    backdoor_overrides,
    device_arg,
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
from .data.defense import PROTOCOLS
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
    defense_name: str,
    params: Optional[Dict[str, Any]] = None,
    *,
    seed: int = 0,
    report_fn: Optional[Callable[[str, nn.Module], None]] = None,
    protocol: str = "delta",
    device: str = "cpu",
) -> Any:
    """Run defense ``defense_name`` on ``bundle``'s model using **only** ``bundle.defense_data`` (plus the
    dataset spec for the crop/flip augmentation). Never touches ``bundle.test_x`` / ``test_y`` /
    ``attack``; ``report_fn(event, model)`` is the only way out for test-time logging.

    ``protocol`` (:mod:`baselines.protocols`): ``delta`` fits on the defense data as it is (defense-train;
    the operating point on defense-val); ``paper`` sets the paper's rule on ``params`` and fits on the
    whole pool (defense-train and defense-val together, no validation images). The result's
    ``info["protocol"]`` records the protocol and how many images the defense was given. ``device``:
    where the defense computes (the result comes back on the CPU)."""
    from baselines.protocols import protocol_data, protocol_info, protocol_params

    bl = _baselines()
    defense = bl.build_defense(defense_name, **protocol_params(defense_name, protocol, params))
    pool = bundle.defense_data
    data = protocol_data(protocol, pool if defense.needs_data or _uses_val(defense) else None)
    result = defense.fit(
        bundle.model, data, seed=seed, augment=Augment.for_spec(bundle.spec), report_fn=report_fn, device=device
    )
    result.info["protocol"] = protocol_info(defense_name, protocol, pool, data)
    return result


def _uses_val(defense: Any) -> bool:
    return getattr(defense.params, "operating_point", None) == "delta"


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m onp.baseline`` flags; they map onto a :class:`BaselineRunConfig` (:func:`config_from_args`)."""
    names = _baselines().DEFENSES.names()
    p = argparse.ArgumentParser(
        prog="python -m onp.baseline", description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument(
        "--defense",
        "--method",
        default=None,
        help=f"the baseline defense: one of {', '.join(names)} (--method: the old spelling)",
    )
    add_list_flag(p, "the defenses with their default hyperparameters")
    add_set_flag(
        p,
        help="override a baseline run config key, dotted (e.g. oracle_step=0.02; repeatable); a key that "
        "is not one is a hyperparameter of the defense, short for params.KEY (e.g. iterations=500; "
        "see --list)",
    )
    p.add_argument(
        "--delta", type=finite_float, default=None, help="max clean-ACC drop on defense-val (pruning methods)"
    )
    p.add_argument("--operating-point", choices=["delta", "threshold", "number"], default=None)
    p.add_argument(
        "--protocol",
        choices=list(PROTOCOLS),
        default=None,
        help="delta (default: fit on defense-train, the largest pruning within --delta on defense-val) or "
        "paper (the paper's fixed rule, e.g. ANP masks <= 0.2, fitted on all the defender's images)",
    )
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
    r.add_argument(
        "--device", type=device_arg, default="cpu", help="where the defense computes: cpu, cuda, cuda:N or mps"
    )
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
        "defense": args.defense,
        "params": params,
        "defense_seed": defense_seed,
        "deterministic": args.deterministic,
        "device": args.device,
        "oracle": not args.no_oracle,
        "oracle_max_fraction": args.oracle_max_fraction,
        "oracle_step": args.oracle_step,
        "cache_dir": source["cache_dir"],
        "data_dir": source["data_dir"],
    }
    if args.protocol is not None:
        data["protocol"] = args.protocol
    if source["checkpoint"] is not None:
        data["checkpoint"] = source["checkpoint"]
    else:
        data["backdoor"] = backdoor_overrides(args)
    return BaselineRunConfig.from_dict(deep_update(data, sets))


def baseline_command(config: Union[BaselineRunConfig, Dict[str, Any]], out: Path) -> str:
    """The ``python -m onp.baseline`` command line that runs ``config`` into ``out``."""
    cfg = config if isinstance(config, BaselineRunConfig) else BaselineRunConfig.from_dict(config)
    default = BaselineRunConfig(defense=cfg.defense, checkpoint=cfg.checkpoint, backdoor=cfg.backdoor)
    argv = ["--defense", cfg.defense]
    if cfg.protocol != default.protocol:
        argv += ["--protocol", cfg.protocol]
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
    if cfg.device != default.device:
        argv += ["--device", cfg.device]
    return reproduce_line(["python -m onp.baseline"] + argv + ["--out", str(out)])


def default_run_dir(defense_name: str, backdoor: Dict[str, Any], seed: int, protocol: str = "delta") -> Path:
    """``runs/baseline/<defense>-<attack>-<model>-s<seed>`` (``<defense>-paper-...`` for the paper protocol)."""
    name = "clean" if backdoor.get("clean") else backdoor["attack"]
    label = defense_name if protocol == "delta" else f"{defense_name}-{protocol}"
    return Path("runs") / "baseline" / f"{label}-{name}-{backdoor['model']}-s{seed}"


def run_baseline(
    config: Union[BaselineRunConfig, Dict[str, Any]],
    out: Optional[Path] = None,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    command: Optional[str] = None,
) -> RunResult:
    """Run one baseline defense as configured and write its run folder; return the :class:`RunResult`.

    The defense and its hyperparameters are checked (names, types, ranges) before any model is loaded.
    The defense sees only the defender's data; the test set and the real trigger are used afterwards,
    for the report and ``oracle_sweep.json`` only.
    """
    from baselines.protocols import protocol_params

    cfg = config if isinstance(config, BaselineRunConfig) else BaselineRunConfig.from_dict(config)
    bl = _baselines()
    defense_name = bl.DEFENSES.check(cfg.defense)
    # validates the params (names, types, ranges) and the protocol's rule before any heavy work
    defense = bl.build_defense(defense_name, **protocol_params(defense_name, cfg.protocol, cfg.params))
    cache_root(cfg.cache_dir)  # an empty ONP_CACHE, or one at a file, is refused before any work
    data_dir = Path(cfg.data_dir) if cfg.data_dir else None
    if cfg.checkpoint is not None:
        bundle = open_bundle(cfg.checkpoint, data_dir=data_dir)
        backdoor = bundle.config
    else:
        bundle, backdoor = None, BackdoorConfig.from_dict(cfg.backdoor or {}).resolved()
    seed = cfg.defense_seed if cfg.defense_seed is not None else backdoor.seed
    seed_everything(seed, deterministic=cfg.deterministic)
    out = Path(out) if out is not None else default_run_dir(defense_name, backdoor.to_dict(), seed, cfg.protocol)
    # a failed run leaves nothing; an existing run is replaced (--overwrite) only once this one succeeded
    with run_folder(out, tool="onp.baseline", overwrite=overwrite) as work:
        if bundle is None:
            bundle = load_bundle(backdoor, cache_dir=cfg.cache_dir, data_dir=data_dir, progress=not quiet)
        metrics = _defend_and_report(bundle, defense, defense_name, seed, cfg, work, command)
        label = defense_name if cfg.protocol == "delta" else f"{defense_name}[{cfg.protocol}]"
        print(
            f"[onp] {label} on {backdoor.model}/{'clean' if backdoor.clean else backdoor.attack}: "
            f"ACC {metrics['before']['acc']:.4f}->{metrics['acc']:.4f}  "
            f"ASR {metrics['before']['asr']:.4f}->{metrics['asr']:.4f}  RA {metrics['ra']:.4f}  "
            f"DER {metrics['der']:.4f}  pruned {metrics['n_pruned']}  {metrics['wall_time']:.1f}s  -> {out}"
        )
    return RunResult(out, metrics)


def _test_metrics(bundle: BackdoorBundle, model: nn.Module, device: str) -> Dict[str, float]:
    """Test ACC / ASR / RA of ``model`` with the real trigger, computed on ``device`` (the model is left
    where it is: a model elsewhere is copied there); for the report only."""
    return evaluate_backdoor(_model_on(model, device), bundle.test_x, bundle.test_y, bundle.attack)


def _model_on(model: nn.Module, device: str) -> nn.Module:
    """``model`` itself when its parameters are already on ``device``, else a copy moved there."""
    want, param = torch.device(device), next(model.parameters(), None)
    here = param is None or (param.device.type == want.type and want.index in (None, param.device.index))
    return model if here else copy.deepcopy(model).to(want)


def _defend_and_report(
    bundle: BackdoorBundle,
    defense: Any,
    defense_name: str,
    seed: int,
    cfg: BaselineRunConfig,
    work: Path,
    command: Optional[str],
) -> Dict[str, Any]:
    """Fit ``defense`` on the defense data (under ``cfg.protocol``), measure before/after on the test
    set, write the run."""
    before = _test_metrics(bundle, bundle.model, cfg.device)
    reports: Dict[str, Any] = {}

    def report_fn(event: str, model: nn.Module) -> None:  # test metrics for logging only; nothing flows back
        reports[event] = _test_metrics(bundle, model, cfg.device)

    result = defend(
        bundle, defense_name, cfg.params, seed=seed, report_fn=report_fn, protocol=cfg.protocol, device=cfg.device
    )
    after = with_der(before, _test_metrics(bundle, result.model, cfg.device))
    layout = _layout_or_none(bundle.model)
    pruned_names = layout.names(result.pruned) if result.pruned is not None and layout is not None else None
    extra = {"oracle_sweep.json": _oracle_sweep(bundle, result, layout, defense_name, cfg)} if cfg.oracle else {}
    metrics = {
        **_run_metrics(result, defense_name, before, after, reports),
        "data_source": bundle.meta.get("data_source"),
    }
    config = {
        "defense": defense_name,
        "protocol": cfg.protocol,
        "params": defense.params.to_dict(),  # under protocol=paper: with the paper's rule set
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
        pruned=result.pruned,
        pruned_names=pruned_names,
        model_state=result.model.state_dict(),
        scores=result.scores,
        extra=extra,
        command=command,
    )
    return metrics


def _run_metrics(
    result: Any, defense_name: str, before: Dict[str, float], after: Dict[str, float], reports: Dict[str, Any]
) -> Dict[str, Any]:
    """A baseline run's ``metrics.json`` (without the data source): the test metrics before and after, the
    defense's cost and what it reported about itself."""
    hidden = ("operating_point", "params", "protocol")  # written as their own keys (params: config.json)
    return {
        **after,
        "before": before,
        "defense": defense_name,
        "protocol": to_jsonable(result.info.get("protocol")),
        "n_pruned": result.n_pruned,
        "wall_time": result.wall_time,
        "forward_passes": result.forward_passes,
        "backward_passes": result.backward_passes,
        "operating_point": to_jsonable(result.info.get("operating_point")),
        "info": to_jsonable({k: v for k, v in result.info.items() if k not in hidden}),
        "reports": reports,
        "reports_note": "test metrics of intermediate models, logged via report_fn; never used by the defense",
    }


def _layout_or_none(model: nn.Module) -> Any:
    """The model's neuron layout, or None for a model without BatchNorm2d."""
    from .graph import UnsupportedModelError, neuron_layout

    try:
        return neuron_layout(model)
    except UnsupportedModelError:
        return None


def _oracle_sweep(bundle: BackdoorBundle, result: Any, layout: Any, defense_name: str, cfg: BaselineRunConfig) -> Any:
    """``oracle_sweep.json``: test metrics against the number pruned in the defense's score order
    (analysis only, after the defense has finished; never used to choose anything)."""
    bl = _baselines()
    if result.scores is None or layout is None:
        return {
            "label": bl.ORACLE_LABEL,
            "defense": defense_name,
            "sweep": [],
            "note": f"{defense_name} does not score neurons; nothing to sweep",
        }
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
    sweep["defense"] = defense_name
    sweep["note"] = "test metrics after pruning the ORIGINAL model in the defense's score order"
    return sweep


def listing() -> List[str]:
    """What ``--list`` prints: each defense with its default hyperparameters."""
    bl = _baselines()
    return [f"{name}: {json.dumps(bl.DEFENSES.get(name).defaults())}" for name in bl.DEFENSES.names()]


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m onp.baseline``: run one baseline defense into a run directory; see the module doc."""
    args = build_parser().parse_args(argv)
    bl = _baselines()
    if args.list:
        return print_listing(listing())
    if args.defense is None and "defense" not in _set_items(args):
        raise ValueError(f"--defense is required; valid choices: {', '.join(bl.DEFENSES.names())}")
    cfg = config_from_args(args)
    defense_name = bl.DEFENSES.check(cfg.defense)
    defaults = bl.DEFENSES.get(defense_name).defaults()
    for flag, key in ((args.delta, "delta"), (args.operating_point, "operating_point")):
        if flag is not None and key not in defaults:
            raise ValueError(
                f"--{key.replace('_', '-')} does not apply to {defense_name!r} (it has no operating point)"
            )
    run_baseline(cfg, args.out, overwrite=args.overwrite, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

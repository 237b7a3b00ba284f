"""``python -m onp.backdoor``: train (or fetch from the cache) a backdoored model.

Example::

    python -m onp.backdoor --model resnet18 --dataset fashion-mnist --attack badnets --width 16 --epochs 5

The run config of this tool is the :class:`~onp.zoo.BackdoorConfig` itself: ``--config FILE`` (YAML of
its keys) is merged onto its defaults, then the flags, then ``--set KEY=VALUE`` (any of its keys,
dotted for nested ones). The backdoored-model flags are the group every onp tool shares
(:func:`onp.cli_common.add_backdoor_flags`; here ``--backdoor-set`` and ``--set`` do the same).
``--list`` lists the attacks, models and datasets.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List, Optional

from .attacks import ATTACKS
from .cli_common import (
    HelpFormatter,
    add_backdoor_flags,
    add_list_flag,
    add_set_flag,
    backdoor_overrides,
    device_arg,
    path_arg,
    print_listing,
    run_cli,
    set_overrides,
)
from .config import deep_update, load_yaml, parse_overrides
from .data import DATASETS
from .io import cache_root
from .models import MODELS
from .zoo import BackdoorConfig, load_bundle

#: the model flags of onp.backdoor besides the shared group; each sets the BackdoorConfig key of its name
OWN_KEYS = ("poison_rate", "target", "mode")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m onp.backdoor`` flags; they map onto a :class:`BackdoorConfig` (:func:`config_from_args`)."""
    p = argparse.ArgumentParser(
        prog="python -m onp.backdoor", description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument("--config", type=path_arg, default=None, help="YAML file with BackdoorConfig keys")
    add_set_flag(
        p,
        help="override a BackdoorConfig key (this tool's run config), dotted for nested ones "
        "(e.g. lr=0.05, attack_params.alpha=0.3; repeatable)",
    )
    add_list_flag(p, "the attacks, models and datasets")
    g = add_backdoor_flags(
        p, title="backdoored model (default: resnet18, fashion-mnist, badnets, seed 0)", skip=("checkpoint",)
    )
    g.add_argument("--poison-rate", type=float, default=None)
    g.add_argument("--target", type=int, default=None)
    g.add_argument("--mode", choices=["all2one", "all2all"], default=None)
    g.add_argument("--clean", action="store_true", help="train an unpoisoned model with the same recipe")
    g.add_argument(
        "--attack-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="attack parameter, e.g. alpha=0.3 (repeatable)",
    )
    r = p.add_argument_group("run")
    r.add_argument("--overwrite", action="store_true", help="retrain even if a cached model exists")
    r.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, cuda:N or mps")
    r.add_argument("--quiet", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> BackdoorConfig:
    """The :class:`BackdoorConfig` of the command line: ``--config``, then the flags (the flags given
    win over the file), then ``--attack-param``, then ``--set``; filled in and checked."""
    data = load_yaml(args.config) if args.config else {}
    own: Dict[str, Any] = {key: getattr(args, key) for key in OWN_KEYS if getattr(args, key) is not None}
    if args.clean:
        own["clean"] = True
    data = deep_update(data, backdoor_overrides(args, own))
    if args.attack_param:
        data = deep_update(data, {"attack_params": parse_overrides(args.attack_param)})
    data = deep_update(data, set_overrides(args.set, BackdoorConfig().to_dict()))
    return BackdoorConfig.from_dict(data).resolved()


def listing() -> List[str]:
    """What ``--list`` prints: the names this tool accepts."""
    return [
        f"attacks: {', '.join(ATTACKS.names())}",
        f"models: {', '.join(MODELS.names())}",
        f"datasets: {', '.join(DATASETS.names())}",
    ]


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m onp.backdoor``: print the model's artifact path and test metrics (JSON)."""
    args = build_parser().parse_args(argv)
    if args.list:
        return print_listing(listing())
    cfg = config_from_args(args)
    cache_root(args.cache_dir)  # an empty ONP_CACHE, or one at a file, is refused before any work
    bundle = load_bundle(
        cfg,
        cache_dir=args.cache_dir,
        data_dir=args.data_dir,
        overwrite=args.overwrite,
        device=args.device,
        progress=not args.quiet,
    )
    m = bundle.meta
    print(
        json.dumps(
            {
                "path": str(bundle.path),
                "test_metrics": m["test_metrics"],
                "train_seconds": m["train_seconds"],
                "data_source": m["data_source"],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

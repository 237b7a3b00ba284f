"""``python -m onp.backdoor``: train (or fetch from the cache) a backdoored model.

Example::

    python -m onp.backdoor --model resnet18 --dataset fashion-mnist --attack badnets --width 16 --epochs 5
"""

from __future__ import annotations

import argparse
import json
from typing import List, Optional

from .attacks import ATTACKS
from .cli_common import device_arg, int_at_least, path_arg, run_cli
from .config import deep_update, load_yaml, parse_overrides
from .data import DATASETS
from .io import cache_root
from .models import MODELS
from .zoo import BackdoorConfig, load_bundle


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m onp.backdoor", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet18", help=f"one of {', '.join(MODELS.names())}")
    p.add_argument("--dataset", default="fashion-mnist", help=f"one of {', '.join(DATASETS.names())}")
    p.add_argument("--attack", default="badnets", help=f"one of {', '.join(ATTACKS.names())}")
    p.add_argument("--width", type=int, default=None, help="first-stage width (64 = standard ResNet-18)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int_at_least(0), default=None)
    p.add_argument("--poison-rate", type=float, default=None)
    p.add_argument("--target", type=int, default=None)
    p.add_argument("--mode", choices=["all2one", "all2all"], default=None)
    p.add_argument("--defense-size", type=int, default=None, help="clean images held out for the defender")
    p.add_argument("--clean", action="store_true", help="train an unpoisoned model with the same recipe")
    p.add_argument("--max-train", type=int, default=None, help="cap the attacker's training set (quick runs)")
    p.add_argument("--attack-param", action="append", default=[], metavar="KEY=VALUE",
                   help="attack parameter, e.g. alpha=0.3 (repeatable)")
    p.add_argument("--data-dir", type=path_arg, default=None,
                   help="folder with the dataset's original files (an error if they are not there)")
    p.add_argument("--data-source", choices=["auto", "full", "sample"], default=None)
    p.add_argument("--config", type=path_arg, default=None, help="YAML file with BackdoorConfig keys")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--cache-dir", type=path_arg, default=None,
                   help="artifact cache (default $ONP_CACHE or ~/.cache/onp)")
    p.add_argument("--overwrite", action="store_true", help="retrain even if a cached model exists")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--quiet", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> BackdoorConfig:
    data = load_yaml(args.config) if args.config else {}
    flags = {"model": args.model, "dataset": args.dataset, "attack": args.attack}
    for key in ("width", "epochs", "seed", "poison_rate", "target", "mode", "defense_size", "max_train",
                "data_source"):
        val = getattr(args, key)
        if val is not None:
            flags[key] = val
    if args.clean:
        flags["clean"] = True
    data = deep_update(data, {k: v for k, v in flags.items() if k not in data or v != build_parser().get_default(k)})
    if args.attack_param:
        data = deep_update(data, {"attack_params": parse_overrides(args.attack_param)})
    data = deep_update(data, parse_overrides(args.set))
    return BackdoorConfig.from_dict(data).resolved()


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    cache_root(args.cache_dir)  # an empty ONP_CACHE, or one at a file, is refused before any work
    bundle = load_bundle(cfg, cache_dir=args.cache_dir, data_dir=args.data_dir, overwrite=args.overwrite,
                         device=args.device, progress=not args.quiet)
    m = bundle.meta
    print(json.dumps({"path": str(bundle.path), "test_metrics": m["test_metrics"],
                      "train_seconds": m["train_seconds"], "data_source": m["data_source"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

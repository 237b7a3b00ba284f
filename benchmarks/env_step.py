"""Benchmark: ``env.step`` and ``env.reset`` time relative to one bare forward over the reward batch.

Prints, from one run: the median ``env.step`` time for random valid actions, the median time of a
bare forward of the same model over the same reward batch (inference mode, channels_last), their
ratio, and the ``reset`` ratio. Targets (issue #3): step/forward <= 0.6 on ResNet-18 (reached by
recomputing only the suffix after the changed layer) and reset/forward <= 0.1.

    python benchmarks/env_step.py --model resnet18 --width 16
    python benchmarks/env_step.py --model resnet18 --width 64 --device cuda   # GPU users
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import List, Tuple

import numpy as np
import torch

from envs import NeuronPruningEnv, PruningSubject
from onp.attacks import build_attack
from onp.data import load_dataset
from onp.data.defense import DefenseData
from onp.data.splits import as_float, make_splits
from onp.models import build_model_for


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--defense-size", type=int, default=500)
    ap.add_argument("--reward-batch", type=int, default=None, help="default: all defense-validation images")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--resets", type=int, default=10)
    ap.add_argument("--no-cache", action="store_true", help="disable the suffix cache (for comparison)")
    ap.add_argument("--threads", type=int, default=None)
    return ap


def _env(args: argparse.Namespace) -> NeuronPruningEnv:
    """An untrained model's env on the dataset's defense split, with an unlimited budget and delta."""
    ds = load_dataset(args.dataset, source="auto")
    splits = make_splits(len(ds.train), args.defense_size, 0.5, seed=0)
    tr, va = ds.train.subset(splits.defense_train), ds.train.subset(splits.defense_val)
    data = DefenseData(as_float(tr.images), tr.labels, as_float(va.images), va.labels, ds.spec.num_classes)
    model = build_model_for(args.model, ds.spec, args.width).eval()
    attack = build_attack("badnets", ds.spec.image_shape, ds.spec.num_classes)
    return NeuronPruningEnv(
        PruningSubject(model, attack, data, name=f"{args.model}-w{args.width}"),
        budget=1.0 - 1e-9,
        delta=10.0,
        reward_batch=args.reward_batch,
        use_suffix_cache=not args.no_cache,
        top_k=16,
    )


def _forward_seconds(model: torch.nn.Module, batch: torch.Tensor) -> List[float]:
    with torch.inference_mode():
        for _ in range(3):
            model(batch)
        fwd = []
        for _ in range(10):
            t = time.perf_counter()
            model(batch)
            fwd.append(time.perf_counter() - t)
    return fwd


def _step_and_reset_seconds(env: NeuronPruningEnv, n_steps: int, n_resets: int) -> Tuple[List[float], List[float]]:
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    steps = []
    for _ in range(n_steps):
        valid = np.flatnonzero(env.action_masks()[:-1])
        if len(valid) == 0:
            env.reset()
            continue
        a = int(rng.choice(valid))
        t = time.perf_counter()
        _, _, term, trunc, _ = env.step(a)
        steps.append(time.perf_counter() - t)
        if term or trunc:
            env.reset()
    resets = []
    for _ in range(n_resets):
        env.step(int(rng.choice(np.flatnonzero(env.action_masks()[:-1]))))
        t = time.perf_counter()
        env.reset()
        resets.append(time.perf_counter() - t)
    return steps, resets


def main() -> None:
    args = _parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env = _env(args)
    batch = env.target.batch
    fwd = _forward_seconds(env.target.model, batch)
    steps, resets = _step_and_reset_seconds(env, args.steps, args.resets)
    f, s, r = statistics.median(fwd), statistics.median(steps), statistics.median(resets)
    out = {
        "model": args.model,
        "width": args.width,
        "neurons": env.num_nodes,
        "reward_images": len(batch),
        "threads": torch.get_num_threads(),
        "suffix_cache": not args.no_cache,
        "forward_ms": round(f * 1e3, 2),
        "step_ms": round(s * 1e3, 2),
        "reset_ms": round(r * 1e3, 3),
        "step_over_forward": round(s / f, 3),
        "reset_over_forward": round(r / f, 4),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()

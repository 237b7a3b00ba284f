"""Issue #17 §2: a trigger-agnostic ASR estimator measured on its own, over the cached zoo models.

For every cached zoo model (the attacks, plus clean models) and every estimator named (from
``envs.asr_estimators.ASR_ESTIMATORS``) the probe is built *without the attack* (``attack=None``), and:

1. **target identification**: the probe's ``estimated_target`` against the attack's real target, with
   the probe's anomaly indices (a clean model is "flagged" when its estimated target's index is <=
   ``--threshold``);
2. **tracking along pruning orders**: the neurons are pruned (``gamma`` masks, as the env prunes) in
   the order of the ANP / RNP / CLP scores (highest first), k = 0 and then a grid of k (capped at the
   number of neurons; an order stops once defense-val clean accuracy is more than 20 points below
   the unpruned one). At each k: the estimated ASR on defense-validation (the fraction of the probe's
   images predicted as its target labels, also per trigger family when the probe says where its
   families are), the defense-val clean accuracy, and the real test ACC / ASR with the attack's
   trigger on the first ``--test-images`` test images (reporting only). Per order, the Spearman rank
   correlation between the estimated ASR and the real test ASR (undefined, and said so, when either
   series is constant).

One JSON line per (model, estimator) is appended to ``OUT/results.jsonl`` as it finishes; a pair already
there is skipped, so an interrupted run resumes. Models missing from the zoo cache are reported and
skipped. ``--summary`` prints the markdown table of a results file.

    python scripts/estimator_study.py --out runs/estimator-study --estimators synthesized \
        --attacks badnets blend trojan sig wanet --seeds 0 1 2 --clean-seeds 0 1 2
    python scripts/estimator_study.py --out runs/estimator-study --summary

``--probe-param KEY=VALUE`` passes an estimator parameter (``--probe-param detector=combined``); runs
with other parameters are other rows (``synthesized-multi[detector=combined]`` in the summary). A
model counts as flagged when the backdoor verdict on the probe's statistics suspects it
(:func:`onp.backdoor_verdict.backdoor_verdict`, the probe's own detector).

``--policy RUN`` tracks a learned policy's order too (order ``policy``): the neurons the policy of an
onp.train run folder (or a shipped one, ``docs/policies/...``) prunes on each model in one
deterministic episode of its own env (its estimator and seed), in the order it prunes them; its grid
stops at the episode's length. ``--probe-seed N`` builds every probe and order with seed N instead of
the model's seed (e.g. 0, the seed ``onp.defend`` uses, so its cached inversions are reused).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from agents.heuristics import subject_scores
from envs.asr_estimators import ASR_ESTIMATORS, ASRProbe, build_probe
from onp.attacks import Attack
from onp.backdoor_verdict import backdoor_verdict
from onp.graph.layout import neuron_layout
from onp.io import cache_root
from onp.masks import NeuronMasks
from onp.metrics import accuracy, evaluate_backdoor, predict
from onp.zoo import BackdoorBundle, BackdoorConfig, load_bundle

ATTACKS = ("badnets", "blend", "trojan", "sig", "wanet")
ORDERS = ("anp", "rnp", "clp")
GRID = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)
#: an order stops once defense-val clean accuracy is more than this below the unpruned model's
MAX_ACC_DROP = 0.20
#: probe.info entries kept in the record (a list or tensor longer than this is dropped)
MAX_INFO_LEN = 256


# --------------------------------------------------------------------------------------------------
# Spearman


def average_ranks(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n of ``x``, ties sharing the mean of their ranks."""
    a = np.asarray(x, dtype=float)
    order = np.argsort(a, kind="stable")
    ranks = np.empty(len(a), dtype=float)
    ranks[order] = np.arange(1, len(a) + 1, dtype=float)
    for value in np.unique(a):
        tied = a == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson on average ranks); NaN when either series is constant or
    shorter than 2."""
    if len(x) != len(y):
        raise ValueError(f"series of different lengths: {len(x)} and {len(y)}")
    if len(x) < 2:
        return math.nan
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return math.nan if denom == 0 else float((rx * ry).sum() / denom)


def spearman_record(est: Sequence[float], real: Sequence[float]) -> Dict[str, Any]:
    """``spearman`` (None when undefined) and, when undefined, ``spearman_undefined`` saying why."""
    rho = spearman(est, real)
    if not math.isnan(rho):
        return {"spearman": rho}
    const = [name for name, s in (("estimated ASR", est), ("real test ASR", real)) if len(set(s)) <= 1]
    why = " and ".join(const) + " constant" if const else "fewer than 2 points"
    return {"spearman": None, "spearman_undefined": why}


# --------------------------------------------------------------------------------------------------
# the probe


def _cache_state(cache_dir: Optional[Path]) -> Dict[str, int]:
    """Modification times of the estimator caches (every file of the cache root outside ``zoo``)."""
    root = cache_root(cache_dir)
    if not root.is_dir():
        return {}
    files: Dict[str, int] = {}
    for sub in root.iterdir():
        if sub.name != "zoo":
            paths = sub.rglob("*") if sub.is_dir() else [sub]
            files.update({str(p): p.stat().st_mtime_ns for p in paths if p.is_file()})
    return files


def timed_probe(
    name: str, bundle: BackdoorBundle, *, seed: int, cache_dir: Optional[Path], params: Dict[str, Any]
) -> Tuple[ASRProbe, Dict[str, Any]]:
    """The trigger-agnostic probe of estimator ``name`` (``attack=None``), its build time, and whether
    it came from the on-disk cache (no estimator cache file was written or changed)."""
    before = _cache_state(cache_dir)
    t0 = time.perf_counter()
    probe = build_probe(name, bundle.model, None, bundle.defense_data, seed=seed, cache_dir=cache_dir, **params)
    seconds = time.perf_counter() - t0
    return probe, {"seconds": seconds, "cached": _cache_state(cache_dir) == before}


def _jsonable(value: Any) -> Any:
    """``value`` as JSON data (tensors and arrays as lists); None for what is too big or not data."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        size = value.numel() if isinstance(value, torch.Tensor) else value.size
        value = value.tolist() if size <= MAX_INFO_LEN else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value] if len(value) <= MAX_INFO_LEN else None
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value if value is None or isinstance(value, (str, int, float, bool)) else None


def probe_record(probe: ASRProbe) -> Dict[str, Any]:
    """``probe.info`` as JSON (big lists dropped), with the probe's size and family slices."""
    info = {k: v for k, v in ((k, _jsonable(v)) for k, v in probe.info.items()) if v is not None}
    info["n_images"] = len(probe.images)
    info.setdefault("families", None)
    info.setdefault("family_slices", None)
    return info


# --------------------------------------------------------------------------------------------------
# evaluation of a (masked) model


@dataclass
class Evaluator:
    """What one point of an order measures: the probe, defense-val, and the test images (reporting)."""

    probe: ASRProbe
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    attack: Attack

    def estimated_asr(self, model: nn.Module) -> Tuple[float, Optional[Dict[str, float]]]:
        """Fraction of the probe's images predicted as its target labels, overall and per family."""
        hit = predict(model, self.probe.images) == self.probe.target_labels
        overall = hit.float().mean().item() if len(hit) else 0.0
        slices = self.probe.info.get("family_slices")
        if not slices:
            return overall, None
        return overall, {f: hit[int(a) : int(b)].float().mean().item() for f, (a, b) in slices.items() if b > a}

    def point(self, model: nn.Module, k: int) -> Dict[str, Any]:
        """The measures of ``model`` (already masked) with ``k`` neurons pruned."""
        model.eval()
        est, families = self.estimated_asr(model)
        test = evaluate_backdoor(model, self.test_x, self.test_y, self.attack)
        val_acc = accuracy(predict(model, self.val_x), self.val_y)
        return {
            "k": k,
            "est_asr": est,
            "est_asr_families": families,
            "val_acc": val_acc,
            "test_acc": test["acc"],
            "test_asr": test["asr"],
        }


def track_order(
    model: nn.Module, scores: np.ndarray, grid: Sequence[int], evaluator: Evaluator, start: Dict[str, Any]
) -> Dict[str, Any]:
    """Prune ``model``'s neurons (graph numbering, highest score first, gamma masks on a copy) for each
    k of ``grid``; ``start`` is the unpruned point. Stops after the first k whose defense-val accuracy
    is more than :data:`MAX_ACC_DROP` below the unpruned one."""
    layout = neuron_layout(model)
    if len(scores) != layout.num_neurons:
        raise ValueError(f"{len(scores)} scores for {layout.num_neurons} neurons")
    order = np.argsort(-scores, kind="stable")
    work = copy.deepcopy(model).eval()
    points, stopped = [start], "grid end"
    t0 = time.perf_counter()
    with NeuronMasks(work, layout.bn_names, mode="gamma") as masks:
        for k in sorted({int(k) for k in grid if 0 < k <= layout.num_neurons}):
            masks.reset()
            masks.prune(torch.as_tensor(order[:k].copy()))
            points.append(evaluator.point(work, k))
            if points[-1]["val_acc"] < start["val_acc"] - MAX_ACC_DROP:
                stopped = f"defense-val ACC more than {MAX_ACC_DROP:.0%} below the unpruned model"
                break
    record = {"points": points, "stopped": stopped, "eval_seconds": time.perf_counter() - t0}
    record.update(spearman_record([p["est_asr"] for p in points], [p["test_asr"] for p in points]))
    return record


# --------------------------------------------------------------------------------------------------
# one model


def order_scores(
    bundle: BackdoorBundle, method: str, seed: int, folder: Optional[Path]
) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Baseline ``method``'s neuron scores of the bundle's model (as the env's ``ranked:<method>``
    computes them), the seconds they took and whether they came from ``folder`` (an ``.npy`` per
    model, method and seed, so that another estimator's run does not recompute ANP's half hour)."""
    path = None if folder is None else folder / f"{bundle.path.name}-{method}-s{seed}.npy"
    if path is not None and path.exists():
        return np.load(path, allow_pickle=False), {"scores_seconds": 0.0, "scores_cached": True}
    t0 = time.perf_counter()
    scores = subject_scores(bundle, method, seed=seed)
    seconds = time.perf_counter() - t0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, scores, allow_pickle=False)
        tmp.replace(path)
    return scores, {"scores_seconds": seconds, "scores_cached": False}


def study_model(
    bundle: BackdoorBundle,
    estimator: str,
    *,
    seed: int,
    orders: Sequence[str] = ORDERS,
    grid: Sequence[int] = GRID,
    test_images: int = 2000,
    cache_dir: Optional[Path] = None,
    probe_params: Optional[Dict[str, Any]] = None,
    scores_dir: Optional[Path] = None,
    policy: Optional[Path] = None,
    log: Callable[[str], None] = lambda msg: None,
) -> Dict[str, Any]:
    """The study's record of one model and one estimator (see the module docstring). ``scores_dir``:
    where the orders' scores are cached (:func:`order_scores`); ``policy``: an onp.train run folder whose
    policy's order is tracked too (:func:`policy_order`); ``log`` gets a line per phase."""
    t_start = time.perf_counter()
    probe, timing = timed_probe(estimator, bundle, seed=seed, cache_dir=cache_dir, params=dict(probe_params or {}))
    log(f"  probe {timing['seconds']:.1f} s{' (cached)' if timing['cached'] else ''}")
    info = probe_record(probe)
    clean = bool(bundle.config.clean)
    real = int(bundle.attack.target)
    estimated = info.get("estimated_target")
    d = bundle.defense_data
    evaluator = Evaluator(
        probe, d.val_x, d.val_y, bundle.test_x[:test_images], bundle.test_y[:test_images], bundle.attack
    )
    model = copy.deepcopy(bundle.model).eval()
    t0 = time.perf_counter()
    start = evaluator.point(model, 0)
    record: Dict[str, Any] = {
        "estimator": estimator,
        "clean": clean,
        "real_target": real,
        "estimated_target": estimated,
        "target_correct": None if clean or estimated is None else int(estimated) == real,
        "probe": {**info, **timing},
        "unpruned": {**start, "seconds": time.perf_counter() - t0},
        "test_images": len(evaluator.test_y),
        "orders": {},
    }
    for method in orders:
        scores, timing = order_scores(bundle, method, seed, scores_dir)
        record["orders"][method] = {**timing, **track_order(model, scores, grid, evaluator, start)}
        took = f"{timing['scores_seconds']:.1f} s{' (cached)' if timing['scores_cached'] else ''}"
        log(f"  {method}: scores {took}, evaluations {record['orders'][method]['eval_seconds']:.1f} s")
    if policy is not None:
        order, timing = policy_order(bundle, policy, cache_dir)
        scores = np.full(neuron_layout(model).num_neurons, -1.0)
        scores[order] = np.arange(len(order), 0, -1, dtype=float)  # the first pruned scores highest
        ks = sorted({k for k in grid if 0 < k < len(order)} | ({len(order)} if order else set()))
        tracked = track_order(model, scores, ks, evaluator, start)
        record["orders"]["policy"] = {**timing, "n_pruned": len(order), "order": order, **tracked}
        log(f"  policy: episode {timing['episode_seconds']:.1f} s, {len(order)} neurons")
    record["seconds"] = time.perf_counter() - t_start
    return record


def policy_order(bundle: BackdoorBundle, run_dir: Path, cache_dir: Optional[Path]) -> Tuple[List[int], Dict[str, Any]]:
    """The neurons the policy of the onp.train run ``run_dir`` prunes on the bundle's model, in its order:
    one deterministic episode in the run's own env (its estimator and seed, :func:`onp.evaluate.policy_episode`),
    with the seconds it took."""
    from agents import pruning_order
    from onp.evaluate import policy_episode, read_source

    t0 = time.perf_counter()
    res = policy_episode(read_source(run_dir, "policy"), bundle, cache_dir=cache_dir)
    return pruning_order(res), {"policy": str(run_dir), "episode_seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------------
# the zoo run


def model_configs(args: argparse.Namespace) -> List[Tuple[str, BackdoorConfig]]:
    """``(attack label, config)`` of every model asked for; clean models are labelled ``clean``."""
    common = {"model": args.model, "width": args.width, "data_source": args.data_source}
    out = [(a, BackdoorConfig(attack=a, seed=s, **common)) for s in args.seeds for a in args.attacks]
    out += [("clean", BackdoorConfig(attack="badnets", clean=True, seed=s, **common)) for s in args.clean_seeds]
    return out


def parse_probe_params(pairs: Sequence[str]) -> Dict[str, Any]:
    """``["detector=combined", "steps=150"]`` -> ``{"detector": "combined", "steps": 150}`` (a value is read
    as JSON when it parses, else kept as a string)."""
    params: Dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --probe-param takes KEY=VALUE (e.g. detector=combined), got {pair!r}")
        try:
            params[key] = json.loads(text)
        except json.JSONDecodeError:
            params[key] = text
    return params


def estimator_label(row: Dict[str, Any]) -> str:
    """The estimator's name with its non-default probe parameters: ``synthesized-multi[detector=combined]``."""
    params = row.get("probe_params") or {}
    inner = ",".join(f"{k}={params[k]}" for k in sorted(params))
    return f"{row['estimator']}[{inner}]" if inner else str(row["estimator"])


def _key(row: Dict[str, Any]) -> Tuple[Any, ...]:
    params = json.dumps(row.get("probe_params") or {}, sort_keys=True)
    return (row["attack"], row["seed"], row["estimator"], params, row["model"], row["width"], row["data_source"])


def read_rows(results: Path) -> List[Dict[str, Any]]:
    """The records of a results file (a torn last line, from a killed run, is ignored)."""
    if not results.exists():
        return []
    rows = []
    for line in results.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _describe(row: Dict[str, Any]) -> str:
    p = row["probe"]
    rhos = ", ".join(
        f"{m} {o['spearman']:.2f}" if o["spearman"] is not None else f"{m} n/a ({o['spearman_undefined']})"
        for m, o in row["orders"].items()
    )
    return (
        f"{row['attack']} s{row['seed']} {row['estimator']}: target {row['estimated_target']} "
        f"(real {row['real_target']}), probe {p['seconds']:.0f} s{' (cached)' if p['cached'] else ''}; "
        f"Spearman {rhos}; {row['seconds']:.0f} s"
    )


def run_study(args: argparse.Namespace) -> int:
    """Every (model, estimator) pair not in ``OUT/results.jsonl`` yet, one appended line each."""
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    done = {_key(r) for r in read_rows(results)}
    params = parse_probe_params(args.probe_param)
    for label, cfg in model_configs(args):
        common = {"attack": label, "seed": cfg.seed, "probe_params": params, "model": cfg.model}
        common.update({"width": cfg.width, "data_source": cfg.data_source})
        todo = [e for e in args.estimators if _key({**common, "estimator": e}) not in done]
        if not todo:
            continue
        try:
            bundle = load_bundle(cfg, cache_dir=args.cache_dir, train_if_missing=False, progress=False)
        except FileNotFoundError as exc:
            print(f"skip {label} s{cfg.seed}: {exc}", flush=True)
            continue
        for estimator in todo:
            print(f"{label} s{cfg.seed} {estimator} ({bundle.path.name})", flush=True)
            probe_seed = cfg.seed if args.probe_seed is None else args.probe_seed
            row: Dict[str, Any] = {**common, "estimator": estimator, "model_dir": str(bundle.path)}
            row["probe_seed"] = probe_seed
            row.update(
                study_model(
                    bundle,
                    estimator,
                    seed=probe_seed,
                    orders=args.orders,
                    grid=args.grid,
                    test_images=args.test_images,
                    cache_dir=args.cache_dir,
                    probe_params=params,
                    scores_dir=args.out / "scores",
                    policy=args.policy,
                    log=lambda msg: print(msg, flush=True),
                )
            )
            with results.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
                fh.flush()
            print(_describe(row), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------
# the summary


def flagged(row: Dict[str, Any], threshold: float) -> Optional[bool]:
    """Whether the model is flagged: the backdoor verdict (:func:`onp.backdoor_verdict.backdoor_verdict`,
    with the probe's own detector) on the probe's statistics, at anomaly threshold ``-threshold``; for a
    probe without them, whether its estimated target has an anomaly index <= ``threshold`` (None: no index)."""
    verdict = backdoor_verdict(row["probe"], estimator=str(row["estimator"]), threshold=-threshold)
    if verdict is not None:
        return verdict.suspected
    idx, t = row["probe"].get("anomaly_index"), row.get("estimated_target")
    if not idx or t is None:
        return None
    return bool(idx[int(t)] <= threshold)


def _summary_line(attack: str, estimator: str, rows: List[Dict[str, Any]], threshold: float) -> str:
    ident = [r["target_correct"] for r in rows if r["target_correct"] is not None]
    rhos = [o["spearman"] for r in rows for o in r["orders"].values()]
    defined = [x for x in rhos if x is not None]
    med = f"{float(np.median(defined)):.2f}" if defined else "n/a"
    flags = [f for f in (flagged(r, threshold) for r in rows) if f is not None]
    fresh = [r["probe"]["seconds"] for r in rows if not r["probe"]["cached"]]
    probe_s = f"{float(np.median(fresh)):.0f}" if fresh else "n/a"
    return (
        f"| {attack} | {estimator} | {len(rows)} | {f'{sum(ident)} of {len(ident)}' if ident else '-'} | {med} "
        f"({len(defined)} of {len(rhos)} defined) | {sum(flags)} of {len(flags)} | {probe_s} "
        f"({len(rows) - len(fresh)} cached) |"
    )


def summarize(rows: List[Dict[str, Any]], threshold: float = -2.0) -> str:
    """The markdown table of a results file: per attack and estimator, targets identified, median
    Spearman over (seed, order), models flagged (anomaly index of the estimated target <= threshold)
    and the median probe build time of the builds not served from the cache."""
    lines = [
        f"| attack | estimator | models | target identified | median Spearman (seed x order) "
        f"| flagged (verdict; index <= {threshold:g}) | probe s, uncached median |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["attack"], estimator_label(r)), []).append(r)
    rank = {a: i for i, a in enumerate((*ATTACKS, "clean"))}
    for attack, estimator in sorted(groups, key=lambda g: (rank.get(g[0], len(rank)), g[0], g[1])):
        lines.append(_summary_line(attack, estimator, groups[(attack, estimator)], threshold))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--estimators", nargs="+", default=["synthesized"], choices=ASR_ESTIMATORS.names())
    p.add_argument("--attacks", nargs="*", default=list(ATTACKS))
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--clean-seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--orders", nargs="*", default=list(ORDERS))
    p.add_argument(
        "--policy",
        type=Path,
        default=None,
        help="an onp.train run folder (or a shipped policy, docs/policies/...): its policy's pruning order is "
        "tracked too (order 'policy', its own episode's length)",
    )
    p.add_argument(
        "--probe-seed", type=int, default=None, help="the estimator's and orders' seed (default: the model's seed)"
    )
    p.add_argument("--grid", type=int, nargs="+", default=list(GRID), help="numbers of pruned neurons (k > 0)")
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--data-source", default="full")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--summary", action="store_true", help="print the table of OUT/results.jsonl and exit")
    p.add_argument("--threshold", type=float, default=-2.0, help="anomaly index at or below which a model is flagged")
    p.add_argument(
        "--probe-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an estimator parameter (JSON value), repeatable: --probe-param detector=combined",
    )
    args = p.parse_args(argv)
    if args.summary:
        print(summarize(read_rows(args.out / "results.jsonl"), args.threshold))
        return 0
    return run_study(args)


if __name__ == "__main__":
    raise SystemExit(main())

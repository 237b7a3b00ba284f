"""Tabulate an ablation of ``onp.train`` arms on the same models (issue #17 §3), as Markdown.

The runs live in one folder as ``<arm>-<attack>-s<seed>`` (each an ``onp.train`` or ``onp.evaluate`` run
folder, or a link to one). For every model that all arms finished, one row gives each arm's
defense-validation returns on the env's estimate,
``(ACC - ACC0) - lam * (ASR - ASR0)``: of the policy's episode (the pruning alone, what PPO maximises)
and of the model handed out (after fine-tuning); then its test ASR, test ACC drop and DER. Then one row
per arm with the means per attack; then, for each ``--versus A:B`` pair, on how many models arm B
beats arm A on each defense-validation return and then on test (DER)::

    python scripts/ablation_table.py /work/m18/abl --arms bc bcppo cold rankedclp \\
        --versus bc:bcppo cold:bcppo rankedclp:bcppo

A baseline's cells of an ``onp.compare`` grid on the same models join as another arm with ``--grid
NAME=GRID_DIR`` (its cells ``GRID_DIR/cells/<attack>/<NAME>/s<seed>``; a baseline has no episode on the
env, so its defense-val returns are "n/a" and count for neither arm)::

    python scripts/ablation_table.py /work/m18/abl --arms bcppofst --grid fst=/work/m18/fstgrid \
        --versus fst:bcppofst

Values are read from each run's ``metrics.json`` (test figures with the real trigger: for reporting,
never for a choice). A tie (equal to 1e-9) counts for neither arm.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

Model = Tuple[str, int]  # attack, seed


@dataclass(frozen=True)
class Result:
    """One arm on one model: test ASR (%), ACC drop (points) and DER; the defense-val returns (None: a baseline)."""

    asr: float
    drop: float
    der: float
    episode_return: Optional[float] = None
    val_return: Optional[float] = None


TIE = 1e-9


def read_run(folder: Path) -> Optional[Result]:
    """An ``onp.train`` run's figures, or ``None`` when it has not finished."""
    path = folder / "metrics.json"
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    val = m["val"]
    config = json.loads((folder / "config.json").read_text())
    env = config.get("env") or (config.get("source_config") or {}).get("env") or {}  # onp.train, onp.evaluate
    lam = float(env.get("lam", 1.0))
    return Result(
        asr=100 * float(m["asr"]),
        drop=100 * (float(m["before"]["acc"]) - float(m["acc"])),
        der=float(m["der"]),
        episode_return=(_pruned(val, "acc") - val["acc0"]) - lam * (_pruned(val, "asr") - val["asr0"]),
        val_return=(val["acc"] - val["acc0"]) - lam * (val["asr"] - val["asr0"]),
    )


def read_cell(folder: Path) -> Optional[Result]:
    """A baseline cell's test figures (no defense-val returns), or ``None`` when it has not finished."""
    path = folder / "metrics.json"
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    drop = 100 * (float(m["before"]["acc"]) - float(m["acc"]))
    return Result(asr=100 * float(m["asr"]), drop=drop, der=float(m["der"]))


def collect_grid(grid: Path, defense: str) -> Dict[Model, Result]:
    """A baseline's finished cells in an ``onp.compare`` grid, by model."""
    found: Dict[Model, Result] = {}
    for folder in sorted(grid.glob(f"cells/*/{defense}/s*")):
        result = read_cell(folder) if folder.name[1:].isdigit() else None
        if result is not None:
            found[(folder.parent.parent.name, int(folder.name[1:]))] = result
    return found


def _pruned(val: Dict[str, float], metric: str) -> float:
    """The episode's val ``acc``/``asr`` before fine-tuning (without fine-tuning: the handed-out model's)."""
    before = val.get(f"{metric}_pruned")
    return float(val[metric] if before is None else before)


def collect(root: Path, arms: List[str], grids: Optional[Dict[str, Path]] = None) -> Dict[Model, Dict[str, Result]]:
    """Every model with a finished run of every arm (and a finished cell of every ``grids`` baseline)."""
    found: Dict[Model, Dict[str, Result]] = {}
    for name, grid in (grids or {}).items():
        for model, cell in collect_grid(grid, name).items():
            found.setdefault(model, {})[name] = cell
    for arm in (a for a in arms if a not in (grids or {})):
        for folder in sorted(root.glob(f"{arm}-*-s*")):
            attack, _, seed = folder.name[len(arm) + 1 :].rpartition("-s")
            run = read_run(folder) if folder.is_dir() and seed.isdigit() else None
            if run is not None and "-" not in attack:
                found.setdefault((attack, int(seed)), {})[arm] = run
    every = set(arms) | set(grids or {})
    return {k: v for k, v in sorted(found.items()) if every <= set(v)}


def model_rows(results: Dict[Model, Dict[str, Result]], arms: List[str]) -> List[str]:
    head = "| model | " + " | ".join(f"{a}: val returns (episode, handed out) / test ASR / drop / DER" for a in arms)
    head += " |"
    lines = [head, "|" + "---|" * (len(arms) + 1)]
    for (attack, seed), by_arm in results.items():
        cells = [f"{_returns(r)} / {r.asr:.2f}% / {r.drop:.2f} / {r.der:.3f}" for r in (by_arm[a] for a in arms)]
        lines.append(f"| {attack} s{seed} | " + " | ".join(cells) + " |")
    return lines


def _returns(r: Result) -> str:
    if r.episode_return is None or r.val_return is None:
        return "n/a"
    return f"{r.episode_return:+.3f}, {r.val_return:+.3f}"


def arm_means(results: Dict[Model, Dict[str, Result]], arms: List[str]) -> List[str]:
    """Per arm: mean test ASR / drop (mean DER) per attack, and the mean DER over all models."""
    attacks = list(dict.fromkeys(a for a, _ in results))
    lines = ["| arm | " + " | ".join(attacks) + " | mean DER | models |", "|" + "---|" * (len(attacks) + 3)]
    for arm in arms:
        cells = []
        for attack in attacks:
            rs = [by_arm[arm] for (a, _), by_arm in results.items() if a == attack]
            asr, drop, der = (statistics.fmean(getattr(r, k) for r in rs) for k in ("asr", "drop", "der"))
            cells.append(f"{asr:.2f}% / {drop:.2f} ({der:.3f})")
        mean_der = statistics.fmean(by_arm[arm].der for by_arm in results.values())
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {mean_der:.3f} | {len(results)} |")
    return lines


def versus(results: Dict[Model, Dict[str, Result]], first: str, second: str) -> str:
    """On how many models ``second`` beats ``first``: on the defense-validation returns, then on test."""

    def better_worse(key: str) -> str:
        pairs = [(getattr(r[first], key), getattr(r[second], key)) for r in results.values()]
        known = [(a, b) for a, b in pairs if a is not None and b is not None]
        if not known:
            return "n/a"
        better = sum(b > a + TIE for a, b in known)
        worse = sum(b < a - TIE for a, b in known)
        return f"{better} of {len(known)} (worse on {worse})"

    return (
        f"* {second} against {first}: better on the episode's defense-val return on "
        f"{better_worse('episode_return')}, on the handed-out model's on {better_worse('val_return')}; "
        f"better on test (DER) on {better_worse('der')}"
    )


def _grid_arg(p: argparse.ArgumentParser, text: str) -> Tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not (Path(folder) / "cells").is_dir():
        p.error(f"--grid takes NAME=GRID_DIR, a folder of onp.compare with cells/ in it; got {text!r}")
    return name, Path(folder)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path, help="folder of <arm>-<attack>-s<seed> run folders")
    p.add_argument("--arms", nargs="+", required=True, help="the arms, in column order")
    p.add_argument("--versus", nargs="*", default=[], help="A:B pairs: on how many models B beats A")
    p.add_argument(
        "--grid", nargs="*", default=[], help="NAME=GRID_DIR: baseline NAME's cells of an onp.compare grid as an arm"
    )
    args = p.parse_args(argv)
    grids = dict(_grid_arg(p, g) for g in args.grid)
    args.arms = args.arms + [name for name in grids if name not in args.arms]
    pairs = [tuple(v.split(":", 1)) for v in args.versus]
    unknown = sorted({a for pair in pairs for a in pair} - set(args.arms))
    if any(len(pair) != 2 for pair in pairs) or unknown:
        p.error(f"--versus takes A:B pairs of --arms ({', '.join(args.arms)}); got {' '.join(args.versus)}")
    results = collect(args.root, args.arms, grids)
    if not results:
        p.error(f"no model in {args.root} has a finished run of every arm ({', '.join(args.arms)})")
    print("\n".join(model_rows(results, args.arms)), end="\n\n")
    print("\n".join(arm_means(results, args.arms)), end="\n\n")
    print("\n".join(versus(results, a, b) for a, b in pairs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

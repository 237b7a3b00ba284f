"""Merge leaderboard.json files seed by seed and write the merged leaderboard and its DER plot.

For a grid whose run folders are gone (a new machine) but whose leaderboard.json was kept: the cells
that were missing run as their own small ``onp.compare`` grids, and this adds their seeds to the kept
leaderboard (``onp.leaderboard_merge``: a union; a seed found twice must carry the same values, which
also checks that a retrained backdoored model is the one the kept leaderboard used).

    python scripts/merge_leaderboards.py docs/leaderboard-13/leaderboard.json /work/m15/cells/*/leaderboard.json \\
        --out docs/leaderboard-13 --overwrite

A file may be named as ``PATH:ATTACK,ATTACK`` to take only those attacks' rows from it: for a kept
leaderboard some of whose attacks were recomputed whole on retrained models (results.md §16a, §18)::

    python scripts/merge_leaderboards.py docs/leaderboard-13/leaderboard.json:badnets,blend,wanet \\
        docs/leaderboard-16/leaderboard.json /work/m17/anp/*/leaderboard.json --out docs/leaderboard-17

A file's ``models.json`` (the backdoored models' weights digests, which ``onp.compare`` writes beside its
leaderboard) is read when there is one: two files that tested the same model on different devices may
differ in its ``no defense`` figures, and are merged with a note (§19a of docs/results.md).

Writes ``leaderboard.md``, ``.csv``, ``.json``, ``models.json`` (when a file had one) and
``der_<model>.png`` into ``--out``; an existing
leaderboard there is replaced only with ``--overwrite``. Prints the rows whose seed count changed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from onp.io import atomic_write_json
from onp.leaderboard_merge import merge_leaderboards
from onp.plots import plot_der
from onp.report import write_leaderboard


def _seed_counts(path: Path, attacks: Optional[List[str]]) -> Dict[Tuple[str, str, str], int]:
    rows = json.loads(path.read_text())["rows"]
    kept = [r for r in rows if attacks is None or r["attack"] in attacks]
    return {(r["model"], r["attack"], r["defense"]): int(r["seeds_ok"]) for r in kept}


def parse_source(text: str) -> Tuple[Path, Optional[List[str]]]:
    """``"a/leaderboard.json:badnets,blend"`` -> the path and the attacks to take (``None``: all)."""
    path, sep, attacks = text.rpartition(":")
    if not sep or not attacks or "/" in attacks or attacks.endswith(".json"):
        return Path(text), None
    return Path(path), [a for a in attacks.split(",") if a]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "leaderboards",
        nargs="+",
        type=parse_source,
        help="leaderboard.json files, each PATH or PATH:ATTACK,ATTACK (those attacks only); the first sets row order",
    )
    p.add_argument("--out", type=Path, required=True, help="folder for the merged leaderboard")
    p.add_argument("--overwrite", action="store_true", help="replace a leaderboard already in --out")
    args = p.parse_args(argv)
    if (args.out / "leaderboard.json").exists() and not args.overwrite:
        print(f"error: {args.out} already holds a leaderboard; pass --overwrite to replace it", file=sys.stderr)
        return 2
    paths = [path for path, _ in args.leaderboards]
    try:
        before = _seed_counts(paths[0], args.leaderboards[0][1])
        merged = merge_leaderboards(paths, [attacks for _, attacks in args.leaderboards])
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    write_leaderboard(merged.rows, args.out, title=merged.title, notes=merged.notes, extra=merged.extra)
    if merged.models:  # the backdoored models' digests, so that a later merge into --out can check them
        atomic_write_json(args.out / "models.json", merged.models)
    for model in dict.fromkeys(r.model for r in merged.rows):
        plot_der(merged.rows, args.out / f"der_{model}.png", model=model)
    for r in merged.rows:
        old = before.get((r.model, r.attack, r.defense), 0)
        if r.ok != old:
            print(f"{r.model}/{r.attack}/{r.defense}: {old} -> {r.ok} of {r.expected} seeds")
    print(f"wrote {args.out}/leaderboard.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

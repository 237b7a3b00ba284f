"""Run chosen cells of an ``onp.compare`` grid, ``--jobs`` at a time, and never start one that cannot
finish before a deadline: for a lent machine whose time is counted (results.md §14a, §15a).

Each cell runs as its own ``python -m onp.compare`` with one attack, one seed and one defense, in its
own folder ``OUT_ROOT/<attack>-<defense>-s<seed>`` (so a killed cell never touches another). A cell
starts only while ``elapsed + estimate <= deadline``, where the estimate is ``--estimate`` until a cell
has finished and then 1.05 x the longest wall time so far. ``--merge-into GRID`` copies every finished
cell into ``GRID/cells/<attack>/<defense>/s<seed>`` unless that cell is already there, after which
``onp.compare --report-only`` on GRID rebuilds the leaderboard.

    python scripts/cells_before_deadline.py --out-root /tmp/g --jobs 8 --deadline 555 --estimate 262 \\
        sau:trojan:0 'anp[paper]:sig:1' -- --model resnet18 --no-oracle --device cuda

Cells are ``defense:attack:seed``; everything after ``--`` is passed to every ``onp.compare`` (an
``anp`` cell also gets ``--set delta=0.03``, as the issue-#13 grid). Prints one line per start and
end, and the cells left at the deadline.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

Cell = Tuple[str, str, str]  # defense, attack, seed


def parse_cell(text: str) -> Cell:
    """``"anp[paper]:sig:1"`` -> ``("anp[paper]", "sig", "1")``."""
    parts = text.split(":")
    if len(parts) != 3 or not parts[2].isdigit():
        raise SystemExit(f"error: a cell is defense:attack:seed (e.g. sau:blend:2), got {text!r}")
    return parts[0], parts[1], parts[2]


def can_start(elapsed: float, estimate: float, walls: Sequence[float], deadline: float) -> bool:
    """Whether a cell started now is expected to finish before ``deadline`` (seconds from the start)."""
    expected = 1.05 * max(walls) if walls else estimate
    return elapsed + expected <= deadline


def cell_folder(out_root: Path, cell: Cell) -> Path:
    defense, attack, seed = cell
    return out_root / f"{attack}-{defense.replace('[', '-').replace(']', '')}-s{seed}"


def compare_command(cell: Cell, folder: Path, extra: Sequence[str]) -> List[str]:
    defense, attack, seed = cell
    cmd = [sys.executable, "-m", "onp.compare", "--attacks", attack, "--seed-list", seed, "--defenses", defense]
    cmd += ["--jobs", "1", "--quiet", "--no-plots", "--out", str(folder), *extra]
    return cmd + (["--set", "delta=0.03"] if defense.startswith("anp") else [])


def finished_cell(folder: Path) -> Optional[Path]:
    """The cell folder inside a single-cell grid, once its ``metrics.json`` is written."""
    found = sorted(folder.glob("cells/*/*/*/metrics.json"))
    return found[0].parent if found else None


def merge(cell_dir: Path, grid: Path) -> str:
    """Copy a finished cell into the same place of ``grid``, unless a cell is already there."""
    target = grid / "cells" / cell_dir.relative_to(cell_dir.parents[2])
    if (target / "metrics.json").exists():
        return f"kept the cell already in {target}"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(cell_dir, target, dirs_exist_ok=True)
    return f"merged into {target}"


def run(cells: List[Cell], args: argparse.Namespace, extra: Sequence[str]) -> List[Cell]:
    """Run ``cells`` in order under the deadline; returns the cells that did not finish."""
    t0, walls = time.time(), []
    queue, left = list(cells), []
    running: Dict[Cell, Tuple[subprocess.Popen, float, Path]] = {}
    while queue or running:
        while queue and len(running) < args.jobs and can_start(time.time() - t0, args.estimate, walls, args.deadline):
            cell = queue.pop(0)
            folder = cell_folder(args.out_root, cell)
            with open(f"{folder}.log", "w") as log:  # the child keeps its own handle
                proc = subprocess.Popen(compare_command(cell, folder, extra), stdout=log, stderr=subprocess.STDOUT)
            running[cell] = (proc, time.time(), folder)
            print(f"{time.time() - t0:6.0f} s  start {':'.join(cell)}", flush=True)
        if not running:
            break
        time.sleep(args.poll)
        for cell, (proc, started, folder) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[cell]
            done = finished_cell(folder) if proc.returncode == 0 else None
            wall = time.time() - started
            if done is None:
                left.append(cell)
                print(f"{time.time() - t0:6.0f} s  FAILED {':'.join(cell)} (rc {proc.returncode}; see {folder}.log)")
                continue
            walls.append(wall)
            note = merge(done, args.merge_into) if args.merge_into else str(done)
            print(f"{time.time() - t0:6.0f} s  done {':'.join(cell)} in {wall:.0f} s: {note}", flush=True)
    return left + queue


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cells", nargs="+", help="defense:attack:seed, in the order they should run")
    p.add_argument("--out-root", type=Path, required=True, help="one folder per cell goes here")
    p.add_argument("--jobs", type=int, default=8, help="cells at a time (default 8)")
    p.add_argument("--deadline", type=float, required=True, help="seconds from now by which cells must end")
    p.add_argument("--estimate", type=float, required=True, help="expected wall time of a cell at --jobs (s)")
    p.add_argument("--merge-into", type=Path, default=None, help="an onp.compare grid folder to copy cells into")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between looks at the running cells")
    args = p.parse_args(argv)
    cells = [parse_cell(c) for c in args.cells]
    args.out_root.mkdir(parents=True, exist_ok=True)
    left = run(cells, args, extra)
    print("left: " + (" ".join(":".join(c) for c in left) or "none"))
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())

"""Tabulate ``onp.train`` run directories (one per seed) as Markdown, with mean ± std (sample std).

Usage: python scripts/seed_table.py runs/meas5/skip-s0 runs/meas5/skip-s1 runs/meas5/skip-s2

One row per run: model test ACC, the chosen episode on defense-validation, test ACC / drop / ASR /
RA / DER, neurons pruned, the PPO step of the kept policy, env steps, steps/s and wall time; then a
mean ± std row over the runs. Values are read from each run's ``metrics.json``.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List


def _pm(values: List[float], scale: float = 100.0, digits: int = 2, unit: str = "%") -> str:
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}{unit}"


def rows(run_dirs: List[Path]) -> List[str]:
    """The Markdown lines of the table."""
    head = (
        "| run | seed | model test ACC | defense-val ACC / ASR | test ACC | ACC drop (points) | test ASR | RA "
        "| DER | #pruned | kept policy at PPO step | env steps | steps/s | wall |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    ms: List[Dict[str, Any]] = []
    for d in run_dirs:
        m = json.loads((d / "metrics.json").read_text())
        seed = json.loads((d / "config.json").read_text()).get("seed")
        ms.append(m)
        b = m["before"]
        lines.append(
            f"| {d.name} | {seed} | {100 * b['acc']:.2f}% | {100 * m['val']['acc']:.1f}% / "
            f"{100 * m['val']['asr']:.1f}% | {100 * m['acc']:.2f}% | {100 * (b['acc'] - m['acc']):.2f} | "
            f"{100 * m['asr']:.2f}% | {100 * m['ra']:.2f}% | {m['der']:.3f} | {m['n_pruned']} | "
            f"{m.get('best_timesteps')} | {m['env_steps']:,} | {m['steps_per_second']:.1f} | "
            f"{m['wall_time']:.0f} s |"
        )
    if len(ms) > 1:
        lines.append(
            f"| **mean ± std** | | | | **{_pm([m['acc'] for m in ms])}** | "
            f"**{_pm([m['before']['acc'] - m['acc'] for m in ms], unit='')}** | "
            f"**{_pm([m['asr'] for m in ms])}** | {_pm([m['ra'] for m in ms])} | "
            f"{_pm([m['der'] for m in ms], scale=1.0, digits=3, unit='')} | | | | | |"
        )
    return lines


def main(argv: List[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    missing = [a for a in argv if not (Path(a) / "metrics.json").exists()]
    if missing:
        print(f"no metrics.json in: {', '.join(missing)} (unfinished or not an onp.train run)", file=sys.stderr)
        return 1
    print("\n".join(rows([Path(a) for a in argv])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Condense a leaderboard.json (onp.compare) into one ACC / ASR (DER) Markdown matrix, defenses x attacks.

Usage: python scripts/leaderboard_matrix.py docs/leaderboard-13/leaderboard.json
       python scripts/leaderboard_matrix.py NEW.json --before OLD.json

With ``--before``, only the defenses of NEW that OLD also has are printed, each as two rows, the OLD
leaderboard's ("before") above NEW's ("after"), and a last column with the mean DER over the attacks
both have; a row ``NAME[delta]`` of NEW is matched with a plain ``NAME`` of OLD (a plain name is the
``delta`` protocol).

Cells are test ACC / ASR in % (mean ± std over the finished seeds when there are several) with the
mean DER in brackets; **bold** marks mean ASR <= 5%. A cell with some seeds missing ends in
``[k/n seeds]``; a cell with none says ``missing``. The last column is the mean wall time of the
method's finished cells, per device when some ran elsewhere than on the CPU (``cpu 354 s, cuda 17 s``).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Dict, List, Tuple


def _stat(m: Dict[str, Any]) -> str:
    text = f"{100 * m['mean']:.2f}"
    return text + (f" ± {100 * m['std']:.2f}" if m.get("n", 1) > 1 else "")


def _cell_text(defense: str, metrics: Dict[str, Any], ok: int, expected: int) -> str:
    asr = 100 * metrics["asr"]["mean"]
    der = metrics.get("der", {}).get("mean")
    text = f"{_stat(metrics['acc'])} / {_stat(metrics['asr'])}"
    text += f" ({der:.3f})" if der is not None and defense != "no defense" else ""
    text = f"**{text}**" if defense != "no defense" and asr <= 5.0 else text
    return text + (f" [{ok}/{expected} seeds]" if ok < expected else "")


def _row_texts(
    cells: Dict[Any, Dict[str, Any]], defense: str, attacks: List[str]
) -> Tuple[List[str], List[Dict[str, Any]]]:
    """One defense's cell texts over ``attacks`` (``cells``: (defense, attack) -> leaderboard row) and its
    rows with a finished cell."""
    texts: List[str] = []
    finished: List[Dict[str, Any]] = []
    for attack in attacks:
        row = cells.get((defense, attack)) or {}
        metrics = row.get("metrics") or {}
        if not metrics.get("acc", {}).get("n"):
            texts.append("missing")
            continue
        n = metrics["acc"]["n"]
        texts.append(_cell_text(defense, metrics, row.get("seeds_ok", n), row.get("seeds_expected", n)))
        finished.append(row)
    return texts, finished


def wall_time(rows: List[Dict[str, Any]]) -> str:
    """The mean wall time of every finished cell of ``rows`` (leaderboard rows), per device when not all
    ran on the CPU; rows written before devices were recorded count as CPU."""
    by_dev: Dict[str, List[float]] = {}
    for row in rows:
        per_dev = row.get("wall_time_by_device") or {"cpu": row["metrics"].get("wall_time", {})}
        for dev, st in per_dev.items():
            by_dev.setdefault(dev, []).extend(st.get("values") or [])
    means = {dev: sum(v) / len(v) for dev, v in sorted(by_dev.items()) if v}
    if not means:
        return "—"
    if set(means) == {"cpu"}:
        return f"{means['cpu']:,.0f} s"
    return ", ".join(f"{dev} {mean:,.0f} s" for dev, mean in means.items())


def matrix(board: Dict[str, Any]) -> List[str]:
    """The Markdown lines of the matrix for one leaderboard (one model)."""
    attacks = board["attacks"]
    cells = {(r["defense"], r["attack"]): r for r in board["rows"]}
    lines = ["| defense | " + " | ".join(attacks) + " | mean wall time |", "|---|" + "---|" * len(attacks) + "---|"]
    names = list(dict.fromkeys(r["defense"] for r in board["rows"]))
    aware = [d for d in names if any(r["defense"] == d and r.get("trigger_aware") for r in board["rows"])]
    for defense in ["no defense"] + [d for d in names if d != "no defense" and d not in aware] + aware:
        if defense == (aware[0] if aware else None):  # upper bounds (the real trigger) come apart, last
            lines.append("| *upper bound, uses the real trigger (not a defense):* |" + " |" * (len(attacks) + 1))
        texts, finished = _row_texts(cells, defense, attacks)
        lines.append(f"| {defense} | " + " | ".join(texts) + f" | {wall_time(finished)} |")
    return lines


def _old_name(defense: str, old_names: List[str]) -> str:
    """The OLD leaderboard's name of a NEW row: itself, or ``NAME`` for ``NAME[delta]``."""
    if defense in old_names:
        return defense
    plain = defense[: -len("[delta]")] if defense.endswith("[delta]") else None
    return plain if plain in old_names else ""


def before_after(new: Dict[str, Any], old: Dict[str, Any]) -> List[str]:
    """The Markdown lines of the before/after matrix (see the module docstring)."""
    attacks = [a for a in new["attacks"] if a in old["attacks"]]
    pairs = (("before", old), ("after", new))
    boards = {when: {(r["defense"], r["attack"]): r for r in board["rows"]} for when, board in pairs}
    old_names = list(dict.fromkeys(r["defense"] for r in old["rows"]))
    lines = ["| defense | | " + " | ".join(attacks) + " | mean DER |", "|---|---|" + "---|" * len(attacks) + "---|"]
    for defense in dict.fromkeys(r["defense"] for r in new["rows"]):
        old_name = _old_name(defense, old_names)
        if defense == "no defense" or not old_name:
            continue
        for when, name in (("before", old_name), ("after", defense)):
            texts, finished = _row_texts(boards[when], name, attacks)
            ders = [r["metrics"]["der"]["mean"] for r in finished]
            der = f"{sum(ders) / len(ders):.3f}" if len(ders) == len(attacks) else "—"
            label = defense if when == "after" else old_name
            lines.append(f"| {label} | {when} | " + " | ".join(texts) + f" | {der} |")
    return lines


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        board = json.load(fh)
    if len(sys.argv) == 4 and sys.argv[2] == "--before":
        with open(sys.argv[3]) as fh:
            print("\n".join(before_after(board, json.load(fh))))
    else:
        print("\n".join(matrix(board)))

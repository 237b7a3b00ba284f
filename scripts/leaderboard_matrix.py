"""Condense a leaderboard.json (onp.compare) into one ACC / ASR (DER) Markdown matrix, defenses x attacks.

Usage: python scripts/leaderboard_matrix.py docs/leaderboard/leaderboard.json

Cells are test ACC / ASR in % with DER in brackets; **bold** marks ASR <= 5%; missing cells say
``missing``. The last column is the mean wall time of the method's finished cells.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Dict, List


def _cell_text(defense: str, metrics: Dict[str, Any]) -> str:
    acc, asr = 100 * metrics["acc"]["mean"], 100 * metrics["asr"]["mean"]
    der = metrics.get("der", {}).get("mean")
    text = f"{acc:.2f} / {asr:.2f}" + (f" ({der:.3f})" if der is not None and defense != "no defense" else "")
    return f"**{text}**" if defense != "no defense" and asr <= 5.0 else text


def matrix(board: Dict[str, Any]) -> List[str]:
    """The Markdown lines of the matrix for one leaderboard (one model)."""
    attacks = board["attacks"]
    cells = {(r["defense"], r["attack"]): r for r in board["rows"]}
    lines = ["| defense | " + " | ".join(attacks) + " | mean wall time |", "|---|" + "---|" * len(attacks) + "---|"]
    for defense in ["no defense"] + board["defenses"]:
        texts, walls = [], []
        for attack in attacks:
            metrics = (cells.get((defense, attack)) or {}).get("metrics") or {}
            if not metrics.get("acc", {}).get("n"):
                texts.append("missing")
                continue
            texts.append(_cell_text(defense, metrics))
            if metrics.get("wall_time", {}).get("mean") is not None:
                walls.append(metrics["wall_time"]["mean"])
        wall = f"{sum(walls) / len(walls):,.0f} s" if walls else "—"
        lines.append(f"| {defense} | " + " | ".join(texts) + f" | {wall} |")
    return lines


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        print("\n".join(matrix(json.load(fh))))

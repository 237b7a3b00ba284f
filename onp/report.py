"""Leaderboard tables (Markdown, CSV, JSON) from a grid of run directories.

A *cell* is one (model, attack, defense, seed) run directory in the :mod:`onp.rundir` format. The
leaderboard has one row per (model, attack, defense) with ACC / ASR / RA / DER as mean ± std over
the seeds that finished, the number of neurons pruned, the wall time, the ASR estimator the method
used, and how many seeds are present. Each (model, attack) also gets a ``no defense`` row from the
backdoored model's ``before`` metrics. Missing or failed seeds are always shown (``missing (2/3
seeds)``), never silently dropped.

A learned policy whose reward used the attacker's real trigger (the ``trigger`` estimator) is not a
defense a defender can run: its row is named ``<defense>[trigger-aware]`` (:data:`TRIGGER_AWARE`),
flagged ``trigger_aware``, and the Markdown table lists it apart, under the defenses, as an upper
bound, never among the baselines.

Conventions:

* Markdown shows ACC / ASR / RA / DER in percent (test set); std is the sample standard deviation
  over seeds (ddof = 1; 0.00 for a single seed).
* CSV and JSON hold the raw fractions in [0, 1] (as in ``metrics.json``); JSON also has every
  seed's value.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from .io import atomic_write_json, atomic_write_text

METRICS = ("acc", "asr", "ra", "der")
NO_DEFENSE = "no defense"
BASELINE_ESTIMATOR = "n/a (defense data only)"
#: the suffix of a learned row whose reward used the attacker's real trigger (an upper bound)
TRIGGER_AWARE = "[trigger-aware]"


@dataclass
class Cell:
    """One grid cell and what was found in its run directory."""

    model: str
    attack: str
    defense: str
    seed: int
    kind: str  # "baseline" | "policy"
    run_dir: Path
    status: str = "missing"  # ok | missing | failed
    metrics: Optional[Dict[str, Any]] = None
    error: Optional[str] = None

    @property
    def key(self) -> str:
        return f"{self.model}/{self.attack}/{self.defense}/s{self.seed}"

    @property
    def ok_metrics(self) -> Dict[str, Any]:
        """``metrics`` of a finished cell (``status == "ok"``); an error for a cell without them."""
        if self.metrics is None:
            raise ValueError(f"{self.key}: no metrics (status {self.status})")
        return self.metrics

    def load(self) -> "Cell":
        """Read ``metrics.json`` if the run finished (it is written last)."""
        path = Path(self.run_dir) / "metrics.json"
        if path.exists():
            try:
                self.metrics = json.loads(path.read_text())
                self.status = "ok"
            except (OSError, json.JSONDecodeError) as exc:
                self.status, self.error = "failed", f"unreadable metrics.json ({exc})"
        return self

    @property
    def device(self) -> str:
        """Where the cell computed: its run config's ``device`` (``config.json``; ``cpu`` when it names none,
        as every run before baselines took a device)."""
        cfg = self.read_json("config.json")
        if not isinstance(cfg, dict):
            return "cpu"
        run_cfg = cfg.get("run_config")
        if not isinstance(run_cfg, dict):
            run_cfg = cfg
        return str(run_cfg.get("device") or cfg.get("device") or "cpu")

    def read_json(self, name: str) -> Optional[Any]:
        path = Path(self.run_dir) / name
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None


def stats(values: Sequence[Optional[float]]) -> Dict[str, Any]:
    """Mean, sample std (0 for one value), n and the values; mean/std None for no values."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    n = len(vals)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "values": []}
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n, "values": vals}


def estimator_label(metrics: Dict[str, Any], kind: str) -> str:
    """How a cell measured ASR while defending: learned policies name their env estimator."""
    if kind == "baseline":
        return BASELINE_ESTIMATOR
    est = metrics.get("asr_estimator")
    if est is None:
        return "unknown"
    aware = metrics.get("trigger_aware")
    if aware is None:
        aware = est == "trigger"
    return f"{est} (trigger-aware)" if aware else f"{est} (defense data only)"


def is_trigger_aware(metrics: Dict[str, Any], kind: str) -> bool:
    """Whether a cell's method used the attacker's real trigger (a learned policy's ``trigger`` reward)."""
    return kind != "baseline" and estimator_label(metrics, kind).endswith("(trigger-aware)")


@dataclass
class Row:
    model: str
    attack: str
    defense: str
    kind: str  # baseline | policy | none
    expected: int
    ok: int
    failed: int
    seeds_ok: List[int] = field(default_factory=list)
    metrics: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # acc/asr/ra/der/n_pruned/wall_time -> stats
    asr_estimator: str = ""
    errors: List[str] = field(default_factory=list)
    trigger_aware: bool = False  # a learned row whose reward used the real trigger: an upper bound
    wall_time_by_device: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # device -> stats

    @property
    def status(self) -> str:
        if self.ok == self.expected and not self.failed:
            return f"{self.ok}/{self.expected}"
        parts = [f"missing ({self.ok}/{self.expected} seeds)"]
        if self.failed:
            parts.append(f"{self.failed} failed")
        return "; ".join(parts)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "model": self.model,
            "attack": self.attack,
            "defense": self.defense,
            "kind": self.kind,
            "seeds_expected": self.expected,
            "seeds_ok": self.ok,
            "seeds_failed": self.failed,
            "seeds": self.seeds_ok,
            "status": self.status,
            "asr_estimator": self.asr_estimator,
            "trigger_aware": self.trigger_aware,
            "metrics": self.metrics,
            "wall_time_by_device": self.wall_time_by_device,
            "errors": self.errors,
        }


def build_rows(
    cells: Iterable[Cell],
    *,
    models: Sequence[str],
    attacks: Sequence[str],
    defenses: Sequence[str],
    seeds: Sequence[int],
    before: Optional[Dict[str, Dict[str, float]]] = None,
) -> List[Row]:
    """Rows grouped by (model, attack): ``no defense`` first, then the defenses in the given order.

    ``before`` maps ``"model/attack/s<seed>"`` to the backdoored model's test metrics (used for the
    no-defense row when no cell of that seed finished)."""
    by_key = {c.key: c for c in cells}
    before = dict(before or {})
    rows: List[Row] = []
    for model in models:
        for attack in attacks:
            # no-defense row: each seed's `before` (the same backdoored model for every defense)
            base_vals: Dict[int, Dict[str, float]] = {}
            for seed in seeds:
                b = None
                for d in defenses:
                    c = by_key.get(f"{model}/{attack}/{d}/s{seed}")
                    if c is not None and c.status == "ok" and isinstance(c.ok_metrics.get("before"), dict):
                        b = c.ok_metrics["before"]
                        break
                b = b or before.get(f"{model}/{attack}/s{seed}")
                if b:
                    base_vals[seed] = b
            none = Row(model, attack, NO_DEFENSE, "none", len(seeds), len(base_vals), 0, sorted(base_vals))
            for m in ("acc", "asr", "ra"):
                none.metrics[m] = stats([v.get(m) for v in base_vals.values()])
            none.metrics["der"] = stats([0.5] * len(base_vals))  # nothing changed
            none.metrics["n_pruned"] = stats([0] * len(base_vals))
            none.metrics["wall_time"] = stats([])
            none.asr_estimator = "-"
            rows.append(none)
            for d in defenses:
                group = [by_key.get(f"{model}/{attack}/{d}/s{s}") for s in seeds]
                ok = [c for c in group if c is not None and c.status == "ok"]
                failed = [c for c in group if c is not None and c.status == "failed"]
                kind = next((c.kind for c in group if c is not None), "baseline")
                row = Row(model, attack, d, kind, len(seeds), len(ok), len(failed), [c.seed for c in ok])
                for m in METRICS + ("n_pruned", "wall_time"):
                    row.metrics[m] = stats([c.ok_metrics.get(m) for c in ok])
                devices = {c.key: c.device for c in ok}
                row.wall_time_by_device = {
                    dev: stats([c.ok_metrics.get("wall_time") for c in ok if devices[c.key] == dev])
                    for dev in sorted(set(devices.values()))
                }
                labels = sorted({estimator_label(c.ok_metrics, c.kind) for c in ok})
                row.asr_estimator = ", ".join(labels) if labels else (BASELINE_ESTIMATOR if kind == "baseline" else "-")
                if any(is_trigger_aware(c.ok_metrics, c.kind) for c in ok):
                    row.defense, row.trigger_aware = f"{d}{TRIGGER_AWARE}", True
                row.errors = [f"s{c.seed}: {c.error}" for c in failed if c.error]
                rows.append(row)
    return rows


# -------------------------------------------------------------------------------------------------- formatting


def fmt(st: Dict[str, Any], scale: float = 100.0, digits: int = 2) -> str:
    """``"mean ± std"`` (scaled), or ``"missing"`` without values."""
    if not st or st.get("n", 0) == 0 or st.get("mean") is None:
        return "missing"
    return f"{st['mean'] * scale:.{digits}f} ± {st['std'] * scale:.{digits}f}"


MD_COLUMNS = (
    "Defense",
    "ACC (%)",
    "ASR (%)",
    "RA (%)",
    "DER (%)",
    "#pruned",
    "Wall time (s)",
    "ASR estimator",
    "Seeds",
)


def _md_cells(row: Row) -> List[str]:
    m = row.metrics
    wall = "-" if row.kind == "none" else wall_time_text(row)
    return [
        row.defense,
        fmt(m["acc"]),
        fmt(m["asr"]),
        fmt(m["ra"]),
        fmt(m["der"]),
        fmt(m["n_pruned"], 1.0, 1),
        wall,
        row.asr_estimator,
        row.status,
    ]


def wall_time_text(row: Row) -> str:
    """The wall time of a row: ``mean ± std`` seconds when every cell ran on the CPU, else per device
    (``cuda 16.6 ± 0.5; cpu 354.2 ± 0.0``: a mean over devices would mean nothing)."""
    by_dev = row.wall_time_by_device
    if set(by_dev) <= {"cpu"}:
        return fmt(row.metrics["wall_time"], 1.0, 1)
    return "; ".join(f"{dev} {fmt(st, 1.0, 1)}" for dev, st in by_dev.items())


#: the caption of the trigger-aware rows' own table under each (model, attack)
UPPER_BOUND_NOTE = (
    "Upper bound, not a defense: the learned policy below was rewarded with the attacker's real trigger, "
    "which no defender has (research protocol; never compare it with the rows above as a defense)."
)


def _md_table(rows: Sequence[Row]) -> List[str]:
    lines = ["| " + " | ".join(MD_COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * 6 + ["---", "---"]) + "|"]
    return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in _md_cells(r)) + " |" for r in rows]


def to_markdown(rows: Sequence[Row], *, title: str = "Leaderboard", notes: Sequence[str] = ()) -> str:
    lines = [f"# {title}", ""]
    lines += [f"* {n}" for n in notes]
    if notes:
        lines.append("")
    models = list(dict.fromkeys(r.model for r in rows))
    groups: Dict[tuple, List[Row]] = {}
    for r in rows:
        groups.setdefault((r.model, r.attack), []).append(r)
    for (model, attack), group in groups.items():
        lines.append(f"## {attack}" if len(models) == 1 else f"## {model} / {attack}")
        lines.append("")
        defenses = [r for r in group if not r.trigger_aware]
        bounds = [r for r in group if r.trigger_aware]
        lines += _md_table(defenses)
        if bounds:
            lines += ["", UPPER_BOUND_NOTE, ""] + _md_table(bounds)
        errs = [f"{r.defense} {e}" for r in group for e in r.errors]
        if errs:
            lines.append("")
            lines += [f"* failed: {e}" for e in errs]
        lines.append("")
    return "\n".join(lines)


CSV_FIELDS = (
    ["model", "attack", "defense", "kind"]
    + [f"{m}_{s}" for m in METRICS + ("n_pruned", "wall_time") for s in ("mean", "std")]
    + ["asr_estimator", "trigger_aware", "seeds_ok", "seeds_expected", "seeds_failed", "status"]
)


def to_csv(rows: Sequence[Row]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        rec: Dict[str, Any] = {
            "model": r.model,
            "attack": r.attack,
            "defense": r.defense,
            "kind": r.kind,
            "asr_estimator": r.asr_estimator,
            "trigger_aware": r.trigger_aware,
            "seeds_ok": r.ok,
            "seeds_expected": r.expected,
            "seeds_failed": r.failed,
            "status": r.status,
        }
        for m in METRICS + ("n_pruned", "wall_time"):
            st = r.metrics.get(m) or {}
            for s in ("mean", "std"):
                v = st.get(s)
                rec[f"{m}_{s}"] = "" if v is None else f"{v:.6g}"
        w.writerow(rec)
    return buf.getvalue()


def write_leaderboard(
    rows: Sequence[Row],
    out_dir: Path,
    *,
    title: str = "Leaderboard",
    notes: Sequence[str] = (),
    extra: Optional[Dict[str, Any]] = None,
) -> Dict[str, Path]:
    """Write ``leaderboard.md``, ``leaderboard.csv`` and ``leaderboard.json`` atomically."""
    out_dir = Path(out_dir)
    paths = {"md": out_dir / "leaderboard.md", "csv": out_dir / "leaderboard.csv", "json": out_dir / "leaderboard.json"}
    atomic_write_text(paths["md"], to_markdown(rows, title=title, notes=notes))
    atomic_write_text(paths["csv"], to_csv(rows))
    atomic_write_json(
        paths["json"],
        {
            "title": title,
            "notes": list(notes),
            "units": "fractions in [0, 1]",
            "std": "sample standard deviation over seeds (0 for one seed)",
            **(extra or {}),
            "rows": [r.to_dict() for r in rows],
        },
    )
    return paths


LEADERBOARD_NOTES = (
    "ACC / ASR / RA / DER on the test set in %, mean ± std over seeds (sample std; 0.00 for one seed).",
    "DER = [max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1] / 2; 50 = nothing changed.",
    "'no defense': the backdoored model before any defense (the `before` metrics of the cells).",
    "ASR estimator: what the method used to measure ASR while defending. 'trigger (trigger-aware)' = the "
    "attack's real trigger (research protocol); baselines see only the defender's clean data.",
    "A learned row named '<policy>[trigger-aware]' used the real trigger: it is an upper bound, listed apart "
    "under each table, never a defense to compare with the baselines.",
    "Wall time: seconds of the defense (baselines) or of training + rollout (learned policies), one process.",
)

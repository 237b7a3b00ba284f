"""Merge leaderboards seed by seed: a finished leaderboard plus the cells that were missing from it.

A leaderboard's JSON (:func:`onp.report.write_leaderboard`) keeps every seed's value, so a grid whose
run folders are gone can still take the cells that finish later: each row is split back into one
result per seed, the seeds of every file are pooled, and the rows are recomputed (mean, sample std,
wall time per device) exactly as :func:`onp.report.build_rows` computes them from run folders.

The merge is a union, never an overwrite: a seed found in two files must carry the same values in
both, else it is refused with the row and seed named. The ``no defense`` rows carry each backdoored
model's test metrics, so a cell computed on a retrained model that differs from the one the first
leaderboard used is caught there. Where both files have a ``models.json`` beside them (``onp.compare``
writes one, with each backdoored model's weights digest), the digests decide instead: equal digests
are the same model, and ``no defense`` metrics that still differ were computed on another device (a
GPU's test pass can differ from the CPU's by an image); the first file's are kept and a note says so.
Different digests are refused.

Typical use (``scripts/merge_leaderboards.py``)::

    merged = merge_leaderboards([Path("docs/leaderboard-13/leaderboard.json"), Path("new-cell/leaderboard.json")])
    write_leaderboard(merged.rows, out_dir, title=merged.title, notes=merged.notes, extra=merged.extra)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

from .report import METRICS, NO_DEFENSE, Row, stats

#: the per-seed quantities a row keeps (``metrics`` keys of a leaderboard row)
ROW_METRICS = METRICS + ("n_pruned", "wall_time")
#: two values of one seed agree when they differ by at most this much (JSON round-trips floats exactly)
TOLERANCE = 1e-9

RowKey = Tuple[str, str, str]  # model, attack, defense


@dataclass(frozen=True)
class SeedResult:
    """One seed of one row: its metric values (``None`` when the row has none for it) and its device."""

    values: Mapping[str, Optional[float]]
    device: Optional[str]

    def agrees_with(self, other: "SeedResult") -> bool:
        for m in ROW_METRICS:
            a, b = self.values.get(m), other.values.get(m)
            if (a is None) != (b is None) or (a is not None and b is not None and abs(a - b) > TOLERANCE):
                return False
        return self.device == other.device


@dataclass
class MergedLeaderboard:
    """The merged rows, and the first file's title, notes and grid description (models, attacks, ...)."""

    rows: List[Row]
    title: str
    notes: List[str]
    extra: Dict[str, Any] = field(default_factory=dict)
    #: ``models.json`` entries of every file (``model/attack/s<seed>``: config, digest, test metrics)
    models: Dict[str, Any] = field(default_factory=dict)


def _device_of_each(row: Mapping[str, Any], walls: Sequence[Optional[float]]) -> List[Optional[str]]:
    """Which device each seed's wall time came from (``wall_time_by_device`` holds the values per device)."""
    pools = {dev: list(st.get("values") or []) for dev, st in (row.get("wall_time_by_device") or {}).items()}
    devices: List[Optional[str]] = []
    for wall in walls:
        dev = next((d for d, vals in pools.items() if wall is not None and wall in vals), None)
        if dev is not None:
            pools[dev].remove(wall)
        devices.append(dev)
    return devices


def seed_results(row: Mapping[str, Any]) -> Dict[int, SeedResult]:
    """Split a leaderboard JSON row into one :class:`SeedResult` per finished seed.

    A metric's ``values`` follow the row's ``seeds``; one that has values for some seeds only cannot be
    placed and is refused."""
    seeds = [int(s) for s in row.get("seeds") or []]
    where = f"{row.get('model')}/{row.get('attack')}/{row.get('defense')}"
    per_metric: Dict[str, List[Optional[float]]] = {}
    for m in ROW_METRICS:
        vals = list(((row.get("metrics") or {}).get(m) or {}).get("values") or [])
        if not vals:
            per_metric[m] = [None] * len(seeds)
        elif len(vals) == len(seeds):
            per_metric[m] = [float(v) for v in vals]
        else:
            raise ValueError(f"{where}: {len(vals)} values of {m!r} for seeds {seeds}: which seed is which is unknown")
    if row.get("kind") == "none":  # the backdoored model itself: no defense ran, on any device
        devices: List[Optional[str]] = [None] * len(seeds)
    else:  # a cell without a known device ran on the CPU, as in onp.report.Cell.device
        devices = [d or "cpu" for d in _device_of_each(row, per_metric["wall_time"])]
    return {s: SeedResult({m: per_metric[m][i] for m in ROW_METRICS}, devices[i]) for i, s in enumerate(seeds)}


def _row_errors(row: Mapping[str, Any]) -> Dict[int, str]:
    """A row's ``errors`` (``"s<seed>: ..."``) by seed."""
    out: Dict[int, str] = {}
    for e in row.get("errors") or []:
        head, _, _ = str(e).partition(":")
        if head.startswith("s") and head[1:].isdigit():
            out[int(head[1:])] = str(e)
    return out


def _rebuild(template: Mapping[str, Any], results: Dict[int, SeedResult], errors: Dict[int, str]) -> Row:
    """A :class:`Row` with ``template``'s identity and the pooled seeds' statistics."""
    seeds = sorted(results)
    kind = str(template["kind"])
    failed = {s: e for s, e in errors.items() if s not in results}
    row = Row(
        str(template["model"]),
        str(template["attack"]),
        str(template["defense"]),
        kind,
        int(template["seeds_expected"]),
        len(seeds),
        len(failed),
        seeds,
    )
    for m in ROW_METRICS:
        row.metrics[m] = stats([results[s].values.get(m) for s in seeds])
    if kind != "none":
        devices = sorted({str(results[s].device) for s in seeds})
        row.wall_time_by_device = {
            d: stats([results[s].values.get("wall_time") for s in seeds if results[s].device == d]) for d in devices
        }
    row.asr_estimator = str(template.get("asr_estimator", ""))
    row.trigger_aware = bool(template.get("trigger_aware", False))
    row.errors = [failed[s] for s in sorted(failed)]
    return row


def read_model_digests(path: Path) -> Dict[str, Any]:
    """The ``models.json`` beside a leaderboard.json (``{}`` when there is none); a corrupt one is refused."""
    models = Path(path).parent / "models.json"
    if not models.exists():
        return {}
    try:
        data = json.loads(models.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{models}: not a readable models.json ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{models}: not a models.json (not an object of model/attack/s<seed> entries)")
    return data


def _attack_of(model_key: str) -> str:
    """``"resnet18/sig/s0"`` -> ``"sig"`` (``""`` for a key of another shape)."""
    parts = model_key.split("/")
    return parts[1] if len(parts) == 3 else ""


def _read(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable leaderboard.json ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path}: not a leaderboard.json (no 'rows' list); onp.compare writes one in its --out folder")
    return data


def merge_leaderboards(
    paths: Sequence[Path], attacks: Optional[Sequence[Optional[Collection[str]]]] = None
) -> MergedLeaderboard:
    """Pool the seeds of every row of ``paths`` (leaderboard.json files). Raises ``ValueError`` on a seed
    whose values differ between two files, or on a row whose estimator or trigger-awareness differs.

    ``attacks``: per path, the attacks whose rows are taken from it (``None``: all), for a file whose
    other attacks' models were replaced (their rows are recomputed in another file).

    The result is a whole grid, as :func:`onp.report.build_rows` gives one: every (model, attack) with
    every defense that any file has, ``no defense`` first, then the defenses in the order the files
    first name them; a defense no file has for an attack is a row with no seed (missing), and a row
    expects the first file's grid seeds (``seeds``; else the most any file expected or found)."""
    if not paths:
        raise ValueError("no leaderboard.json to merge")
    chosen = list(attacks) if attacks is not None else [None] * len(paths)
    if len(chosen) != len(paths):
        raise ValueError(f"{len(chosen)} attack selections for {len(paths)} leaderboards")
    files = [_read(p) for p in paths]
    pooled = _Pool()
    for path, data, only in zip(paths, files, chosen):
        _check_attacks_present(data, only, path)
        digests = {k: v for k, v in read_model_digests(path).items() if only is None or _attack_of(k) in only}
        for row in data["rows"]:
            if only is None or str(row["attack"]) in only:
                pooled.add(row, path, digests)
        for key, entry in digests.items():
            pooled.models.setdefault(key, entry)
    first = files[0]
    extra: Dict[str, Any] = {k: first[k] for k in ("models", "attacks", "defenses", "seeds") if k in first}
    rows = pooled.rows(len(first.get("seeds") or []))
    if "attacks" in extra:  # the first file's order, without attacks no row kept, then the others' attacks
        present = list(dict.fromkeys(r.attack for r in rows))
        first_order = [a for a in extra["attacks"] if a in present]
        extra["attacks"] = first_order + [a for a in present if a not in first_order]
    notes = list(first.get("notes") or [])
    notes += [n for n in pooled.notes if n not in notes]
    return MergedLeaderboard(rows, str(first.get("title", "Leaderboard")), notes, extra, pooled.models)


class _Pool:
    """The rows of several leaderboards, pooled seed by seed (:func:`merge_leaderboards`)."""

    def __init__(self) -> None:
        self.templates: Dict[RowKey, Dict[str, Any]] = {}
        self.results: Dict[RowKey, Dict[int, SeedResult]] = {}
        self.errors: Dict[RowKey, Dict[int, str]] = {}
        self.models: Dict[str, Any] = {}  # models.json entries, the first file's for each model
        self.notes: List[str] = []

    def add(self, row: Mapping[str, Any], path: Path, digests: Mapping[str, Any]) -> None:
        key = (str(row["model"]), str(row["attack"]), str(row["defense"]))
        known = self.templates.setdefault(key, dict(row))
        expected = max(int(known["seeds_expected"]), int(row["seeds_expected"]))
        if not known.get("seeds"):  # a row with no finished seed has no method figures to keep
            known = self.templates[key] = dict(row)
        elif row.get("seeds"):
            _check_same_method(known, row, key, path)
        known["seeds_expected"] = expected
        pooled = self.results.setdefault(key, {})
        for seed, res in seed_results(row).items():
            if seed in pooled and not pooled[seed].agrees_with(res):
                if row.get("kind") == "none" and self._same_model(key, seed, path, digests, pooled[seed], res):
                    continue  # the same weights, tested on another device: the first file's figures stay
                raise ValueError(
                    f"{path}: {'/'.join(key)} seed {seed} differs from an earlier file "
                    f"({dict(pooled[seed].values)} vs {dict(res.values)}); a merge only adds missing seeds"
                )
            pooled[seed] = res
        self.errors.setdefault(key, {}).update(_row_errors(row))

    def _same_model(
        self, key: RowKey, seed: int, path: Path, digests: Mapping[str, Any], kept: SeedResult, new: SeedResult
    ) -> bool:
        """Whether two differing ``no defense`` seeds are one model by its weights digest (a note is
        added); refuses outright when both digests are known and differ. ``False``: no digest to tell."""
        name = f"{key[0]}/{key[1]}/s{seed}"
        then = (self.models.get(name) or {}).get("digest")
        now = (digests.get(name) or {}).get("digest")
        if not then or not now:
            return False
        if then != now:
            raise ValueError(
                f"{path}: {name} is another model than an earlier file's (weights digest {now}, earlier {then}); "
                "a merge never mixes two models: recompute the row on one of them"
            )
        acc = [100 * float(r.values.get("acc") or 0.0) for r in (kept, new)]
        self.notes.append(
            f"{name}: the same model (weights digest {then}) tested at {acc[0]:.2f}% ACC in one file and "
            f"{acc[1]:.2f}% in {path} (another device's test pass); the first file's 'no defense' figures are kept, "
            "and each cell's DER uses its own before-metrics"
        )
        return True

    def rows(self, grid_seeds: int) -> List[Row]:
        """Every (model, attack) x defense, in order; an absent one as a row with no seed."""
        pairs = list(dict.fromkeys((m, a) for m, a, _ in self.templates))
        defenses = list(dict.fromkeys(d for _, _, d in self.templates))
        defenses.sort(key=lambda d: d != NO_DEFENSE)  # stable: the no-defense row first
        by_defense = {d: t for (_, _, d), t in self.templates.items()}
        out = []
        for model, attack in pairs:
            for defense in defenses:
                key = (model, attack, defense)
                template = self.templates.get(key) or {**by_defense[defense], "model": model, "attack": attack}
                results = self.results.get(key, {})
                expected = max(int(template["seeds_expected"]), len(results), grid_seeds)
                out.append(_rebuild({**template, "seeds_expected": expected}, results, self.errors.get(key, {})))
        return out


def _check_attacks_present(data: Mapping[str, Any], only: Optional[Collection[str]], path: Path) -> None:
    """Refuse an attack selection that names an attack the file has no row of (a typo keeps nothing)."""
    if only is None:
        return
    missing = sorted(set(only) - {str(r["attack"]) for r in data["rows"]})
    if missing:
        have = sorted({str(r["attack"]) for r in data["rows"]})
        raise ValueError(f"{path}: no rows of {', '.join(missing)} (it has {', '.join(have)})")


def _check_same_method(a: Mapping[str, Any], b: Mapping[str, Any], key: RowKey, path: Path) -> None:
    for field_name in ("kind", "asr_estimator", "trigger_aware"):
        if a.get(field_name) != b.get(field_name):
            raise ValueError(
                f"{path}: {'/'.join(key)} has {field_name}={b.get(field_name)!r}, an earlier file "
                f"{a.get(field_name)!r}: not the same method, not merged"
            )

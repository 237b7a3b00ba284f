"""PNG plots of a comparison grid (matplotlib, Agg backend; no display needed).

* ``sweep_<model>_<attack>.png``: test ACC and ASR against the number of neurons pruned: the
  scoring baselines' ``oracle_sweep.json`` curves (mean over seeds; **oracle sweep (test set),
  analysis only**) and every method's chosen operating point (markers; learned policies as stars).
* ``der_<model>.png``: DER per method and attack (grouped bars, mean ± std over seeds).
* ``learning_curve.png``: mean episode return against timesteps of every learned-policy cell
  (``learning_curve.json``).
* ``pruned_per_layer_<model>.png``: how many neurons each method prunes in each BN layer (mean
  over the method's finished cells).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .report import NO_DEFENSE, Cell, Row  # noqa: E402

SWEEP_LABEL = "oracle sweep (test set), analysis only"


def _colors(names: Sequence[str]) -> Dict[str, Any]:
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def plot_sweeps(
    cells: Sequence[Cell], path: Path, *, model: str, attack: str, defenses: Sequence[str]
) -> Optional[Path]:
    """ACC and ASR vs #pruned for one (model, attack)."""
    mine = [c for c in cells if c.model == model and c.attack == attack and c.status == "ok"]
    if not mine:
        return None
    colors = _colors(list(defenses))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    any_sweep = False
    for d in defenses:
        group = [c for c in mine if c.defense == d]
        if not group:
            continue
        any_sweep = _plot_defense(axes, d, group, colors[d]) or any_sweep
    before = [c.ok_metrics["before"] for c in mine if isinstance(c.ok_metrics.get("before"), dict)]
    if before:
        for ax, m in zip(axes, ("acc", "asr")):
            ax.axhline(100 * _mean([b[m] for b in before]), color="gray", ls=":", lw=1, label=f"{NO_DEFENSE}")
    for ax, m in zip(axes, ("ACC", "ASR")):
        ax.set_xlabel("neurons pruned")
        ax.set_ylabel(f"test {m} (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{model} / {attack}: ACC vs pruned")
    axes[1].set_title(f"{model} / {attack}: ASR vs pruned")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(
        f"lines = {SWEEP_LABEL}; markers = each method's chosen operating point"
        if any_sweep
        else "each method's chosen operating point (no oracle sweeps in this grid)"
    )
    return _save(fig, path)


def _plot_defense(axes: Any, d: str, group: Sequence[Cell], color: Any) -> bool:
    """Defense ``d``'s cells on the ACC and ASR axes: its mean oracle sweep (a line, if any) and each
    cell's chosen operating point (a marker); returns whether it had a sweep."""
    curves: Dict[int, Dict[str, List[float]]] = {}
    for c in group:
        sweep = c.read_json("oracle_sweep.json") or {}
        for pt in sweep.get("sweep") or []:
            acc = curves.setdefault(int(pt["n_pruned"]), {"acc": [], "asr": []})
            acc["acc"].append(pt["acc"])
            acc["asr"].append(pt["asr"])
    kwargs = {"color": color}
    if curves:
        ks = sorted(curves)
        for ax, m in zip(axes, ("acc", "asr")):
            ax.plot(ks, [100 * _mean(curves[k][m]) for k in ks], "-", lw=1.4, label=f"{d} (sweep)", **kwargs)
    marker = "*" if group[0].kind == "policy" else "o"
    size = 14 if marker == "*" else 7
    for i, c in enumerate(group):
        n = c.ok_metrics.get("n_pruned") or 0
        for ax, m in zip(axes, ("acc", "asr")):
            ax.plot(
                [n],
                [100 * c.ok_metrics[m]],
                marker,
                ms=size,
                mec="black",
                mew=0.6,
                label=(f"{d} (chosen)" if i == 0 and m == "acc" else None),
                **kwargs,
            )
    return bool(curves)


def plot_der(rows: Sequence[Row], path: Path, *, model: str) -> Optional[Path]:
    """Grouped bars: DER (%) per attack (groups) and method (bars), error bars = std over seeds."""
    mine = [r for r in rows if r.model == model and r.kind != "none"]
    if not mine:
        return None
    attacks = list(dict.fromkeys(r.attack for r in mine))
    methods = list(dict.fromkeys(r.defense for r in mine))
    colors = _colors(methods)
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.22 * len(attacks) * len(methods) + 3)), 4.5))
    missing_x = []
    for j, d in enumerate(methods):
        xs, ys, es = [], [], []
        for i, a in enumerate(attacks):
            r = next((r for r in mine if r.attack == a and r.defense == d), None)
            st = r.metrics.get("der") if r else None
            x = i + (j - (len(methods) - 1) / 2) * width
            if st and st.get("n"):
                xs.append(x)
                ys.append(100 * st["mean"])
                es.append(100 * st["std"])
            else:
                missing_x.append(x)
        ax.bar(xs, ys, width, yerr=es, capsize=2, color=colors[d], label=d)
    if missing_x:  # a partial grid shows its missing cells instead of silently leaving gaps
        ax.plot(missing_x, [2.0] * len(missing_x), "x", color="gray", ms=5, label="missing cell")
    ax.axhline(50, color="gray", ls=":", lw=1, label="no change (50)")
    ax.set_xticks(range(len(attacks)))
    ax.set_xticklabels(attacks)
    ax.set_ylabel("DER (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{model}: DER per method and attack (test set, mean ± std over seeds)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_learning_curves(cells: Sequence[Cell], path: Path) -> Optional[Path]:
    """Mean episode return vs timesteps for every finished learned-policy cell."""
    curves = []
    for c in cells:
        if c.kind != "policy" or c.status != "ok":
            continue
        lc = c.read_json("learning_curve.json")
        if isinstance(lc, dict):
            lc = lc.get("curve") or lc.get("points")
        if lc:
            curves.append((c, lc))
    if not curves:
        return None
    attacks = list(dict.fromkeys(c.attack for c, _ in curves))
    colors = _colors(attacks)
    styles = ["-", "--", "-.", ":"]
    policies = list(dict.fromkeys(c.defense for c, _ in curves))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    seen = set()
    for c, lc in curves:
        xs = [p["timesteps"] for p in lc]
        ys = [p["mean_return"] for p in lc]
        label = f"{c.defense} / {c.attack}" if (c.defense, c.attack) not in seen else None
        seen.add((c.defense, c.attack))
        ax.plot(
            xs,
            ys,
            styles[policies.index(c.defense) % len(styles)],
            color=colors[c.attack],
            lw=1.2,
            marker="." if len(xs) < 30 else None,
            label=label,
            alpha=0.85,
        )
    ax.set_xlabel("timesteps")
    ax.set_ylabel("mean episode return")
    ax.set_title("learned policies: learning curves (one line per seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def layer_of_names(names: Sequence[str]) -> List[str]:
    """``"layer1.0.bn1[3]"`` or ``"layer1.0.bn1:3"`` -> ``"layer1.0.bn1"``."""
    out = []
    for n in names:
        n = str(n)
        if n.endswith("]") and "[" in n:
            out.append(n[: n.rindex("[")])
        elif ":" in n:
            out.append(n[: n.rindex(":")])
        else:
            out.append(n)
    return out


def pruned_layers(cell: Cell, layer_slices: Optional[List[tuple]] = None) -> Optional[List[str]]:
    """The BN layer of every pruned neuron of a cell (from ``pruned.json``), or None."""
    pruned = cell.read_json("pruned.json")
    if not pruned:
        return None
    if layer_slices:
        out = []
        for i in pruned.get("indices") or []:
            for name, off, n in layer_slices:
                if off <= int(i) < off + n:
                    out.append(name)
                    break
        return out
    if pruned.get("names"):
        return layer_of_names(pruned["names"])
    return None


def plot_pruned_per_layer(
    cells: Sequence[Cell],
    path: Path,
    *,
    model: str,
    defenses: Sequence[str],
    layer_slices: Optional[List[tuple]] = None,
) -> Optional[Path]:
    """Grouped bars: mean number of pruned neurons per BN layer, one bar per method."""
    counts: Dict[str, List[Dict[str, int]]] = {}
    order: List[str] = [s[0] for s in layer_slices] if layer_slices else []
    for c in cells:
        if c.model != model or c.status != "ok":
            continue
        layers = pruned_layers(c, layer_slices)
        if layers is None:
            continue
        hist: Dict[str, int] = {}
        for name in layers:
            hist[name] = hist.get(name, 0) + 1
            if name not in order:
                order.append(name)
        counts.setdefault(c.defense, []).append(hist)
    if not counts or not order:
        return None
    methods = [d for d in defenses if d in counts]
    colors = _colors(list(defenses))
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(7, 0.35 * len(order) * max(1, len(methods)) ** 0.5 + 3), 4.5))
    for j, d in enumerate(methods):
        runs = counts[d]
        ys = [_mean([h.get(layer, 0) for h in runs]) for layer in order]
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(order))]
        ax.bar(xs, ys, width, color=colors[d], label=f"{d} ({len(runs)} runs)")
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(order, rotation=90, fontsize=7)
    ax.set_ylabel("neurons pruned (mean over runs)")
    ax.set_title(f"{model}: pruned neurons per BN layer")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def make_all(
    plot_dir: Path,
    cells: Sequence[Cell],
    rows: Sequence[Row],
    *,
    models: Optional[Dict[str, Any]] = None,
    layers_of: Optional[Callable[[Optional[str]], Optional[List[tuple]]]] = None,
) -> List[Path]:
    """Every plot of a grid; returns the files written. ``models`` is compare's ``models.json``;
    ``layers_of(model_dir)`` gives ``[(bn_name, offset, num_channels)]`` of a model (per-layer plot)."""
    plot_dir = Path(plot_dir)
    written: List[Optional[Path]] = []
    model_names = list(dict.fromkeys(c.model for c in cells))
    attacks = list(dict.fromkeys(c.attack for c in cells))
    defenses = list(dict.fromkeys(c.defense for c in cells))
    for m in model_names:
        for a in attacks:
            written.append(
                plot_sweeps(cells, plot_dir / f"sweep_{_safe(m)}_{_safe(a)}.png", model=m, attack=a, defenses=defenses)
            )
        written.append(plot_der(rows, plot_dir / f"der_{_safe(m)}.png", model=m))
        model_dir = next((v.get("path") for k, v in (models or {}).items() if k.split("/")[0] == m), None)
        written.append(
            plot_pruned_per_layer(
                cells,
                plot_dir / f"pruned_per_layer_{_safe(m)}.png",
                model=m,
                defenses=defenses,
                layer_slices=layers_of(model_dir) if layers_of else None,
            )
        )
    written.append(plot_learning_curves(cells, plot_dir / "learning_curve.png"))
    return [p for p in written if p is not None]

"""What a defense returns (:class:`Verdict`, :class:`RecoveredTrigger`, :class:`DefenseReport`) and
the files of its run folder (:func:`write_defense_run`): the result half of :mod:`onp.defend`.

This module is core: it imports no upper layer (``agents``, ``baselines``, ``envs``); the defense
itself (:func:`onp.defend.run_defense`) builds these objects.

Run folder files (:func:`write_defense_run`): the repaired weights under the user's own key names
(``model.pt``, or ``model.safetensors`` when the input was safetensors), ``pruned.json``,
``config.json``, ``train_config.json``, ``report.md`` (:func:`report_markdown`), ``report.json``
(strict JSON: :meth:`DefenseReport.to_dict`), ``metrics.json``, ``trigger.png`` (:func:`plot_trigger`),
``env.json`` and ``README.md``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .backdoor_verdict import CONFIRM_THRESHOLD, CONFIRMING_DETECTORS, LATENT_GAP_ALONE, Verdict
from .defend_config import DefendConfig
from .evidence import Judgement
from .io import atomic_write_bytes, atomic_write_text
from .rundir import write_run

__all__ = [
    "Verdict",
    "RecoveredTrigger",
    "DefenseReport",
    "plot_trigger",
    "report_markdown",
    "write_defense_run",
    "ASR_ESTIMATE_NOTE",
]

#: what a run's log and report call the ASR it measures on defense-validation
ASR_ESTIMATE_NOTE = (
    "estimate: the ASR of the reverse-engineered (synthesized) trigger on defense-validation images; "
    "onp never sees the real trigger"
)


# --------------------------------------------------------------------------------------------------
# what a defense returns


@dataclass
class RecoveredTrigger:
    """The reverse-engineered trigger of the estimated target class (for ``trigger.png``).

    Attributes:
        stamp: ``mask * pattern`` ``(C, H, W)``: what the trigger adds to an image.
        mask: ``(1, H, W)`` in [0, 1].
        stamped: the first stamped defense-validation images ``(k, C, H, W)``.
        pred_before / pred_after: the model's predictions on ``stamped`` before and after the repair.
        target: the estimated target class.
    """

    stamp: Tensor
    mask: Tensor
    stamped: Tensor
    target: int
    pred_before: List[int] = field(default_factory=list)
    pred_after: List[int] = field(default_factory=list)


@dataclass
class DefenseReport:
    """What :func:`onp.defend.defend` / :func:`onp.defend.run_defend` return.

    Attributes:
        model: the repaired model (your module, pruned neurons masked in its BatchNorm weights; its
            ``state_dict`` loads into a freshly built model of the same class).
        pruned: pruned neuron ids (onp's graph numbering, docs/concepts.md "What a neuron is").
        pruned_names: ``"<bn layer>[<channel>]"`` of each, in your model's module names.
        verdict: the backdoor verdict before pruning (:class:`Verdict`).
        judgement: "no evidence, no pruning" applied to the repair (:class:`onp.evidence.Judgement`;
            ``verdict``: removed / not removed / nothing pruned, with val ACC/ASR before and after).
        defense: the defense asked for (``ppo-gnn``, ``auto`` or a baseline); ``metrics["chosen_defense"]``
            names the one whose repair was kept.
        metrics: validation ACC and estimated ASR before/after, pruned neurons per layer, the
            per-defense details, optional test metrics (JSON-ready).
        wall_time: seconds of the whole defense.
        trigger: the recovered trigger (not in :meth:`to_dict`; drawn into ``trigger.png``).
        run_dir: the run folder, when one was written.
    """

    model: nn.Module
    pruned: List[int]
    pruned_names: List[str]
    verdict: Verdict
    judgement: Judgement
    defense: str
    metrics: Dict[str, Any]
    wall_time: float
    trigger: Optional[RecoveredTrigger] = None
    run_dir: Optional[Path] = None

    @property
    def outcome(self) -> str:
        """removed / not removed / nothing pruned (:data:`onp.evidence.VERDICTS`)."""
        return self.judgement.verdict

    def summary_lines(self) -> List[str]:
        """The verdict, the outcome of the repair, and the numbers (what the CLI prints)."""
        m, v = self.metrics, self.metrics["val"]
        defense = m["chosen_defense"] if m["chosen_defense"] != "none" else "no repair"
        line = (
            f"{defense}: val ACC {v['acc_before']:.4f}->{v['acc_after']:.4f}  estimated val ASR "
            f"{v['asr_before']:.4f}->{v['asr_after']:.4f} (estimate)  |  pruned {len(self.pruned)} of "
            f"{m['num_neurons']} neurons"
        )
        test = m.get("test")
        if test:
            line += f"  |  test ACC {test['acc_before']:.4f}->{test['acc_after']:.4f}"
            if "asr_before" in test:
                line += f"  test ASR {test['asr_before']:.4f}->{test['asr_after']:.4f} (trigger-aware)"
        line += f"  |  {self.wall_time:.0f}s" + (f"  -> {self.run_dir}" if self.run_dir else "")
        outcome = self.judgement.summary().removeprefix("verdict: ")
        return [self.verdict.summary(), f"outcome: {outcome}", line]

    def to_dict(self) -> Dict[str, Any]:
        """The report as JSON-ready values (``report.json``)."""
        return {
            "verdict": self.verdict.to_dict(),
            "verdict_summary": self.verdict.summary(),
            "outcome": self.outcome,
            "judgement": self.judgement.to_dict(),
            "defense": self.defense,
            "pruned": list(self.pruned),
            "pruned_names": list(self.pruned_names),
            "metrics": self.metrics,
            "wall_time": round(self.wall_time, 2),
        }


# --------------------------------------------------------------------------------------------------
# the report files


def plot_trigger(report: DefenseReport) -> bytes:
    """``trigger.png``: the recovered trigger (mask x pattern) next to a few stamped clean images with
    the model's prediction before and after the repair (PNG bytes; matplotlib's Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    trig = report.trigger
    if trig is None:
        raise ValueError("the report has no recovered trigger")
    panels = [(trig.stamp, "recovered trigger\n(mask x pattern)")]
    for i, img in enumerate(trig.stamped):
        before = trig.pred_before[i] if i < len(trig.pred_before) else "?"
        after = trig.pred_after[i] if i < len(trig.pred_after) else "?"
        panels.append((img, f"stamped clean image\npred {before} -> {after}"))
    fig = Figure(figsize=(2.2 * len(panels), 2.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (img, title) in zip(axes, panels):
        arr = img.detach().float().clamp(0, 1).cpu()
        if arr.shape[0] == 1:
            ax.imshow(arr[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(arr.permute(1, 2, 0).numpy())
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    v = report.verdict
    fig.suptitle(
        f"estimated target class {v.estimated_target}, anomaly index {v.anomaly_index:.2f} "
        f"(reverse-engineered: an estimate)",
        fontsize=9,
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _row(label: str, before: float, after: float) -> str:
    return f"| {label} | {before:.4f} | {after:.4f} |"


def _test_rows(test: Optional[Mapping[str, Any]]) -> List[str]:
    """The report's test rows (only with held-out images; ASR/RA only with a known trigger)."""
    if not test:
        return []
    rows = [_row(f"test ACC ({test['n']} images)", test["acc_before"], test["acc_after"])]
    if "asr_before" in test:
        rows += [
            _row(
                f"test ASR (**trigger-aware**: attack `{test['attack']['name']}`)",
                test["asr_before"],
                test["asr_after"],
            ),
            _row("test RA (trigger-aware)", test["ra_before"], test["ra_after"]),
        ]
    return rows


def _inversion_table(verdict: Verdict) -> List[str]:
    """The per-class trigger inversion behind the verdict, as a Markdown table."""
    cost = verdict.inversion_seconds
    optional = {  # the columns a detector adds, shown when its statistics were computed
        "max margin": verdict.max_margin,
        "latent-gap index": verdict.latent_gap_indices,
        "compactness index": verdict.compactness_indices,
    }
    extra = {name: values for name, values in optional.items() if values}
    lines = [
        "## Trigger inversion per class",
        "",
        *(
            [f"Computed in {cost:.0f} s (cached: later runs on this model and these images reuse it).", ""]
            if cost
            else []
        ),
        "| class | trigger family | trigger size | anomaly index | flips |" + "".join(f" {n} |" for n in extra),
        "|---|---|---|---|---|" + "---|" * len(extra),
    ]
    families = verdict.trigger_families or ["patch"] * len(verdict.mask_l1)
    rows = zip(families, verdict.mask_l1, verdict.anomaly_indices, verdict.success)
    for c, (fam, size, a, ok) in enumerate(rows):
        mark = " (estimated target)" if c == verdict.estimated_target else ""
        cells = "".join(f" {values[c]:.2f} |" for values in extra.values())
        lines.append(f"| {c}{mark} | {fam} | {size:.2f} | {a:.2f} | {ok:.2f} |{cells}")
    return lines


def _verdict_rule(verdict: Verdict) -> str:
    """How the verdict's detector decides, in one sentence."""
    size = f"the estimated target's anomaly index is <= -{verdict.threshold:g} (Neural Cleanse's threshold is 2)"
    if verdict.detector == "trigger-size":
        return f"Suspected when {size}."
    margin = (
        f"the largest per-class maximum margin has a p-value < {verdict.max_margin_alpha or 0.05:g} under a gamma "
        "fit to the other classes' (MM-BD)"
    )
    if verdict.detector in CONFIRMING_DETECTORS:
        x = CONFIRM_THRESHOLD
        or_margin = f", or when {margin} (that class is then the target)" if verdict.detector != "confirmed" else ""
        return (
            f"Suspected when a class's trigger-size anomaly index is <= -{x:g} and its latent-gap or compactness "
            f"index is >= {x:g}, or its latent-gap index alone is >= {LATENT_GAP_ALONE:g}{or_margin}. The latent "
            "gap is 1 - cosine between the model's penultimate features of the images the class's trigger flips "
            "and of the class's real images; the compactness is the share of the class's patch mask inside its "
            "best 5 x 5 window (envs.compactness); each index is a MAD anomaly index over the classes."
        )
    if verdict.detector == "combined":
        return (
            f"Suspected when {size}, or when the class with the largest maximum margin has a combined p-value "
            f"< {verdict.max_margin_alpha or 0.05:g}: Stouffer's combination of its MM-BD p-value (a gamma fit "
            "to the other classes' maximum margins) and its own anomaly index read as a z-score."
        )
    return f"Suspected when {margin}." if verdict.detector == "max-margin" else f"Suspected when {margin}, or {size}."


def _rival_note(verdict: Verdict) -> List[str]:
    """A warning paragraph when the two statistics name different targets (:attr:`Verdict.rival_target`)."""
    rival = verdict.rival_target
    if rival is None:
        return []
    by_margin = rival == verdict.margin_class
    other = "the maximum margin" if by_margin else "the trigger size alone"
    detector = "max-margin" if by_margin else "trigger-size"
    why = "the confirmed class comes first" if verdict.detector == "confirmed-or-margin" else "the stronger evidence"
    return [
        "",
        f"**The statistics disagree on the target:** the repair aimed at class {verdict.estimated_target} "
        f"({why}), while {other} names class {rival}. If the repair does not hold, defend "
        f"again with `--set estimator_params.detector='\"{detector}\"'` to aim at that class.",
    ]


def report_markdown(report: DefenseReport, weights_name: Optional[str] = None) -> str:
    """``report.md``: the verdict, the outcome, validation (and test) figures, the pruned neurons per
    layer, the per-class trigger inversion and the wall time."""
    m, v, verdict = report.metrics, report.metrics["val"], report.verdict
    lines = [
        "# onp.defend report",
        "",
        f"**{verdict.summary()}**",
        "",
        f"**outcome:** {report.judgement.summary().removeprefix('verdict: ')}",
        "",
        f"Defense: `{report.defense}`"
        + (f" (kept: `{m['chosen_defense']}`)" if m["chosen_defense"] != report.defense else "")
        + (" -- forced (`--force`)" if m["forced"] else ""),
        "",
        "| | before | after |",
        "|---|---|---|",
        _row(f"validation ACC ({v['n_clean']} clean defense-validation images)", v["acc_before"], v["acc_after"]),
        _row(
            f"validation ASR, **estimate** (synthesized trigger on {v['n_triggered']} images)",
            v["asr_before"],
            v["asr_after"],
        ),
    ]
    lines += _test_rows(m.get("test"))
    lines += [
        "",
        f"The estimated ASR is an {ASR_ESTIMATE_NOTE}.",
        "",
        f"Pruned neurons: {m['n_pruned']} of {m['num_neurons']}",
        "",
    ]
    if m["pruned_per_layer"]:
        lines += ["| layer | pruned |", "|---|---|"] + [f"| `{k}` | {n} |" for k, n in m["pruned_per_layer"].items()]
        lines += ["", "Neurons: " + ", ".join(f"`{n}`" for n in report.pruned_names), ""]
    lines += _inversion_table(verdict)
    lines += [
        "",
        _verdict_rule(verdict),
        *_rival_note(verdict),
        "",
        "![recovered trigger](trigger.png)",
        "",
        f"Wall time: {report.wall_time:.1f} s",
    ]
    if weights_name:
        lines += ["", f"Repaired weights: `{weights_name}` (your model's own key names)."]
    return "\n".join(lines) + "\n"


def _weights_bytes(state: Mapping[str, Tensor], fmt: str) -> Tuple[str, bytes]:
    """``(file name, bytes)`` of the repaired state_dict: safetensors for a safetensors input, else torch."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    if fmt == "safetensors":
        from safetensors.torch import save

        return "model.safetensors", save(tensors)
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return "model.pt", buf.getvalue()


def write_defense_run(
    run_dir: Path,
    report: DefenseReport,
    cfg: DefendConfig,
    *,
    weights: Mapping[str, Tensor],
    weights_format: str = "state_dict",
    command: Optional[str] = None,
) -> Path:
    """Write the run folder's files (module doc); ``weights`` is the repaired state_dict under the
    user's key names, written as safetensors when ``weights_format == "safetensors"``."""
    name, blob = _weights_bytes(weights, weights_format)
    atomic_write_bytes(run_dir / name, blob)
    if report.trigger is not None:
        atomic_write_bytes(run_dir / "trigger.png", plot_trigger(report))
    atomic_write_text(run_dir / "report.md", report_markdown(report, name))
    write_run(
        run_dir,
        config=cfg.to_dict(),
        metrics=report.metrics,
        pruned=report.pruned,
        pruned_names=report.pruned_names,
        command=command,
        extra={"report.json": report.to_dict(), "train_config.json": cfg.learned_config()},
    )
    return run_dir

"""Issue #16's acceptance: ``onp.defend`` as a defender who *received* each zoo model.

Every cached zoo model (5 attacks x seeds, plus clean models) is exported the way a defender gets it: a
plain ``state_dict`` (``weights.pt``) and its 500 clean defender images as an ``.npz`` (with the zoo's
defense-train/validation split as ``val``, so onp.defend sees the data onp.train sees); the held-out test
images go to a second ``.npz``. ``python -m onp.defend`` then runs on those files (the verdict, then the
repair with ``--defense``), and its test ACC/ASR are computed afterwards by this script with the attack's
real trigger (reporting only; onp.defend never sees the trigger or the test labels).

One JSON line per model is appended to ``OUT/results.jsonl`` as it finishes; a model already there is
skipped, so an interrupted run resumes. The models must be in the zoo cache already
(``python -m onp.backdoor ...``); a missing one is reported and skipped.

    python scripts/defend_zoo.py --out runs/defend-zoo --defense clp --seeds 0 1 2

``--target N`` picks the zoo models backdoored towards class N (the zoo's default is 0).

``--summary`` prints, from ``OUT/results.jsonl`` files, what every verdict detector decides on each
model's recorded statistics (the max-margin ones exist when the run's detector computed them, e.g.
``--extra --set 'estimator_params.detector="combined"'``; the latent gaps with ``"confirmed"``; both with
``"confirmed-or-margin"``), the target class it names, and on how many models each is right (a
backdoored model suspected with its real target, a clean one not; rows written before the real target
was recorded count a suspicion as right whatever class it names). The max-margin rules compare the
p-value with the level the run recorded (``confirmed-or-margin``'s fixed 0.005, else ``margin_alpha``):

    python scripts/defend_zoo.py --summary runs/defend-zoo runs/defend-zoo-2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from onp.backdoor_verdict import DETECTORS, Verdict
from onp.metrics import evaluate_backdoor
from onp.zoo import BackdoorBundle, BackdoorConfig, load_bundle

ATTACKS = ("badnets", "blend", "trojan", "sig", "wanet")


def _uint8(x: torch.Tensor) -> np.ndarray:
    return (x * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def export(bundle: BackdoorBundle, folder: Path) -> Dict[str, Any]:
    """The defender's files of one zoo model: weights.pt, clean.npz (500 images), test.npz."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(bundle.model.state_dict(), folder / "weights.pt")
    d = bundle.defense_data
    x = torch.cat([d.train_x, d.val_x])
    y = torch.cat([d.train_y, d.val_y])
    val = np.arange(len(y)) >= len(d.train_y)  # the zoo's own split, so onp.defend sees onp.train's data
    np.savez(folder / "clean.npz", x=_uint8(x), y=y.numpy(), val=val)
    np.savez(folder / "test.npz", x=_uint8(bundle.test_x), y=bundle.test_y.numpy())
    return {"model_dir": str(bundle.path), "width": bundle.meta["config"].get("width")}


def defend(folder: Path, defense: str, seed: int, extra: List[str]) -> float:
    cmd = [
        sys.executable, "-m", "onp.defend", "--arch", "resnet18", "--width", "16", "--num-classes", "10",
        "--in-channels", "1", "--input-size", "28", "--weights", str(folder / "weights.pt"),
        "--clean-data", str(folder / "clean.npz"), "--defense", defense, "--seed", str(seed),
        "--torch-threads", "1", "--out", str(folder / f"defend-{defense}"), "--overwrite", "--quiet", *extra,
    ]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def measure(bundle: BackdoorBundle, folder: Path, defense: str) -> Dict[str, Any]:
    """Test ACC/ASR of the received and the repaired model, with the attack's real trigger."""
    repaired = bundle.fresh_model()
    repaired.load_state_dict(torch.load(folder / f"defend-{defense}" / "model.pt", weights_only=True))
    before = evaluate_backdoor(bundle.model.eval(), bundle.test_x, bundle.test_y, bundle.attack)
    after = evaluate_backdoor(repaired.eval(), bundle.test_x, bundle.test_y, bundle.attack)
    report = json.loads((folder / f"defend-{defense}" / "report.json").read_text())
    return {"test_before": before, "test_after": after, "report": report}


def _decision(verdict: Verdict, detector: str, target: Optional[int]) -> str:
    """``target``: the real one (``None`` for a clean model, -1 when a row did not record it: then a
    suspicion counts as right whatever class it names)."""
    gaps, margins = bool(verdict.latent_gap_indices), verdict.max_margin_pvalue is not None
    recorded = {"trigger-size": True, "confirmed": gaps, "confirmed-or-margin": gaps and margins}
    if not recorded.get(detector, verdict.max_margin_pvalue is not None):
        return "n/a"
    if not verdict.flagged_by(detector):
        return "not suspected" + (" ✓" if target is None else " ✗")
    named = verdict.target_by(detector)
    right = target is not None and target in (-1, named)
    return f"suspected ({named})" + (" ✓" if right else " ✗")


def detector_table(rows: List[Dict[str, Any]]) -> List[str]:
    """Markdown: per model its statistics and every detector's decision, then how many each got right."""
    head = "| model | trigger size: target, index | max margin: class, p | combined p | " + " | ".join(DETECTORS) + " |"
    lines = [head, "|" + "---|" * (4 + len(DETECTORS))]
    right = {d: [0, 0] for d in DETECTORS}
    for row in rows:
        v = Verdict.from_dict(row["report"]["verdict"])
        target = None if row["attack"] == "clean" else row.get("target", -1)
        decisions = [_decision(v, d, target) for d in DETECTORS]
        for d, text in zip(DETECTORS, decisions):
            if text != "n/a":
                right[d][0] += text.endswith("✓")
                right[d][1] += 1
        t, p = v.margin_class, v.max_margin_pvalue
        margin = "–" if t is None or p is None else f"{t}, {p:.2g}"
        combined = "–" if v.combined_pvalue is None else f"{v.combined_pvalue:.2g}"
        size = f"{v.size_target}, {v.anomaly_indices[v.size_target]:.2f}"
        cells = [f"{row['attack']} s{row['seed']}", size, margin, combined, *decisions]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"* `{d}`: right on {k} of {n}" for d, (k, n) in right.items() if n]
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--summary", type=Path, nargs="+", help="print every detector's decisions from these OUT folders")
    p.add_argument("--out", type=Path)
    p.add_argument("--defense", default="clp")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS) + ["clean"])
    p.add_argument("--target", type=int, default=None, help="the backdoored models' target (default: the zoo's, 0)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more onp.defend flags")
    args = p.parse_args(argv)
    if args.summary:
        rows = [json.loads(line) for d in args.summary for line in (d / "results.jsonl").read_text().splitlines()]
        print("\n".join(detector_table(rows)))
        return 0
    if args.out is None:
        p.error("--out is required (or --summary)")
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    done = {(r["attack"], r["seed"], r["defense"]) for r in rows}
    for seed in args.seeds:
        for attack in args.attacks:
            if (attack, seed, args.defense) in done:
                continue
            clean = attack == "clean"
            target = {} if clean or args.target is None else {"target": args.target}
            attack_name = "badnets" if clean else attack
            cfg = BackdoorConfig(attack=attack_name, clean=clean, seed=seed, data_source="full", **target)
            folder = args.out / f"{attack}-s{seed}"
            try:
                bundle = load_bundle(cfg, train_if_missing=False, progress=False)
            except FileNotFoundError as exc:
                print(f"skip {attack} s{seed}: {exc}", flush=True)
                continue
            info = export(bundle, folder)
            seconds = defend(folder, args.defense, seed, args.extra)
            row = {"attack": attack, "seed": seed, "defense": args.defense, "defend_seconds": seconds, **info}
            if not clean:
                row["target"] = int(bundle.attack.params()["target"])  # reporting only, as the test metrics
            row.update(measure(bundle, folder, args.defense))
            with results.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            v = row["report"]["verdict"]
            print(
                f"{attack} s{seed}: {'suspected' if v['suspected'] else 'not suspected'} "
                f"(target {v['estimated_target']}, index {v['anomaly_index']}); test ASR "
                f"{row['test_before']['asr']:.4f} -> {row['test_after']['asr']:.4f}, ACC "
                f"{row['test_before']['acc']:.4f} -> {row['test_after']['acc']:.4f}; {seconds:.0f} s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

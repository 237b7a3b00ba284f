"""The run-directory format shared by ``onp.train``, ``onp.baseline`` and ``onp.compare``.

A run directory holds:

* ``config.json``: the resolved configuration;
* ``env.json``: git commit, package versions and hardware;
* ``metrics.json``: test ACC / ASR / RA / DER after the defense, the backdoored model's metrics
  before it, the number pruned and the wall time, plus how the operating point was chosen;
* ``pruned.json``: the pruned neuron indices (graph numbering) with their (layer, channel) names;
* ``model.pt``: the repaired model's state_dict;
* ``scores.pt``: per-neuron scores (for methods that score neurons);
* ``README.md``: one line saying how to reproduce the run;
* ``.onp-run.json``: the marker that onp created the folder (:func:`onp.io.run_folder` opens every
  run folder: it never writes into a folder without it, and ``--overwrite`` replaces a run only once
  the new one has succeeded).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional

import torch

from . import __version__
from .io import atomic_torch_save, atomic_write_json, atomic_write_text

#: env.json key -> distribution name of the packages whose versions every run records
_PACKAGES = {
    "numpy": "numpy",
    "gymnasium": "gymnasium",
    "stable_baselines3": "stable-baselines3",
    "sb3_contrib": "sb3-contrib",
    "torch_geometric": "torch-geometric",
    "torch_pruning": "torch-pruning",
    "networkx": "networkx",
    "matplotlib": "matplotlib",
    "yaml": "PyYAML",
    "ray": "ray",
}


def git_commit(cwd: Optional[Path] = None) -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except Exception:
        return None


def git_dirty(cwd: Optional[Path] = None) -> Optional[bool]:
    """True when tracked files differ from the commit (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd or Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except Exception:
        return None


def environment_info() -> Dict[str, Any]:
    """Git commit, package versions and hardware, saved with every run."""
    info: Dict[str, Any] = {
        "onp": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
    }
    for key, dist in _PACKAGES.items():  # read from the installed metadata: no (slow) imports
        try:
            info[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[key] = None
    return info


def reproduce_line(argv: Optional[Iterable[str]] = None) -> str:
    argv = list(sys.argv if argv is None else argv)
    prog = argv[0]
    if prog.endswith(".py") or "/" in prog:
        mod = Path(prog).with_suffix("").parts
        prog = "python -m " + ".".join(mod[mod.index("onp") :]) if "onp" in mod else "python " + prog
    return " ".join([prog] + [shlex.quote(a) for a in argv[1:]])


def write_run(
    run_dir: Path,
    *,
    config: Dict[str, Any],
    metrics: Dict[str, Any],
    pruned: Optional[Iterable[int]] = None,
    pruned_names: Optional[Iterable[str]] = None,
    model_state: Optional[Dict[str, torch.Tensor]] = None,
    scores: Optional[torch.Tensor] = None,
    command: Optional[str] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write every file of the run-directory format atomically (``metrics.json`` last)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", config)
    atomic_write_json(run_dir / "env.json", environment_info())
    if pruned is not None:
        atomic_write_json(
            run_dir / "pruned.json",
            {"indices": [int(i) for i in pruned], "names": list(pruned_names) if pruned_names else None},
        )
    if model_state is not None:
        atomic_torch_save(run_dir / "model.pt", {k: v.detach().cpu() for k, v in model_state.items()})
    if scores is not None:
        atomic_torch_save(run_dir / "scores.pt", scores.detach().cpu())
    for name, obj in (extra or {}).items():
        atomic_write_json(run_dir / name, obj)
    atomic_write_text(run_dir / "README.md", f"Reproduce this run with:\n\n    {command or reproduce_line()}\n")
    atomic_write_json(run_dir / "metrics.json", metrics)
    return run_dir


@dataclass(frozen=True, eq=False)
class RunResult(Mapping):
    """What a run function (``run_training``, ``run_baseline``, ``run_evaluate``) returns: the run
    folder and its ``metrics.json``. The headline numbers are typed attributes; every other metric is
    read like a mapping (``result["val"]``)."""

    run_dir: Path
    metrics: Dict[str, Any]

    @property
    def acc(self) -> float:
        """Clean test accuracy after the defense."""
        return float(self.metrics["acc"])

    @property
    def asr(self) -> float:
        """Attack success rate after the defense (test set, the attack's real trigger)."""
        return float(self.metrics["asr"])

    @property
    def ra(self) -> float:
        """Robust accuracy after the defense."""
        return float(self.metrics["ra"])

    @property
    def der(self) -> float:
        """Defense effectiveness rating."""
        return float(self.metrics["der"])

    @property
    def before(self) -> Dict[str, float]:
        """ACC / ASR / RA of the backdoored model."""
        return dict(self.metrics["before"])

    @property
    def n_pruned(self) -> int:
        return int(self.metrics.get("n_pruned") or 0)

    @property
    def wall_time(self) -> float:
        return float(self.metrics["wall_time"])

    def __getitem__(self, key: str) -> Any:
        return self.metrics[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)

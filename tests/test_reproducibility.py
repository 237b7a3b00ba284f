"""The same command twice gives identical results on CPU (baseline, compare, train, evaluate)."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from onp import compare, evaluate
from onp.seeding import seed_everything
from tests.conftest import LEAN_FLAGS

#: keys that measure time, not results
TIMING = {"wall_time", "learn_seconds", "steps_per_second", "train_seconds", "seconds", "baseline_seconds"}
LEAN = LEAN_FLAGS


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING and not k.endswith("_note")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _metrics(run_dir):
    return _strip(json.loads((run_dir / "metrics.json").read_text()))


def _same_state(a, b):
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_seed_everything_seeds_python_numpy_torch():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    seed_everything(3)
    a = draw()
    seed_everything(3)
    assert draw() == a
    seed_everything(4)
    assert draw() != a


def test_baseline_cell_twice_is_identical(tiny_bundle, tmp_path):
    """A stochastic baseline (ANP: random perturbations and batches) on the tiny model, run twice."""
    from onp.baseline import main

    runs = []
    for i in range(2):
        out = tmp_path / f"r{i}"
        seed_everything(123)  # different global RNG state before each run: the CLI must seed itself
        torch.rand(i + 1)
        assert (
            main(
                [
                    "--defense",
                    "anp",
                    "--checkpoint",
                    str(tiny_bundle.path),
                    "--seed",
                    "0",
                    "--set",
                    "iterations=8",
                    "--set",
                    "batch_size=32",
                    "--set",
                    "max_fraction=0.1",
                    "--no-oracle",
                    "--out",
                    str(out),
                    "--quiet",
                ]
            )
            == 0
        )
        runs.append(out)
    assert _metrics(runs[0]) == _metrics(runs[1])
    assert _same_state(runs[0] / "model.pt", runs[1] / "model.pt")
    assert torch.equal(
        torch.load(runs[0] / "scores.pt", weights_only=True), torch.load(runs[1] / "scores.pt", weights_only=True)
    )


def test_compare_twice_gives_identical_leaderboards(onp_cache, tmp_path):
    boards = []
    for i in range(2):
        out = tmp_path / f"c{i}"
        seed_everything(7 + i)
        argv = LEAN + [
            "--cache-dir",
            str(onp_cache),
            "--attacks",
            "badnets",
            "--defenses",
            "magnitude",
            "random",
            "--seeds",
            "1",
            "--set",
            "max_fraction=0.1",
            "--oracle-max-fraction",
            "0.1",
            "--deterministic",
            "--no-plots",
            "--quiet",
            "--out",
            str(out),
        ]
        assert compare.main(argv) == 0
        board = json.loads((out / "leaderboard.json").read_text())
        for row in board["rows"]:
            row["metrics"].pop("wall_time")
            row.pop("wall_time_by_device")  # seconds, per device
        boards.append(board["rows"])
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["settings"]["deterministic"] is True
    assert boards[0] == boards[1]
    for d in ("magnitude", "random"):
        cells = [tmp_path / f"c{i}" / "cells" / "badnets" / d / "s0" for i in range(2)]
        assert json.loads((cells[0] / "pruned.json").read_text()) == json.loads((cells[1] / "pruned.json").read_text())
        assert _same_state(cells[0] / "model.pt", cells[1] / "model.pt")


TINY_TRAIN = Path(__file__).resolve().parents[1] / "configs" / "train" / "tiny.yaml"


def test_deterministic_flag_is_applied_and_recorded(tiny_bundle, onp_cache, tmp_path):
    """``--deterministic`` on onp.baseline and onp.train turns on deterministic algorithms and is saved."""
    from onp.baseline import main as baseline_main
    from onp.train import main as train_main

    runs = {"baseline": tmp_path / "b", "train": tmp_path / "t"}
    calls = {
        "baseline": lambda out: baseline_main(
            [
                "--defense",
                "magnitude",
                "--checkpoint",
                str(tiny_bundle.path),
                "--no-oracle",
                "--out",
                str(out),
                "--quiet",
                "--deterministic",
            ]
        ),
        "train": lambda out: train_main(
            [
                "--config",
                str(TINY_TRAIN),
                "--agent",
                "random",
                "--warm-start",
                "none",
                "--timesteps",
                "8",
                "--cache-dir",
                str(onp_cache),
                "--out",
                str(out),
                "--quiet",
                "--deterministic",
            ]
        ),
    }
    try:
        for name, run in calls.items():
            torch.use_deterministic_algorithms(False)
            assert run(runs[name]) == 0
            assert torch.are_deterministic_algorithms_enabled(), name
            assert json.loads((runs[name] / "config.json").read_text())["deterministic"] is True, name
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def train_runs(tiny_bundle, onp_cache, tmp_path_factory):
    """onp.train's tiny profile (the session's tiny model), twice, with fewer timesteps."""
    from onp.train import main

    base = tmp_path_factory.mktemp("train-repro")
    runs = []
    for i in range(2):
        out = base / f"t{i}"
        seed_everything(1000 + i)  # the command must not depend on the caller's RNG state
        argv = [
            "--config",
            str(TINY_TRAIN),
            "--timesteps",
            "48",
            "--set",
            "ppo.n_steps=16",
            "--set",
            "eval.freq=16",
            "--cache-dir",
            str(onp_cache),
            "--out",
            str(out),
            "--quiet",
        ]
        assert main(argv) == 0
        runs.append(out)
    assert json.loads((runs[0] / "metrics.json").read_text())["model_dir"] == str(tiny_bundle.path)
    return runs


def test_train_twice_is_identical(train_runs):
    a, b = train_runs
    assert _metrics(a) == _metrics(b)
    assert json.loads((a / "pruned.json").read_text()) == json.loads((b / "pruned.json").read_text())
    ca, cb = (_strip(json.loads((r / "learning_curve.json").read_text())) for r in (a, b))
    assert ca == cb and len(ca) >= 2
    assert _same_state(a / "model.pt", b / "model.pt")


def test_evaluate_twice_is_identical(train_runs, tiny_bundle, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"e{i}"
        assert (
            evaluate.main(
                ["--policy", str(train_runs[0]), "--checkpoint", str(tiny_bundle.path), "--out", str(out), "--quiet"]
            )
            == 0
        )
        outs.append(out)
    assert _metrics(outs[0]) == _metrics(outs[1])
    assert json.loads((outs[0] / "pruned.json").read_text()) == json.loads((outs[1] / "pruned.json").read_text())
    # on the model it was trained on, the transferred policy makes the same choice as at the end of training
    assert (
        json.loads((outs[0] / "pruned.json").read_text())["indices"]
        == json.loads((train_runs[0] / "pruned.json").read_text())["indices"]
    )

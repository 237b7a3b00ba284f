"""scripts/cells_before_deadline.py: cells run under a deadline, each in its own folder, merged into a grid."""

import argparse
import json
import sys

import pytest

from .conftest import load_script


@pytest.fixture(scope="module")
def cbd():
    yield from load_script("cells_before_deadline")


def test_parse_cell_and_the_command_of_a_cell(cbd, tmp_path):
    cell = cbd.parse_cell("anp[paper]:sig:1")
    assert cell == ("anp[paper]", "sig", "1")
    folder = cbd.cell_folder(tmp_path, cell)
    assert folder.name == "sig-anp-paper-s1"
    cmd = cbd.compare_command(cell, folder, ["--device", "cuda"])
    assert cmd[1:3] == ["-m", "onp.compare"] and "--device" in cmd and cmd[-2:] == ["--set", "delta=0.03"]
    assert "--set" not in cbd.compare_command(("sau", "sig", "1"), folder, [])
    for bad in ("sau:sig", "sau:sig:x"):
        with pytest.raises(SystemExit, match="defense:attack:seed"):
            cbd.parse_cell(bad)


def test_a_cell_starts_only_when_its_expected_end_is_before_the_deadline(cbd):
    assert cbd.can_start(0, 250, [], 300)
    assert not cbd.can_start(100, 250, [], 300)
    # once cells have finished, the longest wall time (x 1.05) replaces the estimate
    assert not cbd.can_start(0, 10, [100, 290], 300)
    assert cbd.can_start(0, 1000, [100, 200], 300)


def _cell_args(cell, folder):
    defense, attack, seed = cell
    return ["--attacks", attack, "--seed-list", seed, "--defenses", defense, "--out", str(folder)]


def _fake_compare(tmp_path, sleep):
    """A stand-in for onp.compare that writes a finished cell after ``sleep`` seconds."""
    fake = tmp_path / "fake_compare.py"
    fake.write_text(
        "import json, sys, time\nfrom pathlib import Path\n"
        f"time.sleep({sleep})\n"
        "a = sys.argv; out = Path(a[a.index('--out') + 1]); attack = a[a.index('--attacks') + 1]\n"
        "cell = out / 'cells' / attack / a[a.index('--defenses') + 1] / ('s' + a[a.index('--seed-list') + 1])\n"
        "cell.mkdir(parents=True); (cell / 'metrics.json').write_text(json.dumps({'attack': attack}))\n"
    )
    return lambda cell, folder, extra: [sys.executable, str(fake), *_cell_args(cell, folder)]


def test_run_merges_finished_cells_and_leaves_those_past_the_deadline(cbd, tmp_path, monkeypatch):
    monkeypatch.setattr(cbd, "compare_command", _fake_compare(tmp_path, 0.2))
    grid = tmp_path / "grid"
    kept = grid / "cells" / "sig" / "sau" / "s1"
    kept.mkdir(parents=True)
    (kept / "metrics.json").write_text(json.dumps({"attack": "old"}))
    args = argparse.Namespace(out_root=tmp_path / "g", jobs=2, deadline=60.0, estimate=1.0, merge_into=grid, poll=0.05)
    args.out_root.mkdir()
    left = cbd.run([("sau", "blend", "2"), ("sau", "sig", "1"), ("fst", "wanet", "0")], args, [])
    assert left == []
    assert json.loads((grid / "cells" / "blend" / "sau" / "s2" / "metrics.json").read_text()) == {"attack": "blend"}
    assert (grid / "cells" / "wanet" / "fst" / "s0" / "metrics.json").exists()
    assert json.loads((kept / "metrics.json").read_text()) == {"attack": "old"}  # a finished cell is never replaced
    # an estimate past the deadline starts nothing and returns every cell
    args.deadline, args.merge_into = 0.5, None
    assert cbd.run([("sau", "trojan", "0")], args, []) == [("sau", "trojan", "0")]
    assert not (args.out_root / "trojan-sau-s0").exists()

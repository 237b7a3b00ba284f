"""scripts/ablation_table.py: an ablation of onp.train arms tabulated from run folders (issue #17 §3)."""

import json

import pytest

from .conftest import load_script


@pytest.fixture
def table():
    yield from load_script("ablation_table")


def _run(root, name, val_return, asr, acc, der):
    """A finished run; its episode (before fine-tuning) returns 0.1 less than the model handed out."""
    folder = root / name
    folder.mkdir(parents=True)
    val = {"acc0": 0.9, "asr0": 1.0, "acc": 0.9, "asr": 1.0 - val_return}
    val.update(acc_pruned=0.8, asr_pruned=1.0 - val_return)
    metrics = {"val": val, "asr": asr, "acc": acc, "der": der, "before": {"acc": 0.9}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    config = {"env": {"lam": 1.0}}
    if name.startswith("ppo-sig"):  # an onp.evaluate run folder: the env settings are its source run's
        config = {"source_config": config}
    (folder / "config.json").write_text(json.dumps(config))


def test_the_table_counts_where_one_arm_beats_another_on_validation_and_on_test(tmp_path, table, capsys):
    """Two models with both arms, one with one arm only (left out); ppo beats bc on validation on both
    and on test on one, ties on the other; an unfinished run folder and a log file are ignored."""
    _run(tmp_path, "bc-badnets-s0", 0.5, 0.10, 0.88, 0.90)
    _run(tmp_path, "ppo-badnets-s0", 0.7, 0.02, 0.87, 0.95)
    _run(tmp_path, "bc-sig-s1", 0.2, 0.60, 0.80, 0.60)
    _run(tmp_path, "ppo-sig-s1", 0.3, 0.60, 0.80, 0.60)
    _run(tmp_path, "bc-wanet-s2", 0.9, 0.01, 0.89, 0.99)  # no ppo run: not a row
    (tmp_path / "ppo-wanet-s2").mkdir()  # unfinished
    (tmp_path / "ppo-wanet-s2.log").write_text("")
    results = table.collect(tmp_path, ["bc", "ppo"])
    assert sorted(results) == [("badnets", 0), ("sig", 1)]
    got = results[("badnets", 0)]["ppo"]
    assert (got.episode_return, got.val_return, got.asr, got.drop, got.der) == pytest.approx((0.6, 0.7, 2.0, 3.0, 0.95))
    line = table.versus(results, "bc", "ppo")
    assert "better on the episode's defense-val return on 2 of 2 (worse on 0)" in line
    assert "on the handed-out model's on 2 of 2 (worse on 0)" in line
    assert "better on test (DER) on 1 of 2 (worse on 0)" in line
    assert table.main([str(tmp_path), "--arms", "bc", "ppo", "--versus", "bc:ppo"]) == 0
    out = capsys.readouterr().out
    assert "| badnets s0 | +0.400, +0.500 / 10.00% / 2.00 / 0.900 | +0.600, +0.700 / 2.00% / 3.00 / 0.950 |" in out
    assert "| ppo | 2.00% / 3.00 (0.950) | 60.00% / 10.00 (0.600) | 0.775 | 2 |" in out


def test_a_baselines_grid_cells_join_as_an_arm_with_test_figures_only(tmp_path, table, capsys):
    """``--grid fst=GRID``: the cells of GRID/cells/<attack>/fst/s<seed> are an arm without defense-val
    returns ("n/a", counted for neither arm); a model the grid lacks is left out."""
    _run(tmp_path / "runs", "ppo-badnets-s0", 0.7, 0.02, 0.87, 0.95)
    _run(tmp_path / "runs", "ppo-sig-s1", 0.3, 0.60, 0.80, 0.60)
    cell = tmp_path / "grid" / "cells" / "badnets" / "fst" / "s0"
    cell.mkdir(parents=True)
    (cell / "metrics.json").write_text(json.dumps({"asr": 0.0, "acc": 0.86, "der": 0.98, "before": {"acc": 0.9}}))
    grid = f"fst={tmp_path / 'grid'}"
    assert table.main([str(tmp_path / "runs"), "--arms", "ppo", "--grid", grid, "--versus", "fst:ppo"]) == 0
    out = capsys.readouterr().out
    assert "| badnets s0 | +0.600, +0.700 / 2.00% / 3.00 / 0.950 | n/a / 0.00% / 4.00 / 0.980 |" in out
    assert "sig s1" not in out
    assert "return on n/a, on the handed-out model's on n/a; better on test (DER) on 0 of 1 (worse on 1)" in out
    with pytest.raises(SystemExit):
        table.main([str(tmp_path / "runs"), "--arms", "ppo", "--grid", f"fst={tmp_path}"])
    assert "--grid takes NAME=GRID_DIR, a folder of onp.compare with cells/ in it" in capsys.readouterr().err


def test_bad_arguments_are_refused_with_the_valid_arms(tmp_path, table, capsys):
    with pytest.raises(SystemExit):
        table.main([str(tmp_path), "--arms", "bc", "ppo", "--versus", "bc:cold"])
    assert "--versus takes A:B pairs of --arms (bc, ppo)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        table.main([str(tmp_path), "--arms", "bc"])
    assert "has a finished run of every arm (bc)" in capsys.readouterr().err

"""Merging leaderboard.json files seed by seed (onp.leaderboard_merge, scripts/merge_leaderboards.py)."""

import json

import pytest

from onp.leaderboard_merge import merge_leaderboards, seed_results
from onp.report import Cell, build_rows, write_leaderboard

from .conftest import load_script

SEEDS = [0, 1, 2]
DEFENSES = ["awm", "anp[paper]"]


def _cells(tmp_path, seeds):
    """Baseline cells with distinct values per (defense, seed); seed 1 of awm ran on cuda, one failed cell."""
    cells = []
    for d_i, defense in enumerate(DEFENSES):
        for seed in seeds:
            run_dir = tmp_path / "runs" / f"{d_i}-{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            device = "cuda" if (defense, seed) == ("awm", 1) else "cpu"
            (run_dir / "config.json").write_text(json.dumps({"run_config": {"device": device}}))
            status = "failed" if (defense, seed) == ("anp[paper]", 2) else "ok"
            c = Cell("m", "a", defense, seed, "baseline", run_dir, status=status)
            if status == "ok":
                c.metrics = {
                    "acc": 0.80 + 0.01 * seed + 0.001 * d_i,
                    "asr": 0.05 * (seed + 1) + 0.01 * d_i,
                    "ra": 0.7 - 0.02 * seed,
                    "der": 0.9 + 0.01 * seed,
                    "n_pruned": 10 * seed + d_i,
                    "wall_time": 100.0 + 10 * d_i + (seed == 2),  # seeds 0 and 1 equal, on two devices
                    "before": {"acc": 0.9 + 0.001 * seed, "asr": 1.0, "ra": 0.0},
                }
            else:
                c.error = "out of memory"
            cells.append(c)
    return cells


def _board(tmp_path, name, cells):
    rows = build_rows(cells, models=["m"], attacks=["a"], defenses=DEFENSES, seeds=SEEDS)
    out = tmp_path / name
    write_leaderboard(rows, out, title="T", notes=["n"], extra={"seeds": SEEDS})
    return out / "leaderboard.json", rows


def _as_json(rows):
    return [json.loads(json.dumps(r.to_dict())) for r in rows]


def test_merging_split_grids_gives_the_whole_grids_rows(tmp_path):
    """Seeds 0-1 in one leaderboard and seed 2 in another merge into exactly the rows of the whole grid:
    means, sample stds, per-device wall times, the failed seed's error and the no-defense row."""
    _, whole = _board(tmp_path, "whole", _cells(tmp_path, SEEDS))
    first, _ = _board(tmp_path, "first", _cells(tmp_path, [0, 1]))
    second, _ = _board(tmp_path, "second", _cells(tmp_path, [2]))
    merged = merge_leaderboards([first, second])
    assert _as_json(merged.rows) == _as_json(whole)
    awm = next(r for r in merged.rows if r.defense == "awm")
    assert awm.ok == 3 and set(awm.wall_time_by_device) == {"cpu", "cuda"}
    anp = next(r for r in merged.rows if r.defense == "anp[paper]")
    assert anp.status == "missing (2/3 seeds); 1 failed" and anp.errors == ["s2: out of memory"]
    assert merged.title == "T" and merged.extra == {"seeds": SEEDS}


def test_a_later_cell_clears_the_failure_of_its_seed(tmp_path):
    first, _ = _board(tmp_path, "first", _cells(tmp_path, SEEDS))
    fixed = [c for c in _cells(tmp_path, [2]) if c.defense == "anp[paper]"]
    fixed[0].status, fixed[0].error = "ok", None
    fixed[0].metrics = {"acc": 0.7, "asr": 0.02, "ra": 0.6, "der": 0.95, "n_pruned": 5, "wall_time": 9.0}
    fixed[0].metrics["before"] = {"acc": 0.902, "asr": 1.0, "ra": 0.0}
    second, _ = _board(tmp_path, "second", fixed)
    anp = next(r for r in merge_leaderboards([first, second]).rows if r.defense == "anp[paper]")
    assert anp.status == "3/3" and anp.errors == [] and anp.metrics["asr"]["values"][-1] == pytest.approx(0.02)


def _boards_with_seed_1_tested_at(tmp_path, acc):
    """Seeds 0-1 in one leaderboard, seed 1 again in a second whose backdoored model tests at ``acc``."""
    first, _ = _board(tmp_path, "first", _cells(tmp_path, [0, 1]))
    other = _cells(tmp_path, [1])
    for c in other:
        if c.metrics:
            c.metrics["before"] = {"acc": acc, "asr": 1.0, "ra": 0.0}
    second, _ = _board(tmp_path, "second", other)
    return first, second


def test_a_seed_with_other_values_is_refused(tmp_path):
    """The same seed with another backdoored model (other `before` metrics) is not merged."""
    first, second = _boards_with_seed_1_tested_at(tmp_path, 0.5)
    with pytest.raises(ValueError, match="m/a/no defense seed 1 differs"):
        merge_leaderboards([first, second])


def test_rows_that_cannot_be_split_or_files_that_are_not_leaderboards_are_refused(tmp_path):
    row = {"model": "m", "attack": "a", "defense": "x", "kind": "baseline", "seeds": [0, 1]}
    row["metrics"] = {"acc": {"values": [0.9]}}
    with pytest.raises(ValueError, match="1 values of 'acc' for seeds \\[0, 1\\]"):
        seed_results(row)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a readable leaderboard.json"):
        merge_leaderboards([bad])
    bad.write_text('{"rows": 3}')
    with pytest.raises(ValueError, match="no 'rows' list"):
        merge_leaderboards([bad])
    first, _ = _board(tmp_path, "first", _cells(tmp_path, [0]))
    board = json.loads(first.read_text())
    for r in board["rows"]:
        r["asr_estimator"] = "trigger (trigger-aware)"
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(board))
    with pytest.raises(ValueError, match="not the same method"):
        merge_leaderboards([first, changed])


@pytest.fixture
def merge_script():
    yield from load_script("merge_leaderboards")


def test_merge_script_writes_the_leaderboard_and_plot_and_keeps_an_existing_one(tmp_path, merge_script, capsys):
    first, _ = _board(tmp_path, "first", _cells(tmp_path, [0, 1]))
    second, _ = _board(tmp_path, "second", _cells(tmp_path, [2]))
    out = tmp_path / "merged"
    assert merge_script.main([str(first), str(second), "--out", str(out)]) == 0
    assert "m/a/awm: 2 -> 3 of 3 seeds" in capsys.readouterr().out
    assert (out / "der_m.png").stat().st_size > 0
    assert json.loads((out / "leaderboard.json").read_text())["rows"][1]["seeds_ok"] == 3
    before = (out / "leaderboard.md").read_text()
    assert merge_script.main([str(first), "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and (out / "leaderboard.md").read_text() == before
    assert merge_script.main([str(first), str(tmp_path / "nope.json"), "--out", str(tmp_path / "o2")]) == 2
    assert "nope.json" in capsys.readouterr().err


def test_a_row_without_finished_seeds_takes_the_method_of_the_first_file_that_has_some(tmp_path):
    """A learned row with no seed finished reads '-' as its estimator; the cells added later name theirs."""
    first, _ = _board(tmp_path, "first", [])
    board = json.loads(first.read_text())
    second, _ = _board(tmp_path, "second", _cells(tmp_path, [0]))
    later = json.loads(second.read_text())
    for data in (board, later):
        for r in data["rows"]:
            r["asr_estimator"] = "-" if data is board else "synthesized (defense data only)"
    first.write_text(json.dumps(board))
    second.write_text(json.dumps(later))
    awm = next(r for r in merge_leaderboards([first, second]).rows if r.defense == "awm")
    assert awm.ok == 1 and awm.expected == 3 and awm.asr_estimator == "synthesized (defense data only)"


def test_rows_of_chosen_attacks_only_join_a_merge(tmp_path, merge_script, capsys):
    """A kept two-attack leaderboard whose attack "b" was recomputed on retrained models: taking only "a"
    from it merges with the new "b" rows; taking everything is refused at b's no-defense row."""

    def board(name, attacks, acc, defense="awm", seeds=SEEDS):
        cells = []
        for attack in attacks:
            for seed in seeds:
                c = Cell("m", attack, defense, seed, "baseline", tmp_path / name / f"{attack}{seed}", status="ok")
                c.metrics = {"acc": 0.8, "asr": 0.05, "ra": 0.7, "der": 0.9, "n_pruned": 3, "wall_time": 1.0}
                c.metrics["before"] = {"acc": acc, "asr": 1.0, "ra": 0.0}
                cells.append(c)
        rows = build_rows(cells, models=["m"], attacks=attacks, defenses=[defense], seeds=seeds)
        write_leaderboard(rows, tmp_path / name, title=name, notes=[], extra={"attacks": attacks, "seeds": seeds})
        return tmp_path / name / "leaderboard.json"

    kept, redone = board("kept", ["a", "b"], 0.9), board("redone", ["b"], 0.8)
    with pytest.raises(ValueError, match="m/b/no defense seed 0 differs"):
        merge_leaderboards([kept, redone])
    merged = merge_leaderboards([kept, redone], [["a"], None])
    b_row = next(r for r in merged.rows if (r.attack, r.defense) == ("b", "no defense"))
    assert b_row.metrics["acc"]["mean"] == pytest.approx(0.8) and merged.extra["attacks"] == ["a", "b"]
    with pytest.raises(ValueError, match="kept/leaderboard.json: no rows of c \\(it has a, b\\)"):
        merge_leaderboards([kept, redone], [["a", "c"], None])
    assert merge_script.parse_source(f"{kept}:a,b") == (kept, ["a", "b"]) and merge_script.parse_source(str(kept)) == (
        kept,
        None,
    )
    # a one-seed cell of another defense, on b only: its row expects the grid's 3 seeds, and the
    # defense's row on a is there, missing, as a grid shows a cell that did not run
    one_cell = board("cell", ["b"], 0.8, defense="sau", seeds=[1])
    rows = {(r.attack, r.defense): r for r in merge_leaderboards([kept, redone, one_cell], [["a"], None, None]).rows}
    assert [(r.attack, r.defense) for r in rows.values()][:3] == [("a", "no defense"), ("a", "awm"), ("a", "sau")]
    assert rows[("b", "sau")].status == "missing (1/3 seeds)" and rows[("a", "sau")].status == "missing (0/3 seeds)"
    assert rows[("a", "sau")].kind == "baseline" and rows[("a", "sau")].metrics["acc"]["mean"] is None
    out = tmp_path / "merged"
    assert merge_script.main([f"{kept}:a", str(redone), "--out", str(out)]) == 0
    assert {r["attack"] for r in json.loads((out / "leaderboard.json").read_text())["rows"]} == {"a", "b"}


def test_the_same_model_tested_on_another_device_merges_by_its_weights_digest(tmp_path, merge_script):
    """Seed 1's backdoored model tested at another ACC in a second file (a GPU cell's test pass): with
    both files' models.json naming the same digest it merges, the first file's figures kept and a note
    written; a different digest is refused as another model; a corrupt models.json is named."""
    first, second = _boards_with_seed_1_tested_at(tmp_path, 0.9009)

    def digests(board, digest):
        entries = {"m/a/s1": {"digest": digest}, "m/a/s0": {"digest": "d0"}}
        (board.parent / "models.json").write_text(json.dumps(entries))

    digests(first, "abc")
    digests(second, "abc")
    merged = merge_leaderboards([first, second])
    base = next(r for r in merged.rows if r.defense == "no defense")
    assert base.metrics["acc"]["values"] == pytest.approx([0.9, 0.901])  # seed 1: the first file's 0.901
    assert any("m/a/s1: the same model (weights digest abc)" in n and "90.09%" in n for n in merged.notes)
    assert merged.models == {"m/a/s1": {"digest": "abc"}, "m/a/s0": {"digest": "d0"}}
    out = tmp_path / "merged"
    assert merge_script.main([str(first), str(second), "--out", str(out)]) == 0
    assert json.loads((out / "models.json").read_text())["m/a/s1"] == {"digest": "abc"}
    digests(second, "xyz")
    with pytest.raises(ValueError, match="m/a/s1 is another model than an earlier file's \\(weights digest xyz"):
        merge_leaderboards([first, second])
    (second.parent / "models.json").write_text("{not json")
    with pytest.raises(ValueError, match="second/models.json: not a readable models.json"):
        merge_leaderboards([first, second])

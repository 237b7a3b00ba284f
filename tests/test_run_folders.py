"""Issue #14 (items 3-5): onp replaces or deletes only folders that it created, only after the new
run succeeded; failed runs leave nothing that blocks the corrected re-run; a diverged zoo training
caches nothing.

The helper :func:`onp.io.run_folder` is tested directly; each CLI gets one or two cheap checks on the
session's tiny model (``--checkpoint`` / the greedy-gamma agent: no PPO, no extra zoo training).
"""

import hashlib
import json
from pathlib import Path
from typing import Dict

import pytest
import torch

from onp import baseline, compare, evaluate, zoo
from onp import train as train_mod
from onp.backdoor import main as backdoor_main
from onp.cli_common import run_cli
from onp.io import MARKER, NotAnOnpFolderError, RunExistsError, is_onp_folder, run_folder, write_marker
from onp.zoo import BackdoorConfig, load_bundle
from tests.conftest import LEAN_FLAGS

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "train" / "tiny.yaml")
QUICK = dict(model="small_cnn", width=4, data_source="sample", epochs=1, max_train=300, defense_size=100)
LEAN = dict(model="small_cnn", width=4, data_source="sample", epochs=1, max_train=1000, defense_size=300)


def _tree(root: Path) -> Dict[str, str]:
    """Every file and folder under ``root`` with its sha256 (folders: ``dir``)."""
    return {
        str(p.relative_to(root)): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
    }


def _leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir() if ".onp-" in p.name)


def _user_folder(tmp_path: Path) -> Path:
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("months of work")
    (user / "data").mkdir()
    (user / "data" / "x.csv").write_text("1,2,3\n")
    return user


def _finished_run(path: Path, tag: str) -> Path:
    with run_folder(path, tool="onp.baseline") as work:
        (work / "model.pt").write_text(tag)
        (work / "metrics.json").write_text(json.dumps({"tag": tag}))
    return path


class Boom(ValueError):
    """A forced failure (a user error, so the CLIs print it as one ``error:`` line)."""


def _boom(*args, **kwargs):
    raise Boom("forced failure for the test")


def _assert_error_line(capsys, *needles):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


# ----------------------------------------------------------------------------------------------- the helper


def test_fresh_folder_is_marked_and_removed_again_when_the_run_fails(tmp_path):
    run = tmp_path / "runs" / "a"
    with run_folder(run, tool="onp.train") as work:
        assert work == run and (run / MARKER).is_file()
        assert json.loads((run / MARKER).read_text())["tool"] == "onp.train"
    assert is_onp_folder(run)

    fresh = tmp_path / "b"
    with pytest.raises(Boom):
        with run_folder(fresh, tool="onp.baseline") as work:
            (work / "config.json").write_text("{}")
            _boom()
    assert not fresh.exists()  # the failed run left nothing behind

    empty = tmp_path / "empty"  # a folder the user made: emptied again, not deleted
    empty.mkdir()
    with pytest.raises(KeyboardInterrupt):
        with run_folder(empty, tool="onp.baseline") as work:
            (work / "config.json").write_text("{}")
            raise KeyboardInterrupt
    assert empty.is_dir() and not list(empty.iterdir())

    ckpt = tmp_path / "c"  # a resumable checkpoint is kept (Ctrl-C of a training)
    with pytest.raises(KeyboardInterrupt):
        with run_folder(ckpt, tool="onp.train", resumable=("train_state.json",)) as work:
            (work / "train_state.json").write_text("{}")
            raise KeyboardInterrupt
    assert (ckpt / "train_state.json").is_file() and (ckpt / MARKER).is_file()


@pytest.mark.parametrize("flags", [{}, {"overwrite": True}, {"resume": True}])
def test_a_folder_onp_did_not_create_is_refused(tmp_path, flags):
    user = _user_folder(tmp_path)
    before = _tree(tmp_path)
    with pytest.raises(NotAnOnpFolderError, match="not created by onp") as exc:
        with run_folder(user, tool="onp.train", **flags):
            pytest.fail("must not be entered")
    assert str(user) in str(exc.value) and "--out" in str(exc.value)
    assert _tree(tmp_path) == before


def test_a_finished_run_is_replaced_only_with_overwrite_and_only_on_success(tmp_path):
    run = _finished_run(tmp_path / "run", "old")
    with pytest.raises(RunExistsError, match="--overwrite"):
        with run_folder(run, tool="onp.baseline"):
            pass
    before = _tree(tmp_path)
    with pytest.raises(Boom):
        with run_folder(run, tool="onp.baseline", overwrite=True) as work:
            assert work != run and work.parent == run.parent  # a hidden staging folder next to it
            (work / "model.pt").write_text("new, half-written")
            _boom()
    assert _tree(tmp_path) == before  # the old run is untouched, the staging folder is gone

    with run_folder(run, tool="onp.evaluate", overwrite=True) as work:
        assert (run / "model.pt").read_text() == "old"  # still there while the new run works
        (work / "model.pt").write_text("new")
        (work / "metrics.json").write_text("{}")
    assert (run / "model.pt").read_text() == "new" and (run / MARKER).is_file()
    assert json.loads((run / MARKER).read_text())["tool"] == "onp.evaluate"
    assert _leftovers(tmp_path) == []


def test_unfinished_runs(tmp_path):
    # without a checkpoint (e.g. the process was killed): nothing to keep, replaced without --overwrite
    dead = tmp_path / "dead"
    dead.mkdir()
    write_marker(dead, "onp.baseline")
    (dead / "config.json").write_text("{}")
    with run_folder(dead, tool="onp.baseline") as work:
        (work / "metrics.json").write_text("{}")
    assert sorted(p.name for p in dead.iterdir()) == [MARKER, "metrics.json"]
    # with a checkpoint: --resume continues it in place, and a failure there deletes nothing
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    write_marker(ckpt, "onp.train")
    (ckpt / "train_state.json").write_text("{}")
    with pytest.raises(RunExistsError, match="--resume"):
        with run_folder(ckpt, tool="onp.train", resumable=("train_state.json",)):
            pass
    with pytest.raises(Boom):
        with run_folder(ckpt, tool="onp.train", resume=True, resumable=("train_state.json",)) as work:
            assert work == ckpt
            _boom()
    assert (ckpt / "train_state.json").is_file()


def test_in_place_replacement_restores_the_old_folder_on_failure(tmp_path):
    grid = tmp_path / "grid"
    with run_folder(grid, tool="onp.compare", stage=False) as work:
        (work / "config.json").write_text("old")
    before = _tree(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with run_folder(grid, tool="onp.compare", overwrite=True, stage=False) as work:
            assert work == grid and not (grid / "config.json").exists()
            (work / "config.json").write_text("new")
            raise KeyboardInterrupt
    assert _tree(tmp_path) == before
    with run_folder(grid, tool="onp.compare", overwrite=True, stage=False) as work:
        (work / "config.json").write_text("new")
    assert (grid / "config.json").read_text() == "new" and _leftovers(tmp_path) == []


def test_kinds_legacy_folders_and_killed_replacements(tmp_path):
    grid = tmp_path / "grid"
    with run_folder(grid, tool="onp.compare", stage=False):
        pass
    (grid / "config.json").write_text("{}")
    with pytest.raises(NotAnOnpFolderError, match="grid"):  # a grid is not a run folder
        with run_folder(grid, tool="onp.train", overwrite=True):
            pass
    # a run folder written before the marker existed (its env.json) is onp's
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "env.json").write_text(json.dumps({"onp": "0.1.0", "git_commit": None, "torch": "2"}))
    (legacy / "metrics.json").write_text("{}")
    with run_folder(legacy, tool="onp.baseline", overwrite=True) as work:
        (work / "metrics.json").write_text('{"new": 1}')
    assert json.loads((legacy / "metrics.json").read_text()) == {"new": 1}
    # a replacement killed between its two renames: the old content is never deleted silently
    run = _finished_run(tmp_path / "run", "new")
    previous = tmp_path / ".run.onp-previous"
    previous.mkdir()
    (previous / "metrics.json").write_text("{}")
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(RunExistsError, match="onp-previous"):
            with run_folder(run, tool="onp.baseline", **flags):
                pass
    assert (previous / "metrics.json").is_file()


# ----------------------------------------------------------------------------------------------- the CLIs


@pytest.fixture(scope="module")
def lean_bundle(onp_cache):
    """The width-4 model of test_compare / test_evaluate (shared through the session cache)."""
    return load_bundle(BackdoorConfig(**LEAN), cache_dir=onp_cache, progress=False)


@pytest.fixture(scope="module")
def baseline_argv(lean_bundle):
    return ["--defense", "magnitude", "--checkpoint", str(lean_bundle.path), "--no-oracle", "--quiet"]


def _train_argv(out: Path, *extra):
    return [
        "--config",
        TINY,
        "--agent",
        "greedy-gamma",
        "--warm-start",
        "none",
        "--set",
        "rollout.min_return=null",
        "--out",
        str(out),
        "--quiet",
    ] + list(extra)


def test_cli_refuse_a_foreign_out_folder(lean_bundle, baseline_argv, tmp_path, capsys):
    """`--out <a folder onp did not create> --overwrite`: exit 2, one error line naming the folder,
    not a byte changed anywhere in the tree."""
    src = tmp_path / "src"
    assert run_cli(baseline.main, baseline_argv + ["--out", str(src)]) == 0
    user = _user_folder(tmp_path)
    before = _tree(tmp_path)
    clis = {
        "train": (train_mod.main, _train_argv(user, "--overwrite")),
        "baseline": (baseline.main, baseline_argv + ["--out", str(user), "--overwrite"]),
        "evaluate": (
            evaluate.main,
            ["--pruned", str(src), "--checkpoint", str(lean_bundle.path), "--out", str(user), "--overwrite", "--quiet"],
        ),
        "compare": (
            compare.main,
            [
                "--model",
                "small_cnn",
                "--attacks",
                "badnets",
                "--defenses",
                "magnitude",
                "--out",
                str(user),
                "--overwrite",
                "--quiet",
            ],
        ),
    }
    for name, (main, argv) in clis.items():
        assert run_cli(main, argv) == 2, name
        _assert_error_line(capsys, str(user), "not created by onp")
    assert _tree(tmp_path) == before


def test_baseline_overwrite_keeps_the_old_run_until_the_new_one_succeeds(baseline_argv, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert run_cli(baseline.main, baseline_argv + ["--out", str(run)]) == 0
    before = _tree(tmp_path)
    monkeypatch.setattr(baseline, "evaluate_backdoor", _boom)
    assert run_cli(baseline.main, baseline_argv + ["--out", str(run), "--overwrite"]) == 2
    _assert_error_line(capsys, "forced failure")
    assert _tree(tmp_path) == before  # old run intact, no staging folder left
    monkeypatch.undo()
    capsys.readouterr()
    argv = baseline_argv[:1] + ["random"] + baseline_argv[2:]
    assert run_cli(baseline.main, argv + ["--out", str(run), "--overwrite"]) == 0
    assert json.loads((run / "config.json").read_text())["defense"] == "random"
    assert _leftovers(tmp_path) == [] and (run / MARKER).is_file()


def test_train_failed_run_then_corrected_rerun_and_overwrite(tiny_bundle, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(train_mod, "apply_pruning", _boom)  # fails after config.json was written
    assert run_cli(train_mod.main, _train_argv(run)) == 2
    _assert_error_line(capsys, "forced failure")
    assert not run.exists()
    monkeypatch.undo()
    assert run_cli(train_mod.main, _train_argv(run)) == 0  # the corrected re-run is not blocked
    assert (run / "metrics.json").is_file()
    before = _tree(tmp_path)
    monkeypatch.setattr(train_mod, "apply_pruning", _boom)
    assert run_cli(train_mod.main, _train_argv(run, "--overwrite", "--budget", "3")) == 2
    assert _tree(tmp_path) == before
    monkeypatch.undo()
    capsys.readouterr()
    assert run_cli(train_mod.main, _train_argv(run, "--overwrite", "--budget", "3")) == 0
    assert json.loads((run / "config.json").read_text())["env"]["budget"] == 3
    assert json.loads((run / "metrics.json").read_text())["n_pruned"] <= 3
    assert f"-> {run}" in capsys.readouterr().out and _leftovers(tmp_path) == []
    assert str(run) in (run / "README.md").read_text()


def test_train_resumes_an_interrupted_run_of_the_same_config(tmp_path):
    cfg = train_mod.resolve_config(train_mod.load_yaml(Path(TINY)))
    run = tmp_path / "run"
    run.mkdir()
    write_marker(run, "onp.train")
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "train_state.json").write_text("{}")
    auto = train_mod._resumes_automatically
    assert auto(run, cfg, overwrite=False, resume=False, quiet=True) is True
    assert auto(run, cfg, overwrite=True, resume=False, quiet=True) is False
    other = {**cfg, "env": {**cfg["env"], "budget": 3}}
    with pytest.raises(RunExistsError, match="env.budget.*--overwrite"):
        auto(run, other, overwrite=False, resume=False, quiet=True)


def test_evaluate_and_compare_overwrite_keep_the_old_output_on_failure(
    lean_bundle, baseline_argv, onp_cache, tmp_path, capsys, monkeypatch
):
    src = tmp_path / "src"
    assert run_cli(baseline.main, baseline_argv + ["--out", str(src)]) == 0
    ev = ["--pruned", str(src), "--checkpoint", str(lean_bundle.path), "--out", str(tmp_path / "ev"), "--quiet"]
    assert run_cli(evaluate.main, ev) == 0
    grid = tmp_path / "grid"
    cmp = LEAN_FLAGS + [
        "--cache-dir",
        str(onp_cache),
        "--attacks",
        "badnets",
        "--defenses",
        "magnitude",
        "--out",
        str(grid),
        "--quiet",
        "--no-plots",
    ]
    assert run_cli(compare.main, cmp + ["--report-only"]) == 0
    (grid / "config.json").write_text('{"settings": {"epochs": 99}}')
    before = _tree(tmp_path)
    monkeypatch.setattr(evaluate, "apply_pruned_set", _boom)
    assert run_cli(evaluate.main, ev + ["--overwrite"]) == 2
    _assert_error_line(capsys, "forced failure")
    monkeypatch.setattr(compare, "make_executor", _boom)
    assert run_cli(compare.main, cmp + ["--overwrite"]) == 2
    _assert_error_line(capsys, "forced failure")
    assert _tree(tmp_path) == before
    assert run_cli(compare.main, cmp) == 2  # without --overwrite: the old grid's settings differ
    _assert_error_line(capsys, "other settings", "--overwrite")


# ----------------------------------------------------------------------------------------------- the zoo


def test_nan_or_diverging_lr_raises_and_caches_nothing(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"\blr\b.*finite"):
        load_bundle(BackdoorConfig(**QUICK, lr=float("nan")), cache_dir=tmp_path, progress=False)
    args = [
        "--model",
        "small_cnn",
        "--width",
        "4",
        "--data-source",
        "sample",
        "--epochs",
        "1",
        "--max-train",
        "300",
        "--defense-size",
        "100",
        "--cache-dir",
        str(tmp_path),
        "--quiet",
    ]
    assert run_cli(backdoor_main, args + ["--set", "lr=nan"]) == 2
    _assert_error_line(capsys, "lr")
    assert run_cli(backdoor_main, args + ["--set", "lr=1.0e+30"]) == 2  # finite, but the weights blow up
    _assert_error_line(capsys, "diverged", "non-finite", "lr")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_failed_zoo_training_is_never_loaded_as_complete(tmp_path, monkeypatch):
    cfg = BackdoorConfig(**{**QUICK, "epochs": 2})
    real = zoo.train_classifier

    def fails_after_first_epoch(*args, **kwargs):
        def boom(epoch, model):
            raise RuntimeError("disk full")

        return real(*args, on_epoch_end=boom, **kwargs)

    monkeypatch.setattr(zoo, "train_classifier", _boom)  # fails before any epoch: nothing is left
    with pytest.raises(Boom):
        load_bundle(cfg, cache_dir=tmp_path, progress=False)
    assert not list((tmp_path / "zoo").iterdir())
    monkeypatch.setattr(zoo, "train_classifier", fails_after_first_epoch)
    with pytest.raises(RuntimeError, match="disk full"):
        load_bundle(cfg, cache_dir=tmp_path, progress=False)
    (art,) = (tmp_path / "zoo").iterdir()
    assert (art / zoo.TRAIN_STATE).is_file() and not (art / "meta.json").exists()
    with pytest.raises(FileNotFoundError):  # not mistaken for a cached model
        load_bundle(cfg, cache_dir=tmp_path, progress=False, train_if_missing=False)
    monkeypatch.setattr(zoo, "train_classifier", real)
    done = load_bundle(cfg, cache_dir=tmp_path, progress=False)  # resumes from the epoch checkpoint
    assert done.path == art and not (art / zoo.TRAIN_STATE).exists()
    # --overwrite whose retraining fails: the cached model is untouched
    before = _tree(tmp_path)
    monkeypatch.setattr(zoo, "train_classifier", _boom)
    with pytest.raises(Boom):
        load_bundle(cfg, cache_dir=tmp_path, progress=False, overwrite=True)
    assert _tree(tmp_path) == before
    again = load_bundle(cfg, cache_dir=tmp_path, progress=False)
    for (k, v), (_, w) in zip(done.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(v, w), k

"""``python -m onp.compare``: the grid, the leaderboard, plots, resume, missing cells and the executors.

Every grid uses tiny chance-level SmallCNNs (width 4, one epoch on 1,000 sample images: a few
seconds each) so the whole module stays fast on CPU; the tests check the mechanics, not the numbers.
"""

import csv
import json
import shutil
from pathlib import Path

import pytest

from onp import compare
from onp.cli_common import run_cli
from onp.compare_config import CompareConfig
from onp.config import ConfigError, load_yaml
from onp.executors import LocalExecutor, ProcessExecutor, make_executor, ray_available
from onp.registry import UnknownNameError
from onp.report import Cell, build_rows, fmt, stats, to_markdown, wall_time_text
from tests.conftest import LEAN_FLAGS

LEAN = LEAN_FLAGS
PNG = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def _argv(onp_cache, out, *extra):
    return LEAN + ["--cache-dir", str(onp_cache), "--out", str(out), "--quiet"] + list(extra)


def _plan(argv):
    """The grid plan of a command line (flags -> CompareConfig -> GridPlan)."""
    return compare.GridPlan(compare.config_from_args(compare.build_parser().parse_args(argv)))


@pytest.fixture(scope="module")
def grid(onp_cache, tmp_path_factory):
    """2 attacks x (2 baselines + a learned-policy agent run by onp.train) x 2 seeds."""
    out = tmp_path_factory.mktemp("grid") / "g"
    argv = _argv(
        onp_cache,
        out,
        "--attacks",
        "badnets",
        "blend",
        "--defenses",
        "magnitude",
        "clp",
        "greedy-gamma",
        "--seeds",
        "2",
        "--set",
        "max_fraction=0.1",
        "--oracle-max-fraction",
        "0.1",
        "--train-set",
        "env.budget=3",
        "--train-set",
        "env.reward_batch=60",
    )
    assert compare.main(argv) == 0
    return out, argv


def test_grid_leaderboard_tables(grid):
    out, _ = grid
    md = (out / "leaderboard.md").read_text()
    # grouped by attack, a no-defense row first, every defense with mean ± std over the 2 seeds
    assert md.index("## badnets") < md.index("## blend")
    section = md.split("## badnets")[1].split("## blend")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "Defense" not in line]
    # the policy rewarded with the real trigger is an upper bound, in its own table under the defenses
    assert [r.split("|")[1].strip() for r in rows] == ["no defense", "magnitude", "clp", "greedy-gamma[trigger-aware]"]
    assert section.index("| clp |") < section.index("Upper bound, not a defense") < section.index("greedy-gamma[")
    for r in rows:
        cols = [c.strip() for c in r.strip("|").split("|")]
        assert all(" ± " in c for c in cols[1:5]), r  # ACC ASR RA DER
        assert cols[-1] == "2/2"
    assert "n/a (defense data only)" in section and "trigger (trigger-aware)" in section
    assert "missing" not in md and "failed" not in md

    with open(out / "leaderboard.csv") as fh:
        recs = list(csv.DictReader(fh))
    assert len(recs) == 2 * 4
    for r in recs:
        for m in ("acc", "asr", "ra", "der"):
            assert 0.0 <= float(r[f"{m}_mean"]) <= 1.0 and float(r[f"{m}_std"]) >= 0.0
    none = [r for r in recs if r["defense"] == "no defense"]
    assert len(none) == 2 and all(float(r["der_mean"]) == 0.5 for r in none)

    board = json.loads((out / "leaderboard.json").read_text())
    row = next(r for r in board["rows"] if r["attack"] == "blend" and r["defense"] == "greedy-gamma[trigger-aware]")
    assert row["kind"] == "policy" and row["seeds"] == [0, 1] and len(row["metrics"]["acc"]["values"]) == 2
    assert row["trigger_aware"] and not any(r["trigger_aware"] for r in board["rows"] if r["kind"] != "policy")
    cell = json.loads((out / "cells" / "blend" / "greedy-gamma" / "s1" / "metrics.json").read_text())
    assert cell["asr_estimator"] == "trigger" and cell["n_pruned"] <= 3
    assert row["metrics"]["n_pruned"]["values"][1] == cell["n_pruned"]
    mag = json.loads((out / "cells" / "badnets" / "magnitude" / "s0" / "config.json").read_text())
    assert mag["params"]["max_fraction"] == 0.1  # the unscoped --set reached the baseline that has the key
    clp = json.loads((out / "cells" / "badnets" / "clp" / "s0" / "config.json").read_text())
    assert "max_fraction" not in clp["params"]


def test_grid_outputs_and_provenance(grid):
    out, _ = grid
    for name in ("config.json", "env.json", "models.json", "README.md"):
        assert (out / name).exists(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["attacks"] == ["badnets", "blend"] and cfg["seeds"] == [0, 1] and cfg["policies"] == ["greedy-gamma"]
    env = json.loads((out / "env.json").read_text())
    assert {"git_commit", "torch", "numpy", "python", "cpu_count"} <= set(env)
    models = json.loads((out / "models.json").read_text())
    assert len(models) == 4  # one backdoored model per (attack, seed), shared by the defenses
    for key, m in models.items():
        seed = int(key.rsplit("/s", 1)[1])
        assert m["config"]["seed"] == seed
    # the learned-policy cell used the very same zoo model as the baselines
    pol = json.loads((out / "cells" / "badnets" / "greedy-gamma" / "s1" / "metrics.json").read_text())
    base = json.loads((out / "cells" / "badnets" / "magnitude" / "s1" / "config.json").read_text())
    assert pol["model_dir"] == base["model_dir"] == models["small_cnn/badnets/s1"]["path"]
    plots = sorted(p.name for p in (out / "plots").iterdir())
    for name in (
        "sweep_small_cnn_badnets.png",
        "sweep_small_cnn_blend.png",
        "der_small_cnn.png",
        "pruned_per_layer_small_cnn.png",
        "learning_curve.png",
    ):
        assert name in plots
        data = (out / "plots" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 2000, name
    assert (out / "logs").is_dir()
    readme = (out / "cells" / "blend" / "clp" / "s1" / "README.md").read_text()
    assert "python -m onp.baseline --defense clp --checkpoint" in readme and "--defense-seed 1" in readme
    assert "python -m onp.train" in (out / "cells" / "blend" / "greedy-gamma" / "s1" / "README.md").read_text()


def test_names_are_validated_before_any_work(onp_cache, tmp_path):
    out = tmp_path / "never"
    for flag, bad in (("--attacks", "nope"), ("--defenses", "nope"), ("--model", "nope")):
        argv = _argv(onp_cache, out, flag, bad)
        with pytest.raises(UnknownNameError, match="valid choices"):
            compare.main(argv)
    with pytest.raises(UnknownNameError, match="clp.*greedy-gamma.*magnitude.*ppo-gnn"):
        compare.main(_argv(onp_cache, out, "--defenses", "clp", "ppo-gnm"))
    with pytest.raises(ValueError, match="no selected baseline has a hyperparameter 'iterations'"):
        compare.main(_argv(onp_cache, out, "--defenses", "clp", "--set", "iterations=3"))
    with pytest.raises(Exception, match="unknown hyperparameter"):
        compare.main(_argv(onp_cache, out, "--defenses", "clp", "--set", "clp.nope=3"))
    assert not out.exists()


def test_settings_change_is_refused(grid, onp_cache):
    out, argv = grid
    from onp.io import RunExistsError

    with pytest.raises(RunExistsError, match="other settings.*epochs"):
        compare.main(argv + ["--epochs", "2"])


class _Interrupt(LocalExecutor):
    """Runs the backdoored models, then ``k`` cells, then raises KeyboardInterrupt (like Ctrl-C)."""

    def __init__(self, k):
        self.k = k

    def run(self, fn, tasks, gpu_task=None):
        if fn is compare.prepare_model:
            yield from super().run(fn, tasks)
            return
        for i, item in enumerate(super().run(fn, tasks)):
            yield item
            if i + 1 == self.k:
                raise KeyboardInterrupt


def test_interrupted_grid_resumes_where_it_stopped(grid, onp_cache, tmp_path, monkeypatch):
    out = tmp_path / "resume"
    argv = _argv(
        onp_cache,
        out,
        "--attacks",
        "badnets",
        "--defenses",
        "magnitude",
        "clp",
        "--seeds",
        "2",
        "--no-oracle",
        "--set",
        "max_fraction=0.1",
    )
    calls = []
    real = compare.run_cell

    def counting(task):
        calls.append(task["key"])
        return real(task)

    monkeypatch.setattr(compare, "run_cell", counting)
    monkeypatch.setattr(compare, "make_executor", lambda args: _Interrupt(2))
    with pytest.raises(KeyboardInterrupt):
        compare.main(argv)
    assert len(calls) == 2
    done = sorted(out.glob("cells/*/*/*/metrics.json"))
    assert len(done) == 2
    mtimes = {p: p.stat().st_mtime_ns for p in done}
    md = (out / "leaderboard.md").read_text()  # a partial leaderboard is written on interruption
    assert "missing (1/2 seeds)" in md or "missing (0/2 seeds)" in md

    monkeypatch.setattr(compare, "make_executor", lambda args: LocalExecutor())
    calls.clear()
    assert compare.main(argv) == 0
    finished = {"small_cnn/{}/{}/{}".format(*p.parts[-4:-1]) for p in done}
    assert len(calls) == 2 and not set(calls) & finished  # only the unfinished cells ran
    assert {p: p.stat().st_mtime_ns for p in done} == mtimes  # finished cells untouched
    assert len(list(out.glob("cells/*/*/*/metrics.json"))) == 4
    calls.clear()
    assert compare.main(argv) == 0 and calls == []  # a finished grid recomputes nothing
    assert "missing" not in (out / "leaderboard.md").read_text()


def test_partial_grid_shows_missing_cells(grid, onp_cache, tmp_path):
    out, _ = grid
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "cells" / "blend" / "clp" / "s1")
    argv = _argv(
        onp_cache,
        copy,
        "--attacks",
        "badnets",
        "blend",
        "--defenses",
        "magnitude",
        "clp",
        "random",
        "--seeds",
        "3",
        "--report-only",
        "--no-plots",
    )
    assert compare.main(argv) == 0
    assert not (copy / "cells" / "badnets" / "random").exists()  # --report-only runs nothing
    md = (copy / "leaderboard.md").read_text()
    blend = md.split("## blend")[1]
    line = {r.split("|")[1].strip(): r for r in blend.splitlines() if r.startswith("| ")}
    assert "missing (2/3 seeds)" in line["magnitude"] and " ± " in line["magnitude"]
    assert "missing (1/3 seeds)" in line["clp"]
    assert "missing (0/3 seeds)" in line["random"] and line["random"].count("missing") >= 5
    board = json.loads((copy / "leaderboard.json").read_text())
    assert sum(r["seeds_ok"] < r["seeds_expected"] for r in board["rows"]) == len(board["rows"])


def test_report_rows_failed_and_missing(tmp_path):
    def cell(d, s, status, acc=0.9):
        c = Cell("m", "a", d, s, "baseline", tmp_path / f"{d}{s}", status=status)
        if status == "ok":
            c.metrics = {
                "acc": acc,
                "asr": 0.1,
                "ra": 0.8,
                "der": 0.9,
                "n_pruned": 3,
                "wall_time": 2.0,
                "before": {"acc": 0.92, "asr": 1.0, "ra": 0.0},
            }
        else:
            c.error = "boom"
        return c

    cells = [cell("x", 0, "ok", 0.9), cell("x", 1, "ok", 0.8), cell("x", 2, "failed"), cell("y", 0, "ok")]
    rows = build_rows(cells, models=["m"], attacks=["a"], defenses=["x", "y"], seeds=[0, 1, 2])
    by = {r.defense: r for r in rows}
    assert by["x"].status == "missing (2/3 seeds); 1 failed" and by["x"].errors == ["s2: boom"]
    assert fmt(by["x"].metrics["acc"]) == "85.00 ± 7.07"
    assert by["y"].status == "missing (1/3 seeds)" and fmt(by["y"].metrics["acc"]) == "90.00 ± 0.00"
    assert by["no defense"].ok == 2 and fmt(by["no defense"].metrics["der"]) == "50.00 ± 0.00"
    md = to_markdown(rows)
    assert "failed: x s2: boom" in md
    assert "Upper bound" not in md and not any(r.trigger_aware for r in rows)
    assert stats([])["mean"] is None and fmt(stats([])) == "missing"


def test_report_gives_wall_time_per_device(tmp_path):
    """A row whose cells ran on different devices shows each device's wall time, never their mean."""
    cells = []
    for seed, device, wall in ((0, None, 300.0), (1, "cuda", 20.0), (2, "cuda", 30.0)):
        run_dir = tmp_path / f"s{seed}"
        run_dir.mkdir()
        run_cfg = {"defense": "awm"} if device is None else {"defense": "awm", "device": device}
        (run_dir / "config.json").write_text(json.dumps({"defense": "awm", "run_config": run_cfg}))
        c = Cell("m", "a", "awm", seed, "baseline", run_dir, status="ok")
        c.metrics = {"acc": 0.9, "asr": 0.1, "ra": 0.8, "der": 0.9, "n_pruned": 0, "wall_time": wall}
        cells.append(c)
    rows = build_rows(cells, models=["m"], attacks=["a"], defenses=["awm"], seeds=[0, 1, 2])
    awm = next(r for r in rows if r.defense == "awm")
    assert [c.device for c in cells] == ["cpu", "cuda", "cuda"]
    assert wall_time_text(awm) == "cpu 300.0 ± 0.0; cuda 25.0 ± 7.1"
    assert awm.to_dict()["wall_time_by_device"]["cuda"]["n"] == 2
    cells[1].run_dir = cells[2].run_dir = cells[0].run_dir  # every cell on the CPU: the plain mean
    cpu_row = next(
        r
        for r in build_rows(cells, models=["m"], attacks=["a"], defenses=["awm"], seeds=[0, 1, 2])
        if r.defense == "awm"
    )
    assert wall_time_text(cpu_row) == "116.7 ± 158.9"


def test_process_executor_runs_tasks():
    ex = make_executor("local", jobs=2)
    assert isinstance(ex, ProcessExecutor)
    assert sorted(r for _, r in ex.run(abs, [-1, -2, 3])) == [1, 2, 3]
    assert [r for _, r in make_executor("local").run(abs, [-4])] == [4]
    with pytest.raises(ValueError, match="valid choices"):
        make_executor("slurm")


@pytest.mark.skipif(not ray_available(), reason="Ray is not installed (pip install 'onp[ray]')")
def test_ray_executor_grid(grid, onp_cache, tmp_path):
    out = tmp_path / "ray"
    argv = _argv(
        onp_cache,
        out,
        "--attacks",
        "badnets",
        "blend",
        "--defenses",
        "magnitude",
        "clp",
        "--seeds",
        "1",
        "--no-oracle",
        "--set",
        "max_fraction=0.1",
        "--executor",
        "ray",
        "--ray-num-cpus",
        "2",
        "--no-plots",
    )
    assert compare.main(argv) == 0
    import ray

    assert not ray.is_initialized()  # the executor shut down the Ray instance it started
    board = json.loads((out / "leaderboard.json").read_text())
    assert all(r["status"] == "1/1" for r in board["rows"])
    # same cells as the local grid (same models, same seeds) -> same numbers
    local = json.loads((grid[0] / "cells" / "blend" / "magnitude" / "s0" / "metrics.json").read_text())
    remote = json.loads((out / "cells" / "blend" / "magnitude" / "s0" / "metrics.json").read_text())
    assert {k: remote[k] for k in ("acc", "asr", "ra", "der", "n_pruned")} == {
        k: local[k] for k in ("acc", "asr", "ra", "der", "n_pruned")
    }


def test_failed_cell_is_reported_not_dropped(grid, onp_cache, tmp_path):
    out = tmp_path / "fail"
    argv = _argv(
        onp_cache,
        out,
        "--attacks",
        "badnets",
        "--defenses",
        "anp",
        "clp",
        "--seeds",
        "1",
        "--no-oracle",
        "--no-plots",
        "--set",
        "anp.batch_size=1000",
    )  # more than the 150 defense-train images
    assert compare.main(argv) == 1
    failures = json.loads((out / "failures.json").read_text())
    assert list(failures) == ["small_cnn/badnets/anp/s0"] and "at least 1000" in failures["small_cnn/badnets/anp/s0"]
    md = (out / "leaderboard.md").read_text()
    anp = next(line for line in md.splitlines() if line.startswith("| anp"))
    assert "missing (0/1 seeds); 1 failed" in anp and "failed: anp s0: DefenseError" in md
    assert "at least 1000" in (out / "logs" / "small_cnn-badnets-anp-s0.log").read_text()
    assert "| clp |" in md and "1/1" in next(line for line in md.splitlines() if line.startswith("| clp"))


def test_a_model_trained_again_never_joins_the_cells_of_its_earlier_version(grid, onp_cache, tmp_path):
    """A grid resumed where its backdoored model was trained again (another machine, thread count or
    code version) would mix two models in one row: the model's unfinished cells are refused, named."""
    out = tmp_path / "retrained"
    argv = _argv(onp_cache, out, "--attacks", "badnets", "--defenses", "magnitude", "clp", "--seeds", "1")
    argv += ["--no-oracle", "--no-plots", "--set", "max_fraction=0.1"]
    assert compare.main(argv) == 0
    entry = json.loads((out / "models.json").read_text())["small_cnn/badnets/s0"]
    assert len(entry["digest"]) == 16
    clp = out / "cells" / "badnets" / "clp" / "s0" / "metrics.json"

    def resume_with(recorded):
        clp.unlink(missing_ok=True)
        (out / "models.json").write_text(json.dumps({"small_cnn/badnets/s0": recorded}))
        return compare.main(argv)

    for recorded in (
        {**entry, "digest": "0" * 16},  # other weights
        {k: v for k, v in entry.items() if k != "digest"} | {"test_metrics": {**entry["test_metrics"], "acc": 0.5}},
    ):
        assert resume_with(recorded) == 1 and not clp.exists()
        failures = json.loads((out / "failures.json").read_text())
        assert "not the model that this grid's 1 finished cell(s) of it used" in failures["small_cnn/badnets/s0"]
        assert "unavailable" in failures["small_cnn/badnets/clp/s0"]
        assert json.loads((out / "models.json").read_text())["small_cnn/badnets/s0"] == recorded  # kept
    # a grid written before models.json kept digests, with the same model: resumes
    assert resume_with({k: v for k, v in entry.items() if k != "digest"}) == 0 and clp.exists()


def test_ray_executor_requests_a_gpu_per_task_when_the_cluster_has_gpus(monkeypatch):
    """With a stand-in ``ray`` module: num_gpus=1 per task iff cluster_resources() lists GPUs."""
    import sys
    import types

    from onp.executors import RayExecutor

    def fake_ray(resources):
        ray = types.SimpleNamespace(options=[], inits=[])

        class Ref:
            def __init__(self, value):
                self.value = value

        def remote(**opts):
            ray.options.append(opts)
            return lambda fn: types.SimpleNamespace(remote=lambda task: Ref(fn(task)))

        ray.is_initialized = lambda: bool(ray.inits)
        ray.init = lambda **kw: ray.inits.append(kw)
        ray.cluster_resources = lambda: resources
        ray.remote = remote
        ray.wait = lambda refs, num_returns=1: (refs[:num_returns], refs[num_returns:])
        ray.get = lambda ref: ref.value
        ray.cancel = lambda ref, force=False: None
        ray.shutdown = lambda: ray.inits.clear()
        return ray

    for resources, gpus in (({"CPU": 16.0, "GPU": 2.0}, 1.0), ({"CPU": 2.0}, 0.0)):
        ray = fake_ray(resources)
        monkeypatch.setitem(sys.modules, "ray", ray)
        ex = RayExecutor(address="ray://head:10001")
        assert ray.inits[0]["address"] == "ray://head:10001"
        assert sorted(r for _, r in ex.run(abs, [-1, 2])) == [1, 2]
        assert ray.options == [{"num_cpus": 1, "num_gpus": gpus, "max_retries": 0}]
        # only the tasks that use a GPU request one
        ray.options.clear()
        assert sorted(r for _, r in ex.run(abs, [-1, 2], gpu_task=lambda t: t > 0)) == [1, 2]
        assert sorted(o["num_gpus"] for o in ray.options) == sorted({0.0, gpus})
        ex.close()
        assert not ray.inits


def test_unfinished_cells_resume_or_restart(onp_cache, tmp_path, monkeypatch):
    """A cell folder without metrics.json: a policy run resumes from its checkpoint, a baseline restarts.
    Cells call the run functions with typed configs (no argument strings)."""
    import onp.baseline
    import onp.train

    calls = {}
    monkeypatch.setattr(onp.baseline, "run_baseline", lambda cfg, out, **kw: calls.update(baseline=(cfg, kw)))
    monkeypatch.setattr(onp.train, "run_training", lambda cfg, out, **kw: calls.update(policy=(cfg, kw)))
    plan = _plan(
        _argv(
            onp_cache,
            tmp_path / "plan",
            "--attacks",
            "badnets",
            "--defenses",
            "clp",
            "greedy-gamma",
            "--seeds",
            "1",
            "--set",
            "clp.u=2.5",
            "--train-set",
            "env.budget=3",
        )
    )
    cells = {c.defense: c for c in plan.cells()}
    for c in cells.values():
        compare.run_cell(plan.cell_task(c, str(tmp_path / "model")))
    assert calls["baseline"][1]["overwrite"] is False and calls["policy"][1]["resume"] is False
    cfg, _ = calls["baseline"]
    assert cfg["defense"] == "clp" and cfg["params"] == {"u": 2.5} and cfg["checkpoint"] == str(tmp_path / "model")
    cfg, _ = calls["policy"]
    assert cfg["agent"] == "greedy-gamma" and cfg["env"]["budget"] == 3 and cfg["checkpoint"] == str(tmp_path / "model")
    assert "backdoor" not in cfg  # the grid's model folder decides
    for c in cells.values():
        Path(c.run_dir).mkdir(parents=True)
        (Path(c.run_dir) / "config.json").write_text("{}")
        compare.run_cell(plan.cell_task(c, str(tmp_path / "model")))
    assert calls["baseline"][1]["overwrite"] is True and calls["policy"][1]["resume"] is True


def test_every_cell_runs_on_the_grids_device(onp_cache, tmp_path):
    """With --device cuda, baseline and policy cells both carry the device and ask Ray for a GPU."""
    plan = _plan(
        _argv(
            onp_cache,
            tmp_path / "plan",
            "--attacks",
            "badnets",
            "--defenses",
            "clp",
            "greedy-gamma",
            "--seeds",
            "1",
            "--device",
            "cuda",
            "--executor",
            "ray",
        )
    )
    assert plan.out.is_absolute() and plan.cache_dir.is_absolute()  # Ray workers may run elsewhere
    tasks = {c.defense: plan.cell_task(c, str(tmp_path / "model")) for c in plan.cells()}
    assert compare.uses_gpu(tasks["clp"]) and compare.uses_gpu(tasks["greedy-gamma"])
    assert tasks["greedy-gamma"]["config"]["device"] == "cuda" and tasks["clp"]["config"]["device"] == "cuda"
    assert compare.uses_gpu({"device": "cuda:1"}) and not compare.uses_gpu({"device": None})


# ----------------------------------------------------------------------------------------------- CompareConfig


def test_default_yaml_equals_the_typed_defaults():
    data = load_yaml(ROOT / "configs" / "compare" / "default.yaml")
    assert CompareConfig.from_dict(data) == CompareConfig()
    assert data == CompareConfig().to_dict()  # every key spelled out, as its default
    assert compare.config_from_args(compare.build_parser().parse_args([])) == CompareConfig()  # no flag: defaults


@pytest.mark.parametrize(
    "argv, culprit",
    [
        (["--set", "seeds=abc"], "compare config key seeds: Input should be a valid integer (got 'abc')"),  # bad type
        (["--set", "defense.oracle_max_fraction=.nan"], "defense.oracle_max_fraction: Input should be a finite number"),
        (["--set", "train.timesteps=.inf"], "train.timesteps"),
        (["--set", "execution.bogus=1"], "compare config key execution.bogus: unknown key"),
        (["--set", "execution.jobs=0"], "execution.jobs: Input should be greater than or equal to 1"),  # out of range
        (["--set", "seed_list=[0, -1]"], "seed_list.1"),
        (["--set", "backdoor.width=0"], "width must be in [1, 4096]"),
        (["--set", "backdoor.overrides.lr=.nan"], "lr"),
        (["--set", "execution.executor=slurm"], "execution.executor"),
        (["--set", "models=[]"], "models"),
        (["--backdoor-set", "seed=3"], "may not set seed"),
        (["--config", "{tmp}/bad.yaml"], "compare config key defense.oracle_max_fraction"),
        (["--config", "{tmp}/unknown.yaml"], "compare config key bogus: unknown key"),
    ],
)
def test_bad_compare_config_is_one_error_line(tmp_path, capsys, monkeypatch, argv, culprit):
    (tmp_path / "bad.yaml").write_text("defense: {oracle_max_fraction: 1.5}\n")
    (tmp_path / "unknown.yaml").write_text("bogus: 1\n")
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--out", str(tmp_path / "grid")]
    assert run_cli(compare.main, argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and culprit in err, err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.strip()]
    assert sorted(tmp_path.rglob("*")) == before


def test_config_file_then_flags_then_set(tmp_path):
    cfg_file = tmp_path / "grid.yaml"
    cfg_file.write_text(
        "attacks: [blend, sig]\ndefenses: [anp]\nseeds: 3\nbackdoor: {width: 8, overrides: "
        "{poison_rate: 0.2}}\ndefense: {params: {anp: {iterations: 9}}}\nexecution: {jobs: 4}\n"
    )
    cfg = compare.config_from_args(
        compare.build_parser().parse_args(
            [
                "--config",
                str(cfg_file),
                "--attacks",
                "badnets",
                "--width",
                "4",
                "--backdoor-set",
                "epochs=2",
                "--set",
                "anp.iterations=5",
                "--set",
                "execution.jobs=2",
                "--no-plots",
            ]
        )
    )
    assert cfg.attacks == ["badnets"] and cfg.defenses == ["anp"] and cfg.seeds == 3  # the flag wins over the file
    assert cfg.backdoor.width == 4 and cfg.backdoor.overrides == {"poison_rate": 0.2, "epochs": 2}
    assert cfg.defense.params == {"anp": {"iterations": 5}} and cfg.execution.jobs == 2  # --set has the last word
    assert cfg.output.plots is False and cfg.output.quiet is False
    with pytest.raises(ConfigError, match="backdoor"):
        CompareConfig.from_dict({"backdoor": {"dataset": "nope"}})


def test_run_compare_is_the_library_entry(grid, capsys):
    out, _ = grid
    res = compare.run_compare(
        {
            "models": ["small_cnn"],
            "attacks": ["badnets", "blend"],
            "defenses": ["magnitude", "clp", "greedy-gamma"],
            "seeds": 2,
            "output": {"out": str(out), "report_only": True, "plots": False},
        }
    )
    assert isinstance(res, compare.CompareResult) and res.ok and res.out == out
    assert res.leaderboard["md"] == out / "leaderboard.md" and res.leaderboard["md"].exists()
    assert {r.defense for r in res.rows} == {"no defense", "magnitude", "clp", "greedy-gamma[trigger-aware]"}
    assert all(r.ok == 2 for r in res.rows)
    saved = json.loads((out / "config.json").read_text())
    assert CompareConfig.from_dict(saved["compare_config"]).defense.params == {"max_fraction": 0.1}


def test_a_grid_written_before_compare_config_resumes(grid, tmp_path, monkeypatch):
    """Older grids recorded --set / --backdoor-set / --train-set as KEY=VALUE lists: the same command
    continues them (nothing is recomputed), other values are still refused."""
    out, argv = grid
    copy = tmp_path / "old"
    shutil.copytree(out, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["settings"].update(
        {"backdoor_set": [], "set": ["max_fraction=0.1"], "train_set": ["env.budget=3", "env.reward_batch=60"]}
    )
    (copy / "config.json").write_text(json.dumps(cfg))
    argv = [str(copy) if a == str(out) else a for a in argv] + ["--no-plots"]
    calls = []
    monkeypatch.setattr(compare, "run_cell", lambda task: calls.append(task) or {})
    assert compare.main(argv) == 0 and calls == []
    from onp.io import RunExistsError

    cfg["settings"]["set"] = ["max_fraction=0.2"]
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RunExistsError, match="differing: set"):
        compare.main(argv)


def test_a_policy_rewarded_with_the_real_trigger_is_an_upper_bound_row(tmp_path):
    def cell(d, kind, estimator=None, aware=None):
        c = Cell("m", "a", d, 0, kind, tmp_path / d, status="ok")
        c.metrics = {"acc": 0.9, "asr": 0.05, "ra": 0.8, "der": 0.95, "n_pruned": 3, "wall_time": 2.0}
        c.metrics["before"] = {"acc": 0.92, "asr": 1.0, "ra": 0.0}
        if estimator is not None:
            c.metrics["asr_estimator"] = estimator
        if aware is not None:
            c.metrics["trigger_aware"] = aware
        return c

    cells = [
        cell("rnp", "baseline"),
        cell("ppo-gnn", "policy", "trigger", True),
        cell("ppo-gnn-honest", "policy", "synthesized-multi", False),
        cell("greedy", "policy", "trigger"),  # a run from before trigger_aware was recorded
    ]
    rows = build_rows(cells, models=["m"], attacks=["a"], defenses=[c.defense for c in cells], seeds=[0])
    names = {r.defense: r.trigger_aware for r in rows}
    assert names == {
        "no defense": False,
        "rnp": False,
        "ppo-gnn[trigger-aware]": True,
        "ppo-gnn-honest": False,
        "greedy[trigger-aware]": True,
    }
    md = to_markdown(rows)
    main, bound = md.split("Upper bound, not a defense")
    assert "| rnp |" in main and "| ppo-gnn-honest |" in main and "trigger-aware]" not in main
    assert "| ppo-gnn[trigger-aware] |" in bound and "| greedy[trigger-aware] |" in bound and "| rnp |" not in bound

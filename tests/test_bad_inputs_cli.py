"""Bad input to ``onp.baseline``, ``onp.evaluate``, ``onp.compare``, ``onp.backdoor`` (and
``ranked:<baseline>`` for ``onp.train``), issue #14 items 6-9: every case exits with status 2 and one
message that names the culprit, prints no traceback, and changes no file (checksums of the whole
temporary tree, which holds the inputs, the cache, the working folder and the would-be run folder).
Every case fails before a model is loaded or trained, so no model is needed."""

import hashlib
import importlib
import json
import os
import stat
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from onp.cli_common import run_cli

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = str(ROOT / "configs" / "train" / "tiny.yaml")
#: the tiny width-4 setup (a backdoored model would train in seconds; no case gets that far)
T = ["--model", "small_cnn", "--width", "4", "--epochs", "1", "--max-train", "1000", "--defense-size", "300"]
S = T + ["--data-source", "sample"]
BACKDOOR = dict(
    model="small_cnn",
    width=4,
    dataset="fashion-mnist",
    data_source="auto",
    attack="badnets",
    epochs=1,
    max_train=1000,
    defense_size=300,
    seed=0,
)
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def urlopen(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """The inputs of the cases in ``tmp_path``; the cache and the working folder are in it too."""
    from onp.data.idx import IDX_FILES, write_idx

    (tmp_path / "afile").write_text("not a folder\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cwd").mkdir()
    corrupt = tmp_path / "corrupt" / "fashion-mnist"  # the four IDX files, one of them truncated
    corrupt.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "test"):
        write_idx(corrupt / (IDX_FILES[f"{prefix}_images"] + ".gz"), rng.integers(0, 255, (20, 28, 28)))
        write_idx(corrupt / (IDX_FILES[f"{prefix}_labels"] + ".gz"), np.arange(20) % 10)
    labels = corrupt / (IDX_FILES["train_labels"] + ".gz")
    labels.write_bytes(labels.read_bytes()[:20])
    for name, config, pruned in (
        ("src_list", [1, 2], {"indices": [0]}),
        ("src_ok", {"method": "clp", "backdoor": BACKDOOR}, {"indices": [0, 1]}),
        ("src_neg", {"method": "clp", "backdoor": BACKDOOR}, {"indices": [3, -1]}),
        ("src_float", {"method": "clp", "backdoor": BACKDOOR}, {"indices": [1.5]}),
        ("src_pruned_list", {"method": "clp", "backdoor": BACKDOOR}, [0, 1]),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        (tmp_path / name / "pruned.json").write_text(json.dumps(pruned))
    monkeypatch.setenv("ONP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ONP_DATA", raising=False)
    monkeypatch.chdir(tmp_path / "cwd")  # a default run folder (runs/...) would land in the tree
    return tmp_path


def _snapshot(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _run(tool: str, argv, capsys) -> tuple:
    """``python -m onp.<tool> ARGV`` in-process: (exit status, stderr)."""
    main = importlib.import_module(f"onp.{tool}").main
    try:
        rc = run_cli(main, list(argv))
    except SystemExit as exc:  # argparse refusals
        rc = exc.code
    return rc, capsys.readouterr().err


def _check(tree: Path, tool: str, argv, culprits, capsys) -> str:
    before = _snapshot(tree)
    rc, err = _run(tool, [a.replace("{tmp}", str(tree)) for a in argv], capsys)
    assert rc == 2, err
    assert "Traceback" not in err, err
    for text in culprits:
        assert text.replace("{tmp}", str(tree)) in err, (text, err)
    assert _snapshot(tree) == before  # nothing written, nothing left behind (the run folder included)
    return err


OUT = ["--out", "{tmp}/out"]

CASES = [
    # item 6: --device (validated at parsing, before anything loads) -------------------------------------
    ("baseline-device", "baseline", ["--defense", "clp", *S, "--device", "cuda", *OUT], ["--device"]),
    ("backdoor-device-bogus", "backdoor", [*S, "--device", "bogus"], ["--device", "'bogus'", "cpu, cuda"]),
    (
        "evaluate-device-bogus",
        "evaluate",
        ["--pruned", "{tmp}/src_ok", "--device", "gpu0", *OUT],
        ["--device", "'gpu0'"],
    ),
    (
        "compare-device-bogus-ray",
        "compare",
        [*S, "--defenses", "clp", "--device", "tpu", "--executor", "ray", *OUT],
        ["--device", "'tpu'"],
    ),
    pytest.param(
        "backdoor-device-cuda", "backdoor", [*S, "--device", "cuda"], ["--device", "'cuda'", "no CUDA"], marks=NO_CUDA
    ),
    pytest.param(
        "evaluate-device-cuda",
        "evaluate",
        ["--pruned", "{tmp}/src_ok", "--device", "cuda:0", *OUT],
        ["'cuda:0'", "no CUDA"],
        marks=NO_CUDA,
    ),
    pytest.param(
        "compare-device-cuda",
        "compare",
        [*S, "--defenses", "clp", "--device", "cuda", *OUT],
        ["'cuda'", "no CUDA"],
        marks=NO_CUDA,
    ),
    # item 6: an explicit --data-dir without the dataset is an error (no other location, no sample) ------
    (
        "baseline-data-dir-empty",
        "baseline",
        ["--defense", "clp", *T, "--data-dir", "{tmp}/empty", *OUT],
        ["{tmp}/empty", "How to get it", "--data-dir"],
    ),
    (
        "baseline-data-dir-missing",
        "baseline",
        ["--defense", "clp", *T, "--data-dir", "{tmp}/missing", *OUT],
        ["--data-dir {tmp}/missing does not exist", "How to get it"],
    ),
    ("backdoor-data-dir-file", "backdoor", [*T, "--data-dir", "{tmp}/afile"], ["{tmp}/afile is a file"]),
    (
        "compare-data-dir-empty",
        "compare",
        [*T, "--defenses", "clp", "--data-dir", "{tmp}/empty", *OUT],
        ["{tmp}/empty", "How to get it"],
    ),
    (
        "evaluate-data-dir-empty",
        "evaluate",
        ["--pruned", "{tmp}/src_ok", "--data-dir", "{tmp}/empty", *OUT],
        ["{tmp}/empty", "How to get it"],
    ),
    # item 8: a corrupt .gz in --data-dir names the file ------------------------------------------------
    (
        "backdoor-corrupt-gz",
        "backdoor",
        [*T, "--data-dir", "{tmp}/corrupt"],
        ["{tmp}/corrupt/fashion-mnist/train-labels-idx1-ubyte.gz", "corrupt or truncated"],
    ),
    (
        "baseline-corrupt-gz",
        "baseline",
        ["--defense", "clp", *T, "--data-dir", "{tmp}/corrupt", *OUT],
        ["train-labels-idx1-ubyte.gz"],
    ),
    (
        "compare-corrupt-gz",
        "compare",
        [*T, "--defenses", "clp", "--data-dir", "{tmp}/corrupt", *OUT],
        ["train-labels-idx1-ubyte.gz"],
    ),
    # items 7, 8: ONP_CACHE empty or at a file, --cache-dir at a file --------------------------------------
    ("backdoor-onp-cache-empty", "backdoor", ["ONP_CACHE=", *S], ["ONP_CACHE is set but empty"]),
    (
        "evaluate-onp-cache-empty",
        "evaluate",
        ["ONP_CACHE=", "--pruned", "{tmp}/src_ok", *OUT],
        ["ONP_CACHE is set but empty"],
    ),
    (
        "baseline-onp-cache-file",
        "baseline",
        ["ONP_CACHE={tmp}/afile", "--defense", "clp", *S, *OUT],
        ["ONP_CACHE {tmp}/afile", "is a file"],
    ),
    (
        "compare-onp-cache-file",
        "compare",
        ["ONP_CACHE={tmp}/afile", *S, "--defenses", "clp", *OUT],
        ["ONP_CACHE", "{tmp}/afile is a file"],
    ),
    (
        "baseline-cache-dir-file",
        "baseline",
        ["--defense", "clp", *S, "--cache-dir", "{tmp}/afile", *OUT],
        ["--cache-dir {tmp}/afile", "is a file"],
    ),
    ("backdoor-cache-dir-under-file", "backdoor", [*S, "--cache-dir", "{tmp}/afile/cache"], ["{tmp}/afile is a file"]),
    (
        "compare-cache-dir-file",
        "compare",
        [*S, "--defenses", "clp", "--cache-dir", "{tmp}/afile", *OUT],
        ["--cache-dir", "{tmp}/afile is a file"],
    ),
    ("baseline-cache-dir-empty", "baseline", ["--defense", "clp", *S, "--cache-dir", "", *OUT], ["--cache-dir"]),
    # item 8: --out at a file, or below one -------------------------------------------------------------
    ("baseline-out-file", "baseline", ["--defense", "clp", *S, "--out", "{tmp}/afile"], ["{tmp}/afile is a file"]),
    (
        "baseline-out-under-file",
        "baseline",
        ["--defense", "clp", *S, "--out", "{tmp}/afile/run"],
        ["cannot create {tmp}/afile/run", "{tmp}/afile is a file", "--out"],
    ),
    (
        "evaluate-out-under-file",
        "evaluate",
        ["--pruned", "{tmp}/src_ok", "--out", "{tmp}/afile/run"],
        ["{tmp}/afile is a file", "--out"],
    ),
    ("compare-out-file", "compare", [*S, "--defenses", "clp", "--out", "{tmp}/afile"], ["{tmp}/afile is a file"]),
    # item 7: --jobs 0, --oracle-step 0 and other counts / fractions out of range ----------------------------
    ("compare-jobs-0", "compare", [*S, "--defenses", "clp", "--jobs", "0", *OUT], ["--jobs", ">= 1", "got 0"]),
    ("compare-jobs-negative", "compare", [*S, "--defenses", "clp", "--jobs", "-2", *OUT], ["--jobs", "got -2"]),
    ("compare-ray-num-cpus-0", "compare", [*S, "--defenses", "clp", "--ray-num-cpus", "0", *OUT], ["--ray-num-cpus"]),
    ("compare-seeds-0", "compare", [*S, "--defenses", "clp", "--seeds", "0", *OUT], ["--seeds"]),
    (
        "compare-seed-list-negative",
        "compare",
        [*S, "--defenses", "clp", "--seed-list", "0", "-1", *OUT],
        ["--seed-list", "got -1"],
    ),
    (
        "compare-oracle-max-fraction-0",
        "compare",
        [*S, "--defenses", "clp", "--oracle-max-fraction", "0", *OUT],
        ["--oracle-max-fraction", "(0, 1]"],
    ),
    (
        "baseline-oracle-step-0",
        "baseline",
        ["--defense", "clp", *S, "--oracle-step", "0", *OUT],
        ["--oracle-step", "(0, 1]", "got 0"],
    ),
    (
        "baseline-oracle-max-fraction-nan",
        "baseline",
        ["--defense", "clp", *S, "--oracle-max-fraction", "nan", *OUT],
        ["--oracle-max-fraction", "nan"],
    ),
    ("baseline-delta-nan", "baseline", ["--defense", "anp", *S, "--delta", "nan", *OUT], ["--delta", "finite"]),
    ("baseline-seed-negative", "baseline", ["--defense", "clp", *S, "--seed", "-1", *OUT], ["--seed", "got -1"]),
    (
        "baseline-defense-seed-negative",
        "baseline",
        ["--defense", "clp", *S, "--defense-seed", "-1", *OUT],
        ["--defense-seed"],
    ),
    ("evaluate-env-seed-negative", "evaluate", ["--pruned", "{tmp}/src_ok", "--env-seed", "-3", *OUT], ["--env-seed"]),
    # item 8: defense hyperparameters (--set) are type-checked against each defense's declared types -----
    (
        "baseline-set-int-str",
        "baseline",
        ["--defense", "anp", *S, "--set", "iterations=abc", *OUT],
        ["iterations", "an integer", "'abc'"],
    ),
    (
        "baseline-set-int-float",
        "baseline",
        ["--defense", "anp", *S, "--set", "iterations=2.5", *OUT],
        ["iterations", "2.5"],
    ),
    ("baseline-set-nan", "baseline", ["--defense", "clp", *S, "--set", "u=.nan", *OUT], ["params.u", "nan"]),
    ("baseline-set-inf", "baseline", ["--defense", "anp", *S, "--set", "delta=.inf", *OUT], ["delta", "inf"]),
    (
        "baseline-set-nested",
        "baseline",
        ["--defense", "anp", *S, "--set", "iterations.x=1", *OUT],
        ["iterations", "{'x': 1}"],
    ),
    (
        "baseline-set-bool",
        "baseline",
        ["--defense", "anp", *S, "--set", "augment=3", *OUT],
        ["augment", "true or false"],
    ),
    (
        "baseline-set-list",
        "baseline",
        ["--defense", "rnp", *S, "--set", "unlearn_milestones=[5, x]", *OUT],
        ["unlearn_milestones", "list of integers"],
    ),
    (
        "compare-set-str",
        "compare",
        [*S, "--defenses", "anp", "--set", "anp.iterations=abc", *OUT],
        ["iterations", "'abc'"],
    ),
    ("compare-set-nan", "compare", [*S, "--defenses", "clp", "--set", "u=.nan", *OUT], ["u", "nan"]),
    (
        "compare-train-set-inf",
        "compare",
        [*S, "--defenses", "greedy-gamma", "--train-set", "env.budget=.inf", *OUT],
        ["greedy-gamma", "env.budget", "finite"],
    ),
    (
        "compare-train-set-section",
        "compare",
        [*S, "--defenses", "greedy-gamma", "--train-set", "env=3", *OUT],
        ["key env", "got 3"],
    ),
    (
        "compare-train-set-unknown",
        "compare",
        [*S, "--defenses", "random", "greedy-gamma", "--train-set", "env.budget.x=1", *OUT],
        ["env.budget"],
    ),
    # item 8: files of a source run that are not what they should be --------------------------------------
    (
        "evaluate-config-list",
        "evaluate",
        ["--pruned", "{tmp}/src_list", *OUT],
        ["{tmp}/src_list/config.json", "expected a JSON object", "list"],
    ),
    (
        "evaluate-pruned-negative",
        "evaluate",
        ["--pruned", "{tmp}/src_neg", *OUT],
        ["{tmp}/src_neg/pruned.json", ">= 0", "-1"],
    ),
    (
        "evaluate-pruned-float",
        "evaluate",
        ["--pruned", "{tmp}/src_float", *OUT],
        ["{tmp}/src_float/pruned.json", "integer"],
    ),
    (
        "evaluate-pruned-list",
        "evaluate",
        ["--pruned", "{tmp}/src_pruned_list", *OUT],
        ["{tmp}/src_pruned_list/pruned.json", "JSON object"],
    ),
    # item 9: ranked:<baseline> is checked when the agent spec is resolved ----------------------------------
    (
        "train-ranked-unknown",
        "train",
        ["--config", TINY_TRAIN, "--agent", "ranked:bogus", *OUT],
        ["'bogus'", "valid choices: anp", "rnp"],
    ),
    (
        "train-ranked-not-scoring",
        "train",
        ["--config", TINY_TRAIN, "--agent", "ranked:ft", *OUT],
        ["'ft' does not score neurons", "rnp"],
    ),
    (
        "compare-ranked-unknown",
        "compare",
        [*S, "--defenses", "clp", "ranked:bogus", *OUT],
        ["'bogus'", "valid choices: anp"],
    ),
    (
        "compare-unknown-defense",
        "compare",
        [*S, "--defenses", "clp", "bogus", *OUT],
        ["unknown defense 'bogus'", "ranked:<baseline>"],
    ),
    # issue #15: --set overrides each tool's own run config; the shared backdoored-model flags are validated ----
    (
        "compare-set-unknown-config-key",
        "compare",
        [*S, "--defenses", "clp", "--set", "execution.bogus=1", *OUT],
        ["compare config key execution.bogus", "unknown key"],
    ),
    (
        "compare-set-jobs-0",
        "compare",
        [*S, "--defenses", "clp", "--set", "execution.jobs=0", *OUT],
        ["execution.jobs", "greater than or equal to 1"],
    ),
    (
        "compare-config-not-a-mapping",
        "compare",
        [*S, "--defenses", "clp", "--config", "{tmp}/afile", *OUT],
        ["{tmp}/afile", "mapping"],
    ),
    (
        "compare-backdoor-set-grid-axis",
        "compare",
        [*S, "--defenses", "clp", "--backdoor-set", "seed=3", *OUT],
        ["may not set seed"],
    ),
    (
        "baseline-set-run-config-type",
        "baseline",
        ["--defense", "clp", *S, "--set", "oracle_step=abc", *OUT],
        ["oracle_step", "'abc'"],
    ),
    (
        "evaluate-set-unknown-key",
        "evaluate",
        ["--pruned", "{tmp}/src_ok", "--set", "bogus=1", *OUT],
        ["evaluate config key bogus", "unknown key"],
    ),
    ("backdoor-set-unknown-key", "backdoor", [*S, "--set", "bogus=1"], ["'bogus'", "valid keys"]),
    (
        "train-set-unknown-key",
        "train",
        ["--config", TINY_TRAIN, "--set", "bogus=1", *OUT],
        ["training config key bogus", "unknown key"],
    ),
    ("train-epochs-0", "train", ["--config", TINY_TRAIN, "--epochs", "0", *OUT], ["--epochs", "got 0"]),
    (
        "evaluate-defense-size-1",
        "evaluate",
        ["--pruned", "{tmp}/src_ok", "--defense-size", "1", *OUT],
        ["--defense-size", "got 1"],
    ),
    ("compare-max-train-0", "compare", [*S, "--defenses", "clp", "--max-train", "0", *OUT], ["--max-train"]),
    (
        "evaluate-data-source-bogus",
        "evaluate",
        ["--pruned", "{tmp}/src_ok", "--data-source", "web", *OUT],
        ["--data-source", "'web'"],
    ),
]


PARAMS = [
    pytest.param(*c, id=c[0]) if type(c) is tuple else pytest.param(*c.values, id=c.values[0], marks=c.marks)
    for c in CASES
]


@pytest.mark.parametrize("case,tool,argv,culprits", PARAMS)
def test_bad_input_is_one_error_line(tree, monkeypatch, capsys, case, tool, argv, culprits):
    while argv and "=" in argv[0] and argv[0].split("=", 1)[0].isupper():  # leading VAR=value: the environment
        key, value = argv[0].split("=", 1)
        monkeypatch.setenv(key, value.replace("{tmp}", str(tree)))
        argv = argv[1:]
    _check(tree, tool, argv, culprits, capsys)


@pytest.mark.parametrize(
    "tool,argv",
    [
        ("baseline", ["--defense", "clp", *S]),
        ("evaluate", ["--pruned", "{tmp}/src_ok"]),
        ("compare", [*S, "--defenses", "clp"]),
    ],
)
def test_out_in_a_read_only_folder(tree, monkeypatch, capsys, tool, argv):
    ro = tree / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.geteuid() == 0:  # root writes anywhere: let the permission check see what a user would
        real = os.access
        monkeypatch.setattr(
            os,
            "access",
            lambda p, mode, **kw: False if str(p).startswith(str(ro)) and mode & os.W_OK else real(p, mode, **kw),
        )
    try:
        _check(
            tree,
            tool,
            [*argv, "--out", "{tmp}/ro/run"],
            ["cannot write {tmp}/ro/run", "{tmp}/ro is read-only", "--out"],
            capsys,
        )
    finally:
        ro.chmod(stat.S_IRWXU)


def test_read_only_cache_names_the_cache_option(tree, monkeypatch, capsys):
    """A backdoored model to train into a read-only ONP_CACHE: refused before the training starts."""
    ro = tree / "cache"
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(
            os,
            "access",
            lambda p, mode, **kw: False if str(p).startswith(str(ro)) and mode & os.W_OK else real(p, mode, **kw),
        )
    try:
        _check(tree, "backdoor", [*S, "--quiet"], ["{tmp}/cache", "read-only", "--cache-dir (or ONP_CACHE)"], capsys)
    finally:
        ro.chmod(stat.S_IRWXU)

"""Files a user receives (policies, checkpoints, run folders, caches) are untrusted.

A payload (a pickle whose ``__reduce__`` would create a marker file) is planted in every file onp
reads from a run folder or the cache; loading it never runs the payload, and the error names the
file. Also: a run folder never makes onp import code (an agent named by file path), and the code
base holds no unpickling load (a grep over the sources).
"""

import ast
import io
import json
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from onp import evaluate, train
from onp.cli_common import run_cli
from onp.config import load_yaml
from onp.io import CheckpointError, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "tiny.yaml"
SOURCES = [p for d in ("onp", "agents", "envs", "baselines", "scripts", "benchmarks") for p in (ROOT / d).rglob("*.py")]


class Payload:
    """Unpickling this creates the file ``path`` (a stand-in for arbitrary code)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickle_bytes(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


def _torch_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"state": Payload(marker)}, buf)
    return buf.getvalue()


def _error_of(main, argv, capsys) -> str:
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error:")
    return err


# --------------------------------------------------------------------------------------------------
# the code base


SB3_ALGORITHMS = {"PPO", "MaskablePPO", "RecurrentPPO", "A2C", "DQN", "SAC", "TD3", "DDPG", "BaseAlgorithm"}


def _dotted(node) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def _keyword(call: ast.Call, name: str):
    return next((k.value.value for k in call.keywords if k.arg == name and isinstance(k.value, ast.Constant)), None)


def unpickling_loads(tree: ast.AST, rel: str):
    """Calls and imports in ``tree`` that can unpickle (CIFAR's restricted unpickler excepted)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n and n.split(".")[0] in ("cloudpickle", "dill") for n in names):
                yield node.lineno, "imports cloudpickle/dill"
            if isinstance(node, ast.ImportFrom) and node.module and "save_util" in node.module:
                yield node.lineno, "SB3 save_util"
        if (
            isinstance(node, ast.Attribute)
            and _dotted(node) in ("pickle.load", "pickle.loads", "pickle.Unpickler")
            and rel != "onp/data/cifar.py"
        ):
            yield node.lineno, _dotted(node)
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name == "torch.load" and _keyword(node, "weights_only") is not True:
            yield node.lineno, "torch.load without weights_only=True"
        if name in ("np.load", "numpy.load") and _keyword(node, "allow_pickle") is not False:
            yield node.lineno, "np.load without allow_pickle=False"
        if name.endswith(".load") and name.split(".")[-2] in SB3_ALGORITHMS:
            yield node.lineno, f"{name} (SB3 zip: unpickles)"
        if name.endswith("load_from_zip_file"):
            yield node.lineno, name


def test_sources_hold_no_unpickling_load():
    assert len(SOURCES) > 50
    bad = [
        f"{p.relative_to(ROOT)}:{line}: {what}"
        for p in SOURCES
        for line, what in unpickling_loads(ast.parse(p.read_text()), p.relative_to(ROOT).as_posix())
    ]
    assert not bad, "loads that can unpickle:\n" + "\n".join(bad)
    cifar = (ROOT / "onp" / "data" / "cifar.py").read_text()
    assert "class RestrictedUnpickler(pickle.Unpickler)" in cifar and "def find_class" in cifar


def test_the_source_check_finds_unpickling_loads():
    # source text parsed, never run; lines 3-7 and 9 are the loads the check must flag, and the two
    # safe ones (weights_only=True, allow_pickle=False) must pass
    code = (
        "\n".join(
            [
                "import torch, numpy as np",
                "from sb3_contrib import MaskablePPO",
                "import cloudpickle",
                "torch.load(p)  # weights_only=True missing",
                "torch.load(p, weights_only=False)",
                "np.load(p)",
                "MaskablePPO.load(p)",
                "import pickle",
                "pickle.loads(b)",
                "torch.load(p, weights_only=True)",
                "np.load(p, allow_pickle=False)",
            ]
        )
        + "\n"
    )
    found = [line for line, _ in unpickling_loads(ast.parse(code), "x.py")]
    assert sorted(found) == [3, 4, 5, 6, 7, 9]


# --------------------------------------------------------------------------------------------------
# a ppo-gnn run folder, then payloads in each of its files


@pytest.fixture(scope="module")
def run(tiny_bundle, tmp_path_factory):
    cfg = load_yaml(TINY)
    cfg["ppo"] = {**cfg["ppo"], "total_timesteps": 32, "n_steps": 16, "batch_size": 16, "n_epochs": 1}
    cfg["eval"] = {"freq": 16}
    cfg["warm_start"] = {"baseline": None}
    path = tmp_path_factory.mktemp("untrusted") / "run"
    train.run_training(cfg, path, quiet=True)
    for name in (
        "policy.pt",
        "policy.json",
        "checkpoint.pt",
        "checkpoint.json",
        "config.json",
        "metrics.json",
        "pruned.json",
        "train_state.json",
    ):
        assert (path / name).is_file(), name
    return path


@pytest.fixture
def copy(run, tmp_path):
    dst = tmp_path / "received"
    shutil.copytree(run, dst)
    return dst


def _set_digest(folder: Path, stem: str) -> None:
    """Make ``<stem>.json`` vouch for the planted ``<stem>.pt`` (so only weights-only loading stops it)."""
    import hashlib

    meta = json.loads((folder / f"{stem}.json").read_text())
    meta["sha256"] = hashlib.sha256((folder / f"{stem}.pt").read_bytes()).hexdigest()
    (folder / f"{stem}.json").write_text(json.dumps(meta))


def _evaluate(folder: Path, onp_cache, out: Path, kind: str = "--policy"):
    return [
        kind,
        str(folder),
        "--checkpoint",
        str(_model_dir(folder)),
        "--cache-dir",
        str(onp_cache),
        "--out",
        str(out),
        "--quiet",
    ]


def _model_dir(folder: Path) -> Path:
    return Path(json.loads((folder / "metrics.json").read_text())["model_dir"])


def test_received_policy_round_trip(copy, onp_cache, tmp_path, capsys):
    """The untampered copy evaluates (the baseline of the payload tests below)."""
    assert evaluate.main(_evaluate(copy, onp_cache, tmp_path / "ev")) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["source"]["agent"] == "ppo-gnn"


@pytest.mark.parametrize("vouched", [True, False])
def test_payload_in_policy_tensors(copy, onp_cache, tmp_path, capsys, vouched):
    marker = tmp_path / "PWNED"
    (copy / "policy.pt").write_bytes(_torch_bytes(marker))
    if vouched:
        _set_digest(copy, "policy")
    err = _error_of(evaluate.main, _evaluate(copy, onp_cache, tmp_path / "ev"), capsys)
    assert "policy.pt" in err and not marker.exists()


def test_legacy_sb3_zip_is_never_loaded(copy, onp_cache, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    for name in ("policy.pt", "policy.json"):
        (copy / name).unlink()
    with zipfile.ZipFile(copy / "policy.zip", "w") as zf:  # SB3's layout: a pickled "data" entry
        zf.writestr("data", _pickle_bytes(marker))
        zf.writestr("policy.pth", _torch_bytes(marker))
    err = _error_of(evaluate.main, _evaluate(copy, onp_cache, tmp_path / "ev"), capsys)
    assert "policy.zip" in err and "no longer loads" in err and not marker.exists()


@pytest.mark.parametrize("name", ["config.json", "metrics.json", "policy.json"])
def test_payload_in_policy_run_json(copy, onp_cache, tmp_path, capsys, name):
    marker = tmp_path / "PWNED"
    argv = _evaluate(copy, onp_cache, tmp_path / "ev")  # reads metrics.json before it is replaced
    (copy / name).write_bytes(_pickle_bytes(marker))
    err = _error_of(evaluate.main, argv, capsys)
    assert name in err and not marker.exists()


def test_payload_in_pruned_json(copy, onp_cache, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    argv = _evaluate(copy, onp_cache, tmp_path / "ev", kind="--pruned")
    (copy / "pruned.json").write_bytes(_pickle_bytes(marker))
    err = _error_of(evaluate.main, argv, capsys)
    assert "pruned.json" in err and not marker.exists()


@pytest.mark.parametrize("name", ["checkpoint.pt", "checkpoint.json", "train_state.json"])
def test_payload_in_resume_checkpoint(copy, tmp_path, capsys, name):
    marker = tmp_path / "PWNED"
    (copy / "metrics.json").unlink()  # an interrupted run
    if name == "checkpoint.pt":
        (copy / name).write_bytes(_torch_bytes(marker))
        _set_digest(copy, "checkpoint")
    else:
        (copy / name).write_bytes(_pickle_bytes(marker))
    argv = ["--config", str(copy / "config.json"), "--out", str(copy), "--resume", "--quiet"]
    err = _error_of(train.main, argv, capsys)
    assert name in err and not marker.exists()


def test_run_folder_never_imports_the_agent_it_names(copy, onp_cache, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').close()\nclass X:\n    pass\n")
    cfg = json.loads((copy / "config.json").read_text())
    cfg["agent"] = f"{evil}:X"
    (copy / "config.json").write_text(json.dumps(cfg))
    err = _error_of(evaluate.main, _evaluate(copy, onp_cache, tmp_path / "ev"), capsys)
    assert "evil.py:X" in err and "--agent" in err and not marker.exists()
    # onp.train --config <received config.json>: the same rule
    err = _error_of(
        train.main, ["--config", str(copy / "config.json"), "--out", str(tmp_path / "t"), "--quiet"], capsys
    )
    assert "evil.py:X" in err and "--agent" in err and not marker.exists()
    assert not (tmp_path / "t").exists()


# --------------------------------------------------------------------------------------------------
# cached files


@pytest.fixture
def cached_model(tiny_bundle, tmp_path):
    dst = tmp_path / "zoo-copy"
    shutil.copytree(tiny_bundle.path, dst)
    return dst


@pytest.mark.parametrize("name", ["model.pt", "meta.json", "splits.npz"])
def test_payload_in_cached_model(cached_model, tmp_path, name):
    from onp.zoo import open_bundle

    marker = tmp_path / "PWNED"
    if name == "model.pt":
        (cached_model / name).write_bytes(_torch_bytes(marker))
    elif name == "splits.npz":
        arr = np.array([Payload(marker)], dtype=object)
        with open(cached_model / name, "wb") as fh:
            np.savez(fh, attacker_train=arr, defense_train=arr, defense_val=arr)
    else:
        (cached_model / name).write_bytes(_pickle_bytes(marker))
    with pytest.raises(CheckpointError, match=re.escape(name)):
        open_bundle(cached_model)
    assert not marker.exists()


def test_payload_in_torch_cache_files(tmp_path):
    """Every torch file onp reads (zoo training state, synthesized triggers, models) goes through
    ``load_checkpoint``: weights only."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "train_state.pt"
    path.write_bytes(_torch_bytes(marker))
    with pytest.raises(CheckpointError, match="train_state.pt"):
        load_checkpoint(path)
    assert not marker.exists()


def test_payload_in_synthesized_trigger_cache(tiny_bundle, tmp_path):
    from envs.asr_estimators import build_probe

    marker = tmp_path / "PWNED"
    cache = tmp_path / "cache"
    data = tiny_bundle.defense_data
    build_probe("synthesized", tiny_bundle.model, None, data, steps=2, cache_dir=cache)
    (cached,) = (cache / "synthesized").glob("*.pt")
    cached.write_bytes(_torch_bytes(marker))
    with pytest.raises(CheckpointError, match=re.escape(cached.name)):
        build_probe("synthesized", tiny_bundle.model, None, data, steps=2, cache_dir=cache)
    assert not marker.exists()


def test_legacy_checkpoint_zip_is_never_loaded(copy, tmp_path, capsys):
    """An interrupted run holding only SB3's checkpoint.zip (pickle) starts over; the zip is never read."""
    marker = tmp_path / "PWNED"
    (copy / "metrics.json").unlink()
    for name in ("checkpoint.pt", "checkpoint.json"):
        (copy / name).unlink()
    with zipfile.ZipFile(copy / "checkpoint.zip", "w") as zf:
        zf.writestr("data", _pickle_bytes(marker))
    argv = ["--config", str(copy / "config.json"), "--out", str(copy), "--resume", "--quiet"]
    assert train.main(argv) == 0
    assert not marker.exists() and (copy / "checkpoint.pt").is_file()


def test_json_files_are_strict_json(tmp_path):
    """NaN and infinity never reach a JSON file onp writes (metrics.json included): they become null."""
    from onp.io import atomic_write_json

    path = atomic_write_json(
        tmp_path / "m.json",
        {
            "acc": float("nan"),
            "curve": [float("inf"), 0.5],
            "asr": np.float32("nan"),
            "t": torch.tensor([1.0, float("-inf")]),
        },
    )

    def refuse(const):
        raise ValueError(f"non-strict JSON constant {const}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {
        "acc": None,
        "curve": [None, 0.5],
        "asr": None,
        "t": [1.0, None],
    }

"""``python -m onp.evaluate``: transfer a learned policy or a fixed pruned set to another model."""

import json
import shutil

import pytest
import torch

from onp import compare, evaluate
from onp.cli_common import run_cli
from onp.evaluate import ArchitectureMismatchError
from onp.io import CheckpointError
from tests.conftest import LEAN_FLAGS

LEAN = LEAN_FLAGS
TRAIN_FAST = [
    "--timesteps",
    "16",
    "--train-set",
    "ppo.n_steps=16",
    "--train-set",
    "ppo.batch_size=16",
    "--train-set",
    "ppo.n_epochs=1",
    "--train-set",
    "eval.freq=16",
    "--train-set",
    "env.budget=3",
    "--train-set",
    "env.reward_batch=60",
    "--train-set",
    "policy.hidden=8",
    "--train-set",
    "policy.head_hidden=16",
]


@pytest.fixture(scope="module")
def sources(onp_cache, tmp_path_factory):
    """A ppo-gnn training run and a magnitude baseline run on the badnets seed-0 model (via onp.compare)."""
    out = tmp_path_factory.mktemp("eval-src") / "grid"
    argv = (
        LEAN
        + [
            "--cache-dir",
            str(onp_cache),
            "--out",
            str(out),
            "--quiet",
            "--attacks",
            "badnets",
            "--defenses",
            "magnitude",
            "ppo-gnn",
            "--seeds",
            "1",
            "--no-oracle",
            "--no-plots",
            "--set",
            "max_fraction=0.1",
        ]
        + TRAIN_FAST
    )
    assert compare.main(argv) == 0
    pol = out / "cells" / "badnets" / "ppo-gnn" / "s0"
    assert (pol / "policy.pt").exists() and (pol / "policy.json").exists() and (pol / "learning_curve.json").exists()
    return {
        "policy": pol,
        "pruned": out / "cells" / "badnets" / "magnitude" / "s0",
        "models": json.loads((out / "models.json").read_text()),
    }


def _run(onp_cache, out, *argv):
    assert evaluate.main(list(argv) + ["--cache-dir", str(onp_cache), "--out", str(out), "--quiet"]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_policy_applied_to_another_seed_and_attack(sources, onp_cache, tmp_path, monkeypatch):
    import agents.policy_io

    built = []
    real = agents.policy_io.build_policy

    def spy(env, arch):
        built.append((env, real(env, arch)))
        return built[-1][1]

    monkeypatch.setattr(agents.policy_io, "build_policy", spy)
    m = _run(onp_cache, tmp_path / "ev", "--policy", str(sources["policy"]), "--attack", "blend", "--seed", "1")
    # the GNN reads the target model's neuron graph, not the training model's
    assert len(built) == 1
    env, policy = built[0]
    assert "blend" in env.unwrapped.bundles[0].path.name
    assert torch.equal(policy.encoder.edge_index, torch.as_tensor(env.unwrapped.edge_index))
    for key in (
        "acc",
        "asr",
        "ra",
        "der",
        "before",
        "n_pruned",
        "acc_lost",
        "asr_estimator",
        "trigger_aware",
        "val",
        "wall_time",
        "source",
        "target",
    ):
        assert key in m, key
    assert m["target"]["attack"] == "blend" and m["target"]["seed"] == 1 and not m["clean_model"]
    assert m["source"]["agent"] == "ppo-gnn" and m["asr_estimator"] == "trigger" and m["trigger_aware"] is True
    assert m["n_pruned"] <= 3  # the policy's env settings (budget 3) are kept
    assert 0.0 <= m["der"] <= 1.0 and abs(m["acc_lost"] - (m["before"]["acc"] - m["acc"])) < 1e-9
    for f in ("config.json", "env.json", "pruned.json", "model.pt", "README.md"):
        assert (tmp_path / "ev" / f).exists(), f
    cfg = json.loads((tmp_path / "ev" / "config.json").read_text())
    assert cfg["kind"] == "policy" and cfg["target_backdoor"]["attack"] == "blend"
    assert cfg["source_config"]["env"]["budget"] == 3


def test_pruned_set_transfer_to_a_checkpoint(sources, onp_cache, tmp_path):
    target = sources["models"]["small_cnn/badnets/s0"]["path"]
    src = json.loads((sources["pruned"] / "pruned.json").read_text())
    m = _run(onp_cache, tmp_path / "ev", "--pruned", str(sources["pruned"]), "--checkpoint", target)
    got = json.loads((tmp_path / "ev" / "pruned.json").read_text())
    assert got["indices"] == src["indices"] and got["names"] == src["names"] and m["n_pruned"] == len(src["indices"])
    # on the very model it came from, the transferred pruning reproduces the baseline's test metrics
    base = json.loads((sources["pruned"] / "metrics.json").read_text())
    assert abs(m["acc"] - base["acc"]) < 1e-6 and abs(m["asr"] - base["asr"]) < 1e-6
    assert m["defense"] == "pruned:magnitude" and "asr_estimator" not in m


def test_clean_model_reports_acc_lost(sources, onp_cache, tmp_path):
    m = _run(onp_cache, tmp_path / "ev", "--pruned", str(sources["pruned"]), "--clean")
    assert m["clean_model"] is True and m["target"]["attack"] == "clean"
    assert abs(m["acc_lost"] - (m["before"]["acc"] - m["acc"])) < 1e-9
    assert "false-positive" in m["note"]


def test_architecture_mismatch_is_a_clear_error(sources, onp_cache, tmp_path, capsys):
    from onp.zoo import BackdoorConfig, load_bundle

    other = load_bundle(
        BackdoorConfig(model="small_cnn", width=2, data_source="sample", epochs=1, max_train=1000, defense_size=300),
        cache_dir=onp_cache,
        progress=False,
    )
    for flag in ("--policy", "--pruned"):
        src = sources["policy"] if flag == "--policy" else sources["pruned"]
        with pytest.raises(ArchitectureMismatchError, match="architecture mismatch.*width 4.*width 2"):
            evaluate.main([flag, str(src), "--checkpoint", str(other.path), "--out", str(tmp_path / "x"), "--quiet"])
        with pytest.raises(ArchitectureMismatchError, match="same architecture"):  # before any training
            evaluate.main([flag, str(src), "--model", "resnet18", "--out", str(tmp_path / "y"), "--quiet"])
    argv = ["--policy", str(sources["policy"]), "--width", "8", "--out", str(tmp_path / "z"), "--quiet"]
    assert run_cli(evaluate.main, argv) == 2
    assert "architecture mismatch" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


def test_bad_sources(sources, tmp_path):
    with pytest.raises(CheckpointError, match="not an onp.train run"):
        evaluate.main(["--policy", str(sources["pruned"]), "--out", str(tmp_path / "a"), "--quiet"])
    broken = tmp_path / "broken"
    shutil.copytree(sources["pruned"], broken)
    (broken / "pruned.json").unlink()
    with pytest.raises(CheckpointError, match="no pruned.json"):
        evaluate.main(["--pruned", str(broken), "--out", str(tmp_path / "b"), "--quiet"])
    with pytest.raises(FileNotFoundError):
        evaluate.main(["--pruned", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c"), "--quiet"])
    with pytest.raises(SystemExit):
        evaluate.main(["--out", str(tmp_path / "d")])  # --policy or --pruned is required

import json
import time

import pytest
import torch

from onp import zoo
from onp.backdoor import main as backdoor_main
from onp.io import CheckpointError
from onp.zoo import BackdoorConfig, load_bundle, open_bundle

QUICK = dict(model="small_cnn", width=4, data_source="sample", epochs=2, max_train=800, defense_size=100)


def test_tiny_backdoor_takes(tiny_bundle):
    """End to end on the bundled sample: the backdoor is learned (ASR far above chance)."""
    m = tiny_bundle.meta
    assert m["test_metrics"]["asr"] > 0.8  # chance is ~0.1 for 10 classes
    assert m["test_metrics"]["acc"] > 0.5
    for key in (
        "model",
        "width",
        "dataset",
        "attack",
        "target",
        "split_sha256",
        "seed",
        "versions",
        "test_metrics",
        "train_seconds",
        "data_source",
    ):
        assert key in m
    assert m["attack"]["name"] == "badnets" and m["data_source"] == "bundled-sample"
    env = json.loads((tiny_bundle.path / "env.json").read_text())  # git commit, versions, hardware
    assert env == m["versions"] and {"git_commit", "torch", "cpu_count", "platform"} <= set(env)
    d = tiny_bundle.defense_data
    assert len(d.train_y) + len(d.val_y) == 300
    assert "test" not in repr(d).lower()


def test_cache_hit_is_immediate(tiny_bundle, onp_cache):
    from tests.conftest import TINY

    t = time.time()
    again = load_bundle(BackdoorConfig(**TINY), cache_dir=onp_cache, progress=False)
    assert time.time() - t < 10 and again.path == tiny_bundle.path
    assert again.meta == tiny_bundle.meta


def test_interrupted_training_resumes_to_the_same_model(tmp_path, monkeypatch):
    cfg = BackdoorConfig(**QUICK)
    straight = load_bundle(cfg, cache_dir=tmp_path / "a", progress=False)

    real = zoo.train_classifier

    def interrupted(*args, **kwargs):
        def boom(epoch, model):
            raise KeyboardInterrupt

        return real(*args, on_epoch_end=boom, **kwargs)

    monkeypatch.setattr(zoo, "train_classifier", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_bundle(cfg, cache_dir=tmp_path / "b", progress=False)
    state_files = list((tmp_path / "b").rglob("train_state.pt"))
    assert len(state_files) == 1 and torch.load(state_files[0], weights_only=True)["epoch"] == 1
    monkeypatch.setattr(zoo, "train_classifier", real)
    resumed = load_bundle(cfg, cache_dir=tmp_path / "b", progress=False)
    for (k, v), (_, w) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(v, w), k
    assert not list((tmp_path / "b").rglob("train_state.pt"))


def test_clean_flag_trains_unpoisoned_model(tmp_path):
    b = load_bundle(BackdoorConfig(**QUICK, clean=True), cache_dir=tmp_path, progress=False)
    assert b.meta["clean"] and b.meta["num_poisoned"] == 0 and "clean" in b.path.name


def test_corrupt_and_mismatched_artifacts_name_the_file(tmp_path):
    b = load_bundle(BackdoorConfig(**QUICK), cache_dir=tmp_path, progress=False)
    (b.path / "model.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.pt"):
        open_bundle(b.path)
    torch.save(zoo.build_model_for("small_cnn", b.spec, 8).state_dict(), b.path / "model.pt")
    with pytest.raises(CheckpointError, match="model.pt.*shape mismatches"):
        open_bundle(b.path)


def test_cli_rejects_bad_input(capsys):
    from onp.cli_common import run_cli

    assert run_cli(backdoor_main, ["--attack", "nope"]) == 2
    assert "valid choices" in capsys.readouterr().err
    assert run_cli(backdoor_main, ["--poison-rate", "1.5"]) == 2
    assert "poison_rate" in capsys.readouterr().err
    assert run_cli(backdoor_main, ["--model", "small_cnn", "--data-source", "sample", "--defense-size", "20000"]) == 2
    assert "defense_size" in capsys.readouterr().err


def test_cli_writes_and_reuses_artifact(tmp_path, capsys):
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
        "500",
        "--defense-size",
        "100",
        "--cache-dir",
        str(tmp_path),
        "--quiet",
    ]
    assert backdoor_main(args) == 0
    out = json.loads(capsys.readouterr().out)
    meta = json.loads((tmp_path / "zoo" / out["path"].split("/")[-1] / "meta.json").read_text())
    assert meta["config"]["epochs"] == 1 and meta["data_source"] == "bundled-sample"
    mtime = (tmp_path / "zoo" / out["path"].split("/")[-1] / "model.pt").stat().st_mtime
    assert backdoor_main(args) == 0  # cached: not retrained
    assert (tmp_path / "zoo" / out["path"].split("/")[-1] / "model.pt").stat().st_mtime == mtime
    assert backdoor_main(args + ["--overwrite"]) == 0
    assert (tmp_path / "zoo" / out["path"].split("/")[-1] / "model.pt").stat().st_mtime != mtime

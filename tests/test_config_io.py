import pytest
import torch

from onp.config import from_dict, parse_overrides, stable_hash
from onp.io import (
    CheckpointError,
    RunExistsError,
    atomic_write_json,
    load_checkpoint,
    load_state_dict_into,
    read_json,
    run_folder,
)
from onp.models import build_model


def test_overrides_and_hash():
    assert parse_overrides(["a.b=3", "c=x", "d=[1, 2]"]) == {"a": {"b": 3}, "c": "x", "d": [1, 2]}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["oops"])
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})


def test_from_dict_rejects_unknown_keys():
    from onp.zoo import BackdoorConfig

    with pytest.raises(ValueError, match="valid keys"):
        from_dict(BackdoorConfig, {"modle": "resnet18"})


def test_atomic_json_and_run_dir(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert read_json(tmp_path / "a.json") == {"x": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    run = tmp_path / "run"  # run_folder in detail: tests/test_run_folders.py
    with run_folder(run, tool="onp.baseline") as work:
        (work / "metrics.json").write_text("{}")
    with pytest.raises(RunExistsError, match="--overwrite"):
        with run_folder(run, tool="onp.baseline"):
            pass
    with run_folder(run, tool="onp.baseline", resume=True) as work:
        assert (work / "metrics.json").exists()
    with run_folder(run, tool="onp.baseline", overwrite=True) as work:
        pass
    assert not (run / "metrics.json").exists()


def test_corrupt_and_mismatched_checkpoints_name_the_file(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="model.pt"):
        load_checkpoint(bad)
    good = tmp_path / "w8.pt"
    torch.save(build_model("small_cnn", in_channels=1, width=8).state_dict(), good)
    with pytest.raises(CheckpointError, match=r"w8\.pt.*shape mismatches.*conv1\.weight"):
        load_state_dict_into(build_model("small_cnn", in_channels=1, width=4), load_checkpoint(good), good)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


class NotAWeight:
    pass


def test_checkpoint_loading_refuses_pickled_objects(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"obj": NotAWeight()}, p)  # an arbitrary pickled class: refused by weights_only
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(p)

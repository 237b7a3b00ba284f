"""The typed training config: one source of defaults, validation before anything runs, and bad
input answered by one clear ``error:`` line (never a traceback), also under random overrides."""

import hashlib
import math
import random
from pathlib import Path

import pytest
import yaml

from onp import train
from onp.cli_common import run_cli
from onp.config import load_yaml
from onp.train_config import ConfigError, EnvConfig, PPOConfig, TrainConfig
from onp.zoo import BackdoorConfig

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_YAML = ROOT / "configs" / "train" / "default.yaml"


def test_default_yaml_equals_the_typed_defaults():
    data = load_yaml(DEFAULT_YAML)
    assert TrainConfig.from_dict(data) == TrainConfig()
    defaults = TrainConfig().to_dict()
    for section, values in data.items():  # the YAML spells out every key of every section, as its default
        if isinstance(values, dict) and section != "backdoor":
            assert set(values) == set(defaults[section]), section
        if section != "backdoor":
            assert values == defaults[section], section
    assert set(data) == set(defaults)


def test_agents_take_their_defaults_from_the_typed_config():
    from agents import ppo_gnn

    assert ppo_gnn.PPO_DEFAULTS == PPOConfig().model_dump()
    assert ppo_gnn.POLICY_DEFAULTS == TrainConfig().policy.model_dump()
    assert {k: v for k, v in ppo_gnn.WARM_START_DEFAULTS.items() if k != "baseline"} == {
        k: v for k, v in TrainConfig().warm_start.model_dump().items() if k != "baseline"
    }


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"env": {"delta": math.nan}}, "env.delta"),
        ({"env": {"lam": math.nan}}, "env.lam"),
        ({"env": {"budget": math.inf}}, "env.budget"),
        ({"env": {"budget": 20.7}}, "env.budget"),
        ({"env": 3}, "env"),
        ({"env": {"budget": {"x": 1}}}, "env.budget"),
        ({"env": {"bogus": 1}}, "env.bogus"),
        ({"backdoor": {"width": "sixteen"}}, "backdoor.width"),
        ({"backdoor": {"lr": math.nan}}, "backdoor.lr"),
        ({"ppo": {"n_steps": "128"}}, "ppo.n_steps"),
        ({"ppo": {"learning_rate": -1.0}}, "ppo.learning_rate"),
        ({"policy": {"hidden": 10**9}}, "policy.hidden"),
        ({"seed": -1}, "seed"),
        ({"torch_threads": -1}, "torch_threads"),
        ({"device": "bogus"}, "device"),
        ({"rollout": {"min_return": math.nan}}, "rollout.min_return"),
        ({"rollout": {"finetune": {"bn_stats": "train"}}}, "rollout.finetune.bn_stats"),
        ({"rollout": {"finetune": {"epochs": -1}}}, "rollout.finetune.epochs"),
        ({"rollout": {"finetune": {"lr": math.inf}}}, "rollout.finetune.lr"),
        ({"agent_params": {"k": math.inf}}, "agent_params"),
    ],
)
def test_bad_values_name_their_key(bad, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        TrainConfig.from_dict(bad)


def test_cuda_without_cuda_is_an_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="no CUDA"):
        TrainConfig.from_dict({"device": "cuda"})


def test_budget_count_and_fraction():
    assert TrainConfig.from_dict({"env": {"budget": 30}}).env.budget == 30
    assert TrainConfig.from_dict({"env": {"budget": 0.05}}).env.budget == 0.05
    assert EnvConfig().budget == 0.05


def test_backdoor_config_checks_types():
    with pytest.raises(ConfigError, match="width"):
        BackdoorConfig(width="sixteen").validate()
    with pytest.raises(ConfigError, match="epochs"):
        BackdoorConfig(epochs=2.5).validate()


# --------------------------------------------------------------------------------------------------
# the command line


def _tree_digest(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


class _Accepted(Exception):
    """Raised where a valid config would start loading the model."""


@pytest.fixture
def no_model(monkeypatch):
    def stop(*args, **kwargs):
        raise _Accepted

    monkeypatch.setattr(train, "_load_bundle", stop)


CLI_CASES = [
    (["--set", "env=3"], "env"),
    (["--set", "env.budget.x=1"], "env.budget"),
    (["--budget", "inf"], "env.budget"),
    (["--device", "bogus"], "device"),
    (["--agent-seed", "-1"], "seed"),
    (["--set", "torch_threads=-1"], "torch_threads"),
    (["--set", "env.delta=.nan"], "env.delta"),
    (["--set", "env.lam=.nan"], "env.lam"),
    (["--set", "backdoor.lr=.nan"], "backdoor.lr"),
    (["--set", "ppo.learning_rate=.inf"], "ppo.learning_rate"),
    (["--width", "0"], "width"),
]


@pytest.mark.parametrize("argv, key", CLI_CASES)
def test_cli_bad_values_are_one_error_line(tmp_path, capsys, no_model, argv, key):
    (tmp_path / "keep.txt").write_text("user data")
    before = _tree_digest(tmp_path)
    out = tmp_path / "run"
    assert run_cli(train.main, argv + ["--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err and key in err
    assert not out.exists() and _tree_digest(tmp_path) == before


def test_cli_yaml_with_wrong_type(tmp_path, capsys, no_model):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backdoor:\n  width: sixteen\n")
    assert run_cli(train.main, ["--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "backdoor.width" in err and "sixteen" in err and "Traceback" not in err


def _schema_keys():
    keys = [
        f"{section}.{name}"
        for section, field in TrainConfig.model_fields.items()
        if hasattr(field.annotation, "model_fields")
        for name in field.annotation.model_fields
    ]
    keys += [k for k, f in TrainConfig.model_fields.items() if not hasattr(f.annotation, "model_fields")]
    keys += [f"backdoor.{k}" for k in BackdoorConfig().to_dict()]
    return sorted(keys)


FUZZ_VALUES = [
    ".nan",
    ".inf",
    "-.inf",
    "-1",
    "0",
    "1",
    "3",
    "0.5",
    "-0.5",
    "1e30",
    "100000000000000",
    "abc",
    "true",
    "null",
    "[1, 2]",
    "{a: 1}",
    "''",
    "2.5",
    "-100000000000000",
]


def test_fuzz_random_overrides_never_traceback(tmp_path, capsys, no_model):
    """200 random ``--set key=value`` drawn from the schema: a clean error or an accepted config."""
    rng = random.Random(0)
    keys = _schema_keys()
    assert len(keys) > 60
    outcomes = {"error": 0, "accepted": 0}
    for i in range(200):
        key, value = rng.choice(keys), rng.choice(FUZZ_VALUES)
        argv = ["--set", f"{key}={value}", "--out", str(tmp_path / f"r{i}"), "--quiet"]
        try:
            rc = run_cli(train.main, argv)
        except _Accepted:
            outcomes["accepted"] += 1
            continue
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error:") and "Traceback" not in err, (argv, err)
        assert key.split(".")[-1] in err or "agent" in err or "estimator" in err or "feature" in err, (argv, err)
        outcomes["error"] += 1
    assert outcomes["error"] > 100 and outcomes["accepted"] > 10, outcomes


def test_yaml_loader_parses_special_floats():
    assert math.isnan(yaml.safe_load(".nan")) and yaml.safe_load(".inf") == math.inf

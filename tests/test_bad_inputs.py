"""Bad input to the env, the agents and the caches is refused with a message that names it, never
truncated into something else or answered with a traceback."""

import warnings

import numpy as np
import pytest
import torch

from agents import AgentError, BaseAgent, build_agent, rollout
from envs import NeuronPruningEnv
from onp.cli_common import run_cli
from onp.io import CheckpointError

ENV_KW = dict(budget=4, reward_batch=40, delta=0.9)


@pytest.fixture(scope="module")
def env(tiny_bundle):
    e = NeuronPruningEnv(tiny_bundle, **ENV_KW)
    yield e
    e.close()


@pytest.mark.parametrize("action", [20.7, "20", True, None, np.float32(3.0), np.array([1.5]), [3]])
def test_step_refuses_non_integer_actions(env, action):
    env.reset(seed=0)
    with pytest.raises(TypeError, match="action must be an integer"):
        env.step(action)
    assert env.evaluation().acc == env.target.initial.acc and not env._pruned.any()  # nothing was pruned


@pytest.mark.parametrize("action", [20, np.int64(20), np.array(20), np.array([20]), torch.tensor(20)])
def test_step_accepts_integer_actions(env, action):
    env.reset(seed=0)
    if not env.action_masks()[20]:
        pytest.skip("neuron 20 is not prunable in this model")
    env.step(action)
    assert env._pruned[20] and env._pruned.sum() == 1


def test_initial_pruned_must_be_prunable_integers(env):
    stem = int(np.flatnonzero(~env._prunable)[0])
    with pytest.raises(ValueError, match="integer neuron indices"):
        env.reset(options={"initial_pruned": [20.7, 21.2]})
    with pytest.raises(ValueError, match="excluded layer types"):
        env.reset(options={"initial_pruned": [stem]})
    with pytest.raises(ValueError, match=r"\[0, "):
        env.reset(options={"initial_pruned": [-1]})
    obs, _ = env.reset(options={"initial_pruned": [20]})
    assert obs["pruned"][20] == 1


@pytest.mark.parametrize("bad", [("stme",), "stem", ("stem", "nope")])
def test_unknown_exclude_layer_types(tiny_bundle, bad):
    with pytest.raises(ValueError, match="exclude_layer_types"):
        NeuronPruningEnv(tiny_bundle, exclude_layer_types=bad, **ENV_KW)


class _MaskedOnly(BaseAgent):
    def predict(self, obs, action_mask):
        return int(np.flatnonzero(~action_mask)[0])  # always a masked action


class _ReturnsNone(BaseAgent):
    def predict(self, obs, action_mask):
        return None


def test_agent_that_only_picks_masked_actions_is_warned_about(env):
    with pytest.warns(UserWarning, match=r"chose \d+ masked"):
        res = rollout(_MaskedOnly(env), env, max_steps=5)
    assert res["invalid_actions"] == 5 and res["info"]["n_pruned"] == 0


def test_agent_returning_none_is_named(env):
    with pytest.raises(AgentError, match="_ReturnsNone returned None"):
        rollout(_ReturnsNone(env), env)


def test_valid_agent_gets_no_warning(env):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = rollout(build_agent("greedy-gamma", env), env)
    assert res["invalid_actions"] == 0


def test_agent_class_without_predict(tmp_path):
    mod = tmp_path / "noagent.py"
    mod.write_text("class NoPredict:\n    def __init__(self, env, **params):\n        pass\n")
    with pytest.raises(AgentError, match="without a predict"):
        build_agent(f"{mod}:NoPredict", None)


def test_synthesized_cache_with_wrong_shapes(tiny_bundle, tmp_path):
    from envs.asr_estimators import build_probe

    data = tiny_bundle.defense_data
    build_probe("synthesized", tiny_bundle.model, None, data, steps=2, cache_dir=tmp_path)
    (path,) = (tmp_path / "synthesized").glob("*.pt")
    rev = torch.load(path, weights_only=True)
    rev["mask"] = rev["mask"][:3]  # a cache of another model's shape
    torch.save(rev, path)
    with pytest.raises(CheckpointError, match="delete the file"):
        build_probe("synthesized", tiny_bundle.model, None, data, steps=2, cache_dir=tmp_path)
    torch.save({"mask": 1}, path)
    with pytest.raises(CheckpointError, match=path.name):
        build_probe("synthesized", tiny_bundle.model, None, data, steps=2, cache_dir=tmp_path)


def test_cli_agent_errors_are_one_line(tiny_bundle, tmp_path, capsys):
    """A plug-in agent without predict, or returning None: exit 2, the agent named, no traceback."""
    from onp import train
    from tests.test_train_cli import TINY

    mod = tmp_path / "plugins.py"
    mod.write_text(
        "class NoPredict:\n    def __init__(self, env, **params):\n        pass\n\n"
        "class ReturnsNone:\n    def __init__(self, env, **params):\n        pass\n"
        "    def predict(self, obs, mask):\n        return None\n"
    )
    for cls, text in (("NoPredict", "without a predict"), ("ReturnsNone", "returned None")):
        argv = ["--config", TINY, "--agent", f"{mod}:{cls}", "--out", str(tmp_path / cls), "--quiet"]
        assert run_cli(train.main, argv) == 2
        err = capsys.readouterr().err
        assert text in err and "Traceback" not in err and err.startswith("error:")
        assert not (tmp_path / cls).exists()  # the failed run leaves no folder behind

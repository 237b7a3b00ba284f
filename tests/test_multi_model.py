"""One policy trained on several models (``TrainConfig.multi_model``, issue #17 §5): the config, the
behaviour cloning, the defense-val evaluation over every model, and the policy applied to a model it
never saw (``onp.evaluate``)."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from onp.config import load_yaml
from onp.train_config import ConfigError, TrainConfig

from .conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
UNIFORM = {"policy": {"edge_weights": "uniform"}}


def test_multi_model_entries_are_the_keys_that_differ_from_backdoor():
    cfg = TrainConfig.from_dict(
        {
            "backdoor": {"attack": "badnets", "attack_params": {"patch_size": 4}},
            "multi_model": [{"seed": 1}, {"attack": "blend"}],
            **UNIFORM,
        }
    )
    same_attack, other_attack = cfg.multi_model
    assert same_attack["attack"] == "badnets" and same_attack["seed"] == 1 and same_attack["width"] == 16
    assert same_attack["attack_params"] == {"patch_size": 4}  # the same attack keeps its parameters
    assert other_attack["attack"] == "blend" and other_attack["seed"] == 0
    assert other_attack["attack_params"] == {}  # another attack does not inherit badnets' parameters


@pytest.mark.parametrize(
    "data, words",
    [
        ({"multi_model": [{"seed": 1}]}, "policy.edge_weights=uniform"),
        ({"multi_model": [{"seed": 0}], **UNIFORM}, "multi_model[0] is the same model as backdoor"),
        (
            {"multi_model": [{"seed": 1}, {"seed": 1}], **UNIFORM},
            "multi_model[1] is the same model as an earlier entry",
        ),
        ({"multi_model": [{"width": 8}], **UNIFORM}, "multi_model[0] changes width"),
        ({"multi_model": [{"attack": "nope"}], **UNIFORM}, "valid choices: badnets"),
        ({"multi_model": [{"atack": "blend"}], **UNIFORM}, "unknown backdoor config key"),
        ({"multi_model": [{"seed": 1}], "checkpoint": "runs/x", **UNIFORM}, "cannot be combined with checkpoint"),
        ({"policy": {"edge_weights": "mean"}}, "policy.edge_weights"),
    ],
)
def test_bad_multi_model_lists_are_refused_up_front(data, words):
    with pytest.raises(ConfigError, match=None) as err:
        TrainConfig.from_dict(data)
    assert words in str(err.value)


def test_multi_model_profile_resolves_to_the_ten_seed_0_and_1_models():
    cfg = TrainConfig.from_dict(load_yaml(ROOT / "configs" / "train" / "multi_model.yaml"))
    models = [(b["attack"], b["seed"]) for b in [cfg.backdoor, *cfg.multi_model]]
    assert sorted(models) == sorted((a, s) for a in ("badnets", "blend", "sig", "trojan", "wanet") for s in (0, 1))
    assert cfg.env.asr_estimator != "trigger"  # the honest setting
    assert cfg.ppo.total_timesteps == 2560 * len(models)


def test_uniform_edge_weights_ignore_the_models_weights(tiny_bundle):
    from agents.gnn_policy import GNNMaskablePolicy, policy_kwargs_for
    from envs import NeuronPruningEnv

    env = NeuronPruningEnv(tiny_bundle, budget=4, reward_batch=40)
    kwargs = policy_kwargs_for(env, hidden=8, layers=1, head_hidden=8)
    assert not torch.all(torch.as_tensor(kwargs["edge_weight"]) == 1)  # the model's own weights differ
    policy = GNNMaskablePolicy(env.observation_space, env.action_space, lambda _: 0.0, **kwargs, edge_weights="uniform")
    assert torch.all(policy.encoder.edge_weight == 1)
    policy.set_graph(env.edge_index, env.edge_weight * 3)
    assert torch.all(policy.encoder.edge_weight == 1)
    with pytest.raises(ValueError, match="valid choices: model, uniform"):
        GNNMaskablePolicy(env.observation_space, env.action_space, lambda _: 0.0, **kwargs, edge_weights="mean")
    env.close()


@pytest.fixture(scope="module")
def second_tiny_bundle(onp_cache):
    """The tiny model of the tests, trained with seed 1 (another model of the same architecture)."""
    from onp.zoo import BackdoorConfig, load_bundle

    return load_bundle(BackdoorConfig(**{**TINY, "seed": 1}), cache_dir=onp_cache, progress=False)


def test_evaluation_runs_one_episode_per_model(tiny_bundle, second_tiny_bundle):
    from agents.callbacks import evaluate_policy_episode
    from agents.gnn_policy import policy_kwargs_for
    from agents.ppo_gnn import make_ppo
    from agents.vec_envs import EnvFactory, make_vec_env

    factory = EnvFactory([tiny_bundle, second_tiny_bundle], {"budget": 4, "reward_batch": 40}, monitor=False)
    env = factory()
    model = make_ppo(
        make_vec_env(factory), policy_kwargs_for(env, hidden=8, layers=1, head_hidden=8, edge_weights="uniform")
    )
    res = evaluate_policy_episode(model, env)
    assert len(res["returns"]) == 2
    assert res["mean_return"] == pytest.approx(float(np.mean(res["returns"])))
    # each model's return is that model's own deterministic episode
    from agents import rollout

    for i, ret in enumerate(res["returns"]):
        own = rollout(
            lambda o, m: model.predict(o, action_masks=m, deterministic=True)[0], env, options={"model_index": i}
        )
        assert own["info"]["model"] == env.targets[i].name
        assert own["return"] == pytest.approx(ret)
    env.close()


@pytest.fixture(scope="module")
def multi_run(tiny_bundle, second_tiny_bundle, onp_cache, tmp_path_factory):
    """A tiny policy trained on the two tiny models (configs/train/tiny.yaml, 64 PPO steps): its run folder
    and metrics."""
    from onp.train import run_training

    cfg = load_yaml(ROOT / "configs" / "train" / "tiny.yaml")
    cfg.update({"multi_model": [{"seed": 1}], **UNIFORM, "cache_dir": str(onp_cache)})
    cfg["ppo"]["total_timesteps"] = 64
    run = tmp_path_factory.mktemp("multi") / "run"
    return SimpleNamespace(path=run, metrics=run_training(cfg, run, quiet=True).metrics)


def test_multi_model_training_end_to_end_and_applied_to_a_new_model(
    multi_run, tiny_bundle, second_tiny_bundle, onp_cache, tmp_path
):
    from agents.policy_io import load_policy
    from envs import NeuronPruningEnv
    from onp.evaluate import run_evaluate
    from onp.evaluate_config import EvaluateConfig

    run, m = multi_run.path, multi_run.metrics
    assert m["multi_model"] == [tiny_bundle.path.name, second_tiny_bundle.path.name]
    assert m["model_dir"] == str(tiny_bundle.path)  # the run's pruning and report are backdoor's
    ws = json.loads((run / "train_state.json").read_text())["warm_start"]
    assert [r["model"] for r in ws["models"]] == m["multi_model"]  # one demonstration per model, cloned together
    assert ws["env_steps"] == sum(r["env_steps"] for r in ws["models"])
    assert 0 < ws["states"] <= ws["env_steps"]
    curve = json.loads((run / "learning_curve.json").read_text())
    for point in curve:
        assert len(point["returns"]) == 2 and point["mean_return"] == pytest.approx(np.mean(point["returns"]))
    assert json.loads((run / "policy.json").read_text())["arch"]["edge_weights"] == "uniform"
    env = NeuronPruningEnv(second_tiny_bundle, budget=8, reward_batch=80, delta=0.5)
    assert torch.all(load_policy(run, env).encoder.edge_weight == 1)  # the stored policy stays uniform
    env.close()
    # zero-shot: the multi-model policy on a model it was not trained on
    out = run_evaluate(
        EvaluateConfig.from_dict(
            {"policy": str(run), "target": {"seed": 2}, "cache_dir": str(onp_cache), "finetune_method": "fst"}
        ),
        tmp_path / "to-s2",
        quiet=True,
    ).metrics
    target = Path(out["target"]["model_dir"]).name
    assert out["target"]["seed"] == 2 and target not in m["multi_model"]
    assert out["source"]["run_dir"] == str(run) and 0 <= out["n_pruned"] <= 8
    assert out["finetune"]["method"] == "fst"  # the finisher overridden at evaluation (the run's is ft)
    with pytest.raises(ConfigError, match="finetune_method applies to policy only"):
        EvaluateConfig.from_dict({"pruned": str(run), "finetune_method": "fst"})


def test_defend_applies_a_trained_policy_without_training(multi_run, onp_cache, tmp_path, capsys):
    import onp
    from onp.cli_common import run_cli
    from onp.defend import main
    from onp.zoo import BackdoorConfig, load_bundle

    received = load_bundle(BackdoorConfig(**{**TINY, "seed": 2}), cache_dir=onp_cache, progress=False)
    x = (received.defense_data.all_x * 255).round().to(torch.uint8).numpy()
    y = received.defense_data.all_y.numpy()
    env = {"budget": 8, "reward_batch": 80, "delta": 0.5}  # the policy's env (configs/train/tiny.yaml)
    fast = {"estimator_params": {"steps": 60, "detector": "trigger-size"}, "anomaly_threshold": 1.5, "torch_threads": 1}
    fast["force"] = True
    report = onp.defend(received.model, x, y, defense="ppo-gnn", policy=str(multi_run.path), train={"env": env}, **fast)
    info = report.metrics["defense_info"]
    assert info["timesteps"] == 0 and info["policy"] == str(multi_run.path)  # applied, not trained
    assert len(report.pruned) <= 8 and report.outcome in ("removed", "reduced", "not removed", "no evidence")
    # a folder without a policy is named; a policy with a defense that is not ppo-gnn is refused
    np.savez(tmp_path / "clean.npz", x=x, y=y)
    torch.save(received.model.state_dict(), tmp_path / "w.pt")
    flags = ["--arch", "small_cnn", "--width", "16", "--in-channels", "1", "--input-size", "28", "--weights"]
    flags += [str(tmp_path / "w.pt"), "--clean-data", str(tmp_path / "clean.npz"), "--force", "--quiet"]
    assert run_cli(main, flags + ["--policy", str(tmp_path), "--out", str(tmp_path / "a")]) == 2
    assert "policy.json: not found" in capsys.readouterr().err
    assert (
        run_cli(main, flags + ["--policy", str(multi_run.path), "--defense", "fp", "--out", str(tmp_path / "b")]) == 2
    )
    assert "policy is a ppo-gnn policy" in capsys.readouterr().err


def test_defend_refuses_multi_model(capsys):
    from onp.cli_common import run_cli
    from onp.defend import main

    argv = [
        "--arch",
        "resnet18",
        "--weights",
        "w.pt",
        "--clean-data",
        "c.npz",
        "--set",
        'train.multi_model=[{"seed": 1}]',
    ]
    assert run_cli(main, argv) == 2
    assert "multi_model cannot be set here" in capsys.readouterr().err


def test_the_shipped_multi_model_policy_is_intact_and_fits_resnet18_width_16():
    """docs/policies/resnet18-w16-multi-model: its weights match policy.json's digest, and its sizes are
    those of every ResNet-18 of width 16 (the README's fast path)."""
    import hashlib

    from agents.policy_io import POLICY_FORMAT
    from onp.io import load_checkpoint

    folder = ROOT / "docs" / "policies" / "resnet18-w16-multi-model"
    meta = json.loads((folder / "policy.json").read_text())
    assert meta["format"] == POLICY_FORMAT and meta["arch"]["edge_weights"] == "uniform"
    assert meta["sha256"] == hashlib.sha256((folder / "policy.pt").read_bytes()).hexdigest()
    model = TrainConfig.from_dict(json.loads((folder / "config.json").read_text()))  # a valid training config
    assert model.backdoor["model"] == "resnet18" and model.backdoor["width"] == 16 and len(model.multi_model) == 9
    from onp.models import build_model

    net = build_model("resnet18", num_classes=10, in_channels=1, width=16)
    n = sum(m.num_features for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert meta["num_nodes"] == n and meta["num_actions"] == n + 1
    state = load_checkpoint(folder / "policy.pt")  # weights only
    assert all(isinstance(v, torch.Tensor) for v in state.values())

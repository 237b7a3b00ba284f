import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from envs import ENV_ID, NeuronPruningEnv, build_probe
from onp.registry import UnknownNameError


@pytest.fixture(scope="module")
def env(tiny_bundle):
    e = NeuronPruningEnv(tiny_bundle, budget=10, reward_batch=80, delta=0.9)
    yield e
    e.close()


def _random_valid(env, rng):
    return int(rng.choice(np.flatnonzero(env.action_masks()[:-1])))


def test_spaces_and_reset(env, tiny_bundle):
    n = sum(m.num_features for m in tiny_bundle.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert env.num_nodes == n and env.action_space.n == n + 1
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert obs["pruned"].sum() == 0 and obs["budget"][0] == 1.0
    assert {"acc", "asr", "n_pruned", "pruned", "asr_estimator", "trigger_aware"} <= set(info)
    assert info["trigger_aware"] is True and info["asr"] > 0.5  # the backdoor is there
    assert env.edge_index.shape[0] == 2 and env.edge_weight.shape[0] == env.edge_index.shape[1]


def test_masks_hide_stem_pruned_and_spent_budget(env):
    env.reset(seed=0)
    mask = env.action_masks()
    stem = [i for i in range(env.num_nodes) if env.graph.layers[int(env.graph.node_layer[i])].layer_type == "stem"]
    assert stem and not mask[stem].any() and mask[-1]
    rng = np.random.default_rng(0)
    a = _random_valid(env, rng)
    env.step(a)
    assert not env.action_masks()[a]
    for _ in range(env.budget - 1):
        _, _, term, trunc, _ = env.step(_random_valid(env, rng))
    assert term and not env.action_masks()[:-1].any() and env.action_masks()[-1]


def test_masked_action_is_a_penalised_noop(env):
    env.reset(seed=0)
    stem = int(np.flatnonzero(~env.action_masks()[:-1])[0])
    obs, r, term, trunc, info = env.step(stem)
    assert r == -env.invalid_action_penalty and not term and not trunc and info["n_pruned"] == 0
    obs, r, *_ = env.step(10**6)  # out of range: also a no-op, never an exception
    assert r == -env.invalid_action_penalty


def test_episode_return_is_acc_minus_lambda_asr_delta(env):
    obs, info0 = env.reset(seed=0)
    rng = np.random.default_rng(1)
    total, done = 0.0, False
    while not done:
        obs, r, term, trunc, info = env.step(_random_valid(env, rng))
        total += r
        done = term or trunc
    expected = (info["acc"] - info0["acc"]) - env.lam * (info["asr"] - info0["asr"])
    assert total == pytest.approx(expected, abs=1e-6)
    assert info["n_pruned"] == len(info["pruned"]) == env.budget


def test_stop_terminates(env):
    env.reset(seed=0)
    _, r, term, trunc, _ = env.step(env.stop_action)
    assert term and r == 0.0


def test_cached_and_uncached_steps_agree(tiny_bundle):
    cached = NeuronPruningEnv(tiny_bundle, budget=12, reward_batch=80, delta=0.9)
    plain = NeuronPruningEnv(tiny_bundle, budget=12, reward_batch=80, delta=0.9, use_suffix_cache=False)
    cached.reset(seed=0)
    plain.reset(seed=0)
    rng = np.random.default_rng(3)
    for _ in range(12):
        a = _random_valid(cached, rng)
        _, r1, *_, i1 = cached.step(a)
        _, r2, *_, i2 = plain.step(a)
        assert (i1["acc"], i1["asr"]) == (i2["acc"], i2["asr"]) and r1 == r2
        fresh = cached.target.uncached_evaluation()
        assert (fresh.acc, fresh.asr) == (i1["acc"], i1["asr"])
    # reset restores the unpruned model without a forward pass, and it really is the unpruned state
    cached.reset()
    assert cached.target.uncached_evaluation().acc == cached.target.initial.acc
    cached.close()
    plain.close()


def test_determinism(tiny_bundle):
    def rollout():
        e = NeuronPruningEnv(tiny_bundle, budget=6, reward_batch=60, delta=0.9)
        obs, _ = e.reset(seed=7)
        rng = np.random.default_rng(7)
        rewards = [e.step(_random_valid(e, rng))[1] for _ in range(6)]
        e.close()
        return obs["x"], rewards

    (x1, r1), (x2, r2) = rollout(), rollout()
    assert np.array_equal(x1, x2) and r1 == r2


def test_warm_start_and_multi_model(tiny_bundle):
    e = NeuronPruningEnv([tiny_bundle, tiny_bundle], budget=5, reward_batch=60, delta=0.9)
    obs, info = e.reset(seed=0, options={"initial_pruned": [20, 21, 40], "model_index": 1})
    assert e.target_index == 1 and obs["pruned"][[20, 21, 40]].all() and info["n_pruned"] == 3
    assert not e.action_masks()[[20, 21, 40]].any()
    seen = {e.reset(seed=s)[1]["model"] and e.target_index for s in range(12)}
    assert seen == {0, 1}
    with pytest.raises(ValueError, match="initial_pruned"):
        e.reset(options={"initial_pruned": [10**6]})
    e.close()


def test_group_pruning_prunes_the_coupled_channels(onp_cache):
    from envs import PruningSubject
    from onp.attacks import build_attack
    from onp.data.defense import DefenseData
    from onp.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", in_channels=1, width=4).eval()
    x = torch.rand(40, 1, 28, 28)
    data = DefenseData(x[:20], torch.arange(20) % 10, x[20:], torch.arange(20) % 10, 10)
    subject = PruningSubject(model, build_attack("badnets", (1, 28, 28), 10), data)
    e = NeuronPruningEnv(subject, budget=3, group_pruning=True, delta=10.0)
    e.reset(seed=0)
    g = e.graph.group
    sizes = torch.bincount(g)
    node = int(torch.nonzero(sizes[g] > 1)[-1])  # a neuron tied to others by a residual add
    _, _, _, _, info = e.step(node)
    assert sorted(info["pruned"]) == sorted(torch.nonzero(g == g[node]).flatten().tolist())
    e.close()


def test_gym_make_and_checkers(tiny_bundle):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    e = gym.make(ENV_ID, backdoor=tiny_bundle, budget=4, reward_batch=40).unwrapped
    check_env(e, skip_render_check=True)
    sb3_check_env(e)
    e.close()


def test_synthesized_cache_is_per_model_and_clean_images(tiny_bundle, tmp_path):
    """Other clean images of the same count get their own reverse-engineered triggers (no stale cache)."""
    import dataclasses

    data = tiny_bundle.defense_data
    build_probe("synthesized", tiny_bundle.model, None, data, steps=2, cache_dir=tmp_path)
    build_probe("synthesized", tiny_bundle.model, None, data, steps=2, cache_dir=tmp_path)  # a cache hit
    assert len(list((tmp_path / "synthesized").glob("*.pt"))) == 1
    flipped = dataclasses.replace(data, train_x=data.train_x.flip(-1))
    build_probe("synthesized", tiny_bundle.model, None, flipped, steps=2, cache_dir=tmp_path)
    assert len(list((tmp_path / "synthesized").glob("*.pt"))) == 2


def test_synthesized_estimator_needs_no_attack(tiny_bundle, onp_cache):
    data = tiny_bundle.defense_data
    probe = build_probe("synthesized", tiny_bundle.model, None, data, steps=15, cache_dir=onp_cache)
    assert probe.trigger_aware is False and 0 <= probe.info["estimated_target"] < 10
    assert (probe.target_labels == probe.info["estimated_target"]).all()
    assert probe.images.min() >= 0 and probe.images.max() <= 1
    assert list((onp_cache / "synthesized").glob("*.pt"))  # cached once per model
    # the probe stamps the same reverse-engineered trigger on any clean images (fine-tuning's unlearning)
    others = data.val_x[data.val_y != probe.info["estimated_target"]]
    assert torch.allclose(probe.stamp(others), probe.images)
    assert probe.limit(5).stamp is probe.stamp
    e = NeuronPruningEnv(
        tiny_bundle,
        budget=3,
        reward_batch=50,
        asr_estimator="synthesized",
        estimator_params={"steps": 15},
        cache_dir=onp_cache,
    )
    _, info = e.reset(seed=0)
    assert info["asr_estimator"] == "synthesized" and info["trigger_aware"] is False
    e.close()


def test_trigger_estimator_uses_the_real_trigger(tiny_bundle):
    probe = build_probe("trigger", tiny_bundle.model, tiny_bundle.attack, tiny_bundle.defense_data)
    assert probe.trigger_aware and (probe.true_labels != tiny_bundle.attack.target_of(probe.true_labels)).all()
    x = tiny_bundle.defense_data.val_x[:8]
    assert torch.equal(probe.stamp(x), tiny_bundle.attack.apply(x))  # the real trigger (trigger-aware)


@pytest.mark.parametrize(
    "kwargs, match", [({"budget": 0}, "budget"), ({"lam": -1}, "lam"), ({"reward_batch": 10**5}, "reward_batch")]
)
def test_bad_input_rejected(tiny_bundle, kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeuronPruningEnv(tiny_bundle, **kwargs)


def test_unknown_estimator_lists_choices(tiny_bundle):
    with pytest.raises(UnknownNameError, match="synthesized"):
        NeuronPruningEnv(tiny_bundle, asr_estimator="oracle")


@pytest.mark.parametrize("reject", [True, False])
def test_prune_crossing_delta_is_refused_and_ends_the_episode(tiny_bundle, reject):
    # delta ~ 0: the first prune that costs any clean accuracy crosses it
    e = NeuronPruningEnv(tiny_bundle, budget=40, reward_batch=80, delta=1e-6, reject_violations=reject)
    _, info0 = e.reset(seed=0)
    rng = np.random.default_rng(0)
    done, before = False, info0
    while not done:
        before = e.evaluation(), e._info()
        _, r, term, trunc, info = e.step(_random_valid(e, rng))
        done = term or trunc
    # crossing delta is part of the MDP: a termination, not a truncation
    assert term and not trunc and info["delta_exceeded"], "the tiny model should lose accuracy within 40 random prunes"
    prev_eval, prev_info = before
    if reject:
        # the refused neuron stays unpruned, the state is the one before the step (masks and cache),
        # and the step is charged the accuracy it would have cost, with no ASR credit
        assert len(info["rejected"]) == 1 and info["rejected"][0] not in info["pruned"]
        assert info["pruned"] == prev_info["pruned"] and e.evaluation() == prev_eval
        assert e.target.uncached_evaluation() == prev_eval
        assert r < 0 and info0["acc"] - info["acc"] <= 1e-6
    else:
        assert "rejected" not in info and info0["acc"] - info["acc"] > 1e-6
        assert len(info["pruned"]) == len(prev_info["pruned"]) + 1
    assert not e.action_masks()[:-1].any()  # the episode is over
    e.close()


def test_preview_predicts_the_step_and_changes_nothing(tiny_bundle):
    e = NeuronPruningEnv(tiny_bundle, budget=10, reward_batch=80, delta=0.9)
    e.reset(seed=0)
    rng = np.random.default_rng(3)
    for _ in range(4):
        e.step(_random_valid(e, rng))
    a = _random_valid(e, rng)
    state, pruned, mask = e.evaluation(), e._info()["pruned"], e.action_masks().copy()
    seen = e.preview(a)
    assert e.evaluation() == state and e._info()["pruned"] == pruned and (e.action_masks() == mask).all()
    assert e.target.uncached_evaluation() == state  # masks and the activation cache were restored
    _, r, *_ = e.step(a)
    assert e.evaluation() == seen and r == pytest.approx((seen.acc - state.acc) - e.lam * (seen.asr - state.asr))
    with pytest.raises(ValueError, match="not a valid prune"):
        e.preview(a)  # already pruned
    e.close()


def test_env_requires_the_model():
    with pytest.raises(ValueError, match="needs the model to prune"):
        gym.make(ENV_ID)


def test_score_feature_providers_need_no_earlier_import(tmp_path):
    """``feature_providers=["clp_score"]`` works in a fresh interpreter: the env registers the
    baselines' score providers itself, and importing ``baselines`` registers none."""
    code = """
import torch
torch.set_num_threads(1)
from onp.graph import FEATURE_PROVIDERS
import baselines
assert "clp_score" not in FEATURE_PROVIDERS, "importing baselines must not register providers"
from envs import NeuronPruningEnv
from onp.zoo import BackdoorConfig
cfg = BackdoorConfig(model="small_cnn", width=4, dataset="fashion-mnist", data_source="sample", attack="badnets",
                     epochs=1, max_train=1000, defense_size=100, seed=0)
env = NeuronPruningEnv(cfg, budget=2, reward_batch=20, delta=0.9, feature_providers=["structure", "clp_score"])
assert "clp_score" in env.target.feature_names and "clp_score" in FEATURE_PROVIDERS
env.close()
print("ok")
"""
    envvars = {**os.environ, "ONP_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=envvars,
        cwd=str(Path(__file__).resolve().parents[1]),
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr

"""scripts/estimator_study.py: its Spearman correlation and one model's record on the tiny test model."""

import json
import math

import pytest

from .conftest import TINY, load_script


@pytest.fixture(scope="module")
def study():
    yield from load_script("estimator_study")


def test_spearman_perfect_ties_and_constant(study):
    assert study.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert study.spearman([1, 2, 3, 4], [0.9, 0.5, 0.2, 0.1]) == pytest.approx(-1.0)
    assert list(study.average_ranks([3, 1, 3, 2])) == [3.5, 1.0, 3.5, 2.0]
    # ties: Pearson of the average ranks [1, 2.5, 2.5, 4] and [1, 2, 3, 4]
    assert study.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert math.isnan(study.spearman([0.5, 0.5, 0.5], [1, 2, 3]))
    assert math.isnan(study.spearman([1, 2, 3], [0, 0, 0]))
    assert math.isnan(study.spearman([1], [2]))
    rec = study.spearman_record([0.5, 0.5], [0.1, 0.2])
    assert rec == {"spearman": None, "spearman_undefined": "estimated ASR constant"}


def test_study_model_on_the_tiny_model(study, tiny_bundle, onp_cache, tmp_path):
    import torch

    from envs.asr_estimators import build_probe
    from onp.graph.layout import neuron_layout
    from onp.metrics import evaluate_backdoor, predict

    params = {"steps": 10}
    record = study.study_model(
        tiny_bundle,
        "synthesized",
        seed=0,
        orders=["clp"],
        grid=[1, 4, 10_000],
        test_images=300,
        cache_dir=onp_cache,
        probe_params=params,
        scores_dir=tmp_path,
    )
    json.dumps(record, allow_nan=False)  # plain JSON, no NaN
    assert {"estimated_target", "real_target", "target_correct", "probe", "unpruned", "orders"} <= set(record)
    assert {"anomaly_index", "success", "estimated_target", "families", "family_slices", "seconds", "cached"} <= set(
        record["probe"]
    )
    assert record["real_target"] == tiny_bundle.attack.target and record["clean"] is False
    clp = record["orders"]["clp"]
    assert [p["k"] for p in clp["points"]][:3] == [0, 1, 4] and "spearman" in clp
    assert all(p["k"] <= 10_000 for p in clp["points"]) and clp["points"][-1]["k"] != 10_000  # capped at N
    start = clp["points"][0]
    assert {"est_asr", "val_acc", "test_acc", "test_asr", "est_asr_families"} <= set(start)
    model = tiny_bundle.model.eval()
    real = evaluate_backdoor(model, tiny_bundle.test_x[:300], tiny_bundle.test_y[:300], tiny_bundle.attack)
    assert start["test_asr"] == real["asr"] and start["test_acc"] == real["acc"]
    probe = build_probe("synthesized", model, None, tiny_bundle.defense_data, seed=0, cache_dir=onp_cache, **params)
    direct = (predict(model, probe.images) == probe.target_labels).float().mean().item()
    assert start["est_asr"] == direct
    assert torch.equal(probe.target_labels, torch.full_like(probe.target_labels, record["estimated_target"]))
    # the bundle's model carries no mask hooks afterwards
    assert not any(m._forward_hooks for m in tiny_bundle.model.modules())
    # the orders' scores are cached in scores_dir
    assert clp["scores_cached"] is False
    scores, timing = study.order_scores(tiny_bundle, "clp", 0, tmp_path)
    assert timing["scores_cached"] is True and len(scores) == neuron_layout(model).num_neurons
    # the summary table counts it
    row = {"attack": "badnets", "seed": 0, **record}
    table = study.summarize([row])
    assert f"| badnets | synthesized | 1 | {int(record['target_correct'])} of 1 |" in table


def test_a_policys_order_is_tracked_up_to_its_episodes_length(study, tiny_bundle, onp_cache, tmp_path):
    """``policy=``: the order an onp.train run's agent prunes in, here ``ranked:clp`` (CLP's order over the
    neurons the env lets it prune, up to the budget), tracked up to the episode's end."""
    from agents import pruning_order
    from onp.evaluate import policy_episode, read_source
    from onp.train import run_training

    env = {"budget": 0.1, "delta": 1.0, "asr_estimator": "synthesized", "estimator_params": {"steps": 10}}
    cfg = {"backdoor": TINY, "agent": "ranked:clp", "env": env, "ppo": {"total_timesteps": 0}}
    cfg["cache_dir"] = str(onp_cache)
    run_training(cfg, tmp_path / "run", progress=False, quiet=True)
    record = study.study_model(
        tiny_bundle,
        "synthesized",
        seed=0,
        orders=["clp"],
        grid=[1, 2, 4, 10_000],
        test_images=300,
        cache_dir=onp_cache,
        probe_params={"steps": 10},
        scores_dir=tmp_path / "scores",
        policy=tmp_path / "run",
    )
    policy, clp = record["orders"]["policy"], record["orders"]["clp"]
    n = policy["n_pruned"]
    assert 4 < n < 10_000 and policy["policy"] == str(tmp_path / "run") and policy["episode_seconds"] > 0
    assert [p["k"] for p in policy["points"]] == [0, 1, 2, 4, n]
    episode = policy_episode(read_source(tmp_path / "run", "policy"), tiny_bundle, cache_dir=onp_cache)
    assert policy["order"] == pruning_order(episode) == episode["actions"][:n]  # in the order pruned
    assert policy["points"][1] == clp["points"][1]  # CLP's first neuron is the policy's first
    json.dumps(record, allow_nan=False)


def test_probe_parameters_make_their_own_rows_and_the_verdict_flags(study):
    assert study.parse_probe_params(["detector=combined", "steps=150", 'families=["patch"]']) == {
        "detector": "combined",
        "steps": 150,
        "families": ["patch"],
    }
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        study.parse_probe_params(["detector"])
    base = {"attack": "sig", "seed": 0, "estimator": "synthesized-multi", "model": "resnet18", "width": 16}
    base["data_source"] = "full"
    combined = {**base, "probe_params": {"detector": "combined"}}
    assert study._key(base) != study._key(combined) and study._key(base) == study._key({**base, "probe_params": {}})
    assert study.estimator_label(combined) == "synthesized-multi[detector=combined]"
    # a probe whose estimated target's index is -2.5 but whose trigger flips too few images: no verdict
    probe = {"estimated_target": 0, "anomaly_index": [-2.5, 0.1, 0.2], "trigger_size": [1.0, 5.0, 6.0]}
    probe.update({"success": [0.2, 0.9, 0.9], "min_success": 0.5})
    assert study.flagged({**base, "probe": probe}, -2.0) is False
    assert study.flagged({**base, "probe": {**probe, "success": [0.9, 0.9, 0.9]}}, -2.0) is True
    assert study.flagged({**base, "estimated_target": 0, "probe": {"anomaly_index": [-3.0]}}, -2.0) is True

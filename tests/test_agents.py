"""Agents: the GNN policy (shapes, masking, batching, SB3 integration, save/load), the heuristic
agents, the agent registry (entry points, path.py:Class, errors), the docs example and BC warm start."""

import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from agents import (
    AGENTS,
    BaseAgent,
    GNNMaskablePolicy,
    available_agents,
    build_agent,
    policy_kwargs_for,
    pruning_order,
    resolve_agent_factory,
    rollout,
    select_pruning,
)
from agents.heuristics import bn_gamma_abs
from agents.ppo_gnn import behaviour_clone, make_ppo
from agents.vec_envs import EnvFactory, make_vec_env
from envs import NeuronPruningEnv
from onp.registry import UnknownNameError

ROOT = Path(__file__).resolve().parents[1]
ENV_KW = dict(budget=8, reward_batch=80, delta=0.9)
POLICY = dict(hidden=16, layers=2, head_hidden=32)


@pytest.fixture(scope="module")
def env(tiny_bundle):
    e = NeuronPruningEnv(tiny_bundle, **ENV_KW)
    yield e
    e.close()


def _policy(env, **kw):
    return GNNMaskablePolicy(
        env.observation_space, env.action_space, lambda _: 1e-3, **policy_kwargs_for(env, **{**POLICY, **kw})
    )


def _batch(env, rng, b):
    """``b`` observations with random pruned sets and budgets."""
    obs, _ = env.reset(seed=0)
    out = {k: np.repeat(v[None], b, 0) for k, v in obs.items()}
    out["pruned"] = (rng.random((b, env.num_nodes)) < 0.2).astype(np.int8)
    out["budget"] = rng.random((b, 1)).astype(np.float32)
    return out


@pytest.mark.parametrize("conv", ["gcn", "sage", "gat"])
def test_policy_shapes_and_batching(env, conv):
    torch.manual_seed(0)
    pol = _policy(env, conv=conv)
    rng = np.random.default_rng(0)
    obs_np = _batch(env, rng, 5)
    obs, _ = pol.obs_to_tensor(obs_np)
    with torch.no_grad():
        actions, values, log_prob = pol(obs)
        logits = pol.action_logits(obs)
        singles = torch.cat([pol.action_logits({k: v[i : i + 1] for k, v in obs.items()}) for i in range(5)])
    assert actions.shape == (5,) and values.shape == (5, 1) and log_prob.shape == (5,)
    assert logits.shape == (5, env.num_nodes + 1)
    # the disjoint-graph batch gives exactly the per-sample results
    assert torch.allclose(logits, singles, atol=1e-5)
    # buffers: the topology is part of the state dict; no parameter depends on N
    sd = pol.state_dict()
    assert "features_extractor.edge_index" in sd and "features_extractor.edge_weight" in sd
    assert all(env.num_nodes not in p.shape for p in pol.parameters())


def test_per_node_scorer_is_shared(env):
    """Permuting two nodes' inputs (without edges) permutes their logits: one scorer for all nodes."""
    torch.manual_seed(0)
    pol = _policy(env, layers=0)
    obs, _ = pol.obs_to_tensor(_batch(env, np.random.default_rng(1), 1))
    i, j = 20, 70
    swapped = {k: v.clone() for k, v in obs.items()}
    for key in ("x", "pruned"):
        swapped[key][:, [i, j]] = obs[key][:, [j, i]]
    with torch.no_grad():
        a, b = pol.action_logits(obs)[0], pol.action_logits(swapped)[0]
    assert torch.allclose(a[[i, j]], b[[j, i]], atol=1e-6)


def test_masked_actions_never_sampled(env):
    torch.manual_seed(0)
    pol = _policy(env)
    obs_np = _batch(env, np.random.default_rng(2), 1)
    obs, _ = pol.obs_to_tensor({k: np.repeat(v, 1000, 0) for k, v in obs_np.items()})
    mask = np.zeros(env.num_nodes + 1, dtype=bool)
    mask[np.random.default_rng(3).choice(env.num_nodes, 7, replace=False)] = True
    mask[-1] = True
    with torch.no_grad():
        dist = pol.get_distribution(obs, action_masks=np.repeat(mask[None], 1000, 0))
        acts = dist.get_actions().numpy()
        det = (
            pol.get_distribution({k: v[:1] for k, v in obs.items()}, action_masks=mask[None])
            .get_actions(deterministic=True)
            .numpy()
        )
    assert acts.shape == (1000,) and mask[acts].all()
    assert mask[det].all()
    # SB3 predict with the env's own masks
    env.reset(seed=0)
    for _ in range(3):
        obs1, _ = env.reset(seed=0)
        a, _ = pol.predict(obs1, action_masks=env.action_masks(), deterministic=False)
        assert env.action_masks()[int(a)]


def test_maskable_ppo_dummy_vec_env(tiny_bundle, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where SB3 would put its default log folder
    vec = make_vec_env(EnvFactory(tiny_bundle, ENV_KW), n_envs=2, vec_env="dummy")
    model = make_ppo(vec, policy_kwargs_for(vec.envs[0], **POLICY), dict(n_steps=32, batch_size=32, n_epochs=2))
    model.learn(128)
    assert model.num_timesteps >= 128
    assert not list(tmp_path.glob("SB3-*"))  # no tensorboard log asked for: no empty log folder either
    vec.close()


def test_maskable_ppo_subproc_vec_env(tiny_bundle, env):
    vec = make_vec_env(EnvFactory(tiny_bundle, ENV_KW), n_envs=2, vec_env="subproc")
    try:
        model = make_ppo(vec, policy_kwargs_for(env, **POLICY), dict(n_steps=32, batch_size=32, n_epochs=2))
        model.learn(128)
        assert model.num_timesteps >= 128
        masks = np.stack(vec.env_method("action_masks"))
        assert masks.shape == (2, env.num_nodes + 1)
    finally:
        vec.close()


def test_save_load_round_trip(tiny_bundle, env, tmp_path):
    """policy.pt + policy.json reload into the same policy (weights only), and export to SB3's zip."""
    from sb3_contrib import MaskablePPO

    from agents.policy_io import export_sb3_zip, load_policy, save_policy

    vec = make_vec_env(EnvFactory(tiny_bundle, ENV_KW), n_envs=1)
    model = make_ppo(vec, policy_kwargs_for(env, conv="sage", **POLICY), dict(n_steps=32, batch_size=16, n_epochs=1))
    model.learn(64)
    save_policy(model.policy, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.json", "policy.pt"]
    loaded = load_policy(tmp_path, env)
    assert loaded.encoder.conv_kind == "sage"
    rng = np.random.default_rng(4)
    obs = _batch(env, rng, 6)
    masks = np.ones((6, env.num_nodes + 1), dtype=bool)
    masks[:, :10] = False
    a1, _ = model.predict(obs, action_masks=masks, deterministic=True)
    a2, _ = loaded.predict(obs, action_masks=masks, deterministic=True)
    assert np.array_equal(a1, a2)
    # the optional SB3 export opens in plain SB3 (tests only: onp never loads such a zip)
    zip_path = export_sb3_zip(tmp_path, env, tmp_path / "export.zip")
    a3, _ = MaskablePPO.load(zip_path).predict(obs, action_masks=masks, deterministic=True)
    assert np.array_equal(a1, a3)
    vec.close()


# ------------------------------------------------------------------------------------------------
# heuristic agents


@pytest.mark.parametrize("name", ["random", "greedy-gamma", "greedy-activation", "ranked:magnitude"])
def test_builtin_agents_run_valid_episodes(env, name):
    agent = build_agent(name, env)
    res = rollout(agent, env)
    info = res["info"]
    assert info["n_pruned"] == env.budget == len(set(res["actions"]))
    stem = [i for i in range(env.num_nodes) if env.graph.layers[int(env.graph.node_layer[i])].layer_type == "stem"]
    assert not set(res["actions"]) & set(stem)
    # after the budget only STOP is valid, and the agents say so
    mask = env.action_masks()
    assert not mask[:-1].any() and agent.predict(None, mask) == env.num_nodes


def test_greedy_gamma_order_and_ranked_baseline(env, tiny_bundle):
    gamma = bn_gamma_abs(env)
    res = rollout(build_agent("greedy-gamma", env), env)
    prunable = env._prunable
    expected = [i for i in np.argsort(gamma, kind="stable") if prunable[i]][: env.budget]
    assert res["actions"] == expected
    ranked = build_agent("ranked:magnitude", env)
    assert ranked.scores.shape == (env.num_nodes,)
    top = [i for i in np.argsort(-ranked.scores, kind="stable") if prunable[i]][: env.budget]
    ranked_res = rollout(ranked, env)
    assert ranked_res["actions"] == top
    assert pruning_order(ranked_res) == top and pruning_order(res) == expected  # the order, not the sorted set
    assert top != sorted(top)


def test_greedy_activation_scores(env):
    agent = build_agent("greedy-activation", env)
    assert agent.scores.shape == (env.num_nodes,) and np.isfinite(agent.scores).all() and agent.scores.max() > 0


# ------------------------------------------------------------------------------------------------
# registry and plug-ins


def test_bad_agent_names(env, tmp_path):
    with pytest.raises(UnknownNameError, match="valid choices: .*greedy-gamma.*ppo-gnn"):
        build_agent("nope", env)
    with pytest.raises(ValueError, match="needs an argument"):
        build_agent("ranked", env)
    with pytest.raises(ValueError, match="takes no ':' argument"):
        build_agent("random:3", env)
    with pytest.raises(ValueError, match="malformed agent spec"):
        build_agent("my_agent.py", env)
    with pytest.raises(ValueError, match="malformed agent spec"):
        build_agent(f"{tmp_path}/a.py:", env)
    with pytest.raises(FileNotFoundError, match="agent file not found"):
        build_agent(f"{tmp_path}/missing.py:Agent", env)
    with pytest.raises(UnknownNameError, match="unknown defense"):
        build_agent("ranked:not-a-baseline", env)
    with pytest.raises(ValueError, match="empty"):
        build_agent("", env)


def test_path_py_class_loading(env, tmp_path):
    file = tmp_path / "my_agents.py"
    file.write_text(
        textwrap.dedent("""
        from agents import BaseAgent

        class LastValid(BaseAgent):
            def predict(self, obs, action_mask):
                return int([i for i, ok in enumerate(action_mask[:-1]) if ok][-1])

        def helper():
            return 1
    """)
    )
    agent = build_agent(f"{file}:LastValid", env)
    res = rollout(agent, env)
    assert res["info"]["n_pruned"] == env.budget and res["actions"][0] == int(np.flatnonzero(env._prunable)[-1])
    with pytest.raises(ValueError, match="has no attribute 'Missing'.*LastValid"):
        build_agent(f"{file}:Missing", env)
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match="importing agent file .*boom"):
        build_agent(f"{broken}:X", env)


def test_entry_point_plugin(env, tmp_path, monkeypatch):
    """A package installed with an ``onp.agents`` entry point (a dist-info on sys.path) is found by name."""
    pkg = tmp_path / "onp_plugin_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent("""
        from agents import BaseAgent

        class FirstValid(BaseAgent):
            def predict(self, obs, action_mask):
                return int(action_mask.nonzero()[0][0])
    """)
    )
    dist = tmp_path / "onp_plugin_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: onp-plugin-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[onp.agents]\nfirst-valid = onp_plugin_pkg:FirstValid\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "first-valid" in available_agents()
    agent = build_agent("first-valid", env)
    assert type(agent).__name__ == "FirstValid"
    assert rollout(agent, env)["info"]["n_pruned"] == env.budget
    monkeypatch.delitem(sys.modules, "onp_plugin_pkg", raising=False)


def _docs_example() -> str:
    text = (ROOT / "docs" / "agents.md").read_text()
    m = re.search(r"<!-- custom-agent-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "docs/agents.md lost its custom-agent example block"
    return m.group(1)


def test_docs_custom_agent_example(env):
    code = _docs_example()
    assert 15 <= len([line for line in code.splitlines() if line.strip()]) <= 30
    if "lowest-beta" in AGENTS:  # the example registers itself; allow re-running in one session
        AGENTS._items.pop("lowest-beta")
    namespace: dict = {}
    exec(compile(code, "docs/agents.md", "exec"), namespace)
    assert "lowest-beta" in AGENTS
    agent = build_agent("lowest-beta", env, max_prune=3)
    assert isinstance(agent, BaseAgent)
    res = rollout(agent, env)
    assert res["info"]["n_pruned"] == 3 and res["actions"][-1] == env.num_nodes  # STOP after 3
    beta = env.target.features[:, env.feature_names.index("bn_beta")].numpy()
    expected = [i for i in np.argsort(beta, kind="stable") if env._prunable[i]][:3]
    assert res["actions"][:3] == expected


def test_resolve_module_class_spec(env):
    factory, extra, name = resolve_agent_factory("agents.heuristics:GreedyGammaAgent")
    assert factory.__name__ == "GreedyGammaAgent" and extra == {}
    factory, extra, _ = resolve_agent_factory("ranked:clp")
    assert extra == {"baseline": "clp"}


# ------------------------------------------------------------------------------------------------
# warm start (c): behaviour cloning


def test_behaviour_cloning_reproduces_the_order(tiny_bundle, env):
    torch.manual_seed(0)
    vec = make_vec_env(EnvFactory(tiny_bundle, ENV_KW), n_envs=1)
    model = make_ppo(vec, policy_kwargs_for(env, **POLICY), dict(n_steps=32, batch_size=16, n_epochs=1))
    order = build_agent("greedy-gamma", env).order
    info = behaviour_clone(model, env, order, epochs=60, lr=3e-3, log=lambda m: None)
    assert info["states"] == env.budget and info["loss_last"] < info["loss_first"]
    assert info["imitation_accuracy"] >= 0.75
    policy_actions = rollout(lambda o, m: model.predict(o, action_masks=m, deterministic=True)[0], env)["actions"]
    greedy_actions = rollout(build_agent("greedy-gamma", env), env)["actions"]
    assert sum(a == b for a, b in zip(policy_actions, greedy_actions)) >= env.budget // 2
    model.learn(64)  # PPO continues from the cloned policy
    vec.close()


def test_behaviour_cloning_clones_stop_where_the_env_refuses_the_order(tiny_bundle):
    # delta ~ 0: greedy-gamma's order soon costs clean accuracy, and the env refuses that neuron;
    # the cloned target in that state is STOP, so the cloned policy stops inside the constraint
    kw = {**ENV_KW, "budget": 40, "delta": 1e-6}
    env = NeuronPruningEnv(tiny_bundle, **kw)
    order = build_agent("greedy-gamma", env).order
    accepted = rollout(build_agent("greedy-gamma", env), env)
    assert accepted["info"].get("rejected"), "greedy-gamma should cross a zero accuracy drop within 40 prunes"
    torch.manual_seed(0)
    vec = make_vec_env(EnvFactory(tiny_bundle, kw), n_envs=1)
    model = make_ppo(vec, policy_kwargs_for(env, **POLICY), dict(n_steps=32, batch_size=16, n_epochs=1))
    info = behaviour_clone(model, env, order, epochs=80, lr=3e-3, log=lambda m: None)
    assert info["stopped_at_delta"] and info["states"] == accepted["steps"]
    assert info["order_return"] == pytest.approx(sum(accepted["rewards"][:-1]))  # the STOP step earns 0
    assert info["imitation_accuracy"] >= 0.75
    cloned = rollout(lambda o, m: model.predict(o, action_masks=m, deterministic=True)[0], env)
    assert cloned["actions"][-1] == env.stop_action and not cloned["info"].get("rejected")  # it stops itself
    vec.close()
    env.close()


def test_select_pruning_selects_falls_back_and_ignores_a_refused_prune():
    def info(n, acc, asr, **kw):
        return {"n_pruned": n, "pruned": list(range(n)), "acc": acc, "asr": asr, **kw}

    infos = [info(0, 0.9, 1.0), info(1, 0.9, 0.5), info(2, 0.7, 0.9)]
    res = {"rewards": [0.5, -0.6], "return": -0.1, "info": infos[-1], "infos": infos}
    final = select_pruning(res)  # the whole episode returns -0.1 < 0: prune nothing
    assert final["info"]["n_pruned"] == 0 and final["return"] == 0.0
    assert final["fallback"]["rejected_n_pruned"] == 2 and final["fallback"]["rejected_return"] == pytest.approx(-0.1)
    assert select_pruning(res, min_return=None)["info"]["n_pruned"] == 2
    best = select_pruning(res, select="best_prefix")
    assert best["info"]["n_pruned"] == 1 and best["return"] == pytest.approx(0.5) and best["fallback"] is None
    # a refused last prune (the env kept the state) is charged in the episode but is not the state's value
    refused = {"rewards": [0.5, -0.6], "return": -0.1, "infos": [infos[0], infos[1], {**infos[1], "rejected": [7]}]}
    refused["info"] = refused["infos"][-1]
    kept = select_pruning(refused)
    assert kept["info"]["n_pruned"] == 1 and kept["return"] == pytest.approx(0.5) and kept["fallback"] is None
    with pytest.raises(ValueError, match="best_prefix"):
        select_pruning(res, select="best")


def test_demonstration_skips_neurons_that_would_cost_more_than_they_remove(tiny_bundle):
    from agents.ppo_gnn import demonstrate

    env = NeuronPruningEnv(tiny_bundle, **{**ENV_KW, "budget": 12})
    order = build_agent("greedy-gamma", env).order  # low-|gamma| first: mostly harmless, some costly
    plain = demonstrate(env, order)
    assert plain["previews"] == 0 and plain["skipped"] == [] and min(plain["rewards"]) < 0
    demo = demonstrate(env, order, skip_harmful=True)
    assert demo["skipped"] and demo["previews"] <= 4 * env.budget
    assert all(r >= 0 for r in demo["rewards"])  # every step it takes pays for itself on the reward batch
    assert not set(demo["skipped"]) & set(demo["info"]["pruned"])
    assert sum(demo["rewards"]) > sum(plain["rewards"])
    capped = demonstrate(env, order, skip_harmful=True, max_previews=2)
    assert capped["previews"] <= 2 and capped["actions"][-1] == env.stop_action
    env.close()


def test_docs_learned_agent_example(tiny_bundle, tmp_path):
    """The learned-agent example of docs/agents.md trains through onp.train, writes its weights
    (tensors + JSON), resumes, and onp.evaluate applies it to the model again through load()."""
    import json

    from onp import evaluate
    from onp.config import load_yaml
    from onp.train import run_training

    text = (Path(__file__).resolve().parents[1] / "docs" / "agents.md").read_text()
    m = re.search(r"<!-- learned-agent-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "docs/agents.md lost its learned-agent example block"
    assert len([line for line in m.group(1).splitlines() if line.strip()]) <= 45
    AGENTS._items.pop("mlp-ppo", None)  # the example registers itself; allow re-running in one session
    exec(compile(m.group(1), "docs/agents.md", "exec"), {})
    cfg = load_yaml(Path(__file__).resolve().parents[1] / "configs" / "train" / "tiny.yaml")
    cfg.update(agent="mlp-ppo", agent_params={"n_steps": 32}, warm_start={"baseline": None})
    cfg["ppo"] = {**cfg["ppo"], "total_timesteps": 64}
    metrics = run_training(cfg, tmp_path / "run", quiet=True)
    assert metrics["agent"] == "mlp-ppo" and metrics["env_steps_breakdown"]["train"] >= 64
    meta = json.loads((tmp_path / "run" / "mlp.json").read_text())
    assert meta["format"] == "onp-weights/1" and meta["timesteps"] >= 64 and (tmp_path / "run" / "mlp.pt").exists()
    # resume: the same run with more steps continues from the stored weights and step count
    (tmp_path / "run" / "metrics.json").unlink()
    cfg["ppo"]["total_timesteps"] = 128
    resumed = run_training(cfg, tmp_path / "run", resume=True, quiet=True)
    assert resumed["env_steps_breakdown"]["train"] >= 128
    out = tmp_path / "ev"
    assert (
        evaluate.main(
            ["--policy", str(tmp_path / "run"), "--checkpoint", str(tiny_bundle.path), "--out", str(out), "--quiet"]
        )
        == 0
    )
    ev = json.loads((out / "metrics.json").read_text())
    assert ev["source"]["agent"] == "mlp-ppo" and ev["n_pruned"] == resumed["n_pruned"]


def test_ppo_gnn_with_no_ppo_steps_keeps_the_behaviour_clone(tiny_bundle, tmp_path):
    """``--timesteps 0``: the warm start's cloned policy is evaluated once, saved and rolled out (the
    "behaviour cloning only" arm of an ablation)."""
    from onp.config import load_yaml
    from onp.train import run_training

    cfg = load_yaml(Path(__file__).resolve().parents[1] / "configs" / "train" / "tiny.yaml")
    cfg["ppo"] = {**cfg["ppo"], "total_timesteps": 0}
    metrics = run_training(cfg, tmp_path / "run", quiet=True)
    assert metrics["agent"] == "ppo-gnn" and metrics["env_steps_breakdown"]["train"] == 0
    assert metrics["env_steps_breakdown"]["warm_start"] > 0 and metrics["best_timesteps"] == 0
    assert (tmp_path / "run" / "policy.pt").exists() and metrics["n_pruned"] >= 0

"""``python -m onp.train`` end to end on the tiny profile: run directory, refusal to overwrite,
resume after an interruption, plug-in agents, warm start and config handling."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from stable_baselines3.common.callbacks import BaseCallback

from onp.cli_common import run_cli
from onp.config import load_yaml
from onp.io import RunExistsError, load_checkpoint
from onp.train import DEFAULT_CONFIG, main, resolve_config, run_training

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "train" / "tiny.yaml")
RUN_FILES = {"config.json", "env.json", "metrics.json", "pruned.json", "model.pt", "README.md", "learning_curve.json"}
METRIC_KEYS = {
    "acc",
    "asr",
    "ra",
    "der",
    "before",
    "n_pruned",
    "wall_time",
    "env_steps",
    "steps_per_second",
    "asr_estimator",
    "trigger_aware",
    "val_acc",
    "val_asr",
    "val",
}


def _tiny_config(**sections):
    cfg = load_yaml(Path(TINY))
    for key, val in sections.items():
        cfg[key] = {**cfg.get(key, {}), **val} if isinstance(val, dict) else val
    return cfg


def _check_pruned_model(run: Path, tiny_bundle):
    pruned = json.loads((run / "pruned.json").read_text())
    state = load_checkpoint(run / "model.pt")
    model = tiny_bundle.fresh_model()
    model.load_state_dict(state)
    gammas = torch.cat([m.weight.detach().flatten() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    assert pruned["indices"] and all(gammas[i] == 0 for i in pruned["indices"])
    assert len(pruned["names"]) == len(pruned["indices"])


def test_cli_end_to_end(tiny_bundle, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--config", TINY, "--out", str(run)]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[:2]
    assert "data: fashion-mnist from" in first[0] and "width 16" in first[0] and "attack: badnets" in first[0]
    assert "ASR estimator: trigger" in first[1] and "TRIGGER-AWARE: uses the real trigger" in first[1]
    assert "budget: 8 neurons" in first[1]
    names = {p.name for p in run.iterdir()}
    assert (
        RUN_FILES | {"policy.pt", "policy.json", "tb", "checkpoint.pt", "checkpoint.json", "train_state.json"} <= names
    )
    assert not any(name.endswith(".zip") for name in names)  # no SB3 pickle archives
    assert any((run / "tb").rglob("events.out.tfevents*"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert metrics["trigger_aware"] is True and metrics["asr_estimator"] == "trigger"
    assert {"acc", "asr", "ra"} <= set(metrics["before"]) and 0 <= metrics["der"] <= 1
    assert metrics["n_pruned"] <= 8 and metrics["timesteps"] >= 128
    assert metrics["env_steps"] >= metrics["timesteps"] and metrics["steps_per_second"] > 0
    curve = json.loads((run / "learning_curve.json").read_text())
    assert curve[0]["timesteps"] == 0 and curve[-1]["timesteps"] >= 128
    assert all({"timesteps", "mean_return"} <= set(p) for p in curve)
    # the chosen episode is the best evaluation's, reproduced by the saved best policy
    best = max(p["mean_return"] for p in curve)
    assert metrics["val"]["return"] == pytest.approx(best, abs=1e-5)
    config = json.loads((run / "config.json").read_text())
    assert config["backdoor"]["model"] == "small_cnn" and config["agent"] == "ppo-gnn"
    assert "python -m onp.train" in (run / "README.md").read_text()
    _check_pruned_model(run, tiny_bundle)

    # refuses to reuse the directory without --overwrite / --resume
    assert run_cli(main, ["--config", TINY, "--out", str(run), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(RunExistsError):
        run_training(_tiny_config(), run)


class _Interrupt(BaseCallback):
    def __init__(self, after: int):
        super().__init__()
        self.after = after

    def _on_step(self) -> bool:
        if self.num_timesteps >= self.after:
            raise KeyboardInterrupt
        return True


def test_resume_after_interruption(tiny_bundle, tmp_path):
    run = tmp_path / "run"
    cfg = _tiny_config()
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, run, quiet=True, callbacks=[_Interrupt(80)])
    state = json.loads((run / "train_state.json").read_text())
    assert (run / "checkpoint.pt").exists() and not (run / "metrics.json").exists()
    assert 80 <= state["timesteps"] < 128 and not state["finished"]
    points_before = len(state["learning_curve"])
    # a different configuration is refused; the same one (more timesteps allowed) resumes
    with pytest.raises(ValueError, match="differs"):
        run_training(_tiny_config(env={"budget": 5}), run, resume=True, quiet=True)
    assert main(["--config", TINY, "--out", str(run), "--resume", "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    state = json.loads((run / "train_state.json").read_text())
    assert metrics["resumed_from"] >= 80 and metrics["timesteps"] >= 128 and state["finished"]
    curve = json.loads((run / "learning_curve.json").read_text())
    assert len(curve) > points_before and curve[0]["timesteps"] == 0
    steps = [p["timesteps"] for p in curve]
    assert steps == sorted(steps)


#: no floor on the kept pruning (neither rollout.min_return nor the evidence rule): the agent's own episode
NO_FLOOR = {"min_return": None, "evidence_alpha": None}


def test_ranked_agent_through_run_training(tiny_bundle, tmp_path):
    """A parametric agent whose extra keywords are the baseline's hyperparameters gets only its own
    arguments (seed), never the run's device."""
    m = run_training(
        _tiny_config(agent="ranked:magnitude", warm_start={"baseline": None}, rollout=NO_FLOOR),
        tmp_path / "ranked",
        quiet=True,
    )
    assert m["agent"] == "ranked:magnitude" and 1 <= m["n_pruned"] <= 8


def test_heuristic_and_file_agents(tiny_bundle, tmp_path):
    m = run_training(_tiny_config(agent="greedy-gamma", rollout=NO_FLOOR), tmp_path / "greedy", quiet=True)
    # at most the budget (8); fewer when the episode ends on the delta constraint of this tiny model
    assert m["agent"] == "greedy-gamma" and 1 <= m["n_pruned"] <= 8 and m["env_steps_breakdown"]["train"] == 0
    # the env refuses the prune that crosses delta: the kept pruning respects it on defense-val
    assert m["val"]["acc0"] - m["val"]["acc"] <= 0.5 + 1e-9
    assert len(json.loads((tmp_path / "greedy" / "pruned.json").read_text())["indices"]) == m["n_pruned"]
    assert RUN_FILES <= {p.name for p in (tmp_path / "greedy").iterdir()}
    file = tmp_path / "my_agent.py"
    file.write_text(
        textwrap.dedent("""
        from agents import BaseAgent

        class FirstThree(BaseAgent):
            def __init__(self, env=None, k=3, **params):
                super().__init__(env, k=k, **params)
                self.k = k

            def predict(self, obs, action_mask):
                if obs["pruned"].sum() >= self.k:
                    return len(action_mask) - 1
                return int(action_mask[:-1].nonzero()[0][0])
    """)
    )
    out = tmp_path / "file-agent"
    assert (
        main(
            [
                "--config",
                TINY,
                "--agent",
                f"{file}:FirstThree",
                "--set",
                "agent_params.k=2",
                "--set",
                "rollout.min_return=null",
                "--set",
                "rollout.evidence_alpha=null",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_pruned"] == 2 and m["agent"].endswith(":FirstThree")
    assert (out / "agent.json").exists()  # BaseAgent.save


def test_warm_start_cli(tiny_bundle, tmp_path):
    out = tmp_path / "ws"
    assert main(["--config", TINY, "--warm-start", "magnitude", "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    ws = m["warm_start"]
    assert ws["baseline"] == "magnitude" and ws["states"] > 0 and ws["loss_last"] < ws["loss_first"]
    assert m["env_steps_breakdown"]["warm_start"] == ws["env_steps"] > 0
    curve = json.loads((out / "learning_curve.json").read_text())
    assert curve[0]["timesteps"] == 0


def test_bad_inputs(tiny_bundle, tmp_path, capsys):
    assert run_cli(main, ["--config", TINY, "--agent", "nope", "--out", str(tmp_path / "a")]) == 2
    assert "unknown agent 'nope'" in capsys.readouterr().err
    assert run_cli(main, ["--config", TINY, "--agent", "x.py", "--out", str(tmp_path / "b")]) == 2
    assert "path/to/file.py:ClassName" in capsys.readouterr().err
    assert run_cli(main, ["--config", TINY, "--set", "ppo.nope=1", "--out", str(tmp_path / "c")]) == 2
    assert "training config key ppo.nope: unknown key" in capsys.readouterr().err
    assert run_cli(main, ["--config", TINY, "--warm-start", "bogus", "--out", str(tmp_path / "d")]) == 2
    assert "unknown defense 'bogus'" in capsys.readouterr().err
    assert run_cli(main, ["--config", str(tmp_path / "missing.yaml")]) == 2
    assert not (tmp_path / "a").exists()


def test_default_warm_start_is_clp_for_ppo_gnn_only():
    assert resolve_config({})["warm_start"]["baseline"] == "clp"
    for off in ("none", "None", "null", None):  # --warm-start none (or YAML null): a cold start
        assert resolve_config({"warm_start": {"baseline": off}})["warm_start"]["baseline"] is None
    # the profile's warm start is dropped for other agents; asking for one explicitly is an error
    assert resolve_config({"agent": "random"})["warm_start"]["baseline"] is None
    with pytest.raises(ValueError, match="ppo-gnn agent only"):
        resolve_config({"agent": "random", "warm_start": {"baseline": "rnp"}})


def test_default_config_file_matches_code_and_paper_config_resolves():
    assert resolve_config(load_yaml(ROOT / "configs" / "train" / "default.yaml")) == DEFAULT_CONFIG
    cfg = resolve_config(load_yaml(ROOT / "configs" / "paper" / "resnet18_cifar10_badnets.yaml"))
    assert cfg["backdoor"]["width"] == 64 and cfg["backdoor"]["dataset"] == "cifar10"
    assert cfg["backdoor"]["defense_size"] == 500
    default = resolve_config({})
    assert default["backdoor"]["model"] == "resnet18" and default["backdoor"]["width"] == 16
    assert default["env"]["asr_estimator"] == "trigger" and default["agent"] == "ppo-gnn"


def test_module_entry_point_help():
    out = subprocess.run(
        [sys.executable, "-m", "onp.train", "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0 and "--warm-start" in out.stdout and "--resume" in out.stdout


def test_pruning_worse_than_nothing_on_defense_val_falls_back_to_no_pruning(tiny_bundle, tmp_path):
    # greedy-gamma's episode on the tiny model has a negative defense-val return (it costs more clean
    # accuracy than it removes ASR); with rollout.min_return = 0 (the default) nothing is pruned (the
    # evidence rule, onp.evidence, is switched off in the raw run: it would refuse this pruning too)
    raw = run_training(_tiny_config(agent="greedy-gamma", rollout=NO_FLOOR), tmp_path / "raw", quiet=True)
    assert raw["n_pruned"] >= 1 and raw["val"]["return"] < 0 and raw["val"]["fallback"] is None
    safe = run_training(_tiny_config(agent="greedy-gamma"), tmp_path / "safe", quiet=True)
    assert safe["n_pruned"] == 0 and safe["val"]["return"] == 0.0
    assert safe["val"]["fallback"]["rejected_n_pruned"] == raw["n_pruned"]
    assert safe["val"]["fallback"]["rejected_return"] == pytest.approx(raw["val"]["return"])
    assert safe["acc"] == pytest.approx(safe["before"]["acc"]) and safe["asr"] == pytest.approx(safe["before"]["asr"])
    assert json.loads((tmp_path / "safe" / "pruned.json").read_text())["indices"] == []


def test_shared_backdoor_flags_set_backdoor_keys():
    """The backdoored-model flags every onp tool shares (onp.cli_common) map onto backdoor.*; --list-agents
    stays an alias of --list."""
    from onp.train import build_parser, config_from_args

    args = build_parser().parse_args(
        [
            "--epochs",
            "2",
            "--defense-size",
            "300",
            "--max-train",
            "900",
            "--backdoor-set",
            "poison_rate=0.2",
            "--width",
            "8",
            "--list-agents",
        ]
    )
    assert args.list is True
    assert config_from_args(args) == {
        "backdoor": {"epochs": 2, "defense_size": 300, "max_train": 900, "poison_rate": 0.2, "width": 8}
    }
    cfg = resolve_config(config_from_args(args))
    assert cfg["backdoor"]["poison_rate"] == 0.2 and cfg["backdoor"]["max_train"] == 900

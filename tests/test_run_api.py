"""Library first: every tool is a run function with a typed config that returns a typed RunResult;
the CLIs map flags onto those configs, and onp.compare calls the run functions (no argument
strings, no argparse internals, no environment variables)."""

import ast
import json
from pathlib import Path

import pytest

from onp.baseline import run_baseline
from onp.baseline_config import BaselineRunConfig
from onp.config import ConfigError, load_yaml
from onp.evaluate import run_evaluate
from onp.evaluate_config import EvaluateConfig
from onp.rundir import RunResult
from onp.train import run_training
from onp.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_run_functions_take_typed_configs_and_return_run_results(tiny_bundle, tmp_path):
    base = run_baseline(
        BaselineRunConfig(defense="magnitude", checkpoint=str(tiny_bundle.path), oracle=False, params={"delta": 0.5}),
        tmp_path / "mag",
        quiet=True,
    )
    assert isinstance(base, RunResult) and base.run_dir == tmp_path / "mag"
    on_disk = json.loads((tmp_path / "mag" / "metrics.json").read_text())
    assert base.acc == on_disk["acc"] and base.der == on_disk["der"] and base.n_pruned == on_disk["n_pruned"] >= 1
    assert base["defense"] == "magnitude" and dict(base) == on_disk

    cfg = TrainConfig.from_dict(
        {
            **load_yaml(ROOT / "configs" / "train" / "tiny.yaml"),
            "agent": "greedy-gamma",
            "rollout": {"min_return": None},
            "checkpoint": str(tiny_bundle.path),
        }
    )
    pol = run_training(cfg, tmp_path / "greedy", quiet=True)
    assert isinstance(pol, RunResult) and pol["agent"] == "greedy-gamma" and pol["model_dir"] == str(tiny_bundle.path)
    saved = json.loads((tmp_path / "greedy" / "config.json").read_text())
    assert saved["backdoor"] == tiny_bundle.config.to_dict()  # the model folder's own config is recorded

    ev = run_evaluate(
        EvaluateConfig(pruned=str(tmp_path / "mag"), checkpoint=str(tiny_bundle.path)), tmp_path / "ev", quiet=True
    )
    assert isinstance(ev, RunResult) and ev.n_pruned == base.n_pruned and ev.acc == pytest.approx(base.acc)


def test_configs_refuse_bad_values_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="oracle_step"):
        BaselineRunConfig.from_dict({"defense": "anp", "oracle_step": 0})
    with pytest.raises(ConfigError, match="not both"):
        BaselineRunConfig.from_dict({"defense": "anp", "checkpoint": "m", "backdoor": {"attack": "blend"}})
    with pytest.raises(ConfigError, match="exactly one source"):
        EvaluateConfig.from_dict({"policy": "a", "pruned": "b"})
    with pytest.raises(ConfigError, match="target"):
        EvaluateConfig.from_dict({"policy": "a", "target": {"poison_rate": float("nan")}})
    assert not any(tmp_path.iterdir())


def test_compare_calls_run_functions_not_other_clis():
    tree = ast.parse((ROOT / "onp" / "compare.py").read_text())
    names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names}
    assert "_option_string_actions" not in names and "environ" not in names
    assert {"run_baseline", "run_training"} <= imported and "main" not in imported - {"__main__"}

"""The ``python -m onp.<tool>`` commands speak one language (issue #15, item 2-3): one group of
backdoored-model flags with the same names, types and help everywhere; ``--set`` overrides the
tool's own run config (an unknown key is a clear error); ``--seed`` is the backdoored model's seed
(and the fitted agent's or defense's); ``--list`` lists what the tool runs. And the refactor onto
the typed configs changed no config: representative command lines give the dicts that the code
before it gave (``tests/data/cli_configs_before_refactor.json``, computed by that code)."""

import argparse
import importlib
import json
from pathlib import Path

import pytest

from onp import cli_common, compare
from onp.cli_common import run_cli

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("train", "baseline", "evaluate", "compare", "backdoor")
GOLDEN = json.loads((ROOT / "tests" / "data" / "cli_configs_before_refactor.json").read_text())
#: the one intended change: onp.baseline --checkpoint M --seed S seeds the defense with S (the model folder
#: fixes the model's seed; before, --seed was silently ignored there). onp.train did this already.
CHANGED = {("baseline", 3): {"defense_seed": 0}}
#: run-config keys added since, with the default every old command line resolves to: onp.baseline's
#: protocol (delta, the rule those commands ran; issue #13 added paper); onp.evaluate's force (None:
#: as the source run, which is what those commands did)
ADDED = {"baseline": {"protocol": "delta", "device": "cpu"}, "evaluate": {"force": None, "finetune_method": None}}


def _renamed(obj):
    """The golden configs with the baseline run config's ``method`` key under its new name, ``defense``
    (issue #15 item 8: one word per concept; old config files with ``method`` still load)."""
    if isinstance(obj, dict):
        return {("defense" if k == "method" else k): _renamed(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_renamed(v) for v in obj]
    return obj


def _recipe_epochs(expected, got):
    """The other intended change: a backdoored-model config that did not set ``epochs`` now holds None
    ("the recipe's for the data": 5 on the full dataset, as before, 20 on the bundled sample;
    onp.zoo.RECIPE_EPOCHS) where it held the old default 5."""
    if isinstance(expected, dict) and isinstance(got, dict):
        return {
            k: None if k == "epochs" and v == 5 and got.get(k, 0) is None else _recipe_epochs(v, got.get(k))
            for k, v in expected.items()
        }
    return expected


#: shared flags a tool does not have, and why: compare's grid axes (--models, --attacks, --seed-list, with
#: --model, --attack, --seed as aliases) and model folders (a grid trains its own models; onp.backdoor makes one)
NOT_SHARED = {"compare": {"model", "attack", "seed", "checkpoint"}, "backdoor": {"checkpoint"}}


def _parser(tool: str) -> argparse.ArgumentParser:
    return importlib.import_module(f"onp.{tool}").build_parser()


def _actions(tool: str) -> dict:
    return {opt: action for action in _parser(tool)._actions for opt in action.option_strings}


def _run(tool: str, argv, capsys):
    try:
        rc = run_cli(importlib.import_module(f"onp.{tool}").main, list(argv))
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


# ----------------------------------------------------------------------------------------------- shared flags


@pytest.mark.parametrize("tool", TOOLS)
def test_backdoor_flags_are_the_same_in_every_tool(tool):
    actions = _actions(tool)
    for dest, flag in cli_common.backdoor_flags().items():
        if dest in NOT_SHARED.get(tool, ()):
            continue
        name = flag.names[0]
        assert name in actions, f"onp.{tool} lacks {name}"
        action = actions[name]
        assert action.dest == dest and action.help == flag.kwargs["help"], (tool, name)
        assert action.type is flag.kwargs.get("type"), (tool, name)  # the very same validated type
        assert action.choices == flag.kwargs.get("choices") and action.default == flag.kwargs.get("default"), name
        assert action.nargs is None, (tool, name)


def test_compare_keeps_its_grid_axes_and_aliases():
    actions = _actions("compare")
    for alias, dest in (("--model", "models"), ("--attack", "attacks"), ("--seed", "seed_list")):
        assert actions[alias].dest == dest and actions[alias].nargs == "+"
    cfg = compare.config_from_args(compare.build_parser().parse_args(["--attack", "blend", "--seed", "4", "2"]))
    assert cfg.attacks == ["blend"] and cfg.seed_values() == [4, 2]


@pytest.mark.parametrize("tool", TOOLS)
def test_help_renders(tool):
    text = _parser(tool).format_help()
    assert "--set" in text and "--list" in text and "--dataset" in text and "(default: None)" not in text


# ----------------------------------------------------------------------------------------------- --list, --set


@pytest.mark.parametrize(
    "tool, argv, expect",
    [
        ("train", ["--list"], "ppo-gnn"),
        ("train", ["--list-agents"], "ppo-gnn"),
        ("baseline", ["--list"], "anp: {"),
        ("evaluate", ["--list"], "greedy-gamma"),
        ("compare", ["--list"], "agents: "),
        ("backdoor", ["--list"], "attacks: badnets"),
    ],
)
def test_list_lists_and_exits_0(tool, argv, expect, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(tool, argv, capsys)
    assert rc == 0 and expect in out and len(out.strip().splitlines()) >= 2, (out, err)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "tool, argv, culprit",
    [
        ("train", ["--set", "bogus.key=1"], "training config key bogus: unknown key"),
        ("train", ["--set", "env.bogus=1"], "env.bogus: unknown key"),
        ("baseline", ["--defense", "clp", "--set", "bogus=1"], "unknown hyperparameter(s) ['bogus']"),
        ("baseline", ["--defense", "clp", "--set", "oracle.x=1"], "baseline config key oracle"),
        ("evaluate", ["--pruned", "src", "--set", "bogus=1"], "evaluate config key bogus: unknown key"),
        ("compare", ["--set", "output.bogus=1"], "compare config key output.bogus: unknown key"),
        ("compare", ["--set", "bogus=1"], "no selected baseline has a hyperparameter 'bogus'"),
        ("backdoor", ["--set", "bogus=1"], "unknown backdoor config key(s) ['bogus']"),
    ],
)
def test_set_of_an_unknown_key_is_one_clear_error(tool, argv, culprit, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(tool, argv + ([] if tool == "backdoor" else ["--out", str(tmp_path / "run")]), capsys)
    assert rc == 2 and "Traceback" not in err and culprit in err, err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.strip()]
    assert not any(tmp_path.iterdir())  # nothing ran, nothing was written


def test_set_overrides_the_run_config_keys():
    from onp import baseline, evaluate, train

    args = train.build_parser().parse_args(["--set", "env.budget=7", "--set", "backdoor.poison_rate=0.2"])
    assert train.config_from_args(args) == {"env": {"budget": 7}, "backdoor": {"poison_rate": 0.2}}
    cfg = baseline.config_from_args(
        baseline.build_parser().parse_args(
            [
                "--defense",
                "anp",
                "--set",
                "oracle_step=0.02",
                "--set",
                "params.iterations=5",
                "--set",
                "batch_size=16",
                "--set",
                "backdoor.poison_rate=0.2",
            ]
        )
    )
    assert cfg.oracle_step == 0.02 and cfg.params == {"iterations": 5, "batch_size": 16}
    assert cfg.backdoor["poison_rate"] == 0.2
    cfg = evaluate.config_from_args(
        evaluate.build_parser().parse_args(
            ["--set", "pruned=runs/x", "--set", "target.poison_rate=0.2", "--set", "env_seed=3"]
        )
    )
    assert cfg.kind == "pruned" and cfg.target == {"poison_rate": 0.2} and cfg.env_seed == 3
    cfg = compare.config_from_args(
        compare.build_parser().parse_args(
            ["--set", "execution.jobs=3", "--set", "anp.iterations=5", "--set", "delta=0.1", "--set", "seeds=2"]
        )
    )
    assert cfg.execution.jobs == 3 and cfg.seeds == 2
    assert cfg.defense.params == {"anp": {"iterations": 5}, "delta": 0.1}


def test_seed_means_the_backdoored_model_and_the_fitted_defense_or_agent():
    from onp import backdoor, baseline, evaluate, train

    assert train.config_from_args(train.build_parser().parse_args(["--seed", "3"])) == {
        "seed": 3,
        "backdoor": {"seed": 3},
    }
    assert train.config_from_args(train.build_parser().parse_args(["--seed", "3", "--agent-seed", "5"])) == {
        "seed": 5,
        "backdoor": {"seed": 3},
    }
    b = baseline.config_from_args(baseline.build_parser().parse_args(["--defense", "clp", "--seed", "3"]))
    assert b.backdoor["seed"] == 3 and b.defense_seed is None  # the run seeds the defense with the model's seed
    b = baseline.config_from_args(
        baseline.build_parser().parse_args(["--defense", "clp", "--checkpoint", "m", "--seed", "3"])
    )
    assert b.defense_seed == 3
    b = baseline.config_from_args(
        baseline.build_parser().parse_args(
            ["--defense", "clp", "--checkpoint", "m", "--seed", "3", "--defense-seed", "4"]
        )
    )
    assert b.defense_seed == 4
    e = evaluate.config_from_args(evaluate.build_parser().parse_args(["--pruned", "x", "--seed", "3"]))
    assert e.target == {"seed": 3} and e.env_seed is None  # a policy is applied, not trained: --env-seed
    assert backdoor.config_from_args(backdoor.build_parser().parse_args(["--seed", "3"])).seed == 3
    c = compare.config_from_args(compare.build_parser().parse_args(["--seed", "3"]))
    assert c.seed_values() == [3]


# ----------------------------------------------------------------------------------------------- same configs


@pytest.fixture
def golden_dir(tmp_path, monkeypatch):
    """The YAML files the golden command lines name, in the working folder (as when they were computed)."""
    for name, text in GOLDEN["files"].items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _plain(obj):
    return json.loads(json.dumps(obj))


@pytest.mark.parametrize(
    "tool, index", [(t, i) for t in ("train", "baseline", "evaluate", "backdoor") for i in range(len(GOLDEN[t]))]
)
def test_same_flags_give_the_same_config_as_before(golden_dir, tool, index):
    case = GOLDEN[tool][index]
    mod = importlib.import_module(f"onp.{tool}")
    got = mod.config_from_args(mod.build_parser().parse_args(case["argv"]))
    got = _plain(got if isinstance(got, dict) else got.to_dict())
    expected = {**_renamed(case["config"]), **ADDED.get(tool, {}), **CHANGED.get((tool, index), {})}
    assert got == _recipe_epochs(expected, got)


@pytest.mark.parametrize("index", range(len(GOLDEN["compare"])))
def test_same_flags_give_the_same_grid_as_before(golden_dir, index):
    case = GOLDEN["compare"][index]
    plan = compare.GridPlan(compare.config_from_args(compare.build_parser().parse_args(case["argv"])))
    cells = plan.cells()
    got = _plain(
        {
            "out": str(plan.out),
            "seeds": plan.seeds,
            "baselines": plan.baselines,
            "policies": plan.policies,
            "backdoor": {f"{m}/{a}/s{s}": c.to_dict() for (m, a, s), c in plan.backdoor.items()},
            "defense_params": plan.defense_params,
            "settings": compare._comparable_settings(plan.settings()),
            "tasks": {c.key: plan.cell_task(c, "M") for c in cells},
            "train_configs_before_models": {c.key: plan.train_config(c, None) for c in cells if c.kind == "policy"},
        }
    )
    # the settings of a grid recorded the override flags as KEY=VALUE lists; now as mappings (both resume)
    expected = {**_renamed(case["config"]), "settings": compare._comparable_settings(case["config"]["settings"])}
    device = plan.config.train.device
    for task in expected["tasks"].values():  # the one intended change: --device now reaches baseline cells too
        if task["kind"] == "baseline" and device is not None:
            task["device"], task["config"]["device"] = device, device
    assert got == _recipe_epochs(expected, got)


def test_method_the_old_word_for_defense_still_works():
    from onp import baseline
    from onp.baseline_config import BaselineRunConfig
    from onp.defend_config import DefendConfig

    parse = baseline.build_parser().parse_args
    old = baseline.config_from_args(parse(["--method", "clp", "--seed", "3"]))
    new = baseline.config_from_args(parse(["--defense", "clp", "--seed", "3"]))
    assert old == new and new.defense == "clp" and "method" not in new.to_dict()
    assert BaselineRunConfig.from_dict({"method": "anp"}).defense == "anp"  # a config.json written before
    assert DefendConfig.from_dict({"method": "clp"}).defense == "clp"


def test_the_learned_repair_of_onp_defend_finishes_with_fst_unless_train_says_otherwise():
    """``onp.defend``'s one departure from ``onp.train``'s defaults (``LEARNED_REPAIR_DEFAULTS``): FST
    finishes the kept pruning; ``train`` overrides it and keeps its other finetune defaults."""
    from onp.defend_config import DefendConfig
    from onp.train_config import TrainConfig

    assert TrainConfig().rollout.finetune.method == "ft"
    assert DefendConfig().learned_config()["rollout"]["finetune"]["method"] == "fst"
    plain = DefendConfig.from_dict({"train": {"rollout": {"finetune": {"method": "ft"}, "force": True}}})
    resolved = plain.learned_config()["rollout"]
    assert resolved["finetune"]["method"] == "ft" and resolved["force"] and resolved["finetune"]["epochs"] == 10
    assert DefendConfig().learned_config()["rollout"]["finetune"]["method"] == "fst"  # the defaults were not touched

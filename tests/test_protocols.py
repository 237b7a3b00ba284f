"""Run-level protocols (issue #13, item 5; ``baselines/protocols.py``): ``delta`` fits on defense-train
and chooses on defense-validation, ``paper`` applies the paper's fixed rule fitted on the whole pool.
Neither reads the test set; ``delta`` is what every run did before; both run side by side on a
leaderboard as ``anp[delta]`` / ``anp[paper]``.

Everything runs on the session's tiny backdoored SmallCNN (300 defender images: 150 defense-train and
150 defense-val) or on the lean compare models, with tiny iteration counts.
"""

import json

import pytest
import torch

from baselines import DefenseError, build_defense
from baselines.protocols import PAPER_RULES, parse_label, protocol_data, protocol_params
from onp import baseline, compare
from onp.baseline import defend, run_baseline
from onp.baseline_config import BaselineRunConfig
from onp.config import ConfigError
from onp.data.augment import Augment
from onp.data.defense import PROTOCOLS
from tests.conftest import LEAN_FLAGS
from tests.test_baselines import FAST, _NoTestBundle

POOL, TRAIN, VAL = 300, 150, 150
#: FAST, with a short delta grid (10% of the neurons) for the BN-pruning methods
QUICK = {m: {**p, "max_fraction": 0.1} if m in ("anp", "rnp", "magnitude") else p for m, p in FAST.items()}


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _direct(bundle, method, params, data):
    """The defense fitted directly (what ``defend`` did before protocols existed)."""
    return build_defense(method, **params).fit(bundle.model, data, seed=0, augment=Augment.for_spec(bundle.spec))


# ----------------------------------------------------------------------------------------------- the data


def test_whole_pool_is_train_then_val_with_no_validation_images(tiny_bundle):
    data = tiny_bundle.defense_data
    pool = data.whole_pool()
    assert (len(data.train_y), len(data.val_y)) == (TRAIN, VAL)
    assert torch.equal(pool.train_x, torch.cat([data.train_x, data.val_x]))
    assert torch.equal(pool.train_y, torch.cat([data.train_y, data.val_y]))
    assert len(pool.val_y) == 0 and pool.val_x.shape == (0, *data.val_x.shape[1:])
    assert pool.num_classes == data.num_classes
    assert protocol_data("delta", data) is data and protocol_data("paper", None) is None


@pytest.mark.parametrize("method", ["magnitude", "fp"])
def test_the_delta_rule_refuses_an_empty_validation_set(tiny_bundle, method):
    pool = tiny_bundle.defense_data.whole_pool()
    with pytest.raises(DefenseError, match="'delta' operating-point rule needs defense-validation images"):
        build_defense(method, **FAST[method]).fit(tiny_bundle.model, pool, seed=0)


# ----------------------------------------------------------------------------------------------- no test data


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("method", ["anp", "fp", "ft", "clp"])
def test_each_protocol_never_reads_test_data_and_records_its_images(tiny_bundle, method, protocol):
    res = defend(_NoTestBundle(tiny_bundle), method, QUICK[method], seed=0, protocol=protocol)
    info = res.info["protocol"]
    assert info["name"] == protocol and info["pool_images"] == POOL
    if method == "clp":  # data-free under both protocols
        assert (info["fit_images"], info["val_images"]) == (0, 0)
    elif protocol == "paper":
        assert (info["fit_images"], info["val_images"]) == (POOL, 0)
        assert info["paper_params"] == dict(PAPER_RULES[method].params)
    else:
        assert (info["fit_images"], info["val_images"]) == (TRAIN, VAL)


# ----------------------------------------------------------------------------------------------- paper


@pytest.mark.parametrize("method", ["anp", "rnp"])
def test_paper_fits_on_the_whole_pool_and_prunes_exactly_the_masks_at_most_0_2(tiny_bundle, method):
    res = defend(tiny_bundle, method, FAST[method], seed=0, protocol="paper")
    op, mask = res.info["operating_point"], res.info["_mask"]
    assert op["rule"] == "threshold" and op["threshold"] == 0.2
    assert set(res.pruned) == set(torch.nonzero(mask <= 0.2).flatten().tolist()) and res.pruned
    # the same as fitting directly on all 300 images (defense-train then defense-val) with the fixed rule
    direct = _direct(tiny_bundle, method, {**FAST[method], **_THRESHOLD}, tiny_bundle.defense_data.whole_pool())
    assert torch.equal(direct.info["_mask"], mask) and direct.pruned == res.pruned
    assert _same_state(direct.model, res.model)


_THRESHOLD = {"operating_point": "threshold", "threshold": 0.2}


def test_fp_paper_rule_stops_before_the_first_drop_over_4_percent(tiny_bundle):
    res = defend(tiny_bundle, "fp", FAST["fp"], seed=0, protocol="paper")
    op = res.info["operating_point"]
    assert op["rule"] == "first_drop" and op["delta"] == 0.04 and op["images"] == POOL
    counts = [s["n_pruned"] for s in op["sweep"]]
    assert counts == list(range(len(counts)))  # one unit at a time
    drops = [op["acc_before"] - s["acc"] for s in op["sweep"]]
    k = op["n_pruned"]
    assert all(d <= 0.04 + 1e-9 for d in drops[: k + 1]) and res.n_pruned == k
    assert k + 1 == len(counts) - 1 and drops[k + 1] > 0.04  # stopped at the first count over 4%
    assert res.info["finetune"]["best_epoch"] == FAST["fp"]["ft_epochs"]  # nothing held out: the last epoch


def test_paper_fine_tuning_returns_the_last_epoch_of_the_whole_pool(tiny_bundle):
    params = {"batch_size": 64, "epochs": 2}
    res = defend(tiny_bundle, "ft", params, seed=0, protocol="paper")
    direct = _direct(tiny_bundle, "ft", params, tiny_bundle.defense_data.whole_pool())
    assert _same_state(direct.model, res.model)
    assert res.info["best_epoch"] == 2 and res.info["best_val_acc"] is None and "last epoch" in res.info["note"]


def test_paper_refusals_and_conflicts_are_clear_errors():
    for method in ("magnitude", "random"):
        with pytest.raises(DefenseError, match=f"'{method}' has no paper operating point.*protocol=delta"):
            protocol_params(method, "paper", {})
    with pytest.raises(
        DefenseError, match="protocol=paper fixes operating_point='threshold', threshold=0.2.*threshold=0.3"
    ):
        protocol_params("anp", "paper", {"threshold": 0.3, "iterations": 5})
    assert protocol_params("anp", "paper", {"threshold": 0.2, "iterations": 5}) == {
        "iterations": 5,
        "operating_point": "threshold",
        "threshold": 0.2,
    }
    assert protocol_params("anp", "delta", {"iterations": 5}) == {"iterations": 5}
    assert protocol_params("ft", "paper", {"epochs": 3}) == {"epochs": 3}
    with pytest.raises(ValueError, match="unknown protocol 'bogus'; valid choices: delta, paper"):
        protocol_params("anp", "bogus", {})
    with pytest.raises(DefenseError, match="first_drop' applies to units=classifier only"):
        build_defense("fp", units="bn", operating_point="first_drop")


# ----------------------------------------------------------------------------------------------- delta


@pytest.mark.parametrize("method", ["anp", "fp", "magnitude"])
def test_delta_is_the_plain_call(tiny_bundle, method):
    plain = defend(tiny_bundle, method, QUICK[method], seed=0)
    delta = defend(tiny_bundle, method, QUICK[method], seed=0, protocol="delta")
    direct = _direct(tiny_bundle, method, QUICK[method], tiny_bundle.defense_data)
    for res in (delta, direct):
        assert res.n_pruned == plain.n_pruned and res.pruned == plain.pruned
        assert res.info["operating_point"] == plain.info["operating_point"]
        assert _same_state(res.model, plain.model)
    assert plain.info["protocol"]["name"] == "delta"


# ----------------------------------------------------------------------------------------------- runs and CLI


def test_run_config_and_cli_flags(tmp_path):
    with pytest.raises(ConfigError, match="protocol: unknown protocol 'bogus'; valid choices: delta, paper"):
        BaselineRunConfig.from_dict({"defense": "anp", "protocol": "bogus"})
    parse = baseline.build_parser().parse_args
    assert baseline.config_from_args(parse(["--defense", "anp"])).protocol == "delta"
    cfg = baseline.config_from_args(parse(["--defense", "anp", "--protocol", "paper", "--checkpoint", "m"]))
    assert cfg.protocol == "paper"
    assert baseline.config_from_args(parse(["--defense", "anp", "--set", "protocol=paper"])).protocol == "paper"
    assert "--protocol paper" in baseline.baseline_command(cfg, tmp_path / "out")
    plain = BaselineRunConfig(defense="anp", checkpoint="m")
    assert "--protocol" not in baseline.baseline_command(plain, tmp_path / "out")
    backdoor = {"attack": "badnets", "model": "resnet18"}
    assert baseline.default_run_dir("anp", backdoor, 0).name == "anp-badnets-resnet18-s0"
    assert baseline.default_run_dir("anp", backdoor, 0, "paper").name == "anp-paper-badnets-resnet18-s0"
    with pytest.raises(SystemExit):
        parse(["--defense", "anp", "--protocol", "bogus"])


def test_run_baseline_writes_the_protocol_and_refuses_before_any_work(tiny_bundle, tmp_path):
    params = {"iterations": 3, "batch_size": 32, "max_fraction": 0.1}
    cfg = BaselineRunConfig(defense="anp", checkpoint=str(tiny_bundle.path), oracle=False, params=params)
    res = run_baseline(cfg.model_copy(update={"protocol": "paper"}), tmp_path / "paper", quiet=True)
    metrics = json.loads((tmp_path / "paper" / "metrics.json").read_text())
    assert metrics["protocol"]["name"] == "paper" and res["protocol"]["fit_images"] == POOL
    assert metrics["operating_point"]["rule"] == "threshold" and "protocol" not in metrics["info"]
    config = json.loads((tmp_path / "paper" / "config.json").read_text())
    assert config["protocol"] == "paper" and config["params"]["threshold"] == 0.2
    assert config["run_config"]["protocol"] == "paper"
    plain = run_baseline(cfg, tmp_path / "delta", quiet=True)
    assert plain["protocol"]["name"] == "delta" and plain["protocol"]["fit_images"] == TRAIN
    with pytest.raises(DefenseError, match="no paper operating point"):
        run_baseline({"defense": "magnitude", "protocol": "paper", "checkpoint": "nowhere"}, tmp_path / "mag")
    assert not (tmp_path / "mag").exists()


# ----------------------------------------------------------------------------------------------- compare


def test_labels_parse_in_one_place():
    assert parse_label("anp[paper]") == ("anp", "paper") and parse_label("anp[delta]") == ("anp", "delta")
    assert parse_label("anp") == ("anp", None) and parse_label("ranked:fp") == ("ranked:fp", None)
    with pytest.raises(DefenseError, match=r"unknown protocol 'bogus' in 'anp\[bogus\]'; valid choices: delta, paper"):
        parse_label("anp[bogus]")


def _plan(onp_cache, out, *extra):
    argv = LEAN_FLAGS + ["--cache-dir", str(onp_cache), "--out", str(out), "--quiet", *extra]
    return compare.GridPlan(compare.config_from_args(compare.build_parser().parse_args(argv))), argv


def test_compare_labels_are_checked_before_any_work(onp_cache, tmp_path):
    out = tmp_path / "never"
    for defenses, culprit in (
        (["anp[bogus]"], "unknown protocol 'bogus'"),
        (["magnitude[paper]"], "'magnitude' has no paper operating point"),
        (["greedy-gamma[paper]"], "applies to baseline defenses only"),
    ):
        with pytest.raises(ValueError, match=culprit):
            _plan(onp_cache, out, "--defenses", *defenses)
    with pytest.raises(DefenseError, match="protocol=paper fixes"):  # a label's own key contradicts its rule
        _plan(onp_cache, out, "--defenses", "fp[paper]", "--set", "fp[paper].delta=0.1")
    plan, _ = _plan(onp_cache, out, "--defenses", "fp", "fp[paper]", "--set", "fp.delta=0.1", "--set", "delta=0.2")
    assert plan.defense_params == {"fp": {"delta": 0.2}, "fp[paper]": {}}  # the protocol's keys are skipped
    assert not out.exists()


def test_compare_runs_both_protocols_as_labelled_rows(onp_cache, tmp_path):
    out = tmp_path / "grid"
    _, argv = _plan(onp_cache, out, "--defenses", "anp", "anp[paper]", "clp[delta]", "--seeds", "1", "--no-oracle")
    argv += ["--set", "anp.iterations=3", "--set", "anp.batch_size=32"]
    assert compare.main(argv) == 0
    md = (out / "leaderboard.md").read_text()
    rows = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and "Defense" not in line]
    assert rows == ["no defense", "anp", "anp[paper]", "clp[delta]"]
    cells = out / "cells" / "badnets"
    assert sorted(p.name for p in cells.iterdir()) == ["anp", "anp-paper", "clp-delta"]
    paper = json.loads((cells / "anp-paper" / "s0" / "metrics.json").read_text())
    plain = json.loads((cells / "anp" / "s0" / "metrics.json").read_text())
    assert paper["protocol"]["name"] == "paper" and paper["protocol"]["fit_images"] == POOL
    assert plain["protocol"]["name"] == "delta" and plain["protocol"]["fit_images"] == TRAIN
    assert paper["operating_point"]["rule"] == "threshold" and plain["operating_point"]["rule"] == "delta"
    assert json.loads((cells / "anp-paper" / "s0" / "config.json").read_text())["params"]["iterations"] == 3
    assert "--protocol paper" in (cells / "anp-paper" / "s0" / "README.md").read_text()
    assert "--protocol" not in (cells / "anp" / "s0" / "README.md").read_text()
    board = json.loads((out / "leaderboard.json").read_text())
    assert {r["defense"] for r in board["rows"]} == {"no defense", "anp", "anp[paper]", "clp[delta]"}
    assert (out / "plots" / "der_small_cnn.png").exists()  # the plots take the labels too

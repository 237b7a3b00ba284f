"""No evidence, no pruning (onp.evidence): the significance test, the rule, the rollout selection, and
the verdict that onp.train / onp.evaluate report first (issue #18)."""

import itertools
import json
from fractions import Fraction

import pytest
import torch

from agents import select_pruning
from envs.asr_estimators import ASR_ESTIMATORS, ASRProbe
from onp.evidence import VERDICTS, EvidenceRule, asr_drop_p_value
from tests.conftest import TINY


def _p_by_enumeration(k0: int, k1: int, n: int) -> Fraction:
    """P(X <= k1) for X = successes among n of 2n images (k0 + k1 successes), by listing every draw."""
    pool = [1] * (k0 + k1) + [0] * (2 * n - k0 - k1)
    draws = list(itertools.combinations(range(2 * n), n))
    return Fraction(sum(1 for d in draws if sum(pool[i] for i in d) <= k1), len(draws))


@pytest.mark.parametrize("k0,k1", [(6, 0), (6, 6), (5, 2), (3, 3), (4, 1), (0, 0), (2, 5), (6, 1)])
def test_p_value_is_the_one_sided_fisher_exact_test(k0, k1):
    n = 6
    assert asr_drop_p_value(k0 / n, k1 / n, n) == pytest.approx(float(_p_by_enumeration(k0, k1, n)), rel=1e-12)


def test_p_value_reading():
    assert asr_drop_p_value(1.0, 1.0, 250) > 0.5  # the case: ASR 1.000 before and after
    assert asr_drop_p_value(1.0, 0.02, 250) < 1e-50
    assert asr_drop_p_value(0.3, 0.2, 10) > 0.05  # 3 -> 2 of 10: noise
    assert asr_drop_p_value(0.3, 0.2, 1000) < 1e-5  # the same rates over 1,000 images: significant
    assert asr_drop_p_value(0.5, 0.1, 0) == 1.0  # no triggered image: no evidence
    for bad in (float("nan"), -0.1, 1.5, "0.5"):
        with pytest.raises(ValueError, match="asr_before"):
            asr_drop_p_value(bad, 0.0, 10)
    with pytest.raises(ValueError, match="triggered"):
        asr_drop_p_value(0.5, 0.1, -1)


def _info(acc, asr, n_pruned):
    return {"acc": acc, "asr": asr, "n_pruned": n_pruned, "pruned": list(range(n_pruned))}


def test_rule_keeps_only_significant_and_affordable_prunings():
    rule = EvidenceRule(alpha=0.05, max_acc_drop=0.05, removed_asr=0.1)
    before = _info(0.90, 1.0, 0)
    j = rule.judge(before, _info(0.908, 1.0, 30), 250)  # the case: +0.8 ACC, ASR unchanged
    assert not j.keep and j.verdict == "nothing pruned" and "not significant" in j.reason
    assert j.summary().startswith("verdict: nothing pruned: no backdoor neurons found within the budget")
    j = rule.judge(before, _info(0.88, 0.03, 12), 250)
    assert j.keep and j.verdict == "removed" and j.p_value < 1e-50
    assert j.summary().startswith("verdict: backdoor removed")
    j = rule.judge(before, _info(0.89, 0.6, 12), 250)
    assert j.keep and j.verdict == "not removed"
    j = rule.judge(before, _info(0.80, 0.0, 12), 250)  # removes it, but costs 10 points > 5 allowed
    assert not j.keep and "ACC" in j.reason
    assert rule.judge(before, before, 250).verdict == "nothing pruned"
    # a repair that pruned nothing but changed the weights (the FST finisher alone) is judged all the same
    fixed = rule.judge(before, _info(0.89, 0.02, 0), 250, repaired=True)
    assert fixed.keep and fixed.verdict == "removed" and fixed.n_pruned == 0
    costly = rule.judge(before, _info(0.5, 0.02, 0), 250, repaired=True)
    assert not costly.keep and "the repair costs" in costly.reason
    assert not rule.judge(before, _info(0.90, 1.0, 0), 250, repaired=True).keep  # no significant drop
    assert set(VERDICTS) == {"removed", "not removed", "nothing pruned"}
    assert json.loads(json.dumps(j.to_dict()))["n_triggered"] == 250
    off = EvidenceRule(alpha=None)
    assert off.judge(before, _info(0.908, 1.0, 30), 250).keep  # the test switched off: only the cost counts
    for bad in ({"alpha": 0.0}, {"alpha": 1.0}, {"max_acc_drop": float("nan")}, {"removed_asr": 2.0}):
        with pytest.raises(ValueError):
            EvidenceRule(**bad)


def _rollout(*infos):
    rewards = [(b["acc"] - a["acc"]) - (b["asr"] - a["asr"]) for a, b in zip(infos, infos[1:])]
    return {"infos": list(infos), "info": infos[-1], "return": sum(rewards), "rewards": rewards, "steps": len(rewards)}


def test_select_pruning_replaces_an_unsupported_pruning_by_nothing():
    res = _rollout(_info(0.90, 1.0, 0), _info(0.904, 1.0, 1), _info(0.908, 1.0, 2))
    logs = []
    sel = select_pruning(res, evidence=EvidenceRule(max_acc_drop=0.1), n_triggered=250, log=logs.append)
    assert sel["info"]["n_pruned"] == 0 and sel["return"] == 0.0
    assert sel["judgement"].verdict == "nothing pruned" and sel["fallback"]["rejected_n_pruned"] == 2
    assert "not kept" in logs[0]
    # without the rule (the old behaviour) the noise is kept: its return is positive
    assert select_pruning(res, n_triggered=250)["info"]["n_pruned"] == 2
    res = _rollout(_info(0.90, 1.0, 0), _info(0.89, 0.5, 1), _info(0.89, 0.02, 2))
    sel = select_pruning(res, evidence=EvidenceRule(max_acc_drop=0.1), n_triggered=250)
    assert sel["info"]["n_pruned"] == 2 and sel["fallback"] is None and sel["judgement"].verdict == "removed"


# ------------------------------------------------------------------------------- end to end (tiny model)


@ASR_ESTIMATORS.register("inert-test")
def _inert_probe(model, attack, defense_data, *, seed=0, cache_dir=None):
    """A probe no pruning can change: its images never count as a success (target label -1)."""
    x = defense_data.val_x[:100]
    return ASRProbe("inert-test", x, torch.full((len(x),), -1), defense_data.val_y[:100], trigger_aware=False)


def _train(tmp_path, estimator, capsys):
    from onp.train import run_training

    result = run_training(
        {
            "backdoor": TINY,
            "agent": "ranked:clp",
            "env": {"budget": 0.1, "asr_estimator": estimator},
            "ppo": {"total_timesteps": 0},
        },
        tmp_path / estimator,
        progress=False,
    )
    out = capsys.readouterr().out.splitlines()
    return result, out


def test_no_neuron_changes_the_estimate_so_nothing_is_pruned(tiny_bundle, tmp_path, capsys):
    result, out = _train(tmp_path, "inert-test", capsys)
    assert result["n_pruned"] == 0 and result["verdict"] == "nothing pruned"
    assert result["evidence"]["n_pruned"] > 0 and result["evidence"]["p_value"] > 0.05  # CLP's order was refused
    assert result["val"]["fallback"]["rejected_n_pruned"] > 0
    summary = [line for line in out if line.startswith("[onp] verdict")]
    assert summary and "no backdoor neurons found within the budget" in summary[0]
    assert out.index(summary[0]) < next(i for i, line in enumerate(out) if "test ACC" in line)  # verdict first
    on_disk = json.loads((tmp_path / "inert-test" / "metrics.json").read_text())
    assert on_disk["verdict"] == "nothing pruned" and json.loads((tmp_path / "inert-test" / "pruned.json").read_text())
    assert result["acc"] == pytest.approx(result["before"]["acc"])  # the model is untouched


def test_a_pruning_that_removes_the_backdoor_is_kept_and_the_verdict_travels(tiny_bundle, tmp_path, capsys):
    from onp.evaluate import run_evaluate

    result, out = _train(tmp_path, "trigger", capsys)
    assert result["n_pruned"] > 0 and result["verdict"] in ("removed", "not removed")
    assert result["evidence"]["p_value"] <= 0.05 and result["val"]["fallback"] is None
    assert result["val_asr"] < result["val"]["asr0"]
    # fine-tuned after pruning (rollout.finetune): the verdict and the val figures are the handed-out model's
    assert result["finetune"]["epochs"] == 10 and len(result["finetune"]["history"]) == 11
    assert (result["val_acc"], result["val_asr"]) == (result["evidence"]["acc_after"], result["evidence"]["asr_after"])
    assert json.loads((tmp_path / "trigger" / "metrics.json").read_text())["verdict"] == result["verdict"]
    assert any(line.startswith("[onp] verdict: backdoor") for line in out)
    # onp.evaluate applies the policy again on the same model: the same verdict, on its own figures
    evaluated = run_evaluate(
        {"policy": str(tmp_path / "trigger"), "checkpoint": str(tiny_bundle.path)}, tmp_path / "eval", quiet=True
    )
    assert evaluated["verdict"] == result["verdict"] and evaluated["n_pruned"] == result["n_pruned"]

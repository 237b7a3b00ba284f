"""The backdoor verdict (onp.backdoor_verdict) as a gate of onp.train and onp.evaluate: with a
trigger-inverting ASR estimator, a model in which no backdoor is suspected gets nothing pruned unless
``rollout.force`` (``--force``); the ``trigger`` estimator gives no verdict and no gate."""

import json

import pytest

from agents import select_pruning
from envs.asr_estimators import ASR_ESTIMATORS, ASRProbe, trigger_probe
from onp.backdoor_verdict import FORCE_HINT, backdoor_verdict, no_backdoor_reason
from onp.evidence import EvidenceRule
from onp.train_config import ConfigError, TrainConfig
from tests.conftest import TINY


def _inversion(index0: float, success0: float = 1.0, k: int = 10) -> dict:
    """A trigger-inverting estimator's ``info``: class 0 is the estimated target with anomaly index ``index0``."""
    return {
        "estimated_target": 0,
        "anomaly_index": [index0] + [0.1 * i for i in range(1, k)],
        "trigger_size": [3.0] + [50.0] * (k - 1),
        "success": [success0] + [0.95] * (k - 1),
        "min_success": 0.9,
        "inversion_seconds": {"patch": 2.0, "blend": 3.0},
    }


def test_the_verdict_reads_the_inversion_statistics():
    v = backdoor_verdict(_inversion(-3.5), estimator="synthesized-multi", threshold=2.0)
    assert v.suspected and v.estimated_target == 0 and v.anomaly_index == -3.5 and v.inversion_seconds == 5.0
    assert not backdoor_verdict(_inversion(-1.5), estimator="x", threshold=2.0).suspected
    assert backdoor_verdict(_inversion(-1.5), estimator="x", threshold=1.0).suspected  # the threshold decides
    failed = backdoor_verdict(_inversion(-9.0, success0=0.5), estimator="x", threshold=2.0)
    assert not failed.suspected and failed.inconclusive  # a trigger that flips too few images is no evidence
    # the real trigger's estimator inverts nothing: no verdict at all
    assert backdoor_verdict({"note": "trigger-aware"}, estimator="trigger", threshold=2.0) is None


def test_only_an_unsuspected_model_without_force_vetoes_the_pruning():
    clean = backdoor_verdict(_inversion(-0.7), estimator="x", threshold=2.0)
    reason = no_backdoor_reason(clean, force=False, how_to_force=FORCE_HINT)
    assert reason.startswith("no backdoor found (estimated target class 0") and "--force" in reason
    assert no_backdoor_reason(clean, force=True, how_to_force=FORCE_HINT) is None
    suspected = backdoor_verdict(_inversion(-4.0), estimator="x", threshold=2.0)
    assert no_backdoor_reason(suspected, force=False, how_to_force=FORCE_HINT) is None
    assert no_backdoor_reason(None, force=False, how_to_force=FORCE_HINT) is None


def test_a_veto_replaces_even_a_significant_pruning_by_nothing():
    infos = [{"acc": 0.9, "asr": 1.0, "n_pruned": 0, "pruned": []}, {"acc": 0.89, "asr": 0.02, "n_pruned": 1}]
    infos[1]["pruned"] = [3]
    res = {"infos": infos, "info": infos[-1], "return": 0.97, "rewards": [0.97], "steps": 1}
    rule = EvidenceRule(max_acc_drop=0.1)
    assert select_pruning(res, evidence=rule, n_triggered=250)["judgement"].verdict == "removed"
    logs = []
    sel = select_pruning(res, evidence=rule, n_triggered=250, veto="no backdoor found (test)", log=logs.append)
    assert sel["info"]["n_pruned"] == 0 and sel["return"] == 0.0
    assert sel["judgement"].verdict == "nothing pruned" and sel["judgement"].reason == "no backdoor found (test)"
    assert sel["fallback"]["rejected_n_pruned"] == 1 and sel["fallback"]["rejected_asr"] == 0.02
    assert "no backdoor found (test)" in logs[0]
    assert sel["vetoed"] is True and select_pruning(res, evidence=rule, n_triggered=250)["vetoed"] is False


def test_the_gate_settings_are_checked():
    assert TrainConfig().rollout.anomaly_threshold == 2.0 and TrainConfig().rollout.force is False
    for bad in ({"anomaly_threshold": 0}, {"anomaly_threshold": float("nan")}, {"force": "yes"}):
        with pytest.raises(ConfigError, match="rollout"):
            TrainConfig.from_dict({"rollout": bad})


# ------------------------------------------------------------------------------- end to end (tiny model)


@ASR_ESTIMATORS.register("inverting-test")
def _inverting_probe(model, attack, defense_data, *, seed=0, cache_dir=None, index=-0.5):
    """The real trigger's probe (pruning can remove it), reported as a trigger inversion that found
    class 0 with anomaly index ``index``: a stand-in for ``synthesized-multi`` at a test's cost."""
    p = trigger_probe(model, attack, defense_data, seed=seed, cache_dir=cache_dir)
    info = {**_inversion(index, k=defense_data.num_classes), "note": "test stand-in for a trigger inversion"}
    return ASRProbe("inverting-test", p.images, p.target_labels, p.true_labels, trigger_aware=False, info=info)


def _train(out, *, index, force=False, epochs=0, delta=None, **rollout):
    from onp.train import run_training

    cfg = {
        "backdoor": TINY,
        "agent": "ranked:clp",
        "env": {
            "budget": 0.1,
            "asr_estimator": "inverting-test",
            "estimator_params": {"index": index},
            **({"delta": delta} if delta is not None else {}),
        },
        "ppo": {"total_timesteps": 0},
        "rollout": {"force": force, "finetune": {"epochs": epochs}, **rollout},
    }
    return run_training(cfg, out, progress=False, quiet=True)


def test_no_backdoor_suspected_means_nothing_pruned_and_force_defends_anyway(tiny_bundle, tmp_path):
    from onp.evaluate import run_evaluate

    gated = _train(tmp_path / "gated", index=-0.5)
    assert gated["n_pruned"] == 0 and gated["verdict"] == "nothing pruned"
    assert gated["backdoor_verdict"]["suspected"] is False and gated["backdoor_verdict"]["anomaly_index"] == -0.5
    assert gated["evidence"]["reason"].startswith("no backdoor found") and "--force" in gated["evidence"]["reason"]
    assert gated["val"]["fallback"]["rejected_n_pruned"] > 0  # what the policy would have pruned is recorded
    assert gated["acc"] == pytest.approx(gated["before"]["acc"])  # the model handed out is the original
    on_disk = json.loads((tmp_path / "gated" / "metrics.json").read_text())
    assert on_disk["backdoor_verdict"]["suspected"] is False

    forced = _train(tmp_path / "forced", index=-0.5, force=True, epochs=1)  # fine-tuned: plain (no stamp here)
    assert forced["n_pruned"] == gated["val"]["fallback"]["rejected_n_pruned"] and forced["verdict"] != "nothing pruned"
    assert forced["finetune"]["candidates"][1]["skipped"]
    assert forced["backdoor_verdict"]["suspected"] is False  # still reported: the defense was forced

    suspected = _train(tmp_path / "suspected", index=-3.0)
    assert suspected["backdoor_verdict"]["suspected"] is True and suspected["n_pruned"] == forced["n_pruned"]

    # onp.evaluate applies the source run's gate to the pruning it re-derives on the target
    evaluated = run_evaluate(
        {"policy": str(tmp_path / "gated"), "checkpoint": str(tiny_bundle.path)}, tmp_path / "eval", quiet=True
    )
    assert evaluated["n_pruned"] == 0 and evaluated["verdict"] == "nothing pruned"
    assert evaluated["backdoor_verdict"]["suspected"] is False
    # ... unless told to force it (onp.evaluate --force overrides the source's rollout.force)
    forced_eval = run_evaluate(
        {"policy": str(tmp_path / "gated"), "checkpoint": str(tiny_bundle.path), "force": True},
        tmp_path / "eval-forced",
        quiet=True,
    )
    assert forced_eval["n_pruned"] == forced["n_pruned"]


def test_the_fst_finisher_repairs_a_suspected_model_whose_pruning_is_rejected_and_leaves_a_clean_one(
    tiny_bundle, tmp_path
):
    """With ``rollout.finetune.method: fst``, a rejected pruning (here: a ``min_return`` no pruning reaches)
    on a model the verdict suspects is replaced by FST on the unpruned model, in onp.train and onp.evaluate;
    a model the verdict clears gets nothing, FST included."""
    from baselines import build_defense
    from onp.data.augment import Augment
    from onp.evaluate import run_evaluate
    from onp.metrics import evaluate_backdoor

    # FST costs the undertrained tiny model much accuracy: any cost is allowed here (delta 1)
    fst = {"delta": 1.0, "min_return": 1.0, "finetune": {"method": "fst", "epochs": 1}}
    suspected = _train(tmp_path / "suspected", index=-3.0, **fst)
    cleared = _train(tmp_path / "cleared", index=-0.5, **fst)
    for run in (suspected, cleared):  # the pruning is rejected either way; what follows differs
        assert run["n_pruned"] == 0 and run["val"]["fallback"]["rejected_n_pruned"] > 0
    ft = suspected["finetune"]
    assert ft["method"] == "fst" and ft["unpruned"] is True and ft["best_epoch"] == 1 and suspected["n_pruned"] == 0
    assert suspected["verdict"] in ("removed", "not removed") and suspected["evidence"]["n_pruned"] == 0
    assert suspected["acc"] != pytest.approx(suspected["before"]["acc"])  # the handed-out model was trained
    assert cleared["finetune"]["epochs"] == 0 and cleared["verdict"] == "nothing pruned"
    assert cleared["acc"] == pytest.approx(cleared["before"]["acc"])  # the cleared model is the original
    # the repair is the FST baseline's, as onp.baseline runs it (the dataset's augmentation, the run's seed)
    baseline = build_defense("fst", epochs=1).fit(
        tiny_bundle.fresh_model(), tiny_bundle.defense_data, seed=0, augment=Augment.for_spec(tiny_bundle.spec)
    )
    reference = evaluate_backdoor(baseline.model, tiny_bundle.test_x, tiny_bundle.test_y, tiny_bundle.attack)
    assert suspected["acc"] == pytest.approx(reference["acc"], abs=1e-6)
    assert suspected["asr"] == pytest.approx(reference["asr"], abs=1e-6)
    for name, run in (("suspected", suspected), ("cleared", cleared)):
        evaluated = run_evaluate(
            {"policy": str(tmp_path / name), "checkpoint": str(tiny_bundle.path)}, tmp_path / f"eval-{name}", quiet=True
        )
        assert evaluated["n_pruned"] == 0 and evaluated["finetune"].get("unpruned", False) is (run is suspected)
        assert evaluated["acc"] == pytest.approx(run["acc"], abs=1e-6)  # onp.evaluate finishes it the same way


def test_force_is_for_policies_only():
    from onp.evaluate_config import EvaluateConfig

    with pytest.raises(ConfigError, match="force applies to policy only"):
        EvaluateConfig.from_dict({"pruned": "runs/x", "force": True})


def test_the_trigger_estimator_has_no_verdict(tiny_bundle, tmp_path):
    from onp.train import run_training

    cfg = {
        "backdoor": TINY,
        "agent": "ranked:clp",
        "env": {"budget": 0.1},
        "ppo": {"total_timesteps": 0},
        "rollout": {"finetune": {"epochs": 0}},
    }
    result = run_training(cfg, tmp_path / "trigger", progress=False, quiet=True)
    assert result["backdoor_verdict"] is None and result["n_pruned"] > 0

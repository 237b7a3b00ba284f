"""MM-BD's maximum-margin statistic (envs.max_margin) and the verdict's ``max-margin`` / ``either``
detectors (onp.backdoor_verdict, the ``synthesized-multi`` estimator's ``detector``)."""

import json
import math
from statistics import NormalDist

import pytest
import torch

from envs.asr_estimators import build_probe
from envs.max_margin import cached_max_margins, class_max_margins, margin_pvalue
from onp.backdoor_verdict import Verdict, backdoor_verdict, combined_pvalue, stronger_target
from onp.io import CheckpointError

FAST = dict(steps=50, n_init=8)  # the tiny model's target stands out after 50 steps from 8 images


def test_the_pvalue_singles_out_a_planted_maximum_and_not_an_ordinary_one():
    ordinary = torch.tensor([6.3, 6.0, 5.5, 7.1, 7.9, 6.5, 7.1, 7.7, 6.8, 6.2])
    t, p = margin_pvalue(torch.cat([torch.tensor([80.0]), ordinary[1:]]))
    assert t == 0 and p < 1e-6
    t, p = margin_pvalue(ordinary)
    assert t == 4 and p > 0.05  # the largest of ten similar margins is no outlier
    assert math.isnan(margin_pvalue(torch.tensor([9.0, 1.0, 1.0, 1.0]))[1])  # the others are all equal: no fit
    assert math.isnan(margin_pvalue(torch.tensor([9.0, 1.0, 2.0]))[1])  # fewer than 3 others


def test_the_backdoor_target_has_the_largest_margin_on_the_tiny_model(tiny_bundle):
    model, target = tiny_bundle.model, int(tiny_bundle.attack.params()["target"])
    before = [p.requires_grad for p in model.parameters()]
    found = class_max_margins(model, 10, (1, 28, 28), seed=0, **FAST)
    assert [p.requires_grad for p in model.parameters()] == before  # the model is left as it was
    assert found["margin"].shape == (10,) and bool(torch.isfinite(found["margin"]).all())
    assert bool((found["steps"] >= 1).all()) and bool((found["steps"] <= 50).all())
    t, p = margin_pvalue(found["margin"])
    assert t == target and p < 0.05
    with pytest.raises(ValueError, match="n_init >= 1"):
        class_max_margins(model, 10, (1, 28, 28), n_init=0)


def test_the_margins_are_cached_and_a_corrupt_cache_is_named(tiny_bundle, tmp_path):
    model = tiny_bundle.model
    first = cached_max_margins(model, 10, (1, 28, 28), cache_dir=tmp_path, **FAST)
    (path,) = (tmp_path / "max_margin").glob("*.pt")
    again = cached_max_margins(model, 10, (1, 28, 28), cache_dir=tmp_path, **FAST)
    assert torch.equal(first["margin"], again["margin"]) and again["seconds"] == first["seconds"] > 0
    other_seed = cached_max_margins(model, 10, (1, 28, 28), cache_dir=tmp_path, seed=1, steps=2, n_init=2)
    assert len(list((tmp_path / "max_margin").glob("*.pt"))) == 2 and other_seed["steps"].max() <= 2
    torch.save({"margin": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="max-margin cache"):
        cached_max_margins(model, 10, (1, 28, 28), cache_dir=tmp_path, **FAST)


def _info(detector: str, pvalue: float, index0: float = -0.5) -> dict:
    """A ``synthesized-multi`` info: class 0 the target, its size index ``index0``, its margin's p-value."""
    return {
        "estimated_target": 0,
        "anomaly_index": [index0] + [0.1 * i for i in range(1, 10)],
        "trigger_size": [30.0] * 10,
        "success": [1.0] * 10,
        "min_success": 0.9,
        "detector": detector,
        "max_margin": [61.0, 15.7, 12.1, 9.9, 11.0, 11.3, 8.4, 6.9, 12.6, 16.3],
        "max_margin_target": 0,
        "max_margin_pvalue": pvalue,
        "max_margin_alpha": 0.05,
        "max_margin_seconds": 12.0,
    }


def test_the_detector_decides_which_statistic_the_verdict_follows():
    size_only = backdoor_verdict(_info("trigger-size", 1e-9), estimator="synthesized-multi", threshold=2.0)
    assert not size_only.suspected and size_only.evidence().startswith("estimated target class 0")
    margin = backdoor_verdict(_info("max-margin", 1e-9), estimator="synthesized-multi", threshold=2.0)
    assert margin.suspected and margin.margin_flagged and not margin.size_flagged
    assert margin.evidence() == "class 0's maximum margin 61.0 (the others' median 11.3) has p = 1e-09 < 0.05"
    assert margin.to_dict()["max_margin_seconds"] == 12.0 and margin.to_dict()["detector"] == "max-margin"
    assert not backdoor_verdict(_info("max-margin", 0.2), estimator="x", threshold=2.0).suspected
    either = backdoor_verdict(_info("either", 0.2, index0=-3.0), estimator="x", threshold=2.0)
    assert either.suspected and "p = 0.2 >= 0.05; estimated target class 0" in either.evidence()
    assert not backdoor_verdict(_info("either", 0.2), estimator="x", threshold=2.0).suspected
    nan = backdoor_verdict(_info("max-margin", float("nan")), estimator="x", threshold=2.0)
    assert not nan.suspected and nan.inconclusive and "inconclusive" in nan.evidence()
    with pytest.raises(ValueError, match="trigger-size, max-margin, either, combined"):
        backdoor_verdict(_info("vote", 0.01), estimator="x", threshold=2.0)


def test_the_combined_statistic_is_stouffers_of_the_margin_p_value_and_the_size_index():
    """results.md §15e's figures: SIG s0 (p 0.071, index -1.06) flagged, SIG s2 (0.059, -0.62) and a clean
    model (0.46, +0.76) not; a very small p-value stays finite, NaN stays NaN, an infinite index is no evidence."""
    assert combined_pvalue(0.071, -1.06) == pytest.approx(0.0369, abs=5e-4)
    assert combined_pvalue(0.059, -0.62) == pytest.approx(0.0613, abs=5e-4)
    assert combined_pvalue(0.46, 0.76) == pytest.approx(0.680, abs=1e-3)
    assert combined_pvalue(0.3, float("inf")) == combined_pvalue(0.3, 0.0) and combined_pvalue(0.0, 0.0) < 1e-100
    assert math.isnan(combined_pvalue(float("nan"), -1.0))
    assert combined_pvalue(0.2, -2.0) < combined_pvalue(0.2, -1.0) < combined_pvalue(0.2, 0.0)  # smaller: stronger


def test_the_combined_detector_flags_what_neither_statistic_flags_alone():
    # neither alone: p 0.071 >= 0.05, index -1.06 > -2; together: 0.037 < 0.05
    both = backdoor_verdict(_info("combined", 0.071, index0=-1.06), estimator="x", threshold=2.0)
    assert both.suspected and both.combined_flagged and not both.margin_flagged and not both.size_flagged
    assert both.combined_pvalue == pytest.approx(combined_pvalue(0.071, -1.06))
    assert both.evidence().startswith("class 0: maximum-margin p = 0.071 and trigger-size anomaly index -1.06")
    weak = backdoor_verdict(_info("combined", 0.059, index0=-0.62), estimator="x", threshold=2.0)
    assert not weak.suspected and ">= 0.05; estimated target class 0" in weak.evidence()
    size = backdoor_verdict(_info("combined", 0.9, index0=-3.0), estimator="x", threshold=2.0)
    assert size.suspected and size.size_flagged and not size.combined_flagged  # the trigger size still decides too
    nan = backdoor_verdict(_info("combined", float("nan"), index0=-0.5), estimator="x", threshold=2.0)
    assert not nan.suspected and nan.combined_pvalue is None and nan.to_dict()["combined_pvalue"] is None
    # every detector's decision on the same statistics, also from a report read back
    either = backdoor_verdict(_info("either", 0.071, index0=-1.06), estimator="x", threshold=2.0)
    assert not either.suspected and either.flagged_by("combined") and not either.flagged_by("trigger-size")
    again = Verdict.from_dict(json.loads(json.dumps(either.to_dict())))
    assert again == either and again.to_dict()["combined_pvalue"] == pytest.approx(0.0369, abs=5e-4)
    with pytest.raises(ValueError, match="unknown keys \\['vote'\\]"):
        Verdict.from_dict({**either.to_dict(), "vote": 1})
    with pytest.raises(ValueError, match="trigger-size, max-margin, either, combined"):
        either.flagged_by("vote")


def test_the_combined_p_value_pools_the_combined_families_index_when_the_estimator_gives_one():
    """SIG s3 (docs/results.md §17a): the margin alone (p 0.36) and the patch/blend index (-0.90) say
    nothing; the spectral trigger's index (-2.35), pooled with the margin, does. The trigger-size rule
    still reads only ``anomaly_indices``."""
    info = {**_info("combined", 0.356, index0=-0.90), "combined_index": [-2.35] + [0.1 * i for i in range(1, 10)]}
    v = backdoor_verdict(info, estimator="x", threshold=2.0)
    assert v.combined_indices[0] == -2.35 and v.combined_pvalue == pytest.approx(combined_pvalue(0.356, -2.35))
    assert v.suspected and v.combined_flagged and not v.size_flagged and v.anomaly_index == -0.90
    assert "trigger-size anomaly index -2.35, combined p = 0.027 < 0.05" in v.evidence()
    assert Verdict.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    older = backdoor_verdict(_info("combined", 0.356, index0=-0.90), estimator="x", threshold=2.0)
    assert not older.suspected and older.combined_pvalue == pytest.approx(combined_pvalue(0.356, -0.90))


def test_every_detector_can_be_read_off_one_verdict_as_its_own_run_decides():
    """Class 3 has the smallest working trigger, class 0 the largest margin. Whichever detector a run used
    (and so whichever class it made the target, as synthesized-multi does), its verdict tells what each
    detector decides, and that is what a run with that detector decides from its own target."""
    own_rule = {
        "trigger-size": lambda v: v.size_flagged,
        "max-margin": lambda v: v.margin_flagged,
        "either": lambda v: v.size_flagged or v.margin_flagged,
        "combined": lambda v: v.size_flagged or v.combined_flagged,
    }
    for p_margin, index3 in ((0.01, -2.5), (0.01, -1.0), (0.3, -2.5), (0.3, -1.0), (0.06, -1.0)):
        runs = {}
        for detector in own_rule:
            info = _info(detector, p_margin, index0=-0.5)
            info["anomaly_index"][3] = index3
            info["success"][5], info["anomaly_index"][5] = 0.5, -9.0  # class 5's trigger does not work
            moved = {"max-margin": True, "either": p_margin < 0.05, "trigger-size": False}
            moved["combined"] = combined_pvalue(p_margin, -0.5) < 0.05
            info["estimated_target"] = 0 if moved[detector] else 3
            runs[detector] = backdoor_verdict(info, estimator="x", threshold=2.0)
        decided = {d: own_rule[d](v) for d, v in runs.items()}
        for v in runs.values():
            assert v.size_target == 3 and {d: v.flagged_by(d) for d in runs} == decided
        assert {d: v.suspected for d, v in runs.items()} == decided


def test_when_the_two_statistics_name_different_classes_the_stronger_evidence_is_the_target():
    """WaNet s1 (docs/results.md §17a): the margin's class 0 passes the combined level (pooled p 0.037,
    z 1.78) while the trigger size alone flags class 3 (index -2.61, z 2.61): class 3 is the target. SIG
    s6: the margin's pooled evidence is the stronger, so its class stays the target. Either way the
    verdict and the report name the other class; nothing is named when the classes agree or the size
    flags nothing."""
    from onp.defense_report import _rival_note

    wanet = _info("combined", 0.064, index0=-1.0)
    wanet["anomaly_index"][3], wanet["estimated_target"] = -2.61, 3
    split = backdoor_verdict(wanet, estimator="x", threshold=2.0)
    assert split.suspected and split.combined_flagged and split.target_by("combined") == 3
    assert split.combined_pvalue is not None
    assert split.rival_target == 0 and stronger_target(0, split.combined_pvalue, 3, -2.61) == 3
    assert split.evidence().endswith("but the trigger size's evidence for class 3 is stronger (anomaly index -2.61)")
    note = " ".join(_rival_note(split))
    assert "aimed at class 3" in note and "maximum margin names class 0" in note and '"max-margin"' in note

    sig = {**_info("combined", 1e-6, index0=-3.0), "estimated_target": 0}
    sig["anomaly_index"][3] = -2.61  # the size's own class is 0 here (-3.0); make class 3 the size's by its trigger
    sig["success"][0] = 0.5
    strong = backdoor_verdict(sig, estimator="x", threshold=2.0)
    assert strong.size_target == 3 and strong.target_by("combined") == 0 and strong.rival_target == 3
    assert strong.evidence().endswith("but the trigger size alone names class 3 (anomaly index -2.61)")
    note = " ".join(_rival_note(strong))
    assert "aimed at class 0" in note and "trigger size alone names class 3" in note and '"trigger-size"' in note
    either = backdoor_verdict({**wanet, "detector": "either", "max_margin_pvalue": 0.01}, estimator="x", threshold=2.0)
    assert either.target_by("either") == 0 and either.rival_target == 3 and "names class 3" in either.evidence()
    size_only = backdoor_verdict({**wanet, "detector": "trigger-size"}, estimator="x", threshold=2.0)
    assert size_only.rival_target is None and "names class" not in size_only.evidence()
    wanet["anomaly_index"][3] = -1.5  # weaker than the pooled evidence (z 1.78), and flags nothing on its own
    weak = backdoor_verdict(wanet, estimator="x", threshold=2.0)
    assert weak.target_by("combined") == 0 and weak.rival_target is None
    agree = backdoor_verdict(_info("combined", 0.064, index0=-2.61), estimator="x", threshold=2.0)
    assert agree.suspected and agree.rival_target is None and _rival_note(agree) == []


def test_stronger_target_compares_the_two_one_sided_z_scores():
    p = 1.0 - NormalDist().cdf(2.0)  # pooled z = 2.0
    assert stronger_target(0, p, 3, -2.1) == 3 and stronger_target(0, p, 3, -1.9) == 0
    assert stronger_target(0, 0.0, 3, -30.0) == 0  # p = 0 reads as z 37
    assert stronger_target(4, p, 4, -9.0) == 4  # one class: nothing to choose
    assert stronger_target(0, p, 3, float("-inf")) == 0 and stronger_target(0, math.nan, 3, -5.0) == 0


def test_the_multi_estimator_takes_the_max_margin_target(tiny_bundle, tmp_path):
    data, target = tiny_bundle.defense_data, int(tiny_bundle.attack.params()["target"])
    params = dict(steps=2, cache_dir=tmp_path, margin_steps=50, margin_images=8)
    probe = build_probe("synthesized-multi", tiny_bundle.model, None, data, detector="max-margin", **params)
    info = probe.info
    assert info["estimated_target"] == info["max_margin_target"] == target and info["detector"] == "max-margin"
    assert (probe.target_labels == target).all() and info["max_margin_pvalue"] < 0.05
    assert len(info["max_margin"]) == 10 and info["max_margin_seconds"] > 0
    assert backdoor_verdict(info, estimator="synthesized-multi", threshold=2.0).suspected
    # 20 inversion steps: after 2, only the spectral trigger flips the images to the target, at an ordinary size
    combined = build_probe(
        "synthesized-multi", tiny_bundle.model, None, data, detector="combined", **{**params, "steps": 20}
    ).info
    assert combined["estimated_target"] == target and combined["max_margin_seconds"] == info["max_margin_seconds"]
    assert backdoor_verdict(combined, estimator="synthesized-multi", threshold=2.0).combined_flagged  # cached margins
    assert combined["combined_families"] == ["patch", "blend", "spectral"] and len(combined["combined_index"]) == 10
    assert combined["combined_index"][target] < -2.0 < combined["anomaly_index"][target]  # the spectral trigger's
    assert len(list((tmp_path / "synthesized").glob("*-spectral.pt"))) == 1  # inverted once, cached
    plain = build_probe("synthesized-multi", tiny_bundle.model, None, data, **params)
    assert plain.info["detector"] == "confirmed-or-margin" and plain.info["max_margin_alpha"] == 0.005  # the default
    assert "combined_index" not in plain.info
    detectors = "trigger-size, max-margin, either, combined, confirmed, confirmed-or-margin"
    for bad, match in (
        ({"detector": "vote"}, detectors),
        ({"margin_alpha": 1.5}, "(0, 1)"),
        ({"combined_families": "spectral"}, "combined_families must be a non-empty list"),
        ({"combined_families": ["fourier"]}, "spectral"),
    ):
        with pytest.raises(ValueError, match=match):
            build_probe("synthesized-multi", tiny_bundle.model, None, data, **{**params, **bad})


def test_the_estimator_and_the_verdict_name_the_same_target():
    """One rule in two places: the estimator's target (``_margin_target``, which chooses the trigger it
    stamps) and the verdict's :meth:`Verdict.target_by`, over detectors and evidence strengths."""
    from envs.asr_estimators import _margin_target

    for detector in ("max-margin", "either", "combined"):
        for p_margin in (1e-9, 0.01, 0.064, 0.3):
            for index3 in (-4.0, -2.61, -1.5, -0.2):
                info = _info(detector, p_margin, index0=-1.0)
                info["anomaly_index"][3] = index3
                verdict = backdoor_verdict(info, estimator="x", threshold=2.0)
                size, index = verdict.size_target, info["anomaly_index"]
                margin = {"max_margin_pvalue": p_margin, "max_margin_target": 0}
                chosen = _margin_target(detector, margin, index, 0.05, size, index[size])
                assert chosen == verdict.target_by(detector), (detector, p_margin, index3)

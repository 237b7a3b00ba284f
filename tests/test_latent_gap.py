"""The latent gap (envs.latent_gap), the patch mask's compactness (envs.compactness) and the verdict's
``confirmed`` detector (onp.backdoor_verdict)."""

import json
import math

import pytest
import torch
from torch import nn

from envs.asr_estimators import build_probe
from envs.compactness import mask_compactness
from envs.latent_gap import classifier_layer, latent_gaps, penultimate_features
from onp.backdoor_verdict import LATENT_GAP_ALONE, Verdict, backdoor_verdict, confirmed_target


def _shortcut_model() -> nn.Module:
    """Three pixels in, three features, two classes. Pixel 0 is class 0's real content (feature 0), pixel 1
    class 1's (feature 1); pixel 2 is a planted trigger that reaches class 0 through a feature of its own
    (feature 2), which no real class-0 image has."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 3, bias=False), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(3))
        model[2].weight.copy_(torch.tensor([[1.0, 0.0, 5.0], [0.0, 1.0, 0.0]]))
    return model


def _images():
    x = torch.zeros(8, 3)
    x[:4, 0] = 1.0  # class 0
    x[4:, 1] = 1.0  # class 1
    return x, torch.tensor([0] * 4 + [1] * 4)


def test_a_planted_trigger_has_a_large_latent_gap_and_a_natural_one_none():
    model, (x, y) = _shortcut_model(), _images()

    def planted(c, images):  # the trigger pixel: class 0 through feature 2
        out = images.clone()
        out[:, 2] = 1.0
        return out

    def natural(c, images):  # images made to look like the class's real ones
        out = torch.zeros_like(images)
        out[:, c] = 2.0
        return out

    gap = latent_gaps(model, x, y, 2, planted)
    assert gap[0] > 0.8  # the stamped class-1 images reach class 0 through feature 2: almost orthogonal
    assert torch.allclose(latent_gaps(model, x, y, 2, natural), torch.zeros(2), atol=1e-6)
    features, logits = penultimate_features(model, planted(0, x[4:]))
    assert torch.equal(logits.argmax(1), torch.zeros(4, dtype=torch.long)) and features.shape == (4, 3)
    only_class_0 = latent_gaps(model, x[:4], y[:4], 2, natural)  # no real class-1 image, no other class
    assert math.isnan(float(only_class_0[1])) and math.isnan(float(only_class_0[0]))
    with pytest.raises(ValueError, match="has no nn.Linear|none; use another verdict detector"):
        classifier_layer(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_a_planted_square_is_compact_and_a_spread_shape_is_not():
    masks = torch.zeros(3, 1, 28, 28)
    masks[0, 0, 24:27, 24:27] = 1.0  # BadNets' 3 x 3 square
    masks[1, 0, 4:24, 6] = masks[1, 0, 4:24, 20] = masks[1, 0, 4, 6:21] = 0.5  # a spread outline
    compact = mask_compactness(masks)
    assert compact[0] == pytest.approx(1.0) and compact[1] < 0.2 and math.isnan(float(compact[2]))
    assert mask_compactness(masks[:1], window=2)[0] == pytest.approx(4 / 9)
    assert mask_compactness(torch.ones(1, 3, 3))[0] == pytest.approx(1.0)  # a window larger than the mask


def _rule(size, gap, compact=(), working=None):
    return confirmed_target(size, gap, list(compact), working or [True] * len(size))


def test_a_small_trigger_counts_only_when_a_second_statistic_confirms_it():
    # a clean model's natural patch: a small trigger, images like the class's real ones, a spread-out mask
    assert _rule([-3.47, 0.1, 0.2, 0.0], [-0.36, 0.5, 1.0, 0.2], [-1.23, 0.0, 0.3, 0.1]) is None
    assert _rule([-2.0, 0.1, 0.2, 0.0], [2.0, 0.5, 1.0, 0.2]) == 0  # the gap confirms, both at the thresholds
    # BadNets with target 8: no latent gap, but a compact mask confirms the small trigger
    assert _rule([0.0, 0.1, -3.59, 0.0], [3.1, 0.5, -2.03, 0.2], [0.0, 0.1, 9.45, 0.2]) == 2
    assert _rule([0.0, 0.1, -1.9, 0.0], [3.1, 0.5, -2.03, 0.2], [0.0, 0.1, 9.45, 0.2]) is None  # not small
    assert _rule([-1.9, 0.1, 0.2, 0.0], [5.9, 0.5, 1.0, 0.2]) is None
    assert _rule([-0.2, 0.1, 0.2, 0.0], [LATENT_GAP_ALONE, 0.5, 1.0, 0.2]) == 0  # the gap alone
    # two candidates: the larger gap - size wins (SIG s6: class 6's small trigger, class 0's far larger gap)
    assert _rule([-2.06, 0.1, -4.09, 0.0], [55.6, 0.5, 3.79, 0.2]) == 0
    assert _rule([-2.5, 0.1, -4.0, 0.0], [2.1, 0.5, 3.0, 0.2]) == 2
    assert _rule([-0.2, 0.1, 0.2, 0.0], [9.0, 0.5, 1.0, 0.2], working=[False, True, True, True]) is None
    assert _rule([math.nan, 0.1, 0.2, 0.0], [7.0, math.nan, 1.0, 0.2]) == 0
    assert _rule([-3.0, 0.1], [0.0, 0.5], [math.nan, 0.0]) is None  # NaN compactness: no evidence


def _info(gap_index, size_index=None, compact_index=()):
    k = len(gap_index)
    size_index = size_index or [0.1 * i for i in range(k)]
    working = [True] * k
    return {
        "estimated_target": confirmed_target(size_index, gap_index, list(compact_index), working) or 0,
        "anomaly_index": size_index,
        "trigger_size": [30.0] * k,
        "success": [1.0] * k,
        "min_success": 0.9,
        "detector": "confirmed",
        "latent_gap": [0.1] * k,
        "latent_gap_index": gap_index,
        "compactness": [0.1] * len(compact_index),
        "compactness_index": list(compact_index),
    }


def test_the_confirmed_verdict_says_which_class_and_why_and_reads_back():
    clean_fp = _info([-0.36, 0.5, 1.0], size_index=[-3.47, 0.3, 0.4], compact_index=[-1.23, 0.0, 0.5])
    v = backdoor_verdict(clean_fp, estimator="synthesized-multi", threshold=2.0)
    assert not v.suspected and not v.inconclusive and v.flagged_by("trigger-size")  # the size alone would flag it
    assert v.evidence().startswith(
        "class 0: trigger-size anomaly index -3.47, latent-gap index -0.36, compactness index -1.23; no class"
    )
    assert "or a latent-gap index >= 6" in v.evidence()
    planted = backdoor_verdict(_info([0.2, 0.5, 17.0]), estimator="synthesized-multi", threshold=2.0)
    assert planted.suspected and planted.target_by("confirmed") == planted.estimated_target == 2
    assert planted.evidence() == "class 2: trigger-size anomaly index 0.20, latent-gap index 17.00"
    again = Verdict.from_dict(json.loads(json.dumps(planted.to_dict())))
    assert again == planted and again.latent_gap_indices == [0.2, 0.5, 17.0]
    older = {k: v for k, v in planted.to_dict().items() if not k.startswith(("latent_gap", "compactness"))}
    assert not Verdict.from_dict({**older, "detector": "trigger-size"}).flagged_by("confirmed")  # not recorded
    nothing = backdoor_verdict({**_info([0.2, 0.5, 17.0]), "latent_gap_index": []}, estimator="x", threshold=2.0)
    assert nothing.inconclusive and "no latent gaps were computed" in nothing.evidence()


def test_the_estimator_stamps_the_class_the_confirmed_verdict_names(tiny_bundle, tmp_path):
    data, target = tiny_bundle.defense_data, int(tiny_bundle.attack.params()["target"])
    probe = build_probe("synthesized-multi", tiny_bundle.model, None, data, steps=20, cache_dir=tmp_path,
                        detector="confirmed")  # fmt: skip
    info = probe.info
    assert len(info["latent_gap"]) == len(info["latent_gap_index"]) == 10 and info["confirmation_seconds"] > 0
    assert len(info["compactness"]) == len(info["compactness_index"]) == 10
    assert max(range(10), key=info["latent_gap_index"].__getitem__) == target  # the planted target's gap is the largest
    verdict = backdoor_verdict(info, estimator="synthesized-multi", threshold=2.0)
    assert verdict.estimated_target == verdict.target_by("confirmed") == int(probe.target_labels[0])
    assert "max_margin" not in info  # the latent gap needs no max-margin search
    default = build_probe("synthesized-multi", tiny_bundle.model, None, data, steps=20, cache_dir=tmp_path,
                          margin_steps=20, margin_images=4).info  # fmt: skip
    assert default["detector"] == "confirmed-or-margin" and default["latent_gap_index"] == info["latent_gap_index"]
    size_only = build_probe("synthesized-multi", tiny_bundle.model, None, data, steps=20, cache_dir=tmp_path,
                            detector="trigger-size")  # fmt: skip
    assert "latent_gap" not in size_only.info


def test_an_anomaly_threshold_the_confirmed_detector_would_ignore_is_refused_up_front():
    from onp.config import ConfigError
    from onp.defend_config import DefendConfig
    from onp.train_config import TrainConfig

    base = {"arch": "resnet18", "weights": "w.pt", "clean_data": "x.npz"}
    confirmed = {"estimator_params": {"detector": "confirmed"}, "anomaly_threshold": 3.0}
    with pytest.raises(ConfigError, match="the confirmed detector's thresholds are fixed"):
        DefendConfig.from_dict({**base, **confirmed})
    with pytest.raises(ConfigError, match="the confirmed-or-margin detector's thresholds are fixed"):
        DefendConfig.from_dict({**base, "anomaly_threshold": 3.0})  # confirmed-or-margin is the default detector
    size = {"estimator_params": {"detector": "trigger-size"}, "anomaly_threshold": 3.0}
    assert DefendConfig.from_dict({**base, **size}).anomaly_threshold == 3.0
    assert DefendConfig.from_dict({**base, **confirmed, "anomaly_threshold": 2.0}).anomaly_threshold == 2.0
    env = {"asr_estimator": "synthesized-multi", "estimator_params": {"detector": "confirmed"}}
    with pytest.raises(ConfigError, match="set estimator_params.detector to 'trigger-size'"):
        TrainConfig.from_dict({"env": env, "rollout": {"anomaly_threshold": 2.5}})


def _with_margins(info, margins, alpha=0.005):
    from envs.max_margin import margin_pvalue

    _, p = margin_pvalue(torch.tensor(margins))
    return {**info, "detector": "confirmed-or-margin", "max_margin": margins, "max_margin_pvalue": p,
            "max_margin_alpha": alpha}  # fmt: skip


def test_confirmed_or_margin_lets_a_significant_margin_name_the_target_confirmed_missed():
    ordinary = [1.0, 1.2, 0.9, 1.1, 1.05, 0.95, 1.15, 0.85, 1.0, 1.1]
    unconfirmed = _info([0.1] * 10, size_index=[-0.5] + [0.1] * 9)  # a Trojan: nothing small, no gap
    trojan = backdoor_verdict(_with_margins(unconfirmed, ordinary[:6] + [40.0] + ordinary[7:]),
                              estimator="synthesized-multi", threshold=2.0)  # fmt: skip
    assert trojan.max_margin_pvalue < 0.005 and not trojan.flagged_by("confirmed")
    assert trojan.suspected and trojan.target_by("confirmed-or-margin") == 6 and trojan.rival_target is None
    assert trojan.evidence().startswith("class 6's maximum margin 40.0")
    assert "no class has a trigger-size index <= -2" in trojan.evidence()
    # a p-value MM-BD's own 0.05 would flag, above the detector's fixed 0.005: not suspected
    weak = backdoor_verdict(_with_margins(unconfirmed, ordinary[:6] + [1.32] + ordinary[7:]),
                            estimator="synthesized-multi", threshold=2.0)  # fmt: skip
    assert 0.005 <= weak.max_margin_pvalue < 0.05 and not weak.suspected
    assert weak.target_by("confirmed-or-margin") == weak.size_target == 0
    assert weak.evidence().startswith("class 0: trigger-size anomaly index") and "p = " in weak.evidence()
    # both fire on different classes: the confirmed class is the target, the margin's class is named
    both = backdoor_verdict(_with_margins(_info([0.2, 0.5, 17.0] + [0.1] * 7), ordinary[:6] + [40.0] + ordinary[7:]),
                            estimator="synthesized-multi", threshold=2.0)  # fmt: skip
    assert both.suspected and both.target_by("confirmed-or-margin") == 2 and both.rival_target == 6
    assert "but the maximum margin names class 6" in both.evidence()
    assert Verdict.from_dict(json.loads(json.dumps(both.to_dict()))) == both
    no_margin = {**_with_margins(unconfirmed, ordinary), "max_margin": [], "max_margin_pvalue": None}
    assert not backdoor_verdict(no_margin, estimator="x", threshold=2.0).inconclusive  # the confirmed part decides
    neither = {**no_margin, "latent_gap_index": []}
    assert backdoor_verdict(neither, estimator="x", threshold=2.0).inconclusive


def test_the_estimator_stamps_the_max_margin_class_when_nothing_is_confirmed(tiny_bundle, tmp_path, monkeypatch):
    import envs.asr_estimators as est

    data = tiny_bundle.defense_data
    ordinary = [1.0, 1.2, 0.9, 1.1, 1.05, 0.95, 1.15, 0.85, 1.0, 1.1]
    spread = torch.linspace(0.0, 0.09, 10)  # indices within +-1.5: nothing confirms a small trigger
    monkeypatch.setattr(est, "latent_gaps", lambda *a, **k: spread.clone())
    monkeypatch.setattr(est, "mask_compactness", lambda mask: spread.clone())

    def margins(margin_class, value=40.0):
        values = list(ordinary)
        values[margin_class] = value
        found = {"margin": torch.tensor(values), "steps": torch.ones(10, dtype=torch.long), "seconds": 1.0}
        return lambda *a, **k: found

    for margin_class in (3, 7):
        monkeypatch.setattr(est, "cached_max_margins", margins(margin_class))
        probe = build_probe("synthesized-multi", tiny_bundle.model, None, data, steps=20, cache_dir=tmp_path,
                            detector="confirmed-or-margin")  # fmt: skip
        verdict = backdoor_verdict(probe.info, estimator="synthesized-multi", threshold=2.0)
        assert probe.info["max_margin_alpha"] == 0.005 and verdict.confirmed_class is None
        assert int(probe.target_labels[0]) == verdict.estimated_target == margin_class
        assert verdict.suspected and verdict.target_by("confirmed-or-margin") == margin_class
    # p = 0.023: significant at MM-BD's own 0.05, not at the detector's fixed 0.005, so the margin's class is
    # neither stamped nor suspected (the estimator judges at the level the verdict does)
    monkeypatch.setattr(est, "cached_max_margins", margins(3, value=1.32))
    probe = build_probe("synthesized-multi", tiny_bundle.model, None, data, steps=20, cache_dir=tmp_path,
                        detector="confirmed-or-margin")  # fmt: skip
    verdict = backdoor_verdict(probe.info, estimator="synthesized-multi", threshold=2.0)
    assert 0.005 <= probe.info["max_margin_pvalue"] < 0.05 and not verdict.margin_flagged
    assert int(probe.target_labels[0]) == verdict.estimated_target == verdict.size_target != 3


def test_confirmed_or_margin_refuses_a_margin_alpha_it_would_ignore():
    from onp.config import ConfigError
    from onp.defend_config import DefendConfig

    base = {"arch": "resnet18", "weights": "w.pt", "clean_data": "x.npz"}
    params = {"detector": "confirmed-or-margin", "margin_alpha": 0.05}
    with pytest.raises(ConfigError, match="max-margin level is fixed \\(0.005\\)"):
        DefendConfig.from_dict({**base, "estimator_params": params})
    with pytest.raises(ConfigError, match="the confirmed-or-margin detector's thresholds are fixed"):
        DefendConfig.from_dict(
            {**base, "estimator_params": {"detector": "confirmed-or-margin"}, "anomaly_threshold": 3.0}
        )
    ok = DefendConfig.from_dict({**base, "estimator_params": {"detector": "confirmed-or-margin"}})
    assert ok.estimator_params["detector"] == "confirmed-or-margin"
    assert DefendConfig.from_dict({**base, "estimator_params": {"detector": "either", "margin_alpha": 0.01}})

"""Trigger families (patch, blend, additive, spectral, warp) and the multi-family trigger-agnostic ASR estimator."""

import pytest
import torch
from torch import nn

from envs.asr_estimators import (
    SizeWeight,
    anomaly_indices,
    build_probe,
    cached_inversion,
    cached_target_inversion,
    invert_triggers,
    log_anomaly_indices,
)
from envs.trigger_families import TRIGGER_FAMILIES, trigger_family
from onp.io import CheckpointError

from .conftest import random_defense_data

SHAPE = (1, 12, 12)


def test_the_families_are_registered_and_an_unknown_one_lists_them():
    assert {"patch", "blend", "additive", "spectral", "warp"} <= set(TRIGGER_FAMILIES.names())
    with pytest.raises(ValueError, match="patch"):
        trigger_family("zigzag", SHAPE)
    with pytest.raises(ValueError, match="shape"):
        trigger_family("patch", (12, 12))


def test_patch_and_blend_stamp_and_size():
    x = torch.rand(4, *SHAPE)
    patch = trigger_family("patch", SHAPE)
    m, p = torch.zeros(1, 12, 12), torch.rand(1, 12, 12)
    m[:, :3, :3] = 1.0
    out = patch.stamp({"mask": m, "pattern": p}, x)
    assert torch.equal(out[:, :, :3, :3], p[:, :3, :3].expand(4, 1, 3, 3))
    assert torch.equal(out[:, :, 3:, 3:], x[:, :, 3:, 3:])
    assert float(patch.size({"mask": m, "pattern": p})) == 9.0
    blend = trigger_family("blend", SHAPE)
    trig = {"alpha": torch.tensor([0.25]), "pattern": p}
    assert torch.allclose(blend.stamp(trig, x), 0.75 * x + 0.25 * p)
    assert float(blend.size(trig)) == pytest.approx(0.25 * 144)  # a uniform mask's L1 norm


def test_warp_at_zero_is_the_identity_and_a_constant_flow_shifts_the_image():
    warp = trigger_family("warp", SHAPE)
    x = torch.rand(3, *SHAPE)
    with torch.no_grad():
        zero = warp.decode(warp.init())
    assert float(warp.size(zero)) == 0.0
    assert torch.allclose(warp.stamp(zero, x), x, atol=1e-6)
    flow = torch.zeros(12, 12, 2)
    flow[..., 0] = 1.0  # sample one pixel to the right
    shifted = warp.stamp({"flow": flow}, x)
    assert torch.allclose(shifted[..., :-1], x[..., 1:], atol=1e-5)
    assert float(warp.size({"flow": flow})) == pytest.approx(144.0)
    free = warp.init()
    with torch.no_grad():
        free[0].fill_(50.0)
        assert float(warp.decode(free)["flow"].abs().max()) <= warp.max_shift + 1e-4


def test_a_spectral_trigger_of_one_coefficient_is_a_sinusoid_of_that_size():
    spectral = trigger_family("spectral", SHAPE)
    x = torch.rand(3, *SHAPE) * 0.5 + 0.25  # no clipping
    with torch.no_grad():
        zero = spectral.decode(spectral.init())
        assert float(spectral.size(zero)) == pytest.approx(0.0, abs=1e-3)
    assert torch.equal(spectral.stamp(zero, x), x)
    free = spectral.init()
    with torch.no_grad():
        free[0][0, 0, 0, 3] = 1.5  # the real part of horizontal frequency 3 (3 periods across the image)
        trig = spectral.decode(free)
    columns = torch.arange(12.0)
    wave = 2 * 1.5 / 12 * torch.cos(2 * torch.pi * 3 * columns / 12)  # orthonormal scale: 2|c| / sqrt(H W)
    assert torch.allclose(trig["delta"][0], wave.expand(12, 12), atol=1e-5)
    assert float(spectral.size(trig)) == pytest.approx(1.5, abs=1e-3)
    assert torch.allclose(spectral.stamp(trig, x), (x + trig["delta"]).clamp(0, 1))
    assert float(spectral.stamp({"delta": torch.full(SHAPE, 2.0)}, x).max()) == 1.0


class _PlantedBackdoor(nn.Module):
    """A linear classifier whose class ``target`` also fires on images correlated with ``pattern``: a
    whole-image (blend-like) backdoor, so the ``blend`` family needs a much smaller trigger there."""

    def __init__(self, target: int = 3, classes: int = 6, strength: float = 40.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.linear = nn.Linear(144, classes)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(classes, 144, generator=g) * 0.05)
            self.linear.bias.zero_()
        self.pattern = (torch.rand(144, generator=g) > 0.5).float()
        self.target, self.strength = target, strength

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        logits = self.linear(flat)
        corr = ((flat - flat.mean(1, keepdim=True)) * (self.pattern - 0.5)).mean(1)
        bump = torch.zeros_like(logits)
        bump[:, self.target] = self.strength * corr
        return logits + bump


def test_blend_inversion_finds_a_planted_whole_image_backdoor():
    model = _PlantedBackdoor()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(120, *SHAPE, generator=g), torch.randint(0, 6, (120,), generator=g)
    rev = invert_triggers(model, x, y, 6, "blend", steps=60, batch_size=32, seed=0)
    assert set(rev) == {"alpha", "pattern", "size", "success"}
    assert rev["alpha"].shape == (6, 1) and rev["pattern"].shape == (6, *SHAPE)
    working = rev["success"] >= 0.5
    assert bool(working[3])
    sizes = torch.where(working, rev["size"], torch.full_like(rev["size"], float("inf")))
    assert int(sizes.argmin()) == 3
    assert float(log_anomaly_indices(rev["size"])[3]) < 0


def test_spectral_inversion_singles_out_a_planted_periodic_backdoor_that_additive_does_not():
    """A SIG-like backdoor: the target class fires on one horizontal sinusoid. Its spectral trigger is a
    few coefficients, so the target's spectral size is the smallest by far; its pixel-wise additive
    trigger stands out much less."""
    sine = torch.sin(2 * torch.pi * 3 * torch.arange(12.0) / 12).expand(12, 12).flatten()
    model = _PlantedBackdoor()
    model.pattern = sine / 2 + 0.5  # the bump reads the correlation with (pattern - 0.5) = sine / 2
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(120, *SHAPE, generator=g) * 0.6 + 0.2, torch.randint(0, 6, (120,), generator=g)
    index = {}
    for family in ("spectral", "additive"):
        rev = invert_triggers(model, x, y, 6, family, steps=80, batch_size=32, seed=0)
        assert bool(rev["success"][3] >= 0.5)
        index[family] = float(log_anomaly_indices(rev["size"])[3])
    assert index["spectral"] < -2.0
    assert index["spectral"] < index["additive"] - 1.0


def test_log_anomaly_index_is_the_mad_index_of_the_log_sizes():
    sizes = torch.tensor([1.0, 10.0, 12.0, 9.0, 11.0])
    assert torch.allclose(log_anomaly_indices(sizes), anomaly_indices(sizes.log()))
    assert int(log_anomaly_indices(sizes).argmin()) == 0


def test_multi_estimator_stamps_every_working_family_and_caches_each(tiny_bundle, tmp_path):
    data = tiny_bundle.defense_data
    probe = build_probe(
        "synthesized-multi", tiny_bundle.model, None, data, steps=4, min_success=0.0, stamp="all-working",
        cache_dir=tmp_path, detector="trigger-size",  # the families' own statistic picks the target here
    )  # fmt: skip
    info, t = probe.info, probe.info["estimated_target"]
    assert probe.trigger_aware is False and probe.name == "synthesized-multi"
    assert (probe.target_labels == t).all() and (probe.true_labels != t).all()
    assert probe.images.min() >= 0 and probe.images.max() <= 1
    assert set(info["families"]) == {"patch", "blend"} and info["family"] in info["families"]
    n_other = int((data.val_y != t).sum())
    rows = sorted(info["family_slices"].values())
    assert rows[0][0] == 0 and rows[-1][1] == len(probe.images)
    assert all(b - a == n_other for a, b in rows) and all(rows[i][1] == rows[i + 1][0] for i in range(len(rows) - 1))
    assert int(torch.tensor(info["anomaly_index"]).argmin()) == t
    for c, fam in enumerate(info["family_of_class"]):
        assert info["anomaly_index"][c] == pytest.approx(info["families"][fam]["log_anomaly_index"][c])
    costs = info["inversion_seconds"]
    assert set(costs) == set(info["families"]) and all(c > 0 for c in costs.values())  # its cost is reported
    files = sorted(p.name for p in (tmp_path / "synthesized").glob("*.pt"))
    assert len(files) == 2 and sum(name.endswith("-blend.pt") for name in files) == 1
    assert len(rows) == 2 and list(info["family_slices"])[0] == info["family"]  # every family; the target's first
    again = build_probe(
        "synthesized-multi", tiny_bundle.model, None, data, steps=4, min_success=0.0, cache_dir=tmp_path,
        detector="trigger-size",
    )  # fmt: skip
    assert list(again.info["family_slices"]) == [again.info["family"]]  # the default: the most anomalous family
    assert torch.equal(again.images, probe.images[: len(again.images)])  # from the cache: the same triggers
    others = data.val_x[data.val_y != t]
    assert torch.allclose(probe.stamp(others), again.images)  # stamp: the most anomalous family's trigger
    assert sorted(p.name for p in (tmp_path / "synthesized").glob("*.pt")) == files
    assert again.info["inversion_seconds"] == costs  # the first computation's cost, kept beside the cache


def test_the_patch_estimator_shares_its_cache_with_the_multi_estimator(tiny_bundle, tmp_path):
    data = tiny_bundle.defense_data
    multi = build_probe(
        "synthesized-multi",
        tiny_bundle.model,
        None,
        data,
        steps=3,
        batch_size=128,
        families=["patch"],
        cache_dir=tmp_path,
        detector="trigger-size",  # no max-margin search: only the inversion cache is under test
    )
    single = build_probe("synthesized", tiny_bundle.model, None, data, steps=3, cache_dir=tmp_path)
    assert len(list((tmp_path / "synthesized").glob("*.pt"))) == 1
    assert single.info["mask_l1"] == single.info["trigger_size"] == multi.info["families"]["patch"]["size"]


@pytest.mark.parametrize(
    "params, match",
    [
        ({"families": "patch"}, "list"),
        ({"families": []}, "list"),
        ({"families": ["patch", "zigzag"]}, "blend"),
        ({"stamp": "some"}, "most-anomalous, all-working"),
    ],
)
def test_multi_estimator_refuses_bad_settings(tiny_bundle, tmp_path, params, match):
    with pytest.raises(ValueError, match=match):
        build_probe(
            "synthesized-multi", tiny_bundle.model, None, tiny_bundle.defense_data, cache_dir=tmp_path, **params
        )


def test_a_corrupt_family_cache_is_named(tmp_path):
    model = _PlantedBackdoor()
    data = random_defense_data(n_train=12, n_val=6, shape=SHAPE, classes=6)
    cached_inversion(model, data, "warp", steps=1, cache_dir=tmp_path)
    (path,) = (tmp_path / "synthesized").glob("*-warp.pt")
    torch.save({"flow": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="warp"):
        cached_inversion(model, data, "warp", steps=1, cache_dir=tmp_path)


def test_the_adaptive_size_weight_follows_neural_cleanses_schedule():
    w = SizeWeight("adaptive", initial=1e-3, patience=2)
    assert w.weight == 0.0 and w.keeps_best  # no size penalty until the trigger works
    for flipped, expected in [(1.0, 0.0), (0.5, 0.0), (1.0, 0.0), (1.0, 1e-3), (0.995, 1e-3), (1.0, 1.5e-3)]:
        w.update(flipped)  # windows of 2 batches: (1.0, 0.5) fails, (1.0, 1.0) works, (0.995, 1.0) works
        assert w.weight == pytest.approx(expected)
    w.update(0.2)
    w.update(1.0)  # a window that fails (mean 0.6 < 0.99) lowers the weight by 1.5 ** 1.5
    assert w.weight == pytest.approx(1.5e-3 / 1.5**1.5)
    fixed = SizeWeight("fixed", initial=2e-3)
    for flipped in (1.0,) * 30:
        fixed.update(flipped)
    assert fixed.weight == 2e-3 and not fixed.keeps_best
    with pytest.raises(ValueError, match="fixed, adaptive"):
        SizeWeight("cosine")
    with pytest.raises(ValueError, match="fixed, adaptive"):
        invert_triggers(_PlantedBackdoor(), torch.rand(4, *SHAPE), torch.zeros(4, dtype=torch.long), 6, schedule="x")


@pytest.mark.parametrize("family", ["patch", "blend"])
def test_the_adaptive_schedule_finds_smaller_working_triggers_at_equal_steps(family):
    model = _PlantedBackdoor()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(120, *SHAPE, generator=g), torch.randint(0, 6, (120,), generator=g)
    fixed = invert_triggers(model, x, y, 6, family, steps=60, batch_size=32, seed=0)
    adaptive = invert_triggers(model, x, y, 6, family, steps=60, batch_size=32, seed=0, schedule="adaptive")
    assert bool((fixed["success"] >= 0.9).all()) and bool((adaptive["success"] >= 0.9).all())  # all still work
    assert bool((adaptive["size"] < 0.8 * fixed["size"]).all())  # ... and are smaller for every class


def test_each_size_schedule_has_its_own_cache_entry(tmp_path):
    model = _PlantedBackdoor()
    data = random_defense_data(n_train=12, n_val=6, shape=SHAPE, classes=6)
    fixed = cached_inversion(model, data, "blend", steps=2, cache_dir=tmp_path)
    adaptive = cached_inversion(model, data, "blend", steps=2, cache_dir=tmp_path, schedule="adaptive")
    names = sorted(p.name for p in (tmp_path / "synthesized").glob("*.pt"))
    assert len(names) == 2 and sum("-adaptive-" in n for n in names) == 1
    assert not torch.equal(fixed["size"], adaptive["size"])  # no size penalty yet: the trigger grows freely


def test_the_targets_trigger_re_inverted_alone_is_smaller_cached_and_checked(tmp_path):
    model = _PlantedBackdoor()
    data = random_defense_data(n_train=120, n_val=30, shape=SHAPE, classes=6, seed=1)
    per_class = cached_inversion(model, data, "blend", steps=60, batch_size=32, cache_dir=tmp_path)
    alone = cached_target_inversion(model, data, "blend", 3, steps=60, batch_size=32, cache_dir=tmp_path)
    assert set(alone) == {"alpha", "pattern", "size", "success"} and alone["pattern"].shape == SHAPE
    assert float(alone["success"]) >= 0.9 and float(alone["size"]) < 0.8 * float(per_class["size"][3])
    (path,) = (tmp_path / "synthesized").glob("*-target3.pt")
    assert path.with_suffix(".json").exists()  # its cost, beside it
    again = cached_target_inversion(model, data, "blend", 3, steps=60, batch_size=32, cache_dir=tmp_path)
    assert all(torch.equal(again[k], alone[k]) for k in alone)
    torch.save({"alpha": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="target-trigger cache of the 'blend' family"):
        cached_target_inversion(model, data, "blend", 3, steps=60, batch_size=32, cache_dir=tmp_path)


def test_multi_estimator_stamps_the_refined_target_trigger(tmp_path):
    model = _PlantedBackdoor()
    data = random_defense_data(n_train=120, n_val=30, shape=SHAPE, classes=6, seed=1)
    common = dict(families=["blend"], steps=60, batch_size=32, cache_dir=tmp_path)
    plain = build_probe("synthesized-multi", model, None, data, **common)
    refined = build_probe("synthesized-multi", model, None, data, refine_steps=60, **common)
    t = plain.info["estimated_target"]
    assert t == refined.info["estimated_target"] == 3 and "target_trigger" not in plain.info
    info = refined.info["target_trigger"]
    assert info["used"] and info["family"] == "blend" and info["steps"] == 60 and info["seconds"] > 0
    assert info["size"] < info["size_before"] == pytest.approx(plain.info["trigger_size"][t])
    alone = cached_target_inversion(model, data, "blend", t, steps=60, batch_size=32, cache_dir=tmp_path)
    others = data.val_x[data.val_y != t]
    stamped = trigger_family("blend", SHAPE).stamp(alone, others).clamp(0, 1)
    assert torch.allclose(refined.images, stamped) and torch.allclose(refined.stamp(others), stamped)
    assert not torch.allclose(plain.images, stamped)
    assert refined.info["trigger_size"] == plain.info["trigger_size"]  # the verdict's figures are unchanged
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="refine_steps"):
            build_probe("synthesized-multi", model, None, data, refine_steps=bad, **common)

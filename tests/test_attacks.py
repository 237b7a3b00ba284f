"""Tests for onp.attacks: trigger properties, label mappings, poisoning indices and rebuilding."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from onp.attacks import ATTACKS, SIG, Attack, BadNets, Blend, Trojan, WaNet, build_attack
from onp.registry import UnknownNameError

SHAPES = [(1, 28, 28), (3, 32, 32)]
NAMES = ["badnets", "blend", "trojan", "sig", "wanet"]
K = 10


def images(shape, n=6, seed=0, low=0.0, high=1.0):
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, *shape, generator=g)


def smooth_images(shape, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, shape[0], 4, 4, generator=g)
    return F.interpolate(coarse, size=shape[1:], mode="bilinear", align_corners=True)


def labels(n=200, seed=0):
    return torch.randint(0, K, (n,), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- generic properties
def test_registry_names():
    assert sorted(ATTACKS.names()) == sorted(NAMES)
    for name in NAMES:
        assert issubclass(ATTACKS.get(name), Attack)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_apply_generic(name, shape):
    atk = build_attack(name, shape, K)
    x = images(shape)
    x_copy = x.clone()
    out = atk.apply(x)
    assert torch.equal(x, x_copy), "apply modified its input"
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not torch.equal(out, x)
    assert torch.equal(atk.apply(x), out), "apply is not deterministic"
    assert torch.equal(build_attack(name, shape, K).apply(x), out), "same params, different trigger"
    # batch-independent: each image triggered alone gives the same result
    assert torch.allclose(atk.apply(x[2:3]), out[2:3], atol=1e-6)
    # a single (C, H, W) image and float64 batches also work
    assert torch.allclose(atk.apply(x[0]), out[0], atol=1e-6)
    out64 = atk.apply(x.double())
    assert out64.dtype == torch.float64 and torch.allclose(out64.float(), out, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_apply_rejects_bad_input(name):
    atk = build_attack(name, (1, 28, 28), K)
    with pytest.raises(ValueError, match="shape"):
        atk.apply(torch.rand(2, 3, 32, 32))
    with pytest.raises(TypeError):
        atk.apply(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))


# ------------------------------------------------------------------------------ each trigger
@pytest.mark.parametrize("shape", SHAPES)
def test_badnets_patch_bottom_right(shape):
    c, h, w = shape
    atk = BadNets(shape, K)
    x = images(shape, low=0.3, high=0.7)  # never equal to 0 or 1, so every patch pixel changes
    changed = (atk.apply(x) != x).any(dim=0).any(dim=0)
    expected = torch.zeros(h, w, dtype=torch.bool)
    expected[h - 4 : h - 1, w - 4 : w - 1] = True
    assert torch.equal(changed, expected)
    patch = atk.apply(x)[:, :, h - 4 : h - 1, w - 4 : w - 1]
    checker = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    assert torch.equal(patch, checker.expand_as(patch))
    big = BadNets(shape, K, patch_size=5, margin=0)
    changed = (big.apply(x) != x).any(dim=0).any(dim=0)
    assert changed[h - 5 :, w - 5 :].all() and changed.sum() == 25


@pytest.mark.parametrize("shape", SHAPES)
def test_blend_formula(shape):
    atk = Blend(shape, K, alpha=0.3, pattern_seed=5)
    x = images(shape)
    pattern = torch.rand(shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(atk.apply(x), (1 - 0.3) * x + 0.3 * pattern)
    assert torch.equal(atk.trigger_pattern()["pattern"], pattern)
    # the pattern does not depend on the global RNG state
    torch.manual_seed(123)
    a1 = Blend(shape, K).trigger_pattern()["pattern"]
    torch.manual_seed(456)
    assert torch.equal(a1, Blend(shape, K).trigger_pattern()["pattern"])
    assert not torch.equal(a1, Blend(shape, K, pattern_seed=1).trigger_pattern()["pattern"])


@pytest.mark.parametrize("shape", SHAPES)
def test_trojan_changes_only_masked_pixels(shape):
    c, h, w = shape
    atk = Trojan(shape, K)
    size = max(3, h // 4)
    assert atk.params()["size"] == size
    mask = atk.trigger_pattern()["mask"].bool()
    x = images(shape, low=0.3, high=0.7)
    changed = (atk.apply(x) != x).any(dim=0).any(dim=0)
    assert torch.equal(changed, mask)
    # bottom-left corner, margin 1, logo of side `size`
    rows, cols = mask.nonzero(as_tuple=True)
    assert rows.min() == h - 1 - size and rows.max() == h - 2
    assert cols.min() == 1 and cols.max() == size
    # opacity 1 inside the mask: output equals the pattern there
    out = atk.apply(x)
    pattern = atk.trigger_pattern()["pattern"]
    assert torch.equal(out[:, :, mask], pattern[:, mask].expand(len(x), -1, -1))
    # partial opacity blends
    half = Trojan(shape, K, alpha=0.5).apply(x)
    assert torch.allclose(half[:, :, mask], 0.5 * x[:, :, mask] + 0.5 * pattern[:, mask], atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_sig_sinusoid(shape):
    c, h, w = shape
    atk = SIG(shape, K)
    delta = 40 / 255
    x = images(shape, low=0.2, high=0.8)  # no clipping
    diff = atk.apply(x) - x
    assert diff.abs().max() <= delta + 1e-6
    wave = delta * torch.sin(2 * math.pi * torch.arange(w) * 6 / w)
    assert torch.allclose(diff, wave.expand_as(diff), atol=1e-6)
    # clipping keeps the range and bounds the change
    x = images(shape)
    diff = atk.apply(x) - x
    assert diff.abs().max() <= delta + 1e-6
    assert SIG.clean_label and atk.clean_label


@pytest.mark.parametrize("shape", SHAPES)
def test_wanet_small_pure_warp(shape):
    atk = WaNet(shape, K)
    x = smooth_images(shape)
    out = atk.apply(x)
    assert not torch.equal(out, x)
    assert (out - x).abs().mean() < 0.05
    const = torch.full((2, *shape), 0.37)
    assert torch.allclose(atk.apply(const), const, atol=1e-5)
    assert not torch.equal(WaNet(shape, K, seed=1).apply(x), out), "seed does not change the warp"
    # identity grid (s = 0) leaves images unchanged
    assert torch.allclose(WaNet(shape, K, s=0.0).apply(x), x, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_wanet_noise_mode(shape):
    atk = WaNet(shape, K)
    y = labels(100)
    gen = torch.Generator().manual_seed(0)
    poison = atk.poison_indices(y, 0.1, gen)
    noise = atk.noise_indices(y, poison, gen)
    assert len(noise) == 2 * len(poison) == 20
    assert noise.dtype == torch.int64 and torch.equal(noise, noise.sort().values)
    assert not set(noise.tolist()) & set(poison.tolist())
    x = smooth_images(shape)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    n1, n2 = atk.apply_noise(x, g1), atk.apply_noise(x, g2)
    assert torch.equal(n1, n2)
    assert not torch.equal(n1, atk.apply(x)) and not torch.equal(n1, x)
    assert n1.min() >= 0 and n1.max() <= 1 and n1.shape == x.shape
    const = torch.full((2, *shape), 0.6)
    assert torch.allclose(atk.apply_noise(const, g1), const, atol=1e-5)


def test_default_noise_is_empty_identity():
    atk = BadNets((1, 28, 28), K)
    y = labels(50)
    gen = torch.Generator().manual_seed(0)
    assert len(atk.noise_indices(y, atk.poison_indices(y, 0.1, gen), gen)) == 0
    x = images((1, 28, 28))
    assert torch.equal(atk.apply_noise(x, gen), x)


# ------------------------------------------------------------------------------------ labels
def test_target_of_and_poisoned_labels():
    y = torch.arange(K).repeat(2)
    a1 = BadNets((1, 28, 28), K, target=3)
    assert torch.equal(a1.target_of(y), torch.full_like(y, 3))
    assert torch.equal(a1.poisoned_labels(y), torch.full_like(y, 3))
    a2 = BadNets((1, 28, 28), K, mode="all2all")
    assert torch.equal(a2.target_of(y), (y + 1) % K)
    sig = SIG((1, 28, 28), K, target=2)
    assert torch.equal(sig.poisoned_labels(y), y)
    assert torch.equal(sig.target_of(y), torch.full_like(y, 2))


@pytest.mark.parametrize("name", NAMES)
def test_poisoned_eval_set(name):
    shape = (1, 28, 28)
    x, y = images(shape, n=30), torch.arange(30) % K
    atk = build_attack(name, shape, K, target=4)
    xp, yt, yk = atk.poisoned_eval_set(x, y)
    keep = y != 4
    assert len(xp) == int(keep.sum()) == 27
    assert torch.equal(yk, y[keep]) and torch.equal(yt, torch.full_like(yk, 4))
    assert torch.equal(xp, atk.apply(x[keep]))
    if not atk.clean_label:
        a2 = build_attack(name, shape, K, mode="all2all")
        xp, yt, yk = a2.poisoned_eval_set(x, y)
        assert len(xp) == 30 and torch.equal(yk, y) and torch.equal(yt, (y + 1) % K)


# ------------------------------------------------------------------------------ poisoning
@pytest.mark.parametrize("rate", [0.05, 0.1, 0.37])
def test_poison_indices_dirty_label(rate):
    y = labels(200)
    atk = BadNets((1, 28, 28), K, target=1)
    idx = atk.poison_indices(y, rate, torch.Generator().manual_seed(7))
    assert idx.dtype == torch.int64 and len(idx) == round(rate * 200)
    assert torch.equal(idx, idx.sort().values) and len(set(idx.tolist())) == len(idx)
    assert (y[idx] != 1).all()
    again = atk.poison_indices(y, rate, torch.Generator().manual_seed(7))
    assert torch.equal(idx, again)
    other = atk.poison_indices(y, rate, torch.Generator().manual_seed(8))
    assert not torch.equal(idx, other)
    a2 = BadNets((1, 28, 28), K, mode="all2all")
    assert len(a2.poison_candidates(y)) == 200
    assert len(a2.poison_indices(y, rate, torch.Generator().manual_seed(7))) == round(rate * 200)


def test_poison_indices_clean_label_and_cap():
    y = labels(200)
    atk = SIG((1, 28, 28), K, target=2)
    n_target = int((y == 2).sum())
    assert torch.equal(atk.poison_candidates(y), torch.nonzero(y == 2).flatten())
    idx = atk.poison_indices(y, 0.05, torch.Generator().manual_seed(0))
    assert len(idx) == 10 and (y[idx] == 2).all()
    with pytest.warns(UserWarning, match="eligible"):
        capped = atk.poison_indices(y, 0.5, torch.Generator().manual_seed(0))
    assert len(capped) == n_target
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned only once per attack
        atk.poison_indices(y, 0.5, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_poison_rate_rejected(rate):
    atk = BadNets((1, 28, 28), K)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        atk.poison_indices(labels(20), rate, torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------ validation
def test_unknown_name_lists_choices():
    with pytest.raises(UnknownNameError) as err:
        build_attack("nope", (1, 28, 28), K)
    for name in NAMES:
        assert name in str(err.value)


def test_bad_mode_target_and_params():
    with pytest.raises(ValueError, match="all2one, all2all"):
        BadNets((1, 28, 28), K, mode="one2one")
    for target in (-1, K):
        with pytest.raises(ValueError, match="target"):
            BadNets((1, 28, 28), K, target=target)
    with pytest.raises((TypeError, ValueError), match="patch_size"):
        BadNets((1, 28, 28), K, pach_size=4)
    with pytest.raises(ValueError):
        SIG((1, 28, 28), K, mode="all2all")  # clean-label attacks are all2one only
    with pytest.raises(ValueError):
        Blend((1, 28, 28), K, alpha=1.5)
    with pytest.raises(ValueError, match="fit"):
        BadNets((1, 8, 8), K, patch_size=8)


# ------------------------------------------------------------------------------- rebuilding
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_params_roundtrip(name, shape):
    kwargs = {"target": 2, "seed": 3}
    if name != "sig":
        kwargs["mode"] = "all2all"
    atk = build_attack(name, shape, K, **kwargs)
    p = json.loads(json.dumps(atk.params()))
    assert p["name"] == name and p["target"] == 2 and p["seed"] == 3
    rest = {k: v for k, v in p.items() if k != "name"}
    again = build_attack(p["name"], shape, K, **rest)
    x = images(shape)
    assert torch.equal(again.apply(x), atk.apply(x))
    assert again.params() == atk.params()
    pats = atk.trigger_pattern()
    assert pats and all(isinstance(t, torch.Tensor) for t in pats.values())

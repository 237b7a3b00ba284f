"""Baselines against their reference code (issue #13, items 1-4): FP's unit removal, NGF's K-FAC
factors and lr schedule, AWM's fixed step counts, ANP's unprojected perturbation.

Tiny untrained models and random data, except where a trained model is needed (``tiny_bundle``).
"""

import math

import pytest
import torch
from torch import nn

from baselines import DefenseError, build_defense
from baselines.awm import AWMParams, steps_per_phase
from baselines.ngf import KFACLinear, NGFParams, lr_schedule, scheduled_lr
from onp.models import build_model

from .conftest import random_defense_data


def _classifier_inputs(model, x):
    feats = []
    h = model.linear.register_forward_pre_hook(lambda m, inp: feats.append(inp[0].detach()))
    with torch.no_grad():
        model.eval()(x)
    h.remove()
    return torch.cat(feats)


def _logits_with_unit_shifted(model, x, unit, amount=10.0):
    """Logits when feature ``unit`` of the classifier's input is shifted by ``amount``."""

    def shift(m, inp):
        z = inp[0].clone()
        z[:, unit] += amount
        return (z,)

    h = model.linear.register_forward_pre_hook(shift)
    with torch.no_grad():
        out = model.eval()(x)
    h.remove()
    return out


# ------------------------------------------------------------------------------------------------ FP (item 1)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return build_model("resnet18", in_channels=1, width=4).eval()  # 32 classifier units


def test_fp_masks_the_least_active_units_for_the_classifier(resnet):
    data = random_defense_data(64, 32)
    res = build_defense("fp", operating_point="number", n_prune=5, ft_epochs=0).fit(resnet, data, seed=0)
    units = res.info["pruned_units"]
    assert res.pruned is None and res.n_pruned == 5 and res.info["num_units"] == 32
    # the 5 units with the lowest mean activation on defense-train, as the classifier sees them
    act = _classifier_inputs(resnet, data.train_x).mean(0)
    assert set(units) == set(torch.argsort(act)[:5].tolist())
    assert torch.all(res.model.linear.weight[:, units] == 0)
    x = data.val_x[:8]
    base = res.model.eval()(x).detach()
    for k in units:  # the logits do not depend on a pruned unit ...
        assert torch.equal(_logits_with_unit_shifted(res.model, x, k), base)
    kept = next(u for u in range(32) if u not in units)  # ... but do on a kept one
    assert not torch.allclose(_logits_with_unit_shifted(res.model, x, kept), base)
    assert res.scores.shape == (sum(m.num_features for m in resnet.modules() if isinstance(m, nn.BatchNorm2d)),)


@pytest.mark.parametrize("ft_epochs", [0, 1])
def test_fp_with_every_unit_pruned_the_logits_are_constant(resnet, ft_epochs):
    data = random_defense_data(64, 32)
    res = build_defense("fp", operating_point="number", n_prune=32, ft_epochs=ft_epochs, batch_size=32).fit(
        resnet, data, seed=0
    )
    out = res.model.eval()(data.val_x).detach()
    assert torch.allclose(out, out[:1].expand_as(out), atol=1e-6)
    assert torch.allclose(out[0], res.model.linear.bias.detach())
    if ft_epochs:  # fine-tuning changed the network but kept every unit removed
        assert not torch.equal(res.model.conv1.weight, resnet.conv1.weight)


def test_fp_bn_mode_leaves_the_residual_path_open(resnet):
    """The pre-issue-#13 rule (units=bn): zeroing every gamma of layer4.1.bn2 does not remove any
    classifier unit, because the identity skip carries layer4.0's output past it."""
    data = random_defense_data(64, 32)
    res = build_defense("fp", units="bn", layer="layer4.1.bn2", operating_point="number", n_prune=32, ft_epochs=0).fit(
        resnet, data, seed=0
    )
    assert torch.all(res.model.layer4[1].bn2.weight == 0) and res.n_pruned == 32
    out = res.model.eval()(data.val_x).detach()
    assert not torch.allclose(out, out[:1].expand_as(out), atol=1e-3)  # still input-dependent


def test_fp_delta_rule_counts_units_on_defense_val(tiny_bundle):
    data = tiny_bundle.defense_data
    res = build_defense("fp", delta=0.05, ft_epochs=0).fit(tiny_bundle.model, data, seed=0)
    op = res.info["operating_point"]
    ok = [s["n_pruned"] for s in op["val_sweep"] if op["val_acc_before"] - s["val_acc"] <= 0.05 + 1e-9]
    assert op["n_pruned"] == max(ok) == res.n_pruned and max(s["n_pruned"] for s in op["val_sweep"]) <= 0.9 * 32
    # the sweep (masked features) and the returned model (zeroed columns) agree
    pred = res.model.eval()(data.val_x).argmax(1)
    assert (pred == data.val_y).float().mean().item() == pytest.approx(op["val_acc_after"])
    with pytest.raises(DefenseError, match="units=bn only"):
        build_defense("fp", layer="all")


# ------------------------------------------------------------------------------------------------ NGF (item 2)


def test_ngf_kfac_factors_start_at_identity_and_move_by_running_average():
    torch.manual_seed(0)
    layer, p = nn.Linear(6, 3), NGFParams()
    kf = KFACLinear(layer, p)
    assert torch.equal(kf.A, torch.eye(7)) and torch.equal(kf.G, torch.eye(3))  # before the first update
    a, g = torch.randn(16, 6) * 3, torch.randn(16, 3) / 16
    kf.capture(a, g)
    kf.update_stats()  # step 0
    a1, g1 = torch.cat([a, torch.ones(16, 1)], 1), g * 16
    assert torch.allclose(kf.A, 0.95 * torch.eye(7) + 0.05 * a1.t() @ a1 / 16, atol=1e-6)
    assert torch.allclose(kf.G, 0.95 * torch.eye(3) + 0.05 * g1.t() @ g1 / 16, atol=1e-6)
    # step 0 uses the K-FAC eigenvalue product, not the EKFAC scale ...
    la, lg = torch.linalg.eigvalsh(kf.A.double()), torch.linalg.eigvalsh(kf.G.double())
    assert kf.n_scale_updates == 0 and torch.allclose(kf.S, (lg[:, None] * la[None, :]).float(), atol=1e-5)
    # ... so no direction is amplified by more than 1 / 0.95^2 on step 0 (the identity's weight)
    grad = torch.randn(3, 7)
    assert kf.precondition(grad).norm() <= grad.norm() / 0.95**2
    A0 = kf.A.clone()
    for _ in range(9):  # steps 1-9: no factor or scale update
        kf.capture(torch.randn(16, 6), torch.randn(16, 3))
        kf.update_stats()
    assert torch.equal(kf.A, A0) and kf.n_cov_updates == 1 and kf.n_scale_updates == 0
    S_before = kf.S.clone()
    a, g = torch.randn(16, 6), torch.randn(16, 3) / 16
    kf.capture(a, g)
    kf.update_stats()  # step 10: factors and EKFAC scale move; the eigenbasis (t_inv = 100) does not
    a1, g1 = torch.cat([a, torch.ones(16, 1)], 1), g * 16
    pe = torch.stack([(kf.Qg.t() @ torch.outer(g1[i], a1[i]) @ kf.Qa) ** 2 for i in range(16)]).mean(0)
    assert kf.n_cov_updates == 2 and kf.n_scale_updates == 1
    assert torch.allclose(kf.S, 0.95 * S_before + 0.05 * pe, atol=1e-5)
    assert torch.allclose(kf.A, 0.95 * A0 + 0.05 * a1.t() @ a1 / 16, atol=1e-6)


def test_ngf_lr_follows_the_reference_schedule():
    p = NGFParams()
    lrs = [scheduled_lr(p, i) for i in range(500)]
    assert all(math.isclose(lr, 1e-3) for lr in lrs[:200]) and all(math.isclose(lr, 1e-4) for lr in lrs[200:])
    assert [(s["start"], s["end"]) for s in lr_schedule(p)] == [(0, 200), (200, 500)]
    q = NGFParams(lr_step_at_round_start=False)  # the schedule the milestones suggest
    expect = [1e-2] * 100 + [1e-3] * 200 + [1e-4] * 200
    assert all(math.isclose(scheduled_lr(q, i), e) for i, e in enumerate(expect))
    # the lr the optimiser used, per iteration (3 rounds of 10: milestones int(0.35*3)=1, int(0.75*3)=2)
    model = build_model("small_cnn", in_channels=1, width=2)
    res = build_defense("ngf", iterations=30, round_iters=10, batch_size=16).fit(
        model, random_defense_data(64, 32), seed=0
    )
    used = res.info["_lr_per_iteration"].tolist()
    assert len(used) == 30 and all(math.isclose(u, e) for u, e in zip(used, [1e-3] * 10 + [1e-4] * 20))


def test_ngf_scope_all_trains_every_layer_in_train_mode_and_ewc_is_off(tiny_bundle):
    model, data = tiny_bundle.model, tiny_bundle.defense_data
    res = build_defense("ngf", iterations=5, batch_size=32).fit(model, data, seed=0)
    assert res.info["scope"] == "all" and res.info["fisher_coef"] == 0.0
    before, after = model.state_dict(), res.model.state_dict()
    assert not torch.equal(after["conv1.weight"], before["conv1.weight"])  # plain SGD-momentum
    assert not torch.equal(after["bn1.running_mean"], before["bn1.running_mean"])  # BN re-estimated
    assert not torch.equal(after["linear.weight"], before["linear.weight"])  # preconditioned
    assert res.forward_passes == 5 + 2  # 5 iterations + 2 defense-val evaluations, no Fisher pass
    ewc = build_defense("ngf", iterations=5, batch_size=32, fisher_coef=1.0).fit(model, data, seed=0)
    assert ewc.forward_passes == 5 + 2 + math.ceil(len(data.train_y) / 256)
    with pytest.raises(DefenseError, match="scope"):
        build_defense("ngf", scope="layer4")


# ------------------------------------------------------------------------------------------------ AWM (item 3)


@pytest.mark.parametrize("n_images", [50, 500])
def test_awm_runs_the_reference_number_of_steps_for_any_defense_set_size(n_images):
    model = build_model("small_cnn", in_channels=1, width=2)
    data = random_defense_data(n_train=n_images, n_val=16)
    res = build_defense("awm", batch_size=32, outer_epochs=2).fit(model, data, seed=0)
    fixed = (500 // 32) * 5  # the reference: int(500 / batch) * inner, whatever the data size
    assert res.info["inner_iters"] == fixed
    assert res.info["n_trigger_steps"] == res.info["n_mask_steps"] == 2 * fixed
    assert res.backward_passes == 2 * 2 * fixed
    derived = steps_per_phase(AWMParams(batch_size=32, reference_samples=None), n_images, 32)
    assert derived == max(1, n_images // 32) * 5  # the pre-issue-#13 count depends on the data size
    assert steps_per_phase(AWMParams(), n_images, 128) == 15  # the reference's defaults


# ------------------------------------------------------------------------------------------------ ANP (item 4)


def test_anp_reference_perturbation_exceeds_eps_but_never_two_eps():
    torch.manual_seed(0)
    model = build_model("small_cnn", in_channels=1, width=4)
    for bn in model.modules():  # nonzero betas, so that the bias perturbation xi has a gradient
        if isinstance(bn, nn.BatchNorm2d):
            nn.init.uniform_(bn.weight, 0.5, 1.5), nn.init.uniform_(bn.bias, -0.5, 0.5)
    data, eps = random_defense_data(64, 32), 0.3
    for steps in (1, 3):
        res = build_defense(
            "anp", eps=eps, pgd_steps=steps, iterations=4, batch_size=32, operating_point="number", n_prune=0
        ).fit(model, data, seed=0)
        info = res.info
        assert info["perturbation"] == "reference"
        assert eps < info["max_abs_delta"] <= 2 * eps + 1e-6 and eps < info["max_abs_xi"] <= 2 * eps + 1e-6
        assert info["_last_delta"].abs().max() <= 2 * eps + 1e-6
    proj = build_defense(
        "anp", eps=eps, iterations=4, batch_size=32, perturbation="projected", operating_point="number", n_prune=0
    ).fit(model, data, seed=0)
    assert proj.info["max_abs_delta"] <= eps + 1e-6 and proj.info["max_abs_xi"] <= eps + 1e-6
    with pytest.raises(DefenseError, match="perturbation"):
        build_defense("anp", perturbation="clipped")

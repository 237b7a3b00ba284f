"""SAU (baselines/sau.py): the shared-adversarial-example step, the unlearning loss, the step counts,
the hyperparameter checks, and that it removes the backdoor of the session's tiny model."""

import math

import pytest
import torch
import torch.nn.functional as F

from baselines import DefenseError, PassCounter, build_defense
from baselines.sau import (
    SAUParams,
    batches_per_round,
    js_divergence,
    shared_adversarial_perturbation,
    shared_pgd_loss,
    shared_unlearning_loss,
    unlearning_targets,
)
from onp.metrics import evaluate_backdoor
from onp.models import build_model

from .conftest import random_defense_data


def _two_models():
    """A small model and a differently initialised one of the same architecture (eval mode)."""
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1, width=4).eval()
    torch.manual_seed(1)
    ref = build_model("small_cnn", num_classes=10, in_channels=1, width=4).eval()
    return model, ref


# ------------------------------------------------------------------------------------------------ PGD step


def test_pgd_loss_drops_fooled_examples_from_ce_and_shared_ones_from_js():
    # 3 classes, true label and both clean predictions 0. On x + delta:
    # a: neither model fooled; b: only f fooled; c: both fooled, to different labels; d: both -> label 1 (shared)
    z = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 5.0, 0], [0, 5.0, 0]], requires_grad=True)
    z_ref = torch.tensor([[4.0, 1, 0], [5.0, 0, 0], [0, 0, 5.0], [0, 4.0, 0]], requires_grad=True)
    y = c = c_ref = torch.zeros(4, dtype=torch.long)
    beta_1, beta_2 = 0.01, 1.0
    loss, shared = shared_pgd_loss(z, z_ref, y, c, c_ref, beta_1, beta_2)
    assert shared.tolist() == [False, False, False, True]

    ce, ce_ref = F.cross_entropy(z, y, reduction="none"), F.cross_entropy(z_ref, y, reduction="none")
    pa, pb = F.softmax(z, 1), F.softmax(z_ref, 1)
    m = (pa + pb) / 2
    js = 0.5 * (pa * (pa / m).log()).sum(1) + 0.5 * (pb * (pb / m).log()).sum(1)
    expected = beta_1 * -(ce[0] + ce_ref[0] + ce_ref[1]) / 8 + beta_2 * js[:3].sum() / 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    gz, gz_ref = torch.autograd.grad(loss, [z, z_ref])
    assert torch.all(gz[3] == 0) and torch.all(gz_ref[3] == 0)  # a shared example contributes nothing
    assert all(gz[i].abs().sum() > 0 for i in range(3)) and all(gz_ref[i].abs().sum() > 0 for i in range(3))


def test_js_divergence_is_symmetric_zero_on_agreement_and_at_most_log2():
    a, b = torch.randn(6, 10), torch.randn(6, 10)
    assert torch.allclose(js_divergence(a, b), js_divergence(b, a))
    assert torch.allclose(js_divergence(a, a), torch.zeros(6), atol=1e-7)
    far = js_divergence(torch.tensor([[30.0, 0]]), torch.tensor([[0.0, 30]]))
    assert 0.69 < far.item() <= math.log(2) + 1e-6


@pytest.mark.parametrize(
    "norm_type, bound, clip",
    [("linf", 0.2, False), ("linf", 0.2, True), ("l2", 1.5, False), ("l1", 20.0, False), ("linf", 0.1, True)],
)
def test_shared_perturbation_respects_the_norm_budget(norm_type, bound, clip):
    model, ref = _two_models()
    d = random_defense_data(n_train=16)
    x, y = d.train_x, d.train_y
    with torch.no_grad():
        c, c_ref = model(x).argmax(1), ref(x).argmax(1)
    p = SAUParams(norm_type=norm_type, trigger_norm=bound, adv_lr=0.2, adv_steps=5, clip_images=clip)
    counter = PassCounter()
    delta, steps = shared_adversarial_perturbation(model, ref, x, y, c=c, c_ref=c_ref, p=p, counter=counter)
    assert 1 <= steps <= 5 and counter.backward_count == steps and counter.forward == 2 * steps
    flat = delta.flatten(1)
    norms = {"linf": flat.abs().amax(1), "l2": flat.norm(dim=1), "l1": flat.abs().sum(1)}[norm_type]
    assert torch.all(norms <= bound * (1 + 1e-5)) and norms.max() > 0.5 * bound
    if clip:
        assert torch.all(x + delta >= 0) and torch.all(x + delta <= 1)
    elif norm_type == "linf" and bound == p.adv_lr:
        # the reference's regime: start at +eps, signed steps of eps, clamp -> every entry is -eps, 0 or +eps
        levels = torch.tensor([-bound, 0.0, bound])
        assert torch.all((delta.unsqueeze(-1) - levels).abs().amin(-1) < 1e-6)
    assert all(q.grad is None for q in [*model.parameters(), *ref.parameters()])  # gradients w.r.t. delta only


def test_pgd_stops_after_a_step_that_started_with_every_example_shared():
    model, _ = _two_models()
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    never = torch.full((8,), -1)  # "clean predictions" that every perturbed prediction differs from
    counter = PassCounter()
    p = SAUParams(adv_steps=5)
    _, steps = shared_adversarial_perturbation(model, model, x, y, c=never, c_ref=never, p=p, counter=counter)
    assert steps == 1  # same model twice, both "fooled", same label: all shared before the first step


# ------------------------------------------------------------------------------------------------ unlearning


def test_unlearning_loss_selects_examples_that_fool_the_reference_model():
    y = torch.zeros(5, dtype=torch.long)
    c_ref = torch.tensor([0, 1, 2, 0, 0])  # the reference's clean predictions
    y_adv_ref = torch.tensor([0, 1, 1, 3, 2])  # its predictions on x + delta
    selected = unlearning_targets(y, c_ref, y_adv_ref)
    # 0: still the true label; 1: unchanged by the perturbation; 2-4: flipped to a wrong label
    assert selected.tolist() == [False, False, True, True, True]

    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)).mul(0.5).requires_grad_(True)
    loss = shared_unlearning_loss(logits, y_adv_ref, selected)
    prob = F.softmax(logits, 1).detach()
    p_adv = prob[torch.arange(5), y_adv_ref]
    assert 0.001 < p_adv.min() and p_adv.max() < 0.999  # no clamp active: the loss is exactly -log(1 - p)
    expected = -torch.log(1 - p_adv[selected]).sum() / 5
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)

    (g,) = torch.autograd.grad(loss, [logits])
    assert torch.all(g[:2] == 0)  # unselected examples are not unlearned
    assert torch.all(g[2:][torch.arange(3), y_adv_ref[2:]] > 0)  # descending lowers p(reference's adv label)
    none = shared_unlearning_loss(logits, y_adv_ref, torch.zeros(5, dtype=torch.bool))
    assert none.item() == 0.0


# ------------------------------------------------------------------------------------------------ steps, counts


def test_steps_per_round_follow_the_reference_count_and_passes_are_exact():
    assert batches_per_round(SAUParams(), 250) == 10  # ceil(2500 / 256): the reference's 1,000 steps
    assert batches_per_round(SAUParams(reference_samples=None), 250) == 1
    model, _ = _two_models()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = random_defense_data(n_train=40, n_val=20)
    res = build_defense("sau", batch_size=16, n_rounds=2, reference_samples=100, adv_steps=2).fit(model, data, seed=0)
    info = res.info
    assert info["batches_per_round"] == 7 and info["n_updates"] == 14 and info["batch_size"] == 16
    k = info["pgd_steps"]
    assert 14 <= k <= 28
    # 2 defense-val evaluations; per batch 2 clean predictions, 2 per PGD step, 2 in the update
    assert (res.forward_passes, res.backward_passes) == (2 + 14 * 4 + 2 * k, k + 14)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())  # the input is untouched
    assert res.scores is None and res.pruned is None and 0 <= info["val_acc_after"] <= 1
    big = build_defense("sau", n_rounds=1, reference_samples=None, adv_steps=1).fit(model, data, seed=0)
    assert big.info["batch_size"] == 40 and big.info["n_updates"] == 1  # a batch larger than the set: the set


def test_whole_pool_without_validation_images_reports_no_val_accuracy():
    data = random_defense_data(n_train=20, n_val=10).whole_pool()
    model, _ = _two_models()
    res = build_defense("sau", n_rounds=1, reference_samples=None, adv_steps=1).fit(model, data, seed=0)
    assert res.info["n_images"] == 30 and res.info["val_acc_before"] is None and res.info["val_acc_after"] is None


# ------------------------------------------------------------------------------------------------ hyperparameters


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(n_rounds=0), "n_rounds must be >= 1"),
        (dict(adv_steps=0), "adv_steps must be >= 1"),
        (dict(reference_samples=0), "reference_samples must be >= 1 or null"),
        (dict(norm_type="L_inf"), "unknown norm_type 'L_inf'; valid: linf, l2, l1"),
        (dict(pgd_init="random"), "unknown pgd_init 'random'; valid: max, min, zero"),
        (dict(trigger_norm=2.0), r"trigger_norm must be > 0 \(and <= 1 for norm_type='linf'"),
        (dict(trigger_norm=0.0, norm_type="l2"), "trigger_norm must be > 0"),
        (dict(lr=0.0), "need lr > 0"),
        (dict(adv_lr=-0.2), "adv_lr > 0"),
        (dict(lmd_3=-1.0), "loss weights must be >= 0"),
        (dict(lmd_1=0.0, lmd_3=0.0), r"lmd_1 \+ lmd_2 \+ lmd_3 > 0"),
        (dict(beta_2=-1.0), "loss weights must be >= 0"),
        (dict(n_rounds=2.5), "n_rounds must be an integer"),
        (dict(lr=float("nan")), "lr must be a finite number"),
        (dict(pgd_steps=5), r"unknown hyperparameter\(s\) \['pgd_steps'\].*adv_steps"),
    ],
)
def test_bad_hyperparameters_are_refused_with_a_clear_error(params, message):
    with pytest.raises(DefenseError, match=message):
        build_defense("sau", **params)


def test_defaults_are_the_reference_configuration():
    d = SAUParams().to_dict()
    assert {k: d[k] for k in ("n_rounds", "batch_size", "lr", "weight_decay", "amsgrad")} == {
        "n_rounds": 100,
        "batch_size": 256,
        "lr": 1e-4,
        "weight_decay": 0.0,
        "amsgrad": True,
    }
    assert (d["norm_type"], d["trigger_norm"], d["adv_lr"], d["adv_steps"], d["pgd_init"]) == (
        "linf",
        0.2,
        0.2,
        5,
        "max",
    )
    assert (d["beta_1"], d["beta_2"], d["lmd_1"], d["lmd_2"], d["lmd_3"]) == (0.01, 1.0, 1.0, 0.0, 1.0)
    assert (d["clip_images"], d["train_mode"], d["augment"], d["outer_steps"]) == (False, False, False, 1)


# ------------------------------------------------------------------------------------------------ the backdoor


def test_sau_lowers_asr_on_the_tiny_backdoored_model(tiny_bundle):
    b = tiny_bundle
    x, y = b.test_x[:500], b.test_y[:500]
    before = evaluate_backdoor(b.model, x, y, b.attack)
    assert before["asr"] > 0.9
    # a short run: 8 updates at 10x the reference lr (the defaults run 1,000 updates)
    fast = dict(n_rounds=4, reference_samples=None, batch_size=75, lr=1e-3, adv_steps=2)
    res = build_defense("sau", **fast).fit(b.model, b.defense_data, seed=0)
    after = evaluate_backdoor(res.model, x, y, b.attack)
    assert res.info["n_updates"] == 8
    assert after["asr"] < 0.35 and after["asr"] < before["asr"] - 0.5
    assert after["acc"] > 0.4 and after["ra"] > 0.3  # still a classifier (chance is 0.1), triggers mostly repaired
    # the same run without the shared-adversarial term (clean CE only) keeps the backdoor
    ctrl = build_defense("sau", **fast, lmd_3=0.0).fit(b.model, b.defense_data, seed=0)
    assert evaluate_backdoor(ctrl.model, x, y, b.attack)["asr"] > 0.6

"""FST (baselines/fst.py): the feature-shift term and head re-initialisation of Min et al. (NeurIPS
2023), that it removes the tiny backdoor, and that bad hyperparameters are refused.

Small untrained models with random data, except the ASR test (``tiny_bundle`` in conftest.py).
"""

import math

import pytest
import torch
from torch import nn

from baselines import DefenseError, build_defense
from baselines.fst import add_shift_gradient, cosine_to, feature_shift, reinit_head
from onp.metrics import evaluate_backdoor
from onp.models import build_model

from .conftest import random_defense_data, state_copy

# ------------------------------------------------------------------------------------------------ the method


def test_shift_term_is_the_inner_product_with_the_original_head_and_grows_with_alignment():
    g = torch.Generator().manual_seed(0)
    w_ori = torch.randn(10, 16, generator=g)
    c = w_ori.norm()
    assert feature_shift(w_ori, w_ori) == pytest.approx(float(c**2), rel=1e-5)
    assert feature_shift(-w_ori, w_ori) == pytest.approx(-float(c**2), rel=1e-5)
    # on the sphere ||W|| = C the term is C^2 cos(theta): 0 when orthogonal, increasing with alignment
    u = torch.randn(10, 16, generator=g)
    u = u - feature_shift(u, w_ori) / c**2 * w_ori
    u = u / u.norm()
    assert feature_shift(c * u, w_ori) == pytest.approx(0.0, abs=1e-3)
    thetas = torch.linspace(math.pi, 0.0, 7)
    terms = [float(feature_shift(c * (torch.cos(t) * w_ori / c + torch.sin(t) * u), w_ori)) for t in thetas]
    assert all(a < b for a, b in zip(terms, terms[1:]))
    assert terms[-1] == pytest.approx(float(c**2), rel=1e-4)
    assert cosine_to(-w_ori, w_ori) == pytest.approx(-1.0) and cosine_to(c * u, w_ori) == pytest.approx(0.0, abs=1e-5)


def test_shift_gradient_hook_equals_the_gradient_of_ce_plus_alpha_times_the_term():
    torch.manual_seed(0)
    head, alpha = nn.Linear(8, 5), 0.2
    w_ori = torch.randn(5, 8)
    x, y = torch.randn(16, 8), torch.randint(0, 5, (16,))
    ce = nn.functional.cross_entropy
    (ce(head(x), y) + alpha * feature_shift(head.weight, w_ori)).backward()
    expected, head.weight.grad = head.weight.grad.clone(), None
    handle = add_shift_gradient(head.weight, w_ori, alpha)
    ce(head(x), y).backward()
    assert torch.allclose(head.weight.grad, expected, atol=1e-6)
    handle.remove()
    head.weight.grad = None
    ce(head(x), y).backward()  # removed: plain CE again
    assert not torch.allclose(head.weight.grad, expected, atol=1e-3)


def test_head_is_reinitialised_with_the_default_linear_bound_and_the_seed():
    head = nn.Linear(16, 10)
    with torch.no_grad():
        head.weight.fill_(5.0)
        head.bias.fill_(5.0)
    reinit_head(head, torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(16)
    assert head.weight.abs().max() <= bound and head.bias.abs().max() <= bound
    assert head.weight.std() > bound / 4  # spread over the interval, not a constant
    again = nn.Linear(16, 10)
    reinit_head(again, torch.Generator().manual_seed(0))
    assert torch.equal(again.weight, head.weight) and torch.equal(again.bias, head.bias)


def test_fit_keeps_the_head_norm_never_mutates_the_input_and_counts_passes_exactly():
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1, width=4).eval()
    before = state_copy(model)
    w_ori = model.linear.weight.detach().clone()
    res = build_defense("fst", batch_size=16, epochs=2, reference_samples=100).fit(model, random_defense_data(), seed=0)
    assert all(torch.equal(v, state_copy(model)[k]) for k, v in before.items())
    assert res.model is not model and res.model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert float(res.model.linear.weight.detach().norm()) == pytest.approx(float(w_ori.norm()), rel=1e-5)
    assert res.scores is None and res.pruned is None and res.wall_time > 0
    assert not any(p._backward_hooks for p in res.model.parameters())  # the shift hook is gone
    # 2 epochs x 100 images (2.5 passes over 40) in batches of 16 = 7 steps each; 3 defense-val evaluations
    assert res.info["epoch_images"] == 100 and res.info["steps"] == 14
    assert (res.forward_passes, res.backward_passes) == (14 + 3, 14)
    assert [row["lr"] for row in res.info["history"][1:]] == pytest.approx([0.01, 0.005])  # cosine, per epoch
    one_pass = build_defense("fst", batch_size=16, epochs=1, reference_samples=None).fit(
        model, random_defense_data(), seed=0
    )
    assert one_pass.info["steps"] == 3 and one_pass.backward_passes == 3


def test_without_defense_val_images_fst_returns_the_last_epoch_and_refuses_best_val():
    d = random_defense_data()
    pool = d.whole_pool()  # protocol=paper's defense data
    model = build_model("small_cnn", num_classes=10, in_channels=1, width=4)
    res = build_defense("fst", batch_size=16, epochs=2, reference_samples=None).fit(model, pool, seed=0)
    assert [row["val_acc"] for row in res.info["history"]] == [None, None, None]
    assert res.info["returned_epoch"] == 2 and (res.forward_passes, res.backward_passes) == (8, 8)
    with pytest.raises(DefenseError, match="checkpoint=best_val chooses the epoch on defense-validation"):
        build_defense("fst", batch_size=16, checkpoint="best_val").fit(model, pool, seed=0)
    best = build_defense("fst", batch_size=16, epochs=2, checkpoint="best_val").fit(model, d, seed=0)
    vals = [row["val_acc"] for row in best.info["history"][1:]]
    assert best.info["returned_epoch"] == max(e for e, v in enumerate(vals, 1) if v == max(vals))


def test_fst_removes_the_tiny_backdoor_and_moves_the_head_away_unlike_ft(tiny_bundle):
    bundle = tiny_bundle
    x, y = bundle.test_x[:500], bundle.test_y[:500]  # ~450 triggered non-target images are enough
    before = evaluate_backdoor(bundle.model, x, y, bundle.attack)
    fst = build_defense("fst", epochs=2).fit(bundle.model, bundle.defense_data, seed=0)  # 16 of the 80 steps
    after = evaluate_backdoor(fst.model, x, y, bundle.attack)
    assert before["asr"] > 0.8
    assert after["asr"] < 0.2 * before["asr"], (before, after)
    assert after["acc"] > 0.2  # well above chance (0.1): not a constant-output model
    ft = build_defense("ft", epochs=1).fit(bundle.model, bundle.defense_data, seed=0)
    w_ori = bundle.model.linear.weight.detach()
    cos_fst = cosine_to(fst.model.linear.weight.detach(), w_ori)
    assert cos_fst == pytest.approx(fst.info["cos_to_original"])
    assert cos_fst < 0.0 < cosine_to(ft.model.linear.weight.detach(), w_ori)
    assert float(fst.model.linear.weight.detach().norm()) == pytest.approx(float(w_ori.norm()), rel=1e-5)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(alpha=-0.1), "alpha must be >= 0"),
        (dict(lr=0.0), "need lr > 0"),
        (dict(momentum=1.0), "0 <= momentum < 1"),
        (dict(weight_decay=-1e-4), "weight_decay >= 0"),
        (dict(epochs=0), "epochs and batch_size must be >= 1"),
        (dict(batch_size=0), "epochs and batch_size must be >= 1"),
        (dict(reference_samples=0), "reference_samples must be >= 1 or null"),
        (dict(checkpoint="best"), "unknown checkpoint 'best'; valid: last, best_val"),
        (dict(alpha="big"), "alpha must be a finite number"),
        (dict(epochs=2.5), "epochs must be an integer"),
        (dict(alpah=0.1), r"unknown hyperparameter\(s\) \['alpah'\].*valid: alpha"),
    ],
)
def test_bad_hyperparameters_are_refused(params, message):
    with pytest.raises(DefenseError, match=message):
        build_defense("fst", **params)


def test_models_and_data_fst_cannot_use_are_clear_errors():
    no_head = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(DefenseError, match="fst re-initialises the final nn.Linear classifier; Sequential has none"):
        build_defense("fst", batch_size=16).fit(no_head, random_defense_data(), seed=0)
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(784, 7))
    with pytest.raises(DefenseError, match="has 7 outputs but the data has 10 classes"):
        build_defense("fst", batch_size=16).fit(wrong, random_defense_data(), seed=0)
    model = build_model("small_cnn", in_channels=1, width=4)
    with pytest.raises(DefenseError, match="at least 128 defense-train images.*got 40"):
        build_defense("fst").fit(model, random_defense_data(), seed=0)
    with pytest.raises(DefenseError, match="needs the defender's clean data"):
        build_defense("fst").fit(model, None, seed=0)

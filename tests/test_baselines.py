"""Baseline defenses (baselines/): properties of each method, the operating-point rule and the CLI.

Everything runs on CPU with tiny iteration counts, on the session's tiny backdoored SmallCNN
(``tiny_bundle`` in conftest.py) or on small untrained models with random data.
"""

import copy
import json

import pytest
import torch
from torch import nn

import baselines
from baselines import DEFENSES, DefenseError, build_defense
from baselines.anp import NeuronPerturbation
from baselines.awm import AWM
from baselines.clp import channel_lipschitz
from onp.graph import neuron_layout
from onp.masks import NeuronMasks
from onp.models import build_model
from onp.registry import UnknownNameError

from .conftest import random_defense_data, state_copy

FAST = {
    "rnp": dict(batch_size=32, unlearn_epochs=6, recover_epochs=2),
    "anp": dict(batch_size=32, iterations=10),
    "awm": dict(batch_size=32, outer_epochs=2, inner=1),
    "ngf": dict(batch_size=32, iterations=10),
    "fp": dict(batch_size=32, ft_epochs=1),
    "ft": dict(batch_size=32, epochs=1),
    "fst": dict(batch_size=32, epochs=1, reference_samples=None),
    "sau": dict(batch_size=32, n_rounds=1, reference_samples=None, adv_steps=1),
    "clp": {},
    "magnitude": {},
    "random": {},
}


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle


@pytest.fixture(scope="module")
def data(bundle):
    return bundle.defense_data


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ interface


def test_registry_lists_all_methods_and_rejects_unknown():
    assert set(DEFENSES.names()) == set(FAST)
    with pytest.raises(UnknownNameError, match="anp.*rnp"):
        build_defense("nope")
    with pytest.raises(DefenseError, match="valid: .*eps"):
        build_defense("anp", epsilon=0.3)


@pytest.mark.parametrize("method", sorted(FAST))
def test_every_method_runs_and_never_mutates_the_input(method):
    model = build_model("small_cnn", num_classes=10, in_channels=1, width=4).eval()
    before = state_copy(model)
    d = random_defense_data()
    params = {**FAST[method], **({"batch_size": 16} if "batch_size" in FAST[method] else {})}
    res = build_defense(method, **params).fit(model, None if method == "clp" else d, seed=0)
    assert _same(before, state_copy(model))
    assert res.model is not model and res.model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert res.wall_time > 0 and res.forward_passes >= (0 if method == "clp" else 1)
    if res.scores is not None:
        assert res.scores.shape == (neuron_layout(model).num_neurons,)


def test_neuron_numbering_matches_the_graph():
    from onp.graph import build_neuron_graph

    for name in ("small_cnn", "resnet18"):
        m = build_model(name, in_channels=1, width=4).eval()
        g = build_neuron_graph(m, torch.zeros(1, 1, 28, 28))
        neuron_layout(m).check_same_numbering(g.layout)


def test_model_without_batchnorm_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    for method in ("rnp", "anp", "clp", "magnitude", "fp"):
        with pytest.raises(DefenseError, match="no BatchNorm2d"):
            build_defense(method, **FAST[method]).fit(model, random_defense_data(), seed=0)


def test_defense_set_smaller_than_a_batch_is_a_clear_error():
    model = build_model("small_cnn", in_channels=1, width=4)
    for method in ("rnp", "anp", "ngf", "ft", "awm"):
        with pytest.raises(DefenseError, match="at least 128 defense-train images.*got 40"):
            build_defense(method).fit(model, random_defense_data(), seed=0)
    with pytest.raises(DefenseError, match="needs the defender's clean data"):
        build_defense("anp").fit(model, None, seed=0)


def test_pass_counts_are_exact():
    model = build_model("small_cnn", in_channels=1, width=4)
    res = build_defense("ft", batch_size=16, epochs=2).fit(model, random_defense_data(40, 20), seed=0)
    # 2 epochs x ceil(40/16)=3 batches; 3 defense-val evaluations (epochs 0, 1, 2) of one batch each
    assert (res.forward_passes, res.backward_passes) == (6 + 3, 6)


# ------------------------------------------------------------------------------------------------ ANP


def test_anp_perturbation_hook_matches_the_formula():
    torch.manual_seed(0)
    model = build_model("small_cnn", in_channels=1, width=4).eval()
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            nn.init.uniform_(bn.weight, 0.5, 1.5), nn.init.uniform_(bn.bias, -0.5, 0.5)
    layout = neuron_layout(model)
    m = torch.rand(layout.num_neurons)
    masks = NeuronMasks(model, layout.bn_names, mode="gamma")
    masks.set_mask(m)
    pert = NeuronPerturbation(model, layout, eps=0.4)
    pert.reset(True, torch.Generator().manual_seed(1))
    pert.enabled = True
    x = torch.rand(3, 1, 28, 28)
    got = model(x)
    pert.remove(), masks.remove()
    ref = copy.deepcopy(model)  # same BN with gamma*(m+delta) and beta*(1+xi)
    with torch.no_grad():
        for layer in layout.layers:
            bn = ref.get_submodule(layer.bn_name)
            bn.weight.mul_(m[layer.slice] + pert.delta[layer.slice])
            bn.bias.mul_(1 + pert.xi[layer.slice])
    assert torch.allclose(got, ref(x), atol=1e-5)


def test_anp_projected_perturbations_stay_within_eps_and_masks_in_unit_interval(bundle, data):
    res = build_defense("anp", eps=0.3, iterations=15, batch_size=32, perturbation="projected").fit(
        bundle.model, data, seed=0
    )
    info = res.info
    # random start in [-eps, eps] plus a step of eps would reach 2*eps without the projection
    # (the default, perturbation="reference": tests/test_baselines_reference.py)
    assert 0.29 < info["max_abs_delta"] <= 0.3 + 1e-6 and 0.29 < info["max_abs_xi"] <= 0.3 + 1e-6
    assert info["_last_delta"].abs().max() <= 0.3 + 1e-6
    mask = info["_mask"]
    assert mask.min() >= 0 and mask.max() <= 1 and mask.min() < 1  # the masks moved
    assert torch.allclose(res.scores, 1 - mask)
    thr = build_defense("anp", iterations=5, batch_size=32, operating_point="threshold", threshold=0.9)
    r2 = thr.fit(bundle.model, data, seed=0)
    assert sorted(r2.pruned) == sorted(torch.nonzero(r2.info["_mask"] <= 0.9).flatten().tolist())


# ------------------------------------------------------------------------------------------------ RNP


def test_rnp_unlearning_stops_at_threshold_and_recovery_touches_only_masks(bundle, data):
    original = state_copy(bundle.model)
    res = build_defense("rnp", keep_intermediate=True, **FAST["rnp"]).fit(bundle.model, data, seed=0)
    info = res.info
    assert info["unlearning_reached_threshold"] is True
    assert info["unlearning_train_acc"] <= 0.2
    assert all(h["train_acc"] > 0.2 for h in info["unlearning_history"][:-1])  # stopped at the *first* such epoch
    unlearned = info["_unlearned_model"]
    for name, p in unlearned.named_parameters():  # recovery changed no weight of the unlearned model
        assert torch.equal(p, info["_unlearned_params"][name]), name
    assert not torch.equal(info["_unlearned_params"]["conv1.weight"], original["conv1.weight"])
    mask = info["_mask"]
    assert mask.min() >= 0 and mask.max() <= 1
    # pruning is applied to the ORIGINAL weights: only the pruned neurons' gammas differ (set to 0)
    layout = neuron_layout(bundle.model)
    out = res.model.state_dict()
    zeroed = set()
    for layer in layout.layers:
        key = f"{layer.bn_name}.weight"
        diff = torch.nonzero(out[key] != original[key]).flatten().tolist()
        assert torch.all(out[key][diff] == 0)
        zeroed |= {layer.offset + c for c in diff}
    assert zeroed <= set(res.pruned) and len(res.pruned) > 0
    for k in original:
        if not k.endswith(".weight") or not any(k == f"{layer.bn_name}.weight" for layer in layout.layers):
            assert torch.equal(out[k], original[k]), k  # betas, convs, running stats untouched


def test_rnp_max_epoch_guard(bundle, data):
    res = build_defense(
        "rnp",
        batch_size=32,
        unlearn_epochs=1,
        clean_threshold=0.0,
        recover_epochs=1,
        operating_point="number",
        n_prune=2,
    ).fit(bundle.model, data, seed=0)
    assert res.info["unlearning_reached_threshold"] is False and "never reached" in res.info["note"]
    assert len(res.pruned) == 2


# ------------------------------------------------------------------------------------------------ AWM


def test_awm_trigger_budget_masks_and_only_masks_change(bundle, data):
    original = state_copy(bundle.model)
    res = build_defense("awm", trigger_norm=5.0, **FAST["awm"]).fit(bundle.model, data, seed=0)
    assert all(l1 <= 5.0 + 1e-3 for l1 in res.info["trigger_l1"]) and res.info["_trigger"].abs().sum() <= 5.0 + 1e-3
    out = res.model.state_dict()
    masks = res.info["_masks"]
    assert set(masks) == {n for n, m in bundle.model.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(out) == set(original)
    for k, v in original.items():
        conv = k[: -len(".weight")]
        if conv in masks:
            m = masks[conv]
            assert m.shape == v.shape and m.min() >= 0 and m.max() <= 1
            assert torch.allclose(out[k], v * m)
        else:
            assert torch.equal(out[k], v), k
    assert AWM().trigger_budget((1, 28, 28)) == pytest.approx(1000 * 784 / 3072)
    assert AWM().trigger_budget((3, 32, 32)) == 1000
    one = build_defense("awm", one_shot=True, n_aug=2, outer_epochs=1, inner=1).fit(bundle.model, data, seed=0)
    assert one.info["n_images"] == 30


# ------------------------------------------------------------------------------------------------ NGF


def test_ngf_scope_last_changes_only_the_last_layer(bundle, data):
    original = state_copy(bundle.model)
    res = build_defense("ngf", scope="last", **FAST["ngf"]).fit(bundle.model, data, seed=0)
    out = res.model.state_dict()
    for k in original:
        if k.startswith("linear."):
            assert not torch.equal(out[k], original[k]), k
        else:
            assert torch.equal(out[k], original[k]), k
    assert res.scores is None and res.pruned is None


# ------------------------------------------------------------------------------------------------ CLP


def test_clp_is_data_free_and_prunes_the_planted_channel():
    torch.manual_seed(0)
    model = build_model("small_cnn", in_channels=1, width=8).eval()  # bn3/bn4 have 16 channels
    with torch.no_grad():
        model.conv3.weight[5] *= 50.0
    layout = neuron_layout(model)
    res = build_defense("clp").fit(model, None, seed=0)
    off = layout.layers[layout.bn_names.index("bn3")].offset
    assert off + 5 in res.pruned
    expected = []
    for layer in layout.layers:  # exactly the channels with UCLC > mean + 3 std in their layer
        u = channel_lipschitz(model.get_submodule(layer.conv_name), model.get_submodule(layer.bn_name))
        expected += [layer.offset + int(c) for c in torch.nonzero(u > u.mean() + 3 * u.std()).flatten()]
    assert sorted(res.pruned) == sorted(expected)
    assert res.model.bn3.weight[5] == 0 and res.model.bn3.bias[5] == 0  # channel removed
    assert res.scores[off + 5] > 3


# ------------------------------------------------------------------------------------------------ magnitude / random


def test_magnitude_prunes_lowest_gamma_first_and_random_is_seeded():
    model = build_model("small_cnn", in_channels=1, width=4).eval()
    layout = neuron_layout(model)
    gammas = torch.linspace(1.0, 2.0, layout.num_neurons)
    gammas[[7, 3, 20]] = torch.tensor([0.01, -0.02, 0.03])
    with torch.no_grad():
        for layer in layout.layers:
            model.get_submodule(layer.bn_name).weight.copy_(gammas[layer.slice])
    res = build_defense("magnitude", operating_point="number", n_prune=3).fit(model, None, seed=0)
    assert res.pruned == [7, 3, 20]
    rd = lambda s: build_defense("random", operating_point="number", n_prune=5).fit(model, None, seed=s)  # noqa
    assert rd(1).pruned == rd(1).pruned and rd(1).pruned != rd(2).pruned


# ------------------------------------------------------------------------------------------------ operating point


class _NoTestBundle:
    """A bundle whose test data and trigger raise when touched."""

    def __init__(self, bundle):
        self.model, self.spec, self.meta, self._dd = bundle.model, bundle.spec, bundle.meta, bundle.defense_data

    @property
    def defense_data(self):
        return self._dd

    def _boom(self):
        raise AssertionError("the defense touched the test set / the real trigger")

    test_x = property(_boom)
    test_y = property(_boom)
    attack = property(_boom)


@pytest.mark.parametrize("method", ["anp", "magnitude"])
def test_operating_point_never_reads_test_data(bundle, method):
    from onp.baseline import defend

    res = defend(_NoTestBundle(bundle), method, FAST[method], seed=0)
    op = res.info["operating_point"]
    assert op["rule"] == "delta" and op["n_pruned"] == len(res.pruned)
    assert op["val_acc_before"] - op["val_acc_after"] <= 0.05 + 1e-9
    # the largest admissible count on the grid was chosen
    assert all(
        s["n_pruned"] <= op["n_pruned"] for s in op["val_sweep"] if op["val_acc_before"] - s["val_acc"] <= 0.05 + 1e-9
    )


def test_pruning_grid():
    assert baselines.pruning_grid(48, 0.5) == list(range(25))
    g = baselines.pruning_grid(4800, 0.5)
    assert g[:5] == [0, 1, 2, 4, 8] and 48 in g and 2400 in g and max(g) == 2400


# ------------------------------------------------------------------------------------------------ features


def test_score_feature_providers(bundle, data):
    from baselines.features import make_score_provider
    from onp.graph import build_neuron_graph, compute_node_features

    baselines.register_score_providers()  # explicit: importing baselines registers nothing
    g = build_neuron_graph(bundle.model, torch.zeros(1, 1, 28, 28))
    x, names = compute_node_features(bundle.model, g, providers=("magnitude_score", "clp_score"), standardize=False)
    assert x.shape == (g.num_nodes, 2) and names == ["magnitude_score", "clp_score"]
    gammas = torch.cat([bundle.model.get_submodule(layer.bn_name).weight.detach().abs() for layer in g.layers])
    assert torch.allclose(x[:, 0], -gammas)
    prov = make_score_provider("anp", data, iterations=3, batch_size=32)
    s1 = prov(bundle.model, g, None)
    assert s1.shape == (g.num_nodes,) and torch.equal(s1, prov(bundle.model, g, None))  # cached
    x2, _ = compute_node_features(bundle.model, g, providers=("fp_score",), data=data.train_x[:64])
    assert x2.shape == (g.num_nodes, 1)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_end_to_end_and_refuses_to_overwrite(bundle, onp_cache, tmp_path, capsys):
    from onp.baseline import main
    from onp.cli_common import run_cli

    cfg = bundle.config
    out = tmp_path / "run"
    argv = [
        "--defense",
        "magnitude",
        "--model",
        cfg.model,
        "--width",
        str(cfg.width),
        "--data-source",
        cfg.data_source,
        "--epochs",
        str(cfg.epochs),
        "--max-train",
        str(cfg.max_train),
        "--defense-size",
        str(cfg.defense_size),
        "--seed",
        str(cfg.seed),
        "--attack",
        cfg.attack,
        "--dataset",
        cfg.dataset,
        "--cache-dir",
        str(onp_cache),
        "--out",
        str(out),
        "--quiet",
    ]
    assert run_cli(main, argv + ["--delta", "0.1", "--oracle-max-fraction", "0.02"]) == 0
    assert "magnitude on small_cnn/badnets" in capsys.readouterr().out
    for f in (
        "config.json",
        "env.json",
        "metrics.json",
        "model.pt",
        "scores.pt",
        "pruned.json",
        "oracle_sweep.json",
        "README.md",
    ):
        assert (out / f).exists(), f
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "acc",
        "asr",
        "ra",
        "der",
        "before",
        "n_pruned",
        "wall_time",
        "forward_passes",
        "backward_passes",
        "operating_point",
    ):
        assert key in metrics, key
    assert metrics["operating_point"]["delta"] == 0.1
    pruned = json.loads((out / "pruned.json").read_text())
    assert len(pruned["indices"]) == metrics["n_pruned"] and all("[" in n for n in pruned["names"] or [])
    sweep = json.loads((out / "oracle_sweep.json").read_text())
    assert sweep["label"].startswith("oracle sweep, for analysis only") and sweep["sweep"][0]["n_pruned"] == 0
    state = torch.load(out / "model.pt", weights_only=True)
    assert set(state) == set(bundle.model.state_dict())
    assert sweep["sweep"][-1]["n_pruned"] == int(0.02 * sweep["num_neurons"])
    assert bundle.path.name in json.loads((out / "config.json").read_text())["model_dir"]  # the cached model
    assert run_cli(main, argv) == 2
    assert "already exists" in capsys.readouterr().err
    ngf = argv[:1] + ["ngf"] + argv[2:] + ["--overwrite", "--set", "iterations=3", "--set", "batch_size=32"]
    assert run_cli(main, ngf) == 0
    assert not (out / "scores.pt").exists() and json.loads((out / "oracle_sweep.json").read_text())["sweep"] == []
    assert json.loads((out / "metrics.json").read_text())["n_pruned"] == 0
    assert run_cli(main, ["--defense", "nope"]) == 2
    assert "valid choices: anp" in capsys.readouterr().err
    assert run_cli(main, ngf + ["--delta", "0.1"]) == 2  # ngf has no operating point
    assert "does not apply" in capsys.readouterr().err

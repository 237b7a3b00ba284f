"""Soft pruning masks: hooks == editing BN weights by hand, baking, gradients, structural export."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from onp.graph import build_neuron_graph
from onp.masks import MASK_MODES, NeuronMasks, apply_pruning, export_pruned_model, pruning_keeper
from onp.models import build_model

SETUPS = {"resnet18": 3, "small_cnn": 1}  # name -> input channels
_CACHE: dict = {}


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN parameters/statistics, so that gamma and channel masks differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.randn(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def setup(name: str):
    """(model in eval mode, its graph, a batch of inputs), cached per architecture."""
    if name not in _CACHE:
        torch.manual_seed(0)
        cin = SETUPS[name]
        model = build_model(name, in_channels=cin, width=4)
        randomize_bn(model)
        model.eval()
        size = 28 if cin == 1 else 32
        x = torch.rand(4, cin, size, size, generator=torch.Generator().manual_seed(1))
        _CACHE[name] = (model, build_neuron_graph(model, x), x)
    return _CACHE[name]


def fresh(name: str) -> nn.Module:
    cin = SETUPS[name]
    return build_model(name, in_channels=cin, width=4).eval()


def random_mask(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n)
    perm = torch.randperm(n, generator=g)
    mask[perm[: n // 4]] = 0.0  # hard-pruned
    mask[perm[n // 4 : n // 3]] = torch.rand(n // 3 - n // 4, generator=g)  # soft
    return mask


def edit_by_hand(model: nn.Module, graph, mask: torch.Tensor, mode: str) -> nn.Module:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer in graph.layers:
            bn = ref.get_submodule(layer.bn_name)
            m = mask[layer.offset : layer.offset + layer.num_channels]
            bn.weight.mul_(m)
            if mode == "channel":
                bn.bias.mul_(m)
    return ref


@pytest.mark.parametrize("name", list(SETUPS))
@pytest.mark.parametrize("mode", ["gamma", "channel"])
def test_masking_equals_editing_the_weights(name, mode):
    model, graph, x = setup(name)
    mask = random_mask(graph.num_nodes)
    ref = edit_by_hand(model, graph, mask, mode)
    with torch.no_grad():
        original = model(x)
        with NeuronMasks(model, graph, mode=mode) as masks:
            masks.set_mask(mask)
            masked = model(x)
        restored = model(x)
        expected = ref(x)
    assert torch.allclose(masked, expected, atol=1e-6, rtol=0), (masked - expected).abs().max()
    assert not masks.active and torch.equal(restored, original)
    assert not torch.allclose(masked, original, atol=1e-3)


def test_masking_in_float64_is_exact_to_1e_12():
    model, graph, x = setup("resnet18")
    model64, x64 = copy.deepcopy(model).double(), x.double()
    for mode in MASK_MODES.names():
        mask = random_mask(graph.num_nodes, seed=3).double()
        ref = edit_by_hand(model64, graph, mask, mode)
        with torch.no_grad(), NeuronMasks(model64, graph, mode=mode) as masks:
            masks.set_mask(mask)
            assert torch.allclose(model64(x64), ref(x64), atol=1e-12, rtol=0)


def test_masks_in_training_mode_match_edited_weights():
    model, graph, x = setup("small_cnn")
    model = copy.deepcopy(model).train()
    mask = random_mask(graph.num_nodes, seed=1)
    ref = edit_by_hand(model, graph, mask, "gamma").train()
    with NeuronMasks(model, graph) as masks:
        masks.set_mask(mask)
        assert torch.allclose(model(x), ref(x), atol=1e-5)


@pytest.mark.parametrize("name", list(SETUPS))
@pytest.mark.parametrize("mode", ["gamma", "channel"])
def test_export_state_dict_into_a_fresh_model(name, mode):
    model, graph, x = setup(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with NeuronMasks(model, graph, mode=mode) as masks:
        masks.set_mask(random_mask(graph.num_nodes, seed=2))
        with torch.no_grad():
            masked = model(x)
        state = masks.export_state_dict()
        baked = masks.apply_to(copy.deepcopy(model))
        with pytest.raises(ValueError, match="twice"):
            masks.apply_to(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "model must be unchanged"
    other = fresh(name)
    other.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(other(x), masked, atol=1e-6, rtol=0)
        assert torch.allclose(baked(x), masked, atol=1e-6, rtol=0)


def test_mask_parameter_gets_gradients():
    model, graph, x = setup("small_cnn")
    param = nn.Parameter(torch.full((graph.num_nodes,), 0.5))
    with NeuronMasks(model, graph, mode="gamma") as masks:
        masks.set_mask(param)
        assert masks.mask is param
        model(x).pow(2).sum().backward()
        masks.prune([0, 1])  # in place, no autograd error on a leaf Parameter
        assert masks.mask is param and float(param.detach()[0]) == 0.0
        masks.reset()
        assert masks.mask is param and bool((param == 1).all())
    assert param.grad is not None and param.grad.shape == (graph.num_nodes,)
    assert float(param.grad.abs().sum()) > 0


def test_prune_reset_and_indices():
    model, graph, x = setup("small_cnn")
    masks = NeuronMasks(model, graph, mode="channel")
    try:
        assert masks.pruned_indices().numel() == 0
        masks.prune([5, 2])
        masks.prune(torch.tensor([7]))
        masks.prune(2)
        assert masks.pruned_indices().tolist() == [2, 5, 7]
        with torch.no_grad():
            out = model(x)
        assert out.shape == (x.shape[0], 10)
        masks.set_mask(torch.tensor([0.5] * graph.num_nodes))
        assert masks.pruned_indices().numel() == 0 and masks.pruned_indices(threshold=0.5).numel() == graph.num_nodes
        masks.reset()
        assert bool((masks.mask == 1).all())
        with pytest.raises(ValueError, match="shape"):
            masks.set_mask(torch.ones(3))
        with pytest.raises(IndexError):
            masks.prune([graph.num_nodes])
        with pytest.raises(KeyError, match="unknown mask mode"):
            NeuronMasks(model, graph, mode="nope")
    finally:
        masks.remove()
        masks.remove()  # idempotent


def test_bn_names_constructor_matches_graph_order():
    model, graph, x = setup("resnet18")
    masks_a = NeuronMasks(model, graph.bn_names, mode="gamma")
    assert [(layer.bn_name, layer.offset, layer.num_channels) for layer in masks_a.layers] == [
        (layer.bn_name, layer.offset, layer.num_channels) for layer in graph.layers
    ]
    masks_a.prune(graph.node_index("layer2.0.bn1", 3))
    with torch.no_grad():
        out_a = model(x)
    masks_a.remove()
    with NeuronMasks(model, graph) as masks_b, torch.no_grad():
        masks_b.prune(graph.node_index("layer2.0.bn1", 3))
        assert torch.equal(model(x), out_a)
    with pytest.raises(TypeError, match="not a BatchNorm"):
        NeuronMasks(model, ["conv1"])


def test_export_pruned_model_small_cnn():
    model, graph, x = setup("small_cnn")
    pruned = [
        graph.node_index("bn2", 0),
        graph.node_index("bn2", 2),
        graph.node_index("bn3", 1),
        graph.node_index("bn4", 7),
    ]
    small = export_pruned_model(model, graph, pruned)
    assert small.bn2.num_features == 2 and small.conv3.in_channels == 2 and small.bn3.num_features == 7
    assert small.linear.in_features == 7 and model.bn2.num_features == 4  # original untouched
    with torch.no_grad(), NeuronMasks(model, graph, mode="channel") as masks:
        masks.prune(pruned)
        assert torch.allclose(small(x), model(x), atol=1e-5)
    with pytest.raises(ValueError, match="every channel"):
        export_pruned_model(model, graph, list(range(graph.layer_slice("bn1").stop)))


def test_export_pruned_model_respects_coupling():
    model, graph, x = setup("resnet18")
    stream = [graph.node_index(n, 1) for n in ("bn1", "layer1.0.bn2", "layer1.1.bn2")]  # one whole group
    single = [graph.node_index("layer1.0.bn1", 2)]
    partial = [graph.node_index("layer2.0.bn2", 0)]  # its group also has layer2.0.shortcut.1 / layer2.1.bn2
    small = export_pruned_model(model, graph, stream + single + partial)
    assert small.bn1.num_features == 3 and small.layer1[1].bn2.num_features == 3
    assert small.layer1[0].bn1.num_features == 3 and small.layer2[0].bn2.num_features == 8
    with torch.no_grad(), NeuronMasks(model, graph, mode="channel") as masks:
        masks.prune(stream + single)
        assert torch.allclose(small(x), model(x), atol=1e-5)


@pytest.mark.parametrize("mode", ["gamma", "channel"])
def test_pruning_keeper_holds_pruned_neurons_through_training_steps(mode):
    model, graph, x = setup("resnet18")
    pruned = [0, 3, 17, graph.num_nodes - 1]
    trained = copy.deepcopy(model)
    keep = pruning_keeper(trained, graph, pruned, mode)
    # written in at once: the same parameters as apply_pruning
    expected = apply_pruning(model, graph, pruned, mode).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in trained.state_dict().items())
    opt = torch.optim.SGD(trained.parameters(), lr=0.5)
    trained.train()
    for _ in range(2):
        opt.zero_grad()
        trained(x).logsumexp(1).sum().backward()
        opt.step()
        keep()
    touched = 0
    for node in pruned:
        layer = graph.layers[int(graph.node_layer[node])]
        bn = trained.get_submodule(layer.bn_name)
        c = int(graph.node_channel[node])
        assert bn.weight[c] == 0
        assert (bn.bias[c] == 0) == (mode == "channel")
        touched += int(bn.bias[c] != model.get_submodule(layer.bn_name).bias[c])
    assert mode == "channel" or touched > 0  # gamma mode: beta of a pruned neuron still trains
    first = graph.layers[0].bn_name  # its unpruned channels 1 and 2 did train
    assert not torch.equal(trained.get_submodule(first).weight[1:3], model.get_submodule(first).weight[1:3])

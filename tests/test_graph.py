"""Neuron graph, coupling groups, similarity graphs and node features (CPU, small widths)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onp.graph import (
    FEATURE_PROVIDERS,
    LAYER_TYPES,
    NeuronLayout,
    UnsupportedModelError,
    build_neuron_graph,
    build_similarity_graphs,
    compute_node_features,
    neuron_layout,
    neuron_name,
    register_feature_provider,
    trace_connectivity,
)
from onp.graph.coupling import coupling_groups
from onp.graph.neuron_graph import graph_from_connectivity
from onp.models import MODELS, build_model

WIDTH = 4
CIFAR = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
FMNIST = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(1))

_CACHE: dict = {}


def traced(name: str, in_channels: int = 3):
    """Build (and cache) a width-4 model, its connectivity and its torch-pruning coupling groups."""
    key = (name, in_channels)
    if key not in _CACHE:
        torch.manual_seed(0)
        model = build_model(name, in_channels=in_channels, width=WIDTH)
        x = CIFAR if in_channels == 3 else FMNIST
        conn = trace_connectivity(model, x)
        groups, method = coupling_groups(model, x, conn, "torch_pruning")
        _CACHE[key] = (model, conn, groups)
    return _CACHE[key]


def model_and_graph(name: str, in_channels: int = 3, top_k=16):
    """A cached model and its neuron graph (same as ``build_neuron_graph(model, x, top_k)``)."""
    model, conn, groups = traced(name, in_channels)
    return model, graph_from_connectivity(conn, groups, top_k=top_k, coupling_method="torch_pruning")


def bn_channels(model: nn.Module) -> int:
    return sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def layer_pairs(graph) -> set:
    names = graph.bn_names
    src, dst = graph.node_layer[graph.edge_index].tolist()
    return {(names[a], names[b]) for a, b in zip(src, dst)}


# ------------------------------------------------------------------------------------------------
# invariants on every registered architecture


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("in_channels", [3, 1])
def test_graph_invariants(name, in_channels):
    model, g = model_and_graph(name, in_channels)
    assert g.num_nodes == bn_channels(model)
    assert g.bn_names == [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert g.node_layer.shape == g.node_channel.shape == g.group.shape == (g.num_nodes,)
    assert sum(layer.num_channels for layer in g.layers) == g.num_nodes
    assert g.layers[0].offset == 0 and g.layers[0].depth == 0.0 and g.layers[-1].depth == 1.0
    src, dst = g.edge_index
    assert g.edge_weight.shape == (g.num_edges,) and bool((g.edge_weight > 0).all())
    assert bool((g.node_depth[src] < g.node_depth[dst]).all()), "edges must point forward in depth"
    assert int(g.in_degree().max()) <= 16
    assert set(g.group.tolist()) == set(range(g.num_groups))
    assert g.layers[0].layer_type == "stem" and g.layers[-1].layer_type == "final"
    assert all(layer.layer_type in LAYER_TYPES for layer in g.layers)
    for layer in g.layers:
        assert g.layer_slice(layer.bn_name) == slice(layer.offset, layer.offset + layer.num_channels)
        assert g.node_index(layer.bn_name, layer.num_channels - 1) == layer.offset + layer.num_channels - 1
    assert bool((g.out_strength > 0).all())


@pytest.mark.parametrize("name", MODELS.names())
def test_top_k_keeps_the_strongest(name):
    model, full = model_and_graph(name, top_k=None)
    _, capped = model_and_graph(name, top_k=16)
    _, g3 = model_and_graph(name, top_k=3)
    assert int(g3.in_degree().max()) <= 3
    assert capped.num_edges <= full.num_edges
    assert bool((torch.minimum(full.in_degree(), torch.tensor(3)) == g3.in_degree()).all())
    # the kept edges are the strongest incoming ones
    node = int(torch.argmax(full.in_degree()))
    w_full = full.edge_weight[full.edge_index[1] == node]
    w_kept = g3.edge_weight[g3.edge_index[1] == node]
    assert torch.allclose(w_kept.sort(descending=True).values, w_full.sort(descending=True).values[:3])


def test_resnet18_edges_join_connected_layers_only():
    model, full = model_and_graph("resnet18", top_k=None)
    expected, stream = set(), {"bn1"}  # BNs whose outputs are summed into the residual stream
    for s in range(1, 5):
        for b, block in enumerate(getattr(model, f"layer{s}")):
            p = f"layer{s}.{b}"
            expected |= {(src, f"{p}.bn1") for src in stream} | {(f"{p}.bn1", f"{p}.bn2")}
            if len(block.shortcut):
                expected |= {(src, f"{p}.shortcut.1") for src in stream}
                stream = {f"{p}.shortcut.1"}
            stream = stream | {f"{p}.bn2"}
    assert layer_pairs(full) == expected
    _, capped = model_and_graph("resnet18", top_k=16)
    assert layer_pairs(capped) <= expected


def test_preact_resnet18_residual_stream_accumulates():
    model, full = model_and_graph("preact_resnet18", top_k=None)
    expected, stream = set(), set()  # the stem conv reads the image: empty frontier
    for s in range(1, 5):
        for b, block in enumerate(getattr(model, f"layer{s}")):
            p = f"layer{s}.{b}"
            expected |= {(src, f"{p}.bn1") for src in stream} | {(f"{p}.bn1", f"{p}.bn2")}
            stream = ({f"{p}.bn1"} if len(block.shortcut) else stream) | {f"{p}.bn2"}
    expected |= {(src, "bn") for src in stream}
    assert layer_pairs(full) == expected


def test_layer_types():
    types = {name: {b.bn_name: b.layer_type for b in model_and_graph(name)[1].layers} for name in MODELS.names()}
    r = types["resnet18"]
    assert r["bn1"] == "stem" and r["layer1.0.bn1"] == "conv" and r["layer2.0.shortcut.1"] == "shortcut"
    assert r["layer4.1.bn2"] == "final" and r["layer4.0.bn2"] == "conv"
    p = types["preact_resnet18"]
    assert p["layer1.0.bn1"] == "stem" and p["layer1.1.bn1"] == "preact" and p["layer1.0.bn2"] == "conv"
    assert p["bn"] == "final"
    m = types["mobilenet_v2"]
    assert m["layers.0.bn2"] == "depthwise" and m["layers.0.shortcut.1"] == "shortcut" and m["bn2"] == "final"
    assert list(types["small_cnn"].values()) == ["stem", "conv", "conv", "final"]


def test_to_pyg_and_networkx_round_trip():
    _, g = model_and_graph("resnet18")
    x = torch.randn(g.num_nodes, 5)
    data = g.to_pyg(x)
    assert data.num_nodes == g.num_nodes and data.x.shape == (g.num_nodes, 5)
    assert torch.equal(data.edge_index, g.edge_index)
    assert data.edge_attr.shape == (g.num_edges, 1) and torch.equal(data.edge_attr.view(-1), g.edge_weight)
    assert g.to_pyg().x is None
    with pytest.raises(ValueError):
        g.to_pyg(torch.zeros(3, 1))
    nxg = g.to_networkx()
    assert nxg.number_of_nodes() == g.num_nodes and nxg.number_of_edges() == g.num_edges
    s, d = g.edge_index[:, 0].tolist()
    assert nxg[s][d]["weight"] == pytest.approx(float(g.edge_weight[0]))
    node = g.node_index("layer2.0.bn1", 3)
    assert nxg.nodes[node]["channel"] == 3 and nxg.nodes[node]["group"] == int(g.group[node])
    assert nxg.nodes[node]["layer"] == g.layer("layer2.0.bn1").index


def test_build_does_not_mutate_the_model():
    torch.manual_seed(0)
    model = build_model("resnet18", width=WIDTH).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    build_neuron_graph(model, torch.rand(4, 3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_node_lookup_errors():
    _, g = model_and_graph("small_cnn")
    with pytest.raises(KeyError, match="bn1"):
        g.node_index("nope", 0)
    with pytest.raises(IndexError):
        g.node_index("bn1", 99)


# ------------------------------------------------------------------------------------------------
# coupling groups


def groups_of(g, bn_name: str, channel: int) -> set:
    gid = int(g.group[g.node_index(bn_name, channel)])
    members = (g.group == gid).nonzero().view(-1).tolist()
    return {(g.layers[int(g.node_layer[n])].bn_name, int(g.node_channel[n])) for n in members}


def test_resnet18_coupling():
    _, g = model_and_graph("resnet18")
    for c in (0, WIDTH - 1):
        assert groups_of(g, "bn1", c) == {("bn1", c), ("layer1.0.bn2", c), ("layer1.1.bn2", c)}
    for s in (2, 3, 4):
        assert groups_of(g, f"layer{s}.0.bn2", 1) == {
            (f"layer{s}.0.shortcut.1", 1),
            (f"layer{s}.0.bn2", 1),
            (f"layer{s}.1.bn2", 1),
        }
    for layer in g.layers:
        if layer.bn_name.endswith(".bn1"):
            assert groups_of(g, layer.bn_name, 0) == {(layer.bn_name, 0)}
    assert g.num_groups == g.num_nodes - 2 * sum(b.num_channels for b in g.layers if b.bn_name.endswith(".1.bn2"))


def test_preact_resnet18_coupling():
    """PreAct: the tensors added into a stage's stream are conv outputs; the BNs *reading* the stream
    (each block's bn1, the next stage's first bn1, the final bn) are the coupled channels."""
    _, g = model_and_graph("preact_resnet18")
    assert groups_of(g, "layer1.0.bn1", 2) == {("layer1.0.bn1", 2), ("layer1.1.bn1", 2), ("layer2.0.bn1", 2)}
    assert groups_of(g, "layer2.1.bn1", 0) == {("layer2.1.bn1", 0), ("layer3.0.bn1", 0)}
    assert groups_of(g, "layer3.1.bn1", 5) == {("layer3.1.bn1", 5), ("layer4.0.bn1", 5)}
    assert groups_of(g, "bn", 7) == {("layer4.1.bn1", 7), ("bn", 7)}
    for layer in g.layers:
        if layer.bn_name.endswith(".bn2"):
            assert groups_of(g, layer.bn_name, 1) == {(layer.bn_name, 1)}


@pytest.mark.parametrize("name", MODELS.names())
def test_trace_coupling_agrees_with_torch_pruning(name):
    _, conn, tp_groups = traced(name)
    assert torch.equal(conn.trace_groups, tp_groups)


def test_build_neuron_graph_matches_the_pieces():
    model, conn, groups = traced("small_cnn", 1)
    g = build_neuron_graph(model, FMNIST, top_k=5)
    ref = graph_from_connectivity(conn, groups, top_k=5)
    assert g.coupling_method == "torch_pruning" and torch.equal(g.group, groups)
    assert torch.equal(g.edge_index, ref.edge_index) and torch.equal(g.edge_weight, ref.edge_weight)
    assert g.input_shape == (1, 1, 28, 28) and g.top_k == 5


def test_coupling_falls_back_to_the_trace(monkeypatch):
    import onp.graph.coupling as coupling

    def broken(*args):
        raise RuntimeError("no dependency graph for you")

    monkeypatch.setattr(coupling, "torch_pruning_groups", broken)
    model, conn, groups = traced("resnet18")
    with pytest.warns(UserWarning, match="no dependency graph"):
        g = build_neuron_graph(model, CIFAR)
    assert g.coupling_method == "trace" and torch.equal(g.group, groups)


def test_mobilenet_depthwise_channels_are_coupled():
    _, g = model_and_graph("mobilenet_v2")
    assert groups_of(g, "layers.3.bn1", 0) == {("layers.3.bn1", 0), ("layers.3.bn2", 0)}


# ------------------------------------------------------------------------------------------------
# hand-checkable models


class Tiny(nn.Module):
    """conv(1->2, 1x1) - bn - relu - [optional residual] - conv(2->3, 3x3) - bn - fc."""

    def __init__(self, residual: str = "none"):
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(1, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(2)
        self.conv_b = nn.Conv2d(2, 2, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(2)
        self.conv2 = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():  # ||W2[j, i]||_1 = 9 (i + 1)(j + 1), with mixed signs
            for j in range(3):
                for i in range(2):
                    self.conv2.weight[j, i] = (i + 1) * (j + 1) * (-1) ** i
            self.conv_b.weight.fill_(0.5)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        if self.residual == "self":
            h = h + h
        elif self.residual == "branch":
            h = h + self.bn_b(self.conv_b(h))
        out = self.bn2(self.conv2(h))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def edges_of(g) -> dict:
    return {(int(s), int(d)): float(w) for (s, d), w in zip(g.edge_index.T, g.edge_weight)}


def test_tiny_model_exact_edge_weights():
    g = build_neuron_graph(Tiny(), torch.rand(1, 1, 8, 8), top_k=None)
    assert g.num_nodes == 5 and g.bn_names == ["bn1", "bn2"]
    assert edges_of(g) == {(i, 2 + j): 9.0 * (i + 1) * (j + 1) for i in range(2) for j in range(3)}
    assert g.layers[1].conv_name == "conv2" and g.layers[1].layer_type == "final"
    g1 = build_neuron_graph(Tiny(), torch.rand(1, 1, 8, 8), top_k=1)
    assert edges_of(g1) == {(1, 2 + j): 18.0 * (j + 1) for j in range(3)}


def test_tiny_residual_adds_union_frontiers():
    g = build_neuron_graph(Tiny("self"), torch.rand(1, 1, 8, 8), top_k=None)
    assert edges_of(g) == {(i, 2 + j): 18.0 * (i + 1) * (j + 1) for i in range(2) for j in range(3)}
    g = build_neuron_graph(Tiny("branch"), torch.rand(1, 1, 8, 8), top_k=None)
    assert g.bn_names == ["bn1", "bn_b", "bn2"]
    e = edges_of(g)
    assert all(e[(i, 2 + j)] == 0.5 for i in range(2) for j in range(2))  # bn1 -> bn_b via the 1x1 conv
    for i in range(2):
        for j in range(3):  # bn2 sees bn1 (identity) and bn_b through the same conv2 slice
            assert e[(i, 4 + j)] == e[(2 + i, 4 + j)] == 9.0 * (i + 1) * (j + 1)
    assert int(g.group[0]) == int(g.group[2]) and int(g.group[1]) == int(g.group[3])


def test_grouped_conv_edges_stay_within_groups():
    class DW(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)
            self.dw, self.bn2 = nn.Conv2d(2, 4, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(4)
            with torch.no_grad():
                self.dw.weight.copy_(torch.arange(1.0, 5.0).view(4, 1, 1, 1).expand(4, 1, 3, 3))

        def forward(self, x):
            return self.bn2(self.dw(F.relu(self.bn1(self.conv1(x)))))

    g = build_neuron_graph(DW(), torch.rand(1, 1, 6, 6), top_k=None)
    assert edges_of(g) == {(0, 2): 9.0, (0, 3): 18.0, (1, 4): 27.0, (1, 5): 36.0}
    assert g.layers[1].layer_type == "final" and g.layers[0].layer_type == "stem"


class Cat(nn.Module):
    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        a, b = self.bn1(self.conv1(x)), self.bn2(self.conv2(x))
        return torch.cat([a, b], dim=1) if self.op == "cat" else a * b


def test_unsupported_ops_are_named():
    with pytest.raises(UnsupportedModelError, match=r"cat.*torch\.cat"):
        build_neuron_graph(Cat("cat"), CIFAR)
    with pytest.raises(UnsupportedModelError, match=r"'mul'.*operator\.mul.*two activation"):
        build_neuron_graph(Cat("mul"), CIFAR)


def test_unsupported_module_and_untraceable_model():
    class Soft(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Softmax(dim=1)

        def forward(self, x):
            return self.act(self.bn(self.conv(x)))

    with pytest.raises(UnsupportedModelError, match=r"act.*Softmax"):
        build_neuron_graph(Soft(), CIFAR)

    class Branchy(Soft):
        def forward(self, x):
            y = self.bn(self.conv(x))
            return y if y.sum() > 0 else -y

    with pytest.raises(UnsupportedModelError, match="could not trace Branchy"):
        build_neuron_graph(Branchy(), CIFAR)


def test_generic_cnn_with_view_mean_dropout_identity():
    class Generic(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.1), nn.Identity(), nn.MaxPool2d(2)
            )
            self.conv, self.bn = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)
            self.fc = nn.Linear(5 * 4, 2)

        def forward(self, x):
            y = self.bn(self.conv(self.body(x)))
            y = F.avg_pool2d(y, 2) + y.mean((2, 3), keepdim=True)
            return self.fc(y.view(y.size(0), -1))

    g = build_neuron_graph(Generic(), torch.rand(1, 1, 16, 16), top_k=None)
    assert g.num_nodes == 8 and g.num_edges == 15
    assert g.layers[1].layer_type == "final" and bool((g.out_strength > 0).all())


# ------------------------------------------------------------------------------------------------
# ONP-style similarity graphs


def test_similarity_graphs_shapes_and_threshold():
    model, g = model_and_graph("resnet18")
    graphs = build_similarity_graphs(model, g)
    assert len(graphs) == len(g.layers)
    for data, layer in zip(graphs, g.layers):
        assert data.num_nodes == layer.num_channels == data.x.shape[0]
        assert data.layer_name == layer.bn_name and data.node_offset == layer.offset
        s, d = data.edge_index
        assert bool((s != d).all())
        unit = F.normalize(data.x, dim=1)
        cos = (unit[s] * unit[d]).sum(1)
        assert torch.allclose(cos, data.edge_attr.view(-1), atol=1e-5)
        assert bool((data.edge_attr > data.threshold).all())
        assert set(zip(s.tolist(), d.tolist())) == set(zip(d.tolist(), s.tolist()))  # undirected
    everything = build_similarity_graphs(model, g, threshold=-1.0)
    for data in everything:
        c = data.num_nodes - int(data.dormant.sum())
        assert data.edge_index.shape[1] == c * (c - 1)
    # the last layer's vectors are its weights into the classifier
    assert graphs[-1].x.shape == (g.layers[-1].num_channels, 10)


def test_similarity_default_quantile_and_dormant_neurons():
    torch.manual_seed(0)
    model = build_model("small_cnn", in_channels=1, width=8)
    with torch.no_grad():
        model.conv2.weight[:, 5] = 0.0  # bn1 channel 5 feeds nothing: dormant
    g = build_neuron_graph(model, FMNIST)
    data = build_similarity_graphs(model, g, quantile=0.5)[0]
    assert bool(data.dormant[5]) and int(data.dormant.sum()) == 1
    assert 5 not in data.edge_index.view(-1).tolist()
    active = 7
    pairs = data.edge_index.shape[1] // 2
    assert pairs == pytest.approx(0.5 * active * (active - 1) / 2, abs=1)
    with pytest.raises(ValueError):
        build_similarity_graphs(model, g, quantile=1.5)


# ------------------------------------------------------------------------------------------------
# node features


def test_node_features_shapes_names_and_standardisation():
    model, g = model_and_graph("small_cnn", in_channels=1)
    data = torch.rand(20, 1, 28, 28)
    x, names = compute_node_features(model, g, data=data, batch_size=8)
    assert x.shape == (g.num_nodes, len(names)) == (g.num_nodes, 1 + len(LAYER_TYPES) + 4 + 2 + 2)
    assert names[:2] == ["depth", "type_stem"] and "act_std" in names and "out_weight_l1" in names
    assert torch.allclose(x.mean(0), torch.zeros(len(names)), atol=1e-5)
    raw, _ = compute_node_features(model, g, data=data, standardize=False)
    assert torch.equal(
        raw[:, names.index("bn_gamma")], torch.cat([model.get_submodule(n).weight.detach() for n in g.bn_names])
    )
    conv1 = model.conv1.weight.detach()
    assert torch.allclose(raw[:4, names.index("in_weight_l1")], conv1.abs().sum((1, 2, 3))[:4])
    with torch.no_grad():  # activation stats of bn2 by hand
        model.eval()
        h = model.bn2(model.conv2(F.relu(model.bn1(model.conv1(model.normalize(data))))))
    sl = g.layer_slice("bn2")
    assert torch.allclose(raw[sl, names.index("act_mean")], h.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(raw[sl, names.index("act_std")], h.std((0, 2, 3), unbiased=False), atol=1e-4)


def test_activation_provider_needs_data():
    model, g = model_and_graph("small_cnn", in_channels=1)
    with pytest.raises(ValueError, match="activation.*data"):
        compute_node_features(model, g)
    x, names = compute_node_features(model, g, providers=("structure", "bn", "weight_norms"))
    assert x.shape == (g.num_nodes, len(names))


def test_custom_feature_provider():
    model, g = model_and_graph("small_cnn", in_channels=1)

    @register_feature_provider("test_channel_parity", names=["parity"])
    def parity(model, graph, data):
        return (graph.node_channel % 2).float()

    try:
        x, names = compute_node_features(model, g, providers=("structure", "test_channel_parity"), standardize=False)
        assert names[-1] == "parity" and torch.equal(x[:, -1], (g.node_channel % 2).float())
        with pytest.raises(ValueError, match="already registered"):
            register_feature_provider("test_channel_parity")(parity)
    finally:
        FEATURE_PROVIDERS._items.pop("test_channel_parity", None)
    with pytest.raises(KeyError, match="unknown feature provider"):
        compute_node_features(model, g, providers=("test_channel_parity",))


def test_coupling_found_on_a_frozen_model():
    """Defenses and the env freeze parameters; the residual coupling must not depend on that."""
    from onp.graph import build_neuron_graph
    from onp.models import build_model

    m = build_model("resnet18", in_channels=1, width=4).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    g = build_neuron_graph(m, torch.rand(2, 1, 28, 28))
    assert int(torch.bincount(g.group).max()) == 3
    assert not any(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "preact_resnet18", "mobilenet_v2"])
def test_one_neuron_numbering_for_graph_and_defenses(name):
    model = build_model(name, in_channels=1, width=4).eval()
    graph = build_neuron_graph(model, torch.zeros(1, 1, 28, 28))
    layout = neuron_layout(model)
    layout.check_same_numbering(graph.layout)
    assert layout.num_neurons == graph.num_nodes
    assert [(a.conv_name, a.slice) for a in layout.layers] == [(b.conv_name, b.slice) for b in graph.layout.layers]
    nodes = list(range(graph.num_nodes))
    assert layout.names(nodes) == graph.neuron_names(nodes)
    assert layout.names([0]) == [neuron_name(graph.layers[0].bn_name, 0)]
    assert layout.locate(graph.num_nodes - 1) == (graph.layers[-1].bn_name, graph.layers[-1].num_channels - 1)
    with pytest.raises(IndexError, match="out of range"):
        layout.locate(graph.num_nodes)


def test_different_numberings_are_refused():
    layout = neuron_layout(build_model("small_cnn", in_channels=1, width=4))
    shuffled = NeuronLayout(tuple(reversed(layout.layers)))
    with pytest.raises(UnsupportedModelError, match="numbering differs"):
        layout.check_same_numbering(shuffled)


def test_model_without_batchnorm_has_no_neurons():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    with pytest.raises(UnsupportedModelError, match="no BatchNorm2d"):
        neuron_layout(model)

import pytest
import torch

from onp.models import DEFAULT_WIDTH, MODELS, build_model
from onp.registry import UnknownNameError


def _bn_channels(m):
    return sum(x.num_features for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("width", [4, 16])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_shapes_every_architecture(name, width, shape):
    m = build_model(name, num_classes=7, in_channels=shape[0], width=width).eval()
    assert m(torch.rand(2, *shape)).shape == (2, 7)
    assert _bn_channels(m) > 0
    torch.fx.symbolic_trace(m)  # the neuron graph relies on this


def test_resnet18_width_scales_channels():
    m64 = build_model("resnet18", width=64)
    assert m64.layer4[1].bn2.num_features == 512 and _bn_channels(m64) == 4800  # the standard network
    assert build_model("resnet18", width=16).layer4[1].bn2.num_features == 128
    assert set(DEFAULT_WIDTH) == set(MODELS.names())


def test_unknown_model_lists_choices():
    with pytest.raises(UnknownNameError, match="resnet18"):
        build_model("resnet50")


def test_bad_width_rejected():
    with pytest.raises(ValueError, match="width"):
        build_model("resnet18", width=0)


def test_normalisation_inside_the_model():
    m = build_model("small_cnn", in_channels=1, mean=(0.5,), std=(0.25,))
    x = torch.full((1, 1, 4, 4), 0.75)
    assert torch.allclose(m.normalize(x), torch.ones(1, 1, 4, 4))

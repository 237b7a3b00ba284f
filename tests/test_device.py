"""Baselines on a device (``Defense.fit(device=...)``, ``onp.baseline --device``, ``onp.compare --device``).

The CPU tests run everywhere. The CUDA tests run only where a GPU is (they are skipped on CI); they
are the check run on a lent GPU machine before any GPU measurement (docs/results.md §14).
"""

import pytest
import torch

from baselines import DEFENSES, build_defense
from onp.baseline_config import BaselineRunConfig
from onp.data.augment import Augment
from onp.models import build_model

from .conftest import random_defense_data, state_copy
from .test_baselines import FAST

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _tiny_model():
    return build_model("small_cnn", num_classes=10, in_channels=1, width=4).eval()


def _fit(method, model, data, device=None):
    params = {**FAST[method], **({"batch_size": 16} if "batch_size" in FAST[method] else {})}
    return build_defense(method, **params).fit(model, None if method == "clp" else data, seed=0, device=device)


def _all_on_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.device.type == "cpu"
    if isinstance(obj, dict):
        return all(_all_on_cpu(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_all_on_cpu(v) for v in obj)
    return True


@pytest.mark.parametrize("method", ["anp", "fst", "magnitude"])
def test_an_explicit_cpu_device_changes_nothing(method):
    """``device="cpu"`` is the default path: the same repaired weights, scores and pruned set."""
    model, data = _tiny_model(), random_defense_data()
    torch.manual_seed(0)
    a = _fit(method, model, data)
    torch.manual_seed(0)
    b = _fit(method, model, data, device="cpu")
    assert a.pruned == b.pruned
    assert all(torch.equal(a.model.state_dict()[k], v) for k, v in b.model.state_dict().items())
    assert (a.scores is None) == (b.scores is None)
    if a.scores is not None:
        assert torch.equal(a.scores, b.scores)


def test_defense_data_moves_as_a_whole():
    d = random_defense_data()
    assert d.to("cpu") is d  # already there: no copy
    moved = d.to(torch.device("cpu"))
    assert moved.num_classes == d.num_classes and torch.equal(moved.val_x, d.val_x)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_cuda_device_without_cuda_is_refused_up_front(tmp_path):
    with pytest.raises(ValueError, match="no CUDA.*--device cpu"):
        BaselineRunConfig(defense="clp", checkpoint=str(tmp_path), device="cuda")
    with pytest.raises(ValueError, match="valid: cpu, cuda"):
        BaselineRunConfig(defense="clp", checkpoint=str(tmp_path), device="tpu")


# ------------------------------------------------------------------------------------------------ CUDA only


@cuda
@pytest.mark.parametrize("method", sorted(FAST))
def test_every_defense_runs_on_cuda_and_returns_its_result_on_the_cpu(method):
    model, data = _tiny_model(), random_defense_data()
    before = state_copy(model)
    res = _fit(method, model, data, device="cuda")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched, on the CPU
    assert all(p.device.type == "cpu" for p in res.model.parameters())
    assert _all_on_cpu(res.info) and (res.scores is None or res.scores.device.type == "cpu")
    out = res.model(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@cuda
@pytest.mark.parametrize("method", ["clp", "magnitude", "random"])
def test_score_rules_prune_the_same_neurons_on_cuda(method):
    """Rules with no training choose the same neurons on the GPU as on the CPU."""
    model, data = _tiny_model(), random_defense_data()
    assert _fit(method, model, data).pruned == _fit(method, model, data, device="cuda").pruned


@cuda
def test_augmentation_draws_stay_on_the_cpu_generator():
    """A seed crops and flips a batch the same way on the GPU as on the CPU."""
    x = torch.rand(8, 1, 28, 28)
    aug = Augment(padding=3, hflip=True)
    on_cpu = aug(x, torch.Generator().manual_seed(5))
    on_gpu = aug(x.cuda(), torch.Generator().manual_seed(5))
    assert torch.equal(on_cpu, on_gpu.cpu())


def test_every_registered_defense_is_in_the_device_tests():
    assert set(DEFENSES.names()) == set(FAST)


def test_test_metrics_copy_a_model_only_when_it_is_elsewhere():
    from onp.baseline import _model_on

    model = build_model("small_cnn", num_classes=4, in_channels=1)
    assert _model_on(model, "cpu") is model  # already there: no copy
    if torch.cuda.is_available():
        moved = _model_on(model, "cuda")
        assert moved is not model and next(moved.parameters()).is_cuda
        assert _model_on(moved, "cuda") is moved and _model_on(moved, "cuda:0") is moved
        assert not next(model.parameters()).is_cuda  # the caller's model stays where it was

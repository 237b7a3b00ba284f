"""Shared fixtures: a tiny backdoored model trained once per test session on the bundled sample."""

import os

import pytest
import torch

# Tests use tiny models: one torch thread is as fast, and avoids OpenMP oversubscription when
# the 2-core CI machine runs anything else (measured 4-6x faster than two threads under load).
torch.set_num_threads(1)

TINY = dict(
    model="small_cnn",
    width=16,
    dataset="fashion-mnist",
    data_source="sample",
    attack="badnets",
    epochs=3,
    max_train=6000,
    defense_size=300,
    seed=0,
)

#: the backdoored-model flags of the lean CLI test models (small_cnn w4, 1 epoch on 1,000 sample images)
# fmt: off
LEAN_FLAGS = ["--model", "small_cnn", "--width", "4", "--data-source", "sample", "--epochs", "1", "--max-train", "1000",
              "--defense-size", "300"]
# fmt: on


@pytest.fixture(scope="session")
def onp_cache(tmp_path_factory):
    """A private artifact cache for the whole test session."""
    path = tmp_path_factory.mktemp("onp-cache")
    old = os.environ.get("ONP_CACHE")
    os.environ["ONP_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("ONP_CACHE", None)
    else:
        os.environ["ONP_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_bundle(onp_cache):
    """A small_cnn backdoored with BadNets on 6,000 sample images (a few seconds on CPU)."""
    from onp.zoo import BackdoorConfig, load_bundle

    return load_bundle(BackdoorConfig(**TINY), cache_dir=onp_cache, progress=False)


def random_defense_data(n_train=40, n_val=20, shape=(1, 28, 28), classes=10, seed=0):
    """Random images and labels as a :class:`~onp.data.defense.DefenseData` (tests of defense mechanics)."""
    from onp.data.defense import DefenseData

    g = torch.Generator().manual_seed(seed)
    return DefenseData(
        torch.rand(n_train, *shape, generator=g),
        torch.randint(0, classes, (n_train,), generator=g),
        torch.rand(n_val, *shape, generator=g),
        torch.randint(0, classes, (n_val,), generator=g),
        classes,
    )


def state_copy(model):
    """A detached copy of ``model``'s state_dict (to check that a defense never mutates its input)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_script(name):
    """``scripts/<name>.py`` as a module (the scripts are not a package), registered in ``sys.modules``
    while it is in use (a dataclass there looks its module up); yields it and unregisters it after."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(name, None)

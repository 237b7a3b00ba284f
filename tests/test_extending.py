"""Adding an attack or an architecture touches one file (plus its test): the package ``__init__``
imports every module of its package (:func:`onp.registry.import_submodules`), each module registers
what it defines and lists its public names in ``__all__``. See the "Where to add what" table in
docs/concepts.md."""

import ast
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from onp.attacks import ATTACKS
from onp.models import DEFAULT_WIDTH, MODELS

ROOT = Path(__file__).resolve().parents[1]

#: the names registered when the packages switched to self-registration (none may go missing)
ATTACK_NAMES = ["badnets", "blend", "sig", "trojan", "wanet"]
MODEL_NAMES = ["mobilenet_v2", "preact_resnet18", "preact_resnet18_backdoorbench", "resnet18", "small_cnn", "vgg16_bn"]
WIDTHS = {
    "resnet18": 16,
    "preact_resnet18": 16,
    "preact_resnet18_backdoorbench": 16,
    "vgg16_bn": 16,
    "mobilenet_v2": 16,
    "small_cnn": 8,
}
PUBLIC = {
    "onp.attacks": [
        "Attack",
        "ATTACKS",
        "MODES",
        "AttackParamError",
        "build_attack",
        "register_attack",
        "BadNets",
        "Blend",
        "Trojan",
        "SIG",
        "WaNet",
        "square_logo",
    ],
    "onp.models": [
        "MODELS",
        "DEFAULT_WIDTH",
        "build_model",
        "build_model_for",
        "model_digest",
        "Normalize",
        "ResNet18",
        "PreActResNet18",
        "PreActResNet18BackdoorBench",
        "VGG16BN",
        "MobileNetV2",
        "SmallCNN",
    ],
}


def _modules_named_in_init(package_dir: Path) -> set:
    """The sibling modules ``package_dir/__init__.py`` imports (``from .x import``, ``from . import x``)."""
    named = set()
    for node in ast.walk(ast.parse((package_dir / "__init__.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                named.add(node.module.split(".")[0])
            else:
                named.update(alias.name for alias in node.names)
    return named


@pytest.mark.parametrize("package, registry", [("onp.attacks", ATTACKS), ("onp.models", MODELS)])
def test_registered_modules_are_not_named_in_init(package, registry):
    defining = {registry.get(n).__module__.rsplit(".", 1)[1] for n in registry.names()}
    named = _modules_named_in_init(ROOT / package.replace(".", "/"))
    assert defining and not defining & named, f"{package}/__init__.py names {sorted(defining & named)}"
    pkg = importlib.import_module(package)
    for n in registry.names():  # each registered class is re-exported from the module's __all__
        cls = registry.get(n)
        assert getattr(pkg, cls.__name__) is cls and cls.__name__ in pkg.__all__


def test_no_registered_or_public_name_went_missing():
    # subsets, not equality: a new attack or architecture must not have to edit this file too
    assert set(ATTACK_NAMES) <= set(ATTACKS.names())
    assert set(MODEL_NAMES) <= set(MODELS.names())
    assert {k: DEFAULT_WIDTH.get(k) for k in WIDTHS} == WIDTHS and set(DEFAULT_WIDTH) == set(MODELS.names())
    for package, names in PUBLIC.items():
        pkg = importlib.import_module(package)
        missing = [n for n in names if not hasattr(pkg, n) or n not in pkg.__all__]
        assert not missing, f"{package} lost {missing}"


NEW_ATTACK = """
from typing import Any, ClassVar, Dict, Mapping

import torch
from torch import Tensor

from .base import Attack, register_attack

__all__ = ["Invert"]


@register_attack
class Invert(Attack):
    name: ClassVar[str] = "invert"
    defaults: ClassVar[Mapping[str, Any]] = {}

    def _build(self) -> None:
        pass

    def _apply(self, x: Tensor) -> Tensor:
        return 1.0 - x

    def trigger_pattern(self) -> Dict[str, Tensor]:
        return {"pattern": torch.ones(self.image_shape)}
"""

NEW_MODEL = """
from typing import Sequence

import torch
from torch import nn

from .base import register_model
from .normalize import Normalize

__all__ = ["TinyNet"]


@register_model("tinynet", default_width=3)
class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 3,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn(self.conv(self.normalize(x))))
        return self.fc(out.mean((2, 3)))
"""

CHECK = """
import torch
from onp.attacks import ATTACKS, Invert, build_attack
from onp.models import DEFAULT_WIDTH, MODELS, TinyNet, build_model
assert "invert" in ATTACKS.names() and "tinynet" in MODELS.names() and DEFAULT_WIDTH["tinynet"] == 3
atk = build_attack("invert", (1, 8, 8), 10, target=0)
assert isinstance(atk, Invert) and torch.equal(atk.apply(torch.zeros(2, 1, 8, 8)), torch.ones(2, 1, 8, 8))
m = build_model("tinynet", num_classes=4, in_channels=1)
assert isinstance(m, TinyNet) and m.conv.out_channels == 3 and m(torch.rand(2, 1, 8, 8)).shape == (2, 4)
print("ok")
"""


def test_a_new_attack_and_architecture_are_one_file_each(tmp_path):
    """In a copy of ``onp``, dropping one module into ``onp/attacks/`` and one into ``onp/models/``
    registers and exports both, with no other file touched."""
    shutil.copytree(
        ROOT / "onp", tmp_path / "onp", ignore=shutil.ignore_patterns("__pycache__", "sample", "*.egg-info")
    )
    (tmp_path / "onp" / "attacks" / "invert.py").write_text(NEW_ATTACK)
    (tmp_path / "onp" / "models" / "tinynet.py").write_text(NEW_MODEL)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "ONP_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, "-c", f"import onp; assert onp.__file__.startswith({str(tmp_path)!r})\n" + CHECK],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=str(tmp_path),
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr

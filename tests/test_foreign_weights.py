"""onp.foreign_weights: a user's received weights (plain state_dict, safetensors, BackdoorBench
``attack_result.pt``) load into onp models without unpickling anything, and go back under the
user's own key names.

The torchvision-layout ResNet-18 and BackdoorBench's PreAct-ResNet-18 below are small re-implementations
written for these tests from the public layer naming (torchvision's ``resnet.py`` names; BackdoorBench's
``models/preact_resnet.py`` names, read, not copied); they are built at tiny width.
"""

import ast
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from onp.foreign_weights import (
    BACKDOORBENCH_NORMALIZATION,
    KeyMap,
    WeightsFile,
    adapt_state_dict,
    arch_options_from_backdoorbench,
    load_into,
    load_weights_file,
    to_user_keys,
)
from onp.io import CheckpointError
from onp.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and BatchNorm statistics (so that every tensor matters), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and not name.startswith("normalize."):
                t.copy_(
                    torch.rand(t.shape, generator=g) + 0.5
                    if name.endswith("running_var")
                    else torch.randn(t.shape, generator=g) * 0.3
                )
    return model.eval()


def _x(channels: int = 3, size: int = 16) -> torch.Tensor:
    return torch.rand(3, channels, size, size, generator=torch.Generator().manual_seed(123))


def _onp(arch: str = "resnet18", seed: int = 0, **kw) -> nn.Module:
    opts = dict(num_classes=5, in_channels=3, width=4)
    opts.update(kw)
    return _randomize(build_model(arch, **opts), seed)


# --------------------------------------------------------------------------------------------------
# plain state_dicts and safetensors


def _save(path: Path, state: dict) -> None:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


def _file_keys(path: Path) -> list:
    if path.suffix == ".safetensors":
        return sorted(load_file(str(path)))
    return list(torch.load(path, map_location="cpu", weights_only=True))


@pytest.mark.parametrize(
    "suffix,prefix",
    [
        (".pt", ""),
        (".pth", "module."),
        (".safetensors", "model."),
        (".pt", "module._orig_mod."),
        (".safetensors", "_orig_mod."),
    ],
)
@pytest.mark.parametrize("arch", ["resnet18", "preact_resnet18", "vgg16_bn"])
def test_round_trip(tmp_path, suffix, prefix, arch):
    source = _onp(arch, seed=1, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    path = tmp_path / f"weights{suffix}"
    _save(path, {prefix + k: v for k, v in source.state_dict().items()})

    target = _onp(arch, seed=2)
    x = _x()
    assert not torch.allclose(target(x), source(x))
    loaded = load_into(target, path)
    assert loaded.file.format == ("safetensors" if suffix == ".safetensors" else "state_dict")
    assert loaded.key_map.prefix == prefix and loaded.key_map.layout == "onp"
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)

    back = to_user_keys(target.state_dict(), loaded.key_map)
    assert sorted(back) == sorted(_file_keys(path)) == sorted(loaded.file.state_dict)
    if suffix != ".safetensors":
        assert list(back) == _file_keys(path)  # the file's order too
    for k, v in back.items():
        assert torch.equal(v, loaded.file.state_dict[k])


def test_a_foreign_file_without_normalize_buffers_keeps_the_models_mean_and_std(tmp_path):
    source = _onp(seed=1)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("normalize.")}
    torch.save(state, tmp_path / "w.pt")
    target = _onp(seed=2, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    loaded = load_into(target, tmp_path / "w.pt")
    assert target.normalize.mean.flatten().tolist() == pytest.approx([0.5, 0.4, 0.3])
    assert "normalize.mean" not in loaded.key_map.onp_to_user
    assert set(to_user_keys(target.state_dict(), loaded.key_map)) == set(state)
    # the same weights with the normalisation done outside the model
    x = _x()
    torch.testing.assert_close(target(x), source((x - target.normalize.mean) / target.normalize.std))


def test_num_batches_tracked_is_optional(tmp_path):
    source = _onp(seed=1)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    target = _onp(seed=2)
    adapted, key_map = adapt_state_dict(state, target)
    assert set(adapted) == set(state) and key_map.prefix == ""


def test_the_legacy_torch_format(tmp_path):
    source = _onp(seed=1)
    torch.save(source.state_dict(), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert (tmp_path / "old.pt").read_bytes()[:1] == b"\x80"  # a bare pickle stream, not a zip archive
    target = _onp(seed=2)
    load_into(target, tmp_path / "old.pt")
    torch.testing.assert_close(target(_x()), source(_x()), rtol=0, atol=0)


def test_a_checkpoint_dict_holding_the_state_dict(tmp_path):
    source = _onp(seed=1)
    torch.save({"epoch": 7, "optimizer": {"lr": 0.1}, "state_dict": source.state_dict()}, tmp_path / "ckpt.pth")
    target = _onp(seed=2)
    loaded = load_into(target, tmp_path / "ckpt.pth")
    assert loaded.file.container_key == "state_dict"
    torch.testing.assert_close(target(_x()), source(_x()))


# --------------------------------------------------------------------------------------------------
# torchvision's ResNet-18 layout


class TVBasicBlock(nn.Module):
    """torchvision's BasicBlock naming: conv1, bn1, conv2, bn2 and ``downsample`` = (1x1 conv, BN)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TVResNet18(nn.Module):
    """torchvision's ResNet-18 naming (conv1, bn1, layer1-4, fc). ``cifar_stem``: 3x3 stride-1 conv1 and no
    max-pool (onp's resnet18 stem, the usual CIFAR adaptation); else the ImageNet 7x7 stride-2 + max-pool."""

    def __init__(self, width: int = 4, num_classes: int = 7, in_channels: int = 3, cifar_stem: bool = True):
        super().__init__()
        self.conv1 = (
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
            if cifar_stem
            else nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        )
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, 2, 1)
        cin = width
        for i, (planes, stride) in enumerate([(width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)], 1):
            setattr(
                self, f"layer{i}", nn.Sequential(TVBasicBlock(cin, planes, stride), TVBasicBlock(planes, planes, 1))
            )
            cin = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@pytest.mark.parametrize("prefix", ["", "module."])
def test_torchvision_resnet18_layout(tmp_path, prefix):
    tv = _randomize(TVResNet18(width=4, num_classes=7), seed=3)
    keys = [prefix + k for k in tv.state_dict()]
    assert "layer2.0.downsample.1.running_var" in tv.state_dict() and "fc.weight" in tv.state_dict()
    torch.save({prefix + k: v for k, v in tv.state_dict().items()}, tmp_path / "tv.pth")

    model = _onp("resnet18", seed=4, num_classes=7)
    loaded = load_into(model, tmp_path / "tv.pth")
    km = loaded.key_map
    assert km.layout == "torchvision" and km.prefix == prefix
    assert km.user_to_onp[prefix + "layer2.0.downsample.0.weight"] == "layer2.0.shortcut.0.weight"
    assert km.user_to_onp[prefix + "layer3.0.downsample.1.running_mean"] == "layer3.0.shortcut.1.running_mean"
    assert km.user_to_onp[prefix + "fc.bias"] == "linear.bias"
    assert km.user_to_onp[prefix + "layer1.1.bn2.weight"] == "layer1.1.bn2.weight"
    x = _x()
    torch.testing.assert_close(model(x), tv(x), rtol=1e-5, atol=1e-5)
    assert list(to_user_keys(model.state_dict(), km)) == keys


def test_torchvision_imagenet_stem_is_refused(tmp_path):
    tv = TVResNet18(width=4, num_classes=7, cifar_stem=False)
    torch.save(tv.state_dict(), tmp_path / "imagenet.pth")
    model = _onp("resnet18", num_classes=7)
    with pytest.raises(ValueError) as err:
        load_into(model, tmp_path / "imagenet.pth")
    msg = str(err.value)
    assert str(tmp_path / "imagenet.pth") in msg
    assert "1 shape mismatches ['conv1.weight: file (4, 3, 7, 7) vs model (4, 3, 3, 3)']" in msg
    assert "7x7" in msg and "no max-pool" in msg and "missing" not in msg


# --------------------------------------------------------------------------------------------------
# BackdoorBench attack_result.pt


class BBPreActBlock(nn.Module):
    """BackdoorBench's PreActBlock naming: bn1, conv1, bn2, conv2, ``shortcut`` = (1x1 conv,)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + shortcut


class BBPreActResNet18(nn.Module):
    """BackdoorBench's ``preactresnet18`` naming (conv1, layer1-4, avgpool, linear): no BN after layer4."""

    def __init__(self, width: int = 4, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        cin = width
        for i, (planes, stride) in enumerate([(width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)], 1):
            setattr(
                self, f"layer{i}", nn.Sequential(BBPreActBlock(cin, planes, stride), BBPreActBlock(planes, planes, 1))
            )
            cin = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(self.avgpool(out).view(out.size(0), -1))


def _bd_state(n: int, poisoned: list, folder: str, subset: bool) -> dict:
    """The ``retrieve_state()`` dict of BackdoorBench's ``prepro_cls_DatasetBD_v2`` (images saved on disk)."""
    indicator = np.zeros(n)
    indicator[poisoned] = 1
    return {
        "bd_data_container": {
            "save_folder_path": folder,
            "data_dict": {np.int64(i): {"path": f"{folder}/3/{i}.png", "other_info": [0, 3]} for i in poisoned},
            "save_file_format": ".png",
        },
        "getitem_all": True,
        "getitem_all_switch": False,
        "original_index_array": np.where(indicator == 1)[0] if subset else np.arange(n),
        "poison_indicator": indicator,
        "save_folder_path": folder,
    }


def _attack_result(model_state: dict, model_name: str = "preactresnet18", **extra) -> dict:
    """The dict BackdoorBench's ``save_attack_result`` saves."""
    result = {
        "model_name": model_name,
        "num_classes": 10,
        "model": model_state,
        "data_path": "./data/cifar10",
        "img_size": (32, 32, 3),
        "clean_data": "cifar10",
        "bd_train": _bd_state(50, [1, 4, 9], "./record/badnet/bd_train_dataset", subset=False),
        "bd_test": _bd_state(20, [2, 5], "./record/badnet/bd_test_dataset", subset=True),
    }
    result.update(extra)
    return result


def _numpy1_file(src: Path, dst: Path) -> None:
    """``src`` as numpy 1.x writes it: the globals named ``numpy.core.multiarray.*``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(info.filename, data)


@pytest.mark.parametrize("prefix,numpy1", [("", False), ("module.", False), ("", True)])
def test_backdoorbench_attack_result(tmp_path, prefix, numpy1):
    bb = _randomize(BBPreActResNet18(width=4, num_classes=10), seed=5)
    path = tmp_path / "attack_result.pt"
    torch.save(_attack_result({prefix + k: v for k, v in bb.state_dict().items()}), path)
    if numpy1:
        _numpy1_file(path, tmp_path / "np1.pt")
        path = tmp_path / "np1.pt"

    wf = load_weights_file(path)
    assert (wf.format, wf.container_key, wf.model_name, wf.num_classes, wf.image_size, wf.dataset) == (
        "backdoorbench",
        "model",
        "preactresnet18",
        10,
        (32, 32, 3),
        "cifar10",
    )
    assert list(wf.state_dict) == [prefix + k for k in bb.state_dict()]

    mean, std = BACKDOORBENCH_NORMALIZATION["cifar10"]
    opts = arch_options_from_backdoorbench(wf)
    assert opts == {
        "name": "preact_resnet18_backdoorbench",
        "num_classes": 10,
        "in_channels": 3,
        "width": 4,
        "mean": mean,
        "std": std,
    }

    # onp's preact_resnet18 has a BN+ReLU after layer4 that BackdoorBench's lacks: refused, explained
    with pytest.raises(ValueError) as err:
        load_into(build_model(**{**opts, "name": "preact_resnet18"}), path)
    msg = str(err.value)
    assert "4 missing keys ['bn.weight', 'bn.bias', 'bn.running_mean', 'bn.running_var']" in msg
    assert "no BatchNorm+ReLU after its last stage" in msg and "unexpected" not in msg and "shape" not in msg
    assert "preact_resnet18_backdoorbench" in msg

    # the registered BackdoorBench variant (no final BN+ReLU) loads it name for name, output for output
    model = build_model(**opts).eval()
    loaded = load_into(model, path)
    assert loaded.key_map.layout == "onp" and loaded.key_map.prefix == prefix
    x = _x(size=32)
    normalized = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), bb(normalized), rtol=1e-5, atol=1e-5)
    assert list(to_user_keys(model.state_dict(), loaded.key_map)) == list(wf.state_dict)


def test_backdoorbench_defense_result_and_derived_options(tmp_path):
    bb = BBPreActResNet18(width=8, num_classes=43, in_channels=1)
    torch.save({"model_name": "preactresnet18", "num_classes": 43, "model": bb.state_dict()}, tmp_path / "d.pt")
    wf = load_weights_file(tmp_path / "d.pt")
    assert wf.format == "backdoorbench" and wf.image_size is None and wf.dataset is None
    assert arch_options_from_backdoorbench(wf) == {
        "name": "preact_resnet18_backdoorbench",
        "num_classes": 43,
        "in_channels": 1,
        "width": 8,
    }


@pytest.mark.parametrize(
    "name,why",
    [("resnet18", "7x7"), ("vgg19_bn", "13 bias-free convolutions"), ("efficientnet_b0", "no such architecture")],
)
def test_unsupported_backdoorbench_architectures(tmp_path, name, why):
    wf = WeightsFile(
        path=tmp_path / "a.pt",
        state_dict={"conv1.weight": torch.zeros(4, 3, 3, 3)},
        format="backdoorbench",
        model_name=name,
        num_classes=10,
    )
    with pytest.raises(ValueError, match=why) as err:
        arch_options_from_backdoorbench(wf)
    assert "not supported" in str(err.value) and "preactresnet18" in str(err.value)


def test_arch_options_check_the_classifier(tmp_path):
    bb = BBPreActResNet18(width=4, num_classes=10)
    wf = WeightsFile(
        path=tmp_path / "a.pt",
        state_dict=bb.state_dict(),
        format="backdoorbench",
        model_name="preactresnet18",
        num_classes=12,
    )
    with pytest.raises(ValueError, match="num_classes is 12 but the classifier 'linear.weight' has 10 outputs"):
        arch_options_from_backdoorbench(wf)
    with pytest.raises(ValueError, match="not a BackdoorBench"):
        arch_options_from_backdoorbench(WeightsFile(path=tmp_path / "b.pt", state_dict={}, format="state_dict"))


# --------------------------------------------------------------------------------------------------
# untrusted files


class Payload:
    """Unpickling this creates the file ``path`` (a stand-in for arbitrary code)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _payload_files(tmp_path: Path, marker: Path) -> list:
    bb = BBPreActResNet18(width=2).state_dict()
    files = {
        "top.pt": lambda p: torch.save(Payload(marker), p),
        "value.pth": lambda p: torch.save({"conv1.weight": torch.zeros(1), "fc.weight": Payload(marker)}, p),
        "checkpoint.pt": lambda p: torch.save({"state_dict": bb, "extra": [Payload(marker)]}, p),
        "attack_result.pt": lambda p: torch.save(_attack_result(bb, bd_train={"x": Payload(marker)}), p),
        "object_array.pt": lambda p: torch.save(
            _attack_result(bb, bd_test={"original_index_array": np.array([Payload(marker)], dtype=object)}), p
        ),
        "renamed.safetensors": lambda p: torch.save({"a": Payload(marker)}, p),
        "legacy.pt": lambda p: p.write_bytes(pickle.dumps(Payload(marker), protocol=2)),
        "legacy_torch.pt": lambda p: torch.save({"a": Payload(marker)}, p, _use_new_zipfile_serialization=False),
    }
    paths = []
    for name, write in files.items():
        write(tmp_path / name)
        paths.append(tmp_path / name)
    return paths


def test_a_planted_payload_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    paths = _payload_files(tmp_path, marker)
    assert not marker.exists()
    for path in paths:
        for load in (load_weights_file, lambda p: load_into(_onp("preact_resnet18", width=2), p)):
            with pytest.raises(CheckpointError) as err:
                load(path)
            assert str(path) in str(err.value), err.value
            assert not marker.exists(), path
            assert "pickled Python object" in str(err.value) and "never unpickles" in str(err.value), err.value


def test_a_pickled_whole_model_is_refused_with_the_export_hint(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    torch.save(model, tmp_path / "model.pt")
    with pytest.raises(CheckpointError) as err:
        load_weights_file(tmp_path / "model.pt")
    msg = str(err.value)
    assert msg.startswith(str(tmp_path / "model.pt"))
    assert "torch.nn.modules.container.Sequential" in msg
    assert 'torch.save(model.state_dict(), "weights.pt")' in msg


def test_a_torchscript_archive_is_refused_with_the_export_hint(tmp_path):
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(2, 2))), tmp_path / "scripted.pt")
    with pytest.raises(CheckpointError) as err:
        load_weights_file(tmp_path / "scripted.pt")
    msg = str(err.value)
    assert msg.startswith(str(tmp_path / "scripted.pt")) and "TorchScript" in msg
    assert 'torch.save(torch.jit.load("scripted.pt").state_dict(), "weights.pt")' in msg


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_and_empty_files_are_named(tmp_path, suffix):
    full = tmp_path / f"full{suffix}"
    _save(full, _onp().state_dict())
    data = full.read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as err:
        load_weights_file(truncated)
    assert str(truncated) in str(err.value)
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty") as err:
        load_weights_file(empty)
    assert str(empty) in str(err.value)
    with pytest.raises(CheckpointError, match="not found"):
        load_weights_file(tmp_path / f"absent{suffix}")
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(b"this is not a weights file at all")
    with pytest.raises(CheckpointError) as err:
        load_weights_file(garbage)
    assert str(garbage) in str(err.value)


@pytest.mark.parametrize("suffix,bad", [(".pt", float("nan")), (".safetensors", float("inf"))])
def test_non_finite_weights_are_refused_naming_the_key(tmp_path, suffix, bad):
    state = _onp().state_dict()
    state["layer2.1.conv2.weight"] = state["layer2.1.conv2.weight"].clone()
    state["layer2.1.conv2.weight"][0, 0, 0, 0] = bad
    path = tmp_path / f"w{suffix}"
    _save(path, state)
    with pytest.raises(CheckpointError) as err:
        load_weights_file(path)
    assert str(path) in str(err.value) and "'layer2.1.conv2.weight'" in str(err.value)
    assert "NaN or infinite" in str(err.value)


def test_non_tensor_values_and_dicts_without_weights_are_refused(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1), "step": 3}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match=r"not tensors: 'step' \(int\)"):
        load_weights_file(tmp_path / "a.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="not a state_dict"):
        load_weights_file(tmp_path / "b.pt")


# --------------------------------------------------------------------------------------------------
# mismatches


def test_missing_and_unexpected_keys_are_listed():
    state = dict(_onp().state_dict())
    del state["layer3.1.bn1.running_var"]
    state["layer3.1.bn9.weight"] = torch.zeros(16)
    with pytest.raises(ValueError) as err:
        adapt_state_dict(state, _onp(), source="user.pt")
    msg = str(err.value)
    assert msg.startswith("user.pt: ")
    assert "1 missing keys ['layer3.1.bn1.running_var']" in msg
    assert "1 unexpected keys ['layer3.1.bn9.weight']" in msg
    for option in ("--arch", "--width", "--num-classes", "--in-channels"):
        assert option in msg


def test_a_different_architecture_lists_the_first_keys_with_counts():
    state = _onp("vgg16_bn").state_dict()
    with pytest.raises(ValueError) as err:
        adapt_state_dict(state, _onp("resnet18"))
    msg = str(err.value)
    # missing: all but the optional Normalize buffers and BN counters; unexpected: all but the Normalize buffers
    n_missing = sum(
        1
        for k in _onp("resnet18").state_dict()
        if not k.startswith("normalize.") and not k.endswith("num_batches_tracked")
    )
    n_unexpected = sum(1 for k in state if not k.startswith("normalize."))
    assert n_missing > 100 and n_unexpected > 70
    assert f"{n_missing} missing keys ['conv1.weight', 'bn1.weight'," in msg
    assert f"{n_unexpected} unexpected keys ['features.0.weight', 'features.1.weight'," in msg
    assert msg.count("...") >= 2  # both lists cut after the first ten
    assert "3 input channels, 4 output channels" in msg and "last linear layer has 5 outputs" in msg


def test_shape_mismatches_name_the_shapes_and_what_the_file_says():
    with pytest.raises(ValueError) as err:
        adapt_state_dict(_onp(num_classes=10).state_dict(), _onp(num_classes=5))
    msg = str(err.value)
    assert (
        "2 shape mismatches ['linear.weight: file (10, 32) vs model (5, 32)', "
        "'linear.bias: file (10,) vs model (5,)']" in msg
    )
    assert "last linear layer has 10 outputs" in msg and "--num-classes" in msg
    assert "missing" not in msg and "unexpected" not in msg

    wide, narrow = _onp(width=8, in_channels=1).state_dict(), _onp(width=4).state_dict()
    with pytest.raises(ValueError) as err:
        adapt_state_dict(wide, _onp(width=4))
    msg = str(err.value)
    n = sum(1 for k in narrow if wide[k].shape != narrow[k].shape)
    assert n > 100
    assert f"{n} shape mismatches ['normalize.mean: file (1, 1, 1, 1) vs model (1, 3, 1, 1)', " in msg
    assert "'conv1.weight: file (8, 1, 3, 3) vs model (4, 3, 3, 3)'" in msg
    assert "1 input channels, 8 output channels" in msg


def test_to_user_keys_needs_every_mapped_key():
    key_map = KeyMap(
        user_to_onp={"module.fc.weight": "linear.weight", "module.fc.bias": "linear.bias"},
        prefix="module.",
        layout="torchvision",
    )
    assert key_map.onp_to_user == {"linear.weight": "module.fc.weight", "linear.bias": "module.fc.bias"}
    with pytest.raises(KeyError, match="linear.bias"):
        to_user_keys({"linear.weight": torch.zeros(1)}, key_map)


def test_the_module_loads_torch_files_weights_only():
    tree = ast.parse((ROOT / "onp" / "foreign_weights.py").read_text())
    loads = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr == "load"
        and getattr(n.func.value, "id", None) == "torch"
    ]
    assert loads
    for call in loads:
        assert any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in call.keywords)
    assert "pickle.load" not in (ROOT / "onp" / "foreign_weights.py").read_text()

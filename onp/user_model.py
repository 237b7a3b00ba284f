"""The model a defender brings (:mod:`onp.defend`): a registered architecture or the user's own ``nn.Module``.

* :func:`build_arch`: the untrained model of an ``arch``: a registered architecture (with its width,
  classes, channels and normalisation), or ``path/file.py:Class`` / ``package.module:factory``
  (:func:`build_user_model`, which imports that code through :func:`onp.user_code.import_object`);
* :func:`with_normalization` / :class:`NormalizedModel` / :func:`unwrap`: the user's ``mean``/``std``
  as a :class:`onp.models.Normalize` layer in front of a user's module (onp's own architectures
  normalise inside), and the user's module back out of it;
* :func:`check_output`: the model maps one image to ``num_classes`` logits, else a clear error;
* :func:`resolve_arch`: a defend config without ``arch`` takes the architecture and its options from a
  BackdoorBench ``attack_result.pt`` (:func:`onp.foreign_weights.arch_options_from_backdoorbench`).

This module is core: it imports no upper layer (``agents``, ``baselines``, ``envs``).
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .defend_config import DefendConfig, is_user_arch
from .foreign_weights import WeightsFile, arch_options_from_backdoorbench, load_weights_file
from .models import Normalize
from .user_code import import_object

__all__ = [
    "NormalizedModel",
    "per_channel",
    "with_normalization",
    "unwrap",
    "build_user_model",
    "build_arch",
    "check_output",
    "output_shape",
    "resolve_arch",
]


class NormalizedModel(nn.Module):
    """``net`` behind a :class:`onp.models.Normalize` layer (the user's ``mean``/``std``); neuron names
    leave out the ``net.`` prefix (:attr:`PREFIX`) and the repaired weights are ``net``'s."""

    PREFIX = "net."

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], channels: int) -> None:
        super().__init__()
        mean, std = per_channel(mean, channels), per_channel(std, channels)
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))


def per_channel(values: Sequence[float], channels: int) -> List[float]:
    """``values`` with one entry per channel (a single value is repeated)."""
    return list(values) * channels if len(values) == 1 else list(values)


def with_normalization(
    model: nn.Module, mean: Optional[Sequence[float]], std: Optional[Sequence[float]], channels: int
) -> nn.Module:
    """``model``, behind a Normalize layer when ``mean``/``std`` are given (:class:`NormalizedModel`)."""
    if mean is None or std is None:
        return model
    return NormalizedModel(model, mean, std, channels)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's own module inside a :class:`NormalizedModel` wrapper (else ``model``)."""
    return model.net if isinstance(model, NormalizedModel) else model


def build_user_model(spec: str, *, num_classes: int, in_channels: int, width: Optional[int] = None) -> nn.Module:
    """Build the user's ``nn.Module`` from ``path/file.py:Class`` or ``package.module:factory``.

    The class or factory is called with those of ``num_classes``, ``in_channels`` and ``width``
    (``width`` only when given) that its signature names; with none of them it is called without
    arguments. This imports and runs the user's code: call it only with a spec the user gave.

    Raises:
        ValueError: the spec is malformed or cannot be imported (:func:`onp.user_code.import_object`),
            building fails, or it builds something other than an ``nn.Module``.
        FileNotFoundError: the spec's file does not exist.
    """
    factory = import_object(spec, "--arch")
    offered: Dict[str, Any] = {"num_classes": num_classes, "in_channels": in_channels}
    if width is not None:
        offered["width"] = width
    try:
        names = set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        names = set()
    try:
        model = factory(**{k: v for k, v in offered.items() if k in names})
    except Exception as exc:
        raise ValueError(f"--arch {spec}: building the model failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ValueError(f"--arch {spec} built a {type(model).__name__}, not a torch nn.Module")
    return model


def build_arch(
    arch: str,
    *,
    num_classes: int,
    in_channels: int,
    width: Optional[int] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> nn.Module:
    """The untrained model of ``arch``: a registered architecture (``mean``/``std``, when both are given,
    normalise inside it), or the user's own (``path/file.py:Class``, ``package.module:factory``:
    :func:`build_user_model`; ``mean``/``std`` are not applied here: see :func:`with_normalization`)."""
    if is_user_arch(arch):
        return build_user_model(arch, num_classes=num_classes, in_channels=in_channels, width=width)
    from .models import build_model

    if mean is None or std is None:
        return build_model(arch, num_classes=num_classes, in_channels=in_channels, width=width)
    return build_model(arch, num_classes=num_classes, in_channels=in_channels, width=width, mean=mean, std=std)


def check_output(model: nn.Module, channels: int, size: Tuple[int, int], num_classes: int, what: str) -> None:
    """``model`` maps one ``channels x H x W`` image to ``num_classes`` logits; else a ValueError
    (``what`` names the model in the message)."""
    shape = output_shape(model, channels, size, what)
    if shape != (1, num_classes):
        raise ValueError(
            f"{what} outputs shape {shape} for one {channels}x{size[0]}x{size[1]} image; expected "
            f"(1, {num_classes}): check --num-classes, --in-channels and --input-size"
        )


def output_shape(model: nn.Module, channels: int, size: Tuple[int, int], what: str) -> Tuple[int, ...]:
    """The shape of ``model``'s output for one zero ``channels x H x W`` image (in eval mode, without
    gradients; the model's mode is restored). A model that fails or returns no tensor is a ValueError."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters(), torch.zeros(0)).device
            out = model(torch.zeros(1, channels, *size, device=device))
    except Exception as exc:
        raise ValueError(
            f"{what} fails on a {channels}x{size[0]}x{size[1]} image ({type(exc).__name__}: {exc}); "
            f"check --in-channels and --input-size"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, Tensor):
        raise ValueError(f"{what} returns a {type(out).__name__}, not a tensor of logits")
    return tuple(out.shape)


def resolve_arch(cfg: DefendConfig) -> Tuple[DefendConfig, Optional[WeightsFile]]:
    """``cfg`` with its model taken from its ``weights`` file when ``arch`` is not given.

    A BackdoorBench ``attack_result.pt`` names its architecture: ``arch``, ``num_classes``,
    ``in_channels``, ``width`` and, where the file records them, ``input_size`` (``img_size``) and
    ``mean``/``std`` (the normalisation BackdoorBench used for its ``clean_data``) come from the file
    (:func:`onp.foreign_weights.arch_options_from_backdoorbench`). Settings given explicitly (the keys
    set in ``cfg``) win; ``mean``/``std`` go together, so giving either keeps both from the file.

    Returns:
        ``(cfg, None)`` unchanged when ``arch`` is given or there are no ``weights``; else the resolved
        config and the file already read (pass it to :func:`onp.foreign_weights.load_into`).

    Raises:
        ValueError: no ``arch`` and the file does not name its architecture (a plain state_dict or a
            safetensors file: pass ``--arch``), or a BackdoorBench architecture onp cannot build.
        onp.io.CheckpointError: the file cannot be read safely.
    """
    if cfg.arch is not None or cfg.weights is None:
        return cfg, None
    wf = load_weights_file(cfg.weights)
    if wf.format != "backdoorbench":
        kind = "a safetensors file" if wf.format == "safetensors" else "a plain state_dict"
        raise ValueError(
            f"--arch is required: {wf.path} is {kind}, which does not name its architecture; pass "
            f"--arch (a registered architecture, or path/file.py:Class for your own nn.Module). Only a "
            f"BackdoorBench attack_result.pt names its own"
        )
    opts = arch_options_from_backdoorbench(wf)
    found: Dict[str, Any] = {
        "arch": opts["name"],
        "num_classes": opts["num_classes"],
        "in_channels": opts["in_channels"],
        "width": opts["width"],
    }
    if wf.image_size is not None and len(wf.image_size) >= 2:
        found["input_size"] = [int(wf.image_size[0]), int(wf.image_size[1])]
    given = {k for k in cfg.model_fields_set if getattr(cfg, k) is not None}
    if "mean" in opts and not {"mean", "std"} & given:
        found.update(mean=[float(v) for v in opts["mean"]], std=[float(v) for v in opts["std"]])
    explicit = {k: v for k, v in cfg.model_dump().items() if k in given}
    return DefendConfig.from_dict({**{k: v for k, v in found.items() if k not in given}, **explicit}), wf

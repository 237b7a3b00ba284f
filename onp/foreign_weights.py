"""Load the weights of a model that a user received (issue #16, "defend your own model").

The user's file is untrusted: it is read without ever unpickling arbitrary objects.

>>> from onp.models import build_model
>>> from onp.foreign_weights import load_into, to_user_keys
>>> model = build_model("resnet18", num_classes=10, width=64)
>>> loaded = load_into(model, "received.pth")                                     # doctest: +SKIP
>>> repaired = to_user_keys(model.state_dict(), loaded.key_map)                  # doctest: +SKIP

Supported files (:func:`load_weights_file`; the format is recognised from the content, not the name):

* a plain ``state_dict`` saved with ``torch.save(model.state_dict(), "weights.pt")`` (``.pt``,
  ``.pth``, ...), read with ``torch.load(path, map_location="cpu", weights_only=True)``. A dict that
  holds the state_dict under one of :data:`CONTAINER_KEYS` (a training checkpoint
  ``{"epoch": ..., "state_dict": ...}``) is accepted too; the key is recorded in
  :attr:`WeightsFile.container_key`.
* a ``.safetensors`` file, read with :func:`safetensors.torch.load_file`.
* a BackdoorBench ``attack_result.pt`` (or ``defense_result.pt``). Its structure was learned from
  BackdoorBench (https://github.com/SCLBD/BackdoorBench, CC BY-NC 4.0; nothing of it is copied here):
  ``utils/save_load_attack.py`` (``save_attack_result``) saves, with ``torch.save``, the dict
  ``{"model_name": str, "num_classes": int, "model": <the model's state_dict>, "data_path": str,
  "img_size": (height, width, channels), "clean_data": <dataset name>, "bd_train": <dict or None>,
  "bd_test": <dict>, **kwargs}``; ``bd_train``/``bd_test`` are the ``retrieve_state()`` dicts of
  ``utils/bd_dataset_v2.py`` (``prepro_cls_DatasetBD_v2``), which hold numpy arrays
  (``original_index_array`` int64, ``poison_indicator`` float64) and a ``data_dict`` keyed by numpy
  int64 scalars. ``save_defense_result`` writes only ``model_name``, ``num_classes`` and ``model``.

  **Fields onp uses**: ``model_name``, ``num_classes``, ``model`` (the weights), and, when present,
  ``img_size`` and ``clean_data`` (:class:`WeightsFile` ``image_size`` and ``dataset``). All other
  fields (``data_path``, ``bd_train``, ``bd_test``, extra kwargs) are read by the restricted unpickler,
  because a pickle is read whole, and then ignored.

Weights-only loading and its allow-list: every torch file is read with ``weights_only=True`` inside
``torch.serialization.safe_globals(`` :func:`numpy_allowlist` ``)``, which adds exactly the numpy
globals needed to rebuild plain numeric arrays and scalars (BackdoorBench's index arrays):
``numpy.ndarray``, ``numpy.dtype``, ``numpy[._]core.multiarray._reconstruct`` and ``.scalar``
(under numpy 1.x and 2.x names), and the dtype classes of bool, signed/unsigned integers and floats.
Object arrays, strings dtypes, PIL images and any class are still refused. A file that holds other
objects (a pickled ``nn.Module``, BackdoorBench poisoned images kept in memory as PIL images) is
refused with :class:`~onp.io.CheckpointError`, naming the file and how to export a state_dict.

Key names (:func:`adapt_state_dict`): the prefixes ``module.`` (DataParallel), ``model.`` and
``_orig_mod.`` (``torch.compile``) are stripped; the names are matched against the onp model's own
names directly, or for onp's ``resnet18`` also in torchvision's ResNet layout (``downsample.0/1``
for onp's ``shortcut.0/1``, ``fc`` for ``linear``; conv1/bn1/layerN.M.conv1/bn1/conv2/bn2 are the
same). The :class:`KeyMap` records user key -> onp key so that :func:`to_user_keys` writes repaired
weights back under the file's own names. onp models normalise inputs inside the model
(:class:`onp.models.Normalize`, buffers ``normalize.mean``/``normalize.std`` in the state_dict); a
foreign file does not carry them, so the model keeps its own values (choose them with ``build_model``'s
``mean``/``std``, see :func:`arch_options_from_backdoorbench`); the same holds for BatchNorm's
``num_batches_tracked``.

What does not map (refused with a message, never loaded into a model that computes something else):

* torchvision's ImageNet ResNet-18 stem (7x7 stride-2 ``conv1`` + max-pool, BackdoorBench's
  ``resnet18``): onp's ``resnet18`` has the CIFAR stem (3x3 stride-1 ``conv1``, no max-pool); the
  ``conv1.weight`` shapes differ. A torchvision-layout ResNet-18 whose ``conv1`` was replaced by a 3x3
  stride-1 conv *and* whose max-pool was removed (the usual CIFAR adaptation) maps exactly; whether a
  max-pool was kept cannot be seen in a state_dict (it has no weights), this is assumed.
* BackdoorBench's ``preactresnet18`` (``models/preact_resnet.py``) into onp's ``preact_resnet18``: its
  tensor names are onp's, but it has no BatchNorm+ReLU after the last stage, and ``preact_resnet18``
  has one (``bn``); the two networks compute different functions. Its weights load into
  ``preact_resnet18_backdoorbench`` (the same network without that BN+ReLU), which is what
  :func:`arch_options_from_backdoorbench` names.
* BackdoorBench's ``vgg19_bn`` (torchvision's: 16 convs with biases, a 3-layer classifier) is not
  onp's ``vgg16_bn`` (13 bias-free convs, one linear layer).
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union, cast

import numpy as np
import torch
from torch import Tensor, nn

from .io import CheckpointError, PathLike
from .models.normalize import Normalize
from .models.resnet import PreActResNet18, ResNet18

WeightsFormat = Literal["state_dict", "safetensors", "backdoorbench"]

#: keys of a checkpoint dict that may hold the state_dict (the first one holding only tensors is used)
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
#: the fields that mark a BackdoorBench result file (``save_attack_result`` / ``save_defense_result``)
BACKDOORBENCH_KEYS = ("model_name", "num_classes", "model")
#: prefixes that wrappers add to every key: DataParallel/DDP, Lightning-style ``model.``, torch.compile
PREFIXES = ("module.", "model.", "_orig_mod.")
#: BackdoorBench model names onp can build, with onp's name
BACKDOORBENCH_ARCHS = {"preactresnet18": "preact_resnet18_backdoorbench"}
#: why the other BackdoorBench architectures are not loaded
BACKDOORBENCH_UNSUPPORTED = {
    "resnet18": "BackdoorBench's resnet18 is torchvision's ImageNet ResNet-18 (7x7 stride-2 conv1 and a max-pool); "
    "onp's resnet18 has the CIFAR stem (3x3 stride-1 conv1, no max-pool), so the weights do not fit",
    "vgg19_bn": "BackdoorBench's vgg19_bn is torchvision's (16 convolutions with biases, a 3-layer classifier); "
    "onp's vgg16_bn has 13 bias-free convolutions and one linear layer, a different network",
}
#: the input normalisation BackdoorBench applies in its data transforms, per ``clean_data`` (from its
#: ``utils/aggregate_block/dataset_and_transform_generate.py``, ``get_dataset_normalization``); onp
#: applies it inside the model, so these become ``build_model``'s ``mean``/``std``
BACKDOORBENCH_NORMALIZATION: Dict[str, Tuple[Tuple[float, ...], Tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.5,), (0.5,)),
    "tiny": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "gtsrb": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "celeba": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
#: how to export weights that onp can read (part of every refusal of a pickled object)
EXPORT_HINT = (
    'export the weights where you trust the file: torch.save(model.state_dict(), "weights.pt") '
    '(or safetensors.torch.save_file(model.state_dict(), "weights.safetensors")), then pass that file'
)
#: the build_model options a mismatch message tells the user to check
CHECK_HINT = "check --arch, --width, --num-classes and --in-channels against the network that produced the file"

_SHOWN = 10  # keys shown per list in a mismatch message


@dataclass
class WeightsFile:
    """The weights read from a user's file.

    Attributes:
        path: the file.
        state_dict: the tensors, under the file's own key names (prefixes included).
        format: ``"state_dict"``, ``"safetensors"`` or ``"backdoorbench"``.
        container_key: the key of the checkpoint dict that held the state_dict (``"model"`` for
            BackdoorBench, ``"state_dict"`` for a training checkpoint, ...); ``None`` for a bare state_dict.
        model_name: BackdoorBench ``model_name`` (e.g. ``"preactresnet18"``).
        num_classes: BackdoorBench ``num_classes``.
        image_size: BackdoorBench ``img_size``, ``(height, width, channels)``.
        dataset: BackdoorBench ``clean_data`` (e.g. ``"cifar10"``).
    """

    path: Path
    state_dict: Dict[str, Tensor]
    format: WeightsFormat
    container_key: Optional[str] = None
    model_name: Optional[str] = None
    num_classes: Optional[int] = None
    image_size: Optional[Tuple[int, ...]] = None
    dataset: Optional[str] = None


@dataclass
class KeyMap:
    """How the keys of a user's state_dict correspond to an onp model's.

    Attributes:
        user_to_onp: every key of the user's state_dict (in the file's order, with its prefix) -> the
            onp model's key.
        prefix: the prefix stripped from every user key (``""``, ``"module."``, ``"module._orig_mod."``, ...).
        layout: ``"onp"`` (names as onp's, after the prefix) or ``"torchvision"`` (torchvision's
            ResNet names mapped onto onp's ``resnet18``).
    """

    user_to_onp: Dict[str, str]
    prefix: str = ""
    layout: str = "onp"

    @property
    def onp_to_user(self) -> Dict[str, str]:
        """onp key -> user key."""
        return {v: k for k, v in self.user_to_onp.items()}


@dataclass
class LoadedWeights:
    """What :func:`load_into` loaded: the file and the key map (to write repaired weights back)."""

    file: WeightsFile
    key_map: KeyMap


# --------------------------------------------------------------------------------------------------
# reading files


def numpy_allowlist() -> List[Any]:
    """The globals added to weights-only loading: exactly what plain numeric numpy arrays and scalars
    need (BackdoorBench stores its poison indices as numpy arrays, keyed by numpy int64 scalars).

    ``_reconstruct`` and ``scalar`` are listed under their numpy 1.x (``numpy.core``) and 2.x
    (``numpy._core``) names, so that files written under either load. The dtype classes are those of
    bool, signed and unsigned integers and floats (not object, string or structured dtypes).
    """
    reconstruct = cast(Tuple[Any, ...], np.empty(0).__reduce__())[0]
    scalar = cast(Tuple[Any, ...], np.int64(0).__reduce__())[0]
    allow: List[Any] = [np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allow += [(reconstruct, f"{module}._reconstruct"), (scalar, f"{module}.scalar")]
    for code in "?bhilqBHILQefd":
        dtype_class = type(np.dtype(code))
        if dtype_class not in allow:
            allow.append(dtype_class)
    return allow


def _sniff(path: Path) -> str:
    """``"safetensors"`` (an 8-byte little-endian header length, then the JSON header), ``"torch"`` (a zip
    archive or a legacy pickle), or ``"unknown"``. Safetensors is tested first: its header length may
    begin with the pickle byte 0x80."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if (
        len(head) == 9
        and head[8:9] == b"{"
        and (int.from_bytes(head[:8], "little") + 8 <= path.stat().st_size or path.suffix == ".safetensors")
    ):
        return "safetensors"
    if head.startswith(b"PK") or head.startswith(b"\x80"):
        return "torch"
    return "unknown"


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``: a zip with ``code/`` and ``constants.pkl``);
    only the zip's directory is read."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _refused_object(exc: BaseException) -> Optional[str]:
    """The object a weights-only load refused (``None`` when ``exc`` is not such a refusal)."""
    text = str(exc)
    if "Weights only load failed" not in text and "WeightsUnpickler" not in text:
        return None
    found = re.search(r"GLOBAL (\S+) was not an allowed global", text) or re.search(r"but got (<[^>]+>)", text)
    if found:
        return found.group(1)
    line = next((ln for ln in text.splitlines() if "WeightsUnpickler error" in ln), "")
    return line.split("WeightsUnpickler error:")[-1].strip()[:200] or "an object"


def _torch_load(path: Path) -> Any:
    """``torch.load(..., weights_only=True)`` with :func:`numpy_allowlist`. The file is passed open, so
    that the content decides the format (torch >= 2.13 reads any ``*.safetensors`` path as safetensors)."""
    if _is_torchscript(path):
        raise CheckpointError(
            f"{path}: is a TorchScript archive (torch.jit.save), which holds code as well as "
            f"weights; onp does not load it. Export the weights where you trust the file: "
            f'torch.save(torch.jit.load("{path.name}").state_dict(), "weights.pt"), '
            f"then pass that file"
        )
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    try:
        with open(path, "rb") as fh:
            if safe_globals is None:  # torch < 2.5: no allow-list, numpy arrays are refused
                return torch.load(fh, map_location="cpu", weights_only=True)
            with safe_globals(numpy_allowlist()):
                return torch.load(fh, map_location="cpu", weights_only=True)
    except Exception as exc:
        what = _refused_object(exc)
        if what is not None:
            extra = (
                (
                    " (BackdoorBench keeps poisoned images in memory as PIL images when run without a "
                    "save folder; export its 'model' entry)"
                )
                if what.startswith("PIL.")
                else ""
            )
            raise CheckpointError(
                f"{path}: holds a pickled Python object ({what}), not only tensors and plain values: a whole "
                f"model saved with torch.save(model, ...) for instance. onp never unpickles objects, because "
                f"loading them can execute code{extra}; {EXPORT_HINT}"
            ) from exc
        raise CheckpointError(
            f"{path}: cannot be read as a torch file: it is corrupt or truncated "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
        ) from exc


def _safetensors_load(path: Path) -> Dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path), device="cpu"))
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot be read as a safetensors file: it is corrupt or truncated "
            f"({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc


def _tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _check_state_dict(path: Path, state: Any, where: str) -> Dict[str, Tensor]:
    """``state`` as a dict of tensors; refuses non-tensor values and NaN/inf, naming the key."""
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(
            f"{path}: {where} is not a state_dict (a dict of tensor names to tensors): "
            f"{type(state).__name__}{' (empty)' if isinstance(state, Mapping) else ''}; "
            f"{EXPORT_HINT}"
        )
    bad = [
        f"{k!r} ({type(v).__name__})" for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)
    ]
    if bad:
        raise CheckpointError(
            f"{path}: {where} holds values that are not tensors: {', '.join(bad[:_SHOWN])}"
            f"{' ...' if len(bad) > _SHOWN else ''}; {EXPORT_HINT}"
        )
    broken = [
        k for k, v in state.items() if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())
    ]
    if broken:
        more = f" (and {len(broken) - 1} more: {broken[1:_SHOWN]})" if len(broken) > 1 else ""
        raise CheckpointError(
            f"{path}: tensor {broken[0]!r}{more} holds NaN or infinite values; these weights "
            f"are broken and onp refuses them"
        )
    return dict(state)


def _int_field(path: Path, obj: Mapping, key: str) -> Optional[int]:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise CheckpointError(f"{path}: BackdoorBench field {key!r} is {value!r}, not an integer")
    return int(value)


def _backdoorbench(path: Path, obj: Mapping) -> WeightsFile:
    name = obj["model_name"]
    if not isinstance(name, str):
        raise CheckpointError(f"{path}: BackdoorBench field 'model_name' is {name!r}, not a string")
    size = obj.get("img_size")
    image_size: Optional[Tuple[int, ...]] = None
    if size is not None:
        if not isinstance(size, (list, tuple)) or not all(isinstance(s, (int, np.integer)) for s in size):
            raise CheckpointError(f"{path}: BackdoorBench field 'img_size' is {size!r}, not a list of integers")
        image_size = tuple(int(s) for s in size)
    dataset = obj.get("clean_data")
    return WeightsFile(
        path=path,
        state_dict=_check_state_dict(path, obj["model"], "its 'model' entry"),
        format="backdoorbench",
        container_key="model",
        model_name=name,
        num_classes=_int_field(path, obj, "num_classes"),
        image_size=image_size,
        dataset=dataset if isinstance(dataset, str) else None,
    )


def load_weights_file(path: PathLike) -> WeightsFile:
    """Read a user's weights file without unpickling arbitrary objects.

    Args:
        path: a ``torch.save``-d state_dict (``.pt``, ``.pth``, ...; also a checkpoint dict holding it
            under one of :data:`CONTAINER_KEYS`), a ``.safetensors`` file, or a BackdoorBench
            ``attack_result.pt``. The format is recognised from the content.

    Returns:
        The tensors under the file's own key names, the format, and BackdoorBench's metadata.

    Raises:
        CheckpointError: naming the file: it is missing, empty, corrupt or truncated; it holds pickled
            objects (a whole ``nn.Module``: the message says how to export a state_dict); it holds no
            state_dict; or a tensor holds NaN/inf (the key is named).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    kind = _sniff(path)
    if kind == "safetensors" or (kind == "unknown" and path.suffix == ".safetensors"):
        return WeightsFile(
            path=path, state_dict=_check_state_dict(path, _safetensors_load(path), "the file"), format="safetensors"
        )
    if kind == "unknown":
        raise CheckpointError(
            f"{path}: is neither a torch file nor a safetensors file (corrupt, truncated or "
            f"another format); {EXPORT_HINT}"
        )
    obj = _torch_load(path)
    if isinstance(obj, Mapping) and all(k in obj for k in BACKDOORBENCH_KEYS):
        return _backdoorbench(path, obj)
    if _tensor_dict(obj) or not isinstance(obj, Mapping):
        return WeightsFile(path=path, state_dict=_check_state_dict(path, obj, "the file"), format="state_dict")
    for key in CONTAINER_KEYS:
        if _tensor_dict(obj.get(key)):
            return WeightsFile(
                path=path,
                state_dict=_check_state_dict(path, obj[key], f"its {key!r} entry"),
                format="state_dict",
                container_key=key,
            )
    if any(isinstance(v, Tensor) for v in obj.values()):  # a state_dict with foreign values: named
        _check_state_dict(path, obj, "the file")
    keys = [str(k) for k in obj][:_SHOWN]
    raise CheckpointError(
        f"{path}: holds a dict that is not a state_dict (keys {keys}) and has none under "
        f"{list(CONTAINER_KEYS)}; {EXPORT_HINT}"
    )


# --------------------------------------------------------------------------------------------------
# key names


def _torchvision_resnet_name(onp_key: str) -> str:
    """torchvision's name for a key of onp's ``resnet18`` (the two use the same names otherwise)."""
    key = onp_key.replace(".shortcut.", ".downsample.")
    return "fc." + key[len("linear.") :] if key.startswith("linear.") else key


#: name layouts: (the onp model classes they apply to, onp key -> the layout's key)
LAYOUTS: Dict[str, Tuple[Tuple[type, ...], Callable[[str], str]]] = {
    "onp": ((nn.Module,), lambda key: key),
    "torchvision": ((ResNet18,), _torchvision_resnet_name),
}


def _strip_prefix(keys: Sequence[str], own: Sequence[str] = ()) -> str:
    """The run of :data:`PREFIXES` shared by every key (and not by all of the model's own keys ``own``)."""
    prefix = ""
    while keys:
        for p in PREFIXES:
            if all(k.startswith(prefix + p) for k in keys) and not (own and all(k.startswith(p) for k in own)):
                prefix += p
                break
        else:
            break
    return prefix


def _optional_keys(model: nn.Module) -> List[str]:
    """Keys a foreign file need not provide: Normalize buffers (the model keeps its mean/std) and
    BatchNorm's ``num_batches_tracked`` (a counter, unused in eval mode)."""
    own = model.state_dict()
    optional = [k for k in own if k.endswith("num_batches_tracked")]
    for name, module in model.named_modules():
        if isinstance(module, Normalize):
            optional += [f"{name}.{b}" if name else b for b, _ in module.named_buffers(recurse=False)]
    return optional


def _shape_facts(state: Mapping[str, Tensor]) -> str:
    """What the file's weights say about the network: its first conv and last linear layer in ``state``'s order."""
    convs = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 4]
    linears = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    facts = []
    if convs:
        c = convs[0]
        facts.append(
            f"its first convolution has {c.shape[1]} input channels, {c.shape[0]} output channels and a "
            f"{c.shape[2]}x{c.shape[3]} kernel"
        )
    if linears:
        facts.append(f"its last linear layer has {linears[-1].shape[0]} outputs")
    return f"; in the file, {' and '.join(facts)}" if facts else ""


def _mismatch(
    model: nn.Module,
    layout: str,
    missing: List[str],
    unexpected: List[str],
    shapes: List[str],
    state: Mapping[str, Tensor],
    source: Optional[PathLike],
) -> ValueError:
    def listed(what: str, items: List[str]) -> str:
        return f"{len(items)} {what} {items[:_SHOWN]}{' ...' if len(items) > _SHOWN else ''}"

    parts = [
        listed(what, items)
        for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if items
    ]
    notes = []
    if missing and all(k.startswith("bn.") for k in missing) and isinstance(model, PreActResNet18):
        notes.append(
            "the file's PreAct-ResNet-18 has no BatchNorm+ReLU after its last stage (BackdoorBench's "
            "preactresnet18 has none) while onp's preact_resnet18 has one ('bn'): the two networks compute "
            "different functions; build preact_resnet18_backdoorbench (--arch "
            "preact_resnet18_backdoorbench), BackdoorBench's network layer for layer"
        )
    conv1 = state.get("conv1.weight")
    if isinstance(model, ResNet18) and conv1 is not None and conv1.dim() == 4 and conv1.shape[-1] == 7:
        notes.append(
            "conv1 is 7x7: a torchvision ImageNet-stem ResNet (7x7 stride-2 conv1 and a max-pool); onp's "
            "resnet18 has the CIFAR stem (3x3 stride-1 conv1, no max-pool) and cannot hold it"
        )
    where = f"{source}: " if source is not None else ""
    return ValueError(
        f"{where}the weights do not match the onp model {type(model).__name__} (names read in the "
        f"{layout!r} layout): " + "; ".join(parts) + "; " + "; ".join(notes + [CHECK_HINT]) + _shape_facts(state)
    )


def adapt_state_dict(
    state_dict: Mapping[str, Tensor], model: nn.Module, *, source: Optional[PathLike] = None
) -> Tuple[Dict[str, Tensor], KeyMap]:
    """Rename a user's state_dict onto an onp model (built by :func:`onp.models.build_model`).

    Prefixes (:data:`PREFIXES`) shared by every key are stripped; the names are then read in the
    layout (:data:`LAYOUTS`) that matches most of them: onp's own names (also BackdoorBench's
    ``preactresnet18``, whose names are onp's) or torchvision's ResNet names for onp's ``resnet18``.

    Args:
        state_dict: the user's tensors under the user's key names.
        model: the onp model the tensors are for.
        source: the file, named in error messages.

    Returns:
        The tensors under the model's key names (the model's Normalize buffers and
        ``num_batches_tracked`` only when the file had them), and the :class:`KeyMap` user key -> onp key.

    Raises:
        ValueError: missing or unexpected keys or differing shapes; the message lists the first
            keys of each (with counts), the shapes that differ, and what to check.
    """
    own = model.state_dict()
    keys = list(state_dict)
    prefix = _strip_prefix(keys, list(own))
    stripped = {k: k[len(prefix) :] for k in keys}
    best: Optional[Tuple[int, str, Dict[str, str]]] = None
    for layout, (classes, rename) in LAYOUTS.items():
        if not isinstance(model, classes):
            continue
        names = {rename(k): k for k in own}
        hits = sum(s in names for s in stripped.values())
        if best is None or hits > best[0]:
            best = (hits, layout, names)
    assert best is not None  # the "onp" layout applies to every model
    _, layout, names = best
    user_to_onp = {k: names[s] for k, s in stripped.items() if s in names}
    unexpected = [k for k in keys if k not in user_to_onp]
    provided = set(user_to_onp.values())
    optional = set(_optional_keys(model))
    missing = [k for k in own if k not in provided and k not in optional]
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[o].shape)}"
        for k, o in user_to_onp.items()
        if tuple(state_dict[k].shape) != tuple(own[o].shape)
    ]
    if missing or unexpected or shapes:
        by_onp = {names[s]: state_dict[k] for k, s in stripped.items() if s in names}
        in_model_order = {k: by_onp[k] for k in own if k in by_onp}  # (a safetensors file is sorted by name)
        if not any(k.endswith("weight") and v.dim() == 4 for k, v in in_model_order.items()):
            in_model_order = {s: state_dict[k] for k, s in stripped.items()}
        raise _mismatch(model, layout, missing, unexpected, shapes, in_model_order, source)
    adapted = {o: state_dict[k] for k, o in user_to_onp.items()}
    return adapted, KeyMap(user_to_onp=user_to_onp, prefix=prefix, layout=layout)


def to_user_keys(onp_state_dict: Mapping[str, Tensor], key_map: KeyMap) -> Dict[str, Tensor]:
    """The onp model's tensors under the user file's key names (prefix included), e.g. to write
    repaired weights back in the user's own format.

    Args:
        onp_state_dict: the onp model's state_dict (keys it has beyond the map, such as its Normalize
            buffers, are left out).
        key_map: from :func:`adapt_state_dict` / :func:`load_into`.

    Returns:
        Exactly the keys the user's file had, in the file's order.

    Raises:
        KeyError: an onp key of the map is not in ``onp_state_dict``.
    """
    absent = [o for o in key_map.user_to_onp.values() if o not in onp_state_dict]
    if absent:
        raise KeyError(f"the onp state_dict lacks {len(absent)} keys of the key map: {absent[:_SHOWN]}")
    return {u: onp_state_dict[o] for u, o in key_map.user_to_onp.items()}


def load_into(model: nn.Module, path: Union[PathLike, WeightsFile]) -> LoadedWeights:
    """Load a user's weights file into an onp model.

    The file is read by :func:`load_weights_file` and renamed by :func:`adapt_state_dict`; then
    ``model.load_state_dict(..., strict=True)`` gets every key of the model: the file's tensors, and the
    model's own values for what a foreign file does not carry (Normalize mean/std, ``num_batches_tracked``).

    Args:
        model: an onp model built with the file's architecture (see :func:`arch_options_from_backdoorbench`).
        path: the user's file, or a :class:`WeightsFile` already read from it (by :func:`load_weights_file`).

    Returns:
        The file (format, BackdoorBench metadata) and the key map to write repaired weights back.

    Raises:
        CheckpointError: the file cannot be read safely (see :func:`load_weights_file`).
        ValueError: the weights do not fit the model (see :func:`adapt_state_dict`).
    """
    wf = path if isinstance(path, WeightsFile) else load_weights_file(path)
    adapted, key_map = adapt_state_dict(wf.state_dict, model, source=wf.path)
    full = dict(model.state_dict())
    full.update(adapted)
    model.load_state_dict(full, strict=True)
    return LoadedWeights(file=wf, key_map=key_map)


def arch_options_from_backdoorbench(wf: WeightsFile) -> Dict[str, Any]:
    """``onp.models.build_model`` arguments for a BackdoorBench file: ``build_model(**options)``.

    Returns:
        ``name`` (onp's architecture), ``num_classes`` (the file's field, checked against the classifier's
        weight), ``in_channels`` and ``width`` (``conv1.weight``'s input and output channels) and, for a
        ``clean_data`` BackdoorBench knows, ``mean``/``std``: the normalisation BackdoorBench applied in its
        data transforms (:data:`BACKDOORBENCH_NORMALIZATION`), which onp applies inside the model.

    Raises:
        ValueError: not a BackdoorBench file, an architecture onp cannot build (the message says why), or
            tensors that contradict the file's fields.
    """
    if wf.format != "backdoorbench" or wf.model_name is None:
        raise ValueError(f"{wf.path}: not a BackdoorBench result file (format {wf.format!r})")
    name = BACKDOORBENCH_ARCHS.get(wf.model_name)
    if name is None:
        why = BACKDOORBENCH_UNSUPPORTED.get(wf.model_name, "onp has no such architecture")
        raise ValueError(
            f"{wf.path}: BackdoorBench model {wf.model_name!r} is not supported: {why}; onp loads "
            f"BackdoorBench's {sorted(BACKDOORBENCH_ARCHS)}"
        )
    state = wf.state_dict
    prefix = _strip_prefix(list(state))
    if f"{prefix}conv1.weight" not in state:
        raise ValueError(f"{wf.path}: the BackdoorBench {wf.model_name} weights have no 'conv1.weight'")
    conv1 = state[f"{prefix}conv1.weight"]
    linear = state.get(f"{prefix}linear.weight")
    num_classes = (
        wf.num_classes if wf.num_classes is not None else (int(linear.shape[0]) if linear is not None else None)
    )
    if linear is not None and num_classes != int(linear.shape[0]):
        raise ValueError(
            f"{wf.path}: num_classes is {wf.num_classes} but the classifier 'linear.weight' has "
            f"{int(linear.shape[0])} outputs"
        )
    options: Dict[str, Any] = {
        "name": name,
        "num_classes": num_classes,
        "in_channels": int(conv1.shape[1]),
        "width": int(conv1.shape[0]),
    }
    if wf.dataset in BACKDOORBENCH_NORMALIZATION:
        mean, std = BACKDOORBENCH_NORMALIZATION[cast(str, wf.dataset)]
        options.update(mean=mean, std=std)
    return options


__all__ = [
    "WeightsFile",
    "WeightsFormat",
    "KeyMap",
    "LoadedWeights",
    "load_weights_file",
    "adapt_state_dict",
    "to_user_keys",
    "load_into",
    "arch_options_from_backdoorbench",
    "numpy_allowlist",
    "CONTAINER_KEYS",
    "PREFIXES",
    "LAYOUTS",
    "BACKDOORBENCH_ARCHS",
    "BACKDOORBENCH_NORMALIZATION",
]

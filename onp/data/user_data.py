"""A defender's own clean images: read, checked and split for a defense of their own model.

:func:`load_clean_images` reads the images from one of three sources and returns a
:class:`CleanImages`; :func:`split_defense` splits them (stratified) into defense-train and
defense-validation, and :func:`to_defense_data` turns the two halves into the
:class:`~onp.data.defense.DefenseData` that every defense uses (the zoo builds the same object from
its defender pool).

Sources:

* **a folder in the ImageFolder layout**: one sub-folder per class, PNG or JPEG files (``.png``,
  ``.jpg``, ``.jpeg``) inside. The class index of a sub-folder is its position in sorted order of
  the names (as in torchvision's ``ImageFolder``: ``sorted()`` of the strings, so ``"10"`` comes
  before ``"2"``) -- *except* when every sub-folder name is an integer (``0``, ``1``, ..., ``9``):
  then that integer is the label, and a class may be missing. With names, there must be exactly one
  sub-folder per class of the model. Hidden files (``.DS_Store`` ...) are skipped; any other file in
  a class folder, a nested folder, or an image directly in the top folder is an error.
* **an** ``.npz`` **file** with ``x`` (images: uint8 0..255, or float in [0, 1]; ``(N, C, H, W)``
  or ``(N, H, W, C)``, or ``(N, H, W)`` for a 1-channel model) and ``y`` (integer labels, shape
  ``(N,)``). It is read with ``allow_pickle=False``: object or string arrays are refused. The layout
  is told from ``channels`` and ``image_size``; a shape that fits both layouts is an error that says
  so.
* **a registered dataset name** (``onp.data.DATASETS``, e.g. ``"fashion-mnist"``) with ``indices``:
  a file of integer indices into that dataset's *train* split (a ``.npy`` array, a ``.json`` list or
  ``{"indices": [...]}``, or text: integers separated by whitespace or commas, ``#`` comments).
  Indices outside the split or repeated are errors. (A name is read as a dataset when ``indices`` is
  given or no file or folder of that name exists.)

Colour follows ``channels`` only where that is unambiguous: an RGB image for a 1-channel model is
converted when its three channels are equal (and refused otherwise), a grayscale image for a
3-channel model is refused. Images of the wrong size are refused (onp never resizes silently).

Normalisation: ``CleanImages.x`` is float32 in [0, 1]. onp's own models normalise inside (their first
layer is :class:`onp.models.Normalize`, ``(x - mean) / std``), so they take [0, 1] images. To tell
whether *your* model does the same, look at how it was trained: if the training pipeline normalised
the images before the model (e.g. ``transforms.Normalize(mean, std)``), the model expects normalised
input -- pass that ``mean``/``std`` and onp puts a :class:`onp.models.Normalize` in front of the model
(``nn.Sequential(Normalize(mean, std), model)``). If unsure, measure the model's accuracy on these
clean images with and without the normalisation: the right choice is the one with the high accuracy.

>>> imgs = load_clean_images("my_clean_images/", num_classes=10, channels=3, image_size=32)  # doctest: +SKIP
>>> train, val = split_defense(imgs, val_fraction=0.5, seed=0)                              # doctest: +SKIP
>>> data = to_defense_data(train, val)                                                      # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..io import PathLike
from .defense import DefenseData
from .registry import DATASETS, load_dataset

#: fewer clean images than this are refused
MIN_IMAGES = 20
#: the zoo's default defender pool (``BackdoorConfig.defense_size``)
DEFAULT_DEFENSE_SIZE = 500
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_PIL_FORMATS = ("PNG", "JPEG", "MPO")  # MPO: the multi-picture JPEG some cameras write

ImageSize = Union[int, Tuple[int, int]]


@dataclass
class CleanImages:
    """Clean labelled images of the defender.

    Attributes:
        x: float32 images ``(N, C, H, W)`` in [0, 1].
        y: int64 labels ``(N,)`` in ``[0, num_classes)``.
        class_names: ``class_names[i]`` names class ``i`` (one entry per class of the model).
        source: where the images came from (for logs and metadata).
        val: optional bool ``(N,)``: the defender's own defense-validation images (an ``.npz``'s
            ``val`` array); :func:`split_defense` then keeps that split instead of drawing one.
    """

    x: torch.Tensor
    y: torch.Tensor
    class_names: List[str]
    source: str
    val: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.x.dtype != torch.float32 or self.x.ndim != 4:
            raise ValueError(
                f"CleanImages.x must be float32 images (N, C, H, W); got {self.x.dtype} of shape {tuple(self.x.shape)}"
            )
        if self.y.dtype != torch.int64 or self.y.ndim != 1:
            raise ValueError(
                f"CleanImages.y must be int64 labels (N,); got {self.y.dtype} of shape {tuple(self.y.shape)}"
            )
        if len(self.x) != len(self.y):
            raise ValueError(f"CleanImages: {len(self.x)} images but {len(self.y)} labels")
        if self.val is not None and (self.val.dtype != torch.bool or tuple(self.val.shape) != (len(self.y),)):
            raise ValueError(
                f"CleanImages.val must be bool ({len(self.y)},); got {self.val.dtype} {tuple(self.val.shape)}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: Union[np.ndarray, Sequence[int]], source: Optional[str] = None) -> CleanImages:
        """The images at ``index`` (same class names)."""
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        val = None if self.val is None else self.val[idx]
        return CleanImages(self.x[idx], self.y[idx], list(self.class_names), source or self.source, val)

    def class_counts(self) -> List[int]:
        """Number of images of each class."""
        return torch.bincount(self.y, minlength=self.num_classes).tolist()

    def __repr__(self) -> str:
        return (
            f"CleanImages({len(self)} images of shape {tuple(self.x.shape[1:])}, "
            f"{self.num_classes} classes, source={self.source!r})"
        )


# ---------------------------------------------------------------------------------------------------------------
# the entry point


def load_clean_images(
    source: PathLike,
    *,
    num_classes: int,
    channels: int,
    image_size: ImageSize,
    indices: Optional[PathLike] = None,
    data_dir: Optional[PathLike] = None,
    data_source: str = "auto",
) -> CleanImages:
    """Read a defender's clean images (see the module docstring for the three kinds of ``source``).

    Args:
        source: an ImageFolder-layout folder, an ``.npz`` file, or a registered dataset name.
        num_classes: the number of classes of the model (labels must lie in ``[0, num_classes)``).
        channels: 1 (grayscale) or 3 (RGB): what the model takes.
        image_size: the model's input size, ``H`` (square) or ``(H, W)``.
        indices: with a dataset name only: a file of indices into that dataset's train split.
        data_dir: with a dataset name only: where the dataset is (passed to :func:`onp.data.load_dataset`).
        data_source: with a dataset name only: ``"auto"``, ``"full"`` or ``"sample"`` (the bundled
            Fashion-MNIST sample), as for :func:`onp.data.load_dataset`.

    Returns:
        :class:`CleanImages` with ``x`` float32 ``(N, C, H, W)`` in [0, 1] and ``y`` int64.

    Raises:
        FileNotFoundError: ``source`` (or ``indices``) does not exist.
        ValueError: anything wrong with the images or labels; the message names the file and the
            problem. A class in range without an image is only a warning (except in the
            ImageFolder layout, where an empty class folder is an error), unless fewer than two
            classes have images.
    """
    size = _check_args(num_classes, channels, image_size)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"source must be a folder, an .npz file or a dataset name; got {type(source).__name__}")
    name = str(os.fspath(source))
    path = Path(name)
    is_dataset = name in DATASETS and (indices is not None or not path.exists())
    if is_dataset:
        images = _from_dataset(
            name,
            _dataset_indices(name, indices),
            num_classes,
            channels,
            size,
            Path(os.fspath(data_dir)) if data_dir is not None else None,
            data_source,
        )
    else:
        images = _from_file(name, indices, num_classes, channels, size)
    _check_counts(images, num_classes)
    return images


def _dataset_indices(name: str, indices: Optional[PathLike]) -> Path:
    """The indices file that a dataset name needs (refused when missing)."""
    if indices is None:
        raise ValueError(
            f"dataset {name!r} needs indices: a .npy, .json or text file of indices into its "
            f"train split (the images you hold out as clean data)"
        )
    return Path(os.fspath(indices))


def _from_file(
    name: str, indices: Optional[PathLike], num_classes: int, channels: int, size: Tuple[int, int]
) -> CleanImages:
    """The images of the ImageFolder-layout folder or ``.npz`` file ``name`` (no ``indices``: they
    go with a dataset name)."""
    path = Path(name)
    if indices is not None:
        raise ValueError(
            f"indices is only used with a registered dataset name ({', '.join(DATASETS.names())}); {name!r} is not one"
        )
    if not path.exists():
        raise FileNotFoundError(
            f"no such file or folder: {name} (pass a folder with one sub-folder of images "
            f"per class, an .npz file with x and y, or a dataset name "
            f"({', '.join(DATASETS.names())}) with indices)"
        )
    if path.is_dir():
        return _from_folder(path, num_classes, channels, size)
    return _from_npz(path, num_classes, channels, size)


def _check_args(num_classes: int, channels: int, image_size: ImageSize) -> Tuple[int, int]:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2; got {num_classes!r}")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB); got {channels!r}")
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw):
        raise ValueError(f"image_size must be a positive integer or (height, width); got {image_size!r}")
    return int(hw[0]), int(hw[1])


def _fmt(size: Tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]} (height x width)"


def _check_counts(images: CleanImages, num_classes: int) -> None:
    """Total count, classes present (the labels are already known to be in range)."""
    n = len(images)
    if n < MIN_IMAGES:
        raise ValueError(
            f"{images.source}: {n} image(s); onp needs at least {MIN_IMAGES} clean images; "
            f"{DEFAULT_DEFENSE_SIZE} is the default (the zoo's defender pool) and more is better"
        )
    counts = images.class_counts()
    present = [c for c in range(num_classes) if counts[c] > 0]
    missing = [c for c in range(num_classes) if counts[c] == 0]
    if len(present) < 2:
        raise ValueError(
            f"{images.source}: all {n} images are of class {present[0]} "
            f"({images.class_names[present[0]]!r}); a defense needs clean images of at least two "
            f"classes (ideally all {num_classes})"
        )
    if missing:
        warnings.warn(
            f"{images.source}: no image of class(es) {missing} "
            f"({', '.join(repr(images.class_names[c]) for c in missing)}); the defense can only check "
            f"the model on the {len(present)} class(es) present",
            UserWarning,
            stacklevel=3,
        )


def _check_labels(y: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    """``y`` as int64 after checking dtype, shape and range."""
    if y.dtype.kind not in "iu":
        hint = " (convert with y.astype(np.int64) if they are whole numbers)" if y.dtype.kind == "f" else ""
        raise ValueError(f"{where}: labels y must be integers; got dtype {y.dtype}{hint}")
    if y.ndim != 1:
        raise ValueError(f"{where}: labels y must have shape (N,); got {y.shape} (one-hot labels: use y.argmax(1))")
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"{where}: label {int(y[i])} (image {i}; {len(bad)} such label(s)) is outside "
            f"[0, {num_classes}) for a {num_classes}-class model"
        )
    return y.astype(np.int64)


def _to_channels(arr: np.ndarray, channels: int, where: str) -> np.ndarray:
    """(N, C, H, W) with C in (1, 3) -> (N, channels, H, W): 3 equal channels become 1; 1 never becomes 3."""
    c = arr.shape[1]
    if c == channels:
        return arr
    if c == 3 and channels == 1:
        if np.array_equal(arr[:, 0], arr[:, 1]) and np.array_equal(arr[:, 0], arr[:, 2]):
            return arr[:, :1]
        raise ValueError(
            f"{where}: RGB (colour) images for a 1-channel (grayscale) model; convert them to "
            f"grayscale yourself (onp converts only RGB images whose three channels are equal)"
        )
    if c == 1 and channels == 3:
        raise ValueError(
            f"{where}: grayscale images for a 3-channel (RGB) model; onp does not invent colour: "
            f"pass RGB images (or check channels)"
        )
    raise ValueError(f"{where}: images with {c} channels; the model takes {channels}")


# ---------------------------------------------------------------------------------------------------------------
# ImageFolder layout


def _class_folders(root: Path, num_classes: int) -> Tuple[List[Tuple[Path, int]], List[str]]:
    """(folder, label) pairs and the class names."""
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    folders = [p for p in entries if p.is_dir()]
    stray = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if stray:
        raise ValueError(
            f"{stray[0]}: an image directly in {root}; onp reads one sub-folder per class (the "
            f"ImageFolder layout): move each image into the folder of its class"
        )
    if not folders:
        raise ValueError(
            f"{root}: no class sub-folders; onp expects one sub-folder of PNG/JPEG images per class "
            f"(e.g. {root}/0/, {root}/1/ ...) or an .npz file"
        )
    names = sorted(p.name for p in folders)  # str order, as torchvision's ImageFolder
    by_name = {p.name: p for p in folders}
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        labels: Dict[int, str] = {}
        for n in names:
            lab = int(n)
            if lab in labels:
                raise ValueError(f"{root}: class folders {labels[lab]!r} and {n!r} both mean label {lab}")
            if not 0 <= lab < num_classes:
                raise ValueError(
                    f"{by_name[n]}: folder name {n} is read as label {lab} (all class folder names are "
                    f"integers), outside [0, {num_classes}) for a {num_classes}-class model"
                )
            labels[lab] = n
        class_names = [labels.get(c, str(c)) for c in range(num_classes)]
        return [(by_name[labels[lab]], lab) for lab in sorted(labels)], class_names
    if any(re.fullmatch(r"-?\d+", n) for n in names):
        warnings.warn(
            f"{root}: some class folder names are integers and some are not; the class index of each "
            f"folder is its position in sorted order: {names}",
            UserWarning,
            stacklevel=4,
        )
    if len(names) != num_classes:
        raise ValueError(
            f"{root}: {len(names)} class folder(s) ({', '.join(names)}) for a {num_classes}-class "
            f"model; with folder names the class index is the position in sorted order, so every "
            f"class needs a folder (or name the folders by their integer label: 0, 1, ...)"
        )
    return [(by_name[n], i) for i, n in enumerate(names)], names


def _image_files(folder: Path) -> List[Path]:
    files: List[Path] = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            raise ValueError(
                f"{p}: a folder inside class folder {folder.name}; onp reads the images directly in "
                f"each class folder (no nested folders)"
            )
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(
                f"{p}: not a PNG or JPEG file (onp reads {', '.join(IMAGE_SUFFIXES)}); remove it or convert it"
            )
        files.append(p)
    return files


def read_image(path: Path, channels: int, size: Tuple[int, int]) -> np.ndarray:
    """One PNG/JPEG file as uint8 ``(channels, H, W)``; every error names the file."""
    try:
        with Image.open(path) as opened:
            if opened.format not in _PIL_FORMATS:
                raise ValueError(f"{path}: a {opened.format} image, not PNG or JPEG")
            found = (opened.height, opened.width)
            if found != size:
                raise ValueError(
                    f"{path}: image is {_fmt(found)}, expected {_fmt(size)}; resize your images "
                    f"to the model's input size (onp does not resize)"
                )
            opened.load()
            img: Image.Image = opened
            if img.mode == "P":  # a palette: its colours decide
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            if img.mode in ("RGBA", "LA"):
                if int(np.asarray(img.getchannel("A")).min()) < 255:
                    raise ValueError(
                        f"{path}: image has transparent pixels (mode {img.mode}); save it without an alpha channel"
                    )
                img = img.convert(img.mode[:-1])
            if img.mode == "1":
                img = img.convert("L")
            if img.mode not in ("L", "RGB"):
                raise ValueError(f"{path}: unsupported image mode {img.mode}; save it as 8-bit grayscale (L) or RGB")
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a valid image file ({exc})") from None
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return _to_channels(arr[None], channels, str(path))[0]


def _from_folder(root: Path, num_classes: int, channels: int, size: Tuple[int, int]) -> CleanImages:
    folders, class_names = _class_folders(root, num_classes)
    xs: List[np.ndarray] = []
    ys: List[int] = []
    for folder, label in folders:
        files = _image_files(folder)
        if not files:
            raise ValueError(
                f"{folder}: empty class folder (class {label}, no PNG/JPEG images); put clean images "
                f"of that class in it or remove it"
            )
        for f in files:
            xs.append(read_image(f, channels, size))
            ys.append(label)
    x = torch.from_numpy(np.stack(xs)).float().div_(255.0)
    return CleanImages(x, torch.tensor(ys, dtype=torch.int64), class_names, f"folder:{root}")


# ---------------------------------------------------------------------------------------------------------------
# .npz


def _npz_layout(x: np.ndarray, channels: int, size: Tuple[int, int], where: str) -> np.ndarray:
    """``x`` as (N, C, H, W), its layout told from the image size and ``channels``."""
    h, w = size
    if x.ndim == 3:
        if x.shape[1:] != size:
            raise ValueError(f"{where}: x has shape {x.shape}; expected (N, {h}, {w}) images of {_fmt(size)}")
        return _to_channels(x[:, None], channels, where)
    if x.ndim != 4:
        raise ValueError(f"{where}: x must be images (N, C, H, W) or (N, H, W, C); got shape {x.shape}")
    nchw = x.shape[2:] == size and x.shape[1] in (1, 3)
    nhwc = x.shape[1:3] == size and x.shape[3] in (1, 3)
    if nchw and nhwc:
        if x.shape[1] != x.shape[3] and channels in (x.shape[1], x.shape[3]):
            nchw, nhwc = x.shape[1] == channels, x.shape[3] == channels
        else:
            raise ValueError(
                f"{where}: x has shape {x.shape}, which fits both (N, C, H, W) and (N, H, W, C) for "
                f"{channels}-channel {_fmt(size)} images; save it with a non-square size or as one "
                f"layout onp can tell apart"
            )
    if nchw:
        return _to_channels(x, channels, where)
    if nhwc:
        return _to_channels(x.transpose(0, 3, 1, 2), channels, where)
    raise ValueError(
        f"{where}: x has shape {x.shape}; expected {channels}-channel images of {_fmt(size)}: "
        f"(N, {channels}, {h}, {w}) or (N, {h}, {w}, {channels})"
    )


def _from_npz(path: Path, num_classes: int, channels: int, size: Tuple[int, int]) -> CleanImages:
    where = str(path)
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(
            f"{where}: not a valid .npz file ({exc}); pass an .npz with arrays x and y, or a folder of images"
        ) from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{where}: a single .npy array, not an .npz file with arrays x and y (np.savez(path, x=images, y=labels))"
        )
    with z:
        missing = [k for k in ("x", "y") if k not in z.files]
        if missing:
            raise ValueError(
                f"{where}: no array {' or '.join(missing)} (found: {', '.join(z.files) or 'none'}); "
                f"onp needs x (images) and y (labels): np.savez(path, x=images, y=labels)"
            )
        try:
            x, y = z["x"], z["y"]
            val = z["val"] if "val" in z.files else None
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            why = "object arrays are refused (onp never unpickles)" if "pickle" in str(exc) else str(exc)
            raise ValueError(f"{where}: x, y or val cannot be read: {why}; save plain numeric arrays") from None
    if x.ndim not in (3, 4):
        raise ValueError(f"{where}: x must be images (N, C, H, W) or (N, H, W, C); got shape {x.shape}")
    yl = _check_labels(y, num_classes, where)
    if len(x) != len(y):
        raise ValueError(f"{where}: {len(x)} images in x but {len(y)} labels in y")
    xf: Optional[np.ndarray] = None
    if x.dtype == np.uint8:
        pass
    elif x.dtype.kind == "f":
        xf = x.astype(np.float32)
        if not np.isfinite(xf).all():
            bad = int(np.flatnonzero(~np.isfinite(xf).reshape(len(xf), -1).all(1))[0]) if len(xf) else 0
            raise ValueError(f"{where}: x holds NaN or infinite values (first in image {bad})")
        lo, hi = (float(xf.min()), float(xf.max())) if xf.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            hint = (
                "values up to 255: divide by 255 or save uint8"
                if hi > 1.0 and lo >= 0.0
                else "they look normalised (mean/std); save the images before normalisation"
            )
            raise ValueError(f"{where}: float x must lie in [0, 1]; found [{lo:g}, {hi:g}] ({hint})")
    else:
        hint = " (if they are 0..255, save x.astype(np.uint8))" if x.dtype.kind in "iu" else ""
        raise ValueError(f"{where}: x has dtype {x.dtype}; onp takes uint8 (0..255) or float (0..1) images{hint}")
    arr = _npz_layout(xf if xf is not None else x, channels, size, where)
    xt = torch.from_numpy(np.ascontiguousarray(arr))
    xt = xt.float().div_(255.0) if xf is None else xt.contiguous()
    mask = None if val is None else torch.from_numpy(_check_val_mask(val, len(y), where))
    return CleanImages(xt, torch.from_numpy(yl), [str(c) for c in range(num_classes)], f"npz:{path}", mask)


def _check_val_mask(val: np.ndarray, n: int, where: str) -> np.ndarray:
    """An ``.npz``'s ``val`` array as a bool mask: one 0/1 (or bool) per image, both halves non-empty."""
    if val.shape != (n,) or not (val.dtype == np.bool_ or (val.dtype.kind in "iu" and np.isin(val, (0, 1)).all())):
        raise ValueError(
            f"{where}: val must mark each of the {n} images as defense-validation (1/True) or defense-train "
            f"(0/False); got {val.dtype} of shape {val.shape}"
        )
    mask = val.astype(bool)
    if mask.all() or not mask.any():
        raise ValueError(
            f"{where}: val puts all {n} images in one half; both defense-train and -validation need images"
        )
    return mask


# ---------------------------------------------------------------------------------------------------------------
# a registered dataset with an index file


def read_indices(path: Path) -> np.ndarray:
    """Integer indices from a ``.npy``, ``.json`` or text file; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(
            f"no such file or folder: {path} (the indices file)"
            if not path.exists()
            else f"{path}: the indices must be a file, not a folder"
        )
    where = f"{path} (indices)"
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
            if not isinstance(arr, np.ndarray):
                raise ValueError("an .npz archive, not one .npy array")
        elif suffix == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, dict) and "indices" in data:
                data = data["indices"]
            if not isinstance(data, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in data):
                raise ValueError('expected a JSON list of integers or {"indices": [...]}')
            arr = np.asarray(data, dtype=np.int64)
        else:
            tokens = [t for line in path.read_text().splitlines() for t in re.split(r"[\s,]+", line.split("#")[0]) if t]
            bad = [t for t in tokens if not re.fullmatch(r"[+-]?\d+", t)]
            if bad:
                raise ValueError(f"{bad[0]!r} is not an integer")
            arr = np.asarray([int(t) for t in tokens], dtype=np.int64)
    except (ValueError, OSError, EOFError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{where}: not a valid indices file ({exc}); write integers (text), a JSON list, or np.save(path, indices)"
        ) from None
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{where}: indices must be integers; got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{where}: indices must be a flat list; got shape {arr.shape}")
    return arr.astype(np.int64)


def _from_dataset(
    name: str,
    indices: Path,
    num_classes: int,
    channels: int,
    size: Tuple[int, int],
    data_dir: Optional[Path],
    data_source: str,
) -> CleanImages:
    spec = DATASETS.get(name).spec
    if (spec.num_classes, spec.channels, spec.height, spec.width) != (num_classes, channels, *size):
        raise ValueError(
            f"dataset {name!r} has {spec.num_classes} classes of {spec.channels}-channel "
            f"{_fmt((spec.height, spec.width))} images, but the model takes {num_classes} classes of "
            f"{channels}-channel {_fmt(size)} images"
        )
    idx = read_indices(indices)
    ds = load_dataset(name, data_dir=data_dir, source=data_source)
    n = len(ds.train)
    bad = np.flatnonzero((idx < 0) | (idx >= n))
    if len(bad):
        raise ValueError(
            f"{indices}: index {int(idx[bad[0]])} is outside the {n}-image train split of {name} "
            f"({ds.source}); indices must lie in [0, {n})"
        )
    uniq, counts = np.unique(idx, return_counts=True)
    if (counts > 1).any():
        raise ValueError(
            f"{indices}: index {int(uniq[counts > 1][0])} appears more than once; each clean image "
            f"may be used only once"
        )
    sub = ds.train.subset(idx)
    return CleanImages(
        sub.float_images(),
        sub.labels.long(),
        [str(c) for c in range(num_classes)],
        f"{name}:{ds.source} train[{indices}]",
    )


# ---------------------------------------------------------------------------------------------------------------
# the defender's split


def split_defense(images: CleanImages, *, val_fraction: float = 0.5, seed: int = 0) -> Tuple[CleanImages, CleanImages]:
    """Split ``images`` into defense-train and defense-validation, stratified by class.

    Each class with at least two images is in both halves (a class of one image goes to
    defense-train); the number of validation images of a class is its share of
    ``round(len(images) * val_fraction)``. Deterministic in ``seed``; the images of each half keep
    their original order. :func:`to_defense_data` turns the halves into a :class:`DefenseData`.

    Images that carry their own split (``images.val``, an ``.npz``'s ``val`` array) keep it, in order;
    ``val_fraction`` and ``seed`` are then unused.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction!r}")
    if images.val is not None:
        mask = images.val.numpy()
        return (
            images.subset(np.flatnonzero(~mask), f"{images.source} (defense-train, its own split)"),
            images.subset(np.flatnonzero(mask), f"{images.source} (defense-validation, its own split)"),
        )
    y = images.y.numpy()
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    members = {int(c): rng.permutation(np.flatnonzero(y == c)) for c in classes}
    # largest-remainder allocation of the validation images over the classes
    want = {c: len(m) * val_fraction for c, m in members.items()}
    n_val = {c: int(np.floor(v)) for c, v in want.items()}
    left = int(round(len(y) * val_fraction)) - sum(n_val.values())
    for c in sorted(want, key=lambda c: (-(want[c] - n_val[c]), c))[: max(left, 0)]:
        n_val[c] += 1
    for c, m in members.items():  # both halves hold every class that has two images
        n_val[c] = min(max(n_val[c], 1), len(m) - 1) if len(m) >= 2 else 0
    val = np.sort(np.concatenate([m[: n_val[c]] for c, m in members.items()]))
    train = np.sort(np.concatenate([m[n_val[c] :] for c, m in members.items()]))
    if len(val) == 0 or len(train) == 0:
        raise ValueError(
            f"{images.source}: {len(images)} images cannot be split into non-empty defense-train and "
            f"defense-validation halves (every class has a single image)"
        )
    return (
        images.subset(train, f"{images.source} (defense-train)"),
        images.subset(val, f"{images.source} (defense-validation)"),
    )


def to_defense_data(train: CleanImages, val: CleanImages) -> DefenseData:
    """The :class:`DefenseData` of a defense-train and a defense-validation half (see :func:`split_defense`)."""
    if train.class_names != val.class_names:
        raise ValueError("defense-train and defense-validation images have different classes")
    if train.x.shape[1:] != val.x.shape[1:]:
        raise ValueError(
            f"defense-train images are {tuple(train.x.shape[1:])}, defense-validation images {tuple(val.x.shape[1:])}"
        )
    return DefenseData(train.x, train.y, val.x, val.y, train.num_classes)

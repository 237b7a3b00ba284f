"""CIFAR-10 and CIFAR-100 in their original "python version" pickle-batch format.

Krizhevsky, *Learning Multiple Layers of Features from Tiny Images*, 2009.
https://www.cs.toronto.edu/~kriz/cifar.html

The official tarballs hold pickled dicts (``data``: N x 3072 uint8 rows, the 1024 red values of a
32x32 image in row-major order, then the green and the blue plane; ``labels`` or ``fine_labels``).
They are read with :class:`RestrictedUnpickler`, which only rebuilds plain containers and uint8
numpy arrays, so a tampered file cannot run code even when it was not checksum-verified (a file
found on disk is not; a download is). A tarball found on disk is read in memory without extracting
it; a downloaded one is extracted with :func:`safe_extract_tar`.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .download import DownloadError, download_file
from .idx import SAMPLE_DIR
from .registry import DataRequest, candidate_dirs, download_dir, not_found, register_dataset
from .spec import Dataset, DatasetSpec, ImageSet

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "CifarLayout",
    "LAYOUTS",
    "RestrictedUnpickler",
    "UnsafeArchiveError",
    "safe_unpickle",
    "parse_cifar_batch",
    "safe_extract_tar",
    "load_cifar_files",
]


# --------------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------------


def _numpy_helpers() -> Dict[str, Callable[..., Any]]:
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
        from numpy._core.numeric import _frombuffer  # type: ignore[attr-defined]  # private, not in the stubs
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
        from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]
    return {"_reconstruct": _reconstruct, "_frombuffer": _frombuffer}


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 pickles ``bytes`` at protocol < 3, restricted to latin-1."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _allowed_globals() -> Dict[Tuple[str, str], Any]:
    np_fns = _numpy_helpers()
    allowed: Dict[Tuple[str, str], Any] = {}
    for mod in ("builtins", "__builtin__"):
        for typ in (dict, list, tuple, bytes, bytearray, str, int, float, bool):
            allowed[(mod, typ.__name__)] = typ
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = np_fns["_reconstruct"]
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(mod, "_frombuffer")] = np_fns["_frombuffer"]
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only resolves plain builtin types and numpy array reconstruction.

    Any other global (``os.system``, ``builtins.eval``, arbitrary classes, ...) raises
    :class:`pickle.UnpicklingError`, so loading a tampered batch file cannot execute code.
    """

    _ALLOWED: Optional[Dict[Tuple[str, str], Any]] = None

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - see class docstring
        if RestrictedUnpickler._ALLOWED is None:
            RestrictedUnpickler._ALLOWED = _allowed_globals()
        try:
            return RestrictedUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only plain containers and numpy arrays are "
                f"allowed in a CIFAR batch file"
            ) from None


def safe_unpickle(data: bytes) -> Any:
    """Unpickle ``data`` (Python 2 or 3 pickles) with :class:`RestrictedUnpickler`, ``encoding="bytes"``."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


# --------------------------------------------------------------------------------------------------
# Batch parsing
# --------------------------------------------------------------------------------------------------


def _get(batch: dict, key: bytes) -> Any:
    """Look a key up as bytes (``encoding="bytes"``) or str (a pickle written by Python 3)."""
    if key in batch:
        return batch[key]
    return batch.get(key.decode("ascii"))


def parse_cifar_batch(
    data: bytes, label_key: bytes, source: str = "<bytes>", num_classes: Optional[int] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Parse one pickled CIFAR batch into uint8 images ``(N, 3, 32, 32)`` and int64 labels ``(N,)``.

    Args:
        data: the raw pickle file contents.
        label_key: ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100).
        source: a file name used in error messages.
        num_classes: when given, labels outside ``[0, num_classes)`` are an error.
    """
    try:
        batch = safe_unpickle(data)
    except Exception as exc:
        raise ValueError(f"{source}: not a readable CIFAR batch file ({exc})") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{source}: expected a pickled dict, got {type(batch).__name__}")
    pixels, labels = _get(batch, b"data"), _get(batch, label_key)
    if pixels is None or labels is None:
        keys = sorted(k.decode("latin1") if isinstance(k, bytes) else str(k) for k in batch)
        raise ValueError(f"{source}: missing 'data' or {label_key.decode()!r} (keys: {keys})")
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{source}: 'data' must be uint8 of shape (N, 3072), got {pixels.dtype} {pixels.shape}")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(pixels):
        raise ValueError(f"{source}: {len(pixels)} images but {len(labels)} labels")
    if num_classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{source}: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return pixels.reshape(-1, 3, 32, 32).copy(), labels


def _label_names(data: Optional[bytes], key: bytes) -> List[str]:
    if data is None:
        return []
    try:
        names = _get(safe_unpickle(data), key) or []
        return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    except Exception:  # the meta file is informative only
        return []


# --------------------------------------------------------------------------------------------------
# Archives
# --------------------------------------------------------------------------------------------------


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the target folder, or is a link or device."""


def _check_member(member: tarfile.TarInfo, dest: Path) -> None:
    name = member.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path or '..'; refusing to extract")
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"archive member {name!r} is a link or special file; refusing to extract")
    target = (dest / name).resolve()
    if target != dest and dest not in target.parents:
        raise UnsafeArchiveError(f"archive member {name!r} would be written outside {dest}")


def safe_extract_tar(tar_path: Path, dest: Path) -> List[Path]:
    """Extract ``tar_path`` into ``dest`` after checking every member; return the top-level entries.

    Every member is checked before anything is written: absolute paths, ``..`` components, links and
    special files raise :class:`UnsafeArchiveError`. Extraction goes to a temporary folder inside
    ``dest`` whose top-level entries are then moved into place (replacing stale ones), so an
    interrupted extraction never leaves a half-written dataset folder behind.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    dest = dest.resolve()
    with tarfile.open(tar_path, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            _check_member(m, dest)
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
        try:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, members=members, filter="data")
            else:  # pragma: no cover - Python < 3.11.4; members were checked above
                tar.extractall(tmp, members=members)
            tops = []
            for entry in sorted(tmp.iterdir()):
                target = dest / entry.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
                os.replace(entry, target)
                tops.append(target)
            return tops
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Layouts, search and loading
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CifarLayout:
    """Where a CIFAR variant's files are and what its batches are called."""

    spec: DatasetSpec
    url: str
    md5: str
    folder: str  # top-level folder inside the tarball
    train: Tuple[str, ...]
    test: Tuple[str, ...]
    meta: str
    label_key: bytes
    names_key: bytes

    @property
    def archive(self) -> str:
        """The tarball's file name."""
        return self.url.rsplit("/", 1)[-1]

    @property
    def batches(self) -> Tuple[str, ...]:
        return self.train + self.test


FileReader = Callable[[], Dict[str, bytes]]


def _folder_reader(folder: Path, layout: CifarLayout) -> FileReader:
    def read() -> Dict[str, bytes]:
        out = {name: (folder / name).read_bytes() for name in layout.batches}
        if (folder / layout.meta).is_file():
            out[layout.meta] = (folder / layout.meta).read_bytes()
        return out

    return read


def _tarball_reader(path: Path, layout: CifarLayout) -> FileReader:
    """Read the wanted members in one pass over the (compressed) tarball, without extracting."""

    def read() -> Dict[str, bytes]:
        wanted = {f"{layout.folder}/{n}": n for n in layout.batches + (layout.meta,)}
        out: Dict[str, bytes] = {}
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    key = wanted.get(PurePosixPath(member.name).as_posix())
                    if key is not None and member.isfile():
                        out[key] = tar.extractfile(member).read()  # type: ignore[union-attr]
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ValueError(
                f"{path}: corrupt or truncated tarball ({exc}); delete it and download it again from {layout.url}"
            ) from exc
        missing = [n for n in layout.batches if n not in out]
        if missing:
            raise ValueError(
                f"{path}: tarball lacks {layout.folder}/{{{', '.join(missing)}}}; is it the official "
                f"{layout.archive} from {layout.url}?"
            )
        return out

    return read


def _find_cifar(layout: CifarLayout, dirs: Sequence[Path]) -> Optional[Tuple[str, FileReader]]:
    """The first directory holding the extracted batches or the tarball, as (source, reader)."""
    for d in dirs:
        for folder in (d / layout.folder, d):
            if all((folder / name).is_file() for name in layout.batches):
                return str(folder), _folder_reader(folder, layout)
        if (d / layout.archive).is_file():
            return str(d / layout.archive), _tarball_reader(d / layout.archive, layout)
    return None


def load_cifar_files(layout: CifarLayout, files: Dict[str, bytes], source: str) -> Dataset:
    """Build a :class:`Dataset` from the raw batch files (name -> bytes) of ``layout``."""

    def _set(names: Tuple[str, ...]) -> ImageSet:
        parts = [parse_cifar_batch(files[n], layout.label_key, f"{source}/{n}", layout.spec.num_classes) for n in names]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        return ImageSet(torch.from_numpy(x), torch.from_numpy(y))

    classes = _label_names(files.get(layout.meta), layout.names_key)
    extra = {"classes": classes} if classes else {}
    return Dataset(layout.spec, _set(layout.train), _set(layout.test), source=source, extra=extra)


def _download(layout: CifarLayout, dest: Path) -> Path:
    archive = download_file(layout.url, dest / layout.archive, md5=layout.md5, timeout=30)
    safe_extract_tar(archive, dest)
    return dest / layout.folder


def _cifar_loader(name: str) -> Callable[[DataRequest], Dataset]:
    def load(req: DataRequest) -> Dataset:
        layout = LAYOUTS[name]
        if req.source == "sample":
            raise not_found(
                name, [SAMPLE_DIR / name], "no bundled sample ships for this dataset; use source='full' or 'auto'"
            )
        dirs = candidate_dirs(name, req.data_dir)
        found = _find_cifar(layout, dirs)
        if found is not None:
            source, read = found
            return load_cifar_files(layout, read(), source)
        why = ""
        if req.download:
            dest = download_dir(name, req.data_dir)
            try:
                folder = _download(layout, dest)
                return load_cifar_files(layout, _folder_reader(folder, layout)(), f"download:{folder}")
            except (DownloadError, UnsafeArchiveError, tarfile.TarError, OSError) as exc:
                why = f"download failed: {exc}"
        raise not_found(name, dirs, why)

    return load


def _how_to_get(layout: CifarLayout) -> str:
    return (
        f"download {layout.url} (md5 {layout.md5}) and put the tarball, or the {layout.folder}/ folder "
        f"extracted from it, in a folder DIR; pass --data-dir DIR (or set ONP_DATA=DIR). onp downloads "
        f"and verifies it itself when online (download=True)."
    )


CIFAR10 = DatasetSpec("cifar10", 10, 3, 32, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), hflip=True)
CIFAR100 = DatasetSpec("cifar100", 100, 3, 32, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), hflip=True)

CIFAR10_LAYOUT = CifarLayout(
    CIFAR10,
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "c58f30108f718f92721af3b95e74349a",
    "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    ("test_batch",),
    "batches.meta",
    b"labels",
    b"label_names",
)
CIFAR100_LAYOUT = CifarLayout(
    CIFAR100,
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "eb9058c3a382ffc7106e4002c42a8d85",
    "cifar-100-python",
    ("train",),
    ("test",),
    "meta",
    b"fine_labels",
    b"fine_label_names",
)

LAYOUTS: Dict[str, CifarLayout] = {"cifar10": CIFAR10_LAYOUT, "cifar100": CIFAR100_LAYOUT}

for _name, _layout in LAYOUTS.items():
    register_dataset(_layout.spec, how_to_get=_how_to_get(_layout))(_cifar_loader(_name))

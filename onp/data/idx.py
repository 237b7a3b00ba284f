"""Fashion-MNIST and MNIST in their original IDX format (optionally gzip-compressed).

Fashion-MNIST: Xiao, Rasul & Vollgraf, arXiv:1708.07747 (MIT licence, Zalando SE).
MNIST: LeCun, Cortes & Burges.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
from numpy.typing import DTypeLike

from .download import DownloadError, download_file
from .registry import DataRequest, candidate_dirs, download_dir, not_found, register_dataset
from .spec import Dataset, DatasetSpec, ImageSet

SAMPLE_DIR = Path(__file__).parent / "sample"

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (``.gz`` or raw): magic 0x0000 dtype ndim, big-endian dims, then data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError; a truncated .gz an EOFError
        raise ValueError(
            f"{path}: corrupt or truncated file, cannot be read ({exc}); replace it with the original "
            f"file (or delete it and let onp download it again)"
        ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtype_code, ndim = raw[2], raw[3]
    dtypes: Dict[int, DTypeLike] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise ValueError(f"{path}: unknown IDX dtype code {dtype_code:#x}")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated IDX file ({data.size} values, header says {dims})")
    return data.reshape(dims)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip-compressed IDX file (used for the bundled sample and tests)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb", compresslevel=9) as fh:
        fh.write(header + array.tobytes())


def _find_idx_dir(dirs: Iterable[Path]) -> Optional[Dict[str, Path]]:
    for d in dirs:
        found: Dict[str, Path] = {}
        for key, stem in IDX_FILES.items():
            for cand in (d / (stem + ".gz"), d / stem):
                if cand.is_file():
                    found[key] = cand
                    break
        if len(found) == len(IDX_FILES):
            return found
    return None


def _idx_files(name: str, dirs: Sequence[Path]) -> Dict[str, Path]:
    """:func:`_find_idx_dir` for a folder that must hold the files (the sample, a finished download)."""
    files = _find_idx_dir(dirs)
    if files is None:
        raise not_found(name, dirs, "the IDX files are incomplete")
    return files


def load_idx_dataset(spec: DatasetSpec, files: Dict[str, Path], source: str, is_sample: bool = False) -> Dataset:
    def _set(prefix: str) -> ImageSet:
        x = read_idx(files[f"{prefix}_images"])
        y = read_idx(files[f"{prefix}_labels"])
        if x.ndim != 3 or x.shape[1:] != (spec.height, spec.width):
            raise ValueError(
                f"{files[f'{prefix}_images']}: expected (N, {spec.height}, {spec.width}) images, got {x.shape}"
            )
        return ImageSet(torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))

    return Dataset(spec, _set("train"), _set("test"), source=source, is_sample=is_sample)


def _idx_loader(
    spec: DatasetSpec, urls: Dict[str, Tuple[str, str]], system_dirs: Sequence[str] = (), has_sample: bool = False
) -> Callable[[DataRequest], Dataset]:
    def load(req: DataRequest) -> Dataset:
        sample_dir = SAMPLE_DIR / spec.name
        if req.source == "sample":
            if not has_sample:
                raise not_found(spec.name, [sample_dir], "no bundled sample ships for this dataset")
            return load_idx_dataset(spec, _idx_files(spec.name, [sample_dir]), "bundled-sample", is_sample=True)
        dirs = candidate_dirs(spec.name, req.data_dir, system_dirs)
        files = _find_idx_dir(dirs)
        if files is not None:
            return load_idx_dataset(spec, files, str(files["train_images"].parent))
        why = ""
        if req.download:
            dest = download_dir(spec.name, req.data_dir)
            try:
                for key, (url, md5) in urls.items():
                    download_file(url, dest / (IDX_FILES[key] + ".gz"), md5=md5, timeout=10)
                return load_idx_dataset(spec, _idx_files(spec.name, [dest]), f"download:{dest}")
            except DownloadError as exc:
                why = f"download failed: {exc}"
        if req.source == "auto" and has_sample and req.data_dir is None:  # an explicit --data-dir is never replaced
            print(
                f"[onp] full {spec.name} not found ({why or 'not on disk'}); using the bundled sample "
                f"(12,000 train / 2,000 test images). Install the full dataset for paper-quality numbers."
            )
            return load_idx_dataset(spec, _idx_files(spec.name, [sample_dir]), "bundled-sample", is_sample=True)
        raise not_found(spec.name, dirs, why)

    return load


FASHION_MNIST = DatasetSpec(
    "fashion-mnist", 10, 1, 28, 28, (0.2860,), (0.3530,), hflip=True, licence="MIT (Zalando SE)"
)
_FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_FMNIST_URLS = {
    "train_images": (_FMNIST_URL + "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "train_labels": (_FMNIST_URL + "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
    "test_images": (_FMNIST_URL + "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
    "test_labels": (_FMNIST_URL + "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
}
register_dataset(
    FASHION_MNIST,
    how_to_get="on Debian/Ubuntu run `sudo apt-get install dataset-fashion-mnist` (files land in "
    "/usr/share/datasets/fashion-mnist), or put the four *-ubyte.gz files from "
    "https://github.com/zalandoresearch/fashion-mnist in a folder and pass --data-dir DIR "
    "(or set ONP_DATA=DIR); onp also downloads them itself when online.",
    system_dirs=("/usr/share/datasets/fashion-mnist",),
)(_idx_loader(FASHION_MNIST, _FMNIST_URLS, ("/usr/share/datasets/fashion-mnist",), has_sample=True))

MNIST = DatasetSpec("mnist", 10, 1, 28, 28, (0.1307,), (0.3081,), hflip=False, licence="CC BY-SA 3.0")
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_MNIST_URLS = {
    "train_images": (_MNIST_URL + "train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train_labels": (_MNIST_URL + "train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    "test_images": (_MNIST_URL + "t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
    "test_labels": (_MNIST_URL + "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
}
register_dataset(
    MNIST,
    how_to_get="put the four MNIST *-ubyte(.gz) files in a folder and pass --data-dir DIR (or set "
    "ONP_DATA=DIR); onp downloads them itself when online.",
)(_idx_loader(MNIST, _MNIST_URLS))

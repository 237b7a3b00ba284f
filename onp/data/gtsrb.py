"""GTSRB, the German Traffic Sign Recognition Benchmark, from its original zips or extracted folders.

Stallkamp, Schlipsing, Salmen & Igel, *Man vs. computer: Benchmarking machine learning algorithms
for traffic sign recognition*, Neural Networks 32, 2012. https://benchmark.ini.rub.de/gtsrb_dataset.html

Original layout (the official "Final" release, 43 classes)::

    GTSRB_Final_Training_Images.zip: GTSRB/Final_Training/Images/000NN/{*.ppm, GT-000NN.csv}
    GTSRB_Final_Test_Images.zip:     GTSRB/Final_Test/Images/*.ppm
    GTSRB_Final_Test_GT.zip:         GT-final_test.csv

The CSVs are semicolon-separated ``Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId``.
Each image (binary PPM, read by :func:`read_ppm`) is cropped to its ROI, the standard preprocessing,
and resized to 32x32 with antialiased bilinear interpolation (:func:`crop_and_resize`). The parsed
arrays are cached as a compressed ``.npz`` next to the data (or in the onp cache when that folder is
read-only), keyed by the size and modification time of the zips / CSV files, so only the first load
is slow. Delete ``gtsrb-32px-roi-v1.npz`` to force a re-parse.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..io import atomic_write_bytes, cache_root
from .download import DownloadError, download_file
from .idx import SAMPLE_DIR
from .registry import DataRequest, candidate_dirs, download_dir, not_found, register_dataset
from .spec import Dataset, DatasetSpec, ImageSet

__all__ = [
    "GTSRB",
    "GTSRB_FILES",
    "GtRow",
    "GtsrbFiles",
    "read_ppm",
    "parse_gt_csv",
    "crop_and_resize",
    "find_gtsrb",
    "load_gtsrb_files",
]

GTSRB = DatasetSpec("gtsrb", 43, 3, 32, 32, (0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669), hflip=False)
IMAGE_SIZE = 32
CACHE_VERSION = 1

GTSRB_URL = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"
GTSRB_FILES: Dict[str, Tuple[str, str]] = {  # part -> (zip name, md5)
    "train": ("GTSRB_Final_Training_Images.zip", "f33fd80ac59bff73c82d25ab499e03a3"),
    "test": ("GTSRB_Final_Test_Images.zip", "c7e4e6327067d32654124b0fe9e82185"),
    "gt": ("GTSRB_Final_Test_GT.zip", "fe31e9c9270bbcd7b84b7f21a9d9d9e5"),
}
_ZIP_PREFIX = {"train": "GTSRB/Final_Training/Images/", "test": "GTSRB/Final_Test/Images/", "gt": ""}
GT_TEST_CSV = "GT-final_test.csv"


# --------------------------------------------------------------------------------------------------
# File formats
# --------------------------------------------------------------------------------------------------

_WHITESPACE = b" \t\n\r\x0b\x0c"


def _skip_space_and_comments(data: bytes, pos: int) -> int:
    while pos < len(data):
        if data[pos] in _WHITESPACE:
            pos += 1
        elif data[pos] == ord("#"):
            ends = [i for i in (data.find(b"\n", pos), data.find(b"\r", pos)) if i >= 0]
            pos = min(ends) + 1 if ends else len(data)
        else:
            break
    return pos


def read_ppm(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode a binary PPM (``P6``) image into a writable uint8 array ``(H, W, 3)``.

    The header is ``P6``, width, height and maxval as ASCII decimals separated by whitespace
    (``#`` comments allowed), then exactly one whitespace byte and the raw RGB samples: one byte
    each when maxval < 256, else two big-endian bytes. Samples are rescaled to 0..255.
    """
    if data[:2] != b"P6":
        raise ValueError(f"{source}: not a binary PPM image (magic {data[:2]!r}, expected b'P6')")
    pos = 2
    fields: List[int] = []
    while len(fields) < 3:
        pos = _skip_space_and_comments(data, pos)
        start = pos
        while pos < len(data) and data[pos] not in _WHITESPACE and data[pos] != ord("#"):
            pos += 1
        token = data[start:pos]
        if not token.isdigit():
            raise ValueError(f"{source}: bad PPM header field {token!r} (expected width, height, maxval)")
        fields.append(int(token))
    if pos >= len(data) or data[pos] not in _WHITESPACE:
        raise ValueError(f"{source}: PPM header must end with one whitespace byte")
    pos += 1
    width, height, maxval = fields
    if width <= 0 or height <= 0 or not 0 < maxval < 65536:
        raise ValueError(f"{source}: bad PPM size {width}x{height} or maxval {maxval}")
    dtype = np.dtype(np.uint8) if maxval < 256 else np.dtype(">u2")
    count = width * height * 3
    if len(data) - pos < count * dtype.itemsize:
        raise ValueError(f"{source}: truncated PPM ({len(data) - pos} data bytes, need {count * dtype.itemsize})")
    pixels = np.frombuffer(data, dtype=dtype, count=count, offset=pos).reshape(height, width, 3)
    if maxval != 255:
        return np.rint(pixels.astype(np.float64) * (255.0 / maxval)).astype(np.uint8)
    return pixels.copy()


class GtRow(NamedTuple):
    """One annotation row: image file name, ROI (x1, y1, x2, y2; x2/y2 exclusive) and class."""

    filename: str
    roi: Tuple[int, int, int, int]
    class_id: int


_CSV_COLUMNS = ("Filename", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")


def parse_gt_csv(text: str, source: str = "<csv>", num_classes: int = 43) -> List[GtRow]:
    """Parse a GTSRB annotation CSV (``;``-separated, with a header naming the columns)."""
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")), delimiter=";")
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in _CSV_COLUMNS if c not in header]
    if missing:
        raise ValueError(
            f"{source}: not a GTSRB annotation file with class ids (missing columns {missing}; "
            f"header {header}). The test labels are in {GT_TEST_CSV} from {GTSRB_FILES['gt'][0]}."
        )
    col = {c: header.index(c) for c in _CSV_COLUMNS}
    rows = []
    for line_no, fields in enumerate(reader, start=2):
        if not any(f.strip() for f in fields):
            continue
        try:
            name = fields[col["Filename"]].strip()
            roi = tuple(int(fields[col[c]]) for c in ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"))
            label = int(fields[col["ClassId"]])
        except (IndexError, ValueError) as exc:
            raise ValueError(f"{source}:{line_no}: malformed row {fields} ({exc})") from exc
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(f"{source}:{line_no}: bad image file name {name!r}")
        if not 0 <= label < num_classes:
            raise ValueError(f"{source}:{line_no}: ClassId {label} outside [0, {num_classes})")
        rows.append(GtRow(name, roi, label))  # type: ignore[arg-type]
    return rows


def crop_and_resize(
    image: np.ndarray, roi: Optional[Tuple[int, int, int, int]] = None, size: int = IMAGE_SIZE
) -> np.ndarray:
    """Crop an ``(H, W, 3)`` uint8 image to ``roi`` and resize it to ``(3, size, size)`` uint8.

    ``roi`` is ``(x1, y1, x2, y2)`` with exclusive ``x2``/``y2`` (as ``image[y1:y2, x1:x2]``), clamped to
    the image. Resizing is bilinear with antialiasing (``torch.nn.functional.interpolate``).
    """
    h, w = image.shape[:2]
    if roi is not None:
        x1, y1, x2, y2 = roi
        x1, y1 = min(max(x1, 0), w - 1), min(max(y1, 0), h - 1)
        x2, y2 = min(max(x2, x1 + 1), w), min(max(y2, y1 + 1), h)
        image = image[y1:y2, x1:x2]
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0).float()
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return t.round_().clamp_(0, 255).to(torch.uint8)[0].numpy()


# --------------------------------------------------------------------------------------------------
# Reading from a folder or a zip
# --------------------------------------------------------------------------------------------------


def _stat(path: Path) -> List:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


class _DirTree:
    """Files below a folder, addressed by relative POSIX paths."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def glob(self, pattern: str) -> List[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.glob(pattern) if p.is_file())

    def stamp(self, rels: Sequence[str]) -> List:
        """Size and mtime of the root, of ``rels`` and of their folders (a change means a re-parse)."""
        paths = {self.root} | {self.root / r for r in rels} | {(self.root / r).parent for r in rels}
        return [_stat(p) for p in sorted(paths)]

    def close(self) -> None:
        pass

    def __str__(self) -> str:
        return str(self.root)


class _ZipTree:
    """Members of a zip below ``prefix``, addressed by paths relative to it; opened on first use."""

    def __init__(self, path: Path, prefix: str):
        self.path, self.prefix = Path(path), prefix
        self._zip: Optional[zipfile.ZipFile] = None

    def _open(self) -> zipfile.ZipFile:
        if self._zip is None:
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise ValueError(
                    f"{self.path}: corrupt or truncated zip ({exc}); delete it and download it "
                    f"again from {GTSRB_URL}{self.path.name}"
                ) from exc
        return self._zip

    def read(self, rel: str) -> bytes:
        return self._open().read(self.prefix + rel)

    def glob(self, pattern: str) -> List[str]:
        want = PurePosixPath(pattern).parts
        out = []
        for name in self._open().namelist():
            if name.startswith(self.prefix) and not name.endswith("/"):
                rel = PurePosixPath(name[len(self.prefix) :])
                if len(rel.parts) == len(want) and rel.match(pattern):
                    out.append(rel.as_posix())
        return sorted(out)

    def stamp(self, rels: Sequence[str]) -> List:
        """Size and mtime of the zip file."""
        return [_stat(self.path)]

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __str__(self) -> str:
        return f"{self.path}:{self.prefix}"


_Tree = Union[_DirTree, _ZipTree]


@dataclass
class GtsrbFiles:
    """Where the three parts of GTSRB were found in one folder (each a folder or a zip)."""

    root: Path
    train: Optional[_Tree] = None  # tree rooted at Final_Training/Images
    test: Optional[_Tree] = None  # tree rooted at Final_Test/Images
    gt: Optional[Tuple[_Tree, str]] = None  # (tree, relative path of GT-final_test.csv)

    def missing(self) -> List[str]:
        """Human-readable names of the parts that were not found."""
        names = {
            "train": "training images (GTSRB/Final_Training/Images or GTSRB_Final_Training_Images.zip)",
            "test": "test images (GTSRB/Final_Test/Images or GTSRB_Final_Test_Images.zip)",
            "gt": f"test labels ({GT_TEST_CSV} or GTSRB_Final_Test_GT.zip)",
        }
        return [v for k, v in names.items() if getattr(self, k) is None]

    def parts(self) -> Tuple[_Tree, _Tree, _Tree, str]:
        """``(train, test, gt tree, gt path)`` of a folder that holds all three parts."""
        if self.train is None or self.test is None or self.gt is None:
            raise ValueError(f"{self.root}: incomplete GTSRB ({'; '.join(self.missing())})")
        return self.train, self.test, self.gt[0], self.gt[1]

    def close(self) -> None:
        """Close any open zip files."""
        for tree in (self.train, self.test, self.gt[0] if self.gt else None):
            if tree is not None:
                tree.close()


def _locate_in(d: Path) -> GtsrbFiles:
    found = GtsrbFiles(root=d)
    for sub in ("GTSRB/Final_Training/Images", "Final_Training/Images"):
        if (d / sub).is_dir():
            found.train = _DirTree(d / sub)
            break
    else:
        if (d / GTSRB_FILES["train"][0]).is_file():
            found.train = _ZipTree(d / GTSRB_FILES["train"][0], _ZIP_PREFIX["train"])
    for sub in ("GTSRB/Final_Test/Images", "Final_Test/Images"):
        if (d / sub).is_dir() and any((d / sub).glob("*.ppm")):
            found.test = _DirTree(d / sub)
            break
    else:
        if (d / GTSRB_FILES["test"][0]).is_file():
            found.test = _ZipTree(d / GTSRB_FILES["test"][0], _ZIP_PREFIX["test"])
    for sub in ("", "GTSRB", "GTSRB/Final_Test", "GTSRB/Final_Test/Images", "Final_Test/Images"):
        if (d / sub / GT_TEST_CSV).is_file():
            found.gt = (_DirTree(d / sub), GT_TEST_CSV)
            break
    else:
        if (d / GTSRB_FILES["gt"][0]).is_file():
            found.gt = (_ZipTree(d / GTSRB_FILES["gt"][0], ""), GT_TEST_CSV)
    return found


def find_gtsrb(dirs: Sequence[Path]) -> Tuple[Optional[GtsrbFiles], str]:
    """The first folder holding all three parts, and a note on the first incomplete one seen."""
    note = ""
    for d in dirs:
        found = _locate_in(Path(d))
        if not found.missing():
            return found, note
        if len(found.missing()) < 3 and not note:
            note = f"{d} has only part of GTSRB; missing: {'; '.join(found.missing())}"
    return None, note


# --------------------------------------------------------------------------------------------------
# Parsing and caching
# --------------------------------------------------------------------------------------------------


def _read_member(tree: _Tree, rel: str) -> bytes:
    try:
        return tree.read(rel)
    except (KeyError, OSError) as exc:
        raise ValueError(f"{tree}/{rel}: listed in the annotations but cannot be read ({exc})") from exc


def _training_csvs(tree: _Tree) -> List[str]:
    csvs = tree.glob("*/GT-*.csv")
    if not csvs:
        raise ValueError(
            f"{tree}: no per-class GT-000NN.csv files found; is it the official "
            f"{GTSRB_FILES['train'][0]} (or its extracted GTSRB/Final_Training/Images)?"
        )
    return csvs


def _rows(tree: _Tree, csv_rel: str) -> List[Tuple[str, GtRow]]:
    """Annotation rows of one CSV, each with the image's path relative to ``tree``."""
    text = _read_member(tree, csv_rel).decode("utf-8", errors="replace")
    folder = PurePosixPath(csv_rel).parent.as_posix()
    prefix = "" if folder == "." else folder + "/"
    return [(prefix + r.filename, r) for r in parse_gt_csv(text, f"{tree}/{csv_rel}", GTSRB.num_classes)]


def _decode(tree: _Tree, rows: List[Tuple[str, GtRow]], size: int) -> Tuple[np.ndarray, np.ndarray]:
    x = np.empty((len(rows), 3, size, size), dtype=np.uint8)
    y = np.empty(len(rows), dtype=np.int64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny per-image ops: thread start-up costs several times the work itself
    try:
        for i, (rel, row) in enumerate(rows):
            x[i] = crop_and_resize(read_ppm(_read_member(tree, rel), f"{tree}/{rel}"), row.roi, size)
            y[i] = row.class_id
    finally:
        torch.set_num_threads(threads)
    return x, y


def _parse(files: GtsrbFiles, size: int) -> Dict[str, np.ndarray]:
    train, test, gt_tree, gt_rel = files.parts()
    train_rows = [r for c in _training_csvs(train) for r in _rows(train, c)]
    test_rows = _rows(gt_tree, gt_rel)
    if not test_rows:
        raise ValueError(f"{gt_tree}/{gt_rel}: no test annotations")
    train_x, train_y = _decode(train, train_rows, size)
    test_x, test_y = _decode(test, [(r.filename, r) for _, r in test_rows], size)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def _fingerprint(files: GtsrbFiles, size: int) -> str:
    train, test, gt_tree, gt_rel = files.parts()
    train_csvs = _training_csvs(train) if isinstance(train, _DirTree) else []
    return json.dumps(
        {
            "version": CACHE_VERSION,
            "size": size,
            "roi_crop": True,
            "train": train.stamp(train_csvs),
            "test": test.stamp([]),
            "gt": gt_tree.stamp([gt_rel]),
        },
        sort_keys=True,
    )


def _cache_paths(root: Path, size: int) -> List[Path]:
    name = f"gtsrb-{size}px-roi-v{CACHE_VERSION}.npz"
    paths = [Path(root) / name, cache_root() / "data" / "gtsrb" / name]
    return paths if paths[0].resolve() != paths[1].resolve() else paths[:1]


def _read_cache(path: Path, fingerprint: str) -> Optional[Dict[str, np.ndarray]]:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            if str(npz["fingerprint"]) != fingerprint:
                return None
            return {k: npz[k] for k in ("train_x", "train_y", "test_x", "test_y")}
    except Exception:  # corrupt or foreign file: re-parse and overwrite it
        return None


def _write_cache(paths: Sequence[Path], arrays: Dict[str, np.ndarray], fingerprint: str) -> Optional[Path]:
    buf = io.BytesIO()
    payload: Dict[str, Any] = {"fingerprint": np.array(fingerprint), **arrays}
    np.savez_compressed(buf, **payload)
    for path in paths:
        try:
            return atomic_write_bytes(path, buf.getvalue())
        except OSError:
            continue
    print(
        f"[onp] could not write the GTSRB cache to any of {[str(p) for p in paths]}; the next load will "
        f"parse the images again"
    )
    return None


def load_gtsrb_files(files: GtsrbFiles, source: str, size: int = IMAGE_SIZE) -> Dataset:
    """Load GTSRB from located files, using (or writing) the ``.npz`` cache."""
    try:
        fingerprint = _fingerprint(files, size)
        paths = _cache_paths(files.root, size)
        for path in paths:
            arrays = _read_cache(path, fingerprint)
            if arrays is not None:
                cache: Optional[Path] = path
                break
        else:
            print(f"[onp] parsing GTSRB from {files.root} (one-time; cached as {paths[0].name})")
            arrays = _parse(files, size)
            cache = _write_cache(paths, arrays, fingerprint)
    finally:
        files.close()
    train = ImageSet(torch.from_numpy(arrays["train_x"]), torch.from_numpy(arrays["train_y"]))
    test = ImageSet(torch.from_numpy(arrays["test_x"]), torch.from_numpy(arrays["test_y"]))
    return Dataset(GTSRB, train, test, source=source, extra={"cache": str(cache) if cache else None, "roi_crop": True})


def _download(dest: Path) -> GtsrbFiles:
    for zip_name, md5 in GTSRB_FILES.values():
        download_file(GTSRB_URL + zip_name, dest / zip_name, md5=md5, timeout=30)
    found = _locate_in(dest)
    if found.missing():
        raise DownloadError(f"downloaded files in {dest} are incomplete: {'; '.join(found.missing())}")
    return found


def _load(req: DataRequest) -> Dataset:
    name = GTSRB.name
    if req.source == "sample":
        raise not_found(
            name, [SAMPLE_DIR / name], "no bundled sample ships for this dataset; use source='full' or 'auto'"
        )
    dirs = candidate_dirs(name, req.data_dir)
    found, why = find_gtsrb(dirs)
    if found is not None:
        return load_gtsrb_files(found, str(found.root))
    if req.download:
        dest = download_dir(name, req.data_dir)
        try:
            files = _download(dest)
        except DownloadError as exc:
            why = "; ".join(w for w in (why, f"download failed: {exc}") if w)
        else:
            return load_gtsrb_files(files, f"download:{dest}")
    raise not_found(name, dirs, why)


register_dataset(
    GTSRB,
    how_to_get="download "
    + ", ".join(f"{GTSRB_URL}{z} (md5 {m})" for z, m in GTSRB_FILES.values())
    + "; put the three zips (or their extracted contents: GTSRB/Final_Training/Images, "
    f"GTSRB/Final_Test/Images and {GT_TEST_CSV}) in a folder DIR and pass --data-dir DIR (or set "
    "ONP_DATA=DIR). onp downloads and verifies them itself when online (download=True); the "
    "first load parses the images once and caches them as a .npz next to the data.",
)(_load)

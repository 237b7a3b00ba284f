"""CIFAR-10/100 and GTSRB parsers on tiny files written in the original formats (no network)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import struct
import tarfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

from onp.data import DATASETS, DatasetNotFoundError, cifar, dataset_spec, gtsrb, load_dataset
from onp.data.download import DownloadError, download_file

# --------------------------------------------------------------------------------------------------
# fixtures and writers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No real cache, no $ONP_DATA, and no network unless a test provides a fake urlopen."""
    monkeypatch.setenv("ONP_CACHE", str(tmp_path / "onp-cache"))
    monkeypatch.delenv("ONP_DATA", raising=False)

    def _no_network(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", _no_network)


class _FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _fake_urlopen(payloads: Dict[str, bytes], seen: List[str]):
    def urlopen(url, timeout=None):
        seen.append(url)
        return _FakeResponse(payloads[url])

    return urlopen


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _cifar_batch(
    n: int, num_classes: int, label_key: bytes, seed: int, protocol: int
) -> Tuple[np.ndarray, list, bytes]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, num_classes, size=n)]
    batch = {
        b"batch_label": b"testing batch",
        label_key: labels,
        b"data": data,
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [v % 20 for v in labels]
    return data, labels, pickle.dumps(batch, protocol=protocol)


def _write_tar(path: Path, members: Dict[str, bytes], dirs: Tuple[str, ...] = ()) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _cifar_files(layout: cifar.CifarLayout, protocol: int = 2):
    """Raw batch files (name -> bytes) and the expected arrays for a tiny copy of ``layout``."""
    k = layout.spec.num_classes
    files: Dict[str, bytes] = {}
    expected = {"train": ([], []), "test": ([], [])}
    for i, name in enumerate(layout.batches):
        data, labels, raw = _cifar_batch(3 if name in layout.train else 4, k, layout.label_key, i, protocol)
        files[name] = raw
        part = "train" if name in layout.train else "test"
        expected[part][0].append(data)
        expected[part][1].extend(labels)
    files[layout.meta] = pickle.dumps({layout.names_key: [b"class%d" % i for i in range(k)]}, protocol=protocol)
    return files, {p: (np.concatenate(x), np.array(y)) for p, (x, y) in expected.items()}


def _write_cifar_tarball(directory: Path, layout: cifar.CifarLayout, protocol: int = 2):
    files, expected = _cifar_files(layout, protocol)
    directory.mkdir(parents=True, exist_ok=True)
    path = _write_tar(
        directory / layout.archive, {f"{layout.folder}/{n}": b for n, b in files.items()}, dirs=(layout.folder,)
    )
    return path, expected


def _check_cifar(ds, layout: cifar.CifarLayout, expected) -> None:
    assert ds.spec == layout.spec
    for part, (data, labels) in expected.items():
        s = getattr(ds, part)
        assert tuple(s.images.shape) == (len(labels), 3, 32, 32)
        assert s.images.dtype.is_floating_point is False and str(s.images.dtype) == "torch.uint8"
        assert s.labels.tolist() == labels.tolist()
        # row-major planes: the first 1024 bytes are red, then green, then blue, each 32x32 row-major
        assert np.array_equal(s.images.numpy().reshape(len(labels), 3072), data)
        assert s.images[0, 0, 1, 2].item() == data[0, 0 * 1024 + 1 * 32 + 2]
        assert s.images[0, 1, 31, 0].item() == data[0, 1 * 1024 + 31 * 32 + 0]
        assert s.images[0, 2, 5, 7].item() == data[0, 2 * 1024 + 5 * 32 + 7]
    assert ds.extra["classes"][:2] == ["class0", "class1"]


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------


def test_datasets_registered():
    for name in ("cifar10", "cifar100", "gtsrb"):
        assert name in DATASETS, f"{name} not registered: did onp.data.{name[:5]} fail to import?"
    assert dataset_spec("cifar10").num_classes == 10 and dataset_spec("cifar10").hflip
    assert dataset_spec("cifar100").num_classes == 100
    assert dataset_spec("cifar100").mean == (0.5071, 0.4865, 0.4409)
    g = dataset_spec("gtsrb")
    assert (g.num_classes, g.image_shape, g.hflip) == (43, (3, 32, 32), False)


# --------------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_tarball_roundtrip(tmp_path, name, protocol):
    layout = cifar.LAYOUTS[name]
    tar_path, expected = _write_cifar_tarball(tmp_path / "data", layout, protocol)
    ds = load_dataset(name, data_dir=tmp_path / "data", download=False)
    assert ds.source == str(tar_path)
    _check_cifar(ds, layout, expected)
    assert not (tmp_path / "data" / layout.folder).exists()  # read in memory, not extracted


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_extracted_folder(tmp_path, name):
    layout = cifar.LAYOUTS[name]
    tar_path, expected = _write_cifar_tarball(tmp_path / "dl", layout)
    data_dir = tmp_path / "data"
    cifar.safe_extract_tar(tar_path, data_dir / name)  # <data_dir>/<name>/<folder>/
    ds = load_dataset(name, data_dir=data_dir, download=False)
    assert ds.source == str(data_dir / name / layout.folder)
    _check_cifar(ds, layout, expected)


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes str/bytes as Python 2 ``str`` opcodes (SHORT_BINSTRING/BINSTRING), as cPickle did."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def _save_py2_str(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def test_cifar_python2_pickles():
    """The official files were written by Python 2 cPickle with numpy 1 (numpy.core.multiarray)."""
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(
        {"batch_label": "training batch 1 of 5", "labels": [6, 9], "data": data, "filenames": ["a.png", "b.png"]}
    )
    legacy = buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy.core.multiarray\n" in legacy and b"_codecs" not in legacy
    x, y = cifar.parse_cifar_batch(legacy, b"labels", "legacy", 10)
    assert np.array_equal(x.reshape(2, -1), data) and y.tolist() == [6, 9]


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar_restricted_unpickler_rejects_code():
    raw = pickle.dumps({b"data": _Evil(), b"labels": [0]})
    with pytest.raises(ValueError, match="refusing to load global"):
        cifar.parse_cifar_batch(raw, b"labels", "evil")
    with pytest.raises(pickle.UnpicklingError):
        cifar.safe_unpickle(pickle.dumps(_Evil()))


def test_cifar_bad_batch_messages():
    _, _, raw = _cifar_batch(2, 10, b"labels", 0, protocol=2)
    with pytest.raises(ValueError, match="fine_labels"):
        cifar.parse_cifar_batch(raw, b"fine_labels", "x")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        cifar.parse_cifar_batch(
            pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [5]}), b"labels", "x", 3
        )
    with pytest.raises(ValueError, match=r"\(N, 3072\)"):
        cifar.parse_cifar_batch(pickle.dumps({b"data": np.zeros((1, 100), np.uint8), b"labels": [0]}), b"labels")


def test_cifar_tarball_missing_member(tmp_path):
    layout = cifar.CIFAR10_LAYOUT
    files, _ = _cifar_files(layout)
    del files["data_batch_3"]
    (tmp_path / "d").mkdir()
    _write_tar(tmp_path / "d" / layout.archive, {f"{layout.folder}/{n}": b for n, b in files.items()})
    with pytest.raises(ValueError, match="data_batch_3"):
        load_dataset("cifar10", data_dir=tmp_path / "d", download=False)


def test_cifar_download_verifies_and_extracts(tmp_path, monkeypatch):
    layout = cifar.CIFAR10_LAYOUT
    tar_path, expected = _write_cifar_tarball(tmp_path / "src", layout)
    payload = tar_path.read_bytes()
    seen: List[str] = []
    monkeypatch.setattr(urllib.request, "urlopen", _fake_urlopen({layout.url: payload}, seen))
    data_dir = tmp_path / "data"
    data_dir.mkdir()  # an explicit data_dir must exist; the download goes into it

    # the real md5 does not match our tiny tarball: the download is rejected and removed
    with pytest.raises(DatasetNotFoundError, match="checksum mismatch") as err:
        load_dataset("cifar10", data_dir=data_dir, download=True)
    assert layout.url in str(err.value)
    assert not (data_dir / "cifar10" / layout.archive).exists()

    monkeypatch.setitem(cifar.LAYOUTS, "cifar10", dataclasses.replace(layout, md5=_md5(payload)))
    ds = load_dataset("cifar10", data_dir=data_dir, download=True)
    assert ds.source.startswith("download:")
    _check_cifar(ds, layout, expected)
    assert (data_dir / "cifar10" / layout.folder / "data_batch_1").is_file()
    assert seen == [layout.url, layout.url]
    # a second load finds the extracted folder without touching the network
    ds2 = load_dataset("cifar10", data_dir=data_dir, download=True)
    assert ds2.source == str(data_dir / "cifar10" / layout.folder) and len(seen) == 2


# --------------------------------------------------------------------------------------------------
# tar safety and downloads
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["../evil.txt", "/tmp/onp-evil-abs.txt", "cifar-10-batches-py/../../evil.txt", "symlink"]
)
def test_safe_extract_rejects_unsafe_members(tmp_path, bad):
    tar_path = tmp_path / "bad.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        ok = tarfile.TarInfo("cifar-10-batches-py/ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        if bad == "symlink":
            info = tarfile.TarInfo("cifar-10-batches-py/link")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info = tarfile.TarInfo(bad)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    dest = tmp_path / "out" / "x"
    with pytest.raises(cifar.UnsafeArchiveError):
        cifar.safe_extract_tar(tar_path, dest)
    assert not (tmp_path / "out" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/onp-evil-abs.txt").exists()
    assert not dest.exists() or list(dest.iterdir()) == []  # nothing extracted, not even the good member


def test_download_file_checksum(tmp_path, monkeypatch):
    payload = b"some dataset bytes"
    url = "https://example.invalid/file.bin"
    seen: List[str] = []
    monkeypatch.setattr(urllib.request, "urlopen", _fake_urlopen({url: payload}, seen))
    dest = tmp_path / "dl" / "file.bin"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download_file(url, dest, md5="0" * 32)
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no bad file, no temp file
    assert download_file(url, dest, md5=_md5(payload)) == dest
    assert dest.read_bytes() == payload
    download_file(url, dest, md5=_md5(payload))  # already there and verified: not downloaded again
    assert len(seen) == 2


# --------------------------------------------------------------------------------------------------
# missing datasets
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,url",
    [
        ("cifar10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
        ("cifar100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
        ("gtsrb", "GTSRB_Final_Training_Images.zip"),
    ],
)
def test_missing_dataset_says_how_to_get_it(tmp_path, name, url):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(name, data_dir=tmp_path / "empty", download=False)
    msg = str(err.value)
    assert url in msg and "--data-dir" in msg and "ONP_DATA" in msg and str(tmp_path / "empty") in msg
    assert DATASETS.get(name).how_to_get in msg
    with pytest.raises(DatasetNotFoundError, match="no bundled sample"):
        load_dataset(name, source="sample")


def test_missing_dataset_download_failure_is_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="download failed.*network disabled"):
        load_dataset("cifar100", data_dir=tmp_path / "empty", download=True)
    # a data_dir that does not exist is refused without a download (a typo never creates folders)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_dataset("cifar100", data_dir=tmp_path / "nothing", download=True)
    assert not (tmp_path / "nothing").exists()


# --------------------------------------------------------------------------------------------------
# GTSRB
# --------------------------------------------------------------------------------------------------

BORDER = np.array([255, 0, 255], np.uint8)  # magenta frame outside the ROI


def _ppm(img: np.ndarray) -> bytes:
    h, w, _ = img.shape
    return b"P6\n# written by onp tests\n%d %d\n255\n" % (w, h) + img.tobytes()


def _sign(h: int, w: int, left: Tuple[int, int, int], right: Tuple[int, int, int], border: int = 5):
    """An image whose ROI (exclusive x2/y2) has ``left``/``right`` halves inside a magenta frame."""
    img = np.empty((h, w, 3), np.uint8)
    img[:] = BORDER
    x1, y1, x2, y2 = border, border, w - border, h - border
    mid = (x1 + x2) // 2
    img[y1:y2, x1:mid] = left
    img[y1:y2, mid:x2] = right
    return img, (x1, y1, x2, y2)


HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\r\n"


def _csv(rows) -> bytes:
    return (HEADER + "".join(f"{f};{w};{h};{r[0]};{r[1]};{r[2]};{r[3]};{c}\r\n" for f, w, h, r, c in rows)).encode()


def _colour(c: int, k: int) -> Tuple[Tuple[int, int, int], Tuple[int, int, int]]:
    return (c * 5, 100 + k, 200), (250 - c * 5, 10 + k, 0)


def _gtsrb_members():
    """(train members, test members, gt members, expected) as name -> bytes in the official layout."""
    train: Dict[str, bytes] = {}
    exp_train = []
    for c, sizes in ((0, [(40, 36), (29, 30)]), (7, [(52, 61)]), (42, [(17, 16), (120, 90)])):
        rows = []
        for k, (h, w) in enumerate(sizes):
            img, roi = _sign(h, w, *_colour(c, k))
            fname = f"{k:05d}_{k:05d}.ppm"
            train[f"GTSRB/Final_Training/Images/{c:05d}/{fname}"] = _ppm(img)
            rows.append((fname, w, h, roi, c))
            exp_train.append((c, _colour(c, k)))
        train[f"GTSRB/Final_Training/Images/{c:05d}/GT-{c:05d}.csv"] = _csv(rows)
    test: Dict[str, bytes] = {}
    rows, exp_test = [], []
    for i, (c, (h, w)) in enumerate([(3, (33, 35)), (41, (64, 48)), (0, (31, 31))]):
        img, roi = _sign(h, w, *_colour(c, 9))
        test[f"GTSRB/Final_Test/Images/{i:05d}.ppm"] = _ppm(img)
        rows.append((f"{i:05d}.ppm", w, h, roi, c))
        exp_test.append((c, _colour(c, 9)))
    # the official test zip ships an annotation file without ClassId; it must not be used
    test["GTSRB/Final_Test/Images/GT-final_test.test.csv"] = (
        "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2\r\n00000.ppm;35;33;5;5;30;28\r\n"
    ).encode()
    gt = {"GT-final_test.csv": _csv(rows)}
    return train, test, gt, {"train": exp_train, "test": exp_test}


def _write_tree(root: Path, members: Dict[str, bytes]) -> None:
    for name, data in members.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def _write_zip(path: Path, members: Dict[str, bytes]) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path.read_bytes()


def _write_gtsrb(root: Path, form: str):
    train, test, gt, expected = _gtsrb_members()
    payloads = {}
    if form == "folders":
        _write_tree(root, {**train, **test, **gt})
    else:
        for part, members in (("train", train), ("test", test), ("gt", gt)):
            zip_name = gtsrb.GTSRB_FILES[part][0]
            payloads[zip_name] = _write_zip(root / zip_name, members)
    return expected, payloads


def _check_gtsrb(ds, expected) -> None:
    assert ds.spec.name == "gtsrb"
    for part in ("train", "test"):
        s = getattr(ds, part)
        exp = expected[part]
        assert tuple(s.images.shape) == (len(exp), 3, 32, 32) and str(s.images.dtype) == "torch.uint8"
        assert s.labels.tolist() == [c for c, _ in exp]
        for img, (_, (left, right)) in zip(s.images.numpy(), exp):
            # ROI crop applied: no magenta frame anywhere; halves keep their colours and orientation
            assert np.array_equal(img[:, :, 0], np.tile(np.array(left, np.uint8)[:, None], (1, 32)))
            assert np.array_equal(img[:, :, 31], np.tile(np.array(right, np.uint8)[:, None], (1, 32)))
            magenta = (img[0] == 255) & (img[1] == 0) & (img[2] == 255)
            assert not magenta.any()


@pytest.mark.parametrize("form", ["folders", "zips"])
def test_gtsrb_roundtrip(tmp_path, form):
    expected, _ = _write_gtsrb(tmp_path / "data" / "gtsrb", form)
    ds = load_dataset("gtsrb", data_dir=tmp_path / "data", download=False)
    _check_gtsrb(ds, expected)
    assert ds.source == str(tmp_path / "data" / "gtsrb")
    cache = Path(ds.extra["cache"])
    assert cache.parent == tmp_path / "data" / "gtsrb" and cache.suffix == ".npz"


def test_gtsrb_mixed_zip_and_folder(tmp_path):
    train, test, gt, expected = _gtsrb_members()
    root = tmp_path / "d"
    _write_tree(root, {**test, **gt})
    _write_zip(root / gtsrb.GTSRB_FILES["train"][0], train)
    _check_gtsrb(load_dataset("gtsrb", data_dir=root, download=False), expected)


def test_gtsrb_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    root = tmp_path / "data"
    expected, _ = _write_gtsrb(root, "zips")
    first = load_dataset("gtsrb", data_dir=root, download=False)
    calls = []
    real = gtsrb.read_ppm
    monkeypatch.setattr(gtsrb, "read_ppm", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = load_dataset("gtsrb", data_dir=root, download=False)
    assert calls == [] and second.extra["cache"] == first.extra["cache"]
    assert np.array_equal(second.train.images.numpy(), first.train.images.numpy())
    assert second.test.labels.tolist() == first.test.labels.tolist()
    # a changed zip (size/mtime) means a re-parse
    zpath = root / gtsrb.GTSRB_FILES["gt"][0]
    with zipfile.ZipFile(zpath, "a") as zf:
        zf.writestr("Readme.txt", "changed")
    _check_gtsrb(load_dataset("gtsrb", data_dir=root, download=False), expected)
    assert calls


def test_gtsrb_partial_data_is_reported(tmp_path):
    train, _, _, _ = _gtsrb_members()
    _write_tree(tmp_path / "d", train)
    with pytest.raises(DatasetNotFoundError, match="missing: test images.*test labels"):
        load_dataset("gtsrb", data_dir=tmp_path / "d", download=False)


def test_gtsrb_download(tmp_path, monkeypatch):
    _, payloads = _write_gtsrb(tmp_path / "src", "zips")
    expected = _gtsrb_members()[3]
    seen: List[str] = []
    urls = {gtsrb.GTSRB_URL + name: data for name, data in payloads.items()}
    monkeypatch.setattr(urllib.request, "urlopen", _fake_urlopen(urls, seen))
    (tmp_path / "data").mkdir()  # an explicit data_dir must exist; the download goes into it
    with pytest.raises(DatasetNotFoundError, match="checksum mismatch"):
        load_dataset("gtsrb", data_dir=tmp_path / "data", download=True)
    assert not list((tmp_path / "data" / "gtsrb").glob("*.zip"))
    for part, (name, _) in list(gtsrb.GTSRB_FILES.items()):
        monkeypatch.setitem(gtsrb.GTSRB_FILES, part, (name, _md5(payloads[name])))
    ds = load_dataset("gtsrb", data_dir=tmp_path / "data", download=True)
    assert ds.source.startswith("download:")
    _check_gtsrb(ds, expected)


def test_read_ppm_variants():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    raw = b"P6 3\n#comment\n 2 #another\n255\n" + img.tobytes()
    out = gtsrb.read_ppm(raw)
    assert np.array_equal(out, img) and out.flags.writeable
    wide = (img.astype(">u2") * 257).tobytes()
    assert np.array_equal(gtsrb.read_ppm(b"P6\n3 2\n65535\n" + wide), img)
    assert gtsrb.read_ppm(b"P6\n1 1\n15\n" + bytes([15, 0, 5])).tolist() == [[[255, 0, 85]]]
    with pytest.raises(ValueError, match="truncated"):
        gtsrb.read_ppm(b"P6\n3 2\n255\n" + img.tobytes()[:-1], "x.ppm")
    with pytest.raises(ValueError, match="P6"):
        gtsrb.read_ppm(b"P3\n1 1\n255\n0 0 0\n")
    with pytest.raises(ValueError, match="header"):
        gtsrb.read_ppm(b"P6\n3 x\n255\n")


def test_gt_csv_errors():
    with pytest.raises(ValueError, match="GT-final_test.csv"):
        gtsrb.parse_gt_csv("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2\n", "test.csv")
    with pytest.raises(ValueError, match="ClassId 43"):
        gtsrb.parse_gt_csv(HEADER + "a.ppm;30;30;5;5;25;25;43\n", "t.csv")
    with pytest.raises(ValueError, match="bad image file name"):
        gtsrb.parse_gt_csv(HEADER + "../a.ppm;30;30;5;5;25;25;1\n", "t.csv")
    rows = gtsrb.parse_gt_csv("\ufeff" + HEADER + "a.ppm;30;31;5;6;25;26;3\n\n")
    assert rows == [gtsrb.GtRow("a.ppm", (5, 6, 25, 26), 3)]

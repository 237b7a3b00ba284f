"""A defender's own clean images (onp.data.user_data): ImageFolder, .npz and dataset+indices sources,
the checks on each, and the stratified defense split."""

import json
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from onp.data import Dataset, load_dataset
from onp.data.defense import DefenseData
from onp.data.user_data import CleanImages, load_clean_images, split_defense, to_defense_data

RNG = np.random.default_rng(0)


def _gray(n: int, size: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def _rgb(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _write_folder(root: Path, classes: Dict[str, np.ndarray], fmt: str = "PNG") -> Path:
    """``classes``: {folder name: array of images (N, H, W) or (N, H, W, 3)}; returns the root."""
    root.mkdir(parents=True, exist_ok=True)
    ext = ".png" if fmt == "PNG" else ".jpg"
    for name, imgs in classes.items():
        (root / name).mkdir()
        for i, a in enumerate(imgs):
            Image.fromarray(a).save(root / name / f"img{i:03d}{ext}", format=fmt)
    return root


def _gray_folder(tmp_path: Path, names: Sequence[str] = ("shirt", "boot"), n: int = 12, fmt: str = "PNG") -> Path:
    return _write_folder(tmp_path / "imgs", {nm: _gray(n, seed=i) for i, nm in enumerate(names)}, fmt)


# --------------------------------------------------------------------------------------------------------------
# ImageFolder layout


def test_png_grayscale_sorted_names_round_trip_exactly(tmp_path: Path) -> None:
    root = _gray_folder(tmp_path, names=("shirt", "boot", "coat"), n=8)
    imgs = load_clean_images(root, num_classes=3, channels=1, image_size=28)
    assert isinstance(imgs, CleanImages) and len(imgs) == 24
    assert imgs.x.dtype == torch.float32 and imgs.y.dtype == torch.int64
    assert tuple(imgs.x.shape) == (24, 1, 28, 28)
    assert imgs.class_names == ["boot", "coat", "shirt"]  # class index = position in sorted order
    assert imgs.class_counts() == [8, 8, 8]
    for label, (name, seed) in enumerate((("boot", 1), ("coat", 2), ("shirt", 0))):
        expected = torch.from_numpy(_gray(8, seed=seed)).unsqueeze(1).float() / 255.0
        assert torch.equal(imgs.x[imgs.y == label], expected), name  # PNG: exact uint8/255
    assert "imgs" in imgs.source


def test_png_rgb_integer_folders_are_the_labels(tmp_path: Path) -> None:
    # "10" sorts before "2" as a string: integer names must still mean their integer
    root = _write_folder(tmp_path / "imgs", {"2": _rgb(7, seed=2), "10": _rgb(7, seed=10), "0": _rgb(7, seed=0)})
    with pytest.warns(UserWarning, match=r"no image of class\(es\) \[1, 3, 4, 5, 6, 7, 8, 9\]"):
        imgs = load_clean_images(root, num_classes=11, channels=3, image_size=(32, 32))
    assert tuple(imgs.x.shape) == (21, 3, 32, 32)
    assert imgs.class_counts()[0] == imgs.class_counts()[2] == imgs.class_counts()[10] == 7
    assert imgs.class_names[10] == "10" and len(imgs.class_names) == 11
    expected = torch.from_numpy(_rgb(7, seed=10)).permute(0, 3, 1, 2).float() / 255.0
    assert torch.equal(imgs.x[imgs.y == 10], expected)


def test_jpeg_grayscale_and_rgb(tmp_path: Path) -> None:
    g = load_clean_images(_gray_folder(tmp_path / "g", fmt="JPEG"), num_classes=2, channels=1, image_size=28)
    assert tuple(g.x.shape) == (24, 1, 28, 28) and 0.0 <= g.x.min() and g.x.max() <= 1.0
    smooth = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (10, 32, 1))[..., None].repeat(3, -1)
    smooth[..., 0] //= 2  # a colour image, smooth so JPEG keeps it close
    root = _write_folder(tmp_path / "c", {"0": smooth, "1": smooth}, fmt="JPEG")
    c = load_clean_images(root, num_classes=2, channels=3, image_size=32)
    assert tuple(c.x.shape) == (20, 3, 32, 32)
    assert (c.x[0] - torch.from_numpy(smooth[0]).permute(2, 0, 1) / 255.0).abs().mean() < 0.02


def test_rgb_with_equal_channels_becomes_grayscale(tmp_path: Path) -> None:
    g = _gray(10)
    root = _write_folder(tmp_path / "imgs", {"0": np.stack([g] * 3, -1), "1": np.stack([g] * 3, -1)})
    imgs = load_clean_images(root, num_classes=2, channels=1, image_size=28)
    assert tuple(imgs.x.shape) == (20, 1, 28, 28)
    assert torch.equal(imgs.x[:10, 0], torch.from_numpy(g).float() / 255.0)


def test_colour_image_for_a_grayscale_model_is_refused(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "imgs", {"0": _rgb(10, 28), "1": _rgb(10, 28, seed=1)})
    with pytest.raises(ValueError, match=r"0/img000\.png: RGB \(colour\) images for a 1-channel"):
        load_clean_images(root, num_classes=2, channels=1, image_size=28)


def test_grayscale_image_for_an_rgb_model_is_refused(tmp_path: Path) -> None:
    root = _gray_folder(tmp_path)
    with pytest.raises(ValueError, match=r"boot/img000\.png: grayscale images for a 3-channel"):
        load_clean_images(root, num_classes=2, channels=3, image_size=28)


def test_wrong_image_size_names_file_and_sizes(tmp_path: Path) -> None:
    root = _gray_folder(tmp_path)
    Image.fromarray(_gray(1, size=30)[0][:, :29]).save(root / "boot" / "odd.png")
    with pytest.raises(ValueError, match=r"boot/odd\.png: image is 30x29 \(height x width\), expected 28x28"):
        load_clean_images(root, num_classes=2, channels=1, image_size=28)


def test_empty_class_folder_is_an_error(tmp_path: Path) -> None:
    root = _gray_folder(tmp_path, names=("a", "b"), n=12)
    (root / "c").mkdir()
    (root / "c" / ".DS_Store").write_bytes(b"x")  # hidden files are skipped
    with pytest.raises(ValueError, match=r"imgs/c: empty class folder \(class 2"):
        load_clean_images(root, num_classes=3, channels=1, image_size=28)


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    root = _gray_folder(tmp_path)
    (root / "shirt" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match=r"shirt/broken\.png: not a valid image file"):
        load_clean_images(root, num_classes=2, channels=1, image_size=28)


def test_truncated_png_is_named(tmp_path: Path) -> None:
    root = _gray_folder(tmp_path)
    good = (root / "shirt" / "img000.png").read_bytes()
    (root / "shirt" / "img000.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"shirt/img000\.png: not a valid image file"):
        load_clean_images(root, num_classes=2, channels=1, image_size=28)


def test_other_files_and_layouts_are_refused(tmp_path: Path) -> None:
    root = _gray_folder(tmp_path)
    (root / "boot" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"boot/notes\.txt: not a PNG or JPEG file"):
        load_clean_images(root, num_classes=2, channels=1, image_size=28)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(_gray(1)[0]).save(flat / "a.png")
    with pytest.raises(ValueError, match=r"flat/a\.png: an image directly in"):
        load_clean_images(flat, num_classes=2, channels=1, image_size=28)


def test_named_folders_must_match_num_classes(tmp_path: Path) -> None:
    root = _gray_folder(tmp_path, names=("a", "b"))
    with pytest.raises(ValueError, match=r"2 class folder\(s\) \(a, b\) for a 10-class model"):
        load_clean_images(root, num_classes=10, channels=1, image_size=28)


def test_integer_folder_out_of_range(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "imgs", {"0": _gray(10), "1": _gray(10), "12": _gray(2)})
    with pytest.raises(ValueError, match=r"imgs/12: folder name 12 is read as label 12 .* outside \[0, 10\)"):
        load_clean_images(root, num_classes=10, channels=1, image_size=28)


def test_fewer_than_20_images(tmp_path: Path) -> None:
    root = _gray_folder(tmp_path, n=9)
    with pytest.raises(ValueError, match=r"18 image\(s\); onp needs at least 20 clean images; 500 is the default"):
        load_clean_images(root, num_classes=2, channels=1, image_size=28)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no such file or folder: .*nowhere"):
        load_clean_images(tmp_path / "nowhere", num_classes=10, channels=1, image_size=28)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_classes=1), "num_classes"),
        (dict(channels=2), "channels"),
        (dict(image_size=(28,)), "image_size"),
        (dict(image_size=0), "image_size"),
    ],
)
def test_bad_arguments(tmp_path: Path, kw: Dict[str, Any], match: str) -> None:
    args = dict(num_classes=2, channels=1, image_size=28) | kw
    with pytest.raises(ValueError, match=match):
        load_clean_images(_gray_folder(tmp_path), **args)


# --------------------------------------------------------------------------------------------------------------
# .npz


def _npz(tmp_path: Path, **arrays: Any) -> Path:
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return path


def test_npz_layouts_agree(tmp_path: Path) -> None:
    nhwc = _rgb(30)
    y = np.arange(30) % 10
    expected = torch.from_numpy(nhwc).permute(0, 3, 1, 2).float() / 255.0
    for x in (
        nhwc,
        nhwc.transpose(0, 3, 1, 2),
        nhwc.astype(np.float32) / 255.0,
        nhwc.transpose(0, 3, 1, 2).astype(np.float64) / 255.0,
    ):
        imgs = load_clean_images(_npz(tmp_path, x=x, y=y), num_classes=10, channels=3, image_size=32)
        assert imgs.x.dtype == torch.float32 and torch.allclose(imgs.x, expected, atol=1e-7)
        assert imgs.y.tolist() == y.tolist() and imgs.y.dtype == torch.int64
        assert imgs.class_names == [str(c) for c in range(10)] and imgs.source.startswith("npz:")
    assert torch.equal(
        load_clean_images(_npz(tmp_path, x=nhwc, y=y), num_classes=10, channels=3, image_size=32).x, expected
    )  # uint8: exact


def test_npz_grayscale_nhw_nchw_nhwc(tmp_path: Path) -> None:
    g = _gray(20)
    y = np.arange(20, dtype=np.uint8) % 2
    results = [
        load_clean_images(_npz(tmp_path, x=x, y=y), num_classes=2, channels=1, image_size=28).x
        for x in (g, g[:, None], g[..., None], np.stack([g] * 3, -1))
    ]
    for r in results:
        assert torch.equal(r, results[0]) and tuple(r.shape) == (20, 1, 28, 28)


def test_npz_missing_class_is_a_warning_one_class_an_error(tmp_path: Path) -> None:
    x = _gray(20)
    with pytest.warns(UserWarning, match=r"no image of class\(es\) \[2\]"):
        load_clean_images(_npz(tmp_path, x=x, y=np.arange(20) % 2), num_classes=3, channels=1, image_size=28)
    with pytest.raises(ValueError, match=r"all 20 images are of class 1 .* at least two classes"):
        load_clean_images(_npz(tmp_path, x=x, y=np.ones(20, np.int64)), num_classes=3, channels=1, image_size=28)


def test_npz_all_classes_present_no_warning(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_clean_images(_npz(tmp_path, x=_gray(20), y=np.arange(20) % 2), num_classes=2, channels=1, image_size=28)


@pytest.mark.parametrize(
    "arrays, match",
    [
        (dict(x=_gray(20), y=np.arange(20)), r"d\.npz: label 10 \(image 10; 10 such label\(s\)\) is outside \[0, 10\)"),
        (dict(x=_gray(20), y=-(np.arange(20) % 2)), r"label -1 .* outside \[0, 10\)"),
        (dict(x=np.full((20, 28, 28), np.nan, np.float32), y=np.zeros(20, int)), r"d\.npz: x holds NaN or infinite"),
        (dict(x=np.where(np.eye(28) > 0, np.inf, 0.5)[None].repeat(20, 0), y=np.zeros(20, int)), "NaN or infinite"),
        (dict(x=_gray(20).astype(np.float32), y=np.arange(20) % 2), r"float x must lie in \[0, 1\]; found \[0, 255\]"),
        (dict(x=_gray(20).astype(np.float32) / 255 - 0.5, y=np.arange(20) % 2), "look normalised"),
        (dict(x=_gray(20).astype(np.int64), y=np.arange(20) % 2), r"x has dtype int64; onp takes uint8"),
        (dict(x=np.array([["a"] * 28] * 28)[None].repeat(20, 0), y=np.arange(20) % 2), r"x has dtype <U1"),
        (dict(x=_gray(20), y=(np.arange(20) % 2).astype(float)), r"labels y must be integers; got dtype float64"),
        (dict(x=_gray(20), y=np.array(["cat", "dog"] * 10)), r"labels y must be integers"),
        (dict(x=_gray(20), y=np.eye(2, dtype=int)[np.arange(20) % 2]), r"shape \(N,\); got \(20, 2\)"),
        (dict(x=_gray(20), y=np.arange(19) % 2), r"20 images in x but 19 labels"),
        (dict(x=_gray(20)), r"d\.npz: no array y \(found: x\)"),
        (dict(images=_gray(20), labels=np.arange(20)), r"no array x or y"),
        (dict(x=_gray(20, size=30), y=np.arange(20) % 2), r"x has shape \(20, 30, 30\); expected \(N, 28, 28\)"),
        (dict(x=_rgb(20, 28)[:, :, :27], y=np.arange(20) % 2), r"expected 1-channel images of 28x28"),
        (dict(x=_rgb(20, 28), y=np.arange(20) % 2), r"RGB \(colour\) images for a 1-channel"),
        (dict(x=_gray(20)[:, 0], y=np.arange(20) % 2), r"x must be images .* got shape \(20, 28\)"),
        (dict(x=_gray(10), y=np.arange(10) % 2), r"10 image\(s\); onp needs at least 20"),
    ],
)
def test_npz_bad_inputs(tmp_path: Path, arrays: Dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_clean_images(
            _npz(tmp_path, **arrays), num_classes=10 if "label" in match else 2, channels=1, image_size=28
        )


def test_npz_grayscale_for_rgb_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"d\.npz: grayscale images for a 3-channel"):
        load_clean_images(
            _npz(tmp_path, x=_gray(20, 32), y=np.arange(20) % 2), num_classes=2, channels=3, image_size=32
        )


def test_npz_ambiguous_layout_is_explained(tmp_path: Path) -> None:
    x = np.zeros((20, 3, 3, 3), np.uint8)
    with pytest.raises(ValueError, match=r"fits both \(N, C, H, W\) and \(N, H, W, C\)"):
        load_clean_images(_npz(tmp_path, x=x, y=np.arange(20) % 2), num_classes=2, channels=3, image_size=3)
    # a 1-channel image of size 3x3 stored (N, 3, 3, 1): only one reading has one channel
    x1 = np.arange(20 * 9, dtype=np.uint8).reshape(20, 3, 3, 1)
    imgs = load_clean_images(_npz(tmp_path, x=x1, y=np.arange(20) % 2), num_classes=2, channels=1, image_size=3)
    assert torch.equal(imgs.x[:, 0], torch.from_numpy(x1[..., 0]).float() / 255)


def test_npz_object_arrays_are_refused_never_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.array([object()] * 20, dtype=object), y=np.arange(20) % 2)
    with pytest.raises(ValueError, match=r"d\.npz: x, y or val cannot be read: object arrays are refused"):
        load_clean_images(path, num_classes=2, channels=1, image_size=28)


@pytest.mark.parametrize(
    "content, name, match",
    [
        (b"not a zip at all", "junk.npz", r"junk\.npz: not a valid \.npz file"),
        (b"", "empty.npz", r"empty\.npz: not a valid \.npz file"),
        (None, "one.npy", r"one\.npy: a single \.npy array"),
    ],
)
def test_not_an_npz(tmp_path: Path, content: Optional[bytes], name: str, match: str) -> None:
    path = tmp_path / name
    if content is None:
        np.save(path, _gray(20))
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        load_clean_images(path, num_classes=2, channels=1, image_size=28)


# --------------------------------------------------------------------------------------------------------------
# a registered dataset with an index file


@pytest.fixture(scope="module")
def sample() -> Dataset:
    return load_dataset("fashion-mnist", source="sample")


def test_dataset_with_index_files(tmp_path: Path, sample: Dataset) -> None:
    idx = np.random.default_rng(1).choice(len(sample.train), 60, replace=False)
    expected = sample.train.subset(idx)
    (tmp_path / "i.txt").write_text(
        "# my clean images\n"
        + "\n".join(f"{i}," for i in idx[:30])
        + "\n"
        + " ".join(map(str, idx[30:]))
        + "  # rest\n"
    )
    (tmp_path / "i.json").write_text(json.dumps({"indices": idx.tolist()}))
    (tmp_path / "l.json").write_text(json.dumps(idx.tolist()))
    np.save(tmp_path / "i.npy", idx.astype(np.int32))
    for name in ("i.txt", "i.json", "l.json", "i.npy"):
        imgs = load_clean_images(
            "fashion-mnist", num_classes=10, channels=1, image_size=28, indices=tmp_path / name, data_source="sample"
        )
        assert torch.equal(imgs.x, expected.float_images()), name
        assert torch.equal(imgs.y, expected.labels), name
        assert "fashion-mnist" in imgs.source and name in imgs.source


@pytest.mark.parametrize(
    "write, match",
    [
        (lambda p: p.write_text("1 2 12000"), r"i\.txt: index 12000 is outside the 12000-image train split"),
        (lambda p: p.write_text("1 2 -3"), r"index -3 is outside"),
        (lambda p: p.write_text(" ".join(map(str, list(range(30)) + [7]))), r"i\.txt: index 7 appears more than once"),
        (lambda p: p.write_text("1 2 x3"), r"i\.txt \(indices\): not a valid indices file \('x3' is not an integer\)"),
        (lambda p: p.write_text("1.5 2"), r"'1\.5' is not an integer"),
        (lambda p: p.write_text(""), r"0 image\(s\); onp needs at least 20"),
    ],
)
def test_dataset_bad_index_files(tmp_path: Path, sample: Dataset, write: Callable[[Path], object], match: str) -> None:
    path = tmp_path / "i.txt"
    write(path)
    with pytest.raises(ValueError, match=match):
        load_clean_images(
            "fashion-mnist", num_classes=10, channels=1, image_size=28, indices=path, data_source="sample"
        )


@pytest.mark.parametrize(
    "name, write, match",
    [
        (
            "i.json",
            lambda p: p.write_text("[1, 2.5]"),
            r"i\.json \(indices\): not a valid indices file \(expected a JSON",
        ),
        ("i.json", lambda p: p.write_text('{"idx": [1]}'), r"expected a JSON list"),
        ("i.json", lambda p: p.write_text("[1, 2"), r"i\.json \(indices\): not a valid indices file"),
        (
            "i.npy",
            lambda p: np.save(p, np.array([1.0, 2.0])),
            r"i\.npy \(indices\): indices must be integers; got dtype "
            r"float64",
        ),
        ("i.npy", lambda p: np.save(p, np.array([object()])), r"i\.npy \(indices\): not a valid indices file"),
        ("i.npy", lambda p: np.save(p, np.zeros((5, 5), int)), r"flat list; got shape \(5, 5\)"),
    ],
)
def test_dataset_bad_index_formats(tmp_path: Path, name: str, write: Callable[[Path], object], match: str) -> None:
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError, match=match):
        load_clean_images(
            "fashion-mnist", num_classes=10, channels=1, image_size=28, indices=path, data_source="sample"
        )


def test_dataset_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"dataset 'fashion-mnist' needs indices"):
        load_clean_images("fashion-mnist", num_classes=10, channels=1, image_size=28, data_source="sample")
    with pytest.raises(FileNotFoundError, match=r"no such file or folder: .*nope\.txt \(the indices file\)"):
        load_clean_images(
            "fashion-mnist",
            num_classes=10,
            channels=1,
            image_size=28,
            indices=tmp_path / "nope.txt",
            data_source="sample",
        )
    (tmp_path / "i.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match=r"dataset 'fashion-mnist' has 10 classes of 1-channel 28x28"):
        load_clean_images("fashion-mnist", num_classes=10, channels=3, image_size=32, indices=tmp_path / "i.txt")
    with pytest.raises(ValueError, match=r"indices is only used with a registered dataset name"):
        load_clean_images(_gray_folder(tmp_path), num_classes=2, channels=1, image_size=28, indices=tmp_path / "i.txt")


# --------------------------------------------------------------------------------------------------------------
# the defender's split


def _labelled(counts: Sequence[int]) -> CleanImages:
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    x = torch.arange(len(y), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2) / len(y)
    return CleanImages(x.contiguous(), torch.from_numpy(y).long(), [str(c) for c in range(len(counts))], "test")


def test_split_is_stratified_disjoint_covering_and_deterministic() -> None:
    imgs = _labelled([50, 7, 2, 31, 3, 1])
    tr, va = split_defense(imgs, val_fraction=0.5, seed=3)
    ids_tr, ids_va = (
        set((tr.x[:, 0, 0, 0] * len(imgs)).round().long().tolist()),
        set((va.x[:, 0, 0, 0] * len(imgs)).round().long().tolist()),
    )
    assert not ids_tr & ids_va and len(ids_tr | ids_va) == len(imgs) == len(tr) + len(va)
    assert len(va) == round(len(imgs) * 0.5)
    for c, n in enumerate([50, 7, 2, 31, 3, 1]):
        ntr, nva = tr.class_counts()[c], va.class_counts()[c]
        assert ntr + nva == n
        if n >= 2:
            assert ntr >= 1 and nva >= 1, c
    assert tr.class_counts()[5] == 1  # a single image goes to defense-train
    tr2, va2 = split_defense(imgs, val_fraction=0.5, seed=3)
    assert torch.equal(tr.x, tr2.x) and torch.equal(va.y, va2.y)
    tr3, _ = split_defense(imgs, val_fraction=0.5, seed=4)
    assert not torch.equal(tr.x, tr3.x)
    assert tr.class_names == imgs.class_names and "defense-train" in tr.source


def test_split_fraction_and_to_defense_data(tmp_path: Path) -> None:
    imgs = load_clean_images(
        _npz(tmp_path, x=_gray(100), y=np.arange(100) % 10), num_classes=10, channels=1, image_size=28
    )
    tr, va = split_defense(imgs, val_fraction=0.2, seed=0)
    assert (len(tr), len(va)) == (80, 20) and va.class_counts() == [2] * 10
    data = to_defense_data(tr, va)
    assert isinstance(data, DefenseData) and data.num_classes == 10
    assert torch.equal(data.train_x, tr.x) and torch.equal(data.val_y, va.y)
    assert len(data.all_y) == 100
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="val_fraction must be in"):
            split_defense(imgs, val_fraction=bad)
    with pytest.raises(ValueError, match="every class has a single image"):
        split_defense(_labelled([1, 1, 1]))


def test_an_npz_with_its_own_validation_split_keeps_it(tmp_path: Path) -> None:
    x, y = _gray(40), np.arange(40) % 10
    val = np.zeros(40, bool)
    val[[3, 7, 8, 20, 39]] = True  # not stratified, not a fraction of 0.5: the defender's own choice
    imgs = load_clean_images(_npz(tmp_path, x=x, y=y, val=val), num_classes=10, channels=1, image_size=28)
    tr, va = split_defense(imgs, val_fraction=0.5, seed=123)
    assert va.y.tolist() == [3, 7, 8, 0, 9] and len(tr) == 35
    assert torch.equal(va.x[0, 0], torch.from_numpy(x[3]).float() / 255)  # in the file's order
    assert torch.equal(tr.x[3, 0], torch.from_numpy(x[4]).float() / 255)
    as_ints = load_clean_images(
        _npz(tmp_path, x=x, y=y, val=val.astype(np.uint8)), num_classes=10, channels=1, image_size=28
    )
    assert torch.equal(as_ints.val, imgs.val)
    for bad, why in (
        (val[:39], "val must mark each of the 40 images"),
        (val.astype(np.float32), "val must mark each"),
        (np.full(40, 2, np.int64), "val must mark each"),
        (np.ones(40, bool), "val puts all 40 images in one half"),
        (np.zeros(40, bool), "val puts all 40 images in one half"),
    ):
        with pytest.raises(ValueError, match=why):
            load_clean_images(_npz(tmp_path, x=x, y=y, val=bad), num_classes=10, channels=1, image_size=28)


def test_alpha_palette_and_mixed_names(tmp_path: Path) -> None:
    g = _gray(10)
    rgba = np.concatenate([np.stack([g] * 3, -1), np.full((10, 28, 28, 1), 255, np.uint8)], -1)
    root = _write_folder(tmp_path / "imgs", {"0": rgba, "1": rgba})
    Image.fromarray(g[0]).convert("P").save(root / "1" / "palette.png")
    imgs = load_clean_images(root, num_classes=2, channels=1, image_size=28)  # opaque alpha is dropped
    assert len(imgs) == 21 and torch.equal(imgs.x[0, 0], torch.from_numpy(g[0]).float() / 255)
    assert torch.equal(imgs.x[-1, 0], torch.from_numpy(g[0]).float() / 255)  # palette of grays: exact
    see_through = rgba[0].copy()
    see_through[0, 0, 3] = 0
    Image.fromarray(see_through).save(root / "0" / "zz.png")
    with pytest.raises(ValueError, match=r"0/zz\.png: image has transparent pixels"):
        load_clean_images(root, num_classes=2, channels=1, image_size=28)
    mixed = _write_folder(tmp_path / "mixed", {"0": g, "1": g, "cat": g})
    with pytest.warns(UserWarning, match=r"some class folder names are integers .* \['0', '1', 'cat'\]"):
        load_clean_images(mixed, num_classes=3, channels=1, image_size=28)

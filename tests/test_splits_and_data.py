import numpy as np
import pytest
import torch

from onp.data import DatasetNotFoundError, load_dataset
from onp.data.augment import Augment, random_crop, random_hflip
from onp.data.splits import Splits, make_splits
from onp.registry import UnknownNameError


def test_splits_disjoint_and_cover():
    s = make_splits(1000, defense_size=100, val_fraction=0.4, seed=3)
    a, t, v = map(set, (s.attacker_train, s.defense_train, s.defense_val))
    assert not (a & t) and not (a & v) and not (t & v)
    assert len(a | t | v) == 1000
    assert (len(t), len(v)) == (60, 40)
    assert make_splits(1000, 100, 0.4, seed=3).digest() == s.digest()
    assert make_splits(1000, 100, 0.4, seed=4).digest() != s.digest()


def test_splits_save_load(tmp_path):
    s = make_splits(200, 20, 0.5, seed=0)
    s.save(tmp_path / "s.npz")
    assert Splits.load(tmp_path / "s.npz").digest() == s.digest()


@pytest.mark.parametrize("size, frac", [(0, 0.5), (1000, 0.5), (5000, 0.5), (100, 0.0), (100, 1.0)])
def test_splits_reject_bad_values(size, frac):
    with pytest.raises(ValueError):
        make_splits(1000, size, frac)


def test_bundled_sample_is_real_balanced_fashion_mnist():
    ds = load_dataset("fashion-mnist", source="sample")
    assert ds.is_sample and ds.source == "bundled-sample"
    assert tuple(ds.train.images.shape) == (12000, 1, 28, 28)
    assert tuple(ds.test.images.shape) == (2000, 1, 28, 28)
    assert ds.train.labels.bincount().tolist() == [1200] * 10
    assert ds.test.labels.bincount().tolist() == [200] * 10
    # the known Fashion-MNIST mean intensity (0.2860) -- a sanity check that these are real images
    assert abs(ds.train.images.float().mean().item() / 255 - 0.286) < 0.01


def test_unknown_dataset_lists_choices():
    with pytest.raises(UnknownNameError, match="fashion-mnist"):
        load_dataset("imagenet")


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ONP_CACHE", str(tmp_path))
    monkeypatch.delenv("ONP_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError, match="--data-dir"):
        load_dataset("mnist", data_dir=tmp_path / "nothing", download=False)


def test_idx_reader_roundtrip_and_data_dir(tmp_path, monkeypatch):
    from onp.data.idx import IDX_FILES, write_idx

    monkeypatch.setenv("ONP_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    d = tmp_path / "mnist"
    d.mkdir()
    for prefix, n in (("train", 30), ("test", 10)):
        write_idx(d / (IDX_FILES[f"{prefix}_images"] + ".gz"), rng.integers(0, 255, (n, 28, 28)))
        write_idx(d / (IDX_FILES[f"{prefix}_labels"] + ".gz"), np.arange(n) % 10)
    ds = load_dataset("mnist", data_dir=tmp_path, download=False)
    assert len(ds.train) == 30 and len(ds.test) == 10 and ds.train.labels[:3].tolist() == [0, 1, 2]


def test_augment_crop_and_flip():
    x = torch.rand(8, 1, 6, 6)
    g = torch.Generator().manual_seed(0)
    assert random_crop(x, 0) is x
    out = random_crop(x, 2, g)
    assert out.shape == x.shape
    # every crop is x shifted: its non-padding pixels are a sub-block of the original image
    flipped = random_hflip(x, 1.0)
    assert torch.equal(flipped, x.flip(-1))
    assert torch.equal(random_hflip(x, 0.0), x)
    aug = Augment(padding=1, hflip=False)
    assert aug(x, torch.Generator().manual_seed(1)).shape == x.shape

"""Tests for tokenizer/data.py: Fashion-MNIST loading, image folders, EpochSampler."""

import gzip
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizer import data
from tokenizer.common.errors import UserError
from tokenizer.common.training import EpochSampler
from tokenizer.data import FMNIST_CLASSES, FashionMNIST, ImageFolderDataset, build_dataset, load_fashion_mnist

PKG_ROOT = Path(data.FMNIST_DEFAULT_ROOT)
HAVE_PKG = all((PKG_ROOT / f).is_file() for pair in data._FMNIST_FILES.values() for f in pair)


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    monkeypatch.delenv("FASHION_MNIST_ROOT", raising=False)


def _subset(monkeypatch, tmp_path):
    monkeypatch.setenv("FASHION_MNIST_ROOT", str(tmp_path))


# ---------------------------------------------------------------- Fashion-MNIST


@pytest.mark.skipif(not HAVE_PKG, reason="Debian package dataset-fashion-mnist not installed")
@pytest.mark.parametrize("split,n", [("train", 60_000), ("test", 10_000)])
def test_package_files(split, n):
    images, labels = load_fashion_mnist(split)
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert labels.min() == 0 and labels.max() == 9
    assert np.bincount(labels).tolist() == [n // 10] * 10
    assert images.max() == 255 and images.min() == 0


def test_subset_file():
    with np.load(data.FMNIST_SUBSET_PATH) as z:
        assert sorted(z.files) == ["test_images", "test_labels", "train_images", "train_labels"]
    assert data.FMNIST_SUBSET_PATH.stat().st_size <= 2_000_000


def test_subset_fallback(monkeypatch, tmp_path, caplog):
    _subset(monkeypatch, tmp_path)  # empty folder: no package files
    monkeypatch.setattr(data, "_subset_warned", False)
    monkeypatch.setattr(data, "_cache", {})
    with caplog.at_level(logging.WARNING, logger="tokenizer.data"):
        tr_x, tr_y = load_fashion_mnist("train")
        te_x, te_y = load_fashion_mnist("test")
    assert sum("bundled subset" in r.getMessage() for r in caplog.records) == 1  # warned once
    assert tr_x.shape == (3000, 28, 28) and tr_x.dtype == np.uint8 and tr_y.dtype == np.int64
    assert te_x.shape == (1000, 28, 28) and te_y.shape == (1000,)
    assert np.bincount(tr_y, minlength=10).tolist() == [300] * 10
    assert np.bincount(te_y, minlength=10).tolist() == [100] * 10
    assert tr_x.max() > 200 and tr_x.min() == 0
    with pytest.raises(UserError, match="not found"):
        load_fashion_mnist("train", allow_subset=False)


@pytest.mark.skipif(not HAVE_PKG, reason="Debian package dataset-fashion-mnist not installed")
def test_subset_matches_package():
    full_x, full_y = load_fashion_mnist("test")
    sub_x, sub_y = data._read_subset("test")
    # every subset image is an image of the official test split with the same label
    lookup = {full_x[i].tobytes(): full_y[i] for i in range(len(full_x))}
    assert all(lookup[sub_x[i].tobytes()] == sub_y[i] for i in range(0, len(sub_x), 37))


def test_fashion_mnist_dataset(monkeypatch, tmp_path):
    _subset(monkeypatch, tmp_path)
    ds = FashionMNIST("train", limit=50)
    assert len(ds) == 50 and ds.classes == FMNIST_CLASSES and len(FMNIST_CLASSES) == 10
    x, y = ds[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int) and 0 <= y <= 9
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x[:, border] == -1).all()
    raw = torch.from_numpy(ds.images[3].astype(np.float32))
    assert torch.allclose(x[0, 2:30, 2:30], raw / 127.5 - 1)
    assert torch.equal(ds[(3, 7)][0], x)  # (index, epoch) items accepted
    assert len(FashionMNIST("val")) == 1000


def _write_idx(path, magic, dims, payload, truncate_to=None):
    raw = struct.pack(f">{1 + len(dims)}I", magic, *dims) + payload
    blob = gzip.compress(raw)
    path.write_bytes(blob[:truncate_to] if truncate_to else blob)


def test_corrupt_files(tmp_path):
    img, lbl = (tmp_path / f for f in data._FMNIST_FILES["test"])
    _write_idx(lbl, 2049, [10], bytes(10))
    # truncated gzip stream
    _write_idx(img, 2051, [10, 28, 28], bytes(range(256)) * 30, truncate_to=40)
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz") as e:
        load_fashion_mnist("test", root=tmp_path)
    assert "\n" not in str(e.value)
    # valid gzip, but the payload is shorter than the header says
    _write_idx(img, 2051, [10, 28, 28], bytes(28 * 28 * 9))
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz.*truncated"):
        load_fashion_mnist("test", root=tmp_path)
    # wrong magic number
    _write_idx(img, 2049, [10, 28, 28], bytes(28 * 28 * 10))
    with pytest.raises(UserError, match="magic"):
        load_fashion_mnist("test", root=tmp_path)
    # not gzip at all
    img.write_bytes(b"hello")
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz"):
        load_fashion_mnist("test", root=tmp_path)
    # finally a valid pair loads
    _write_idx(img, 2051, [10, 28, 28], bytes(28 * 28 * 10))
    x, y = load_fashion_mnist("test", root=tmp_path)
    assert x.shape == (10, 28, 28) and y.shape == (10,)


# ---------------------------------------------------------------- image folders


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    specs = {"b_cat": [(40, 30, "RGB", "png"), (50, 64, "L", "jpg"), (33, 33, "RGBA", "png")],
             "a_dog": [(64, 48, "RGB", "jpg"), (36, 70, "RGB", "png")]}
    for split in ("train", "val"):
        for cls, items in specs.items():
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i, (w, h, mode, ext) in enumerate(items):
                ch = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
                arr = rng.integers(0, 256, (h, w, ch), dtype=np.uint8).squeeze(-1 if ch == 1 else ())
                Image.fromarray(arr, mode).save(d / f"img{i}.{ext}")
            (d / "notes.txt").write_text("not an image")
    return tmp_path


@pytest.mark.parametrize("train,aug", [(False, None), (True, None), (True, 1.5)])
def test_image_folder(folder, train, aug):
    S = 32
    ds = ImageFolderDataset(folder, "train", S, train=train, aug_scale=aug, seed=3)
    assert ds.classes == ["a_dog", "b_cat"] and len(ds) == 5
    assert ds.targets == [0, 0, 1, 1, 1]
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, S, S) and x.dtype == torch.float32 and y == ds.targets[i]
        assert x.min() >= -1 and x.max() <= 1
    grey = ds.samples.index((str(folder / "train" / "b_cat" / "img1.jpg"), 1))
    x, _ = ds[grey]
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    # reproducible for the same (seed, epoch, index), also from a fresh instance
    ds.set_epoch(4)
    a = ds[2][0]
    ds2 = ImageFolderDataset(folder, "train", S, train=train, aug_scale=aug, seed=3)
    assert torch.equal(ds2[(2, 4)][0], a)
    ds2.set_epoch(4)
    assert torch.equal(ds2[2][0], a)
    if train:
        epochs = [ds[(2, e)][0] for e in range(6)]
        assert any(not torch.equal(epochs[0], t) for t in epochs[1:])  # differs between epochs
    else:
        assert all(torch.equal(ds[(2, e)][0], a) for e in range(3))  # eval is deterministic


def test_image_folder_limit_and_build(folder):
    first = build_dataset({"name": "imagefolder", "root": str(folder), "im_size": 16, "aug_scale": None,
                           "limit": 3, "subset": "first"}, "val", train=False)
    assert len(first) == 3 and first[2][0].shape == (3, 16, 16)
    assert [Path(p).name for p, _ in first.samples] == ["img0.jpg", "img1.png", "img0.png"]
    assert first.targets == [0, 0, 1]
    balanced = build_dataset({"name": "imagefolder", "root": str(folder), "im_size": 16, "limit": 4}, "val",
                             train=False)  # the default subset: two of each class
    assert sorted(balanced.targets) == [0, 0, 1, 1] and balanced.identity["subset"] == "balanced"


def test_image_folder_errors(folder, tmp_path):
    bad = folder / "train" / "b_cat" / "x.png"
    bad.write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(UserError, match="x.png.*dataset.skip_unreadable=true") as e:  # the header check, up front
        ImageFolderDataset(folder, "train", 16, train=True)
    assert "\n" not in str(e.value)
    ds = ImageFolderDataset(folder, "train", 16, train=True, check_files=False)
    idx = [Path(p).name for p, _ in ds.samples].index("x.png")
    with pytest.raises(UserError, match="x.png.*tokenizer.data_check") as e:  # unchecked: found when read
        ds[idx]
    assert "\n" not in str(e.value)
    # truncated PNG
    good = folder / "train" / "a_dog" / "img1.png"
    good.write_bytes(good.read_bytes()[:200])
    with pytest.raises(UserError, match="img1.png"):
        ds[1]
    with pytest.raises(UserError, match="expected an ImageNet-style folder"):
        ImageFolderDataset(tmp_path / "nope", "train", 16, train=False)
    with pytest.raises(UserError, match="expected an ImageNet-style folder"):
        ImageFolderDataset(folder, "test", 16, train=False)
    empty = tmp_path / "empty"
    (empty / "train" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        ImageFolderDataset(empty, "train", 16, train=False)


def test_build_dataset(monkeypatch, tmp_path):
    _subset(monkeypatch, tmp_path)
    ds = build_dataset({"name": "fmnist", "im_size": 32, "aug_scale": None, "limit": 20}, "val", train=False)
    assert isinstance(ds, FashionMNIST) and ds.split == "test" and len(ds) == 20
    with pytest.raises(UserError, match="32 px"):
        build_dataset({"name": "fmnist", "im_size": 64}, "train", train=True)
    with pytest.raises(UserError, match="fmnist, imagefolder"):
        build_dataset({"name": "cifar", "im_size": 32}, "train", train=True)
    from omegaconf import OmegaConf
    cfg = OmegaConf.create({"name": "fmnist", "root": None, "im_size": 32, "aug_scale": None, "limit": None})
    OmegaConf.set_struct(cfg, True)
    assert len(build_dataset(cfg, "train", train=True)) == 3000


# ---------------------------------------------------------------- sampler


def test_epoch_sampler():
    n, R = 103, 4
    samplers = [EpochSampler(n, num_replicas=R, rank=r, seed=5) for r in range(R)]
    for s in samplers:
        s.set_epoch(2)
    shards = [list(s) for s in samplers]
    assert all(len(sh) == n // R == len(s) for sh, s in zip(shards, samplers))
    flat = [i for sh in shards for i in sh]
    assert len(set(flat)) == len(flat) == (n // R) * R and all(0 <= i < n for i in flat)
    # deterministic for the same (seed, epoch); different across epochs
    again = EpochSampler(list(range(n)), num_replicas=R, rank=1, seed=5)
    again.set_epoch(2)
    assert list(again) == shards[1]
    again.set_epoch(3)
    assert list(again) != shards[1]
    # start_index skips exactly, and set_epoch resets it
    again.set_epoch(2, start_index=7)
    assert len(again) == n // R - 7 and list(again) == shards[1][7:]
    again.start_index = 100
    assert len(again) == 0 and list(again) == []
    again.set_epoch(2)
    assert list(again) == shards[1]
    # (index, epoch) pairs
    pairs = EpochSampler(10, seed=1, with_epoch=True)
    pairs.set_epoch(9)
    assert [e for _, e in pairs] == [9] * 10 and sorted(i for i, _ in pairs) == list(range(10))
    assert list(EpochSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_dataloader_workers(folder):
    """Augmentation does not depend on the number of workers."""
    ds = ImageFolderDataset(folder, "train", 16, train=True, aug_scale=2.0)
    s = EpochSampler(ds, seed=0, with_epoch=True)
    s.set_epoch(1)
    b0 = torch.cat([x for x, _ in torch.utils.data.DataLoader(ds, batch_size=4, sampler=s)])
    b2 = torch.cat([x for x, _ in torch.utils.data.DataLoader(ds, batch_size=4, sampler=s, num_workers=2)])
    assert b0.shape == (5, 3, 16, 16)
    assert torch.equal(b0, b2)

"""The latent cache: what it stores equals a fresh encode (and decode), flips are the flipped images' latents,
and training refuses a cache made by another encoder or at another resolution."""

import json
import os

import pytest
import torch
from helpers import ROOT, make_folder, make_tokenizer, tiny_args
from PIL import Image

from dit.cache import LatentCache
from dit.cache import main as cache_main
from dit.pipeline import load_generator
from dit.train import main as train_main
from tokenizer import SSDD
from tokenizer.data import FMNIST_CLASSES, FashionMNIST


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    tok = make_tokenizer(tmp / "tok")
    os.chdir(ROOT)  # config=configs/... is relative to the repository
    assert cache_main(tiny_args(tok, tmp)) == 0
    (directory,) = [p for p in (tmp / "latents").iterdir() if p.is_dir()]
    return tmp, tok, directory


def test_cache_metadata(built):
    tmp, tok, directory = built
    meta = json.load(open(directory / "cache.json"))
    assert meta["encoder_checkpoint"] == tok and len(meta["encoder_sha256"]) == 64
    assert directory.name.endswith(meta["encoder_sha256"][:12]) and directory.name.startswith("fmnist-train-32px")
    data = meta["data"]  # which images made it; the folder name carries the data fingerprint too
    assert data["kind"] == "fmnist" and data["split"] == "train" and data["images"] == 24 and data["limit"] == 24
    assert data["class_names"] == list(FMNIST_CLASSES) and data["subset"] == "balanced"
    assert directory.name == f"fmnist-train-32px-{data['fingerprint'][:8]}-{meta['encoder_sha256'][:12]}"
    assert meta["im_size"] == 32 and meta["latent_shape"] == [4, 4, 4]
    assert meta["image_channels"] == 1  # Fashion-MNIST is grey: every image R = G = B
    assert meta["z_mean"] == 0.1 and meta["z_std"] == 0.5 and meta["flip"] is True
    assert meta["class_names"] == list(FMNIST_CLASSES) and meta["num_classes"] == 10
    assert meta["images"] == 24 and meta["entries"] == 48
    labels = FashionMNIST("train", limit=24).targets  # the balanced subset dataset.limit=24 takes
    assert meta["per_class"] == {str(c): labels.count(c) for c in sorted(set(labels))}
    assert [s["count"] for s in meta["shards"]] == [16, 8]  # shard_size=16 (two batches of 8), then the rest


def test_cached_latents_equal_fresh_encodes_and_decodes(built):
    tmp, tok, directory = built
    cache = LatentCache(str(directory))
    model = SSDD.from_checkpoint(tok).eval()
    data = FashionMNIST("train", limit=24)
    idx = [0, 5, 17, 23]  # both shards
    x = torch.stack([data[i][0] for i in idx])
    with torch.no_grad():
        z = model.encode(x).mode()
        z_flip = model.encode(x.flip(-1)).mode()
    cached = torch.stack([cache[2 * i][0] for i in idx]) * 0.5 + 0.1  # de-normalised
    cached_flip = torch.stack([cache[2 * i + 1][0] for i in idx]) * 0.5 + 0.1
    assert torch.allclose(cached, z, atol=1e-5)
    assert torch.allclose(cached_flip, z_flip, atol=1e-5)
    assert not torch.allclose(z, z_flip, atol=1e-2)  # the flip copy is a different latent
    assert [cache[2 * i][1] for i in idx] == [data[i][1] for i in idx] == [cache[2 * i + 1][1] for i in idx]
    noise = torch.randn(len(idx), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model.decode(cached, steps=2, noise=noise), model.decode(z, steps=2, noise=noise),
                              atol=1e-4)
    assert len(cache) == 48


def test_training_refuses_cache_of_another_encoder(built, capsys):
    tmp, tok, directory = built
    other = make_tokenizer(tmp / "other", seed=1)
    rc = train_main([*tiny_args(other, tmp), f"cache.dir={directory}", "run_name=x", "training.max_steps=1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "\n" not in err, err
    assert "another encoder" in err and str(directory) in err
    # the default cache location of an encoder without a cache: told to build it
    assert train_main([*tiny_args(other, tmp), "run_name=y", "training.max_steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no latent cache" in err and "python -m dit.cache" in err and "\n" not in err


def test_training_refuses_cache_of_another_resolution(built, capsys):
    tmp, tok, _ = built
    for split in ("train",):
        for cls, colour in (("apple", (200, 0, 0)), ("sky", (0, 0, 200))):
            d = tmp / "folder" / split / cls
            d.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (48, 40), tuple(min(255, c + 10 * i) for c in colour)).save(d / f"{i}.png")
    folder = [*tiny_args(tok, tmp), "dataset.name=imagefolder", f"dataset.root={tmp / 'folder'}",
              f"cache.dir={tmp / 'folder_cache'}", "training.batch_size=4", "sample.grid_classes=null"]
    assert cache_main([*folder, "dataset.im_size=32"]) == 0
    capsys.readouterr()
    meta = json.load(open(tmp / "folder_cache" / "cache.json"))
    assert meta["class_names"] == ["apple", "sky"] and meta["entries"] == 16 and meta["im_size"] == 32
    assert meta["image_channels"] == 3  # colour images
    rc = train_main([*folder, "dataset.im_size=64", "run_name=r", "training.max_steps=1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "32-px" in err and "dataset.im_size=64" in err, err
    # the same cache at its own resolution trains
    assert train_main([*folder, "dataset.im_size=32", "run_name=r32", "training.max_steps=2"]) == 0


def test_a_dit_of_grey_data_makes_grey_images(built, tmp_path):
    """The cache records that an image folder is grey; the DiT run trained on it finds that through its data.json,
    and its samples are grey (R = G = B) whatever the decoder's three channels do."""
    _, tok, _ = built
    root = make_folder(tmp_path / "grey", classes=("dark", "light"), train=4, val=0)
    common = [*tiny_args(tok, tmp_path), "dataset.name=imagefolder", f"dataset.root={root}", "training.batch_size=4",
              "sample.grid_classes=null"]
    assert cache_main(common) == 0
    (directory,) = [p for p in (tmp_path / "latents").iterdir() if p.is_dir()]
    assert json.load(open(directory / "cache.json"))["image_channels"] == 1
    assert train_main([*common, "run_name=grey", "training.max_steps=1"]) == 0
    gen = load_generator(str(tmp_path / "jobs" / "grey" / "checkpoints" / "last"), device="cpu")
    assert gen.image_channels == 1
    images, _ = gen.generate(["light"], num=2, seed=0, steps=1, decoder_steps=1)
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])

"""dit.cache with SD-VAE as the tokenizer (a DiT / fast-DiT user's first step): an SD-VAE file in the diffusers or the
original LDM layout, or a known name, caches the latents of any image folder with SD-VAE's fixed scaling (z_mean 0,
z_std 1 / 0.18215); a DiT trains on them and its samples decode with SD-VAE. Random full-size SD-VAE weights
(conftest.sdvae_files), 32-px images, nothing downloads (HF_HUB_OFFLINE=1)."""

import json
import os

import numpy as np
import pytest
import torch
from helpers import ROOT
from PIL import Image

from dit.cache import LatentCache
from dit.cache import main as cache_main
from dit.pipeline import load_generator
from dit.train import main as train_main
from tokenizer.common.config import load_config
from tokenizer.data import build_dataset
from tokenizer.latent_stats import FIXED_Z_STATS

SCALE = 0.18215


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """<root>/train/{red,blue}/*.png: 3 colourful images per class of a few sizes (resized to 32 px)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("blue", "red")):
        (root / "train" / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (36 + 4 * i, 40, 3), dtype=np.uint8)
            pixels[..., 2 - 2 * c] = 255  # blue or red: not grey
            Image.fromarray(pixels).save(root / "train" / name / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def in_repository(monkeypatch):
    monkeypatch.chdir(ROOT)  # config=configs/... is relative to the repository


def args(ckpt_dir, folder, checkpoint, *extra) -> list:
    return ["config=configs/dit.yaml", f"tokenizer.checkpoint={checkpoint}", f"ckpt_dir={ckpt_dir}",
            f"dataset.root={folder}", "dataset.im_size=32", "dataset.num_workers=0", "cache.batch_size=4",
            "cache.shard_size=4", "cache.flip=false", "model.name=DiT-Ti/1", "model.learn_sigma=false",
            "training.batch_size=3", "training.log_freq=1", "training.ckpt_every=1000", "training.sample_every=1000",
            "sample.steps=2", "sample.per_class=1", *extra]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert err.startswith("error:") and "\r" not in err, err
    return err


def the_cache(ckpt_dir):
    (directory,) = [p for p in (ckpt_dir / "latents").iterdir() if p.is_dir()]
    return directory


@pytest.fixture(scope="module")
def diffusers_cache(tmp_path_factory, folder, sdvae_files):
    ckpt_dir = tmp_path_factory.mktemp("sdvae_runs")
    os.chdir(ROOT)
    assert cache_main(args(ckpt_dir, folder, sdvae_files["diffusers"])) == 0
    return ckpt_dir, the_cache(ckpt_dir)


def test_an_sdvae_file_caches_latents_with_the_fixed_scaling(diffusers_cache, folder, sdvae_files):
    ckpt_dir, directory = diffusers_cache
    meta = json.load(open(directory / "cache.json"))
    assert meta["encoder_checkpoint"] == f"sdvae:{sdvae_files['diffusers']}"
    assert meta["encoder"]["encoder"] == "sdvae" and meta["encoder"]["decoder"] == "kl"
    assert meta["z_mean"] == 0.0 and meta["z_std"] == pytest.approx(1 / SCALE) == FIXED_Z_STATS["sdvae"]["z_std"]
    assert meta["z_stats_file"] == FIXED_Z_STATS["sdvae"]["source"]  # no z_stats.json: SD-VAE's published scale
    assert meta["latent_shape"] == [4, 4, 4] and meta["images"] == 6 and meta["class_names"] == ["blue", "red"]
    assert meta["image_channels"] == 3 and meta["data"]["kind"] == "imagefolder"
    # what is stored is 0.18215 * E(x).mode(), as DiT and fast-DiT feed SD-VAE latents to the DiT
    cfg = load_config("dit.yaml", args(ckpt_dir, folder, "x"))
    data = build_dataset(cfg.dataset, "train", train=False)
    x = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        z = sdvae_files["model"].encode(x).mode()
    cache = LatentCache(str(directory))
    cached = torch.stack([cache[i][0] for i in range(len(cache))])
    assert torch.allclose(cached, SCALE * z, atol=1e-5, rtol=1e-4)
    assert [cache[i][1] for i in range(len(cache))] == [data[i][1] for i in range(len(data))]


def test_the_ldm_layout_gives_the_same_latents(diffusers_cache, folder, sdvae_files, tmp_path):
    _, directory = diffusers_cache
    assert cache_main(args(tmp_path, folder, sdvae_files["ldm"])) == 0  # the original single file, a torch pickle
    ldm = the_cache(tmp_path)
    assert ldm.name == directory.name  # same data, same encoder hash: the same cache name
    a, b = LatentCache(str(directory)), LatentCache(str(ldm))
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))
    assert json.load(open(ldm / "cache.json"))["encoder_checkpoint"] == f"sdvae:{sdvae_files['ldm']}"


def test_a_known_name_offline_says_where_to_place_the_file(folder, sdvae_files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    target = tmp_path / "torch" / "hub" / "checkpoints" / "sd-vae-ft-mse.safetensors"
    assert cache_main(args(tmp_path / "runs", folder, "sd-vae-ft-mse")) == 2
    err = one_line_error(capsys)
    assert f"place https://huggingface.co/stabilityai/sd-vae-ft-mse/blob/main/diffusion_pytorch_model.safetensors " \
           f"at {target}" in err, err
    assert not (tmp_path / "runs" / "latents").exists()  # nothing written
    # the file placed there by hand: the name works offline, and the cache names it
    target.parent.mkdir(parents=True)
    os.symlink(sdvae_files["diffusers"], target)
    for name, expected in (("sd-vae-ft-mse", "sdvae:sd-vae-ft-mse"), ("sdvae", "sdvae:sd-vae-ft-mse")):
        assert cache_main(args(tmp_path / name, folder, name)) == 0
        assert json.load(open(the_cache(tmp_path / name) / "cache.json"))["encoder_checkpoint"] == expected


def test_unknown_tokenizers_are_one_line_naming_sdvae(folder, tmp_path, capsys):
    assert cache_main(args(tmp_path, folder, "sd-vae-nothing")) == 2
    err = one_line_error(capsys)
    assert "tokenizer.checkpoint=sd-vae-nothing" in err and "sd-vae-ft-mse" in err and "sdvae:<file>" in err
    assert cache_main(args(tmp_path, folder, f"sdvae:{tmp_path / 'missing.safetensors'}")) == 2
    assert "not found" in one_line_error(capsys)


def test_a_dit_trains_on_sdvae_latents_and_decodes_with_sdvae(diffusers_cache, folder, sdvae_files):
    ckpt_dir, _ = diffusers_cache
    assert train_main([*args(ckpt_dir, folder, sdvae_files["diffusers"]), "run_name=on_sdvae",
                       "training.max_steps=2"]) == 0
    run = ckpt_dir / "jobs" / "on_sdvae" / "checkpoints" / "last"
    gen = load_generator(str(run), device="cpu")
    assert gen.decoder_names == ["SD-VAE (diffusion_pytorch_model.safetensors)"]
    assert gen.z_mean == 0.0 and gen.z_std == pytest.approx(1 / SCALE) and gen.image_channels == 3
    images, t = gen.generate(["red"], num=1, seed=0, steps=2)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all() and t["decoder_steps"] == 1
    # the very SD-VAE decoder of those latents: the DiT's latents de-normalised by 1 / 0.18215
    y, noise = torch.tensor([1]), gen.draw_noise(1, 0)[0]
    z, _ = gen.sample_latents(y, noise, gen.sampler_settings(steps=2), seed=0)
    with torch.no_grad():
        assert torch.allclose(images, sdvae_files["model"].decode(z).clamp(-1, 1), atol=1e-5)

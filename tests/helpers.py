"""Helpers shared by the test files (no test file imports another): the repository root, the tiny tokenizer-training
overrides, and stand-ins for the DiT tests (a tiny randomly initialised tokenizer with its z_stats.json, a random DiT,
a KL-VAE decoder, a generator bundle, and the config overrides that make dit.cache / dit.train run in seconds on a
CPU). Pytest fixtures live in conftest.py."""

import json
import os

import numpy as np
import torch
from PIL import Image

from tokenizer import SSDD
from tokenizer.common.checkpoint import save_weights
from tokenizer.common.runs import read_loss_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny model so CPU runs take seconds: 32-wide encoder, XS decoder, 32-px Fashion-MNIST.
TINY = ["config=configs/fmnist.yaml", "ssdd.encoder_base_channels=32", "dataset.batch_size=16",
        "training.eval_images=32", "training.sample_every=1000", "training.log_freq=5", "eval.batch_size=32"]


def losses(run_dir):
    """Last logged loss per step of a tokenizer run."""
    return {step: r["loss"] for step, r in read_loss_log(str(run_dir)).items()}


def make_tokenizer(directory, seed=0, z_mean=0.1, z_std=0.5) -> str:
    """A 32-wide f8c4 encoder + XS decoder saved as a whole-model file, z_stats.json beside it; returns the path."""
    os.makedirs(directory, exist_ok=True)
    torch.manual_seed(seed)
    model = SSDD(encoder="f8c4", decoder="XS", encoder_base_channels=32)
    path = os.path.join(str(directory), "tok.safetensors")
    save_weights(model, path, model.architecture())
    with open(os.path.join(str(directory), "z_stats.json"), "w") as f:
        json.dump({"z_mean": z_mean, "z_std": z_std}, f)
    return path


def make_kl_decoder(directory, seed=1, encoder_from: str | None = None) -> str:
    """A KL-VAE baseline (same 32-wide f8c4 encoder layout) behind the SSDD API: a second decoder of the same latents.

    encoder_from: a tokenizer file whose encoder weights it takes (so its encoder hash matches that tokenizer's)."""
    os.makedirs(directory, exist_ok=True)
    torch.manual_seed(seed)
    model = SSDD(encoder="f8c4", decoder="kl", encoder_base_channels=32, kl_base_channels=32)
    if encoder_from is not None:
        model.encoder.load_state_dict(SSDD.from_checkpoint(encoder_from).encoder.state_dict())
    path = os.path.join(str(directory), "kl.safetensors")
    save_weights(model, path, model.architecture())
    return path


def tiny_args(tokenizer: str, ckpt_dir, images: int = 24) -> list:
    """dit_fmnist overlay on a few dozen images, small batches, 2-step sampling and a 1-step decoder."""
    return ["config=configs/dit_fmnist.yaml", f"tokenizer.checkpoint={tokenizer}", f"ckpt_dir={ckpt_dir}",
            f"dataset.limit={images}", "cache.batch_size=8", "cache.shard_size=16", "training.batch_size=8",
            "training.log_freq=2", "training.sample_every=1000", "training.ckpt_every=1000", "sample.steps=2",
            "sample.per_class=1", "sample.grid_classes=[0,7]", "sample.decoder_steps=1"]


def make_dit(path, tokenizer: str, num_classes: int = 10, class_names=None, seed: int = 0) -> str:
    """A randomly initialised DiT-Ti/1 on 4x4x4 latents, saved with the metadata dit.train writes."""
    from dit.models import build_dit
    from tokenizer.data import FMNIST_CLASSES

    torch.manual_seed(seed)
    model = build_dit("DiT-Ti/1", input_size=4, in_channels=4, num_classes=num_classes, learn_sigma=False)
    for p in model.parameters():  # leave the zero init, so outputs depend on the input and the class
        if p.requires_grad:
            p.data.add_(torch.randn_like(p) * 0.02)
    names = list(FMNIST_CLASSES) if class_names is None else class_names
    meta = {"kind": "dit", "model": "DiT-Ti/1", "input_size": 4, "in_channels": 4, "latent_shape": "[4, 4, 4]",
            "num_classes": num_classes, "learn_sigma": 0, "class_dropout_prob": 0.1, "qk_norm": 0,
            "class_names": json.dumps(names), "z_mean": 0.1, "z_std": 0.5, "im_size": 32,
            "tokenizer_checkpoint": tokenizer, "encoder_sha256": "0" * 64, "dataset": "fmnist", "step": 0,
            "sample": json.dumps({"method": "euler", "steps": 3, "cfg_scale": 2.0, "guidance_interval": [0.0, 1.0],
                                  "time_shift": 1.0, "decoder_steps": None})}
    save_weights(model, str(path), meta)
    return str(path)


def make_bundle(directory, steps: int = 2) -> str:
    """A generator bundle of random weights with the three decoders of the paper's comparison, as dit.export writes
    it: a "distilled" XS decoder (the tokenizer's, marked single-step) as the default, the same tokenizer as a 2-step
    "teacher", and a KL-VAE decoder on the same encoder. Returns the bundle directory."""
    from dit.export import main as export_main
    from tokenizer.common.checkpoint import read_weights

    directory = str(directory)
    tok = make_tokenizer(os.path.join(directory, "tok"))
    teacher = SSDD.from_checkpoint(tok)
    dit = make_dit(os.path.join(directory, "dit.safetensors"), tok)
    state, meta = read_weights(dit)
    meta["encoder_sha256"] = teacher.encoder_sha256()
    save_weights(state, dit, meta)
    distilled = os.path.join(directory, "distilled.safetensors")
    save_weights(teacher, distilled, {**teacher.architecture(), "single_step": 1})
    torch.manual_seed(1)
    kl = SSDD(encoder="f8c4", decoder="kl", encoder_base_channels=32, kl_base_channels=32)
    kl.encoder.load_state_dict(teacher.encoder.state_dict())
    kl_path = os.path.join(directory, "kl.safetensors")
    save_weights(kl, kl_path, kl.architecture())
    out = os.path.join(directory, "bundle")
    assert export_main(["--dit", dit, "--decoder", distilled, "--out", out, "--steps", str(steps),
                        "--extra-decoder", f"SSDD-XS 2-step (teacher)={tok}:2", "--extra-decoder",
                        f"KL-VAE={kl_path}"]) == 0
    return out


CLASSES = ["cat", "dog", "fox", "owl"]


def make_folder(root, classes=CLASSES, train=8, val=16, empty=None, corrupt=None, truncated=None):
    """root/{train,val}/<class>/NNN.{png,JPEG}: class c is filled with grey level 40 + 50 c (so an image tells its
    class), alternate files PNG and JPEG of a few sizes; optionally an empty class folder, a file of random bytes
    named `corrupt` and a JPEG `truncated` to half its bytes (both relative to train/)."""
    for split, n in (("train", train), ("val", val)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                size = (40 + 4 * (i % 3), 36 + 2 * (i % 2))
                ext = "png" if i % 2 else "JPEG"
                Image.new("RGB", size, (40 + 50 * c,) * 3).save(folder / f"{i:03d}.{ext}")
        if empty:
            (root / split / empty).mkdir(parents=True, exist_ok=True)
    if corrupt:
        (root / "train" / corrupt).write_bytes(np.random.default_rng(1).integers(0, 256, 600, np.uint8).tobytes())
    if truncated:
        path = root / "train" / truncated
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return root


def snapshot(*roots) -> dict:
    """{path: (size, mtime, inode)} of every file and folder under the roots: any write changes it."""
    seen = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                st = os.stat(os.path.join(folder, name))
                seen[os.path.join(folder, name)] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return seen

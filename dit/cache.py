"""Latent cache: encode a dataset once with an SSDD encoder, so DiT training never runs the encoder.

    python -m dit.cache config=configs/dit_fmnist.yaml [key=value ...]

For every image x of `dataset.split` it stores z = (E(x).mode() - z_mean) / z_std and, with cache.flip, the same for
the horizontally flipped image (a second entry; DiT trains with flips). z_mean / z_std are the encoder's scalar
statistics from the z_stats.json that `python -m tokenizer.train task=z_stats` writes for the checkpoint.

A cache is a directory:
    shard_00000.safetensors ...   latents (n, C, h, w), latents_flip (n, C, h, w) when flipped, labels (n,) int64
    cache.json                    what made it: encoder checkpoint + sha256 of its encoder weights, resolution,
                                  z_stats, latent shape, class names, counts, shard list
It is written into a temporary sibling and renamed into place, so a killed run leaves no half cache.
Training (`LatentCache.open(cfg, ...)`) refuses a cache whose encoder or resolution is not the config's.
"""

import json
import os
import sys
import time

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dit.config_checks import CACHE_DTYPES, DIT_CHECKS
from tokenizer.atomic import atomic_directory, remove_stale_temporaries
from tokenizer.config import load_config
from tokenizer.data import build_dataset
from tokenizer.errors import UserError, one_line, run_cli
from tokenizer.latent_stats import FILE_NAME as Z_STATS_FILE
from tokenizer.latent_stats import read_z_stats as read_z_stats_file
from tokenizer.runs import find_result, resolve_checkpoint
from tokenizer.ssdd import SSDD
from tokenizer.validation import check_config

FORMAT = 1
DTYPES = {name: getattr(torch, name) for name in CACHE_DTYPES}


# ----------------------------------------------------------------------------- the tokenizer a config names


def read_z_stats(cfg, checkpoint: str) -> dict:
    """The z_stats.json named by tokenizer.z_stats, or the checkpoint's (tokenizer.runs.find_result: in its run's
    results/step<N>/, or beside it)."""
    path = cfg.tokenizer.z_stats or find_result(checkpoint, Z_STATS_FILE)
    return read_z_stats_file(path, f"write them with: python -m tokenizer.train task=z_stats config=<the tokenizer's "
                                   f"config> ssdd.checkpoint={checkpoint} (or set tokenizer.z_stats=)")


def load_tokenizer(cfg) -> tuple[SSDD, str]:
    """(eval-mode SSDD, resolved checkpoint path) for tokenizer.checkpoint."""
    if not cfg.tokenizer.checkpoint:
        raise UserError("set tokenizer.checkpoint=<SSDD file or tokenizer run_name>: its encoder makes the latents")
    path = resolve_checkpoint(cfg.ckpt_dir, cfg.tokenizer.checkpoint)
    model = SSDD.from_checkpoint(path).eval().requires_grad_(False)
    if not model.has_encoder:
        raise UserError(f"{path} is a decoder-only file; the latent cache needs the whole tokenizer (encoder too)")
    return model, path


def default_dir(cfg, enc_hash: str) -> str:
    d = cfg.dataset
    return os.path.join(cfg.ckpt_dir, "latents", f"{d.name}-{d.split}-{d.im_size}px-{enc_hash[:12]}")


def cache_dir(cfg, enc_hash: str) -> str:
    return cfg.cache.dir or default_dir(cfg, enc_hash)


# ----------------------------------------------------------------------------- building


def encode_normalised(model: SSDD, x: torch.Tensor, stats: dict, dtype: torch.dtype) -> torch.Tensor:
    """(z - z_mean) / z_std of the `.mode()` latents, computed in float64, stored as `dtype` on the CPU."""
    return ((model.encode(x).mode().double() - stats["z_mean"]) / stats["z_std"]).to(dtype).cpu()


def write_shard(directory: str, index: int, buf: dict) -> dict:
    """Write the buffered tensors as shard `index`, empty the buffer, and return the shard's cache.json entry."""
    name = f"shard_{index:05d}.safetensors"
    count = sum(len(t) for t in buf["labels"])
    save_file({k: torch.cat(v).contiguous() for k, v in buf.items() if v}, os.path.join(directory, name))
    for v in buf.values():
        v.clear()
    return {"file": name, "count": count}


@torch.no_grad()
def build_cache(cfg) -> str:
    """Encode dataset.split (plus flips) and write the cache; returns its directory."""
    model, ckpt = load_tokenizer(cfg)
    stats = read_z_stats(cfg, ckpt)
    enc_hash = model.encoder_sha256()
    out = cache_dir(cfg, enc_hash)
    for name in remove_stale_temporaries(os.path.dirname(os.path.abspath(out))):
        print(f"removed {name} (a cache a killed process left half-written)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    dataset = build_dataset(cfg.dataset, cfg.dataset.split, train=False)
    class_names = [str(c) for c in getattr(dataset, "classes", [])]
    loader = DataLoader(dataset, batch_size=cfg.cache.batch_size, num_workers=cfg.dataset.num_workers,
                        pin_memory=torch.cuda.is_available())
    dtype = DTYPES[cfg.cache.dtype]

    print(f"encoding {len(dataset)} images of {cfg.dataset.name}/{cfg.dataset.split} at {cfg.dataset.im_size} px"
          f"{' (+ flips)' if cfg.cache.flip else ''} with {ckpt} on {device} -> {out}")
    t0 = time.time()
    with atomic_directory(out) as tmp:  # a killed run leaves no half cache, and an older cache stays until done
        shards, buf, counts, latent_shape = [], {"latents": [], "latents_flip": [], "labels": []}, {}, None
        for x, y in tqdm(loader, desc="cache", dynamic_ncols=True):
            x = x.to(device, non_blocking=True)
            z = encode_normalised(model, x, stats, dtype)
            latent_shape = list(z.shape[1:])
            buf["latents"].append(z)
            if cfg.cache.flip:
                buf["latents_flip"].append(encode_normalised(model, x.flip(-1), stats, dtype))
            buf["labels"].append(torch.as_tensor(y, dtype=torch.int64))
            for label in buf["labels"][-1].tolist():
                counts[label] = counts.get(label, 0) + 1
            if sum(len(t) for t in buf["labels"]) >= cfg.cache.shard_size:
                shards.append(write_shard(tmp, len(shards), buf))
        if buf["labels"]:
            shards.append(write_shard(tmp, len(shards), buf))
        if not shards:
            raise UserError(f"dataset {cfg.dataset.name}/{cfg.dataset.split} is empty: nothing to cache")
        num_classes = len(class_names) or (max(counts) + 1)
        images = sum(s["count"] for s in shards)
        meta = {
            "format": FORMAT,
            "encoder_checkpoint": ckpt,
            "encoder_sha256": enc_hash,
            "encoder": model.architecture(),
            "im_size": int(cfg.dataset.im_size),
            "dataset": {"name": cfg.dataset.name, "root": cfg.dataset.root, "split": cfg.dataset.split,
                        "limit": cfg.dataset.limit},
            "z_mean": stats["z_mean"],
            "z_std": stats["z_std"],
            "z_stats_file": stats["path"],
            "normalisation": "z_cached = (encode(x).mode() - z_mean) / z_std",
            "latent_shape": latent_shape,
            "dtype": cfg.cache.dtype,
            "flip": bool(cfg.cache.flip),
            "class_names": class_names,
            "num_classes": num_classes,
            "images": images,
            "entries": images * (2 if cfg.cache.flip else 1),
            "per_class": {str(k): counts[k] for k in sorted(counts)},
            "shards": shards,
            "seconds": round(time.time() - t0, 1),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        with open(os.path.join(tmp, "cache.json"), "w") as f:
            json.dump(meta, f, indent=2)
    print(f"cached {meta['entries']} latents {tuple(latent_shape)} of {images} images in {meta['seconds']} s: {out}")
    return out


# ----------------------------------------------------------------------------- reading


class LatentCache(Dataset):
    """The cached latents as a dataset of (z (C, h, w) float32, normalised, label int).

    Entry j is image j // 2, flipped when j is odd (with flips); otherwise entry j is image j.
    """

    def __init__(self, directory: str):
        self.dir = directory
        meta_path = os.path.join(directory, "cache.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"no latent cache in {directory} (no cache.json); build it with python -m dit.cache "
                            f"with the same config")
        with open(meta_path) as f:
            self.meta = json.load(f)
        parts = {"latents": [], "latents_flip": [], "labels": []}
        for shard in self.meta["shards"]:
            path = os.path.join(directory, shard["file"])
            try:
                tensors = load_file(path)
            except Exception as e:  # missing file, truncated file, bad header
                raise UserError(f"cannot read latent shard {path}: {one_line(e)}") from None
            for k, v in tensors.items():
                parts[k].append(v)
        self.latents = torch.cat(parts["latents"]).float()
        self.latents_flip = torch.cat(parts["latents_flip"]).float() if self.meta["flip"] else None
        self.labels = torch.cat(parts["labels"])
        if len(self.latents) != self.meta["images"] or len(self.labels) != self.meta["images"]:
            raise UserError(f"latent cache {directory} is inconsistent: {len(self.latents)} latents, "
                            f"{len(self.labels)} labels, cache.json says {self.meta['images']}")
        self.epoch = 0

    @classmethod
    def open(cls, cfg, enc_hash: str, ckpt: str) -> "LatentCache":
        """The cache for this config, refused (one line) if another encoder or resolution made it."""
        directory = cache_dir(cfg, enc_hash)
        if not os.path.isfile(os.path.join(directory, "cache.json")):
            raise UserError(f"no latent cache in {directory}; build it first: python -m dit.cache "
                            f"{' '.join(a for a in sys.argv[1:] if '=' in a) or '<same config>'}")
        cache = cls(directory)
        m = cache.meta
        if m["encoder_sha256"] != enc_hash:
            raise UserError(f"latent cache {directory} was made by another encoder ({m['encoder_checkpoint']}, "
                            f"sha256 {m['encoder_sha256'][:12]}) than tokenizer.checkpoint={ckpt} (sha256 "
                            f"{enc_hash[:12]}); rebuild it with python -m dit.cache or point cache.dir elsewhere")
        if m["im_size"] != cfg.dataset.im_size:
            raise UserError(f"latent cache {directory} holds {m['im_size']}-px images but dataset.im_size="
                            f"{cfg.dataset.im_size}; rebuild it with python -m dit.cache or set dataset.im_size="
                            f"{m['im_size']}")
        return cache

    @property
    def class_names(self) -> list:
        return self.meta["class_names"] or [str(i) for i in range(self.meta["num_classes"])]

    def set_epoch(self, epoch: int) -> None:  # the DataLoader helpers call it; latents carry no randomness
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.latents) * (2 if self.latents_flip is not None else 1)

    def __getitem__(self, item):
        j = int(item[0] if isinstance(item, (tuple, list)) else item)
        if self.latents_flip is None:
            return self.latents[j], int(self.labels[j])
        i, flipped = divmod(j, 2)
        return (self.latents_flip if flipped else self.latents)[i], int(self.labels[i])


def run(argv: list[str]) -> str:
    cfg = check_config(load_config("dit.yaml", argv), DIT_CHECKS)
    return build_cache(cfg)


def main(argv=None) -> int:
    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())

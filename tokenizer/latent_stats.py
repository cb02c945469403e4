"""Latent statistics for latent diffusion ("z_stats", docs/ARCHITECTURE.md §8).

One scalar mean and one scalar (unbiased) standard deviation over every element of the `.mode()` latents of
the evaluation split, accumulated in float64; a generator trains on z_norm = (z - z_mean) / z_std and its
samples are mapped back with z = z_norm * z_std + z_mean before decoding.
"""

import json
import os

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from tokenizer.common.errors import UserError, one_line
from tokenizer.sdvae import SDVAE_SCALE

FILE_NAME = "z_stats.json"


@torch.no_grad()
def compute_z_stats(model, dataset, batch_size: int, num_workers: int = 0, device="cpu") -> dict:
    """{"z_mean", "z_std", "n_values", "n_images"} of `model.encode(x).mode()` over `dataset`."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    n, s, s2 = 0, torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for x, _ in tqdm(loader, desc="z_stats"):
        z = model.encode(x.to(device)).mode().double().cpu()
        n, s, s2 = n + z.numel(), s + z.sum(), s2 + z.pow(2).sum()
    mean = s / n
    std = torch.sqrt((s2 - n * mean**2) / (n - 1))
    return {"z_mean": float(mean), "z_std": float(std), "n_values": n, "n_images": len(dataset)}


def read_z_stats(path: str, how_to_make: str = "") -> dict:
    """{"z_mean", "z_std", "path"} from a z_stats.json; a one-line error says how to write a missing one."""
    if not os.path.isfile(path):
        raise UserError(f"no latent statistics {path}" + (f"; {how_to_make}" if how_to_make else ""))
    try:
        with open(path) as f:
            stats = json.load(f)
        mean, std = float(stats["z_mean"]), float(stats["z_std"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read z_mean / z_std from {path}: {one_line(e)}") from None
    if not std > 0:
        raise UserError(f"{path} has z_std={std}; it must be positive")
    return {"z_mean": mean, "z_std": std, "path": path}


# Latent spaces with a published fixed normalisation instead of measured statistics: generators trained on SD-VAE
# latents (DiT, SiT) see z_norm = 0.18215 * z (LDM's scale factor), i.e. z_mean 0 and z_std 1 / 0.18215.
FIXED_Z_STATS = {"sdvae": {"z_mean": 0.0, "z_std": 1 / SDVAE_SCALE,
                           "source": f"SD-VAE scale factor {SDVAE_SCALE} (LDM)"}}


def fixed_z_stats(encoder_name: str) -> dict | None:
    """{"z_mean", "z_std", "source"} of a latent space with a published scale (e.g. 'sdvae'), else None."""
    stats = FIXED_Z_STATS.get(str(encoder_name).strip().lower())
    return dict(stats) if stats else None

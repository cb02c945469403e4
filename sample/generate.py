"""Generate class-conditional images with a DiT on SSDD latents (default: the embedded Fashion-MNIST bundle).

    python sample/generate.py --class sneaker
    python sample/generate.py --class 7 9 "ankle boot" --num 8 --seed 1 --cfg 2 --steps 50 --sampler euler
    python sample/generate.py --ckpt runs/jobs/dit_fmnist/checkpoints/last --class bag --decoder-steps 1

--class takes ids or names (case-insensitive; the dataset's names stored with the model, and for 1000-class models
the ImageNet names). Writes <out>/grid.png (one row per class) and one PNG per image; prints the DiT time and the
decoder time separately. Noise is drawn on the CPU from --seed, so results repeat across devices. Every argument is
checked before any work (a request that needs more memory than the machine has is refused with the numbers), long
runs show progress, and images with non-finite values (damaged weights) are refused, not written.
"""

import argparse
import os
import re
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dit.flow import METHODS
from dit.pipeline import BUNDLE_DIR, load_generator
from tokenizer.errors import UserError, run_cli
from tokenizer.validation import MAX_STEPS, check_device, check_memory, check_output_dir, in_range


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((x.clamp(-1, 1).permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "class"


def save_outputs(images: torch.Tensor, ids: list, names: list, num: int, out: str, scale: int = 1) -> str:
    """grid.png (row per class, `num` columns, 2-px white gaps) and <id>_<name>_<k>.png; returns the grid path."""
    os.makedirs(out, exist_ok=True)
    h, w = images.shape[-2:]
    pad = 2
    grid = np.full((len(ids) * (h + pad) + pad, num * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r, cid in enumerate(ids):
        for k in range(num):
            img = to_uint8(images[r * num + k])
            grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = img
            Image.fromarray(img).save(os.path.join(out, f"{cid:04d}_{slug(names[r])}_{k}.png"))
    path = os.path.join(out, "grid.png")
    im = Image.fromarray(grid)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    im.save(path)
    return path


# ----------------------------------------------------------------------------- argument checks


def check_args(args) -> None:
    """Types and ranges of every argument, before anything is loaded."""
    in_range("--num", args.num, 1, why="images per class")
    in_range("--seed", args.seed, 0, 2**63 - 1)
    if args.cfg_scale is not None:
        in_range("--cfg", args.cfg_scale, 0, 100, why="the guidance scale; DiT uses 1.5 for FID and 4 for pictures")
    for name, value in (("--steps", args.steps), ("--decoder-steps", args.decoder_steps)):
        if value is not None:
            in_range(name, value, 1, MAX_STEPS, why=f"more than {MAX_STEPS} sampler steps only costs time")
    in_range("--scale", args.scale, 1)
    args.device = check_device(args.device)
    check_output_dir(args.out, "--out")


def check_output_memory(args, n_classes: int, image_shape: tuple) -> None:
    """Refuse up front what would not fit in memory: the images and their decoder noise in float32, and grid.png
    (uint8) before and after its --scale upscaling, which PIL holds at once while resizing."""
    c, h, w = image_shape
    images = 2 * n_classes * args.num * c * h * w * 4
    grid = (n_classes * (h + 2) + 2) * (args.num * (w + 2) + 2) * 3
    check_memory(images + grid * (1 + 2 * args.scale**2), f"{n_classes * args.num} images of {h}x{w} px with a "
                 f"grid.png upscaled {args.scale}x", advice="ask for fewer images (--num, --class) or a smaller --scale")


class Progress:
    """tqdm bars for Generator's `progress(phase, done, total)` callback: one bar per phase (DiT, then decoder)."""

    def __init__(self):
        self.bars = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        bar = self.bars.get(phase)
        if bar is None:
            bar = self.bars[phase] = tqdm(total=total, desc=phase, unit="img", dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()


def refuse_non_finite(images: torch.Tensor) -> None:
    """Non-finite values would be written as black images: refuse them (nothing is written)."""
    bad = int((~torch.isfinite(images.flatten(1))).any(1).sum())
    if bad:
        raise UserError(f"{bad} of {len(images)} generated images hold non-finite values (NaN or inf), so nothing was "
                        f"written: the weights may be damaged (a bundle checked against bundle.json is not), or the "
                        f"guidance scale too large")


def generate(args) -> None:
    check_args(args)
    gen = load_generator(args.ckpt, device=args.device, decoder=args.decoder)
    if args.classes is None:
        if gen.num_classes > 16:
            raise UserError(f"give --class (ids or names); {gen._choices()}")
        ids = list(range(gen.num_classes))
    else:
        ids = gen.resolve_classes(args.classes)
    check_output_memory(args, len(ids), gen.image_shape)
    images, t = gen.generate(ids, num=args.num, seed=args.seed, cfg_scale=args.cfg_scale, steps=args.steps,
                             sampler=args.sampler, decoder_steps=args.decoder_steps, progress=Progress())
    refuse_non_finite(images)
    names = [gen.class_name(i) for i in ids]
    try:
        grid = save_outputs(images, ids, names, args.num, args.out, args.scale)
    except OSError as e:
        raise UserError(f"could not write the images into {args.out}: {e.strerror or e}") from None
    n = t["images"]
    print(f"classes: {', '.join(f'{i} ({m})' for i, m in zip(ids, names))}; {args.num} per class, seed {args.seed}")
    print(f"DiT ({gen.name}, {gen.source}): {t['dit_s']:.2f} s for {n} latents "
          f"({t['sampler']}, {t['steps']} steps, cfg {t['cfg_scale']:g}) on {t['device']}")
    dec = gen.pick_decoder(t["decoder"])[1]
    print(f"decoder ({'KL-VAE' if dec.is_kl else f'SSDD {dec.decoder_name}'}): {t['decoder_s']:.2f} s for {n} images "
          f"({t['decoder_steps']} step{'s' if t['decoder_steps'] > 1 else ''})")
    print(f"saved {grid} and {n} single images in {args.out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--class", dest="classes", nargs="+", default=None, metavar="CLASS",
                    help="class ids or names (several allowed); default: every class of a model with <= 16")
    ap.add_argument("--num", type=int, default=4, help="images per class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cfg", dest="cfg_scale", type=float, default=None, help="guidance scale (default: the bundle's)")
    ap.add_argument("--steps", type=int, default=None, help="DiT sampling steps (default: the bundle's)")
    ap.add_argument("--sampler", choices=METHODS, default=None, help="default: the bundle's")
    ap.add_argument("--decoder-steps", type=int, default=None,
                    help="SSDD decoder steps (default: 1 for a distilled decoder, else its default)")
    ap.add_argument("--ckpt", default=None, help=f"bundle directory or DiT checkpoint (default: {BUNDLE_DIR})")
    ap.add_argument("--decoder", default=None, help="SSDD checkpoint to decode with (default: the bundle's)")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    ap.add_argument("--out", default="generated", help="output folder")
    ap.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of grid.png")
    return run_cli(generate, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

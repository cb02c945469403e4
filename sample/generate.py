"""Generate class-conditional images with a DiT on SSDD latents (default: the embedded Fashion-MNIST bundle).

    python sample/generate.py --class sneaker
    python sample/generate.py --class 7 9 "ankle boot" --num 8 --seed 1 --cfg 2 --steps 50 --sampler euler
    python sample/generate.py --ckpt runs/jobs/dit_fmnist/checkpoints/last --class bag --decoder-steps 1

--class takes ids or names (case-insensitive; the dataset's names stored with the model, and for 1000-class models
the ImageNet names). Writes <out>/grid.png (one row per class) and one PNG per image; prints the DiT time and the
decoder time separately. Noise is drawn on the CPU from --seed, so results repeat across devices.
"""

import argparse
import os
import re
import sys

import numpy as np
import torch
from PIL import Image

from dit.flow import METHODS
from dit.pipeline import BUNDLE_DIR, load_generator
from tokenizer.errors import UserError, run_cli
from tokenizer.metrics import to_uint8


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "class"


def save_outputs(images: torch.Tensor, ids: list, names: list, num: int, out: str, scale: int = 1) -> str:
    """grid.png (row per class, `num` columns, 2-px white gaps) and <id>_<name>_<k>.png; returns the grid path."""
    os.makedirs(out, exist_ok=True)
    pixels = to_uint8(images)
    h, w = images.shape[-2:]
    pad = 2
    grid = np.full((len(ids) * (h + pad) + pad, num * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r, cid in enumerate(ids):
        for k in range(num):
            img = pixels[r * num + k]
            grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = img
            Image.fromarray(img).save(os.path.join(out, f"{cid:04d}_{slug(names[r])}_{k}.png"))
    path = os.path.join(out, "grid.png")
    im = Image.fromarray(grid)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    im.save(path)
    return path


def generate(args) -> None:
    if args.num < 1:
        raise UserError(f"--num must be >= 1, got {args.num}")
    gen = load_generator(args.ckpt, device=args.device, decoder=args.decoder)
    if args.classes is None:
        if gen.num_classes > 16:
            raise UserError(f"give --class (ids or names); {gen._choices()}")
        ids = list(range(gen.num_classes))
    else:
        ids = gen.resolve_classes(args.classes)
    images, t = gen.generate(ids, num=args.num, seed=args.seed, cfg_scale=args.cfg_scale, steps=args.steps,
                             sampler=args.sampler, decoder_steps=args.decoder_steps)
    names = [gen.class_name(i) for i in ids]
    grid = save_outputs(images, ids, names, args.num, args.out, args.scale)
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

"""Generate class-conditional images with a DiT on SSDD latents (default: the embedded Fashion-MNIST bundle).

    python sample/generate.py --class sneaker
    python sample/generate.py --class 7 9 "ankle boot" --num 8 --seed 1 --cfg 2 --steps 50 --sampler euler
    python sample/generate.py --ckpt runs/jobs/dit_fmnist/checkpoints/last --class bag --decoder-steps 1
    python sample/generate.py --class bag --decoder KL-VAE --decoder "SSDD-XS 8-step (teacher)" --decoder-steps 4
    # the published ImageNet generators on SD-VAE latents, decoded by SD-VAE and by an SSDD decoder side by side
    python sample/generate.py --ckpt DiT-XL-2-256x256.pt --class 207 "golden retriever" \
        --decoder sdvae --decoder ssdd:SDVAE_M_256.safetensors --decoder-steps 1
    python sample/generate.py --ckpt SiT-XL-2-256x256.pt --class 207 --sampler ode

--class takes ids or names (case-insensitive; the dataset's names stored with the model, and for 1000-class models
the ImageNet names). --ckpt also takes DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt and SiT-XL-2-256x256.pt (fetched to
the torch cache where a network exists) or such a file (prefix dit: or sit: if its name does not say). --decoder
(repeatable) takes what sample/sample_ddp.py and dit.export take: a decoder name of the bundle (KL-VAE), a tokenizer
run name <run>[@best] under --ckpt-dir, a checkpoint file, ssdd:<file or released name>, sdvae[:<file or name>].
Writes <out>/grid.png (one row per class; with several decoders, their grids side by side, each also in
<out>/<decoder>/, named with the steps it ran) and one PNG per image; prints the DiT time and each decoder's time
separately, after progress bars per DiT step and per decoder batch. Noise is drawn on the CPU from --seed, so
results repeat across devices. Every argument is checked before any work (a request that needs more memory than the
machine has is refused with the numbers), and images with non-finite values (damaged weights) are refused, not
written. A generator of greyscale data (Fashion-MNIST: the embedded bundle) writes grey images.
"""

import argparse
import os
import re
import sys

import numpy as np
import torch
from PIL import Image

from dit.pipeline import ALL_METHODS, BUNDLE_DIR, load_generator
from dit.progress import TqdmProgress
from tokenizer.common.devices import check_device, check_memory
from tokenizer.common.errors import UserError, run_cli
from tokenizer.common.validation import check_output_dir, check_sampling_args, in_range
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


def side_by_side(paths: list, out: str) -> str:
    """The grids of several decoders in one picture, left to right with an 8-px white gap."""
    ims = [Image.open(p) for p in paths]
    gap = 8
    canvas = Image.new("RGB", (sum(i.width for i in ims) + gap * (len(ims) - 1), max(i.height for i in ims)), "white")
    x = 0
    for im in ims:
        canvas.paste(im, (x, 0))
        x += im.width + gap
    canvas.save(out)
    return out


# ----------------------------------------------------------------------------- argument checks


def check_args(args) -> None:
    """Types and ranges of every argument, before anything is loaded."""
    in_range("--num", args.num, 1, why="images per class")
    check_sampling_args(args.cfg_scale, args.steps, args.decoder_steps, args.seed)
    in_range("--scale", args.scale, 1)
    args.device = check_device(args.device)
    check_output_dir(args.out, "--out")


def check_output_memory(args, n_classes: int, image_shape: tuple, n_decoders: int = 1) -> None:
    """Refuse up front what would not fit in memory: the images of each decoder and their decoder noise in float32,
    and grid.png (uint8) before and after its --scale upscaling, which PIL holds at once while resizing."""
    c, h, w = image_shape
    images = (1 + n_decoders) * n_classes * args.num * c * h * w * 4
    grid = (n_classes * (h + 2) + 2) * (args.num * (w + 2) + 2) * 3
    check_memory(images + grid * (1 + 2 * args.scale**2),
                 f"{n_classes * args.num} images of {h}x{w} px with a grid.png upscaled {args.scale}x",
                 advice="ask for fewer images (--num, --class) or a smaller --scale")


def refuse_non_finite(images: torch.Tensor) -> None:
    """Non-finite values would be written as black images: refuse them (nothing is written)."""
    bad = int((~torch.isfinite(images.flatten(1))).any(1).sum())
    if bad:
        raise UserError(f"{bad} of {len(images)} generated images hold non-finite values (NaN or inf), so nothing was "
                        f"written: the weights may be damaged (a bundle checked against bundle.json is not), or the "
                        f"guidance scale too large")


def generate(args) -> None:
    check_args(args)
    gen = load_generator(args.ckpt, device=args.device, decoder=args.decoder, ckpt_dir=args.ckpt_dir)
    if args.classes is None:
        if gen.num_classes > 16:
            raise UserError(f"give --class (ids or names); {gen._choices()}")
        ids = list(range(gen.num_classes))
    else:
        ids = gen.resolve_classes(args.classes)
    names = [gen.class_name(i) for i in ids]
    compare = len(gen.decoders) > 1 and (args.compare or len(args.decoder or []) > 1)
    check_output_memory(args, len(ids), gen.image_shape, len(gen.decoders) if compare else 1)
    print(f"classes: {', '.join(f'{i} ({m})' for i, m in zip(ids, names))}; {args.num} per class, seed {args.seed}")
    bars = TqdmProgress()  # a bar per DiT step, then per decoder batch, each with its own rate
    try:
        if not compare:  # the default decoder (the first one given)
            images, t = gen.generate(ids, num=args.num, seed=args.seed, cfg_scale=args.cfg_scale, steps=args.steps,
                                     sampler=args.sampler, decoder_steps=args.decoder_steps, progress=bars)
            by_decoder = {t["decoder"]: images}
            per_decoder = {t["decoder"]: {**t, "label": t["decoder_label"]}}
        else:  # the same latents through every decoder given, or every decoder of the bundle with --compare
            by_decoder, t = gen.compare(ids, num=args.num, seed=args.seed, cfg_scale=args.cfg_scale,
                                        steps=args.steps, sampler=args.sampler, decoder_steps=args.decoder_steps,
                                        progress=bars)
            per_decoder = t["decoders"]
    finally:
        bars.close()
    for images in by_decoder.values():  # before anything is written
        refuse_non_finite(images)
    n = t["images"]
    print(f"DiT ({gen.name}, {gen.source}): {t['dit_s']:.2f} s for {n} latents "
          f"({t['sampler']}, {t['steps']} steps, cfg {t['cfg_scale']:g}) on {t['device']}")
    grids = []
    try:
        for name, images in by_decoder.items():
            d = per_decoder[name]  # its label says the steps it ran ('SSDD-XS 4-step (teacher)' at --decoder-steps 4)
            print(f"decoder {d['label']}: {d['decoder_s']:.2f} s for {n} images "
                  f"({d['decoder_steps']} step{'s' if d['decoder_steps'] > 1 else ''})")
            out = args.out if len(by_decoder) == 1 else os.path.join(args.out, slug(d["label"]))
            grids.append(save_outputs(images, ids, names, args.num, out, args.scale))
        if len(grids) > 1:
            both = side_by_side(grids, os.path.join(args.out, "grid.png"))
    except OSError as e:
        raise UserError(f"could not write the images into {args.out}: {e.strerror or e}") from None
    if len(grids) == 1:
        print(f"saved {grids[0]} and {n} single images in {args.out}")
    else:
        print(f"saved {both} ({', '.join(d['label'] for d in per_decoder.values())} left to right) and each "
              f"decoder's grid and {n} single images in {args.out}/<decoder>/")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--class", dest="classes", nargs="+", default=None, metavar="CLASS",
                    help="class ids or names (several allowed); default: every class of a model with <= 16")
    ap.add_argument("--num", type=int, default=4, help="images per class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cfg", dest="cfg_scale", type=float, default=None, help="guidance scale (default: the bundle's)")
    ap.add_argument("--steps", type=int, default=None, help="DiT sampling steps (default: the bundle's)")
    ap.add_argument("--sampler", choices=ALL_METHODS, default=None,
                    help="default: the model's (this project's models: euler, heun, sde; DiT: ddpm, ddim; "
                         "SiT: sde, ode, euler, heun)")
    ap.add_argument("--decoder-steps", type=int, default=None,
                    help="SSDD decoder steps (default: 1 for a distilled decoder, else its default)")
    ap.add_argument("--ckpt", default=None,
                    help=f"bundle directory, DiT checkpoint, or a published generator: DiT-XL-2-256x256.pt, "
                         f"DiT-XL-2-512x512.pt, SiT-XL-2-256x256.pt or such a file [dit:|sit:]<file> "
                         f"(default: {BUNDLE_DIR})")
    ap.add_argument("--decoder", action="append", default=None, metavar="SPEC",
                    help="decoder to decode with, repeatable (each writes its own grid): a decoder name of the "
                         "bundle (e.g. KL-VAE, as bundle.json lists them), a checkpoint file, a tokenizer run name "
                         "<run>[@best] under --ckpt-dir, ssdd:<file or released name such as SDVAE_M_256>, sdvae or "
                         "sdvae:<file or name> (default: the bundle's; SD-VAE for published generators)")
    ap.add_argument("--ckpt-dir", default="runs", help="where --decoder run names are looked up (<dir>/jobs/<run>)")
    ap.add_argument("--compare", action="store_true",
                    help="decode the same latents with every decoder the bundle offers (e.g. the distilled 1-step "
                         "SSDD, its multi-step teacher, the KL-VAE) and write their grids side by side")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    ap.add_argument("--out", default="generated", help="output folder")
    ap.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of grid.png")
    return run_cli(generate, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

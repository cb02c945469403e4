"""Encode and decode one image with an SSDD tokenizer; save input and reconstructions side by side.

    python sample/reconstruct.py --ckpt F8C4_M_256.safetensors --encoder f8c4 --decoder M --image cat.jpg
    python sample/reconstruct.py --ckpt runs/jobs/fmnist_f8c4_XS/checkpoints/last/model_ae_ema.safetensors \
        --image coffee --size 256 --steps 1 8

`--image` is a file or the name of a photo bundled with scikit-image (astronaut, chelsea, coffee, rocket).
The image is resized (shorter side, bilinear) and centre-cropped to `--size`, as the official demo does.
Checkpoints written by this project know their architecture; the released files need --encoder/--decoder.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

from tokenizer import SSDD, UserError
from tokenizer.data import load_rgb
from tokenizer.errors import run_cli

BUNDLED = ("astronaut", "chelsea", "coffee", "rocket")


def load_image(spec: str, size: int) -> torch.Tensor:
    """File path or bundled photo name -> (1, 3, size, size) in [-1, 1]."""
    if spec in BUNDLED and not os.path.exists(spec):
        import skimage.data

        img = Image.fromarray(getattr(skimage.data, spec)()).convert("RGB")
    else:
        img = load_rgb(spec)  # a clear UserError for missing or corrupt files
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    return x.unsqueeze(0)


def reconstruct(args) -> None:
    arch = {k: v for k, v in (("encoder", args.encoder), ("decoder", args.decoder)) if v}
    model = SSDD.from_checkpoint(args.ckpt, **arch).eval()
    f = model.patch_size
    if args.size % max(f, 8):
        raise UserError(f"--size must be a multiple of {max(f, 8)} for this tokenizer, got {args.size}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    x = load_image(args.image, args.size).to(device)
    rows = [x]
    with torch.no_grad():
        t0 = time.perf_counter()
        z = model.encode(x).mode()
        print(f"encode: {1000 * (time.perf_counter() - t0):.0f} ms, latent {tuple(z.shape)}")
        for steps in args.steps:
            t0 = time.perf_counter()
            rec = model.decode(z, steps=steps, generator=torch.Generator(device).manual_seed(args.seed))
            mse = float(((rec.clamp(-1, 1) - x) / 2).pow(2).mean())
            print(f"decode {steps} step(s): {1000 * (time.perf_counter() - t0):.0f} ms, "
                  f"PSNR {10 * np.log10(1 / max(mse, 1e-12)):.2f} dB")
            rows.append(rec)
    strip = torch.cat([r[0].clamp(-1, 1) for r in rows], dim=2)  # left to right: input, then each step count
    arr = ((strip.permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    Image.fromarray(arr).save(args.out)
    print(f"saved {args.out} (left to right: input, {', '.join(f'{s}-step' for s in args.steps)})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="safetensors file (ours or a released facebook/SSDD file)")
    ap.add_argument("--encoder", default=None, help="f8c4-style; needed for released files only")
    ap.add_argument("--decoder", default=None, help="S, B, M, L, XL, H; needed for released files only")
    ap.add_argument("--image", default="astronaut", help=f"image file or one of {', '.join(BUNDLED)}")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 8], help="decoder step counts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="reconstruction.png")
    return run_cli(reconstruct, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

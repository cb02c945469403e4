"""Encode and decode one image with an SSDD tokenizer; save input and reconstructions side by side.

    python sample/reconstruct.py --ckpt F8C4_M_256 --image cat.jpg       # a released model by name (Hub cache)
    python sample/reconstruct.py --ckpt runs/jobs/fmnist_f8c4_XS/checkpoints/last/model_ae_ema.safetensors \
        --image coffee --size 256 --steps 1 8

`--image` is a file or the name of a photo bundled with scikit-image (astronaut, chelsea, coffee, rocket).
The image is resized (shorter side, bilinear) and centre-cropped to `--size`, as the official demo does.
Checkpoints written by this project know their architecture; so do the released facebook/SSDD files, given by name
(F8C4_M_256, SDVAE_M_256, ...) or as files keeping their released names; other files need --encoder/--decoder.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

from tokenizer import SSDD, UserError
from tokenizer.common.devices import check_memory
from tokenizer.common.errors import run_cli
from tokenizer.common.validation import MAX_STEPS, check_output_dir, in_range
from tokenizer.data import load_rgb
from tokenizer.metrics import to_uint8

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


# ----------------------------------------------------------------------------- argument checks


def check_args(args) -> None:
    """Types and ranges of the arguments that need no model, before anything is loaded."""
    for steps in args.steps:
        in_range("--steps", steps, 1, MAX_STEPS, why=f"more than {MAX_STEPS} decoder steps only costs time")
    in_range("--seed", args.seed, 0, 2**63 - 1)
    in_range("--size", args.size, 8)
    check_output_dir(os.path.dirname(os.path.abspath(args.out)), "--out's folder")
    if os.path.splitext(args.out)[1].lower() not in Image.registered_extensions():
        raise UserError(f"--out {args.out}: give an image file name such as reconstruction.png (.png, .jpg, .webp)")


def peak_memory(model: SSDD, size: int) -> float:
    """A rough upper estimate (bytes, float32) of encoding or decoding one size x size image, whichever is larger:
    about 16 feature maps of the full-resolution width (activations and U-Net skips), plus attention maps of
    (heads, N, N) floats held about 3 times (bias, weights, softmax): the encoder's and the KL decoder's single head
    over the latent grid, and the SSDD decoder's middle transformer over N = (size/8)^2 tokens. Those grow with
    size^4 and dominate from about 512 px."""
    def part(width: int, heads: int, tokens: int) -> float:
        return 16 * width * size * size * 4 + 3 * heads * tokens**2 * 4

    latent_tokens = (size // model.patch_size) ** 2
    encoder = part(model.encoder_base_channels, 1, latent_tokens)
    if model.is_kl:
        return max(encoder, part(model.kl_base_channels, 1, latent_tokens))
    heads = model.decoder.mid_block.transformer_blocks[0].attn1.heads
    return max(encoder, part(model.decoder.conv_in.out_channels, heads, (size // 8) ** 2))


def reconstruct(args) -> None:
    check_args(args)
    arch = {k: v for k, v in (("encoder", args.encoder), ("decoder", args.decoder)) if v}
    model = SSDD.from_checkpoint(args.ckpt, **arch).eval()
    f = model.patch_size
    if args.size % max(f, 8):
        raise UserError(f"--size must be a multiple of {max(f, 8)} for this tokenizer, got {args.size}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_memory(peak_memory(model, args.size), f"decoding a {args.size}-px image", device,
                 advice="choose a smaller --size")
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
    arr = to_uint8(strip)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        Image.fromarray(arr).save(args.out)
    except OSError as e:
        raise UserError(f"could not write {args.out}: {e.strerror or e}") from None
    print(f"saved {args.out} (left to right: input, {', '.join(f'{s}-step' for s in args.steps)})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="safetensors file (ours or a released facebook/SSDD file), or a "
                    "released name such as F8C4_M_256 (fetched through the Hugging Face cache)")
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

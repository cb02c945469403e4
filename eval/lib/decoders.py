"""The decoders the speed benchmarks time: the KL-VAE decoder, an SSDD decoder, or diffusers' AutoencoderKL decoder,
with random weights, and their inputs drawn on the device before any timing.

    decode, params, (c, f) = build_decode_fn("M", "f8c4", 128, device, compile_=False)
    z, noise = decoder_inputs(batch=4, latent=(c, f), px=256, device=device)   # drawn on the device, untimed
    images = decode(z, noise, steps=1)                                          # what the benchmarks time

Speed and memory do not depend on the weights' values, so no checkpoint is needed. SSDD's sampler starts from
noise; left to itself, `SSDD.decode` would draw it on the CPU and copy it to the device inside every timed call,
a cost the KL-VAE does not pay. Here the noise is an argument, drawn once beforehand like the latents.
"""

import torch

from tokenizer.encoder import build_encoder, parse_encoder_name
from tokenizer.kl_decoder import build_kl_decoder
from tokenizer.ssdd import SSDD

DIFFUSERS = "diffusers"  # the decoder name of diffusers' AutoencoderKL (an optional extra)
KL_SUBPIXEL = "kl-subpixel"  # our KL-VAE decoder given SSDD's exact sub-pixel upsampling (same weights, fewer FLOPs)


class DecoderUnavailable(Exception):
    """A decoder that cannot be built on this installation (diffusers missing): its row is skipped with the note."""


def decoder_inputs(batch: int, latent: tuple, px: int, device, seed: int = 0) -> tuple:
    """(latents (batch, C, px/F, px/F), noise (batch, 3, px, px)), standard normal, drawn on `device`."""
    c, f = latent
    g = torch.Generator(device).manual_seed(seed)
    z = torch.randn(batch, c, px // f, px // f, device=device, generator=g)
    noise = torch.randn(batch, 3, px, px, device=device, generator=g)
    return z, noise


def diffusers_kl_decoder(encoder: str, kl_base_channels: int):
    """diffusers' AutoencoderKL (the SD-VAE layout: widths b, 2b, 4b, 4b, 2 layers per block, 32 groups), random
    weights, its encoder dropped. Raises DecoderUnavailable when diffusers is not installed."""
    f, c = parse_encoder_name(encoder)
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise DecoderUnavailable(f"diffusers is not installed (pip install \".[diffusers]\"): {e}") from None
    levels = f.bit_length()  # f8 -> 4 levels, as SD-VAE
    b = kl_base_channels
    widths = tuple(b * min(2**i, 4) for i in range(levels))
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=widths,
                        layers_per_block=2, latent_channels=c, norm_num_groups=32, sample_size=256)
    del vae.encoder, vae.quant_conv  # decode() runs post_quant_conv + decoder only
    return vae


def build_decode_fn(decoder: str, encoder: str, kl_base_channels: int, device, compile_: bool,
                    channels_last: bool = False, compile_options: dict | None = None):
    """-> (decode(z, noise, steps=1, attention="auto") callable, parameter count, latent (C, F)). Random weights,
    eval mode.

    `decoder` is "kl" (the KL-VAE decoder, `kl_base_channels` wide), "kl-subpixel" (the same with SSDD's sub-pixel
    upsampling), "diffusers" (diffusers' AutoencoderKL decoder of the same width; DecoderUnavailable without
    diffusers) or an SSDD size, optionally "<size>-nearest" (upsamplings computed as written, not sub-pixel);
    `noise` is the SSDD sampler's start (shape of the image; `decoder_inputs` draws it), `attention` the SSDD
    middle transformer's path for the call. The KL-VAEs ignore both, and steps. `compile_options` go to
    torch.compile (e.g. {"dynamic": False}).
    """
    f, c = parse_encoder_name(encoder)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    options = compile_options or {}
    if decoder in ("kl", KL_SUBPIXEL, DIFFUSERS):
        if decoder != DIFFUSERS:
            model = build_kl_decoder(encoder, kl_base_channels, subpixel_upsample=decoder == KL_SUBPIXEL)
            call = model
        else:
            model = diffusers_kl_decoder(encoder, kl_base_channels)
            call = model.decode
        model = model.eval().requires_grad_(False).to(device, memory_format=fmt)
        fn = torch.compile(call, **options) if compile_ else call
        if decoder != DIFFUSERS:
            return (lambda z, noise=None, steps=1, attention=None: fn(z)), n_params(model), (c, f)
        return (lambda z, noise=None, steps=1, attention=None: fn(z).sample), n_params(model), (c, f)
    # SSDD.decode is the code path users call (its Euler loop). Its encoder is never run: a 32-wide one only supplies
    # the patch size and channel count, and stays on the CPU.
    size, _, upsample = decoder.partition("-")
    model = SSDD(encoder=build_encoder(encoder, base_channels=32), decoder=size, upsample=upsample or "subpixel")
    model = model.eval().requires_grad_(False)
    model.decoder.to(device, memory_format=fmt)
    mid, params = model.decoder.mid_block, n_params(model.decoder)
    if compile_:
        model.decoder.compile(**options)  # in place, with its fallback: a compiler failure costs a warning, not the run

    def decode(z, noise, steps=1, attention="auto"):
        if noise is None:
            raise ValueError("SSDD decode timing needs its noise drawn beforehand (eval.lib.decoders.decoder_inputs)")
        mid.attention = attention
        return model.decode(z, steps=steps, noise=noise)

    return decode, params, (c, f)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

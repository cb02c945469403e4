"""The decoders the speed benchmarks time: the KL-VAE decoder or an SSDD decoder, with random weights.

Speed and memory do not depend on the weights' values, so no checkpoint is needed.
"""

import torch

from tokenizer.encoder import build_encoder, parse_encoder_name
from tokenizer.kl_decoder import build_kl_decoder
from tokenizer.ssdd import SSDD


def build_decode_fn(decoder: str, encoder: str, kl_base_channels: int, device, compile_: bool,
                    channels_last: bool = False):
    """-> (decode(z, steps, attention) callable, parameter count, latent (C, F)). Random weights, eval mode.

    `decoder` is "kl" (the KL-VAE decoder, `kl_base_channels` wide) or an SSDD size; `attention` sets the SSDD
    middle transformer's path for the call (the KL-VAE has none and ignores it).
    """
    f, c = parse_encoder_name(encoder)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if decoder == "kl":
        model = build_kl_decoder(encoder, kl_base_channels).eval().to(device, memory_format=fmt)
        fn = torch.compile(model) if compile_ else model
        return (lambda z, steps, attention=None: fn(z)), sum(p.numel() for p in model.parameters()), (c, f)
    # SSDD.decode is the code path users call (Euler loop, noise drawn per call). Its encoder is never run: a
    # 32-wide one only supplies the patch size and channel count, and stays on the CPU.
    model = SSDD(encoder=build_encoder(encoder, base_channels=32), decoder=decoder).eval()
    model.decoder.to(device, memory_format=fmt)
    mid = model.decoder.mid_block
    if compile_:
        model.decoder = torch.compile(model.decoder)
    n = sum(p.numel() for p in model.decoder.parameters())

    def decode(z, steps, attention="auto"):
        mid.attention = attention
        return model.decode(z, steps=steps)

    return decode, n, (c, f)

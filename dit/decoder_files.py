"""Decoder files: what a decoder spec or file is, loaded as an eval-mode decoder checked against the latents.

The files and specs a generator's `decoder` takes (`load_decoder_spec`):
- a checkpoint of this project's tokenizer (SSDD or KL-VAE; .safetensors with architecture metadata);
- a released decoder-only SSDD file (SDVAE_*_256.safetensors: decoder weights, no metadata), for SD-VAE latents,
  sized from its shapes (given as the file or `ssdd:<file>`);
- an SD-VAE autoencoder in either published layout (`tokenizer.sdvae.detect_layout`; .safetensors or a torch
  pickle), and `sdvae` / `sdvae:<file or name>`, for SD-VAE latents (default sd-vae-ft-mse);
- a DiT/SiT generator file, refused with a hint (it belongs in --ckpt).
Only the header of a .safetensors file is read to tell these apart; the tensors are read once, by the loader.
"""

from __future__ import annotations

import os

from tokenizer.common.checkpoint import read_header
from tokenizer.common.errors import UserError
from tokenizer.pretrained import resolve_pretrained
from tokenizer.sdvae import DEFAULT_SDVAE, detect_layout, read_state_file
from tokenizer.ssdd import SSDD

__all__ = ["default_decoder_steps", "decoder_label", "load_decoder", "load_sdvae_decoder", "load_decoder_spec",
           "named_decoders"]


def default_decoder_steps(decoder: SSDD) -> int:
    """The steps a decoder runs when not told: 1 for a distilled decoder and the KL-VAE, else its sampler default."""
    return 1 if decoder.single_step or decoder.is_kl else decoder.default_steps


def decoder_label(decoder: SSDD, steps: int | None = None) -> str:
    """A display name such as 'SSDD-XS 1-step (distilled)', 'SSDD-XS 8-step', 'KL-VAE' or 'SD-VAE'."""
    if decoder.is_kl:
        return "SD-VAE" if decoder.encoder_name == "sdvae" else "KL-VAE"
    steps = steps or default_decoder_steps(decoder)
    return f"SSDD-{decoder.decoder_name} {steps}-step" + (" (distilled)" if decoder.single_step else "")


def load_decoder(path: str, latent_channels: int, what: str, sdvae_latents: bool = False,
                 encoder_sha256: str | None = None) -> SSDD:
    """An eval-mode decoder (SSDD or KL-VAE behind the SSDD API) from a checkpoint, checked against the latents.

    sdvae_latents: the generator makes SD-VAE latents; a file without architecture metadata (a released
    decoder-only SDVAE_*_256 file) is then read as an SSDD decoder of SD-VAE latents, its size from its shapes,
    and an SD-VAE file (either layout) as the SD-VAE decoder.
    encoder_sha256: the encoder whose latents the generator makes; a decoder-only file that records another is
    refused.
    """
    if not os.path.isfile(path):
        raise UserError(f"decoder checkpoint not found: {path}")
    path = str(path)
    # the header is enough to tell what the file is (SSDD.from_checkpoint reads the tensors once, below)
    keys, meta = read_header(path) if path.endswith(".safetensors") else (list(read_state_file(path)), {})
    if "x_embedder.proj.weight" in keys:
        raise UserError(f"{path} is a DiT/SiT generator, not a decoder; give it with --ckpt")
    if detect_layout(keys) is not None:
        if not sdvae_latents:
            raise UserError(f"{path} is an SD-VAE autoencoder, but {what} does not make SD-VAE latents")
        return load_sdvae_decoder(path)
    if not path.endswith(".safetensors"):
        raise UserError(f"{path} is neither an SD-VAE autoencoder nor an SSDD checkpoint (.safetensors)")
    recorded = meta.get("encoder_sha256")
    if encoder_sha256 and recorded and recorded != encoder_sha256:
        raise UserError(f"the decoder {path} decodes the latents of another encoder (sha256 {recorded[:12]}) than "
                        f"{what} was trained on (sha256 {encoder_sha256[:12]})")
    arch = {} if "encoder" in meta or not sdvae_latents else {"encoder": "sdvae"}
    dec = SSDD.from_checkpoint(path, **arch).eval().requires_grad_(False)
    if dec.encoder.z_channels != latent_channels:
        raise UserError(f"the decoder {path} takes {dec.encoder.z_channels}-channel latents but {what} makes "
                        f"{latent_channels}-channel ones")
    if (dec.encoder_name == "sdvae") != sdvae_latents:
        made = "SD-VAE latents" if sdvae_latents else "latents of this project's tokenizer"
        raise UserError(f"the decoder {path} decodes {dec.encoder_name} latents but {what} makes {made}")
    return dec


def load_sdvae_decoder(source: str = DEFAULT_SDVAE) -> SSDD:
    """SD-VAE's KL decoder (with its encoder) from a file in either published layout, or a known name."""
    return SSDD(encoder="sdvae", decoder="kl", checkpoint=source).eval().requires_grad_(False)


def load_decoder_spec(spec, latent_channels: int, what: str, sdvae_latents: bool = False,
                      encoder_sha256: str | None = None) -> SSDD:
    """A decoder from a spec: `sdvae`, `sdvae:<file or name>`, `ssdd:<file>`, or a checkpoint file."""
    text = str(spec)
    if text == "sdvae" or text.startswith("sdvae:"):
        if not sdvae_latents:
            raise UserError(f"{what} does not make SD-VAE latents, so the SD-VAE decoder cannot decode them")
        return load_sdvae_decoder(text.partition(":")[2] or DEFAULT_SDVAE)
    text = resolve_pretrained(text) or text  # a released facebook/SSDD name -> its file in the Hugging Face cache
    return load_decoder(text.removeprefix("ssdd:"), latent_channels, what, sdvae_latents, encoder_sha256)


def named_decoders(specs, latent_channels: int, what: str, sdvae_latents: bool = False,
                   encoder_sha256: str | None = None) -> dict:
    """{display name: (decoder, default steps)} of [(name or None, spec, steps or None)]; names made unique.

    On SD-VAE latents the names carry no step count ('SSDD-M', 'SD-VAE (sd-vae-ft-mse)'): the steps a decoder
    runs are chosen per call there, and reported with the timings.
    """
    decoders = {}
    for name, spec, steps in specs:
        dec = load_decoder_spec(spec, latent_channels, what, sdvae_latents, encoder_sha256)
        steps = int(steps) if steps else default_decoder_steps(dec)
        text = str(spec)
        source = os.path.basename(text.split(":", 1)[1] if text.startswith(("sdvae:", "ssdd:")) else text)
        if name:
            label = name
        elif not sdvae_latents:
            label = decoder_label(dec, steps)
        elif dec.is_kl:
            label = f"SD-VAE ({source if text != 'sdvae' else DEFAULT_SDVAE})"
        else:
            label = f"SSDD-{dec.decoder_name}" + (" (distilled)" if dec.single_step else "")
        if label in decoders:
            label = f"{label} [{source}]"
        decoders[label] = (dec, steps)
    return decoders

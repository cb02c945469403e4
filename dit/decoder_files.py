"""Decoder files: what a decoder spec or file is, loaded as an eval-mode decoder checked against the latents.

The files and specs a generator's `decoder` takes (`load_decoder_spec`):
- a checkpoint of this project's tokenizer (SSDD or KL-VAE; .safetensors with architecture metadata);
- a released decoder-only SSDD file (SDVAE_*_256.safetensors: decoder weights, no metadata), for SD-VAE latents,
  sized from its shapes (given as the file or `ssdd:<file>`);
- an SD-VAE autoencoder in either published layout (`tokenizer.sdvae.detect_layout`; .safetensors or a torch
  pickle), and `sdvae` / `sdvae:<file or name>`, for SD-VAE latents (default sd-vae-ft-mse);
- a DiT/SiT generator file, refused with a hint (it belongs in --ckpt).
Only the header of a .safetensors file is read to tell these apart; the tensors are read once, by the loader.

`resolve_decoder_spec` turns what a user types (sample/generate.py and sample/sample_ddp.py --decoder, the app)
into such a spec: also a tokenizer run name `<run>[@last|@best]` under --ckpt-dir, a released facebook/SSDD name
(`ssdd:SDVAE_M_256`, `F8C4_M_256`) and an SD-VAE name (`sd-vae-ft-mse`); a bundle's own decoder names are picked
by dit.pipeline.load_generator before. `sdvae_source` tells whether a tokenizer spec means SD-VAE (dit.cache
caches SD-VAE latents with it). `run_label` names a decoder with the steps it actually ran.
"""

from __future__ import annotations

import os
import re

from tokenizer.common.checkpoint import read_header, resolve_state_dir
from tokenizer.common.errors import UserError
from tokenizer.common.runs import resolve_checkpoint
from tokenizer.pretrained import resolve_pretrained
from tokenizer.sdvae import DEFAULT_SDVAE, SDVAE_WEIGHTS, detect_layout, read_state_file
from tokenizer.ssdd import SSDD

__all__ = ["default_decoder_steps", "decoder_label", "run_label", "load_decoder", "load_sdvae_decoder",
           "load_decoder_spec", "named_decoders", "resolve_decoder_spec", "sdvae_name", "sdvae_source",
           "DECODER_FORMS"]

DECODER_FORMS = ("a decoder checkpoint file, a tokenizer run name <run>[@best] under --ckpt-dir, ssdd:<file or "
                 f"released name such as SDVAE_M_256>, sdvae or sdvae:<file or {' / '.join(SDVAE_WEIGHTS)}>")


def default_decoder_steps(decoder: SSDD) -> int:
    """The steps a decoder runs when not told: 1 for a distilled decoder and the KL-VAE, else its sampler default."""
    return 1 if decoder.single_step or decoder.is_kl else decoder.default_steps


def decoder_label(decoder: SSDD, steps: int | None = None) -> str:
    """A display name such as 'SSDD-XS 1-step (distilled)', 'SSDD-XS 8-step', 'KL-VAE' or 'SD-VAE'."""
    if decoder.is_kl:
        return "SD-VAE" if decoder.encoder_name == "sdvae" else "KL-VAE"
    steps = steps or default_decoder_steps(decoder)
    return f"SSDD-{decoder.decoder_name} {steps}-step" + (" (distilled)" if decoder.single_step else "")


def run_label(name: str, decoder: SSDD, steps: int) -> str:
    """`name` saying the decoder steps that ran: the step count in the name replaced ('SSDD-XS 8-step (teacher)' run
    for 4 steps -> 'SSDD-XS 4-step (teacher)'), else appended ('SSDD-M' -> 'SSDD-M (4 steps)'); a KL decoder runs
    one pass, so its name stays."""
    if decoder.is_kl:
        return name
    label, found = re.subn(r"\b\d+-step\b", f"{int(steps)}-step", name, count=1)
    return label if found else f"{name} ({int(steps)} step{'s' if int(steps) != 1 else ''})"


def _is_run(spec: str, ckpt_dir: str) -> bool:
    run, _, which = spec.partition("@")
    return resolve_state_dir(os.path.join(ckpt_dir, "jobs", run, "checkpoints", which or "last")) is not None


def sdvae_name(spec, ckpt_dir: str = "runs") -> str | None:
    """The SD-VAE weights a spec names without reading any file: `sdvae` (the default, sd-vae-ft-mse), `sdvae:<file
    or name>`, or a known name (sd-vae-ft-mse, sd-vae-ft-ema) that is neither a file nor a run; else None."""
    text = str(spec).strip()
    if text == "sdvae" or text.startswith("sdvae:"):
        return text.partition(":")[2] or DEFAULT_SDVAE
    if text in SDVAE_WEIGHTS and not os.path.exists(text) and not _is_run(text, ckpt_dir):
        return text
    return None


def sdvae_source(spec, ckpt_dir: str = "runs") -> str | None:
    """`sdvae_name`, or a file holding an SD-VAE autoencoder in either published layout (its header read); else
    None (this project's checkpoints, runs, released SSDD names)."""
    name = sdvae_name(spec, ckpt_dir)
    if name is not None or not os.path.isfile(str(spec)):
        return name
    path = str(spec)
    try:
        keys = read_header(path)[0] if path.endswith(".safetensors") else list(read_state_file(path))
    except UserError:
        return None  # not a weight file at all: the loader that follows says so
    return path if detect_layout(keys) is not None else None


def resolve_decoder_spec(spec, ckpt_dir: str = "runs", names=()) -> str:
    """A decoder as a user types it -> a spec `load_decoder_spec` takes: `sdvae[:...]` and SD-VAE names ->
    `sdvae:<file or name>`; a file -> itself; `ssdd:<file or released name>` -> kept; a tokenizer run
    `<run>[@last|@best]` under ckpt_dir -> its EMA weights; a released SSDD name -> fetched. Else a one-line
    UserError listing the forms (and `names`, the decoders a bundle offers by name)."""
    text = str(spec).strip()
    name = sdvae_name(text, ckpt_dir)
    if name is not None:
        return f"sdvae:{name}"
    if text.startswith("ssdd:") or os.path.isfile(text):
        return text
    try:
        return resolve_checkpoint(ckpt_dir, text)
    except UserError as e:
        if type(e) is not UserError:  # a known name that cannot be fetched: its own message says what to do
            raise
        offered = f"; this generator offers: {', '.join(names)}" if names else ""
        raise UserError(f"decoder {text!r} not found: give {DECODER_FORMS}{offered}") from None


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
    """A decoder from a spec: `sdvae`, `sdvae:<file or name>`, an SD-VAE name, `ssdd:<file>`, or a checkpoint file."""
    text = str(spec)
    name = sdvae_name(text)
    if name is not None:
        if not sdvae_latents:
            raise UserError(f"{what} does not make SD-VAE latents, so the SD-VAE decoder cannot decode them")
        return load_sdvae_decoder(name)
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

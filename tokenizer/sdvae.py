"""The Stable-Diffusion VAE (`stabilityai/sd-vae-ft-mse` / `-ema`) in this project's modules
(docs/ARCHITECTURE.md §2, §9).

SD-VAE is an f8c4 KL autoencoder: its encoder is exactly `tokenizer.encoder.Encoder(8, 4, 128)` (the encoder name
`sdvae`) with SD's `quant_conv` as `out_proj`, and its decoder exactly `tokenizer.kl_decoder.KLDecoder(4, 8, 128)`
with SD's `post_quant_conv` inside. Its weights are published in two layouts, both read here (no diffusers needed):

  ldm        the original single file (`vae-ft-mse-840000-ema-pruned.{ckpt,safetensors}`, or a whole Stable
             Diffusion checkpoint under `first_stage_model.`): `encoder.*`, `decoder.*`, `quant_conv.*`,
             `post_quant_conv.*` with this project's names already (LDM's), and 1x1 convs in the attention;
  diffusers  `diffusion_pytorch_model.safetensors` of the Hugging Face repositories:
             `encoder.down_blocks.{i}.resnets.{j}`, `mid_block.attentions.0.{to_q,to_k,to_v,to_out.0}` as Linear
             layers (older files: `query`, `key`, `value`, `proj_attn`), `conv_shortcut`, `conv_norm_out`, and the
             decoder's `up_blocks` numbered from the coarsest level (LDM's `up.{n-1-i}`).

`sdvae_state(path)` returns the weights of either layout renamed to `SSDD(encoder="sdvae", decoder="kl")` keys;
`to_layout(state, layout)` writes this project's keys in a published layout (tests and one-off checks use it).
Generators trained on SD-VAE latents (DiT, SiT) scale them by `SDVAE_SCALE` = 0.18215: a generator's latents are
z_norm = 0.18215 * z, so z = z_norm / 0.18215 (z_mean 0, z_std 1 / 0.18215; `tokenizer.latent_stats`).
"""

from __future__ import annotations

import os
import re

import torch

from tokenizer.common.downloads import fetch_weights
from tokenizer.common.errors import UserError, one_line
from tokenizer.common.weights import read_weight_file

SDVAE_SCALE = 0.18215  # generators' view: tokenizer.latent_stats.FIXED_Z_STATS (z_std = 1 / 0.18215)
# Known names -> Hugging Face repository; each holds the diffusers-layout file below.
SDVAE_WEIGHTS = {"sd-vae-ft-mse": "stabilityai/sd-vae-ft-mse", "sd-vae-ft-ema": "stabilityai/sd-vae-ft-ema"}
DEFAULT_SDVAE = "sd-vae-ft-mse"  # the one DiT's and SiT's sample.py decode with
HF_FILE = "diffusion_pytorch_model.safetensors"
LAYOUTS = ("ldm", "diffusers")

_ATTN_DIFFUSERS = {"q": ("to_q", "query"), "k": ("to_k", "key"), "v": ("to_v", "value"),
                   "proj_out": ("to_out.0", "proj_attn")}  # (current name, name in files before diffusers 0.14)


def sdvae_file(spec: str = DEFAULT_SDVAE) -> str:
    """A local file for `spec`: an existing path, or a known name (fetched from the cache or downloaded)."""
    if os.path.isfile(spec):
        return spec
    if spec in SDVAE_WEIGHTS:
        return fetch_weights(f"{spec}.safetensors", hf=(SDVAE_WEIGHTS[spec], HF_FILE), what=f"SD-VAE {spec}")
    raise UserError(f"SD-VAE weights {spec!r} not found: give a file (diffusers or original LDM layout) or one of "
                    f"{', '.join(SDVAE_WEIGHTS)}")


def read_state_file(path: str) -> dict:
    """All tensors of a safetensors file or a torch pickle (weights_only; a `state_dict` entry unwrapped)."""
    return read_weight_file(path, "checkpoint")[0]


def detect_layout(state) -> str | None:
    """'diffusers', 'ldm' or None (not an SD-VAE-style autoencoder) from the key names (a state dict or its keys)."""
    keys = [k.removeprefix("first_stage_model.") for k in state]
    # Both layouts keep SD's quant convs at the top level; this project's files (and SSDD decoders, whose U-Net
    # also has `decoder.up_blocks`) never do, and SSDD decoders have no mid-block attention.
    if not any(k.startswith(("quant_conv.", "post_quant_conv.", "decoder.mid_block.attentions.")) for k in keys):
        return None
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys):
        return "diffusers"
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys):
        return "ldm"
    return None


# ----------------------------------------------------------------------------- key maps (this project <-> published)


def _levels(keys, part: str, block: str) -> int:
    idx = [int(m.group(1)) for k in keys if (m := re.match(rf"{part}\.{block}\.(\d+)\.", k))]
    return max(idx) + 1 if idx else 0


def diffusers_key(key: str, levels: int) -> str:
    """This project's key (`encoder.*` / `decoder.*` of SSDD(encoder='sdvae', decoder='kl')) -> diffusers' key."""
    if key.startswith("encoder.out_proj."):
        return "quant_conv." + key.removeprefix("encoder.out_proj.")
    if key.startswith("decoder.post_quant_conv."):
        return key.removeprefix("decoder.")
    part, rest = key.split(".", 1)
    rest = re.sub(r"^down\.(\d+)\.block\.(\d+)\.", r"down_blocks.\1.resnets.\2.", rest)
    rest = re.sub(r"^down\.(\d+)\.downsample\.", r"down_blocks.\1.downsamplers.0.", rest)
    rest = re.sub(r"^up\.(\d+)\.block\.(\d+)\.",
                  lambda m: f"up_blocks.{levels - 1 - int(m.group(1))}.resnets.{m.group(2)}.", rest)
    rest = re.sub(r"^up\.(\d+)\.upsample\.", lambda m: f"up_blocks.{levels - 1 - int(m.group(1))}.upsamplers.0.", rest)
    rest = re.sub(r"^mid\.block_(\d)\.", lambda m: f"mid_block.resnets.{int(m.group(1)) - 1}.", rest)
    rest = re.sub(r"^mid\.attn_1\.norm\.", "mid_block.attentions.0.group_norm.", rest)
    rest = re.sub(r"^mid\.attn_1\.(q|k|v|proj_out)\.",
                  lambda m: f"mid_block.attentions.0.{_ATTN_DIFFUSERS[m.group(1)][0]}.", rest)
    rest = re.sub(r"^norm_out\.", "conv_norm_out.", rest)
    rest = rest.replace(".nin_shortcut.", ".conv_shortcut.")
    return f"{part}.{rest}"


def ldm_key(key: str) -> str:
    """This project's key -> the original LDM single-file key (only the quant convs move)."""
    if key.startswith("encoder.out_proj."):
        return "quant_conv." + key.removeprefix("encoder.out_proj.")
    if key.startswith("decoder.post_quant_conv."):
        return key.removeprefix("decoder.")
    return key


def _is_attn_linear(our_key: str) -> bool:
    return re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", our_key) is not None


def to_layout(state: dict, layout: str) -> dict:
    """This project's SD-VAE state dict written in a published layout (diffusers attention as Linear weights)."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown SD-VAE layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if layout == "ldm":
        return {ldm_key(k): v for k, v in state.items()}
    levels = _levels(state, "decoder", "up")
    return {diffusers_key(k, levels): (v.flatten(1) if _is_attn_linear(k) else v) for k, v in state.items()}


def from_layout(state: dict, our_keys) -> dict:
    """The tensors of `our_keys` (this project's names) taken from a file's state dict in either published layout.

    Keys the file lacks are left out and keys it has beyond them are ignored here: the strict load that follows
    (`tokenizer.common.checkpoint.check_state_dict`) names both in one line.
    """
    state = {k.removeprefix("first_stage_model."): v for k, v in state.items()}
    layout = detect_layout(state)
    if layout is None:
        raise UserError("not an SD-VAE autoencoder state dict (neither the diffusers nor the LDM layout)")
    levels = _levels(state, "decoder", "up_blocks" if layout == "diffusers" else "up")
    out = {}
    for key in our_keys:
        if layout == "ldm":
            names = [ldm_key(key)]
        else:
            names = [diffusers_key(key, levels)]
            m = re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.", key)
            if m:  # also the names of older diffusers files
                names.append(names[0].replace(_ATTN_DIFFUSERS[m.group(1)][0], _ATTN_DIFFUSERS[m.group(1)][1]))
        found = next((n for n in names if n in state), None)
        if found is None:
            continue
        value = state[found]
        if _is_attn_linear(key) and value.dim() == 2:  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
            value = value[:, :, None, None]
        out[key] = value
    return out


def sdvae_state(spec: str = DEFAULT_SDVAE, our_keys=None) -> dict:
    """SD-VAE weights (a file in either layout, or a known name) under this project's keys.

    our_keys: the keys wanted (default: the whole `SSDD(encoder='sdvae', decoder='kl')`, encoder and decoder).
    """
    path = sdvae_file(spec)
    if our_keys is None:
        from tokenizer.encoder import Encoder
        from tokenizer.kl_decoder import KLDecoder

        with torch.device("meta"):
            our_keys = [f"encoder.{k}" for k in Encoder(8, 4, 128).state_dict()] + \
                       [f"decoder.{k}" for k in KLDecoder(4, 8, 128).state_dict()]
    try:
        return from_layout(read_state_file(path), our_keys)
    except UserError as err:
        raise UserError(f"{path}: {one_line(err)}") from None

"""The released facebook/SSDD weights by name, for every place that takes a checkpoint.

    from tokenizer.pretrained import resolve_pretrained
    path = resolve_pretrained("ssdd:F8C4_M_256")   # its file in the Hugging Face cache (downloaded where allowed)
    resolve_pretrained("runs/my.safetensors")      # None: not a release name (a path, a run name, ...)

The names, their files and the pinned revision are in `tokenizer.common.downloads.RELEASED_SSDD`;
`SSDD.from_pretrained`, `SSDD.from_checkpoint`, `resolve_checkpoint` (ssdd.checkpoint=, tokenizer.checkpoint=,
dit.export) and the decoder specs of dit.pipeline all take them. `release_table()` says where each name resolves
and what it builds.
"""

from __future__ import annotations

import os

import torch

from tokenizer.common.downloads import RELEASED_SSDD, SSDD_REPO, SSDD_REVISION, fetch_released, released_name


def resolve_pretrained(spec) -> str | None:
    """A release name (optionally prefixed `ssdd:`) that is not an existing path -> the local file of that release
    (fetched through the Hugging Face cache at the pinned revision; offline and not cached: a one-line
    WeightsUnavailableError naming the repository file and where to put it); anything else -> None."""
    text = str(spec).removeprefix("ssdd:")
    if os.path.exists(text) or released_name(text) is None:
        return None
    return fetch_released(text)


def release_table() -> list[dict]:
    """One row per released name: repository file, revision, architecture and parameter counts (built on the meta
    device, so nothing is allocated or downloaded)."""
    from tokenizer.ssdd import SSDD

    rows = []
    for name, (file, encoder, decoder) in RELEASED_SSDD.items():
        with torch.device("meta"):
            model = SSDD(encoder=encoder, decoder=decoder)
        rows.append({"name": name, "repo": SSDD_REPO, "file": file, "revision": SSDD_REVISION, "encoder": encoder,
                     "decoder": decoder, "decoder_only": encoder == "sdvae",
                     "latent": f"{model.encoder.z_channels} x H/{model.patch_size} x W/{model.patch_size}",
                     "encoder_params": sum(p.numel() for p in model.encoder.parameters()),
                     "decoder_params": sum(p.numel() for p in model.decoder.parameters())})
    return rows

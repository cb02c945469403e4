"""Published weights fetched by name: a file in the cache, else a download, else one line saying what to place where.

    path = fetch_weights("DiT-XL-2-256x256.pt", url="https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt")
    path = fetch_weights("sd-vae-ft-mse.safetensors",
                         hf=("stabilityai/sd-vae-ft-mse", "diffusion_pytorch_model.safetensors"))
    path = fetch_released("F8C4_M_256")     # a file of the facebook/SSDD release, by its name (RELEASED_SSDD)
    folder = hub_snapshot("user/my-dit")     # a whole Hub repository (a generator bundle someone shared)

The cache is torch's: `$TORCH_HOME/hub/checkpoints/<name>` (default `~/.cache/torch/hub/checkpoints`), where a user
without a network can also place the file by hand. Hugging Face files are looked up there first, then in the Hugging
Face cache (`hf_hub_download`, which downloads where it can). `HF_HUB_OFFLINE=1` forbids every download here, not
only Hugging Face's (the tests set it), so offline runs fail fast with the one-line explanation.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from tokenizer.common.errors import UserError, WeightsUnavailableError, one_line

# The facebook/SSDD weights, pinned to the commit "Add SSDD model weights" so a name always means the same bytes.
SSDD_REPO = "facebook/SSDD"
SSDD_REVISION = "a29742837196f405d5e8af289d66356d14258bb0"


def _released_table() -> dict:
    """name -> (file in the repository, encoder, decoder size). 256-px models of four compressions with decoders
    S-XL; decoder-only models of SD-VAE latents (their encoder is SD-VAE's); the earlier 128-px demo file."""
    table = {}
    for enc in ("F8C4", "F16C4", "F16C16", "F32C64"):
        for size in ("S", "B", "M", "L", "XL"):
            table[f"{enc}_{size}_256"] = (f"{enc}/{enc}_{size}_256.safetensors", enc.lower(), size)
    for size in ("S", "B", "M", "L"):
        table[f"SDVAE_{size}_256"] = (f"SDVAE/SDVAE_{size}_256.safetensors", "sdvae", size)
    table["demo_f8c4_M_128"] = ("demo_f8c4_M_128.safetensors", "f8c4", "M")
    return table


RELEASED_SSDD = _released_table()
_RELEASED_LOWER = {name.lower(): name for name in RELEASED_SSDD}


def offline() -> bool:
    """True when downloads are switched off (`HF_HUB_OFFLINE` set to anything but 0 / false)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def cache_path(name: str) -> Path:
    """Where the file `name` is cached, and where a user can place it by hand."""
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def fetch_weights(name: str, url: str | None = None, hf: tuple[str, str] | None = None, what: str = "",
                  revision: str | None = None) -> str:
    """Local path of the published file `name` (see the module docstring); WeightsUnavailableError in one line.

    hf: (repository, file in it), fetched at `revision` (a commit, branch or tag; default the main branch)."""
    target = cache_path(name)
    if target.is_file():
        return str(target)
    source = url or (f"https://huggingface.co/{hf[0]}/blob/{revision or 'main'}/{hf[1]}" if hf else name)
    how = f"place {source} at {target}"
    if hf is not None:
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(hf[0], hf[1], revision=revision, local_files_only=offline())
        except Exception as err:  # offline, no network, gated, ...: all say the same thing to the user
            reason = one_line(err, with_type=True)[:160]
            raise WeightsUnavailableError(f"{what or name} is not cached and could not be downloaded ({reason}); "
                                          f"{how}") from None
    if offline():
        raise WeightsUnavailableError(f"{what or name} is not cached and downloads are off (HF_HUB_OFFLINE); {how}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:  # writes <target>.partial-style temporaries and moves the complete file into place
        torch.hub.download_url_to_file(url, str(target), progress=True)
    except Exception as err:
        raise WeightsUnavailableError(f"{what or name} could not be downloaded "
                                      f"({one_line(err, with_type=True)[:160]}); {how}") from None
    return str(target)


# ----------------------------------------------------------------------------- the facebook/SSDD release by name


def released_name(spec) -> str | None:
    """The release name `spec` stands for ('F8C4_M_256'; any case, with or without '.safetensors', its folder or
    'facebook/SSDD/'), or None when it is not one (a path, a run name, ...)."""
    text = str(spec).strip().removeprefix(f"{SSDD_REPO}/").removeprefix(f"{SSDD_REPO}:").removesuffix(".safetensors")
    name = _RELEASED_LOWER.get(text.rsplit("/", 1)[-1].lower())
    if name is not None and "/" in text and text.lower() + ".safetensors" != RELEASED_SSDD[name][0].lower():
        return None  # some folder of the user's, not the repository's: a path, not a name
    return name


def released_architecture(spec) -> dict | None:
    """{"encoder": "f8c4", "decoder": "M"} of a release name or of a file named like one, else None."""
    name = released_name(spec)
    if name is None:
        return None
    _, encoder, decoder = RELEASED_SSDD[name]
    return {"encoder": encoder, "decoder": decoder}


def fetch_released(spec) -> str:
    """Local path of a file of the facebook/SSDD release, by name: from the Hugging Face cache at the pinned revision
    (downloaded where allowed), or from the torch cache where a user placed it; else one line saying where."""
    name = released_name(spec)
    if name is None:
        raise UserError(f"{spec!r} is not a file of the {SSDD_REPO} release; known names: {', '.join(RELEASED_SSDD)}")
    file = RELEASED_SSDD[name][0]
    return fetch_weights(f"{name}.safetensors", hf=(SSDD_REPO, file), revision=SSDD_REVISION,
                         what=f"the released SSDD file {name} ({SSDD_REPO}/{file})")


# ----------------------------------------------------------------------------- whole Hub repositories

_REPO_ID = re.compile(r"(?:hf:)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?")


def hub_repo_id(spec) -> tuple[str, str | None] | None:
    """(repository, revision or None) for 'owner/name', 'owner/name@revision' or 'hf:owner/name'; None for text of
    another form. Callers first check that no local path of that name exists."""
    m = _REPO_ID.fullmatch(str(spec).strip())
    return (m.group(1), m.group(2)) if m else None


def hub_snapshot(repo: str, revision: str | None = None, what: str = "") -> str:
    """Local folder of a Hugging Face model repository (the files of `revision`, default main) through the Hub's
    cache, downloaded where allowed; offline, only what the cache holds, else one line naming the repository."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, revision=revision, local_files_only=offline())
    except Exception as err:  # not cached while offline, no network, no such repository, gated ...
        reason = one_line(err, with_type=True)[:160]
        at = f"@{revision}" if revision else ""
        raise WeightsUnavailableError(f"{what or repo} is not in the Hugging Face cache and could not be downloaded "
                                      f"({reason}); on a machine with a network run `hf download {repo}"
                                      f"{' --revision ' + revision if revision else ''}` (or give a local folder), "
                                      f"https://huggingface.co/{repo}{at}") from None

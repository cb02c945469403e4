"""Published weights fetched by name: a file in the cache, else a download, else one line saying what to place where.

    path = fetch_weights("DiT-XL-2-256x256.pt", url="https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt")
    path = fetch_weights("sd-vae-ft-mse.safetensors",
                         hf=("stabilityai/sd-vae-ft-mse", "diffusion_pytorch_model.safetensors"))

The cache is torch's: `$TORCH_HOME/hub/checkpoints/<name>` (default `~/.cache/torch/hub/checkpoints`), where a user
without a network can also place the file by hand. Hugging Face files are looked up there first, then in the Hugging
Face cache (`hf_hub_download`, which downloads where it can). `HF_HUB_OFFLINE=1` forbids every download here, not
only Hugging Face's (the tests set it), so offline runs fail fast with the one-line explanation.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tokenizer.common.errors import WeightsUnavailableError, one_line


def offline() -> bool:
    """True when downloads are switched off (`HF_HUB_OFFLINE` set to anything but 0 / false)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def cache_path(name: str) -> Path:
    """Where the file `name` is cached, and where a user can place it by hand."""
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def fetch_weights(name: str, url: str | None = None, hf: tuple[str, str] | None = None, what: str = "") -> str:
    """Local path of the published file `name` (see the module docstring); WeightsUnavailableError in one line."""
    target = cache_path(name)
    if target.is_file():
        return str(target)
    source = url or (f"https://huggingface.co/{hf[0]}/blob/main/{hf[1]}" if hf else name)
    how = f"place {source} at {target}"
    if hf is not None:
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(hf[0], hf[1], local_files_only=offline())
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

"""One reader for weight files this project did not write: a .safetensors file, or a torch pickle (.pt, .pth,
.ckpt, .bin) loaded with `weights_only=True`, so a file can never run code while it is read.

    state, top = read_weight_file("DiT-XL-2-256x256.pt", "generator checkpoint", entries=("ema", "model"))

`entries` names the sub-dicts a training checkpoint keeps its weights under (the first present is taken, e.g. the
EMA weights); `top` is the file's top-level dict (for saved training arguments). DDP's `module.` prefix is removed.
Every failure (a missing, unreadable or foreign file) is one `WeightsUnavailableError` naming the file.
"""

import os

import torch

from tokenizer.common.errors import WeightsUnavailableError, one_line


def read_weight_file(path, what: str = "weights file", entries: tuple = ("state_dict",),
                     safe_globals: tuple = (), hint: str = "") -> tuple[dict, dict]:
    """(tensors by name, the file's top-level dict) of `path`; `hint` is appended to a not-found message."""
    path = str(path)
    if not os.path.isfile(path):
        raise WeightsUnavailableError(f"{what} not found: {path}" + (f" ({hint})" if hint else ""))
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            top = load_file(path)
        else:
            with torch.serialization.safe_globals(list(safe_globals)):
                top = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated or a foreign format
        raise WeightsUnavailableError(f"cannot read {what} {path}: {one_line(err, with_type=True)[:200]}") from None
    if not isinstance(top, dict):
        raise WeightsUnavailableError(f"{path} holds a {type(top).__name__}, not a state dict")
    state = top
    for entry in entries:
        if isinstance(top.get(entry), dict):
            state = top[entry]
            break
    state = {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}
    return state, top

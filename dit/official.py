"""The published ImageNet generators: DiT-XL/2 (facebookresearch/DiT) and SiT-XL/2 (willisma/SiT) checkpoints.

    model, info = load_official("DiT-XL-2-256x256.pt")      # a known name: the cache, else a download
    model, info = load_official("sit:/data/my-sit.pt")      # a local file; the prefix says the family

Both families are torch pickles of a DiT-layout state dict (docs/ARCHITECTURE.md §9): a flat dict of the EMA
weights (the released files), or a training checkpoint {"model", "ema", "opt", "args"} whose `ema` entry is used.
They are read with `torch.load(weights_only=True)` (argparse.Namespace, the only non-tensor object in a training
checkpoint, is allowed). The architecture comes from the shapes (depth, width, patch, latent size, classes,
learn_sigma) and must be a size of `dit.models.DiT_models`; the state dict then loads strictly.

DiT and SiT files have the same keys and shapes, so the family (which decides the sampler, docs/ARCHITECTURE.md
§8) comes from, in order: a `dit:` / `sit:` prefix, a known file name, a training checkpoint's args (SiT's have
`path_type`), or the file name (starting with DiT or SiT); otherwise a one-line error asks for the prefix.
Both are fed their raw time (DiT: the step index 0..999; SiT: s in [0, 1]), so the model is built with t_scale=1.
"""

from __future__ import annotations

import argparse
import os
import re

from dit.models import _SIZES, DiT, build_dit
from tokenizer.common.checkpoint import check_state_dict
from tokenizer.common.downloads import fetch_weights
from tokenizer.common.errors import UserError
from tokenizer.common.weights import read_weight_file

# Known published files: family, image size, download address (DiT: its download.py; SiT: its README's link).
KNOWN = {
    "DiT-XL-2-256x256.pt": ("dit", 256, "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"),
    "DiT-XL-2-512x512.pt": ("dit", 512, "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt"),
    "SiT-XL-2-256x256.pt": ("sit", 256, "https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/"
                                        "SiT-XL-2-256.pt?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0"),
}
# Sampler defaults of each family's sample.py (docs/ARCHITECTURE.md §8): 250 steps and the visual guidance scale 4.0
# (1.5 is the FID setting), guidance on the first 3 latent channels.
FAMILY_DEFAULTS = {
    "dit": {"method": "ddpm", "steps": 250, "cfg_scale": 4.0, "guidance_interval": [0.0, 1.0], "time_shift": 1.0,
            "decoder_steps": None, "cfg_channels": 3},
    "sit": {"method": "sde", "steps": 250, "cfg_scale": 4.0, "guidance_interval": [0.0, 1.0], "time_shift": 1.0,
            "decoder_steps": None, "cfg_channels": 3},
}


def is_official_spec(spec) -> bool:
    """True for what `load_official` takes: a known name, a dit:/sit: prefix, or a torch pickle (not safetensors)."""
    text = str(spec)
    if text in KNOWN or re.match(r"^(dit|sit):", text):
        return True
    return os.path.isfile(text) and not text.endswith(".safetensors")


def split_spec(spec) -> tuple[str | None, str]:
    """'sit:/x/y.pt' -> ('sit', '/x/y.pt'); 'DiT-XL-2-256x256.pt' -> (None, name)."""
    m = re.match(r"^(dit|sit):(.*)$", str(spec))
    return (m.group(1), m.group(2)) if m else (None, str(spec))


def read_pickle(path: str) -> tuple[dict, dict]:
    """(state dict, training args as a dict or {}) of a DiT/SiT torch pickle; the EMA weights where present."""
    state, top = read_weight_file(path, "generator checkpoint", entries=("ema", "model"),
                                  safe_globals=(argparse.Namespace,), hint=f"known names: {', '.join(KNOWN)}")
    args = vars(top["args"]) if isinstance(top.get("args"), argparse.Namespace) else {}
    return state, args


def detect_family(path: str, args: dict, prefix: str | None) -> str:
    if prefix:
        return prefix
    name = os.path.basename(path)
    if name in KNOWN:
        return KNOWN[name][0]
    if args:
        return "sit" if "path_type" in args else "dit"
    m = re.match(r"^(dit|sit)[-_]", name.lower())
    if m:
        return m.group(1)
    raise UserError(f"cannot tell whether {path} is a DiT or a SiT checkpoint (same layout, different samplers); "
                    f"prefix it: dit:{path} or sit:{path}")


def architecture(state: dict, path: str) -> dict:
    """build_dit arguments from a DiT-layout state dict's shapes; a one-line error for anything else."""
    needed = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        hint = ""
        if any(k.startswith(("encoder.", "decoder.", "first_stage_model.", "quant_conv")) for k in state):
            hint = " (it looks like an autoencoder or SSDD decoder: give it with --decoder)"
        raise UserError(f"{path} is not a DiT/SiT generator checkpoint: no {missing[0]}{hint}")
    hidden, in_channels, patch = state["x_embedder.proj.weight"].shape[:3]
    tokens = state["pos_embed"].shape[1]
    grid = int(round(tokens ** 0.5))
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    name = next((f"DiT-{size}/{patch}" for size, (d, h, _) in _SIZES.items() if (d, h) == (depth, hidden)), None)
    if name is None or grid * grid != tokens:
        raise UserError(f"{path}: depth {depth}, width {hidden} on {tokens} tokens is no DiT/SiT size of this project "
                        f"({', '.join(f'{s}: depth {d}, width {h}' for s, (d, h, _) in _SIZES.items())})")
    rows = state["y_embedder.embedding_table.weight"].shape[0]
    out = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    # the published files have a null row (rows = classes + 1); a file without one was trained without dropout
    return {"name": name, "input_size": grid * patch, "in_channels": in_channels, "num_classes": rows - 1,
            "learn_sigma": out == 2 * in_channels, "class_dropout_prob": 0.1}


def load_official(spec, device="cpu") -> tuple[DiT, dict]:
    """(eval-mode DiT with t_scale=1, info) from a known name, a file, or a dit:/sit: prefixed file.

    info: family, model name, image_size (latent size x 8), latent_shape, source path.
    """
    prefix, target = split_spec(spec)
    name = os.path.basename(target)
    path = target
    if not os.path.isfile(target) and target in KNOWN:
        path = fetch_weights(target, url=KNOWN[target][2], what=f"the {target[:3]} checkpoint {target}")
    state, args = read_pickle(path)
    arch = architecture(state, path)
    family = detect_family(name if name in KNOWN else path, args, prefix)
    model = build_dit(arch["name"], input_size=arch["input_size"], in_channels=arch["in_channels"],
                      num_classes=arch["num_classes"], learn_sigma=arch["learn_sigma"],
                      class_dropout_prob=arch["class_dropout_prob"], t_scale=1.0)
    check_state_dict(model, state, path, f"{arch['name']} ({family})")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    grid = arch["input_size"]
    info = {"family": family, "model": arch["name"].replace("DiT-", "SiT-") if family == "sit" else arch["name"],
            "image_size": grid * 8, "latent_shape": (arch["in_channels"], grid, grid), "source": str(path),
            "learn_sigma": arch["learn_sigma"]}
    return model.eval().requires_grad_(False).to(device), info

"""Safetensors checkpoints: strict weight loading with a readable mismatch report, and atomic training states.

A training state is a directory (e.g. `runs/jobs/<run>/checkpoints/last/`) holding
    model_<name>.safetensors   one file per module (model_ae, model_ae_ema, model_aux_losses, ...)
    optimizer.safetensors      optimiser tensors; its non-tensor structure sits in the file's metadata
    training_state.json        step, epoch, best metric, RNG states, anything JSON-able
It is written with `tokenizer.atomic.atomic_directory`: into a temporary sibling first, then swapped in by
renames, so a run killed while saving leaves the previous state intact (`resolve_state_dir` finds it).
Layouts: docs/ARCHITECTURE.md §9.
"""

import json
import os
import random

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tokenizer.atomic import atomic_directory, atomic_file, existing_version
from tokenizer.errors import CheckpointMismatchError, UserError, one_line


# ----------------------------------------------------------------------------- weights


def read_weights(path: str) -> tuple[dict, dict]:
    """Return (state_dict, metadata) of a safetensors file; a user-facing error if unreadable."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(path), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read checkpoint {path}: {one_line(e)}") from None


def _preview(items: list, limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def check_state_dict(module: torch.nn.Module, state: dict, source: str, what: str) -> None:
    """Raise CheckpointMismatchError listing missing, unexpected and mis-shaped keys (one line)."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    misshaped = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing [{_preview(missing)}]")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected [{_preview(unexpected)}]")
        if misshaped:
            parts.append(f"{len(misshaped)} mis-shaped (file vs model) [{_preview(misshaped)}]")
        raise CheckpointMismatchError(f"{source} does not fit {what}: " + "; ".join(parts))


def load_weights(module: torch.nn.Module, path: str, what: str | None = None, prefix: str = "") -> dict:
    """Strictly load a safetensors file (optionally only keys under `prefix`, stripped) into `module`.

    Returns the file's metadata. Any mismatch raises CheckpointMismatchError naming the keys.
    """
    state, meta = read_weights(path)
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    check_state_dict(module, state, path, what or type(module).__name__)
    module.load_state_dict(state, strict=True)
    return meta


def save_weights(module_or_state, path: str, metadata: dict | None = None) -> None:
    """Save fp32-contiguous tensors (shared storage broken) to safetensors, atomically."""
    state = module_or_state.state_dict() if isinstance(module_or_state, torch.nn.Module) else module_or_state
    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    atomic_file(path, lambda tmp: save_file(state, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()}))


# ----------------------------------------------------------------------------- optimiser


def _flatten_optimizer(opt_state: dict) -> tuple[dict, dict]:
    tensors, plain = {}, {"param_groups": opt_state["param_groups"], "state": {}}
    for idx, entry in opt_state["state"].items():
        plain["state"][str(idx)] = {}
        for k, v in entry.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v
            else:
                plain["state"][str(idx)][k] = v
    return tensors, plain


def _unflatten_optimizer(tensors: dict, plain: dict) -> dict:
    state = {int(i): dict(entry) for i, entry in plain["state"].items()}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": plain["param_groups"]}


def _optimizer_files(optimizer) -> dict:
    """None, one optimiser (-> optimizer.safetensors) or {name: optimiser} (-> optimizer_<name>.safetensors)."""
    if optimizer is None:
        return {}
    if isinstance(optimizer, dict):
        return {f"optimizer_{name}.safetensors": opt for name, opt in optimizer.items()}
    return {"optimizer.safetensors": optimizer}


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ----------------------------------------------------------------------------- training state


def save_training_state(directory: str, modules: dict, optimizer, state: dict, metadata: dict | None = None) -> None:
    """Atomically write modules (name -> nn.Module), optimiser(s) and a JSON state into `directory`."""
    with atomic_directory(directory) as tmp:
        for key, module in modules.items():
            save_weights(module, os.path.join(tmp, f"model_{key}.safetensors"), metadata)
        for file, opt in _optimizer_files(optimizer).items():
            tensors, plain = _flatten_optimizer(opt.state_dict())
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                os.path.join(tmp, file),
                metadata={"structure": json.dumps(plain)},
            )
        with open(os.path.join(tmp, "training_state.json"), "w") as f:
            json.dump({**state, "rng": rng_state()}, f)


def resolve_state_dir(directory: str) -> str | None:
    """The directory holding the last complete state (`directory`, or `directory.old` after a kill mid-swap)."""
    return existing_version(directory, "training_state.json")


def load_training_state(directory: str, modules: dict, optimizer=None) -> dict:
    """Load what `save_training_state` wrote; returns the JSON state (RNG states already restored)."""
    found = resolve_state_dir(directory)
    if found is None:
        raise UserError(f"no complete training state in {directory}")
    for key, module in modules.items():
        load_weights(module, os.path.join(found, f"model_{key}.safetensors"), what=f"{key} of this config")
    for file, opt in _optimizer_files(optimizer).items():
        tensors, meta = read_weights(os.path.join(found, file))
        opt.load_state_dict(_unflatten_optimizer(tensors, json.loads(meta["structure"])))
    with open(os.path.join(found, "training_state.json")) as f:
        state = json.load(f)
    set_rng_state(state.pop("rng"))
    return state

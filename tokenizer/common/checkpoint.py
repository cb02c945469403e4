"""Safetensors checkpoints: strict weight loading with a readable mismatch report, and atomic training states.

A training state is a directory (e.g. `runs/jobs/<run>/checkpoints/last/`) holding
    model_<name>.safetensors   one file per module (model_ae, model_ae_ema, model_aux_losses, ...)
    optimizer.safetensors      optimiser tensors; its non-tensor structure sits in the file's metadata
    training_state.json        step, epoch, best metric, RNG states, anything JSON-able
It is written with `tokenizer.common.atomic.atomic_directory`: into a temporary sibling first, then swapped in by
renames, so a run killed while saving leaves the previous state intact (`resolve_state_dir` finds it).
training_state.json also records the size and sha256 of every other file of the state (`files`); loading checks
them once per process (`verify_file`), so garbled bytes are a one-line error naming the file, not silent garbage.
Layouts: docs/ARCHITECTURE.md §9.
"""

import hashlib
import json
import os
import random

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tokenizer.common.atomic import atomic_directory, atomic_file, existing_version
from tokenizer.common.errors import CheckpointMismatchError, UserError, one_line

STATE_FILE = "training_state.json"

# ----------------------------------------------------------------------------- integrity


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: str) -> dict:
    """{"bytes", "sha256"} of a file: what a manifest (training_state.json, bundle.json) records about it."""
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}


_verified: dict = {}  # (real path, size, mtime) -> sha256 already checked in this process


def verify_file(path: str, expected: dict, manifest: str) -> None:
    """Check `path` against its manifest record {"bytes", "sha256"} (the size first, which costs nothing); a
    mismatch is a one-line UserError naming the file. Each version of a file is hashed once per process."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if _verified.get(key) == expected.get("sha256"):
        return
    if "bytes" in expected and st.st_size != int(expected["bytes"]):
        raise UserError(f"{path} is damaged: {st.st_size} bytes, but {manifest} records {expected['bytes']} "
                        f"(truncated or replaced); restore it or write it again")
    if "sha256" in expected:
        actual = sha256_file(path)
        if actual != expected["sha256"]:
            raise UserError(f"{path} is damaged: its sha256 {actual[:12]}... differs from the {expected['sha256'][:12]}"
                            f"... that {manifest} records; restore it or write it again")
        _verified[key] = actual


def state_manifest(directory: str) -> dict:
    """{file name: {"bytes", "sha256"}} that a training state's training_state.json records ({} for older states)."""
    path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(path):
        return {}
    return read_state_json(path).get("files") or {}


def read_state_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {one_line(e)}; the training state is damaged") from None


# ----------------------------------------------------------------------------- weights


def read_header(path: str) -> tuple[list, dict]:
    """(tensor names, metadata) of a safetensors file, from its header only (cheap: no tensor is read); a
    user-facing error if unreadable."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return list(f.keys()), f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read checkpoint {path}: {one_line(e)}") from None


def read_metadata(path: str) -> dict:
    """The metadata of a safetensors file (`read_header`: cheap)."""
    return read_header(path)[1]


def read_shapes(path: str) -> dict:
    """{tensor name: shape} of a safetensors file, from its header only (no tensor is read)."""
    read_header(path)  # a user-facing error if unreadable
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def read_weights(path: str) -> tuple[dict, dict]:
    """Return (state_dict, metadata) of a safetensors file; a user-facing error if unreadable.

    A file of a training state is first checked against the sha256 its training_state.json records.
    """
    meta = read_metadata(path)
    record = state_manifest(os.path.dirname(os.path.abspath(path))).get(os.path.basename(path))
    if record:
        verify_file(path, record, os.path.join(os.path.dirname(path), STATE_FILE))
    try:
        return load_file(path), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read checkpoint {path}: {one_line(e)}") from None


def mismatch_summary(missing: list, unexpected: list, misshaped: list, examples: int = 2) -> str:
    """'56 missing, 468 mis-shaped keys (e.g. decoder.a (64,) in the file vs (32,), decoder.b missing)': the counts
    and a few names, never the whole list (a decoder of another size differs in hundreds of keys).
    `misshaped` holds (key, shape in the file, shape in the model)."""
    counts = [f"{len(keys)} {label}" for keys, label in ((missing, "missing"), (unexpected, "unexpected"),
                                                         (misshaped, "mis-shaped")) if keys]
    named = [f"{k} {a} in the file vs {b}" for k, a, b in misshaped[:1]] + [f"{k} missing" for k in missing[:1]]
    named += [f"{k} unexpected" for k in unexpected[:1]]
    named += [k for k, _, _ in misshaped[1:]][: max(examples - len(named), 0)]
    return f"{', '.join(counts)} keys (e.g. {', '.join(named[:examples])})"


def check_state_dict(module: torch.nn.Module, state: dict, source: str, what: str) -> None:
    """Raise CheckpointMismatchError with the counts of missing, unexpected and mis-shaped keys and a few of their
    names (one short line: `mismatch_summary`)."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    misshaped = sorted((k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
                       if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or misshaped:
        summary = mismatch_summary(missing, unexpected, misshaped)
        raise CheckpointMismatchError(f"{source} does not fit {what}: {summary}")


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


def umask() -> int:
    """This process's file-creation mask (read from /proc where it can be, so no other thread sees it change)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """`safetensors.torch.save_file`, with the permissions of any other new file (0o666 less the umask, so 0644
    by default): safetensors creates its file 0600, which would leave weights unreadable to those who may read
    the JSON beside them."""
    save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o666 & ~umask())


def write_weights(module_or_state, path: str, metadata: dict | None = None) -> None:
    """Write contiguous CPU tensors (shared storage broken) and string metadata to safetensors (not atomic)."""
    state = module_or_state.state_dict() if isinstance(module_or_state, torch.nn.Module) else module_or_state
    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    write_safetensors(state, path, metadata={k: str(v) for k, v in (metadata or {}).items()})


def save_weights(module_or_state, path: str, metadata: dict | None = None) -> None:
    """`write_weights`, atomically: the file appears complete or not at all."""
    atomic_file(path, lambda tmp: write_weights(module_or_state, tmp, metadata))


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


def optimizer_name(optimizer) -> str:
    """The optimiser's class name (through accelerate's wrapper): a state of another optimiser does not fit."""
    return type(getattr(optimizer, "optimizer", optimizer)).__name__


def _optimizer_files(optimizer) -> dict:
    """None, one optimiser (-> optimizer.safetensors) or {name: optimiser} (-> optimizer_<name>.safetensors)."""
    if optimizer is None:
        return {}
    if isinstance(optimizer, dict):
        return {f"optimizer_{name}.safetensors": opt for name, opt in optimizer.items()}
    return {"optimizer.safetensors": optimizer}


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """The global RNG states. CUDA: only this process's current device, and only if the process uses CUDA
    (`get_rng_state_all` would create a context on every visible GPU); each step's randomness comes from its own
    generator (`tokenizer.common.training.step_generator`) anyway."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
        "cuda": torch.cuda.get_rng_state().tolist() if torch.cuda.is_initialized() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`'s states, on any number of GPUs: the CUDA state goes to this process's current device
    only, if the process uses CUDA. States written before this layout hold one CUDA state per GPU of the saving
    process: the one of the current device index is used where it exists (fewer GPUs: the rest is skipped)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    cuda = state.get("cuda") or []
    if not cuda or not torch.cuda.is_initialized():
        return
    if isinstance(cuda[0], list):  # the older layout: one state per GPU of the saving process
        device = torch.cuda.current_device()
        if device >= len(cuda):
            return
        cuda = cuda[device]
    torch.cuda.set_rng_state(torch.tensor(cuda, dtype=torch.uint8))


# ----------------------------------------------------------------------------- training state


def save_training_state(directory: str, modules: dict, optimizer, state: dict, metadata: dict | None = None) -> None:
    """Atomically write modules (name -> nn.Module), optimiser(s) and a JSON state into `directory`; the JSON
    records each file's size and sha256 (read back once written, so it describes the bytes on disk)."""
    with atomic_directory(directory) as tmp:
        for key, module in modules.items():
            write_weights(module, os.path.join(tmp, f"model_{key}.safetensors"), metadata)
        for file, opt in _optimizer_files(optimizer).items():
            tensors, plain = _flatten_optimizer(opt.state_dict())
            write_safetensors(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                os.path.join(tmp, file),
                metadata={"structure": json.dumps(plain), "optimizer": optimizer_name(opt)},
            )
        files = {name: file_record(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({**state, "files": files, "rng": rng_state()}, f)


def resolve_state_dir(directory: str) -> str | None:
    """The directory holding the last complete state (`directory`, or `directory.old` after a kill mid-swap)."""
    return existing_version(directory, STATE_FILE)


def load_training_state(directory: str, modules: dict, optimizer=None) -> dict:
    """Load what `save_training_state` wrote (each file checked against its recorded sha256); returns the JSON
    state (RNG states already restored)."""
    found = resolve_state_dir(directory)
    if found is None:
        raise UserError(f"no complete training state in {directory}")
    state = read_state_json(os.path.join(found, STATE_FILE))
    for key, module in modules.items():
        load_weights(module, os.path.join(found, f"model_{key}.safetensors"), what=f"{key} of this config")
    for file, opt in _optimizer_files(optimizer).items():
        tensors, meta = read_weights(os.path.join(found, file))
        if meta.get("optimizer", optimizer_name(opt)) != optimizer_name(opt):
            raise CheckpointMismatchError(f"{os.path.join(found, file)} holds the state of {meta['optimizer']}, not of "
                                          f"this config's {optimizer_name(opt)}")
        try:
            opt.load_state_dict(_unflatten_optimizer(tensors, json.loads(meta["structure"])))
        except (KeyError, ValueError) as e:  # another optimiser, or other parameter groups
            raise CheckpointMismatchError(f"{os.path.join(found, file)} does not fit the optimiser of this config: "
                                          f"{one_line(e)[:200]}") from None
    set_rng_state(state.pop("rng"))
    return state

"""Run directories: where a training run keeps its files, how a checkpoint name becomes a file, and its logs.

A run lives in `<ckpt_dir>/jobs/<run_name>/`:

    config.yaml                  the resolved config of the latest start (written once a resume is known to fit)
    checkpoints/{last,best}/     training states (tokenizer.common.checkpoint; written atomically)
    results/step<N>/             what was computed from the weights of step N (evaluations, z_stats.json): outside
                                 checkpoints/, so a later save, which replaces checkpoints/last, never deletes it
    losses.jsonl                 one JSON record per optimiser step (a resumed run appends; the last record wins)
    samples/*.png                sample or reconstruction grids
    events.out.tfevents.*        TensorBoard scalars and images

Both trainers (tokenizer.train, dit.train) and the evaluation scripts use these helpers; they take plain values,
not a whole config, so the DiT and the tokenizer configs need not share a schema.
"""

import json
import os
import time

import torch
from omegaconf import OmegaConf
from torchvision.utils import make_grid, save_image

from tokenizer.common.atomic import atomic_file, remove_stale_temporaries, settle
from tokenizer.common.checkpoint import STATE_FILE, read_state_json, resolve_state_dir
from tokenizer.common.downloads import fetch_released, released_name
from tokenizer.common.errors import UserError


def run_dir(ckpt_dir: str, run_name: str) -> str:
    return os.path.join(ckpt_dir, "jobs", run_name)


def default_run_name() -> str:
    return time.strftime("%Y-%m-%d/%H-%M-%S")


def resolve_checkpoint(ckpt_dir: str, spec: str, weights: str = "model_ae_ema.safetensors") -> str:
    """A file path, `<run_name>[@last|@best]` -> that run's `weights` file (by default the tokenizer's EMA), or the
    name of a released facebook/SSDD file ('F8C4_M_256', tokenizer.common.downloads.RELEASED_SSDD) -> that file,
    fetched through the Hugging Face cache. A run of the same name wins over a release name."""
    if os.path.isfile(spec):
        return spec
    run, _, which = spec.partition("@")
    path = os.path.join(ckpt_dir, "jobs", run, "checkpoints", which or "last")
    found = resolve_state_dir(path)
    if found is None and released_name(spec) is not None:
        return fetch_released(spec)
    if found is None:
        raise UserError(f"checkpoint '{spec}' is neither a file, a run with saved weights (looked in {path}) nor a "
                        f"released SSDD name such as F8C4_M_256")
    return os.path.join(found, weights)


def step_results_dir(out_dir: str, step: int) -> str:
    """`<run>/results/step<N>/`: what was computed from the weights of step N of the run in `out_dir`."""
    return os.path.join(out_dir, "results", f"step{int(step):07d}")


def results_dir(checkpoint: str) -> str:
    """Where results computed from a weights file are kept (z_stats.json, eval_<N>steps.json): for a file of a run's
    checkpoints/<last|best>/, `<run>/results/step<N>/` (N: that state's step), which no later save touches; for
    any other file, its own folder."""
    folder = os.path.dirname(checkpoint) or "."
    state = os.path.join(folder, STATE_FILE)
    if os.path.basename(os.path.dirname(os.path.abspath(folder))) == "checkpoints" and os.path.isfile(state):
        run = os.path.dirname(os.path.dirname(os.path.abspath(folder)))
        run = os.path.relpath(run) if not os.path.isabs(checkpoint) else run
        return step_results_dir(run, read_state_json(state)["step"])
    return folder


def find_result(checkpoint: str, name: str) -> str:
    """The file `name` computed from `checkpoint`: in `results_dir(checkpoint)`, else beside the checkpoint (where
    older versions wrote it); when neither exists, where it would be written."""
    for candidate in (os.path.join(results_dir(checkpoint), name), os.path.join(os.path.dirname(checkpoint), name)):
        if os.path.isfile(candidate):
            return candidate
    return os.path.join(results_dir(checkpoint), name)


def tidy_run(out_dir: str) -> list:
    """Clean up after killed processes: settle a half-done checkpoint swap and remove the temporary files and
    folders of writers that no longer run. Returns what was removed (main process, before anything is written)."""
    ckpt_root = os.path.join(out_dir, "checkpoints")
    if os.path.isdir(ckpt_root):
        for name in os.listdir(ckpt_root):
            if name.endswith(".old"):
                settle(os.path.join(ckpt_root, name[:-len(".old")]), STATE_FILE)
    results = os.path.join(out_dir, "results")
    folders = [out_dir, ckpt_root, results]
    folders += sorted(os.path.join(results, d) for d in os.listdir(results)) if os.path.isdir(results) else []
    return [os.path.join(folder, name) for folder in folders for name in remove_stale_temporaries(folder)]


def record_start(cfg, out_dir: str) -> None:
    """Tidy the run directory (`tidy_run`) and save the config of this start as config.yaml (main process)."""
    for path in tidy_run(out_dir):
        print(f"removed {path} (left by a process that no longer runs)")
    atomic_file(os.path.join(out_dir, "config.yaml"), lambda tmp: OmegaConf.save(cfg, tmp))


class LossLog:
    """The main process's training log: every step to losses.jsonl, every `every` steps to TensorBoard (+ steps/s)."""

    def __init__(self, out_dir: str, accelerator, every: int):
        path = os.path.join(out_dir, "losses.jsonl")
        drop_partial_line(path)
        self.file = open(path, "a")
        self.accelerator, self.every = accelerator, every
        self.t_last = time.time()

    def write(self, record: dict, force: bool = False) -> bool:
        """Append `record` ({"step": n, name: float, ...}); returns True when it also went to TensorBoard."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        if step % self.every and not force:
            return False
        now = time.time()
        scalars = {f"train/{k}": v for k, v in record.items() if k != "step"}
        self.accelerator.log(scalars | {"train/steps_per_s": self.every / max(now - self.t_last, 1e-9)}, step=step)
        self.t_last = now
        return True

    def close(self) -> None:
        self.file.close()


def drop_partial_line(path: str) -> None:
    """Cut a line a kill left half-written at the end of a JSON-lines file, so appending goes on after whole records."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def read_loss_log(run_directory: str) -> dict:
    """{step: record} from a run's losses.jsonl, keeping a step's last record (a resumed run logs re-done steps
    again)."""
    path = os.path.join(run_directory, "losses.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"no losses.jsonl in {run_directory}")
    records = {}
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):  # a record a kill cut short (the resumed run logs that step again)
                break
            r = json.loads(line)
            records[r["step"]] = r
    return dict(sorted(records.items()))


def save_grid(path: str, rows: list) -> torch.Tensor:
    """One row per tensor (B, 3, H, W) in [-1, 1]; saved as PNG, returned for TensorBoard."""
    n = min(r.shape[0] for r in rows)
    grid = make_grid(torch.cat([r[:n].float().cpu() for r in rows]).clamp(-1, 1), nrow=n, normalize=True,
                     value_range=(-1, 1), padding=1)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_image(grid, path)
    return grid

"""Run directories: where a training run keeps its files, how a checkpoint name becomes a file, and its logs.

A run lives in `<ckpt_dir>/jobs/<run_name>/`:

    config.yaml                  the resolved config of the latest start
    checkpoints/{last,best}/     training states (tokenizer.checkpoint; written atomically)
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

from tokenizer.checkpoint import resolve_state_dir
from tokenizer.errors import UserError


def run_dir(ckpt_dir: str, run_name: str) -> str:
    return os.path.join(ckpt_dir, "jobs", run_name)


def default_run_name() -> str:
    return time.strftime("%Y-%m-%d/%H-%M-%S")


def resolve_checkpoint(ckpt_dir: str, spec: str, weights: str = "model_ae_ema.safetensors") -> str:
    """A file path, or `<run_name>[@last|@best]` -> that run's `weights` file (by default the tokenizer's EMA)."""
    if os.path.isfile(spec):
        return spec
    run, _, which = spec.partition("@")
    path = os.path.join(ckpt_dir, "jobs", run, "checkpoints", which or "last")
    found = resolve_state_dir(path)
    if found is None:
        raise UserError(f"checkpoint '{spec}' is neither a file nor a run with saved weights (looked in {path})")
    return os.path.join(found, weights)


def start_run(cfg, mixed_precision: str = "no", grad_accumulate: int = 1):
    """(accelerator, run directory) of `cfg.run_name` under `cfg.ckpt_dir`: print the config and the process layout,
    create the directory and save config.yaml in it. The accelerator logs to TensorBoard there."""
    from tokenizer.training import make_accelerator

    out_dir = run_dir(cfg.ckpt_dir, cfg.run_name)
    accelerator = make_accelerator(mixed_precision, grad_accumulate, log_dir=out_dir)
    if accelerator.is_main_process:
        print(OmegaConf.to_yaml(cfg))
        print(f"{accelerator.num_processes} process(es) on {accelerator.device}, "
              f"mixed precision: {accelerator.mixed_precision}")
        os.makedirs(out_dir, exist_ok=True)
        OmegaConf.save(cfg, os.path.join(out_dir, "config.yaml"))
    return accelerator, out_dir


class LossLog:
    """The main process's training log: every step to losses.jsonl, every `every` steps to TensorBoard (+ steps/s)."""

    def __init__(self, out_dir: str, accelerator, every: int):
        self.file = open(os.path.join(out_dir, "losses.jsonl"), "a")
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


def read_loss_log(run_directory: str) -> dict:
    """{step: record} from a run's losses.jsonl, keeping a step's last record (a resumed run logs re-done steps again)."""
    path = os.path.join(run_directory, "losses.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"no losses.jsonl in {run_directory}")
    records = {}
    with open(path) as f:
        for line in f:
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

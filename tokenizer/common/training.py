"""The pieces both training loops are built from (tokenizer.train and dit.train), each taking plain values.

Exact resume rests on three rules (docs/ARCHITECTURE.md §7): all randomness of a step comes from
`step_generator(seed, step, rank)`; the data order of an epoch comes from (seed, epoch) through `EpochSampler`,
so `epoch_batches` can restart mid-epoch at any step; and `checkpoints/last` holds the model, EMA, optimiser(s)
and the global RNG states (`save_checkpoint` / `resume`).

Nothing is lost to a kill because `checkpoints/last`, the resume point, is written last: everything a step
promises (best/, evaluation results, sample grids) exists before last moves past that step, so a kill anywhere
makes the re-run do that step again, and a re-run of a finished run makes what is missing
(`complete_finished_run`).
"""

import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Sampler

from tokenizer.common.checkpoint import load_training_state, resolve_state_dir, save_training_state
from tokenizer.common.errors import CheckpointMismatchError, UserError, one_line
from tokenizer.common.runs import lock_run, record_start, run_dir
from tokenizer.common.tracking import make_trackers

OPTIMIZERS = ("radam_schedulefree", "adamw")


def enable_tf32() -> None:
    """On CUDA, TF32 for the fp32 matmuls and convolutions left outside autocast (Ampere and newer); CPU unchanged."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def launched_processes() -> int:
    """How many processes the launcher started for this job (accelerate launch / torchrun set LOCAL_RANK and
    WORLD_SIZE in each)."""
    if "LOCAL_RANK" not in os.environ:
        return 1
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def make_accelerator(mixed_precision: str = "no", grad_accumulate: int = 1, log_dir: str | None = None,
                     log_with: str = "tensorboard", project: str = "ssdd", run_name: str | None = None):
    """An accelerate Accelerator; mixed precision only on GPU (CPU autocast is far slower); with a log_dir, the
    trackers of `log_with` (tensorboard | wandb | all, tokenizer.common.tracking) logging there.

    Several processes launched on a machine without GPUs form one CPU job (gloo), as with ACCELERATE_USE_CPU=true:
    without it accelerate would start each as a job of its own, all writing the same run.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    kw = {}
    if log_dir is not None:
        kw = dict(log_with=make_trackers(log_with, log_dir, project, run_name),
                  project_config=ProjectConfiguration(project_dir=log_dir, logging_dir=log_dir))
    if launched_processes() > 1 and not torch.cuda.is_available():
        kw["cpu"] = True
    mp = mixed_precision if torch.cuda.is_available() else "no"
    enable_tf32()
    accelerator = Accelerator(mixed_precision=mp, gradient_accumulation_steps=grad_accumulate, **kw)
    if accelerator.num_processes < launched_processes():
        raise UserError(f"{launched_processes()} processes were launched but they do not form one job (each would "
                        f"work alone on {accelerator.device}); on a machine without GPUs set ACCELERATE_USE_CPU=true")
    return accelerator


def start_run(cfg, mixed_precision: str = "no", grad_accumulate: int = 1, project: str = "ssdd"):
    """(accelerator, run directory) of `cfg.run_name` under `cfg.ckpt_dir`: print the config and the process layout,
    and create the directory. The accelerator logs there with `cfg.log_with`'s trackers. Nothing of an existing run
    is changed yet: `resume_run` makes this job the run's one writer and writes config.yaml once it knows the run
    can go on."""
    out_dir = run_dir(cfg.ckpt_dir, cfg.run_name)
    accelerator = make_accelerator(mixed_precision, grad_accumulate, log_dir=out_dir,
                                   log_with=cfg.get("log_with", "tensorboard"), project=project, run_name=cfg.run_name)
    if accelerator.is_main_process:
        print(OmegaConf.to_yaml(cfg))
        print(f"{accelerator.num_processes} process(es) on {accelerator.device}, "
              f"mixed precision: {accelerator.mixed_precision}")
        os.makedirs(out_dir, exist_ok=True)
    return accelerator, out_dir


def claim_run(accelerator, out_dir: str) -> None:
    """Make this job the one writer of the run in `out_dir` (`tokenizer.common.runs.lock_run`): the main process
    takes the lock and the other ranks trust it; when it cannot, every rank stops with its one-line reason."""
    refusal = None
    if accelerator.is_main_process:
        try:
            lock_run(out_dir)
        except UserError as e:
            refusal = str(e)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal])[0]
    if refusal:
        raise UserError(refusal)


def build_optimizer(named_params, name: str, lr: float, weight_decay: float):
    """Weight decay on Linear/Conv/Norm weights only, not on biases or relative-position tables (ARCHITECTURE §7)."""
    decay = [p for n, p in named_params if n.endswith("weight")]
    no_decay = [p for n, p in named_params if not n.endswith("weight")]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "radam_schedulefree":
        import schedulefree

        return schedulefree.RAdamScheduleFree(groups, lr=lr)
    if name == "adamw":  # the fused CUDA kernel where every parameter is on a GPU; CPU keeps the default
        return torch.optim.AdamW(groups, lr=lr, fused=all(p.is_cuda for _, p in named_params) or None)
    raise UserError(f"unknown training.optimizer '{name}' (choose {' or '.join(OPTIMIZERS)})")


def step_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    """All randomness of one training step (timesteps, noise, posterior sample, label dropout): (seed, step, rank)."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step * 1_009 + rank)


@dataclass
class StepPlan:
    """How a run walks through its data: per-process batch, optimiser steps per epoch, steps in all."""

    per_rank_batch: int
    steps_per_epoch: int
    total_steps: int


def plan_steps(num_items: int, batch_size: int, world: int, epochs: int, max_steps: int | None,
               what: str = "the training split", batch_key: str = "dataset.batch_size") -> StepPlan:
    """Check the batch against the data and the processes, and count the steps (max_steps wins over epochs)."""
    if batch_size % world:
        raise UserError(f"{batch_key}={batch_size} must be divisible by the {world} processes")
    per_rank = batch_size // world
    steps_per_epoch = (num_items // world) // per_rank  # EpochSampler drops the tail, DataLoader drop_last=True
    if steps_per_epoch == 0:
        raise UserError(f"{what} ({num_items} items) is smaller than one batch ({batch_size})")
    total = max_steps if max_steps is not None else epochs * steps_per_epoch
    return StepPlan(per_rank, steps_per_epoch, total)


class EpochSampler(Sampler):
    """Deterministic per-epoch shuffle sharded across ranks, with exact mid-epoch resume.

    Order for an epoch = `torch.randperm(n, generator seeded with seed + epoch)` (the DistributedSampler
    convention), truncated to a multiple of `num_replicas` (tail dropped, so every rank gets the same count);
    rank r takes positions r, r + num_replicas, ... . `start_index` skips that many items of this rank's shard
    (e.g. samples already consumed this epoch / num_replicas); `set_epoch(epoch)` resets it to 0 unless given.
    With `with_epoch=True` the sampler yields `(index, epoch)` pairs, which the datasets here accept, so per-item
    augmentation follows the sampler's epoch even in persistent workers.
    """

    def __init__(self, data_source: Sequence | int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, start_index: int = 0, with_epoch: bool = False):
        self.n = int(data_source) if isinstance(data_source, int) else len(data_source)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise UserError(f"invalid rank {rank} for num_replicas {num_replicas}")
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.seed, self.shuffle, self.with_epoch = int(seed), bool(shuffle), bool(with_epoch)
        self.epoch = 0
        self.start_index = int(start_index)
        self.num_samples = self.n // self.num_replicas  # per rank, before skipping
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        self.epoch = int(epoch)
        self.start_index = int(start_index)

    def shard(self) -> list[int]:
        """This rank's full index list for the current epoch (ignoring start_index)."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        return order[: self.total_size][self.rank:: self.num_replicas].tolist()

    def __iter__(self) -> Iterator:
        indices = self.shard()[max(self.start_index, 0):]
        if self.with_epoch:
            return iter([(i, self.epoch) for i in indices])
        return iter(indices)

    def __len__(self) -> int:
        return max(self.num_samples - max(self.start_index, 0), 0)


def train_loader(dataset, batch_size: int, world: int, rank: int, seed: int, num_workers: int):
    """(loader, sampler): each rank reads its shard of a (seed, epoch)-shuffled order (drop_last batches)."""
    sampler = EpochSampler(len(dataset), num_replicas=world, rank=rank, seed=seed, shuffle=True)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        drop_last=True, pin_memory=torch.cuda.is_available())
    return loader, sampler


def epoch_batches(loader, sampler, dataset, plan: StepPlan, start_step: int):
    """The loader's batches from `start_step` on, epoch after epoch, resuming mid-epoch exactly.

    `dataset.set_epoch(e)`, where the dataset has it, makes per-item augmentation a function of (seed, epoch, index).
    """
    epoch, k = divmod(start_step, plan.steps_per_epoch)
    while True:
        sampler.set_epoch(epoch, start_index=k * plan.per_rank_batch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        yield from loader
        epoch, k = epoch + 1, 0


def check_finite(total: torch.Tensor, step: int, losses: dict | None = None) -> None:
    """Stop before a non-finite loss reaches the weights or a checkpoint (checkpoints/last stays the last good state).

    `losses` (name -> tensor), shown in the message, are only read when the check fails.
    """
    if not torch.isfinite(total):
        detail = f" ({ {k: float(v.detach()) for k, v in losses.items()} })" if losses else ""
        raise UserError(f"non-finite loss ({float(total)}) at step {step}{detail}; lower training.lr or set "
                        f"training.grad_clip; checkpoints/last holds the last good state")


def resume(directory: str, modules: dict, optimizers) -> dict | None:
    """Load the training state in `directory` (e.g. checkpoints/last) into modules and optimisers; None if none."""
    if resolve_state_dir(directory) is None:
        return None
    return load_training_state(directory, modules, optimizers)


def resume_run(accelerator, cfg, out_dir: str, modules: dict, optimizers) -> dict | None:
    """Resume the run in `out_dir` from checkpoints/last (None for a new run), then record this start.

    A state that does not fit this config (another architecture or optimiser) is refused before anything of the
    run is changed; only then does this job become the run's one writer (`claim_run`: a second job stops here,
    also without changing anything) and the main process tidy what killed processes left and write config.yaml
    (`tokenizer.common.runs.record_start`).
    """

    try:
        state = resume(os.path.join(out_dir, "checkpoints", "last"), modules, optimizers)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"run {out_dir} holds a training state of another model or optimiser than this "
                                      f"config (nothing was changed; use another run_name): {one_line(e)}") from None
    claim_run(accelerator, out_dir)
    if accelerator.is_main_process:
        record_start(cfg, out_dir)
        if state is not None:
            print(f"resumed {out_dir} at step {state['step']}")
    return state


def save_checkpoint(accelerator, directories: list, modules: dict, optimizers, state: dict, metadata: dict) -> None:
    """Write a training state into each directory from the main process, after every process finished the step.

    Every process must call it (it synchronises once), also those that do not know all the directories: only
    the main process's list is used (it alone decides whether a new best/ is due). `last` is written after the
    others (the module docstring says why).
    """
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for directory in sorted(directories, key=lambda d: os.path.basename(os.path.normpath(d)) == "last"):
            save_training_state(directory, modules, optimizers, state, metadata)


def complete_finished_run(accelerator, out_dir: str, step: int, artefacts: dict, make) -> None:
    """A re-run of a run whose checkpoints/last is at its final step: `make()` (on every process) when one of the
    final `artefacts` ({description: present?}) is missing, because a kill or an older version left it out."""
    missing = [what for what, present in artefacts.items() if not present]
    if accelerator.is_main_process:
        if missing:
            print(f"{out_dir} finished training at step {step}; completing what the last run left out: "
                  f"{', '.join(missing)}")
        else:
            print(f"{out_dir} finished training at step {step}; all its outputs are present, nothing to do")
    if missing:
        make()

"""The checks of configs/dit.yaml (used by dit.cache and dit.train before any work): every knob's type and range,
in the table format of tokenizer.validation."""

import os

from omegaconf import OmegaConf

from dit.flow import METHODS
from dit.models import DiT_models
from tokenizer.errors import UserError
from tokenizer.flow import T_KINDS
from tokenizer.runs import resolve_checkpoint
from tokenizer.training import OPTIMIZERS
from tokenizer.validation import (MAX_STEPS, ConfigChecks, Rule, boolean, check_output_dir, choice, existing_file,
                                  in_range, int_list, integer, number, optional, relative_name, text, unit_interval_pair)

CACHE_DTYPES = ("float32", "float16", "bfloat16")


def _places_exist(cfg) -> None:
    check_output_dir(cfg.ckpt_dir, "ckpt_dir")
    if cfg.cache.dir:
        check_output_dir(cfg.cache.dir, "cache.dir")
    if cfg.dataset.name == "imagefolder" and not os.path.isdir(str(cfg.dataset.root)):
        raise UserError(f"dataset.root={cfg.dataset.root} is not a folder (dataset.name=imagefolder reads "
                        f"<root>/<split>/<class>/*)")
    if OmegaConf.select(cfg, "tokenizer.checkpoint"):
        resolve_checkpoint(cfg.ckpt_dir, str(cfg.tokenizer.checkpoint))


DIT_CHECKS = ConfigChecks(rules={
    "seed": integer(0, 2**63 - 1),
    "ckpt_dir": text,
    "run_name": optional(relative_name),
    "tokenizer.checkpoint": optional(text),
    "tokenizer.z_stats": optional(existing_file),
    "dataset.name": choice("imagefolder", "fmnist"),
    "dataset.root": optional(text),
    "dataset.split": text,
    "dataset.im_size": integer(8, 8192, multiple_of=8),
    "dataset.limit": optional(integer(1)),
    "dataset.num_workers": integer(0, 1024),
    "cache.dir": optional(text),
    "cache.flip": boolean,
    "cache.batch_size": integer(1),
    "cache.shard_size": integer(1),
    "cache.dtype": choice(*CACHE_DTYPES),
    "model.name": choice(*DiT_models),
    "model.learn_sigma": boolean,
    "model.class_dropout_prob": number(0, 1),
    "model.qk_norm": boolean,
    "flow.t_kind": choice(*T_KINDS),
    "flow.t_mean": number(),
    "flow.t_std": number(above=0),
    "flow.t_shift": number(above=0),
    "training.optimizer": choice(*OPTIMIZERS),
    "training.lr": number(above=0),
    "training.weight_decay": number(lo=0),
    "training.batch_size": integer(1),
    "training.mixed_precision": choice("no", "fp16", "bf16"),
    "training.compile": boolean,
    "training.grad_accumulate": Rule("1: dit.train counts one batch per optimiser step (its data order and step "
                                     "generator rely on it); use more processes or a larger batch",
                                     integer(1, 1).convert),
    "training.grad_clip": optional(number(lo=0)),
    "training.epochs": integer(1),
    "training.max_steps": optional(integer(1)),
    "training.ema.decay": number(0, 1),
    "training.ema.start_iter": integer(0),
    "training.ckpt_every": integer(1),
    "training.log_freq": integer(1),
    "training.sample_every": integer(1),
    "sample.method": choice(*METHODS),
    "sample.steps": integer(1, MAX_STEPS),
    "sample.cfg_scale": number(0, 100),
    "sample.guidance_interval": unit_interval_pair,
    "sample.time_shift": number(above=0),
    "sample.decoder_steps": optional(integer(1, MAX_STEPS)),
    "sample.grid_classes": optional(int_list),
    "sample.per_class": integer(1, 256),
}, cross=(_places_exist,))


def check_sampling_args(cfg_scale=None, steps=None, decoder_steps=None, seed=None) -> None:
    """The sampling arguments the generation scripts share (--cfg, --steps, --decoder-steps, --seed), checked before
    anything is loaded; None means the bundle's default and passes."""
    if cfg_scale is not None:
        in_range("--cfg", cfg_scale, 0, 100, why="the guidance scale; DiT uses 1.5 for FID and 4 for pictures")
    for name, value in (("--steps", steps), ("--decoder-steps", decoder_steps)):
        if value is not None:
            in_range(name, value, 1, MAX_STEPS, why=f"more than {MAX_STEPS} sampler steps only costs time")
    if seed is not None:
        in_range("--seed", seed, 0, 2**63 - 1)

"""Values checked at the boundary, before any work starts: every config knob (one declarative table per config
file) and the scripts' command-line arguments, with limits that protect the machine.

    cfg = check_config(load_config("ssdd.yaml", argv), SSDD_CHECKS)   # a UserError names the first bad key

A table maps each dotted key of a config file to a rule (`integer(1)`, `number(above=0)`, `choice(...)`,
`boolean`, `optional(...)`, ...) and lists cross-checks between keys; a test checks that it covers every key of
its file. The keys both trainers share have their rules here once (`SHARED_RULES`, `trainer_checks`); each
trainer adds its own (`tokenizer.config_checks.SSDD_CHECKS`, `dit.config_checks.DIT_CHECKS`).

The sampling arguments of every generation entry point (generate.py, sample_ddp.py, dit.export, the app) obey one
set of limits, `SAMPLING_LIMITS`, checked by `check_sampling_args`. The scripts use `in_range` and
`check_output_dir` for their other arguments (devices and memory: tokenizer.common.devices).
"""

import math
import os
from dataclasses import dataclass
from typing import Callable

from omegaconf import OmegaConf

from tokenizer.common.errors import UserError
from tokenizer.common.runs import resolve_checkpoint
from tokenizer.common.tracking import TRACKERS
from tokenizer.common.training import OPTIMIZERS

# ----------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """What a valid value looks like (`expected`, for the message) and `convert(value)` -> the checked value,
    raising ValueError or TypeError when the value is not valid. A choice among names says 'unknown'."""

    expected: str
    convert: Callable
    names: bool = False

    def check(self, key: str, value):
        try:
            return self.convert(value)
        except (ValueError, TypeError):
            if self.names:
                raise UserError(f"unknown {key} {show(value)}: choose {self.expected}") from None
            raise UserError(f"{key}={show(value)} is not valid: expected {self.expected}") from None


def show(value) -> str:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        # str() of a huge int is slow, and Python refuses it past 4,300 digits
        return f"an integer of {len(hex(value)) - 2} hex digits"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:80] + "..."


def _bounds(lo, hi, above=None) -> str:
    parts = ([f"> {above:g}"] if above is not None else []) + ([f">= {lo:g}"] if lo is not None else [])
    parts += [f"<= {hi:g}"] if hi is not None else []
    return " " + " and ".join(parts) if parts else ""


def _within(v, lo, hi, above=None):
    if (lo is not None and v < lo) or (hi is not None and v > hi) or (above is not None and not v > above):
        raise ValueError(v)
    return v


def integer(lo=None, hi=None, multiple_of=None) -> Rule:
    def convert(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer():
            raise ValueError(v)
        v = _within(int(v), lo, hi)
        if multiple_of and v % multiple_of:
            raise ValueError(v)
        return v

    return Rule("an integer" + _bounds(lo, hi) + (f", a multiple of {multiple_of}" if multiple_of else ""), convert)


def number(lo=None, hi=None, above=None) -> Rule:
    def convert(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(v)
        return _within(v, lo, hi, above)

    return Rule("a finite number" + _bounds(lo, hi, above), convert)


def choice(*options) -> Rule:
    def convert(v):
        if v not in options:
            raise ValueError(v)
        return v

    return Rule("one of " + ", ".join(map(str, options)), convert, names=True)


def _boolean(v):
    if not isinstance(v, bool):
        raise ValueError(v)
    return v


def _text(v):
    if isinstance(v, bool) or not isinstance(v, (str, int)) or not str(v).strip():
        raise ValueError(v)
    return str(v)


def _existing_file(v):
    v = _text(v)
    if not os.path.isfile(v):
        raise ValueError(v)
    return v


def _relative_name(v):
    v = _text(v)
    if os.path.isabs(v) or ".." in v.split("/"):
        raise ValueError(v)
    return v


def optional(rule: Rule) -> Rule:
    return Rule(rule.expected + " or null", lambda v: None if v is None else rule.convert(v), rule.names)


def _unit_interval_pair(v):
    v = OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise ValueError(v)
    lo, hi = (number(0, 1).convert(x) for x in v)
    if lo > hi:
        raise ValueError(v)
    return [lo, hi]


def _int_list(v):
    v = OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
    if not isinstance(v, (list, tuple)) or not v:
        raise ValueError(v)
    return [integer(0).convert(x) for x in v]


boolean = Rule("true or false", _boolean)
text = Rule("a non-empty string", _text)
existing_file = Rule("an existing file", _existing_file)
relative_name = Rule("a relative name without '..' (e.g. my_run or 2026-01-01/run)", _relative_name)
unit_interval_pair = Rule("[lo, hi] with 0 <= lo <= hi <= 1", _unit_interval_pair)
int_list = Rule("a non-empty list of integers >= 0", _int_list)


@dataclass(frozen=True)
class ConfigChecks:
    """The rules of one config file: {dotted key: Rule}, then cross-checks `check(cfg)` between keys."""

    rules: dict
    cross: tuple = ()


def check_config(cfg, checks: ConfigChecks):
    """Check every value of `cfg` against `checks` (values are normalised in place, e.g. 1000.0 -> 1000); returns
    cfg. The first bad value is a UserError that names its key."""
    for key, rule in checks.rules.items():
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        checked = rule.check(key, value)
        if type(checked) is not type(value) and not OmegaConf.is_config(value):
            OmegaConf.update(cfg, key, checked, merge=False)
    for cross in checks.cross:
        cross(cfg)
    return cfg


# ----------------------------------------------------------------------------- the keys both trainers share


SHARED_RULES = {
    "seed": integer(0, 2**63 - 1),
    "ckpt_dir": text,
    "run_name": optional(relative_name),
    "log_with": choice(*TRACKERS),  # wandb's presence is checked when the trackers start (tracking.make_trackers)
    "dataset.name": choice("imagefolder", "fmnist"),
    "dataset.root": optional(text),
    "dataset.limit": optional(integer(1)),
    "dataset.num_workers": integer(0, 1024),
    "training.optimizer": choice(*OPTIMIZERS),
    "training.lr": number(above=0),
    "training.weight_decay": number(lo=0),
    "training.mixed_precision": choice("no", "fp16", "bf16"),
    "training.grad_clip": optional(number(lo=0)),
    "training.epochs": integer(1),
    "training.max_steps": optional(integer(1)),
    "training.ckpt_every": integer(1),
    "training.log_freq": integer(1),
    "training.sample_every": integer(1),
}


def trainer_checks(own_rules: dict, checkpoint_keys: tuple = (), folder_keys: tuple = (), cross: tuple = ()):
    """The checks of one trainer's config: `SHARED_RULES` plus `own_rules` (which may tighten a shared key), then
    `places_exist` for its checkpoint and output-folder keys, then its own cross-checks."""
    def places(cfg):
        places_exist(cfg, checkpoint_keys, folder_keys)

    return ConfigChecks(rules={**SHARED_RULES, **own_rules}, cross=(*cross, places))


def places_exist(cfg, checkpoint_keys: tuple = (), folder_keys: tuple = ()) -> None:
    """ckpt_dir and every set `folder_keys` can be written; an image-folder root exists; every set
    `checkpoint_keys` names a file or a run with saved weights."""
    check_output_dir(cfg.ckpt_dir, "ckpt_dir")
    for key in folder_keys:
        if OmegaConf.select(cfg, key):
            check_output_dir(str(OmegaConf.select(cfg, key)), key)
    if cfg.dataset.name == "imagefolder" and not os.path.isdir(str(cfg.dataset.root)):
        raise UserError(f"dataset.root={cfg.dataset.root} is not a folder (dataset.name=imagefolder reads "
                        f"<root>/<split>/<class>/*)")
    for key in checkpoint_keys:
        spec = OmegaConf.select(cfg, key)
        if spec:
            resolve_checkpoint(cfg.ckpt_dir, str(spec))


# ----------------------------------------------------------------------------- sampling limits

MAX_STEPS = 1000  # sampler steps (DiT or decoder): DiT's whole chain is 1000 steps; DiT and SiT sample with 250
SAMPLING_LIMITS = {
    "steps": (1, MAX_STEPS),          # DiT/SiT sampler steps
    "decoder_steps": (1, MAX_STEPS),  # SSDD decoder steps (the paper: 1 distilled, 8 for the teacher)
    "cfg_scale": (0.0, 20.0),         # guidance scale; DiT uses 1.5 for FID and 4 for pictures, 1 = no guidance
    "seed": (0, 2**32 - 1),           # numpy's and a browser's exact integer range both hold it
}
_LIMIT_WHY = {"steps": f"more than {MAX_STEPS} sampler steps only costs time",
              "decoder_steps": f"more than {MAX_STEPS} sampler steps only costs time",
              "cfg_scale": "the guidance scale; DiT uses 1.5 for FID and 4 for pictures", "seed": ""}


def check_sampling_args(cfg_scale=None, steps=None, decoder_steps=None, seed=None, names: dict | None = None):
    """The sampling arguments every generation entry point shares, checked against `SAMPLING_LIMITS` before
    anything is loaded; None means the model's default and passes. `names` maps an argument to the name the user
    typed (default: the CLI flags --cfg, --steps, --decoder-steps, --seed)."""
    names = {"cfg_scale": "--cfg", "steps": "--steps", "decoder_steps": "--decoder-steps", "seed": "--seed",
             **(names or {})}
    values = {"cfg_scale": cfg_scale, "steps": steps, "decoder_steps": decoder_steps, "seed": seed}
    for key, value in values.items():
        if value is None:
            continue
        lo, hi = SAMPLING_LIMITS[key]
        in_range(names[key], value, lo, hi, why=_LIMIT_WHY[key])
        if key != "cfg_scale":
            whole_number(names[key], value, lo, hi)


# ----------------------------------------------------------------------------- places and arguments


def check_output_dir(path: str, what: str) -> None:
    """`path` is a folder this process can write into, or can be created: its nearest existing ancestor must be a
    writable folder (a full disk is only found when writing; writers say so in one line)."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise UserError(f"{what}={path} cannot be a folder: {p} is a file")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{what}={path}: no permission to write in {p}")


def whole_number(what: str, value, lo: int, hi: int) -> int:
    """`value` as an int if it is a whole number (an int, or a float such as 3.0) in lo..hi; else a UserError."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise UserError(f"{what} must be a whole number in {lo}..{hi}, got {show(value)}"[:300])
    return value


def real_number(what: str, value, lo: float, hi: float) -> float:
    """`value` as a float if it is a finite number in [lo, hi] (NaN fails the comparison); else a UserError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise UserError(f"{what} must be a number in {lo:g}..{hi:g}, got {show(value)}"[:300])
    return float(value)


def in_range(name: str, value, lo=None, hi=None, why: str = ""):
    """`value` if it is a finite number within [lo, hi]; else a UserError (`why` says where a limit comes from)."""
    finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not finite or (lo is not None and value < lo) or (hi is not None and value > hi):
        limits = "a finite number" + _bounds(lo, hi)
        raise UserError(f"{name} {show(value)} is not valid: expected {limits}" + (f" ({why})" if why else ""))
    return value



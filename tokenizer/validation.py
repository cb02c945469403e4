"""Values checked at the boundary, before any work starts: every config knob (one declarative table per config
file) and the scripts' command-line arguments, with limits that protect the machine.

    cfg = check_config(load_config("ssdd.yaml", argv), SSDD_CHECKS)   # a UserError names the first bad key

A table maps each dotted key of a config file to a rule (`integer(1)`, `number(above=0)`, `choice(...)`,
`boolean`, `optional(...)`, ...) and lists cross-checks between keys; a test checks that it covers every key of
its file. The scripts use `in_range`, `check_device`, `check_output_dir` and `check_memory` for their arguments:
a request that would need more memory than the machine has is refused up front with the numbers.
"""

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
from omegaconf import OmegaConf

from tokenizer.decoder import ATTENTION_MODES, DECODER_SIZES
from tokenizer.encoder import parse_encoder_name
from tokenizer.errors import UserError, one_line
from tokenizer.training import OPTIMIZERS

MAX_STEPS = 1000  # sampler steps (DiT or decoder): DiT and SiT use 250; more only costs time
MEMORY_SHARE = 0.8  # of the memory available now that one request may plan to use


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
    return repr(value) if isinstance(value, str) else str(value)


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


# ----------------------------------------------------------------------------- places and devices


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


def check_device(spec: str | None) -> str:
    """A device that exists on this machine (default: cuda if available, else cpu); else a UserError listing what does."""
    if spec is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--device {spec!r} is not a device name (cpu, cuda, cuda:1, mps): {one_line(e)}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {spec}: this machine has no CUDA device; use --device cpu")
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {spec}: this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {spec}: MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise UserError(f"--device {spec}: choose cpu, cuda[:N] or mps")
    return str(device)


def in_range(name: str, value, lo=None, hi=None, why: str = ""):
    """`value` if it is a finite number within [lo, hi]; else a UserError (`why` says where a limit comes from)."""
    finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not finite or (lo is not None and value < lo) or (hi is not None and value > hi):
        limits = "a finite number" + _bounds(lo, hi)
        raise UserError(f"{name} {show(value)} is not valid: expected {limits}" + (f" ({why})" if why else ""))
    return value


# ----------------------------------------------------------------------------- memory


def available_memory(device="cpu") -> int | None:
    """Bytes that can be allocated now on `device` (CUDA: free device memory; CPU: MemAvailable); None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.0f} MiB"


def check_memory(need: float, what: str, device="cpu", advice: str = "") -> None:
    """Refuse up front a request whose estimated peak memory `need` (bytes) exceeds MEMORY_SHARE of what `device`
    has available now, with both numbers in the message."""
    have = available_memory(device)
    if have is not None and need > MEMORY_SHARE * have:
        raise UserError(f"{what} would need about {gib(need)} of memory, but {torch.device(device).type} memory "
                        f"available now is {gib(have)}" + (f"; {advice}" if advice else ""))


# ----------------------------------------------------------------------------- the tokenizer's config


def _image_size_fits_encoder(cfg) -> None:
    factor = max(parse_encoder_name(cfg.ssdd.encoder)[0], 8)  # the decoder's U-Net halves the image 3 times
    if cfg.dataset.im_size % factor:
        raise UserError(f"dataset.im_size={cfg.dataset.im_size} must be a multiple of {factor} for encoder "
                        f"{cfg.ssdd.encoder} and the decoder")


def _places_exist(cfg) -> None:
    from tokenizer.runs import resolve_checkpoint

    check_output_dir(cfg.ckpt_dir, "ckpt_dir")
    if cfg.dataset.name == "imagefolder" and not os.path.isdir(str(cfg.dataset.root)):
        raise UserError(f"dataset.root={cfg.dataset.root} is not a folder (dataset.name=imagefolder reads "
                        f"<root>/<split>/<class>/*)")
    for key in ("ssdd.checkpoint", "ssdd.encoder_checkpoint"):
        spec = OmegaConf.select(cfg, key)
        if spec:
            resolve_checkpoint(cfg.ckpt_dir, str(spec))


def _encoder_name(v):
    try:
        parse_encoder_name(_text(v))
    except UserError:
        raise ValueError(v) from None
    return v


SSDD_CHECKS = ConfigChecks(rules={
    "seed": integer(0, 2**63 - 1),
    "task": choice("train", "eval", "z_stats"),
    "distill_teacher": boolean,
    "ckpt_dir": text,
    "run_name": optional(relative_name),
    "dataset.name": choice("imagefolder", "fmnist"),
    "dataset.root": optional(text),
    "dataset.im_size": integer(8, 8192),
    "dataset.batch_size": integer(1),
    "dataset.aug_scale": optional(number(lo=1)),
    "dataset.limit": optional(integer(1)),
    "dataset.num_workers": integer(0, 1024),
    "ssdd.compile": boolean,
    "ssdd.channels_last": boolean,
    "ssdd.attention": choice(*ATTENTION_MODES),
    "ssdd.checkpoint": optional(text),
    "ssdd.encoder": Rule("an encoder name f<F>c<C>, F in {4, 8, 16, 32} (e.g. f8c4)", _encoder_name),
    "ssdd.encoder_base_channels": integer(32, multiple_of=32),  # GroupNorm(32) needs multiples of 32
    "ssdd.encoder_checkpoint": optional(text),
    "ssdd.encoder_train": boolean,
    "ssdd.decoder": choice(*DECODER_SIZES, "kl"),
    "ssdd.kl_base_channels": integer(32, multiple_of=32),
    "ssdd.fm_trainer.t_sampler_args.t_mean": number(),
    "ssdd.fm_trainer.t_sampler_args.t_std": number(above=0),
    "ssdd.fm_sampler.steps": integer(1, MAX_STEPS),
    "ssdd.fm_sampler.t_pow_shift": number(above=0),
    "ssdd.ema.decay": number(0, 1),
    "ssdd.ema.start_iter": integer(0),
    "aux_losses.repa.i_extract": integer(0),
    "aux_losses.repa.n_layers": integer(1),
    "aux_losses.repa.dino_weights": optional(existing_file),
    "aux_losses.lpips_weights": optional(existing_file),
    **{f"losses.{name}": number(lo=0) for name in ("diffusion", "lpips", "repa", "kl", "l1", "gan")},
    "training.optimizer": choice(*OPTIMIZERS),
    "training.lr": number(above=0),
    "training.weight_decay": number(lo=0),
    "training.mixed_precision": choice("no", "fp16", "bf16"),
    "training.grad_accumulate": integer(1),
    "training.grad_clip": optional(number(lo=0)),
    "training.gan_start_step": integer(0),
    "training.epochs": integer(1),
    "training.max_steps": optional(integer(1)),
    "training.eval_freq": integer(1),
    "training.eval_images": optional(integer(1)),
    "training.save_on_best": choice("psnr", "ssim", "lpips", "rfid", "mse", "mae"),
    "training.ckpt_every": integer(1),
    "training.log_freq": integer(1),
    "training.sample_every": integer(1),
    "eval.split": text,
    "eval.steps": optional(integer(1, MAX_STEPS)),
    "eval.lpips": boolean,
    "eval.lpips_weights": optional(existing_file),
    "eval.fid": boolean,
    "eval.inception_weights": optional(existing_file),
    "eval.batch_size": integer(1),
    "show_samples": integer(1, 256),
}, cross=(_image_size_fits_encoder, _places_exist))

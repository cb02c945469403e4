"""Classifier-free guidance: the one guided forward that the three sampler families run (docs/ARCHITECTURE.md §8).

    out = out_u + s (out_c - out_u)        out_c: the model's output for the class y, out_u: for the null class

The conditional and unconditional passes run as one batch of 2B. Each family decides when to guide (its
`guidance_interval`, in its own time) and which channels (`cfg_channels`): this project's flow models guide all
latent channels by default; DiT's and SiT's released samplers guide the first 3 of the 4 latent channels and take
the 4th, and DiT's learned-variance channels, from the conditional pass.

`model_fn(x (B, C, H, W), t (B,) float32, y (B,) long)` returns (B, C_out, H, W) with C_out >= C (a DiT with
learn_sigma returns 2C channels).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from tokenizer.common.errors import UserError

__all__ = ["cfg_combine", "guided_output", "guided_velocity"]

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def cfg_combine(out_c: torch.Tensor, out_u: torch.Tensor, cfg_scale: float,
                channels: Optional[int] = None) -> torch.Tensor:
    """Classifier-free guidance out_u + s (out_c - out_u) on ALL channels (channels=None), or on the first
    `channels` only with the rest taken from the conditional output (DiT's and SiT's released samplers guide the
    first 3 of 4 latent channels; docs/ARCHITECTURE.md §8)."""
    if channels is None:
        return out_u + cfg_scale * (out_c - out_u)
    guided = out_u[:, :channels] + cfg_scale * (out_c[:, :channels] - out_u[:, :channels])
    return torch.cat([guided, out_c[:, channels:]], dim=1)


def guided_output(model_fn: ModelFn, x: torch.Tensor, time: float, y: torch.Tensor, cfg_scale: float,
                  cfg_channels: Optional[int], null_class: Optional[int], guide: bool = True) -> torch.Tensor:
    """The model's output (B, C_out, H, W) at one scalar model time, in x's dtype, guided when `guide` is true and
    cfg_scale != 1 (else one conditional forward of B rows).

    Guided: the first `cfg_channels` channels (None: all C latent channels) are out_u + s (out_c - out_u); the
    other channels (the rest of the latent channels, the learned variance) come from the conditional pass.
    `time` is what the model is fed: this project's t, DiT's step index, SiT's s.
    """
    if not guide or cfg_scale == 1.0:
        return model_fn(x, _times(time, x), y).to(x.dtype)
    if null_class is None:
        raise UserError("classifier-free guidance (cfg_scale != 1) needs a null class; "
                        "the model has none (trained with class_dropout_prob=0?)")
    x2 = torch.cat([x, x])
    out = model_fn(x2, _times(time, x2), torch.cat([y, torch.full_like(y, null_class)])).to(x.dtype)
    out_c, out_u = out.chunk(2)
    c = x.shape[1]
    channels = c if cfg_channels is None else min(cfg_channels, c)
    return cfg_combine(out_c, out_u, cfg_scale, None if channels == out.shape[1] else channels)


def guided_velocity(model_fn: ModelFn, x: torch.Tensor, t: float, y: torch.Tensor, cfg_scale: float = 1.0,
                    guidance_interval: Tuple[float, float] = (0.0, 1.0), null_class: Optional[int] = None,
                    cfg_channels: Optional[int] = None) -> torch.Tensor:
    """The velocity (B, C, H, W) of a velocity-predicting model (the flow and SiT families) at scalar time t:
    `guided_output`'s first C channels, guided where lo <= t <= hi (guidance_interval, in the model's own time;
    bounds inclusive) and cfg_scale != 1. cfg_channels=None, the default, guides all channels."""
    lo, hi = guidance_interval
    return guided_output(model_fn, x, t, y, cfg_scale, cfg_channels, null_class, guide=lo <= t <= hi)[:, :x.shape[1]]


def _times(time: float, like: torch.Tensor) -> torch.Tensor:
    """The scalar time as the (B,) float32 vector the model takes, on like's device."""
    return torch.full((like.shape[0],), float(time), device=like.device, dtype=torch.float32)

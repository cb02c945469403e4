"""Which samplers each model family has and which function runs them: the one table `Generator`, the scripts and
the app read (docs/ARCHITECTURE.md §8).

    family  models                                      samplers              run by
    flow    this project's DiTs (flow matching)         euler, heun, sde      dit.flow.sample
    dit     the published DiT-XL/2 (discrete diffusion)  ddpm, ddim            dit.diffusion.sample
    sit     the published SiT-XL/2 (SiT's interpolant)   sde, ode, euler, heun dit.sit.sample

Every family's sampler takes the same settings (steps, method, cfg_scale, cfg_channels, guidance_interval, the
per-step noise); `settings` names the ones a family takes beyond them, `options` fixed keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from dit import diffusion, flow, sit

__all__ = ["SamplerFamily", "SAMPLER_FAMILIES", "FAMILY_METHODS", "ALL_METHODS", "run_sampler"]


@dataclass(frozen=True)
class SamplerFamily:
    """One family's sampling convention: its sampler names and the function that runs all of them."""

    methods: tuple
    sample: Callable
    settings: tuple = ()  # sampler settings (keys of Generator.sampler_settings) passed on beyond the common ones
    options: dict = field(default_factory=dict)


SAMPLER_FAMILIES = {
    "flow": SamplerFamily(flow.METHODS, flow.sample, settings=("time_shift",)),
    "dit": SamplerFamily(diffusion.METHODS, diffusion.sample, options={"progress": True}),
    "sit": SamplerFamily(sit.METHODS, sit.sample, options={"progress": True}),
}
FAMILY_METHODS = {name: family.methods for name, family in SAMPLER_FAMILIES.items()}
ALL_METHODS = tuple(dict.fromkeys(m for methods in FAMILY_METHODS.values() for m in methods))


def run_sampler(family: str, model_fn, noise: torch.Tensor, y: torch.Tensor, settings: dict,
                generator: Optional[torch.Generator] = None, step_noise=None, quiet: bool = False) -> torch.Tensor:
    """Sample with `family`'s sampler settings["sampler"] from noise (B, C, H, W) for labels y (B,); settings as
    `Generator.sampler_settings` makes them. step_noise(x), when given, draws the per-step noise of the stochastic
    samplers instead of `generator`. quiet: no sampler's own progress bar (the caller reports progress itself)."""
    spec = SAMPLER_FAMILIES[family]
    options = {**spec.options, **({"progress": False} if quiet and "progress" in spec.options else {})}
    return spec.sample(model_fn, noise, y, steps=settings["steps"], method=settings["sampler"],
                       cfg_scale=settings["cfg_scale"], cfg_channels=settings["cfg_channels"],
                       guidance_interval=settings["guidance_interval"], generator=generator, step_noise=step_noise,
                       **{key: settings[key] for key in spec.settings}, **options)

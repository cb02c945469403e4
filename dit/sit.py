"""SiT's own sampling convention (arXiv 2401.08740; docs/ARCHITECTURE.md §8), for the published SiT weights.

SiT's time runs the other way from this project's (`tokenizer.flow`): with s in [0, 1],

    x_s = s * x + (1 - s) * eps        s = 0 pure noise, s = 1 data
                                       (SiT's linear interpolant, alpha_s = s, sigma_s = 1 - s)
    v   = dx_s/ds = x - eps            the network's velocity; the model is fed s itself (no 1000 factor)

so v is the same quantity as this project's velocity and s = 1 - t. From v, eps_hat = x_s - s v and the score is
grad log p_s(x_s) = (s v - x_s) / ((1 - s)^2 + s (1 - s)) = -eps_hat / (1 - s).

Samplers (`steps` counts time points, as SiT's `--num-sampling-steps`):

  sde    SiT's SDE default: Euler-Maruyama on dx = [v + w(s) score] ds + sqrt(2 w(s)) dW with the diffusion
         form "sigma", w(s) = 1 - s, on `steps` points evenly spaced over [0, 1 - 0.04]; then the "Mean" last
         step x <- x + 0.04 [v + w score] at s = 0.96, without noise. `steps` model evaluations in all.
  ode    SiT's ODE default solver: adaptive Dormand-Prince 5(4) from s = 0 to 1, atol 1e-6, rtol 1e-3, written
         in `dit.solvers.dopri5` (SiT calls torchdiffeq's dopri5): error norm RMS over the whole batch of
         (err / (atol + rtol max(|x|, |x_new|))), step factor 0.9 err^(-1/5) within [0.2, 10], Hairer's initial
         step, last step clipped to land on s = 1 (torchdiffeq instead interpolates to its output times); `steps`
         is ignored.
  euler, heun   fixed steps on `steps` evenly spaced points over [0, 1] (steps - 1 intervals), as torchdiffeq's
         fixed-grid solvers on SiT's grid; heun is the explicit trapezoid rule (2 evaluations per interval;
         `dit.solvers.ode_step`, the flow sampler's step).

Guidance: SiT's released sampler guides the first 3 of the 4 velocity channels (`cfg_channels=3`), the 4th from
the conditional pass; `cfg_channels=None` guides all. `guidance_interval` is given in this project's time
t = 1 - s (t = 1 pure noise), so it means the same for every model family.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from tqdm.auto import tqdm

from dit.guidance import ModelFn, guided_velocity
from dit.noise import step_randn
from dit.solvers import dopri5, ode_step
from tokenizer.common.errors import UserError

__all__ = ["sample", "METHODS", "dopri5"]

METHODS = ("sde", "ode", "euler", "heun")
LAST_STEP_SIZE = 0.04  # SiT's default "Mean" last step
ATOL, RTOL = 1e-6, 1e-3  # SiT's ODE defaults


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, s: float) -> torch.Tensor:
    """grad log p_s(x) of SiT's linear path from a velocity prediction (alpha_s = s, sigma_s = 1 - s)."""
    var = (1 - s) ** 2 + s * (1 - s)  # sigma^2 - (alpha / alpha') sigma' sigma
    return (s * v - x) / var


@torch.no_grad()
def sample(model_fn: ModelFn, noise: torch.Tensor, y: torch.Tensor, steps: int = 250, method: str = "sde",
           cfg_scale: float = 1.0, cfg_channels: Optional[int] = 3, guidance_interval: Tuple[float, float] = (0.0, 1.0),
           null_class: Optional[int] = None, generator: Optional[torch.Generator] = None, atol: float = ATOL,
           rtol: float = RTOL, progress: bool = False, stats: Optional[dict] = None, step_noise=None) -> torch.Tensor:
    """Sample data (s = 1) from noise (s = 0) with a SiT-convention model_fn(x, s (B,) in [0, 1], y).

    The SDE's noise comes from `step_noise(x)` when given (per-sample streams), else `generator`. `stats`, if
    given, receives {"nfe": model evaluations}.
    """
    if method not in METHODS:
        raise UserError(f"unknown sampler {method!r} for a SiT-convention model; valid: {', '.join(METHODS)}")
    if method != "ode" and steps < 2:
        raise UserError(f"SiT's {method} sampler needs at least 2 time points, got steps={steps}")
    if null_class is None:
        null_class = getattr(model_fn, "null_class", None)
    # the interval is given in t = 1 - s
    interval_s = (1.0 - guidance_interval[1], 1.0 - guidance_interval[0])
    nfe = [0]

    def vel(x: torch.Tensor, s: float) -> torch.Tensor:
        nfe[0] += 1
        return guided_velocity(model_fn, x, s, y, cfg_scale, interval_s, null_class, cfg_channels)

    x = noise
    if method == "ode":
        x = dopri5(vel, x, 0.0, 1.0, atol, rtol, progress)
    elif method == "sde":
        grid = torch.linspace(0.0, 1.0 - LAST_STEP_SIZE, steps).tolist()  # float32 points, as SiT's
        dt = grid[1] - grid[0]

        def drift(x, s):
            v = vel(x, s)
            return v + (1 - s) * score_from_velocity(v, x, s)  # diffusion form "sigma": w(s) = 1 - s

        for s in tqdm(grid[:-1], desc="sde", leave=False, disable=not progress):
            z = step_randn(x, generator, step_noise)
            x = x + drift(x, s) * dt + math.sqrt(2 * (1 - s)) * math.sqrt(dt) * z
        x = x + drift(x, grid[-1]) * LAST_STEP_SIZE
    else:
        grid = torch.linspace(0.0, 1.0, steps).tolist()
        for s, s_next in tqdm(list(zip(grid[:-1], grid[1:])), desc=method, leave=False, disable=not progress):
            x = ode_step(vel, x, s, s_next, method)
    if stats is not None:
        stats["nfe"] = nfe[0]
    return x

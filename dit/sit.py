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
  ode    SiT's ODE default solver, as released: torchdiffeq's adaptive dopri5 (`odeint(..., method="dopri5")`)
         from s = 0 to 1 (SiT's interval for a velocity model on its linear path has no end offsets), atol 1e-6,
         rtol 1e-3, so the step control is torchdiffeq's: Hairer's initial step, RMS error norm over the whole
         integrated state, the last step taken past s = 1 (so the model is also fed s > 1, as in SiT) and
         interpolated back. With guidance the state is SiT's doubled batch (see `ode_doubled_velocity`), so the
         error norm covers both halves as SiT's does; times past s = 1 are guided as s = 1 is. SiT asks for
         `--num-sampling-steps` output times on [0, 1]; only the last is kept and the step control does not
         depend on them, so [0, 1] alone gives the same result; `steps` is ignored.
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
from torchdiffeq import odeint
from tqdm.auto import tqdm

from dit.guidance import ModelFn, cfg_combine, guided_velocity
from dit.noise import step_randn
from dit.solvers import ode_step
from tokenizer.common.errors import UserError

__all__ = ["sample", "METHODS", "ode_doubled_velocity"]

METHODS = ("sde", "ode", "euler", "heun")
LAST_STEP_SIZE = 0.04  # SiT's default "Mean" last step
ATOL, RTOL = 1e-6, 1e-3  # SiT's ODE defaults
ODE_MAX_STEPS = 10_000  # a bound on dopri5's steps (torchdiffeq's default is 2^31 - 1); SiT's model needs ~10-30


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, s: float) -> torch.Tensor:
    """grad log p_s(x) of SiT's linear path from a velocity prediction (alpha_s = s, sigma_s = 1 - s)."""
    var = (1 - s) ** 2 + s * (1 - s)  # sigma^2 - (alpha / alpha') sigma' sigma
    return (s * v - x) / var


@torch.no_grad()
def sample(model_fn: ModelFn, noise: torch.Tensor, y: torch.Tensor, steps: int = 250, method: str = "sde",
           cfg_scale: float = 1.0, cfg_channels: Optional[int] = 3, guidance_interval: Tuple[float, float] = (0.0, 1.0),
           null_class: Optional[int] = None, generator: Optional[torch.Generator] = None, atol: float = ATOL,
           rtol: float = RTOL, progress: bool = False, stats: Optional[dict] = None, step_noise=None) -> torch.Tensor:
    """Sample data (s = 1) from noise (s = 0) with a SiT-convention model_fn(x, s (B,) float32, y): s in [0, 1],
    except that the adaptive "ode" also evaluates its last step's stages past s = 1, as SiT's does.

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
        x = _ode(model_fn, noise, y, cfg_scale, cfg_channels, interval_s, null_class, atol, rtol, progress, nfe)
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


def ode_doubled_velocity(model_fn: ModelFn, state: torch.Tensor, s: float, y: torch.Tensor, cfg_scale: float,
                         cfg_channels: Optional[int], guide: bool, null_class: Optional[int]) -> torch.Tensor:
    """The velocity of SiT's guided ODE state (2B, C, H, W), as SiT's released `forward_with_cfg` gives it.

    SiT integrates the batch [x; x] with labels [y; null]; the network sees [x_c; x_c] (the first half twice), the
    guided channels (the first `cfg_channels`; None: all) are the same in both halves, and the rest come from each
    half's own pass: the conditional one in the first half (the sample), the unconditional one in the second. The
    second half is thus never fed to the network but counts in the solver's error norm. Outside the guidance
    interval (`guide` false; SiT has none) one conditional pass of B rows gives both halves.
    """
    b, c = state.shape[0] // 2, state.shape[1]
    x = state[:b]
    if not guide:
        v = guided_velocity(model_fn, x, s, y)
        return torch.cat([v, v])
    if null_class is None:
        raise UserError("classifier-free guidance (cfg_scale != 1) needs a null class; "
                        "the model has none (trained with class_dropout_prob=0?)")
    times = torch.full((2 * b,), float(s), device=x.device, dtype=torch.float32)
    out = model_fn(torch.cat([x, x]), times, torch.cat([y, torch.full_like(y, null_class)]))[:, :c].to(x.dtype)
    out_c, out_u = out.chunk(2)
    k = c if cfg_channels is None else min(cfg_channels, c)
    guided = cfg_combine(out_c[:, :k], out_u[:, :k], cfg_scale)
    return torch.cat([torch.cat([guided, out_c[:, k:]], dim=1), torch.cat([guided, out_u[:, k:]], dim=1)])


def _ode(model_fn: ModelFn, noise: torch.Tensor, y: torch.Tensor, cfg_scale: float, cfg_channels: Optional[int],
         interval_s: Tuple[float, float], null_class: Optional[int], atol: float, rtol: float, progress: bool,
         nfe: list) -> torch.Tensor:
    """SiT's ODE sampler: torchdiffeq's dopri5 over s in [0, 1] on the state SiT integrates (the batch, or with
    guidance the doubled batch of `ode_doubled_velocity`); returns the samples at s = 1."""
    doubled = cfg_scale != 1.0  # SiT doubles the batch when it guides (cfg > 1; this project also guides below 1)
    lo, hi = interval_s
    bar = tqdm(total=1.0, desc="dopri5", leave=False, disable=not progress, bar_format="{l_bar}{bar}| {n:.3f}/1")

    def velocity(s: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        nfe[0] += 1
        s = float(s)
        inside = min(s, 1.0)  # dopri5 evaluates past its end point; there the interval is read at s = 1
        bar.update(max(0.0, inside - bar.n))
        if not doubled:
            return guided_velocity(model_fn, state, s, y)
        return ode_doubled_velocity(model_fn, state, s, y, cfg_scale, cfg_channels, lo <= inside <= hi, null_class)

    state = torch.cat([noise, noise]) if doubled else noise
    grid = torch.tensor([0.0, 1.0], device=noise.device)  # SiT's t0 = 0, t1 = 1
    try:
        # the tolerances as one-element lists, as SiT passes them: torchdiffeq makes them float64 tensors of shape
        # (1,), which (unlike 0-d ones) promote the error-tolerance arithmetic to float64, and so change the steps
        solution = odeint(velocity, state, grid, method="dopri5", atol=[atol], rtol=[rtol],
                          options={"max_num_steps": ODE_MAX_STEPS})
    except AssertionError as err:  # torchdiffeq's way of giving up (too many steps, step size underflow)
        raise UserError(f"SiT's ODE sampler (dopri5, atol {atol}, rtol {rtol}) failed: {err}") from None
    finally:
        bar.close()
    return solution[-1][:noise.shape[0]]

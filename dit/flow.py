"""Flow matching for the DiT generator ("flow" family): its training loss and samplers.

The convention, time distributions and time grids are the tokenizer's (`tokenizer.flow`, docs/ARCHITECTURE.md §8):

    x_t = (1 - t) * x + t * eps,        t = 0 clean data, t = 1 pure noise, eps ~ N(0, I)
    v   = x - eps                       the network's regression target ("velocity")

so dx_t/dt = eps - x = -v, and integrating from t = 1 down to t = 0 over a step t_i -> t_{i+1}
(t_{i+1} < t_i) is

    x <- x + v * (t_i - t_{i+1}).

From a velocity prediction v at (x_t, t) the clean and noise estimates are

    x_hat   = x_t + t * v               eps_hat = x_t - (1 - t) * v

and, since x_t | x ~ N((1 - t) x, t^2 I), the score is grad log p_t(x_t) = -eps_hat / t.

`model_fn(x (B, C, H, W), t (B,) float in [0, 1], y (B,) long)` returns (B, C', H, W) with
C' >= C; only the first C channels are used, so a DiT with learn_sigma=True (C' = 2C) works
and its variance channels are ignored.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from dit.guidance import ModelFn, guided_velocity
from dit.noise import step_randn
from dit.solvers import ode_step
from tokenizer.common.errors import UserError
from tokenizer.flow import flow_matching_loss, noisy_input, sample_t, time_grid

__all__ = ["training_loss", "guided_velocity", "sample", "METHODS"]

METHODS = ("euler", "heun", "sde")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def training_loss(
    model_fn: ModelFn,
    x: torch.Tensor,
    y: torch.Tensor,
    t: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    *,
    generator: Optional[torch.Generator] = None,
    t_kind: str = "logit_normal",
    t_mean: float = 0.0,
    t_std: float = 1.0,
    t_shift: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """The DiT's flow-matching loss: `tokenizer.flow.flow_matching_loss` of model_fn's velocity at (x_t, t, y).

    x: (B, C, H, W) clean latents, y: (B,) labels, t: (B,) in [0, 1] (drawn with `sample_t` from
    t_kind/t_mean/t_std/t_shift if None), noise: like x (drawn if None). Returns a scalar (reduction="mean")
    or per-sample losses (B,) (reduction="none"). Only the first C output channels are compared (learn_sigma
    channels are ignored).
    """
    if t is None:
        t = sample_t(x.shape[0], t_kind, mean=t_mean, std=t_std, shift=t_shift, generator=generator,
                     device=x.device)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    v = model_fn(noisy_input(x, t, noise), t, y)[:, : x.shape[1]]
    return flow_matching_loss(v, x, noise, reduction)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(
    model_fn: ModelFn,
    noise: torch.Tensor,
    y: torch.Tensor,
    steps: int = 50,
    method: str = "euler",
    cfg_scale: float = 1.0,
    guidance_interval: Tuple[float, float] = (0.0, 1.0),
    null_class: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    time_shift: float = 1.0,
    sde_scale: float = 1.0,
    cfg_channels: Optional[int] = None,
    step_noise: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Integrate from noise (t = 1) to data (t = 0); returns x at t = 0, shaped like noise.

    noise: (B, C, H, W) standard normal, y: (B,) long labels. null_class defaults to
    `model_fn.null_class` (a DiT has it) and is only needed when cfg_scale != 1. cfg_channels limits guidance to
    the first channels (`dit.guidance`); None, the default, guides all.
    The grid is `time_grid(steps, time_shift)`. Methods (h = t_i - t_{i+1} > 0; euler and heun are
    `dit.solvers.ode_step`):

      euler  x <- x + h v(x, t_i)                                         steps evaluations
      heun   x' = x + h v1, v1 = v(x, t_i); x <- x + h (v1 + v(x', t_{i+1})) / 2
             on every step, including the last one into t = 0: v is well defined at t = 0
             under this parameterisation (no division by t). 2*steps evaluations.
      sde    Euler-Maruyama on the reverse SDE with the same marginals as the ODE,
             dx = [-v - g^2/2 * score] dt + g dW (dt < 0), with g(t)^2 = 2 * sde_scale * t,
             chosen so that the 1/t of the score cancels:
                 x <- x + h (v - sde_scale * eps_hat) + sqrt(2 * sde_scale * t_i * h) * z,
             eps_hat = x - (1 - t_i) v, z ~ N(0, I) from `generator`. The last step is the
             plain Euler step (no noise), so the output is the model's clean estimate.
             sde_scale = 0 recovers Euler. steps evaluations.
             `step_noise(x)`, when given, draws z (shaped like x) instead of `generator`: per-sample
             generators make the SDE's noise independent of how samples are batched.
    """
    if method not in METHODS:
        raise UserError(f"unknown sampling method {method!r}; valid: {', '.join(METHODS)}")
    if null_class is None:
        null_class = getattr(model_fn, "null_class", None)
    grid = time_grid(steps, shift=time_shift, dtype=torch.float64).tolist()

    def vel(x: torch.Tensor, t: float) -> torch.Tensor:
        return guided_velocity(model_fn, x, t, y, cfg_scale, guidance_interval, null_class, cfg_channels)

    x = noise
    for i in range(steps):
        t_cur, t_next = grid[i], grid[i + 1]
        if method != "sde":
            x = ode_step(vel, x, t_cur, t_next, method)
        elif i == steps - 1:  # the SDE's last step is a plain Euler step: the model's clean estimate
            x = ode_step(vel, x, t_cur, t_next, "euler")
        else:
            h = t_cur - t_next
            v = vel(x, t_cur)
            eps_hat = x - (1 - t_cur) * v
            z = step_randn(x, generator, step_noise)
            x = x + h * (v - sde_scale * eps_hat) + (2 * sde_scale * t_cur * h) ** 0.5 * z
    return x

"""The project's one flow-matching convention, shared by the SSDD decoder and the DiT (docs/ARCHITECTURE.md §4, §5).

    x_t = (1 - t) * x + t * eps,      t = 0 clean data, t = 1 pure noise, eps ~ N(0, I)
    v   = x - eps                     the network's regression target ("velocity", = -dx_t/dt)

So one Euler step from t_i down to t_{i+1} is x <- x + v * (t_i - t_{i+1}), a single step from pure noise gives
x = eps + v, and from a prediction v at (x_t, t) the clean estimate is x_hat = x_t + t * v.

Training draws t from `sample_t`; sampling walks down `time_grid`. The SSDD decoder uses the paper's grid
t_i = (1 - i/N)^2 (`power=2`); the DiT a uniform grid, optionally with the SD3 time shift (`shift`).
"""

import torch

from tokenizer.common.errors import UserError

T_KINDS = ("logit_normal", "uniform", "shifted")


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against x."""
    return t.view(-1, *([1] * (x.dim() - 1)))


def apply_time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift t' = s t / (1 + (s - 1) t): keeps 0 and 1, moves mass towards noise for s > 1
    (s = 1: identity)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sample_t(batch: int, kind: str = "logit_normal", mean: float = 0.0, std: float = 1.0, shift: float = 1.0,
             generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Training timesteps (batch,) float32 in [0, 1].

    kind "logit_normal": t = sigmoid(mean + std * n), n ~ N(0, 1) (the SSDD paper: mean 0, std 1, no shift);
    "uniform": t ~ U(0, 1) (SiT); "shifted": uniform, then the time shift. A `shift` other than 1 applies after
    any kind. A generator fixes the device.
    """
    if kind not in T_KINDS:
        raise UserError(f"unknown timestep distribution {kind!r}; valid: {', '.join(T_KINDS)}")
    if generator is not None:
        device = generator.device
    if kind == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device))
    else:
        t = torch.rand(batch, generator=generator, device=device)
    return apply_time_shift(t, shift)


def noisy_input(x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x + t eps, with t (B,) broadcast over x (B, ...)."""
    t = _bcast(t.to(x.dtype), x)
    return (1 - t) * x + t * noise


def clean_estimate(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One-step estimate of x from x_t: x_hat = x_t + t * v (used by LPIPS/REPA and by distillation)."""
    return x_t + _bcast(t, x_t) * v


def flow_matching_loss(v_pred: torch.Tensor, x: torch.Tensor, noise: torch.Tensor,
                       reduction: str = "mean") -> torch.Tensor:
    """Squared error against the velocity target x - eps, in float32: the mean over all elements ("mean") or
    per sample ("none", shape (B,))."""
    err = (v_pred.float() - (x.float() - noise.float())).pow(2)
    if reduction == "mean":
        return err.mean()
    if reduction == "none":
        return err.flatten(1).mean(1)
    raise UserError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def time_grid(steps: int, power: float = 1.0, shift: float = 1.0, device=None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decreasing grid (steps + 1,) from exactly 1 to exactly 0: t_i = shift((1 - i/N)^power).

    power = 2 (the SSDD decoder's official default) concentrates the steps near the clean end, where detail is
    decided; shift > 1 (SD3) spends more of them at high noise. Computed in float64.
    """
    if steps < 1:
        raise UserError(f"the number of sampling steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if power != 1.0:
        t = t**power
    t = apply_time_shift(t, shift)
    t[0], t[-1] = 1.0, 0.0  # exact endpoints despite rounding
    return t.to(device=device, dtype=dtype)


@torch.no_grad()
def euler_sample(velocity_fn, noise: torch.Tensor, steps: int, power: float = 2.0) -> torch.Tensor:
    """Integrate from x = noise at t = 1 to t = 0 with `steps` Euler steps on `time_grid(steps, power)`.

    velocity_fn(x_t, t) -> v with t of shape (B,) in [0, 1]. Deterministic: no guidance, no noise injection.
    """
    grid = time_grid(steps, power).tolist()
    x = noise
    for t_now, t_next in zip(grid[:-1], grid[1:]):
        t = torch.full((x.shape[0],), t_now, device=x.device, dtype=x.dtype)
        x = x + velocity_fn(x, t) * (t_now - t_next)
    return x

"""Flow matching for the SSDD decoder (spec §3.1) and its Euler sampler (spec §4).

Convention (the paper's): t = 0 is the clean image, t = 1 pure noise,
    x_t = (1 - t) * x + t * eps,          eps ~ N(0, I)
and the decoder predicts the "velocity" v = x - eps (= -dx_t/dt). So one Euler step from t_i down to
t_{i+1} is x <- x + v * (t_i - t_{i+1}), and a single step from pure noise gives x = eps + v.
"""

import torch


def sample_t_logit_normal(batch: int, mean: float = 0.0, std: float = 1.0, generator=None, device=None):
    """Training timesteps t = sigmoid(N(mean, std)), shape (batch,). The paper uses mean 0, std 1, no shift."""
    return torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device))


def noisy_input(x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x + t eps, with t (B,) broadcast over (B, C, H, W)."""
    t = t.view(-1, *([1] * (x.dim() - 1)))
    return (1 - t) * x + t * noise


def clean_estimate(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One-step estimate of x from x_t: x_hat = x_t + t * v (used by LPIPS/REPA and by distillation)."""
    return x_t + t.view(-1, *([1] * (x_t.dim() - 1))) * v


def flow_matching_loss(v_pred: torch.Tensor, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error against the velocity target x - eps, computed in fp32."""
    return (v_pred.float() - (x.float() - noise.float())).pow(2).mean()


def time_grid(steps: int, t_pow_shift: float = 2.0) -> torch.Tensor:
    """Decreasing grid t_i = (1 - i/N)^p, i = 0..N (N+1 points, from 1 to 0).

    p = 2 (the official default) concentrates the steps near the clean end, where detail is decided.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    i = torch.arange(steps + 1, dtype=torch.float64)
    return ((1 - i / steps) ** t_pow_shift).float()


@torch.no_grad()
def euler_sample(velocity_fn, noise: torch.Tensor, steps: int, t_pow_shift: float = 2.0) -> torch.Tensor:
    """Integrate from x = noise at t = 1 to t = 0 with `steps` Euler steps on `time_grid`.

    velocity_fn(x_t, t) -> v with t of shape (B,) in [0, 1]. Deterministic: no guidance, no noise injection.
    """
    grid = time_grid(steps, t_pow_shift).tolist()
    x = noise
    for t_now, t_next in zip(grid[:-1], grid[1:]):
        t = torch.full((x.shape[0],), t_now, device=x.device, dtype=x.dtype)
        x = x + velocity_fn(x, t) * (t_now - t_next)
    return x

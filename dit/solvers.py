"""The ODE integrators of the samplers: one Euler / Heun step (this project's flow models and SiT's fixed-step
samplers) and adaptive Dormand-Prince 5(4) (SiT's ODE default).

Each sampler integrates dx/dtau = v(x, tau) in its own time (flow: t from 1 down to 0 with v = -dx/dt; SiT: s from 0
up to 1 with v = dx/ds); along the direction of integration both are x <- x + h v with h = |tau_next - tau| > 0.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from tokenizer.common.errors import UserError

__all__ = ["ODE_STEPS", "ode_step", "dopri5"]

Velocity = Callable[[torch.Tensor, float], torch.Tensor]
ODE_STEPS = ("euler", "heun")


def ode_step(velocity: Velocity, x: torch.Tensor, t: float, t_next: float, method: str,
             v: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One fixed step from t to t_next, h = |t_next - t| (v: velocity(x, t) when already computed):

      euler  x + h v(x, t)                                            1 evaluation
      heun   x + h (v1 + v(x + h v1, t_next)) / 2,  v1 = v(x, t)       2 evaluations (the explicit trapezoid rule)
    """
    h = abs(t_next - t)
    if v is None:
        v = velocity(x, t)
    if method == "euler":
        return x + h * v
    if method == "heun":
        return x + h * 0.5 * (v + velocity(x + h * v, t_next))
    raise ValueError(f"unknown ODE step {method!r}; valid: {', '.join(ODE_STEPS)}")


# Dormand & Prince (1980) RK5(4)7M: nodes, stages, 5th-order weights and the 5th - 4th order error weights.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = ((),
      (1 / 5,),
      (3 / 40, 9 / 40),
      (44 / 45, -56 / 15, 32 / 9),
      (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
      (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
      (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


def _rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt())


def dopri5(f: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, t0: float, t1: float,
           atol: float = 1e-6, rtol: float = 1e-3, progress: bool = False, max_steps: int = 10_000) -> torch.Tensor:
    """Integrate dx/dt = f(x, t) from t0 to t1 > t0 with adaptive Dormand-Prince 5(4); returns x(t1).

    The 7th stage is the next step's first (first same as last), so an accepted step costs 6 evaluations.
    """
    def scale(a, b=None):
        ref = a.abs() if b is None else torch.maximum(a.abs(), b.abs())
        return atol + rtol * ref

    t, k1 = t0, f(x, t0)
    # Hairer, Norsett & Wanner's initial step guess (order 5)
    d0, d1 = _rms(x / scale(x)), _rms(k1 / scale(x))
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    d2 = _rms((f(x + h0 * k1, t0 + h0) - k1) / scale(x)) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 6)
    h = min(100 * h0, h1, t1 - t0)
    bar = tqdm(total=t1 - t0, desc="dopri5", leave=False, disable=not progress,
               bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f}")
    for _ in range(max_steps):
        if t >= t1:
            break
        h = min(h, t1 - t)
        k = [k1]
        for i in range(1, 7):
            xi = x + h * sum(a * kj for a, kj in zip(_A[i], k) if a != 0.0)
            k.append(f(xi, t + _C[i] * h))
        x_new = xi  # the 7th stage point is the 5th-order solution
        err = _rms(h * sum(e * kj for e, kj in zip(_E, k) if e != 0.0) / scale(x, x_new))
        if err <= 1.0:
            bar.update(h)
            t, x, k1 = (t1 if t + h >= t1 - 1e-12 else t + h), x_new, k[6]
        factor = 10.0 if err == 0 else min(10.0, max(0.2, 0.9 * err ** -0.2))
        h = h * (max(1.0, factor) if err <= 1.0 else factor)  # never shrink after an accepted step
    else:
        raise UserError(f"the adaptive ODE solver did not reach t={t1} in {max_steps} steps (stopped at t={t:.4g})")
    bar.close()
    return x

"""The fixed-step ODE integrator of the samplers: one Euler / Heun step (this project's flow models and SiT's
fixed-step samplers). SiT's adaptive ODE default is torchdiffeq's dopri5, called as SiT calls it (`dit.sit`).

Each sampler integrates dx/dtau = v(x, tau) in its own time (flow: t from 1 down to 0 with v = -dx/dt; SiT: s from 0
up to 1 with v = dx/ds); along the direction of integration both are x <- x + h v with h = |tau_next - tau| > 0.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["ODE_STEPS", "ode_step"]

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

"""Exponential moving average of a model's weights, with the official warm-up rule (docs/ARCHITECTURE.md §7).

Before `start_iter` the EMA simply copies the weights; afterwards, with n = step - start_iter,
    decay_n = min(decay, (1 + n) / (10 + n))
so the average forgets the early, noisy weights quickly and settles at `decay`.
"""

import copy

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float = 0.999, start_iter: int = 0):
        self.decay, self.start_iter = decay, start_iter
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self, step: int) -> float:
        if step < self.start_iter:
            return 0.0
        n = step - self.start_iter
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Blend `model`'s weights in; `step` is the number of optimiser steps already taken."""
        d = self.current_decay(step)
        for ema_t, t in zip(self.model.state_dict().values(), model.state_dict().values()):
            if ema_t.dtype.is_floating_point:
                ema_t.lerp_(t.to(ema_t.dtype), 1 - d)
            else:
                ema_t.copy_(t)

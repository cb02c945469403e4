"""Where the random numbers of generation come from (docs/ARCHITECTURE.md §8, §10).

Two policies, both drawn on the CPU so that a seed gives the same images on any device:
- per call (`draw_batch_noise`): one generator seeded with `seed` draws the DiT noise of all n samples, then the
  decoder noise of all n samples. `Generator.generate` and `compare` use it.
- per sample (`draw_per_sample_noise`, `per_sample_step_noise`): sample i draws from its own generators seeded from
  (seed, i), so an image does not depend on which samples share its batch, the batch size or the number of
  processes. The sampling runs (sample/sample_ddp.py, eval/generation_table.py) use it.
The stochastic samplers' per-step noise (flow `sde`, DiT `ddpm`, SiT `sde`) comes from `step_randn`: the per-sample
streams when given, else a generator on the device.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from tokenizer.common.errors import UserError

__all__ = ["sample_seed", "draw_batch_noise", "draw_per_sample_noise", "per_sample_step_noise", "step_randn"]

StepNoise = Callable[[torch.Tensor], torch.Tensor]


def sample_seed(seed: int, index: int, stream: int = 0) -> int:
    """A 64-bit generator seed for sample `index` of a run seeded with `seed` (numpy's SeedSequence hash, so nearby
    (seed, index) pairs give unrelated streams); `stream` separates the SDE's per-step noise (1) from the rest (0)."""
    if seed < 0 or index < 0:
        raise UserError(f"seeds and sample indices must be >= 0, got seed {seed}, index {index}")
    return int(np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(1, np.uint64)[0])


def draw_batch_noise(n: int, seed: int, latent_shape: tuple, image_shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(DiT noise (n, *latent_shape), decoder noise (n, *image_shape)), drawn on the CPU from `seed` in that order."""
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((n, *latent_shape), generator=g)
    return noise, torch.randn((n, *image_shape), generator=g)


def draw_per_sample_noise(indices, seed: int, latent_shape: tuple,
                          image_shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample i's (DiT noise, decoder noise) drawn, in that order, from its own CPU generator seeded from (seed, i)
    -> two stacked tensors (len(indices), ...)."""
    noise, decoder_noise = [], []
    for i in indices:
        g = torch.Generator().manual_seed(sample_seed(seed, i))
        noise.append(torch.randn(latent_shape, generator=g))
        decoder_noise.append(torch.randn(image_shape, generator=g))
    return torch.stack(noise), torch.stack(decoder_noise)


def per_sample_step_noise(indices, seed: int) -> StepNoise:
    """A `step_noise(x)` for the stochastic samplers: row i of x's noise from sample i's own CPU generator seeded
    from (seed, i, 1), moved to x's device and dtype. x's rows must be the samples `indices`, in that order."""
    gens = [torch.Generator().manual_seed(sample_seed(seed, i, stream=1)) for i in indices]

    def draw(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x.device, x.dtype)

    return draw


def step_randn(x: torch.Tensor, generator: Optional[torch.Generator], step_noise: Optional[StepNoise] = None):
    """A stochastic sampler's per-step noise shaped like x: `step_noise(x)` when given (per-sample CPU streams),
    else from the device `generator`. Shared by the flow, DiT and SiT samplers."""
    if step_noise is not None:
        return step_noise(x)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

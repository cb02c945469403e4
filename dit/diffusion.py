"""DiT's own sampling convention: discrete-time Gaussian diffusion (DDPM) with learned variance, respaced DDPM and DDIM.

Written from the papers (DDPM arXiv 2006.11239, improved DDPM arXiv 2102.09672, DDIM arXiv 2010.02502) and the
facts of DiT's released sampler (arXiv 2212.09748; docs/ARCHITECTURE.md §8), so that the published DiT weights
sample as they were trained:

    betas       linear from 1e-4 to 0.02 over T = 1000 steps (float64); alpha_bar_k = prod_{j<=k} (1 - beta_j)
    forward     x_k = sqrt(alpha_bar_k) x_0 + sqrt(1 - alpha_bar_k) eps, k = 0 .. 999 (0 = least noise)
    model       (x_k, k as a float, y) -> (eps, v): eps prediction in the first C channels; with learn_sigma the
                next C channels v in [-1, 1] interpolate the log-variance between the posterior variance (v = -1)
                and beta_k (v = +1): log var = (v + 1)/2 log beta_k + (1 - v)/2 log beta~_k  ("learned range")
    respacing   a subset S of the 1000 steps ("250": evenly spaced with a fractional stride, both ends kept,
                rounding a running float sum of the stride as DiT does; "ddim50": the integer stride of the DDIM
                paper, the first stride giving exactly 50 steps; "a,b,c": counts per equal section); the respaced
                process has beta'_i = 1 - alpha_bar_{s_i} / alpha_bar_{s_{i-1}}, so its alpha_bar are the base
                ones at S, and the model is still fed the ORIGINAL step index s_i
    DDPM step   x0 = sqrt(1/alpha_bar) x - sqrt(1/alpha_bar - 1) eps (not clipped: DiT samples with
                clip_denoised=False), mean = c1 x0 + c2 x (the posterior q(x_{i-1} | x_i, x0)), then
                x <- mean + exp(log var / 2) z, without noise on the last step
    DDIM step   (eta = 0 by default) x <- sqrt(alpha_bar_prev) x0 + sqrt(1 - alpha_bar_prev - s^2) eps + s z,
                s = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) sqrt(1 - alpha_bar / alpha_bar_prev)
    guidance    (`dit.guidance.guided_output`) the conditional and null-class passes run in one batch; DiT's
                default guides only the first `cfg_channels` = 3 of the 4 eps channels (the 4th eps channel and the
                variance come from the conditional pass); `cfg_channels=None` guides all eps channels;
                `guidance_interval` limits guidance to steps whose noise level t = (k + 1) / 1000 lies inside it
                (t = 1: pure noise, as in dit.flow)

Schedules are computed in float64 and applied to float32 latents, as DiT does.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from dit.guidance import ModelFn, guided_output
from dit.noise import step_randn
from tokenizer.common.errors import UserError

__all__ = ["linear_betas", "space_timesteps", "DiscreteSchedule", "sample", "METHODS", "NUM_TIMESTEPS"]

METHODS = ("ddpm", "ddim")
NUM_TIMESTEPS = 1000


def linear_betas(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
    """DDPM's linear schedule, scaled so that any T keeps the same shape: linspace(1e-4 * 1000/T, 0.02 * 1000/T, T)."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, spec) -> list[int]:
    """The kept steps (sorted original indices) of a respacing spec: an int or "250", "ddim50", "10,20,30"."""
    text = str(spec).strip()
    if text.startswith("ddim"):
        try:
            count = int(text[4:])
        except ValueError:
            raise UserError(f"bad respacing {spec!r}: 'ddim' must be followed by a step count, e.g. 'ddim50'") from None
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise UserError(f"no integer stride gives exactly {count} of {num_timesteps} steps; use an even spacing "
                        f"such as '{count}' instead of 'ddim{count}'")
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        raise UserError(f"bad respacing {spec!r}: expected a step count ('250'), 'ddimN' or counts per "
                        "section") from None
    size, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        section = size + (1 if i < extra else 0)
        if not 1 <= count <= section:
            raise UserError(f"cannot take {count} steps from a section of {section} (respacing {spec!r})")
        kept += [start + k for k in _evenly_spaced(section, count)]
        start += section
    return sorted(set(kept))


def _evenly_spaced(size: int, count: int) -> list[int]:
    """`count` of the indices 0 .. size - 1 with the fractional stride (size - 1) / (count - 1), both ends kept (one
    index: 0), as DiT's released respacing picks them: a running float sum of the stride, rounded at each index.
    The float sum's rounding errors accumulate, so this differs from round(j * stride) for some counts (278 of the
    1000 counts of one 1000-step section; e.g. 21 steps keep 499 where round(10 * 49.95) = 500)."""
    stride = 1.0 if count == 1 else (size - 1) / (count - 1)
    kept, position = [], 0.0
    for _ in range(count):
        kept.append(round(position))  # Python's round: halves to even, as DiT's
        position += stride
    return kept


class DiscreteSchedule:
    """A (respaced) discrete diffusion: per-step coefficients in float64, index i = 0 .. len - 1 (0 = least noise).

    `timesteps[i]` is the original step index fed to the model at respaced step i.
    """

    def __init__(self, spec=NUM_TIMESTEPS, num_timesteps: int = NUM_TIMESTEPS):
        base_alpha_bar = np.cumprod(1.0 - linear_betas(num_timesteps))
        self.num_timesteps = num_timesteps
        self.timesteps = space_timesteps(num_timesteps, spec)
        alpha_bar = base_alpha_bar[self.timesteps]
        self.alpha_bar = alpha_bar
        self.alpha_bar_prev = np.append(1.0, alpha_bar[:-1])
        self.betas = 1.0 - alpha_bar / self.alpha_bar_prev
        # posterior q(x_{i-1} | x_i, x_0): variance beta~_i, its log clipped at i = 0 (where it is 0) to beta~_1
        self.posterior_variance = self.betas * (1.0 - self.alpha_bar_prev) / (1.0 - alpha_bar)
        self.posterior_log_variance = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:])) \
            if len(self.timesteps) > 1 else np.log(self.betas)
        self.mean_coef_x0 = self.betas * np.sqrt(self.alpha_bar_prev) / (1.0 - alpha_bar)
        self.mean_coef_xt = (1.0 - self.alpha_bar_prev) * np.sqrt(1.0 - self.betas) / (1.0 - alpha_bar)
        self.sqrt_recip_alpha_bar = np.sqrt(1.0 / alpha_bar)
        self.sqrt_recipm1_alpha_bar = np.sqrt(1.0 / alpha_bar - 1.0)
        # the fixed variance DiT uses without learn_sigma ("fixed large"): beta_i, with beta~_1 at i = 0
        self.fixed_log_variance = np.log(np.append(self.posterior_variance[1], self.betas[1:])) \
            if len(self.timesteps) > 1 else np.log(self.betas)

    def __len__(self) -> int:
        return len(self.timesteps)

    def noise_level(self, i: int) -> float:
        """t = (k + 1) / T of respaced step i (k its original index): what `guidance_interval` is compared with."""
        return (self.timesteps[i] + 1) / self.num_timesteps

    def predict_x0(self, x: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
        return _f32(self.sqrt_recip_alpha_bar[i]) * x - _f32(self.sqrt_recipm1_alpha_bar[i]) * eps

    def predict_eps(self, x: torch.Tensor, x0: torch.Tensor, i: int) -> torch.Tensor:
        return (_f32(self.sqrt_recip_alpha_bar[i]) * x - x0) / _f32(self.sqrt_recipm1_alpha_bar[i])

    def model_log_variance(self, var_values: Optional[torch.Tensor], i: int, like: torch.Tensor) -> torch.Tensor:
        """log variance of p(x_{i-1} | x_i): learned range from var_values in [-1, 1], or the fixed one (None)."""
        if var_values is None:
            return torch.full_like(like, _f32(self.fixed_log_variance[i]))
        frac = (var_values + 1) / 2
        return frac * _f32(np.log(self.betas[i])) + (1 - frac) * _f32(self.posterior_log_variance[i])

    def posterior_mean(self, x0: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        return _f32(self.mean_coef_x0[i]) * x0 + _f32(self.mean_coef_xt[i]) * x


def _f32(value) -> float:
    """A float64 schedule entry rounded to float32, as DiT extracts its coefficients into float32 tensors."""
    return float(np.float32(value))


@torch.no_grad()
def sample(model_fn: ModelFn, noise: torch.Tensor, y: torch.Tensor, steps=250, method: str = "ddpm",
           cfg_scale: float = 1.0, cfg_channels: Optional[int] = 3, guidance_interval: Tuple[float, float] = (0.0, 1.0),
           null_class: Optional[int] = None, generator: Optional[torch.Generator] = None, clip_denoised: bool = False,
           eta: float = 0.0, progress: bool = False, step_noise=None) -> torch.Tensor:
    """Sample x_0 (B, C, H, W) from x_T = noise with a DiT-convention model.

    steps: an int (evenly spaced respacing, as DiT's `--num-sampling-steps`) or a respacing spec ("ddim50").
    method: "ddpm" (ancestral, learned variance) or "ddim" (eta = 0: deterministic). The per-step noise of
    "ddpm" (and of "ddim" with eta > 0) comes from `step_noise(x)` when given (per-sample streams), else
    `generator`. null_class defaults to `model_fn.null_class`.
    A model output of C channels (no learn_sigma) uses DiT's fixed variance instead of the learned range.
    """
    if method not in METHODS:
        raise UserError(f"unknown sampler {method!r} for a DiT-convention model; valid: {', '.join(METHODS)}")
    if null_class is None:
        null_class = getattr(model_fn, "null_class", None)
    schedule = DiscreteSchedule(steps)
    c = noise.shape[1]
    lo, hi = guidance_interval
    x = noise
    for i in tqdm(range(len(schedule) - 1, -1, -1), desc=method, leave=False, disable=not progress):
        out = guided_output(model_fn, x, schedule.timesteps[i], y, cfg_scale, cfg_channels, null_class,
                            guide=lo <= schedule.noise_level(i) <= hi)
        if out.shape[1] not in (c, 2 * c):
            raise UserError(f"the model returned {out.shape[1]} channels for {c}-channel latents "
                            f"(expected {c} or {2 * c})")
        eps, var_values = (out[:, :c], out[:, c:]) if out.shape[1] == 2 * c else (out, None)
        x0 = schedule.predict_x0(x, eps, i)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        last = i == 0
        if method == "ddpm":
            mean = schedule.posterior_mean(x0, x, i)
            if last:
                x = mean
            else:
                log_var = schedule.model_log_variance(var_values, i, x)
                x = mean + torch.exp(0.5 * log_var) * step_randn(x, generator, step_noise)
        else:
            eps = schedule.predict_eps(x, x0, i)  # equals the model's eps unless x0 was clipped
            ab, ab_prev = schedule.alpha_bar[i], schedule.alpha_bar_prev[i]
            sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab)) * np.sqrt(1 - ab / ab_prev)
            x = _f32(np.sqrt(ab_prev)) * x0 + _f32(np.sqrt(1 - ab_prev - sigma ** 2)) * eps
            if sigma > 0 and not last:
                x = x + _f32(sigma) * step_randn(x, generator, step_noise)
    return x

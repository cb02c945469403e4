"""The samplers of the published generators: DiT's discrete diffusion (dit/diffusion.py) and SiT's interpolant
(dit/sit.py), pinned on known properties and on flows with a closed form; their guidance conventions."""

import math

import numpy as np
import pytest
import torch

from dit import diffusion, sit
from dit.diffusion import DiscreteSchedule, linear_betas, space_timesteps
from dit.guidance import cfg_combine
from tokenizer import UserError

# ---------------------------------------------------------------------------------------------- DiT: schedule


def test_linear_schedule_and_respacing():
    betas = linear_betas()
    assert betas.dtype == np.float64 and betas[0] == 1e-4 and betas[-1] == pytest.approx(0.02, abs=1e-15)
    alpha_bar = np.cumprod(1 - betas)
    assert alpha_bar[-1] == pytest.approx(4.0358e-5, rel=1e-4)  # DDPM's linear schedule ends near pure noise
    # "250": evenly spaced with a fractional stride 999/249, both ends kept
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert set(np.diff(kept)) == {4, 5} and kept[:4] == [0, 4, 8, 12]
    # "ddimN": DDIM's integer stride (so ddim250 ends at 996, not 999)
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim250")[-1] == 996
    second_half = [500 + k for k in space_timesteps(500, 20)]
    assert space_timesteps(1000, "10,20") == sorted(set(space_timesteps(500, 10) + second_half))
    with pytest.raises(UserError, match="integer stride"):
        space_timesteps(1000, "ddim300")
    with pytest.raises(UserError):
        space_timesteps(1000, "fast")


def dits_respacing(size, count):
    """DiT's released rule for one section, from its description: the fractional stride (size - 1) / (count - 1)
    (1 for a single step) added to a running float sum that starts at 0.0; each kept index is that sum rounded."""
    frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
    cur_idx, taken = 0.0, []
    for _ in range(count):
        taken.append(round(cur_idx))
        cur_idx += frac_stride
    return taken


def test_respacing_keeps_dits_steps_for_every_count():
    differ_from_product = []
    for count in range(1, 1001):
        kept = space_timesteps(1000, count)
        assert kept == dits_respacing(1000, count), count
        assert space_timesteps(1000, str(count)) == kept and DiscreteSchedule(count).timesteps == kept
        assert len(kept) == count and kept[0] == 0 and (count == 1 or kept[-1] == 999)
        stride = 1.0 if count == 1 else 999 / (count - 1)
        if kept != [round(j * stride) for j in range(count)]:
            differ_from_product.append(count)
    # the float sum's rounding errors: 278 counts keep other steps than rounding j * stride would
    assert len(differ_from_product) == 278 and differ_from_product[:4] == [21, 23, 31, 35]
    # hand-checked: 21 steps, stride 49.95; ten additions give 499.49999999999994, so DiT keeps 499 (not 500)
    kept21 = space_timesteps(1000, 21)
    assert kept21[10] == 499 and 500 not in kept21 and kept21[:3] == [0, 50, 100] and kept21[-1] == 999
    for count in (25, 50, 100, 250):  # the common counts are as before
        assert space_timesteps(1000, count) == [round(j * 999 / (count - 1)) for j in range(count)]
    assert space_timesteps(1000, 1) == [0] and space_timesteps(1000, 1000) == list(range(1000))
    # counts per section: sizes 334, 333, 333 (the remainder to the first), each section by the same rule
    expected = dits_respacing(334, 10) + [334 + k for k in dits_respacing(333, 21)] + \
        [667 + k for k in dits_respacing(333, 35)]
    assert space_timesteps(1000, "10,21,35") == sorted(expected)


def test_respaced_alphas_are_the_base_alphas_at_the_kept_steps():
    base = np.cumprod(1 - linear_betas())
    for spec in ("250", "ddim50", 1000):
        s = DiscreteSchedule(spec)
        assert np.allclose(s.alpha_bar, base[s.timesteps], rtol=1e-12, atol=0)
        assert np.allclose(np.cumprod(1 - s.betas), s.alpha_bar, rtol=1e-12, atol=0)
    full = DiscreteSchedule(1000)
    assert np.allclose(full.betas, linear_betas(), rtol=1e-9, atol=1e-15)  # no respacing: the base process


def test_learned_range_variance_and_posterior():
    s = DiscreteSchedule("250")
    x = torch.zeros(1, 4, 2, 2)
    i = 10
    beta, ab, ab_prev = s.betas[i], s.alpha_bar[i], s.alpha_bar_prev[i]
    posterior = beta * (1 - ab_prev) / (1 - ab)
    assert s.posterior_variance[i] == pytest.approx(posterior, rel=1e-12)
    v = torch.full_like(x, 1.0)  # +1: beta_t (largest)
    assert torch.allclose(s.model_log_variance(v, i, x), torch.full_like(x, math.log(beta)))
    assert torch.allclose(s.model_log_variance(-v, i, x), torch.full_like(x, math.log(posterior)))
    mid = s.model_log_variance(torch.zeros_like(x), i, x)  # 0: the geometric mean of the two variances
    assert torch.allclose(mid, torch.full_like(x, 0.5 * (math.log(beta) + math.log(posterior))))
    # at the last step the posterior variance is 0; its log is clipped to the next step's
    assert s.posterior_variance[0] == 0 and s.posterior_log_variance[0] == math.log(s.posterior_variance[1])
    # the posterior mean reproduces x0 from the clean point itself
    x0, xt = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    assert torch.allclose(s.posterior_mean(x0, xt, 0), x0)


class OracleEps:
    """eps prediction that is exact for data concentrated at x_star (eps = (x - sqrt(ab) x*) / sqrt(1 - ab)),
    plus a constant learned-variance channel; records the timesteps and batch sizes it was called with."""

    null_class = 1000

    def __init__(self, x_star, var_value=0.0):
        self.x_star, self.var_value, self.calls = x_star, var_value, []
        self.alpha_bar = np.cumprod(1 - linear_betas())

    def __call__(self, x, t, y):
        self.calls.append((float(t[0]), x.shape[0]))
        assert t.dtype.is_floating_point and float(t[0]) == int(t[0])  # the original integer step index
        ab = float(self.alpha_bar[int(t[0])])
        eps = (x - math.sqrt(ab) * self.x_star) / math.sqrt(1 - ab)
        return torch.cat([eps, torch.full_like(x, self.var_value)], dim=1)


@pytest.mark.parametrize("method,steps,calls", [("ddim", "ddim50", 50), ("ddim", 10, 10), ("ddpm", 25, 25)])
def test_samplers_reach_the_data_with_an_exact_model(method, steps, calls):
    torch.manual_seed(0)
    x_star = torch.randn(2, 4, 4, 4) * 0.5
    model = OracleEps(x_star)
    noise = torch.randn(2, 4, 4, 4)
    out = diffusion.sample(model, noise, torch.tensor([1, 2]), steps=steps, method=method,
                           generator=torch.Generator().manual_seed(0))
    assert len(model.calls) == calls  # one model call per respaced step
    fed = [c[0] for c in model.calls]
    assert fed == sorted(DiscreteSchedule(steps).timesteps, reverse=True)  # the model sees the original indices
    assert torch.allclose(out, x_star, atol=1e-4)


def test_dit_guidance_guides_three_channels_by_default_or_all():
    torch.manual_seed(0)
    out_c, out_u = torch.randn(2, 8, 2, 2), torch.randn(2, 8, 2, 2)

    def model(x, t, y):  # conditional rows get out_c, null-class rows out_u
        null = (y == 1000).view(-1, 1, 1, 1)
        return torch.where(null, out_u.repeat(2, 1, 1, 1)[: len(y)], out_c.repeat(2, 1, 1, 1)[: len(y)])

    x, y = torch.zeros(2, 4, 2, 2), torch.tensor([3, 4])
    g3 = diffusion.guided_output(model, x, 999, y, 4.0, 3, 1000, guide=True)
    assert torch.allclose(g3[:, :3], out_u[:, :3] + 4 * (out_c[:, :3] - out_u[:, :3]))
    assert torch.equal(g3[:, 3:], out_c[:, 3:])  # 4th eps channel and the variance: conditional
    g_all = diffusion.guided_output(model, x, 999, y, 4.0, None, 1000, guide=True)
    assert torch.allclose(g_all[:, :4], out_u[:, :4] + 4 * (out_c[:, :4] - out_u[:, :4]))
    assert torch.equal(g_all[:, 4:], out_c[:, 4:])  # never the variance channels
    assert torch.equal(diffusion.guided_output(model, x, 999, y, 4.0, 3, 1000, guide=False), out_c)
    assert torch.equal(cfg_combine(out_c, out_u, 2.0, None), out_u + 2.0 * (out_c - out_u))


def test_dit_guidance_interval_and_batching():
    model = OracleEps(torch.zeros(1, 4, 2, 2))
    diffusion.sample(model, torch.randn(1, 4, 2, 2), torch.tensor([1]), steps=10, method="ddim", cfg_scale=1.5,
                     guidance_interval=(0.5, 1.0))
    # guided steps (noise level (k + 1) / 1000 >= 0.5) run conditional and null class in one batch of 2
    assert [(t, b) for t, b in model.calls] == [(t, 2 if (t + 1) / 1000 >= 0.5 else 1)
                                               for t in sorted(DiscreteSchedule(10).timesteps, reverse=True)]
    with pytest.raises(UserError, match="unknown sampler"):
        diffusion.sample(model, torch.randn(1, 4, 2, 2), torch.tensor([1]), method="euler")


# ---------------------------------------------------------------------------------------------- SiT


class GaussianVelocity:
    """The exact velocity of SiT's linear interpolant for data N(mu, sigma^2 I): x_s = s x + (1 - s) eps,
    v(x_s, s) = E[x - eps | x_s] = mu + (s sigma^2 - (1 - s)) / (s^2 sigma^2 + (1 - s)^2) (x_s - s mu).
    Its ODE from s = 0 to 1 maps eps to mu + sigma eps exactly. Records the times it is fed."""

    null_class = 10

    def __init__(self, mu, sigma):
        self.mu, self.sigma, self.times = mu, sigma, []

    def __call__(self, x, s, y):
        # SiT time, unscaled (the adaptive ODE's last step also evaluates a little past s = 1)
        assert s.dtype == torch.float32 and 0 <= float(s.min()) and float(s.max()) <= 2
        self.times.append(float(s[0]))
        s = s.view(-1, 1, 1, 1)
        var = s ** 2 * self.sigma ** 2 + (1 - s) ** 2
        return self.mu + (s * self.sigma ** 2 - (1 - s)) / var * (x - s * self.mu)


@pytest.mark.parametrize("method,steps,tol", [("ode", 0, 5e-2), ("heun", 50, 2e-3), ("euler", 250, 3e-2)])
def test_sit_ode_samplers_integrate_the_known_flow(method, steps, tol):
    torch.manual_seed(0)
    mu, sigma = 1.5, 0.5
    noise = torch.randn(4, 4, 8, 8)
    model = GaussianVelocity(mu, sigma)
    stats = {}
    out = sit.sample(model, noise, torch.zeros(4, dtype=torch.long), steps=steps, method=method, stats=stats)
    assert (out - (mu + sigma * noise)).abs().max() < tol
    assert model.times[0] == 0.0  # time runs from noise at s = 0 ...
    if method == "euler":  # ... to data at s = 1 (Euler's last evaluation is at the last interval's start)
        assert max(model.times) == pytest.approx((steps - 2) / (steps - 1))
        assert stats["nfe"] == steps - 1
    elif method == "heun":
        assert max(model.times) == pytest.approx(1.0)
    else:  # torchdiffeq's dopri5 steps past s = 1 and interpolates back, as SiT's ODE does
        assert max(model.times) > 1.0
    if method == "heun":
        assert stats["nfe"] == 2 * (steps - 1)
    if method == "ode":  # SiT's tolerances bound an RMS error; tighter ones converge to the exact map
        assert (out - (mu + sigma * noise)).abs().mean() < 1e-2 and 10 < stats["nfe"] < 400
        tight = sit.sample(model, noise, torch.zeros(4, dtype=torch.long), method="ode", atol=1e-9, rtol=1e-7)
        assert (tight - (mu + sigma * noise)).abs().max() < 1e-5


def test_sit_sde_default_matches_the_data_marginal():
    torch.manual_seed(0)
    mu, sigma = -1.0, 0.5
    model = GaussianVelocity(mu, sigma)
    stats = {}
    noise = torch.randn(1, 4, 32, 32)
    out = sit.sample(model, noise, torch.zeros(1, dtype=torch.long), steps=250, method="sde",
                     generator=torch.Generator().manual_seed(1), stats=stats)
    assert stats["nfe"] == 250  # 249 Euler-Maruyama steps on [0, 0.96] and the last "Mean" step
    assert model.times[-1] == pytest.approx(0.96) and model.times[-2] == pytest.approx(0.96 * 248 / 249)
    assert out.mean().item() == pytest.approx(mu, abs=0.03)
    assert out.std().item() == pytest.approx(sigma, abs=0.03)
    again = sit.sample(model, noise, torch.zeros(1, dtype=torch.long), steps=250, method="sde",
                       generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_sit_guidance_three_channels_and_interval_in_project_time():
    calls = []

    def model(x, s, y):
        calls.append((float(s[0]), len(y)))
        return torch.where((y == 10).view(-1, 1, 1, 1), torch.zeros_like(x), torch.ones_like(x))  # cond 1, null 0

    x = torch.zeros(1, 4, 2, 2)
    out = sit.sample(model, x, torch.tensor([3]), steps=3, method="euler", cfg_scale=3.0, null_class=10)  # s = 0, .5
    # guided velocity: 0 + 3 (1 - 0) = 3 on the first 3 channels, the conditional 1 on the 4th; two steps of 0.5
    assert torch.allclose(out[:, :3], torch.full((1, 3, 2, 2), 3.0)) and torch.allclose(out[:, 3], torch.ones(1, 2, 2))
    calls.clear()
    sit.sample(model, x, torch.tensor([3]), steps=3, method="euler", cfg_scale=3.0, guidance_interval=(0.0, 0.6),
               null_class=10)
    # t = 1 - s: s = 0 is t = 1, outside [0, 0.6], so unguided; s = 0.5 is t = 0.5, guided
    assert calls == [(0.0, 1), (0.5, 2)]


class ShiftedGaussianVelocity(GaussianVelocity):
    """GaussianVelocity with a class-dependent mean (mu for the classes, mu_null for the null class 10) and a small
    nonlinear term, so that guidance changes the flow and the 4th channel's conditional and unconditional velocities
    differ (the two halves of SiT's doubled ODE state part)."""

    def __init__(self, mu, mu_null, sigma):
        super().__init__(mu, sigma)
        self.mu_null, self.batches = mu_null, []

    def __call__(self, x, s, y):
        self.batches.append(len(y))
        mu = torch.where(y == self.null_class, self.mu_null, self.mu).view(-1, 1, 1, 1)
        self.times.append(float(s[0]))
        s = s.view(-1, 1, 1, 1)
        var = s ** 2 * self.sigma ** 2 + (1 - s) ** 2
        return mu + (s * self.sigma ** 2 - (1 - s)) / var * (x - s * mu) + 0.1 * torch.tanh(x)


def sits_released_ode(model, noise, y, cfg_scale, num_steps=250):
    """SiT's released ODE sampling, from its description: with cfg_scale > 1 the batch is doubled ([z; z], labels
    [y; null]) and the network is run on [first half; first half], the first 3 channels guided in both halves, the
    4th from each half's own pass; torchdiffeq's dopri5 with atol [1e-6], rtol [1e-3] over num_steps output times
    linspace(0, 1); the time fed is ones(batch) * t; the last output's first half is the sample."""
    from torchdiffeq import odeint

    guided = cfg_scale > 1
    z, labels = (torch.cat([noise, noise]), torch.cat([y, torch.full_like(y, 10)])) if guided else (noise, y)

    def model_fn(x, t):
        if not guided:
            return model(x, t, labels)[:, :4]
        half = x[: len(x) // 2]
        out = model(torch.cat([half, half]), t, labels)[:, :4]
        cond, uncond = out[:, :3].split(len(out) // 2)
        half_eps = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([half_eps, half_eps]), out[:, 3:]], dim=1)

    calls = [0]

    def fn(t, x):
        calls[0] += 1
        return model_fn(x, torch.ones(x.size(0)) * t)

    samples = odeint(fn, z, torch.linspace(0, 1, num_steps), method="dopri5", atol=[1e-6], rtol=[1e-3])
    return (samples[-1].chunk(2)[0] if guided else samples[-1]), calls[0]


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_sit_ode_is_sits_released_dopri5(cfg_scale):
    torch.manual_seed(0)
    noise, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3])
    model = ShiftedGaussianVelocity(1.5, -0.5, 0.5)
    stats = {}
    ours = sit.sample(model, noise, y, method="ode", cfg_scale=cfg_scale, stats=stats)
    assert model.batches == [6 if cfg_scale > 1 else 3] * stats["nfe"]  # guided: one batch of 2B per evaluation
    theirs, calls = sits_released_ode(model, noise, y, cfg_scale)
    assert torch.equal(ours, theirs) and stats["nfe"] == calls  # same steps, same result, bit for bit
    if cfg_scale > 1:  # the error norm covers the doubled state: integrating the B rows alone steps otherwise
        from torchdiffeq import odeint

        single = odeint(lambda t, x: sit.guided_velocity(model, x, float(t), y, cfg_scale, (0.0, 1.0), 10, 3),
                        noise, torch.tensor([0.0, 1.0]), method="dopri5", atol=1e-6, rtol=1e-3)[-1]
        assert not torch.equal(ours, single)


def test_sit_ode_guided_gaussian_flow_and_interval():
    # cond mean 1.5, null mean 0: the guided velocity is the Gaussian flow of mean 4 * 1.5 = 6 on the 3 guided
    # channels; the 4th channel follows the conditional flow (SiT's cfg_channels=3)
    torch.manual_seed(0)
    noise, y = torch.randn(4, 4, 8, 8), torch.zeros(4, dtype=torch.long)

    class Shifted(ShiftedGaussianVelocity):
        def __call__(self, x, s, y):
            return super().__call__(x, s, y) - 0.1 * torch.tanh(x)  # the exact Gaussian flows

    model = Shifted(1.5, 0.0, 0.5)
    out = sit.sample(model, noise, y, method="ode", cfg_scale=4.0, atol=1e-9, rtol=1e-7)
    assert (out[:, :3] - (6.0 + 0.5 * noise[:, :3])).abs().max() < 1e-4
    assert (out[:, 3] - (1.5 + 0.5 * noise[:, 3])).abs().max() < 1e-4
    # guidance only for t = 1 - s in [0, 0.5]: unguided evaluations are single conditional passes of B rows, and
    # the evaluations past s = 1 are guided as s = 1 is
    model = Shifted(1.5, 0.0, 0.5)
    sit.sample(model, noise, y, method="ode", cfg_scale=4.0, guidance_interval=(0.0, 0.5))
    assert [b for b in model.batches] == [8 if s >= 0.5 else 4 for s in model.times] and max(model.times) > 1

"""Flow matching: time distributions, loss target, exactness of the samplers, guidance."""

import pytest
import torch

from dit.flow import guided_velocity, sample, training_loss
from tokenizer.common.errors import UserError
from tokenizer.flow import sample_t, time_grid

SHAPE = (4, 3, 2, 2)


def _noise(seed=0, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_sample_t_distributions():
    g = torch.Generator().manual_seed(0)
    n = 20000
    ln = sample_t(n, "logit_normal", generator=g)
    uni = sample_t(n, "uniform", generator=g)
    sh = sample_t(n, "shifted", generator=g, shift=3.0)
    for t in (ln, uni, sh):
        assert t.shape == (n,) and t.min() >= 0 and t.max() <= 1
    assert abs(ln.median().item() - 0.5) < 0.02
    assert abs(uni.mean().item() - 0.5) < 0.02
    assert sh.mean() > uni.mean() + 0.1
    assert torch.equal(sample_t(8, generator=torch.Generator().manual_seed(1)),
                       sample_t(8, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(UserError):
        sample_t(4, "beta")


def test_time_grid():
    g = time_grid(4)
    assert torch.allclose(g, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    s = time_grid(10, shift=3.0)
    assert s[0] == 1 and s[-1] == 0 and torch.all(s[1:] < s[:-1])
    assert torch.all(s[1:-1] > time_grid(10)[1:-1])  # shift > 1 lingers near noise


def test_loss_target_is_x_minus_eps_and_ignores_sigma_channels():
    x, eps = _noise(1).float(), _noise(2).float()
    t = torch.full((SHAPE[0],), 0.3)

    def oracle(x_t, t_, y):  # knows x and eps; appends junk "sigma" channels
        return torch.cat([x - eps, torch.full_like(x, 1e3)], dim=1)

    per = training_loss(oracle, x, torch.zeros(4, dtype=torch.long), t=t, noise=eps, reduction="none")
    assert per.shape == (4,) and torch.allclose(per, torch.zeros(4))

    seen = {}

    def zero(x_t, t_, y):
        seen["x_t"] = x_t
        return torch.zeros_like(x_t)

    loss = training_loss(zero, x, torch.zeros(4, dtype=torch.long), t=t, noise=eps)
    assert torch.allclose(seen["x_t"], 0.7 * x + 0.3 * eps)
    assert torch.allclose(loss, ((x - eps) ** 2).mean())


@pytest.mark.parametrize("steps", [1, 3, 10, 37])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_and_heun_exact_on_simple_fields(steps, shift):
    x1, y = _noise(), torch.zeros(SHAPE[0], dtype=torch.long)
    a, b = _noise(5), _noise(6)
    const = lambda x, t, y: a.expand_as(x)                                     # v = a
    linear = lambda x, t, y: a + b * t.to(x.dtype).view(-1, 1, 1, 1)          # v = a + b t
    # x_0 = x_1 + integral_0^1 v dt
    for method in ("euler", "heun"):
        out = sample(const, x1, y, steps=steps, method=method, time_shift=shift)
        assert torch.allclose(out, x1 + a, atol=1e-5)
    out = sample(linear, x1, y, steps=steps, method="heun", time_shift=shift)
    assert torch.allclose(out, x1 + a + b / 2, atol=1e-5)


def _gaussian_velocity(mu, sigma):
    """Exact v*(x_t, t) = E[x - eps | x_t] for x ~ N(mu, sigma^2 I): affine in x_t."""
    def v(x_t, t, y):
        t = t.to(x_t.dtype).view(-1, 1, 1, 1)
        a = 1 - t
        var = a ** 2 * sigma ** 2 + t ** 2
        return mu + (a * sigma ** 2 - t) / var * (x_t - a * mu)
    return v


def test_heun_beats_euler_on_gaussian_data():
    mu = torch.tensor([0.7, -1.2, 0.1], dtype=torch.float64).view(1, 3, 1, 1)
    sigma = 0.3
    x1, y = _noise(), torch.zeros(SHAPE[0], dtype=torch.long)
    exact = mu + sigma * x1  # the ODE transports N(0, I) to N(mu, sigma^2 I) monotonically
    v = _gaussian_velocity(mu, sigma)
    err_euler = (sample(v, x1, y, steps=50, method="euler") - exact).abs().max()
    err_heun = (sample(v, x1, y, steps=50, method="heun") - exact).abs().max()
    assert err_heun < err_euler / 10
    assert err_heun < 1e-3


def test_sde_reproducible_and_matches_gaussian_marginal():
    mu = torch.tensor([0.7, -1.2, 0.1], dtype=torch.float64).view(1, 3, 1, 1)
    sigma = 0.3
    v = _gaussian_velocity(mu, sigma)
    shape = (2000, 3, 2, 2)
    x1, y = _noise(3, shape), torch.zeros(shape[0], dtype=torch.long)
    run = lambda seed: sample(v, x1, y, steps=100, method="sde", generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert a.shape == shape and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a.mean(dim=(0, 2, 3)), mu.flatten(), atol=0.03)
    assert torch.allclose(a.std(dim=(0, 2, 3)), torch.full((3,), sigma, dtype=torch.float64), atol=0.03)
    assert torch.equal(sample(v, x1, y, steps=100, method="sde", sde_scale=0.0),
                       sample(v, x1, y, steps=100, method="euler"))


class FakeModel:
    """Conditional and unconditional outputs differ on every channel; records batch sizes."""

    null_class = 10

    def __init__(self):
        self.batches = []
        self.v_c = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64).view(1, 3, 1, 1)
        self.v_u = torch.tensor([0.5, -1.0, 4.0], dtype=torch.float64).view(1, 3, 1, 1)

    def __call__(self, x, t, y):
        self.batches.append(x.shape[0])
        uncond = (y == self.null_class).view(-1, 1, 1, 1)
        v = torch.where(uncond, self.v_u, self.v_c).expand_as(x)
        return torch.cat([v, torch.full_like(v, 99.0)], dim=1)  # learn_sigma-style extra channels


def test_guidance_on_all_channels_and_interval():
    m, x, y, s = FakeModel(), _noise(), torch.tensor([0, 3, 7, 9]), 4.0
    v = guided_velocity(m, x, 0.5, y, cfg_scale=s, null_class=10)
    expected = (m.v_u + s * (m.v_c - m.v_u)).expand_as(x)
    assert m.batches == [8]  # cond and uncond in one forward
    assert torch.equal(v, expected)
    assert torch.all(v != m.v_c)  # every channel is guided
    # outside the interval (and at cfg_scale 1): conditional only, single forward
    m.batches.clear()
    assert torch.equal(guided_velocity(m, x, 0.9, y, cfg_scale=s, guidance_interval=(0.1, 0.8), null_class=10),
                       m.v_c.expand_as(x))
    assert torch.equal(guided_velocity(m, x, 0.8, y, cfg_scale=s, guidance_interval=(0.1, 0.8), null_class=10),
                       expected)  # bounds are inclusive
    assert torch.equal(guided_velocity(m, x, 0.5, y, cfg_scale=1.0), m.v_c.expand_as(x))
    assert m.batches == [4, 8, 4]
    # through the sampler: one Euler step from t=1 to 0, null class taken from the model
    out = sample(m, x, y, steps=1, cfg_scale=s)
    assert torch.equal(out, x + expected)
    with pytest.raises(UserError):
        guided_velocity(lambda x, t, y: x, x, 0.5, y, cfg_scale=2.0)

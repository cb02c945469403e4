"""The pieces the three sampler families share: the family table, the one guided forward, the Euler/Heun step."""

import pytest
import torch

from dit import diffusion, flow, sit
from dit.guidance import guided_output, guided_velocity
from dit.models import build_dit
from dit.official import FAMILY_DEFAULTS
from dit.pipeline import ALL_METHODS, FAMILY_METHODS, SAMPLE_DEFAULTS, Generator
from dit.samplers import SAMPLER_FAMILIES, run_sampler
from dit.solvers import ode_step
from tokenizer.common.errors import UserError


def _model(seed=0, learn_sigma=True, t_scale=1000.0):
    torch.manual_seed(seed)
    m = build_dit("DiT-Ti/2", input_size=4, in_channels=4, num_classes=10, learn_sigma=learn_sigma, t_scale=t_scale)
    with torch.no_grad():
        for p in m.parameters():  # off the zero init, so outputs depend on inputs, time and class
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval().requires_grad_(False)


def test_one_table_names_every_family_and_its_samplers():
    assert FAMILY_METHODS == {"flow": flow.METHODS, "dit": diffusion.METHODS, "sit": sit.METHODS}
    assert {f.sample for f in SAMPLER_FAMILIES.values()} == {flow.sample, diffusion.sample, sit.sample}
    assert set(ALL_METHODS) == {"euler", "heun", "sde", "ddpm", "ddim", "ode"}
    assert SAMPLE_DEFAULTS["method"] in FAMILY_METHODS["flow"]
    for family, defaults in FAMILY_DEFAULTS.items():  # every published family samples by default with its own
        assert defaults["method"] in FAMILY_METHODS[family]


@pytest.mark.parametrize("family", ["flow", "dit", "sit"])
def test_the_generator_runs_each_family_sampler_as_a_direct_call_does(family):
    model = _model(learn_sigma=True, t_scale=1000.0 if family == "flow" else 1.0)
    gen = Generator(model=model, decoders={}, class_names=[str(i) for i in range(10)], z_mean=0.0, z_std=1.0,
                    latent_shape=(4, 4, 4), family=family)
    gen.defaults = dict(gen.defaults, cfg_channels=3, time_shift=2.0)
    noise, y = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 7])
    for method in FAMILY_METHODS[family]:
        settings = gen.sampler_settings(cfg_scale=3.0, steps=4, sampler=method)
        z = gen._sample_batch(noise, y, settings, torch.Generator().manual_seed(2))
        kwargs = {"time_shift": 2.0} if family == "flow" else {}
        direct = SAMPLER_FAMILIES[family].sample(model, noise, y, steps=4, method=method, cfg_scale=3.0,
                                                 cfg_channels=3, generator=torch.Generator().manual_seed(2), **kwargs)
        assert torch.equal(z, direct), (family, method)
        assert torch.equal(run_sampler(family, model, noise, y, settings, torch.Generator().manual_seed(2)), direct)
    with pytest.raises(UserError, match="unknown sampler"):
        gen.sampler_settings(sampler="ddpm" if family != "dit" else "euler")


def test_one_guided_forward_serves_velocity_and_eps_models():
    model, x, y = _model(3), torch.randn(3, 4, 4, 4), torch.tensor([0, 4, 9])
    calls = []

    def counted(x_, t_, y_):
        calls.append((x_.shape[0], t_.dtype, float(t_[0])))
        return model(x_, t_, y_)

    out_c = model(x, torch.full((3,), 0.25), y)
    out_u = model(x, torch.full((3,), 0.25), torch.full_like(y, 10))
    g3 = guided_output(counted, x, 0.25, y, 2.0, 3, 10)
    assert calls == [(6, torch.float32, 0.25)]  # conditional and null class in one batch
    torch.testing.assert_close(g3[:, :3], out_u[:, :3] + 2.0 * (out_c[:, :3] - out_u[:, :3]))
    torch.testing.assert_close(g3[:, 3:], out_c[:, 3:])  # the 4th channel and the variance: conditional
    # a velocity is the first C channels of the same forward, guided inside the interval only
    assert torch.equal(guided_velocity(model, x, 0.25, y, 2.0, (0.0, 1.0), 10, 3), g3[:, :4])
    assert torch.equal(guided_velocity(model, x, 0.25, y, 2.0, (0.5, 1.0), 10, 3), out_c[:, :4])
    calls.clear()
    assert torch.equal(guided_output(counted, x, 0.25, y, 1.0, 3, 10), out_c)  # cfg 1: one conditional forward
    assert calls == [(3, torch.float32, 0.25)]
    with pytest.raises(UserError, match="null class"):
        guided_output(model, x, 0.25, y, 2.0, None, None)


def test_euler_and_heun_steps_in_either_time_direction():
    x = torch.tensor([1.0, -2.0])

    def v(x_, t):  # dx/dtau = -x * (1 + tau)
        return -x_ * (1 + t)

    assert torch.equal(ode_step(v, x, 0.0, 0.5, "euler"), x + 0.5 * v(x, 0.0))
    heun = x + 0.25 * (v(x, 0.0) + v(x + 0.5 * v(x, 0.0), 0.5))
    assert torch.equal(ode_step(v, x, 0.0, 0.5, "heun"), heun)
    assert torch.equal(ode_step(v, x, 0.5, 0.0, "heun"), x + 0.25 * (v(x, 0.5) + v(x + 0.5 * v(x, 0.5), 0.0)))
    assert torch.equal(ode_step(v, x, 0.0, 0.5, "euler", v=torch.zeros(2)), x)  # a velocity already computed
    with pytest.raises(ValueError, match="unknown ODE step"):
        ode_step(v, x, 0.0, 0.5, "rk4")

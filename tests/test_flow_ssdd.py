"""Flow matching convention, the Euler time grid, and the public SSDD API (docs/ARCHITECTURE.md §4, §5)."""

import pytest
import torch

from tokenizer import SSDD, UserError
from tokenizer.flow import clean_estimate, euler_sample, flow_matching_loss, noisy_input, time_grid


def test_eight_step_grid_matches_the_official_one():
    expected = [1, 0.7656, 0.5625, 0.3906, 0.25, 0.1406, 0.0625, 0.0156, 0]
    assert time_grid(8, power=2).tolist() == pytest.approx(expected, abs=1e-4)
    assert time_grid(7, power=2).tolist() == pytest.approx([1, .7347, .5102, .3265, .1837, .0816, .0204, 0], abs=1e-4)
    assert time_grid(1, power=2).tolist() == [1.0, 0.0]
    for n in (2, 3, 13, 50):
        g = time_grid(n, power=2)
        assert len(g) == n + 1 and g[0] == 1 and g[-1] == 0 and bool((g[1:] < g[:-1]).all())


def test_path_target_and_one_step_estimate_are_consistent():
    x, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    t = torch.tensor([0.3, 0.9])
    x_t = noisy_input(x, t, eps)
    v = x - eps  # the exact velocity
    assert torch.allclose(clean_estimate(x_t, t, v), x, atol=1e-6)
    assert flow_matching_loss(v, x, eps) == 0
    # t = 1 is pure noise, t = 0 clean
    assert torch.equal(noisy_input(x, torch.ones(2), eps), eps)
    assert torch.equal(noisy_input(x, torch.zeros(2), eps), x)


@pytest.mark.parametrize("steps", [1, 2, 8])
def test_euler_with_exact_velocity_lands_on_the_data(steps):
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = euler_sample(lambda x_t, t: x - eps, eps, steps)
    assert torch.allclose(out, x, atol=1e-5)


def test_one_step_decode_is_noise_plus_velocity():
    torch.manual_seed(0)
    model = SSDD(encoder="f8c4", decoder="XS", encoder_base_channels=32).eval()
    z = torch.randn(1, 4, 4, 4)
    noise = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = model.decode(z, steps=1, noise=noise)
        v = model.decoder(noise, torch.ones(1), z)
    assert torch.allclose(out, noise + v, atol=1e-6)


def test_api_shapes_seeded_noise_and_train_step():
    torch.manual_seed(0)
    model = SSDD(encoder="f8c4", decoder="XS", encoder_base_channels=32)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    model.eval()
    with torch.no_grad():
        z = model.encode(x).mode()
        assert z.shape == (2, 4, 8, 8)
        a = model.decode(z, steps=2, generator=torch.Generator().manual_seed(1))
        b = model.decode(z, steps=2, generator=torch.Generator().manual_seed(1))
        assert a.shape == x.shape and torch.equal(a, b)
        assert torch.equal(model(x, steps=2, generator=torch.Generator().manual_seed(1)), a)
    model.train()
    out = model(x, generator=torch.Generator().manual_seed(0))
    assert set(out.losses) == {"diffusion"}  # encoder frozen: no KL
    assert out.features.shape == (2, 8 * 8, model.decoder.mid_channels)
    assert out.token_grid == (8, 8)
    out.losses["diffusion"].backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.decoder.conv_in.weight.grad is not None


def test_encoder_training_adds_kl_and_trains_the_encoder():
    model = SSDD(encoder="f8c4", decoder="XS", encoder_base_channels=32, encoder_train=True).train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(x, generator=torch.Generator().manual_seed(0))
    assert "kl" in out.losses
    with torch.no_grad():  # the batch mean of the per-sample KL
        torch.testing.assert_close(out.losses["kl"], model.encode(x).kl().mean())
    (out.losses["diffusion"] + out.losses["kl"]).backward()
    assert model.encoder.conv_in.weight.grad is not None


def test_distillation_hooks_from_noise_and_target():
    model = SSDD(encoder="f8c4", decoder="XS", encoder_base_channels=32).train()
    x, target = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    out = model(x, from_noise=True, target=target, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.t, torch.ones(2))
    assert torch.equal(out.x0_gt, target)


def test_bad_inputs_give_user_errors():
    model = SSDD(encoder="f8c4", decoder="XS", encoder_base_channels=32).eval()
    with pytest.raises(UserError, match="multiples of 8"):
        model.encode(torch.zeros(1, 3, 30, 30))
    with pytest.raises(UserError, match="noise must have shape"):
        model.decode(torch.zeros(1, 4, 4, 4), noise=torch.zeros(1, 3, 16, 16))
    with pytest.raises(UserError):
        SSDD(encoder="f8c4", decoder="Q")
    with pytest.raises(UserError):
        SSDD(encoder="f7x4", decoder="S")


def test_build_from_config_section(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ssdd:\n  encoder: f16c4\n  encoder_base_channels: 32\n  decoder: XS\n  compile: true\n"
                   "  fm_sampler: {steps: 3, t_pow_shift: 2.0}\n")
    model = SSDD.build(str(cfg))
    assert model.patch_size == 16 and model.decoder_name == "XS" and model.default_steps == 3
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    # a plain mapping without the `ssdd:` wrapper works too
    assert SSDD.build({"encoder": "f8c4", "encoder_base_channels": 32, "decoder": "XS"}, eval=False).training

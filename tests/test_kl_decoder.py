"""KL-VAE baseline decoder (LDM / SD-VAE layout) and its PatchGAN discriminator."""

import pytest
import torch
import torch.nn.functional as F

from tokenizer.common.errors import UserError
from tokenizer.kl_decoder import KLDecoder, build_kl_decoder
from tokenizer.losses import PatchDiscriminator, adaptive_gan_weight, generator_loss, hinge_d_loss

# diffusers 0.42.1, AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
# 4 x DownEncoderBlock2D / UpDecoderBlock2D), i.e. the SD-VAE config:
#   sum(p.numel() for p in vae.decoder.parameters())         == 49_490_179
#   sum(p.numel() for p in vae.post_quant_conv.parameters()) == 20
SD_VAE_DECODER_PARAMS = 49_490_179
SD_VAE_POST_QUANT_CONV_PARAMS = 20


def n_params(module, prefix=""):
    return sum(p.numel() for k, p in module.named_parameters() if k.startswith(prefix))


def test_f8c4_decoder_has_the_sd_vae_decoder_parameter_count():
    dec = build_kl_decoder("f8c4", base_channels=128)
    total = n_params(dec)
    post = n_params(dec, "post_quant_conv.")
    assert total - post == SD_VAE_DECODER_PARAMS
    assert post == SD_VAE_POST_QUANT_CONV_PARAMS


def test_ldm_key_layout():
    keys = set(build_kl_decoder("f8c4", base_channels=32).state_dict())
    for k in ["post_quant_conv.weight", "conv_in.weight", "mid.block_1.conv1.weight", "mid.attn_1.q.weight",
              "mid.attn_1.proj_out.weight", "mid.block_2.norm2.bias", "up.3.block.2.conv2.weight",
              "up.3.upsample.conv.weight", "up.1.block.0.nin_shortcut.weight", "up.0.block.2.conv1.weight",
              "norm_out.weight", "conv_out.weight"]:
        assert k in keys, k
    # The finest level has no upsample; each level has 3 ResNets.
    assert not any(k.startswith("up.0.upsample") for k in keys)
    assert not any(k.startswith("up.0.block.3") for k in keys)


@pytest.mark.parametrize("factor", [4, 8, 16])
@pytest.mark.parametrize("px", [32, 64])
def test_output_shapes(factor, px):
    torch.manual_seed(0)
    dec = KLDecoder(z_channels=3, patch_size=factor, base_channels=32).eval()
    z = torch.randn(2, 3, px // factor, px // factor)
    with torch.no_grad():
        x = dec.decode(z)
    assert x.shape == (2, 3, px, px)
    assert torch.isfinite(x).all()


def test_bad_inputs_are_user_errors():
    with pytest.raises(UserError):
        KLDecoder(4, patch_size=6)
    with pytest.raises(UserError):
        KLDecoder(4, patch_size=8, base_channels=48)
    with pytest.raises(UserError):
        KLDecoder(4, patch_size=8, base_channels=32)(torch.randn(1, 8, 4, 4))


def test_discriminator_patch_map_and_hinge_signs():
    torch.manual_seed(0)
    disc = PatchDiscriminator()
    assert disc(torch.randn(2, 3, 256, 256)).shape == (2, 1, 30, 30)
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)

    # A discriminator that already separates well: real scored +3, fake -3. D loss 0, G loss positive (bad for G).
    real, fake = torch.full((2, 1, 6, 6), 3.0), torch.full((2, 1, 6, 6), -3.0)
    assert hinge_d_loss(real, fake).item() == 0.0
    assert generator_loss(fake).item() == pytest.approx(3.0)
    # Swapped (D fooled): D loss is large, G loss negative.
    assert hinge_d_loss(fake, real).item() == pytest.approx(4.0)
    assert generator_loss(real).item() == pytest.approx(-3.0)
    # Undecided D (all zeros): hinge gives exactly 1.
    zero = torch.zeros(2, 1, 6, 6)
    assert hinge_d_loss(zero, zero).item() == pytest.approx(1.0)


def test_discriminator_learns_real_from_fake():
    """A few steps on an obvious toy case (smooth images vs. noise) drive the hinge loss down and the scores apart."""
    torch.manual_seed(0)
    disc = PatchDiscriminator(ndf=16)
    opt = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    ramp = torch.linspace(-1, 1, 32)
    real = (ramp[None, None, :, None] * ramp[None, None, None, :]).expand(4, 3, 32, 32).contiguous()
    fake = torch.randn(4, 3, 32, 32)
    first = None
    for _ in range(15):
        loss = hinge_d_loss(disc(real), disc(fake))
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Still in train mode (batch statistics), as the discriminator is used during GAN training.
    with torch.no_grad():
        assert disc(real).mean() > disc(fake).mean()
        assert hinge_d_loss(disc(real), disc(fake)).item() < first


def test_adaptive_gan_weight_balances_gradients():
    torch.manual_seed(0)
    dec = KLDecoder(4, patch_size=8, base_channels=32)
    x = dec(torch.randn(2, 4, 4, 4))
    rec = x.abs().mean()
    g = 10.0 * rec  # gradient 10x larger than rec's -> weight 1/10
    w = adaptive_gan_weight(rec, g, dec.last_layer)
    assert w.item() == pytest.approx(0.1, rel=1e-3)
    assert not w.requires_grad


@pytest.mark.slow
def test_a_few_steps_reduce_l1_on_a_fixed_batch():
    torch.manual_seed(0)
    dec = KLDecoder(z_channels=4, patch_size=8, base_channels=32)
    z = torch.randn(4, 4, 4, 4)
    # Smooth image-like targets in [-1, 1] (bilinear upsampling of 8x8 noise).
    target = F.interpolate(torch.rand(4, 3, 8, 8) * 2 - 1, size=32, mode="bilinear")
    opt = torch.optim.Adam(dec.parameters(), lr=1e-3)

    def l1():
        return (dec(z) - target).abs().mean()

    with torch.no_grad():
        before = l1().item()
    for _ in range(20):
        loss = l1()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = l1().item()
    # Measured: 0.36 -> 0.14. A broken backward path or a decoder that cannot fit 4 images stays near `before`.
    assert after < 0.6 * before, (before, after)

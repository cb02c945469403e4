"""The SSDD decoder's fast paths compute the plain formulas: modulation broadcast from latent resolution instead of
upsampled copies, upsampling convolutions folded to 2x2 kernels at the coarse resolution, the time modulation
folded into group_norm, in-place activations in inference, 1x1 convolutions as matrix products, channels-last maps
and cache-sized batch chunks on the CPU. A reference forward written with the plain operations (what the decoder
computed before, on NCHW maps and dense attention) gives the same outputs and gradients with the same state dict;
a 1,024-px SSDD-S decode stays under 4 GB resident."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tokenizer import SSDD
from tokenizer.decoder import (
    AdaGroupNorm,
    SSDDDecoder,
    pointwise_conv,
    resize_nearest,
    spatial_affine,
    subpixel_upsample_conv,
    time_modulated_norm,
    timestep_embedding,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CL = torch.channels_last


@pytest.fixture(autouse=True)
def single_thread(one_thread):  # conftest.py
    yield


def rel(a, b) -> float:
    return float(((a - b).norm() / b.norm()).detach())


# ----------------------------------------------------------------------------- the plain formulas


def ref_adagn(norm: AdaGroupNorm, x, ctx):
    scale, shift = norm.ctx_proj(ctx).chunk(2, dim=1)
    scale, shift = resize_nearest(scale, x.shape[-2:]), resize_nearest(shift, x.shape[-2:])  # full-size copies
    return norm.norm(x) * (1 + scale) + shift


def ref_resnet(block, x, temb, ctx):
    h = block.conv1(F.silu(ref_adagn(block.norm1, x, ctx)))
    scale, shift = block.time_emb_proj(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
    h = block.conv2(F.silu(block.norm2(h) * (1 + scale) + shift))
    return (x if block.conv_shortcut is None else block.conv_shortcut(x)) + h


def ref_forward(d: SSDDDecoder, x_t, t, z):
    """The decoder as plain operations on NCHW maps, dense attention (every module's own weights)."""
    ctx = d.ada_ctx_proj(z)
    temb = d.time_embedding(timestep_embedding(t * d.timescale, d.conv_in.out_channels))
    h = d.conv_in(torch.cat([x_t, resize_nearest(z, x_t.shape[-2:])], dim=1))
    skips = [h]
    for block in d.down_blocks:
        for resnet in block.resnets:
            h = ref_resnet(resnet, h, temb, ctx)
            skips.append(h)
        if block.downsamplers is not None:
            h = block.downsamplers[0](h)
            skips.append(h)
    mid = d.mid_block
    b, c, gh, gw = h.shape
    tokens = mid.proj_in(mid.norm(h).flatten(2).transpose(1, 2))
    for block in mid.transformer_blocks:
        tokens = block(tokens, ctx, (gh, gw))  # no plan: the dense reference
    h = h + mid.proj_out(tokens).transpose(1, 2).reshape(b, c, gh, gw)
    for block in d.up_blocks:
        for resnet in block.resnets:
            h = ref_resnet(resnet, torch.cat([h, skips.pop()], dim=1), temb, ctx)
        if block.upsamplers is not None:
            h = block.upsamplers[0].conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # upsampled copy
    return d.conv_out(F.silu(d.conv_norm_out(h)))


def random_decoder(size="XS", z_channels=4, seed=0) -> SSDDDecoder:
    torch.manual_seed(seed)
    model = SSDDDecoder(size, z_channels=z_channels)
    with torch.no_grad():  # off the zero init, so that every branch matters
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.05 if p.dim() > 1 else 0.1))
    return model


# ----------------------------------------------------------------------------- whole decoder


@pytest.mark.parametrize("factor,z_channels,batch,hw", [(8, 4, 1, (64, 64)), (8, 4, 2, (48, 80)),
                                                        (16, 16, 2, (64, 64)), (4, 8, 1, (32, 48))])
def test_decoder_equals_the_plain_reference(factor, z_channels, batch, hw):
    model = random_decoder(z_channels=z_channels)
    model.mid_block.attention = "auto"
    g = torch.Generator().manual_seed(factor)
    x = torch.randn(batch, 3, *hw, generator=g)
    z = torch.randn(batch, z_channels, hw[0] // factor, hw[1] // factor, generator=g)
    t = torch.rand(batch, generator=g)
    with torch.no_grad():
        ref = ref_forward(model, x, t, z)
    with torch.inference_mode():  # in-place paths
        fast = model(x, t, z)
    assert fast.is_contiguous() and fast.shape == ref.shape
    assert rel(fast, ref) <= 1e-5

    # training: the out-of-place paths, same values and gradients
    grads = []
    for forward in (ref_forward, lambda m, *a: m(*a)):
        model.zero_grad()
        xx, zz = x.clone().requires_grad_(), z.clone().requires_grad_()
        out = forward(model, xx, t, zz)
        (out * x).sum().backward()
        params = torch.cat([p.grad.flatten() for p in model.parameters()])
        grads.append((out.detach(), xx.grad, zz.grad, params))
    for what, a, b in zip(("output", "x grad", "z grad", "parameter grads"), grads[1], grads[0]):
        assert rel(a, b) <= 1e-5, (what, rel(a, b))


def test_cpu_inference_decodes_big_batches_in_chunks(monkeypatch):
    """A CPU inference batch whose maps pass the cache budget runs in chunks; outputs and REPA tokens are the whole
    batch's. Training (tracked) and small maps run in one call."""
    import tokenizer.decoder as decoder

    model = random_decoder()
    x, z, t = torch.randn(3, 3, 32, 32), torch.randn(3, 4, 4, 4), torch.rand(3)
    with torch.inference_mode():
        whole_v, whole_f = model(x, t, z, return_features=True)
        assert model.cpu_chunk(x, z) == 3
        monkeypatch.setattr(decoder, "CPU_CHUNK_BYTES", 2 * 32 * 32 * 32 * 4)  # two XS images (C0 = 32) per call
        assert model.cpu_chunk(x, z) == 2
        calls = []
        monkeypatch.setattr(model, "forward_batch", lambda *a: calls.append(a[0].shape[0]) or
                            SSDDDecoder.forward_batch(model, *a))
        v, f = model(x, t, z, return_features=True)
        assert model(x, t[:1], z).shape == x.shape  # one t for the batch
    assert calls == [2, 1, 2, 1]
    assert rel(v, whole_v) <= 1e-6 and rel(f, whole_f) <= 1e-6
    assert model.cpu_chunk(x, z.requires_grad_()) == 3  # tracked: one call


def test_upsample_mode_from_config_same_result():
    """ssdd.upsample=nearest runs the upsamplings as written: same weights, same images; a wrong value is refused."""
    from tokenizer.common.config import load_config
    from tokenizer.common.errors import UserError
    from tokenizer.common.validation import check_config
    from tokenizer.config_checks import SSDD_CHECKS
    from tokenizer.evaluation import model_from_config

    fast = random_decoder()
    plain = SSDD.build({"ssdd": {"encoder": "f8c4", "encoder_base_channels": 32, "decoder": "XS",
                                 "upsample": "nearest"}}).decoder
    plain.load_state_dict(fast.state_dict())
    assert all(not m.subpixel for m in plain.modules() if hasattr(m, "subpixel"))
    x, z, t = torch.randn(1, 3, 64, 64), torch.randn(1, 4, 8, 8), torch.rand(1)
    with torch.inference_mode():
        assert rel(fast(x, t, z), plain(x, t, z)) <= 1e-5
    cfg = load_config("ssdd.yaml", ["ssdd.decoder=XS", "ssdd.encoder_base_channels=32", "ssdd.upsample=nearest"])
    assert not model_from_config(cfg).decoder.up_blocks[0].upsamplers[0].subpixel
    with pytest.raises(UserError, match="ssdd.upsample"):
        check_config(load_config("ssdd.yaml", ["ssdd.upsample=bilinear"]), SSDD_CHECKS)
    with pytest.raises(UserError, match="unknown upsample mode 'bilinear'"):
        SSDDDecoder("XS", upsample="bilinear")


def test_state_dict_unchanged_and_features_returned():
    """Same keys and shapes as the released layout (test_tokenizer_models checks names); REPA's tokens come back."""
    model = random_decoder("S")
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert keys["down_blocks.0.resnets.0.norm1.ctx_proj.weight"] == (128, 64, 1, 1)
    assert keys["up_blocks.3.resnets.0.conv_shortcut.weight"] == (64, 160, 1, 1)
    x, z, t = torch.randn(1, 3, 64, 64), torch.randn(1, 4, 8, 8), torch.rand(1)
    with torch.inference_mode():
        v, feats = model(x, t, z, return_features=True)
    assert v.shape == x.shape and feats.shape == (1, 64, model.mid_channels)


# ----------------------------------------------------------------------------- the pieces


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
@pytest.mark.parametrize("grad", [False, True])
def test_spatial_affine_is_upsample_then_affine(layout, grad):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 32, 24, 16, generator=g).contiguous(memory_format=layout)
    scale, shift = torch.randn(2, 32, 3, 2, generator=g), torch.randn(2, 32, 3, 2, generator=g)
    expected = y * F.interpolate(scale, size=(24, 16)) + F.interpolate(shift, size=(24, 16))
    if grad:
        scale.requires_grad_()
    with torch.set_grad_enabled(grad):
        out = spatial_affine(y.clone(memory_format=torch.preserve_format), scale, shift)
    assert out.shape == y.shape and out.is_contiguous(memory_format=layout)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    if grad:
        out.sum().backward()
        block_sums = y.unfold(2, 8, 8).unfold(3, 8, 8).sum((-1, -2))  # d(sum)/d(scale): y summed over its block
        torch.testing.assert_close(scale.grad, block_sums, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_time_modulation_folded_into_group_norm(batch, layout):
    norm = torch.nn.GroupNorm(32, 64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    h = torch.randn(batch, 64, 8, 12).contiguous(memory_format=layout)
    scale1, shift = torch.randn(batch, 64), torch.randn(batch, 64)
    expected = norm(h) * scale1[:, :, None, None] + shift[:, :, None, None]
    torch.testing.assert_close(time_modulated_norm(norm, h, scale1, shift), expected, atol=1e-5, rtol=1e-5)


def test_ada_group_norm_on_every_latent_factor():
    norm = AdaGroupNorm(64, 16)
    with torch.no_grad():
        norm.ctx_proj.weight.normal_(std=0.1)
    for latent in (2, 8, 16, 32):  # finer than the map (f4 at the coarsest level), equal, coarser
        ctx = torch.randn(2, 16, latent, latent)
        for layout in (torch.contiguous_format, CL):
            x = torch.randn(2, 64, 16, 16).contiguous(memory_format=layout)
            c = ctx.contiguous(memory_format=layout)
            with torch.inference_mode():
                torch.testing.assert_close(norm(x, c), ref_adagn(norm, x, ctx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
@pytest.mark.parametrize("grad", [False, True])
def test_subpixel_upsample_conv_is_upsample_then_conv(layout, grad):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 48, 3, padding=1)
    x = torch.randn(2, 32, 5, 7).contiguous(memory_format=layout).requires_grad_(grad)
    expected = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    got = subpixel_upsample_conv(conv, x)
    assert got.shape == (2, 48, 10, 14) and rel(got, expected) <= 1e-6
    assert got.is_contiguous(memory_format=layout)
    if grad:
        (ge,) = torch.autograd.grad((expected * expected.detach()).sum(), conv.weight)
        (gg,) = torch.autograd.grad((got * expected.detach()).sum(), conv.weight)
        assert rel(gg, ge) <= 1e-6


def test_kl_decoder_subpixel_option_same_function():
    """The KL-VAE baseline upsamples the classic way by default; the option gives it the same exact shortcut."""
    from tokenizer.kl_decoder import build_kl_decoder

    torch.manual_seed(0)
    classic = build_kl_decoder("f8c4", base_channels=32)
    fast = build_kl_decoder("f8c4", base_channels=32, subpixel_upsample=True)
    fast.load_state_dict(classic.state_dict())
    assert not any(m.subpixel for m in classic.modules() if hasattr(m, "subpixel"))
    z = torch.randn(1, 4, 6, 5)
    with torch.no_grad():
        assert rel(fast(z), classic(z)) <= 1e-5


def test_pointwise_conv_is_the_1x1_convolution():
    conv = torch.nn.Conv2d(48, 96, 1)
    x = torch.randn(2, 48, 10, 6)
    for layout in (torch.contiguous_format, CL):
        xx = x.contiguous(memory_format=layout)
        out = pointwise_conv(conv, xx)
        assert out.is_contiguous(memory_format=layout)
        torch.testing.assert_close(out, conv(x), atol=1e-5, rtol=1e-5)


def test_decode_noise_is_the_noise_decode_draws():
    """Timings draw the noise first and pass it in: the same images as letting decode draw it."""
    model = SSDD(encoder="f8c4", decoder="XS", encoder_base_channels=32).eval()
    z = torch.randn(2, 4, 4, 4)
    noise = model.decode_noise(z, torch.Generator().manual_seed(5))
    assert noise.shape == (2, 3, 32, 32) == model.image_shape(z) and noise.dtype == z.dtype
    with torch.inference_mode():
        drawn = model.decode(z, steps=2, generator=torch.Generator().manual_seed(5))
        assert torch.equal(model.decode(z, steps=2, noise=noise), drawn)


# ----------------------------------------------------------------------------- memory


@pytest.mark.slow
def test_1024px_ssdd_s_decode_under_4_gb_resident():
    """Peak resident memory (VmHWM) of a fresh process that decodes one 1,024-px image with SSDD-S in one step."""
    code = (
        "import torch\n"
        "from tokenizer import SSDD\n"
        "torch.set_num_threads(1)\n"
        "m = SSDD(encoder='f8c4', decoder='S', encoder_base_channels=32).eval()\n"
        "z = torch.randn(1, 4, 128, 128)\n"
        "noise = m.decode_noise(z)\n"
        "with torch.inference_mode():\n"
        "    assert m.decode(z, steps=1, noise=noise).shape == (1, 3, 1024, 1024)\n"
        "print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    peak_gb = int(res.stdout.strip().splitlines()[-1]) / 2**20
    assert peak_gb < 4.0, peak_gb

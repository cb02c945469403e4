"""Encoder / decoder architecture checks against docs/ARCHITECTURE.md §2, §3 and the checkpoint layout of §9.

Big models are built on the meta device (no memory, no init cost); forward passes use small widths.
"""

import pytest
import torch
import torch.nn.functional as F

from tokenizer.common.errors import UserError
from tokenizer.decoder import DECODER_SIZES, RelativePositionBias, SSDDDecoder, TransformerBlock, timestep_embedding
from tokenizer.encoder import DiagonalGaussian, Encoder, build_encoder, parse_encoder_name


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------
# Parameter counts and checkpoint layout
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, expected",
    [
        ("S", 14_057_059),
        ("B", 21_140_459),
        ("M", 50_280_147),
        ("L", 90_759_939),
        ("XL", 161_272_835),
        ("H", 362_688_003),
    ],
)
def test_decoder_param_count(size, expected):
    with torch.device("meta"):
        assert n_params(SSDDDecoder(size)) == expected


def test_decoder_size_table_heads_rule():
    for size, cfg in DECODER_SIZES.items():
        with torch.device("meta"):
            m = SSDDDecoder(size)
        c_mid = m.mid_block.proj_in.in_features
        expected = 4 if size == "S" else min(16, max(4, c_mid // 64))
        assert cfg["heads"] == expected, size
        assert c_mid % cfg["heads"] == 0


def test_encoder_param_count():
    with torch.device("meta"):
        assert n_params(build_encoder("f8c4")) == 34_163_664


def _full_state_dict_shapes():
    with torch.device("meta"):
        enc, dec = build_encoder("f8c4"), SSDDDecoder("M")
    shapes = {f"encoder.{k}": tuple(v.shape) for k, v in enc.state_dict().items()}
    shapes.update({f"decoder.{k}": tuple(v.shape) for k, v in dec.state_dict().items()})
    assert not list(enc.buffers()) and not list(dec.buffers())  # index tables are computed, never stored
    return shapes


def test_checkpoint_layout_f8c4_M():
    shapes = _full_state_dict_shapes()
    assert len(shapes) == 536
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 84_443_811
    blk = "decoder.mid_block.transformer_blocks.11."
    expected = {
        "decoder.conv_in.weight": (96, 7, 3, 3),
        "decoder.time_embedding.linear_1.weight": (384, 96),
        "decoder.time_embedding.linear_2.weight": (384, 384),
        "decoder.ada_ctx_proj.0.weight": (96, 4, 3, 3),
        "decoder.ada_ctx_proj.2.weight": (96, 96, 3, 3),
        "decoder.down_blocks.0.resnets.0.norm1.ctx_proj.weight": (192, 96, 1, 1),
        "decoder.down_blocks.0.resnets.0.time_emb_proj.weight": (192, 384),
        "decoder.down_blocks.1.resnets.0.conv_shortcut.weight": (192, 96, 1, 1),
        "decoder.down_blocks.2.downsamplers.0.conv.weight": (288, 288, 3, 3),
        "decoder.mid_block.norm.weight": (288,),
        "decoder.mid_block.proj_in.weight": (288, 288),
        blk + "norm1.linear.weight": (576, 96),
        blk + "attn1.to_q.weight": (288, 288),
        blk + "attn1.to_k.weight": (288, 288),
        blk + "attn1.to_v.weight": (288, 288),
        blk + "attn1.out_proj.bias": (288,),
        blk + "norm2.weight": (288,),
        blk + "ff.proj_in_act.proj.weight": (2304, 288),
        blk + "ff.proj_out.weight": (288, 1152),
        blk + "relative_position_bias.relative_bias_table": (15, 15, 4),
        "decoder.mid_block.proj_out.weight": (288, 288),
        "decoder.up_blocks.0.resnets.2.conv1.weight": (288, 576, 3, 3),
        "decoder.up_blocks.2.upsamplers.0.conv.weight": (192, 192, 3, 3),
        "decoder.up_blocks.3.resnets.2.norm1.ctx_proj.weight": (384, 96, 1, 1),
        "decoder.conv_norm_out.weight": (96,),
        "decoder.conv_out.weight": (3, 96, 3, 3),
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.block.0.nin_shortcut.weight": (512, 256, 1, 1),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "encoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "encoder.out_proj.weight": (8, 8, 1, 1),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    absent = [
        blk + "attn1.to_q.bias",
        "encoder.down.3.downsample.conv.weight",  # no downsample after the last level
        "decoder.down_blocks.3.downsamplers.0.conv.weight",
        "decoder.up_blocks.3.upsamplers.0.conv.weight",
        "decoder.mid_block.transformer_blocks.12.norm2.weight",
    ]
    for key in absent:
        assert key not in shapes, key
    # Exactly 2 down / 3 up ResNets per level, 12 transformer blocks.
    assert {k.split(".resnets.")[1][0] for k in shapes if "down_blocks" in k and ".resnets." in k} == {"0", "1"}
    assert {k.split(".resnets.")[1][0] for k in shapes if "up_blocks" in k and ".resnets." in k} == {"0", "1", "2"}


def test_decoder_init():
    torch.manual_seed(0)
    d = SSDDDecoder("XS")
    assert all(r.conv2.weight.abs().sum() == 0 for r in d.down_blocks[0].resnets)
    blk = d.mid_block.transformer_blocks[0]
    assert blk.ff.proj_out.weight.abs().sum() == 0
    assert blk.relative_position_bias.relative_bias_table.abs().sum() == 0
    assert abs(d.conv_in.weight.std().item() - 0.02) < 0.003
    assert d.conv_in.bias.abs().sum() == 0 and blk.attn1.out_proj.bias.abs().sum() == 0


def test_timestep_embedding_cos_first():
    emb = timestep_embedding(torch.zeros(2), 8)
    assert torch.equal(emb, torch.tensor([[1.0] * 4 + [0.0] * 4] * 2))


# ---------------------------------------------------------------------------------------------------------
# Forward shapes
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, factor", [("f8c4", 8), ("f16c4", 16), ("f4c4", 4)])
def test_encode_decode_shapes(name, factor):
    torch.manual_seed(0)
    enc = build_encoder(name, base_channels=32).eval()
    dec = SSDDDecoder("XS").eval()
    for res, batch in [(32, 2), (64, 2), (256, 1)]:
        x = torch.rand(batch, 3, res, res) * 2 - 1
        with torch.no_grad():
            post = enc(x)
            z = post.sample()
            assert z.shape == (batch, 4, res // factor, res // factor)
            t = torch.rand(batch)
            v, feats = dec(torch.randn_like(x), t, z, return_features=True)
        assert v.shape == x.shape and torch.isfinite(v).all()
        assert feats.shape == (batch, (res // 8) ** 2, 96)


def test_default_encoder_forward():
    enc = Encoder().eval()  # the real f8c4 widths, at a tiny resolution
    with torch.no_grad():
        post = enc(torch.zeros(1, 3, 32, 32))
    assert post.mode().shape == (1, 4, 4, 4) and post.kl().shape == (1,)


def test_decoder_rejects_bad_shapes():
    dec = SSDDDecoder("XS")
    with pytest.raises(UserError):
        dec(torch.zeros(1, 3, 36, 36), torch.zeros(1), torch.zeros(1, 4, 4, 4))  # not a multiple of 8
    with pytest.raises(UserError):
        dec(torch.zeros(1, 3, 32, 32), torch.zeros(1), torch.zeros(1, 4, 3, 3))  # grids that do not divide
    with pytest.raises(UserError):
        dec(torch.zeros(1, 3, 32, 32), torch.zeros(1), torch.zeros(1, 8, 4, 4))  # wrong channel count


# ---------------------------------------------------------------------------------------------------------
# Posterior
# ---------------------------------------------------------------------------------------------------------


def test_diagonal_gaussian():
    mean = torch.randn(2, 3, 4, 4)
    post = DiagonalGaussian(torch.cat([mean, torch.zeros_like(mean)], dim=1))
    assert torch.equal(post.mode(), mean)
    assert torch.allclose(post.std, torch.ones_like(mean)) and torch.allclose(post.var, torch.ones_like(mean))

    unit = DiagonalGaussian(torch.zeros(2, 6, 4, 4))
    assert unit.kl().shape == (2,) and torch.allclose(unit.kl(), torch.zeros(2))
    expected_kl = 0.5 * mean.pow(2).sum(dim=(1, 2, 3))
    assert torch.allclose(post.kl(), expected_kl)

    s1 = post.sample(torch.Generator().manual_seed(3))
    s2 = post.sample(torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2) and not torch.equal(s1, mean)

    wild = DiagonalGaussian(torch.cat([mean, torch.full_like(mean, 100.0)], dim=1))
    assert wild.logvar.max() == 20.0
    wild = DiagonalGaussian(torch.cat([mean, torch.full_like(mean, -100.0)], dim=1))
    assert wild.logvar.min() == -30.0


# ---------------------------------------------------------------------------------------------------------
# Local attention
# ---------------------------------------------------------------------------------------------------------


def test_relative_bias_is_local():
    rpb = RelativePositionBias(window=8, heads=4)
    bias = rpb(16, 16)
    assert bias.shape == (4, 256, 256)
    centre = 8 * 16 + 8
    assert int((bias[0, centre] > -1e6).sum()) == 225
    assert (rpb(4, 4) > -1e6).all()  # grids smaller than the window: every offset is inside


def test_transformer_block_is_local_and_bias_learns():
    torch.manual_seed(0)
    dim, grid = 64, (16, 16)
    block = TransformerBlock(dim, heads=4, ctx_channels=32, window=8)
    with torch.no_grad():  # leave the zero init so every path contributes
        block.relative_position_bias.relative_bias_table.normal_()
        block.ff.proj_out.weight.normal_(std=0.02)
    x = torch.randn(1, 256, dim)
    ctx = torch.randn(1, 32, *grid)

    x2 = x.clone()
    x2[0, 8 * 16 + 8] += torch.randn(dim)  # not a constant: LayerNorm would remove a uniform shift
    with torch.no_grad():
        diff = (block(x2, ctx, grid) - block(x, ctx, grid)).abs().amax(-1)[0].view(grid)
    ys, xs = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    inside = ((ys - 8).abs() <= 7) & ((xs - 8).abs() <= 7)
    assert diff[inside].min() > 1e-4 and diff[~inside].max() == 0  # -1e7 logits give exact zeros

    fresh = TransformerBlock(dim, heads=4, ctx_channels=32, window=8)  # zero-initialised table
    (fresh(x, ctx, grid) * torch.randn(1, 256, dim)).sum().backward()
    grad = fresh.relative_position_bias.relative_bias_table.grad
    assert grad is not None and grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# User errors
# ---------------------------------------------------------------------------------------------------------


def test_user_errors():
    with pytest.raises(UserError):
        SSDDDecoder("Q")
    for bad in ["f8", "f7c4", "f8c0", "c4f8", "f8c4x", "vae"]:
        with pytest.raises(UserError):
            parse_encoder_name(bad)
    assert parse_encoder_name("f16c16") == (16, 16)
    assert parse_encoder_name("f8c4") == (8, 4)


def test_modulation_halves_follow_the_official_order():
    """Released weights only decode correctly if each projection's halves mean what they meant upstream:
    AdaLN (transformer) is (shift, scale); AdaGN (ResNet norm1) is (scale, shift)."""
    from tokenizer.decoder import AdaGroupNorm, AdaLayerNorm

    torch.manual_seed(0)
    x, ctx = torch.randn(2, 16, 8), torch.randn(2, 4, 4, 4)  # 16 tokens of width 8 on a 4x4 grid
    ln = AdaLayerNorm(8, 4)
    torch.nn.init.zeros_(ln.linear.weight)
    with torch.no_grad():
        ln.linear.bias.copy_(torch.cat([torch.full((8,), 0.5), torch.full((8,), 2.0)]))  # shift 0.5, scale 2
    expected = F.layer_norm(x, (8,)) * 3.0 + 0.5
    assert torch.allclose(ln(x, ctx, (4, 4)), expected, atol=1e-5)

    gn = AdaGroupNorm(32, 4)
    torch.nn.init.zeros_(gn.ctx_proj.weight)
    with torch.no_grad():
        gn.ctx_proj.bias.copy_(torch.cat([torch.full((32,), 2.0), torch.full((32,), 0.5)]))  # scale 2, shift 0.5
    h = torch.randn(2, 32, 8, 8)
    assert torch.allclose(gn(h, ctx), F.group_norm(h, 32, eps=1e-5) * 3.0 + 0.5, atol=1e-5)

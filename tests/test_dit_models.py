"""DiT model: published sizes, published checkpoint key layout, forward semantics."""

import math

import pytest
import torch
import torch.nn.functional as F

from dit.models import DiT, DiT_models, build_dit, sincos_pos_embed_2d
from tokenizer.common.errors import UserError

PUBLISHED_PARAM_COUNTS = {  # input 32x32x4, 1000 classes, learn_sigma, pos_embed counted
    "DiT-S/2": 32_963_360,
    "DiT-B/2": 130_512_416,
    "DiT-L/2": 458_102_816,
    "DiT-XL/2": 675_129_632,
}
IMAGENET_KW = dict(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)


def _meta(name, **kw):
    with torch.device("meta"):
        return build_dit(name, **{**IMAGENET_KW, **kw})


# Published DiT-XL/2 (256x256 ImageNet) checkpoint: non-block tensors and block 0, written
# out by hand from the released layout. Norms have no affine parameters, hence no keys.
XL2_NON_BLOCK = {
    "x_embedder.proj.weight": (1152, 4, 2, 2),
    "x_embedder.proj.bias": (1152,),
    "t_embedder.mlp.0.weight": (1152, 256),
    "t_embedder.mlp.0.bias": (1152,),
    "t_embedder.mlp.2.weight": (1152, 1152),
    "t_embedder.mlp.2.bias": (1152,),
    "y_embedder.embedding_table.weight": (1001, 1152),
    "pos_embed": (1, 256, 1152),
    "final_layer.linear.weight": (32, 1152),
    "final_layer.linear.bias": (32,),
    "final_layer.adaLN_modulation.1.weight": (2304, 1152),
    "final_layer.adaLN_modulation.1.bias": (2304,),
}
XL2_BLOCK0 = {
    "blocks.0.attn.qkv.weight": (3456, 1152),
    "blocks.0.attn.qkv.bias": (3456,),
    "blocks.0.attn.proj.weight": (1152, 1152),
    "blocks.0.attn.proj.bias": (1152,),
    "blocks.0.mlp.fc1.weight": (4608, 1152),
    "blocks.0.mlp.fc1.bias": (4608,),
    "blocks.0.mlp.fc2.weight": (1152, 4608),
    "blocks.0.mlp.fc2.bias": (1152,),
    "blocks.0.adaLN_modulation.1.weight": (6912, 1152),
    "blocks.0.adaLN_modulation.1.bias": (6912,),
}
XL2_DEPTH = 28


def dit_layout(h, depth, p, c_in, c_out, rows, tokens):
    """The published layout for any size, by the same naming as XL2_* above."""
    keys = {
        "x_embedder.proj.weight": (h, c_in, p, p),
        "x_embedder.proj.bias": (h,),
        "t_embedder.mlp.0.weight": (h, 256),
        "t_embedder.mlp.0.bias": (h,),
        "t_embedder.mlp.2.weight": (h, h),
        "t_embedder.mlp.2.bias": (h,),
        "y_embedder.embedding_table.weight": (rows, h),
        "pos_embed": (1, tokens, h),
        "final_layer.linear.weight": (p * p * c_out, h),
        "final_layer.linear.bias": (p * p * c_out,),
        "final_layer.adaLN_modulation.1.weight": (2 * h, h),
        "final_layer.adaLN_modulation.1.bias": (2 * h,),
    }
    for i in range(depth):
        keys.update({
            f"blocks.{i}.attn.qkv.weight": (3 * h, h),
            f"blocks.{i}.attn.qkv.bias": (3 * h,),
            f"blocks.{i}.attn.proj.weight": (h, h),
            f"blocks.{i}.attn.proj.bias": (h,),
            f"blocks.{i}.mlp.fc1.weight": (4 * h, h),
            f"blocks.{i}.mlp.fc1.bias": (4 * h,),
            f"blocks.{i}.mlp.fc2.weight": (h, 4 * h),
            f"blocks.{i}.mlp.fc2.bias": (h,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * h, h),
            f"blocks.{i}.adaLN_modulation.1.bias": (6 * h,),
        })
    return keys


@pytest.mark.parametrize("name", list(PUBLISHED_PARAM_COUNTS))
def test_published_parameter_counts(name):
    model = _meta(name)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAM_COUNTS[name]


def test_all_table_names_build():
    assert len(DiT_models) == 20
    for size in ("Ti", "S", "B", "L", "XL"):
        for p in (1, 2, 4, 8):
            model = _meta(f"DiT-{size}/{p}")
            assert model.patch_size == p
            assert model.pos_embed.shape[1] == (32 // p) ** 2


def test_cpu_size_ti_is_in_the_table_and_builds():
    # DiT-Ti is this project's CPU size (not a paper size): depth 6, hidden 192, 3 heads.
    model = build_dit("DiT-Ti/1", input_size=4, in_channels=4, num_classes=10, learn_sigma=False)
    assert len(model.blocks) == 6 and model.num_heads == 3 and model.pos_embed.shape == (1, 16, 192)
    layout = dit_layout(192, 6, 1, 4, 4, 11, 16)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout
    assert sum(p.numel() for p in model.parameters()) == sum(math.prod(s) for s in layout.values()) == 4_166_020
    out = model(torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([3, 7]))
    assert out.shape == (2, 4, 4, 4)


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError, match="DiT-XL/2"):
        build_dit("DiT-XXL/2")


def test_xl2_state_dict_has_published_layout():
    sd = {k: tuple(v.shape) for k, v in _meta("DiT-XL/2").state_dict().items()}
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    assert blocks == set(range(XL2_DEPTH))
    assert {k: v for k, v in sd.items() if not k.startswith("blocks.")} == XL2_NON_BLOCK
    assert {k: v for k, v in sd.items() if k.startswith("blocks.0.")} == XL2_BLOCK0
    # The hand-written layout is the general formula at XL/2 sizes, and sums to the published count.
    layout = dit_layout(1152, XL2_DEPTH, 2, 4, 8, 1001, 256)
    assert sd == layout
    assert sum(math.prod(s) for s in layout.values()) == PUBLISHED_PARAM_COUNTS["DiT-XL/2"]


def test_published_layout_loads_strictly():
    model = build_dit("DiT-S/2", input_size=16, in_channels=4, num_classes=10, learn_sigma=True)
    layout = dit_layout(384, 12, 2, 4, 8, 11, 64)
    zeros = {k: torch.zeros(s) for k, s in layout.items()}
    model.load_state_dict(zeros, strict=True)
    assert model.pos_embed.abs().sum() == 0 and not model.pos_embed.requires_grad


def test_no_dropout_means_no_null_row_and_qk_norm_adds_keys():
    model = _meta("DiT-S/2", class_dropout_prob=0.0)
    assert model.y_embedder.embedding_table.weight.shape[0] == 1000 and model.null_class is None
    model = _meta("DiT-S/2", qk_norm=True)
    assert model.state_dict()["blocks.3.attn.q_norm.weight"].shape == (64,)
    assert "blocks.3.attn.k_norm.weight" in model.state_dict()


def _tiny(**kw):
    return DiT(**{**dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                         num_heads=4, num_classes=10), **kw})


def test_forward_shapes_zero_init_and_sdpa(monkeypatch):
    torch.manual_seed(0)
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 5, 9])
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _tiny().eval()
    out = model(x, t, y)
    assert out.shape == (3, 8, 8, 8)
    assert torch.all(out == 0)  # adaLN-Zero + zero final layer
    assert len(calls) == 2  # one fused attention call per block
    assert _tiny(learn_sigma=False, qk_norm=True)(x, t, y).shape == (3, 4, 8, 8)


def test_unpatchify_inverts_patch_order_and_forward_depends_on_inputs():
    torch.manual_seed(0)
    model = _tiny(learn_sigma=False).eval()
    for p in model.parameters():  # leave the zero init so the output depends on x, t and y
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    out = model(x, torch.tensor([0.2, 0.2]), y)
    assert not torch.allclose(out, model(x, torch.tensor([0.7, 0.7]), y))
    assert not torch.allclose(out, model(x, torch.tensor([0.2, 0.2]), torch.tensor([3, 4])))
    # unpatchify: token (i, j) channel block (p_row, p_col, c) lands at pixel (2i+p_row, 2j+p_col).
    tokens = torch.arange(16 * 16, dtype=torch.float32).reshape(1, 16, 16)
    img = model.unpatchify(tokens)
    assert img[0, 3, 2 * 1 + 1, 2 * 2 + 0] == tokens[0, 1 * 4 + 2, (1 * 2 + 0) * 4 + 3]


def test_label_dropout_and_forced_null_class():
    model = _tiny(class_dropout_prob=0.5)
    y = torch.arange(10)
    forced = model.y_embedder(y, train=False, force_drop_ids=torch.ones(10, dtype=torch.long))
    null = model.y_embedder.embedding_table.weight[10]
    assert torch.equal(forced, null.expand(10, -1))
    assert torch.equal(model.y_embedder(y, train=False), model.y_embedder.embedding_table.weight[:10])
    torch.manual_seed(0)
    dropped = model.y_embedder.drop_labels(y.repeat(100))
    assert 0.35 < (dropped == 10).float().mean() < 0.65


def test_pos_embed_is_dit_sincos_and_t_scale():
    model = _tiny()
    gs, d = 4, 64
    pe = model.pos_embed[0]
    i, j = 2, 3  # row, column -> token i*gs + j
    # First half encodes the column, second half the row; each half is [sin, cos], omega_0 = 1.
    assert torch.allclose(pe[i * gs + j, 0], torch.tensor(math.sin(j)))
    assert torch.allclose(pe[i * gs + j, d // 4], torch.tensor(math.cos(j)))
    assert torch.allclose(pe[i * gs + j, d // 2], torch.tensor(math.sin(i)))
    assert torch.allclose(pe, sincos_pos_embed_2d(d, gs, gs).float())
    # t_scale: t in [0,1] with scale 1000 embeds like integer timesteps with scale 1.
    a, b = _tiny(t_scale=1000.0), _tiny(t_scale=1.0)
    b.load_state_dict(a.state_dict())
    assert torch.allclose(a.t_embedder(torch.tensor([0.25])), b.t_embedder(torch.tensor([250.0])))


def test_input_size_must_divide_by_patch():
    with pytest.raises(UserError, match="divisible"):
        _tiny(input_size=9)

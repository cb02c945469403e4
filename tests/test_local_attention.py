"""The decoder's local attention computed locally: the windowed path (query tiles and their key halos) and
FlexAttention give the dense reference's outputs and gradients on every grid, with the same state dict; `auto`
keeps the dense path where it is cheaper, so small-image decodes stay bit for bit what they were."""

import json
import warnings

import pytest
import torch

from tokenizer import SSDD
from tokenizer.common.errors import UserError
from tokenizer.decoder import (
    DENSE_MAX_TOKENS,
    LOCAL_BLOCK,
    SSDDDecoder,
    TransformerBlock,
    attention_plan,
    dense_index,
    local_index,
    resolve_attention,
)

# Grids of tokens: smaller than the window, one tile, not divisible by the 8-token tile, wider than tall, larger
# than the window in both directions.
GRIDS = [(5, 7), (8, 8), (12, 20), (17, 17), (30, 23)]


@pytest.fixture(autouse=True)
def single_thread(one_thread):  # conftest.py
    yield


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def random_block(dim=32, heads=4, seed=0) -> TransformerBlock:
    torch.manual_seed(seed)
    block = TransformerBlock(dim, heads=heads, ctx_channels=16, window=8)
    with torch.no_grad():  # leave the zero init so the bias and the feed-forward matter
        block.relative_position_bias.relative_bias_table.normal_()
        block.ff.proj_out.weight.normal_(std=0.02)
    return block


def run_block(block, grid, mode, x, ctx, weights):
    """Output, gradient of the input and gradient of the bias table of one block under `mode`."""
    block.zero_grad()
    x = x.clone().requires_grad_()
    out = block(x, ctx, grid, attention_plan(mode, 8, grid, x.device))
    (out * weights).sum().backward()
    return out.detach(), x.grad, block.relative_position_bias.relative_bias_table.grad.clone()


@pytest.mark.parametrize("grid", GRIDS)
def test_windowed_attention_equals_dense(grid):
    block = random_block()
    g = torch.Generator().manual_seed(1)
    n = grid[0] * grid[1]
    x, ctx = torch.randn(2, n, 32, generator=g), torch.randn(2, 16, *grid, generator=g)
    w = torch.randn(2, n, 32, generator=g)
    dense = run_block(block, grid, "dense", x, ctx, w)
    local = run_block(block, grid, "local", x, ctx, w)
    for what, a, b in zip(("output", "input gradient", "bias-table gradient"), local, dense):
        assert rel(a, b) <= 1e-5, (grid, what, rel(a, b))
    assert dense[2].abs().sum() > 0  # the table does get a gradient


@pytest.mark.parametrize("grid", [(5, 7), (12, 20), (17, 17)])
def test_flex_attention_equals_dense(grid, monkeypatch):
    """FlexAttention's eager reference on the CPU (the fused kernel is compiled on a GPU), forward and backward:
    the project's own score and mask functions, heads folded into the batch, the grid width as a tensor.
    PyTorch refuses a CPU backward up front; its eager backward is plain tensor code, so the check is lifted here."""
    import torch.nn.attention.flex_attention as flex_module

    monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None)
    block = random_block(seed=2)
    g = torch.Generator().manual_seed(3)
    n = grid[0] * grid[1]
    x, ctx = torch.randn(2, n, 32, generator=g), torch.randn(2, 16, *grid, generator=g)
    w = torch.randn(2, n, 32, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        flex = run_block(block, grid, "flex", x, ctx, w)
    dense = run_block(block, grid, "dense", x, ctx, w)
    for what, a, b in zip(("output", "input gradient", "bias-table gradient"), flex, dense):
        assert rel(a, b) <= 1e-5, (grid, what, rel(a, b))


@pytest.mark.slow
def test_whole_decoder_local_equals_dense_with_the_same_state_dict():
    torch.manual_seed(0)
    dense = SSDDDecoder("XS", attention="dense")
    local = SSDDDecoder("XS", attention="local")
    assert {k: v.shape for k, v in dense.state_dict().items()} == {k: v.shape for k, v in local.state_dict().items()}
    with torch.no_grad():
        for p in dense.parameters():  # no zero-initialised branch: every path contributes
            p.add_(torch.randn_like(p) * 0.02)
    local.load_state_dict(dense.state_dict(), strict=True)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 136, 88, generator=g)  # 17 x 11 tokens: taller than the window, tiles of 8 do not divide it
    z = torch.randn(1, 4, 17, 11, generator=g)
    t = torch.tensor([0.7])
    outs, grads = [], []
    for model in (dense, local):
        xx = x.clone().requires_grad_()
        v = model(xx, t, z)
        (v * x).sum().backward()
        blocks = model.mid_block.transformer_blocks
        tables = torch.stack([b.relative_position_bias.relative_bias_table.grad for b in blocks])
        outs.append(v.detach())
        grads.append((xx.grad, tables))
    assert rel(outs[1], outs[0]) <= 1e-5
    assert rel(grads[1][0], grads[0][0]) <= 1e-5 and rel(grads[1][1], grads[0][1]) <= 1e-5


def test_auto_choice_and_small_grids_stay_bit_identical():
    assert resolve_attention("auto", 8, (4, 4), "cpu") == "dense"  # the embedded 32-px bundle
    assert resolve_attention("auto", 8, (15, 15), "cpu") == "dense"  # the window covers the grid
    assert resolve_attention("auto", 8, (64, 64), "cpu") == "local"  # 512 px
    assert DENSE_MAX_TOKENS < 32 * 32 and resolve_attention("auto", 8, (32, 32), "cpu") == "local"  # 256 px
    assert resolve_attention("dense", 8, (64, 64), "cpu") == "dense"
    with pytest.raises(UserError, match="unknown attention"):
        SSDDDecoder("XS", attention="sparse")

    torch.manual_seed(0)
    model = SSDD(encoder="f8c4", decoder="XS", encoder_base_channels=32).eval()
    z = torch.randn(2, 4, 4, 4)
    noise = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        auto = model.decode(z, steps=2, noise=noise)
        model.decoder.mid_block.attention = "dense"
        assert torch.equal(model.decode(z, steps=2, noise=noise), auto)


def test_windowed_work_grows_linearly():
    """Keys per query: the dense index has N per query, the windowed one (8 + 14)^2 = 484 whatever the grid."""
    for side in (32, 64):
        n = side * side
        assert dense_index(8, side, side, "cpu").shape == (n, n)
        tiles = (side // LOCAL_BLOCK) ** 2
        index, key_outside = local_index(8, LOCAL_BLOCK, side, side, "cpu")  # one tile's index, per-tile key masks
        assert index.shape == (LOCAL_BLOCK ** 2, 22 * 22) and key_outside.shape == (tiles, 1, 22 * 22)


def test_attention_from_config():
    cfg = {"ssdd": {"encoder": "f8c4", "encoder_base_channels": 32, "decoder": "XS", "attention": "local"}}
    assert SSDD.build(cfg).decoder.mid_block.attention == "local"
    from tokenizer.common.config import load_config
    from tokenizer.evaluation import model_from_config

    model = model_from_config(load_config("ssdd.yaml", ["ssdd.decoder=XS", "ssdd.encoder_base_channels=32",
                                                        "ssdd.attention=dense"]))
    assert model.decoder.mid_block.attention == "dense"


def test_crossover_script(tmp_path):
    from eval.attention_crossover import main

    out = tmp_path / "x"
    assert main(["--grids", "4", "18", "--widths", "32", "--repeats", "1", "--out", str(out)]) == 0
    rows = json.load(open(f"{out}.json"))["rows"]
    assert [r["tokens"] for r in rows] == [16, 324] and all(r["dense_ms"] > 0 and r["local_ms"] > 0 for r in rows)
    assert "| 32 | 18x18 | 324 | 144 |" in open(f"{out}.md").read()

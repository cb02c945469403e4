"""SSDD pixel-space diffusion decoder (docs/ARCHITECTURE.md §3): a U-Net whose middle block is a local-attention
transformer.

The decoder predicts the flow-matching velocity v(x_t, t, z) of an image x_t (B, 3, H, W) at noise level t,
conditioned on the encoder latent z (B, C, h, w). It is independent of the encoder factor F = H / h: the
U-Net always has 4 levels (3 down-samplings), so the transformer always sees one token per 8x8 pixels.

    x_t ++ nearest_up(z) --conv_in--> C0 ........................................ skips
    down_blocks.0..3   2 ResNets each, stride-2 conv after levels 0-2            (H -> H/8)
    mid_block          GroupNorm -> proj_in -> N x TransformerBlock -> proj_out, + input
    up_blocks.0..3     3 ResNets each on [h, skip] concatenations, nearest x2 + conv after levels 0-2
    conv_norm_out -> SiLU -> conv_out --> v (B, 3, H, W)

Conditioning paths:
  * z: concatenated to the input, and through `ada_ctx_proj(z)` (C0 channels at latent resolution) which
    modulates, per spatial position, every ResNet's first GroupNorm (AdaGN) and every transformer block's
    first LayerNorm (AdaLN).
  * t: sinusoidal embedding -> MLP -> scale/shift after every ResNet's second GroupNorm (not in the transformer).

Parameter names follow the released checkpoints (diffusers-like: down_blocks.i.resnets.j, ...) so official
checkpoints load.
"""

import math
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer.common.errors import UserError, one_line

# One table for all sizes (docs/ARCHITECTURE.md §3). Level width = ceil(channels * mult / 32) * 32; the transformer
# runs at the last width. heads = 4 for S (explicit in the original), else min(16, max(4, width_mid // 64)).
DECODER_SIZES = {
    "XS": dict(channels=32, ch_mult=(1, 2, 3, 3), depth=8, heads=4),
    "S": dict(channels=48, ch_mult=(1, 2, 3, 3), depth=8, heads=4),
    "B": dict(channels=64, ch_mult=(1, 2, 3, 3), depth=10, heads=4),
    "M": dict(channels=96, ch_mult=(1, 2, 3, 3), depth=12, heads=4),
    "L": dict(channels=96, ch_mult=(1, 2, 4, 4), depth=16, heads=6),
    "XL": dict(channels=128, ch_mult=(1, 2, 4, 4), depth=16, heads=8),
    "H": dict(channels=192, ch_mult=(1, 2, 4, 4), depth=16, heads=12),
    "XH": dict(channels=256, ch_mult=(1, 2, 4, 4), depth=16, heads=16),
    "G": dict(channels=384, ch_mult=(1, 2, 4, 4), depth=16, heads=16),
}

TOKEN_STRIDE = 8  # pixels per transformer token side: 3 stride-2 down-samplings
UPSAMPLE_MODES = ("subpixel", "nearest")  # how `Upsample` computes nearest x2 + 3x3 conv (same function)
# CPU inference decodes a batch in chunks whose finest feature map (C0 x H x W fp32 per image) fits in this many
# bytes: past the last-level cache the norms, activations and concatenations wait on memory. Measured on a 2-core
# EPYC (32 MiB L3, one thread, 256 px): batch 4 in one call ran SSDD-M at 84 GFLOP/s and SSDD-S at 77, one image
# at a time at 92 and 87 (docs/RESULTS.md §10). No operation mixes images, so chunks give the same result.
CPU_CHUNK_BYTES = 8 << 20


def level_widths(channels: int, ch_mult) -> list[int]:
    """Per-level widths, rounded up to multiples of 32 so that GroupNorm(32) always divides them."""
    return [math.ceil(channels * m / 32) * 32 for m in ch_mult]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) -> (B, dim) float32 sinusoidal features in [cos, sin] order, frequencies exp(-ln(max_period) * i / (dim/2)).

    The project's one timestep embedding: the SSDD decoder and the DiT (dit.models) both use it; cos comes first in
    both published layouts (the order is baked into the first Linear's weights). An odd dim gets one zero column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def resize_nearest(x: torch.Tensor, size) -> torch.Tensor:
    """Nearest resize of a (B, C, h, w) map; a no-op when the size already matches (the f8 transformer case).

    Shrinking (only f4 latents, finer than the 1/8 token grid, need it) averages instead of dropping positions.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, tuple(size))
    return F.interpolate(x, size=tuple(size), mode="nearest")


# ----------------------------------------------------------------------------------------------------------
# Conditioning embeddings
# ----------------------------------------------------------------------------------------------------------


class TimestepEmbedding(nn.Module):
    """(B, C0) sinusoidal features -> (B, 4*C0) time embedding: Linear -> SiLU -> Linear."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# ----------------------------------------------------------------------------------------------------------
# Convolutional levels
# ----------------------------------------------------------------------------------------------------------


def untracked(*tensors: torch.Tensor) -> bool:
    """True when autograd records nothing about these tensors: fresh intermediates may then be overwritten in place
    (inference saves one allocation and one pass over the map per in-place operation; training keeps out-of-place)."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def is_channels_last(x: torch.Tensor) -> bool:
    """A 4-D map stored channels-last (and not also plain contiguous, as maps with one channel or pixel are)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def spatial_affine(y: torch.Tensor, scale1: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """y * scale1 + shift for y (B, C, H, W) and scale1/shift (B, C, h, w) nearest-upsampled onto (H, W), h | H, w | W.

    The upsampling is a broadcast, not a copy: y is viewed as (B, h, H/h, w, W/w, C) (channels-last) or
    (B, C, h, H/h, W) (NCHW, the modulators then repeated along W only), so one pass over y does the whole affine
    map, in place when untracked. Same values as upsampling first: nearest upsampling by an integer factor
    repeats each entry.
    """
    b, c, H, W = y.shape
    h, w = scale1.shape[-2:]
    sy, sx = H // h, W // w
    if is_channels_last(y):
        view = y.permute(0, 2, 3, 1).reshape(b, h, sy, w, sx, c)
        scale1, shift = (m.permute(0, 2, 3, 1)[:, :, None, :, None] for m in (scale1, shift))  # (B, h, 1, w, 1, C)
    else:
        view = y.reshape(b, c, h, sy, W)
        scale1, shift = (m.repeat_interleave(sx, dim=-1).unsqueeze(3) for m in (scale1, shift))  # (B, C, h, 1, W)
    if untracked(y, scale1, shift):
        out = torch.addcmul(shift, view, scale1, out=view)  # into y itself: `view` only splits y's axes
    else:
        out = torch.addcmul(shift, view, scale1)  # laid out like `view`, so the reshapes below are views
    # the result is read back through `out`, not `y`: correct even where a compiler's reshape made `view` a copy
    return out.reshape(b, H, W, c).permute(0, 3, 1, 2) if view.dim() == 6 else out.reshape(b, c, H, W)


def pointwise_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution of a channels-last map on the CPU as one matrix product (MKL), else `conv(x)`.

    With one thread PyTorch sends 1x1 convolutions to its generic path, not oneDNN; a channels-last map is already
    a (pixels, channels) matrix, so a Linear over the last axis of its (B, H, W, C) view is the same product.
    """
    if x.device.type != "cpu" or not is_channels_last(x):
        return conv(x)
    return F.linear(x.permute(0, 2, 3, 1), conv.weight.flatten(1), conv.bias).permute(0, 3, 1, 2)


class AdaGroupNorm(nn.Module):
    """(B, C, H, W), ctx (B, C0, h, w) -> (B, C, H, W): GroupNorm without affine, then x * (1 + scale) + shift.

    scale/shift come from a 1x1 conv of the z-context, so the modulation varies spatially with z. The conv is
    applied at latent resolution and broadcast onto the feature map (`spatial_affine`): a 1x1 conv commutes with
    nearest resizing, so this equals resizing first, without a full-size copy of scale and shift.
    """

    def __init__(self, channels: int, ctx_channels: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=eps, affine=False)
        self.ctx_proj = nn.Conv2d(ctx_channels, 2 * channels, 1)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        scale, shift = pointwise_conv(self.ctx_proj, ctx).chunk(2, dim=1)
        size = x.shape[-2:]
        if size[0] % scale.shape[-2] or size[1] % scale.shape[-1]:  # latent finer than the map (f4, coarsest level)
            scale, shift = resize_nearest(scale, size), resize_nearest(shift, size)
        return spatial_affine(self.norm(x), 1 + scale, shift)


def time_modulated_norm(norm: nn.GroupNorm, h: torch.Tensor, scale1: torch.Tensor, shift: torch.Tensor):
    """GroupNorm `norm` (its own affine included) of h (B, C, H, W), then * scale1 + shift, both (B, C).

    The norm's affine and the modulation fold into one per-(sample, channel) affine, so a single group_norm pass
    does everything: for one sample directly; for a batch of NCHW maps, as one sample of B * C channels in B * 32
    groups (the groups of different samples never mix). Channels-last batches take one more pass.
    """
    b, c = scale1.shape
    weight = scale1 if norm.weight is None else scale1 * norm.weight
    bias = shift if norm.bias is None else torch.addcmul(shift, norm.bias, scale1)
    if b == 1:
        return F.group_norm(h, norm.num_groups, weight.reshape(c), bias.reshape(c), norm.eps)
    if h.is_contiguous():
        out = F.group_norm(h.reshape(1, b * c, *h.shape[2:]), b * norm.num_groups, weight.flatten(), bias.flatten(),
                           norm.eps)
        return out.reshape(h.shape)
    h = F.group_norm(h, norm.num_groups, eps=norm.eps)
    return spatial_affine(h, weight[:, :, None, None], bias[:, :, None, None])


class ResnetBlock(nn.Module):
    """(B, C_in, H, W) -> (B, C_out, H, W). z enters through norm1 (AdaGN), t through a scale-shift after norm2.

    conv2 is zero-initialised so every block starts as its shortcut (identity-like U-Net at init).
    Dropout is 0 in SSDD and therefore omitted.
    """

    def __init__(self, in_channels: int, out_channels: int, ctx_channels: int, temb_channels: int):
        super().__init__()
        self.norm1 = AdaGroupNorm(in_channels, ctx_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, 2 * out_channels)
        self.norm2 = nn.GroupNorm(32, out_channels, eps=1e-5)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x, ctx)
        h = self.conv1(F.silu(h, inplace=untracked(h)))
        scale, shift = self.time_emb_proj(F.silu(temb)).chunk(2, dim=1)
        h = time_modulated_norm(self.norm2, h, 1 + scale, shift)
        h = self.conv2(F.silu(h, inplace=untracked(h)))
        if self.conv_shortcut is not None:  # last, when the wide norm1 output is gone (peak memory)
            x = pointwise_conv(self.conv_shortcut, x)
        return h.add_(x) if untracked(h, x) and h.dtype == x.dtype else x + h


class Downsample(nn.Module):
    """(B, C, H, W) -> (B, C, H/2, W/2): 3x3 conv, stride 2, padding 1 (symmetric, unlike the encoder)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))  # (row, column) parity of an output pixel of a x2 upsampling


def subpixel_kernels(weight: torch.Tensor) -> torch.Tensor:
    """3x3 kernels (O, I, 3, 3) of a conv applied after nearest x2 upsampling -> the equivalent 2x2 kernels
    (4 * O, I, 2, 2) applied before it, one group of O per output parity in `PHASES` order.

    An output row of parity 0 reads upsampled rows 2i-1, 2i, 2i+1 = input rows i-1, i, i: kernel rows (0, 1+2) at
    input offsets (-1, 0); parity 1 reads input rows i, i, i+1: kernel rows (0+1, 2) at offsets (0, +1). Columns
    alike. Zero padding of the upsampled map is zero padding of the input, so borders agree too.
    """
    def fold(w, dim, parity):  # 3 taps along `dim` -> the 2 taps of this parity
        t0, t1, t2 = w.unbind(dim)
        return torch.stack((t0, t1 + t2) if parity == 0 else (t0 + t1, t2), dim)

    return torch.cat([fold(fold(weight, 2, a), 3, b) for a, b in PHASES])


def subpixel_upsample_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(nearest_x2(x)) for a 3x3, padding-1 `conv`, computed at the input's resolution: one 2x2 convolution of
    the padded input into the four output parities, then interleaved. 16 instead of 36 multiply-adds per input pixel
    and channel pair, and no upsampled copy of x; same values up to float rounding (the folded taps are summed
    before, not after, the product). (B, C, h, w) -> (B, O, 2h, 2w), channels-last when x is.
    """
    b, _, h, w = x.shape
    o = conv.out_channels
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), subpixel_kernels(conv.weight), conv.bias.repeat(4))  # (B, 4O, h+1, w+1)
    layout = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    out = torch.empty(b, o, 2 * h, 2 * w, dtype=y.dtype, device=y.device, memory_format=layout)
    parities = out.unflatten(3, (w, 2)).unflatten(2, (h, 2))  # (B, O, h, 2, w, 2): a view in either layout
    for k, (a, c) in enumerate(PHASES):  # output pixel (2i + a, 2j + c) = y[parity (a, c), i + a, j + c]
        parities[:, :, :, a, :, c] = y[:, k * o:(k + 1) * o, a:a + h, c:c + w]
    return out


class Upsample(nn.Module):
    """(B, C, H, W) -> (B, C, 2H, 2W): nearest x2 then 3x3 conv (avoids transposed-conv checkerboards).

    `subpixel` (SSDD's default) computes the same function without upsampling first (`subpixel_upsample_conv`,
    2.25x fewer FLOPs); False runs it as written, the classic KL-VAE decoders' way. Same parameters either way.
    """

    def __init__(self, channels: int, subpixel: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.subpixel = subpixel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.subpixel:
            return subpixel_upsample_conv(self.conv, x)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """One encoder-side level. Returns the output and every intermediate kept as a U-Net skip."""

    def __init__(self, in_channels, out_channels, ctx_channels, temb_channels, num_layers=2, downsample=True):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels, ctx_channels, temb_channels)
            for j in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None

    def forward(self, x, temb, ctx):
        skips = []
        for resnet in self.resnets:
            x = resnet(x, temb, ctx)
            skips.append(x)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                x = down(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """One decoder-side level: each ResNet consumes [x, skip] concatenated along channels (diffusers UNet2D).

    The last ResNet's skip comes from one level deeper (the previous level's downsampler output), hence its
    width is `in_channels`; the others' skips have this level's width.
    """

    def __init__(self, in_channels, prev_channels, out_channels, ctx_channels, temb_channels, num_layers=3,
                 upsample=True, subpixel=True):
        super().__init__()
        self.resnets = nn.ModuleList()
        for j in range(num_layers):
            skip_channels = in_channels if j == num_layers - 1 else out_channels
            x_channels = prev_channels if j == 0 else out_channels
            self.resnets.append(ResnetBlock(x_channels + skip_channels, out_channels, ctx_channels, temb_channels))
        self.upsamplers = nn.ModuleList([Upsample(out_channels, subpixel)]) if upsample else None

    def forward(self, skips, temb, ctx):
        """`skips`: the stack of down-path outputs with this block's input on top; both are consumed."""
        x = skips.pop()
        for resnet in self.resnets:
            x = torch.cat([x, skips.pop()], dim=1)  # its own statement: the inputs are freed before the ResNet runs
            x = resnet(x, temb, ctx)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                x = up(x)
        return x


# ----------------------------------------------------------------------------------------------------------
# Local attention: one learned bias table, three exact ways to apply it (docs/ARCHITECTURE.md §3)
# ----------------------------------------------------------------------------------------------------------

ATTENTION_MODES = ("auto", "dense", "local", "flex")
OUTSIDE = -1e7  # logit bias outside the window: exp underflows to exactly 0 in the softmax
LOCAL_BLOCK = 8  # windowed path: each 8x8 tile of queries attends to its (8 + 2*7)^2 = 22x22 halo of keys
# auto without FlexAttention: dense up to this many tokens, windowed above. Measured on a CPU (one thread, one
# attention layer, widths 96 and 288; eval/attention_crossover.py, docs/reports/attention_crossover_cpu.md): the two are
# even at 24x24 to 28x28 tokens, windowed is 1.2-1.9x faster at 32x32 (256 px) and 5.5-11x at 64x64 (512 px);
# dense is 4-8x faster at 16x16.
DENSE_MAX_TOKENS = 28 * 28

_INDEX_CACHE: dict = {}  # index tensors depend only on (window, grid, device): shared by every block and model


class AttentionPlan(NamedTuple):
    """How the blocks of one forward pass attend: decided once per grid in MidTransformer, shared by all blocks.

    mode "dense": index (N, N) into the flattened bias table (+ one OUTSIDE slot);
    mode "local": index (B*B, S*S), the same for every B x B query tile and its S x S key halo (S = B + 2(w-1)),
                  and key_outside (tiles, 1, S*S), OUTSIDE where a tile's halo leaves the grid, else 0;
    mode "flex":  block_mask, a FlexAttention BlockMask of the window on the N x N raster, and grid_width, gw
                  as a 0-d tensor (the score and mask functions read it, so compiled kernels are not per grid).
    """

    mode: str
    grid: tuple
    index: torch.Tensor | None = None
    block_mask: object = None
    key_outside: torch.Tensor | None = None
    grid_width: torch.Tensor | None = None


def clear_attention_cache() -> None:
    """Drop the cached index tensors (benchmarks do, so that a measured peak includes them)."""
    _INDEX_CACHE.clear()


def attention_memory_bytes(mode: str, grid, heads: int, batch: int, window: int = 8) -> int:
    """Rough bytes the middle transformer's attention holds at once in fp32 on this path (index + bias + scores).

    dense: an (N, N) int64 index, an (heads, N, N) bias, and scores and softmax of (batch, heads, N, N);
    local: a (heads, tiles, 64, 484) bias and the scores of each tile, which grow with N (the index is one tile's).
    FlexAttention's fused kernel holds none of it.
    """
    n = grid[0] * grid[1]
    if mode == "dense":
        return n * n * (8 + 4 * heads * (1 + 2 * batch))
    if mode == "local":
        side = LOCAL_BLOCK + 2 * (window - 1)
        tiles = -(-grid[0] // LOCAL_BLOCK) * -(-grid[1] // LOCAL_BLOCK)
        return tiles * LOCAL_BLOCK**2 * side**2 * 4 * heads * (1 + 2 * batch)
    return 0


def _cached(key, build):
    if key not in _INDEX_CACHE:
        # built outside inference mode even when the first caller decodes in it: a training step may reuse the
        # tensors later, and autograd refuses inference tensors
        with torch.inference_mode(False):
            _INDEX_CACHE[key] = build()
    return _INDEX_CACHE[key]


def dense_index(window: int, gh: int, gw: int, device) -> torch.Tensor:
    """(N, N) long: query n, key m -> flat table slot of their offset, or the OUTSIDE slot (2w-1)^2."""

    def build():
        w = window
        ys, xs = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        dy = ys[:, None] - ys[None, :]
        dx = xs[:, None] - xs[None, :]
        inside = (dy.abs() < w) & (dx.abs() < w)
        idx = (dy + w - 1) * (2 * w - 1) + (dx + w - 1)
        return torch.where(inside, idx, torch.full_like(idx, (2 * w - 1) ** 2))

    return _cached(("dense", window, gh, gw, str(device)), build)


def local_index(window: int, block: int, gh: int, gw: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(index (block^2, side^2) long, key_outside (tiles, 1, side^2) float) of the windowed path; side = block + 2(w-1).

    Tile (ty, tx) holds the queries (ty*block + i, tx*block + j) and the keys (ty*block + a - r, tx*block + b - r)
    with r = w - 1, so the offset query - key is (i - a + r, j - b + r) whatever the tile: one index into the flat
    table serves every tile (the OUTSIDE slot where the offset leaves the window). Keys outside the grid (the
    zero padding around it) differ per tile: key_outside adds OUTSIDE to them. Tiles are in raster order.
    """

    def build():
        r, side, n = window - 1, block + 2 * (window - 1), 2 * window - 1
        d = torch.arange(block, device=device)[:, None] - torch.arange(side, device=device) + r  # (block, side) offsets
        inside = d.abs() <= r
        idx = (d[:, None, :, None] + r) * n + (d[None, :, None, :] + r)  # (i, j, a, b)
        ok = inside[:, None, :, None] & inside[None, :, None, :]
        idx = torch.where(ok, idx, torch.full_like(idx, n * n)).reshape(block * block, side * side)

        def keys_in_grid(g):  # (tiles along this axis, side): does each halo key lie on the grid?
            k = torch.arange(-(-g // block), device=device)[:, None] * block + torch.arange(side, device=device) - r
            return (k >= 0) & (k < g)

        ky, kx = keys_in_grid(gh), keys_in_grid(gw)
        ok = (ky[:, None, :, None] & kx[None, :, None, :]).reshape(-1, 1, side * side)  # (tiles, 1, side^2)
        outside = torch.zeros(ok.shape, device=device).masked_fill_(~ok, OUTSIDE)
        return idx, outside

    return _cached(("local", window, block, gh, gw, str(device)), build)


def window_mask_mod(window: int, grid_width: torch.Tensor):
    """FlexAttention mask_mod of the (2w-1)^2 window on a raster `grid_width` tokens wide (a 0-d tensor, so that a
    compiled kernel is not specialised to one grid)."""
    r = window - 1

    def in_window(b, h, q, k):
        return ((q // grid_width - k // grid_width).abs() <= r) & ((q % grid_width - k % grid_width).abs() <= r)

    return in_window


def flex_block_mask(window: int, gh: int, gw: int, device):
    """(BlockMask of the (2w-1)^2 window on the gh x gw raster (blocks wholly outside are skipped), grid width as
    a 0-d tensor)."""
    from torch.nn.attention.flex_attention import create_block_mask

    n = gh * gw

    def build():
        width = torch.tensor(gw, device=device)
        return create_block_mask(window_mask_mod(window, width), None, None, n, n, device=str(device)), width

    return _cached(("flex", window, gh, gw, str(device)), build)


def flex_supported(device) -> bool:
    """FlexAttention's compiled kernels: CUDA with compute capability 8.0 or newer (Ampere, Hopper, ...)."""
    if torch.device(device).type != "cuda":
        return False
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_attention(mode: str, window: int, grid, device) -> str:
    """The path `auto` takes for this grid and device; any other mode is returned as given."""
    if mode not in ATTENTION_MODES:
        raise UserError(f"unknown attention {mode!r}: choose one of {', '.join(ATTENTION_MODES)}")
    if mode != "auto":
        return mode
    gh, gw = grid
    if gh < 2 * window and gw < 2 * window:
        # The window covers every token (<= 15x15) or nearly so: local work would exceed dense work.
        return "dense"
    if flex_supported(device):
        return "flex"
    return "local" if gh * gw > DENSE_MAX_TOKENS else "dense"


@torch.compiler.disable  # python-level caching of index tensors: one graph break per forward, not per block
def attention_plan(mode: str, window: int, grid, device) -> AttentionPlan:
    mode = resolve_attention(mode, window, grid, device)
    gh, gw = grid
    if mode == "dense":
        return AttentionPlan("dense", (gh, gw), index=dense_index(window, gh, gw, device))
    if mode == "local":
        index, key_outside = local_index(window, LOCAL_BLOCK, gh, gw, device)
        return AttentionPlan("local", (gh, gw), index=index, key_outside=key_outside)
    block_mask, width = flex_block_mask(window, gh, gw, device)
    return AttentionPlan("flex", (gh, gw), block_mask=block_mask, grid_width=width)


def compile_flex(backend: str = "inductor"):
    """flex_attention compiled with dynamic shapes. `flex_window_attention` keeps the batch and the grid out of the
    dimensions FlexAttention specialises, so one kernel per head size serves every image size and batch (a test
    counts the compilations over the benchmark grid)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True, backend=backend)


_compiled_flex = None


def flex_attention_fn(device):
    """Compiled flex_attention on GPU (its fused kernel); the eager reference elsewhere (materialises the scores)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if torch.device(device).type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = compile_flex()
    return _compiled_flex


def compile_failures() -> tuple:
    """Exceptions that mean "the compiler failed", not "the model is wrong": a run falls back instead of ending."""
    import torch._dynamo.exc as dynamo_exc
    import torch._inductor.exc as inductor_exc

    return (dynamo_exc.BackendCompilerFailed, dynamo_exc.FailOnRecompileLimitHit, inductor_exc.InductorError,
            inductor_exc.LoweringException)


def warn_once(key: str, message: str) -> None:
    """One warning line per process and key (fallbacks are announced, never silent, and never repeated per call)."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


_WARNED: set = set()


class RelativePositionBias(nn.Module):
    """Learned per-head bias on attention logits for 2-D token offsets, and -1e7 outside the window.

    The table has (2w-1, 2w-1, heads) entries indexed by (dy + w-1, dx + w-1) with (dy, dx) = query - key.
    Offsets with |dy| or |dx| > w-1 get -1e7, so each token only attends to its (2w-1)^2 neighbourhood: this
    is the transformer's only positional information and what keeps its cost local. The index tensors are built
    per grid size (never stored in the state dict) and shared by all blocks.
    """

    def __init__(self, window: int, heads: int):
        super().__init__()
        self.window = window
        self.relative_bias_table = nn.Parameter(torch.zeros(2 * window - 1, 2 * window - 1, heads))

    def flat_table(self) -> torch.Tensor:
        """((2w-1)^2 + 1, heads): the table flattened, plus a last row of OUTSIDE for offsets beyond the window."""
        table = self.relative_bias_table
        flat = table.reshape(-1, table.shape[-1])
        return torch.cat([flat, flat.new_full((1, flat.shape[-1]), OUTSIDE)], dim=0)

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """index (...) into the flat table -> (heads, ...) bias."""
        return self.flat_table()[index].movedim(-1, 0)

    def forward(self, gh: int, gw: int) -> torch.Tensor:
        """-> (heads, N, N) additive float bias, N = gh * gw (the dense reference)."""
        return self.gather(dense_index(self.window, gh, gw, self.relative_bias_table.device))


def windowed_attention(q, k, v, bias: torch.Tensor, key_outside: torch.Tensor, grid, window: int,
                       block: int = LOCAL_BLOCK) -> torch.Tensor:
    """Exact local attention: q, k, v (B, heads, N, d) on a gh x gw raster, bias (heads, block^2, side^2) of one
    tile, key_outside (tiles, 1, side^2) (`local_index`).

    The grid is zero-padded to whole tiles (and by w-1 around for the keys); each tile of block x block queries
    attends to its side x side halo with the bias, OUTSIDE beyond the window or the grid. Work and memory grow
    with N (side^2 = 484 keys per query) instead of N^2. Returns (B, heads, N, d).
    """
    b, h, n, d = q.shape
    gh, gw = grid
    r, side = window - 1, block + 2 * (window - 1)
    ty, tx = -(-gh // block), -(-gw // block)
    ph, pw = ty * block - gh, tx * block - gw

    q = F.pad(q.reshape(b, h, gh, gw, d), (0, 0, 0, pw, 0, ph))
    q = q.reshape(b, h, ty, block, tx, block, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, h * ty * tx, block * block, d)

    def halo(t):  # (B, heads, N, d) -> (B, heads * tiles, side^2, d)
        t = F.pad(t.reshape(b, h, gh, gw, d), (0, 0, r, r + pw, r, r + ph))
        t = t.unfold(2, side, block).unfold(3, side, block)  # (B, heads, ty, tx, d, side, side)
        return t.permute(0, 1, 2, 3, 5, 6, 4).reshape(b, h * ty * tx, side * side, d)

    mask = (bias.contiguous()[:, None] + key_outside).to(q.dtype).reshape(1, h * ty * tx, block * block, side * side)
    out = F.scaled_dot_product_attention(q, halo(k), halo(v), attn_mask=mask)
    out = out.reshape(b, h, ty, tx, block, block, d).permute(0, 1, 2, 4, 3, 5, 6)
    out = out.reshape(b, h, ty * block, tx * block, d)
    return out[:, :, :gh, :gw].reshape(b, h, n, d)


def flex_window_attention(q, k, v, table: torch.Tensor, plan: AttentionPlan, window: int) -> torch.Tensor:
    """FlexAttention: the bias table as a score modification, the window as a block mask. (B, heads, N, d).

    The heads are folded into the batch ((B * heads, 1, N, d); the score function recovers the head as the batch
    index % heads) and the grid width is a tensor, so one compiled kernel per head size serves every batch size
    and grid (`flex_attention_fn` compiles with dynamic shapes; FlexAttention specialises the head count, not
    the batch): a recompilation per shape would exhaust PyTorch's recompile limit and leave it unfused.
    """
    b, heads, n, d = q.shape
    gw = plan.grid_width
    r = window - 1

    def add_bias(score, bh, _, qi, ki):  # offsets clamped only to stay in the table; the block mask drops them
        dy = (qi // gw - ki // gw).clamp(-r, r) + r
        dx = (qi % gw - ki % gw).clamp(-r, r) + r
        return score + table[dy, dx, bh % heads]

    q, k, v = (t.reshape(b * heads, 1, n, d).contiguous() for t in (q, k, v))  # one layout for every batch size
    from torch.nn.attention.flex_attention import flex_attention

    attend = flex_attention_fn(q.device)
    if torch.compiler.is_compiling():
        out = attend(q, k, v, score_mod=add_bias, block_mask=plan.block_mask)
    elif attend is flex_attention:
        try:
            out = attend(q, k, v, score_mod=add_bias, block_mask=plan.block_mask)
        except NotImplementedError as e:  # PyTorch has no FlexAttention backward on a CPU
            reason = one_line(e).rstrip(".")
            raise UserError(f"attention=flex: {reason}; train with attention=local or auto here") from None
    else:  # past the recompile limit PyTorch would run it unfused, with full N x N scores: raise instead
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            out = attend(q, k, v, score_mod=add_bias, block_mask=plan.block_mask)
    return out.reshape(b, heads, n, d)


class Attention(nn.Module):
    """(B, N, C) -> (B, N, C) multi-head self-attention with the relative bias of the plan's path; no QK-norm."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rpb: RelativePositionBias, plan: AttentionPlan) -> torch.Tensor:
        b, n, c = x.shape

        def split(t):  # (B, N, C) -> (B, heads, N, C/heads)
            return t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        if plan.mode == "dense":
            # A float mask rules out FlashAttention; PyTorch picks the memory-efficient or math kernel.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=rpb.gather(plan.index).to(q.dtype).unsqueeze(0))
        elif plan.mode == "local":
            out = windowed_attention(q, k, v, rpb.gather(plan.index), plan.key_outside, plan.grid, rpb.window)
        else:
            out = flex_window_attention(q, k, v, rpb.relative_bias_table, plan, rpb.window)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


# ----------------------------------------------------------------------------------------------------------
# Middle transformer
# ----------------------------------------------------------------------------------------------------------


class AdaLayerNorm(nn.Module):
    """(B, N, C), ctx (B, C0, h, w) -> (B, N, C): LayerNorm without affine, x * (1 + scale) + shift.

    shift/scale = Linear(SiLU(z-context)) per latent position, nearest-repeated onto the (gh, gw) token grid
    (identity for f8, 2x2 blocks for f16, ...). Only z modulates the transformer; t does not.
    Unlike the ResNets' AdaGN, the official AdaLN puts *shift first* in the projection: released weights need it.
    """

    def __init__(self, dim: int, ctx_channels: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.linear = nn.Linear(ctx_channels, 2 * dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, grid) -> torch.Tensor:
        mod = self.linear(F.silu(ctx).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, 2C, h, w)
        mod = resize_nearest(mod, grid).flatten(2).transpose(1, 2)  # (B, N, 2C)
        shift, scale = mod.chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class GEGLU(nn.Module):
    """(B, N, C) -> (B, N, H): Linear to 2H, split into value and gate, value * GELU(gate)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """(B, N, C) -> (B, N, C): GEGLU with hidden width mlp_ratio * C, then a (zero-initialised) Linear."""

    def __init__(self, dim: int, mlp_ratio: int = 4):
        super().__init__()
        self.proj_in_act = GEGLU(dim, mlp_ratio * dim)
        self.proj_out = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in_act(x))


class TransformerBlock(nn.Module):
    """(B, N, C) -> (B, N, C) pre-norm block: x + Attn(AdaLN(x; z)), then x + FF(LN(x))."""

    def __init__(self, dim: int, heads: int, ctx_channels: int, window: int):
        super().__init__()
        self.norm1 = AdaLayerNorm(dim, ctx_channels)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)
        self.relative_position_bias = RelativePositionBias(window, heads)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, grid, plan: AttentionPlan | None = None) -> torch.Tensor:
        """`plan` (from MidTransformer) says how to attend; None means the dense reference."""
        if plan is None:
            plan = attention_plan("dense", self.relative_position_bias.window, grid, x.device)
        x = x + self.attn1(self.norm1(x, ctx, grid), self.relative_position_bias, plan)
        return x + self.ff(self.norm2(x))


class MidTransformer(nn.Module):
    """(B, C, gh, gw) -> (B, C, gh, gw): GroupNorm -> tokens -> proj_in -> blocks -> proj_out -> + input.

    With `feature_block` set, also returns the (B, N, C) output of that block (REPA's student features).
    `attention` picks the path (ATTENTION_MODES); all give the same result, so it is not part of the state dict.
    """

    def __init__(self, dim: int, depth: int, heads: int, ctx_channels: int, window: int, attention: str = "auto"):
        super().__init__()
        resolve_attention(attention, window, (1, 1), "cpu")  # a bad name fails here, not at the first forward
        self.attention = attention
        self.window = window
        self.norm = nn.GroupNorm(32, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(dim, heads, ctx_channels, window) for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, feature_block: int | None = None):
        b, c, gh, gw = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        plan = attention_plan(self.attention, self.window, (gh, gw), x.device)
        try:
            h, feats = self.run_blocks(tokens, ctx, plan, feature_block)
        except compile_failures() as e:
            if plan.mode != "flex":
                raise
            # FlexAttention's compiler failed or ran out of recompilations: the windowed path gives the same result
            warn_once("flex", f"FlexAttention is unavailable ({type(e).__name__}): the SSDD decoder uses "
                              f"attention=local from now on")
            self.attention = "local"
            h, feats = self.run_blocks(tokens, ctx, attention_plan("local", self.window, (gh, gw), x.device),
                                       feature_block)
        h = self.proj_out(h).transpose(1, 2).reshape(b, c, gh, gw)
        return x + h, feats

    def run_blocks(self, h: torch.Tensor, ctx: torch.Tensor, plan: AttentionPlan, feature_block: int | None):
        feats = None
        for i, block in enumerate(self.transformer_blocks):
            h = block(h, ctx, plan.grid, plan)
            if i == feature_block:
                feats = h
        return h, feats


# ----------------------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------------------


class SSDDDecoder(nn.Module):
    """Velocity predictor v(x_t, t, z).

    x_t: (B, 3, H, W) noisy image, H and W multiples of 8;
    t:   (B,) float noise level in [0, 1] (1 = pure noise), scaled by `timescale` before the embedding;
    z:   (B, z_channels, h, w) latent at 1/F of the image (F = 4, 8, 16, 32).
    Returns v (B, 3, H, W), or (v, feats) with feats (B, H/8 * W/8, C_mid) from block `repa_block`.
    `attention`: auto | dense | local | flex, how the middle transformer applies its 15x15 window (same result;
    auto picks per grid and device, see `resolve_attention`). Settable later through `self.mid_block.attention`.
    `upsample`: subpixel | nearest, how the three upsamplings are computed (same result; `Upsample`).
    """

    def __init__(self, size: str = "M", z_channels: int = 4, attn_window: int = 8, timescale: float = 1000.0,
                 attention: str = "auto", upsample: str = "subpixel"):
        super().__init__()
        if size not in DECODER_SIZES:
            raise UserError(f"unknown decoder size {size!r}: choose one of {', '.join(DECODER_SIZES)}")
        if upsample not in UPSAMPLE_MODES:
            raise UserError(f"unknown upsample mode {upsample!r}: choose one of {', '.join(UPSAMPLE_MODES)}")
        cfg = DECODER_SIZES[size]
        self.size = size
        self.z_channels = z_channels
        self.timescale = timescale
        widths = level_widths(cfg["channels"], cfg["ch_mult"])
        c0, c_mid = widths[0], widths[-1]
        temb_dim = 4 * c0
        self.depth = cfg["depth"]
        self.mid_channels = c_mid
        self.repa_block = min(4, cfg["depth"] // 2)  # REPA reads this block's tokens (5th block for every size)

        self.conv_in = nn.Conv2d(3 + z_channels, c0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(c0, temb_dim)
        self.ada_ctx_proj = nn.Sequential(
            nn.Conv2d(z_channels, c0, 3, padding=1), nn.SiLU(), nn.Conv2d(c0, c0, 3, padding=1)
        )

        n = len(widths)
        self.down_blocks = nn.ModuleList(
            DownBlock(widths[max(i - 1, 0)], widths[i], c0, temb_dim, num_layers=2, downsample=i < n - 1)
            for i in range(n)
        )
        self.mid_block = MidTransformer(c_mid, cfg["depth"], cfg["heads"], c0, attn_window, attention)
        rev = widths[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock(
                in_channels=rev[min(i + 1, n - 1)],
                prev_channels=rev[max(i - 1, 0)],
                out_channels=rev[i],
                ctx_channels=c0,
                temb_channels=temb_dim,
                num_layers=3,
                upsample=i < n - 1,
                subpixel=upsample == "subpixel",
            )
            for i in range(n)
        )
        self.conv_norm_out = nn.GroupNorm(32, c0, eps=1e-5)
        self.conv_out = nn.Conv2d(c0, 3, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self):
        """The release's initialisation (docs/ARCHITECTURE.md §3): Linear Xavier-uniform, conv N(0, 0.02), biases 0,
        norms 1/0; residual branches zeroed."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zeroed last layers make every residual block start as the identity.
        for m in self.modules():
            if isinstance(m, ResnetBlock):
                nn.init.zeros_(m.conv2.weight)
            elif isinstance(m, FeedForward):
                nn.init.zeros_(m.proj_out.weight)
            elif isinstance(m, RelativePositionBias):
                nn.init.zeros_(m.relative_bias_table)

    def compile(self, *args, **kwargs):
        """`nn.Module.compile` (in place, so state-dict keys stay plain), guarded: if the compiler fails on a forward
        pass (e.g. lowering FlexAttention), the decoder says so in one warning line and goes on with the windowed
        attention path, compiled again; should that fail too, uncompiled. A run does not end on a compiler bug."""
        super().compile(*args, **kwargs)
        compiled = self._compiled_call_impl

        def guarded(*a, **kw):
            while self._compiled_call_impl is guarded:
                try:
                    return compiled(*a, **kw)
                except compile_failures() as e:
                    reason = f"{type(e).__name__}: {one_line(e)[:200]}"
                    if self.mid_block.attention in ("auto", "flex"):  # FlexAttention is the likely culprit
                        warn_once("compile-flex", f"compiling the SSDD decoder failed ({reason}); "
                                                  f"compiling it again with attention=local")
                        self.mid_block.attention = "local"
                    else:
                        warn_once("compile", f"compiling the SSDD decoder failed ({reason}); it runs uncompiled")
                        self._compiled_call_impl = None
            return self._call_impl(*a, **kw)

        self._compiled_call_impl = guarded

    def _check_shapes(self, x_t: torch.Tensor, z: torch.Tensor):
        H, W = x_t.shape[-2:]
        h, w = z.shape[-2:]
        if H % TOKEN_STRIDE or W % TOKEN_STRIDE:
            raise UserError(f"decoder image size must be a multiple of {TOKEN_STRIDE}, got {H}x{W}")
        gh, gw = H // TOKEN_STRIDE, W // TOKEN_STRIDE
        if (gh % h or gw % w) and (h % gh or w % gw):
            raise UserError(
                f"latent grid {h}x{w} and the {gh}x{gw} token grid of a {H}x{W} image must divide one another "
                f"(encoder factors 4, 8, 16, 32)"
            )
        if z.shape[1] != self.z_channels:
            raise UserError(f"decoder expects {self.z_channels} latent channels, got {z.shape[1]}")

    def cpu_chunk(self, x_t: torch.Tensor, z: torch.Tensor) -> int:
        """Images per call for this input: the whole batch, except in CPU inference (`CPU_CHUNK_BYTES`)."""
        b = x_t.shape[0]
        if x_t.device.type != "cpu" or not untracked(x_t, z, self.conv_in.weight) or torch.compiler.is_compiling():
            return b
        per_image = self.conv_in.out_channels * x_t.shape[-2] * x_t.shape[-1] * x_t.element_size()
        return max(1, min(b, CPU_CHUNK_BYTES // per_image))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor, return_features: bool = False):
        self._check_shapes(x_t, z)
        b, n = x_t.shape[0], self.cpu_chunk(x_t, z)
        if n < b:
            t = t.expand(b) if t.numel() == 1 else t
            parts = [self.forward_batch(x_t[i:i + n], t[i:i + n], z[i:i + n], return_features) for i in range(0, b, n)]
            if return_features:
                return tuple(torch.cat(p) for p in zip(*parts))
            return torch.cat(parts)
        return self.forward_batch(x_t, t, z, return_features)

    def forward_batch(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor, return_features: bool = False):
        """The forward pass on the whole of its batch (`forward` may split a CPU batch into calls of this)."""
        ctx = self.ada_ctx_proj(z)  # (B, C0, h, w): shared by all adaptive norms
        t_feat = timestep_embedding(t * self.timescale, self.conv_in.out_channels)
        temb = self.time_embedding(t_feat.to(self.time_embedding.linear_1.weight.dtype))  # (B, 4*C0)

        h = torch.cat([x_t, resize_nearest(z, x_t.shape[-2:])], dim=1)
        if h.device.type == "cpu":
            # Channels-last feature maps on the CPU: oneDNN's convolutions at these widths run ~1.3x faster on
            # them, 1x1 convolutions become plain matrix products, and the transformer's tokens are free views.
            # Every later layer keeps the layout. (On a GPU the `channels_last` training switch decides.)
            h = h.contiguous(memory_format=torch.channels_last)
            ctx = ctx.contiguous(memory_format=torch.channels_last)
        h = self.conv_in(h)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, ctx)
            skips.extend(block_skips)

        h, feats = self.mid_block(h, ctx, self.repa_block if return_features else None)

        for block in self.up_blocks:
            skips.append(h)  # each block takes its input off the stack, so that it alone holds it (peak memory)
            del h
            h = block(skips, temb, ctx)
        h = self.conv_norm_out(h)
        v = self.conv_out(F.silu(h, inplace=untracked(h))).contiguous()
        return (v, feats) if return_features else v

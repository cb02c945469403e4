"""SSDD pixel-space diffusion decoder (docs/ARCHITECTURE.md §3): a U-Net whose middle block is a local-attention transformer.

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

Parameter names follow the released checkpoints (diffusers-like: down_blocks.i.resnets.j, ...) so official checkpoints load.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer.errors import UserError

# One table for all sizes (docs/ARCHITECTURE.md §3). Level width = ceil(channels * mult / 32) * 32; the transformer runs at
# the last width. heads = 4 for S (explicit in the original), else min(16, max(4, width_mid // 64)).
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


class AdaGroupNorm(nn.Module):
    """(B, C, H, W), ctx (B, C0, h, w) -> (B, C, H, W): GroupNorm without affine, then x * (1 + scale) + shift.

    scale/shift come from a 1x1 conv of the z-context, so the modulation varies spatially with z. The conv is
    applied at latent resolution and the result nearest-resized to the feature map (same as resizing first,
    since a 1x1 conv commutes with nearest resizing, but cheaper).
    """

    def __init__(self, channels: int, ctx_channels: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=eps, affine=False)
        self.ctx_proj = nn.Conv2d(ctx_channels, 2 * channels, 1)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        scale, shift = resize_nearest(self.ctx_proj(ctx), x.shape[-2:]).chunk(2, dim=1)
        return self.norm(x) * (1 + scale) + shift


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
        h = self.conv1(F.silu(self.norm1(x, ctx)))
        scale, shift = self.time_emb_proj(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """(B, C, H, W) -> (B, C, H/2, W/2): 3x3 conv, stride 2, padding 1 (symmetric, unlike the encoder)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """(B, C, H, W) -> (B, C, 2H, 2W): nearest x2 then 3x3 conv (avoids transposed-conv checkerboards)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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

    def __init__(self, in_channels, prev_channels, out_channels, ctx_channels, temb_channels, num_layers=3, upsample=True):
        super().__init__()
        self.resnets = nn.ModuleList()
        for j in range(num_layers):
            skip_channels = in_channels if j == num_layers - 1 else out_channels
            x_channels = prev_channels if j == 0 else out_channels
            self.resnets.append(ResnetBlock(x_channels + skip_channels, out_channels, ctx_channels, temb_channels))
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x, skips, temb, ctx):
        for resnet in self.resnets:
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb, ctx)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                x = up(x)
        return x


# ----------------------------------------------------------------------------------------------------------
# Middle transformer
# ----------------------------------------------------------------------------------------------------------


class RelativePositionBias(nn.Module):
    """Learned per-head bias on attention logits for 2-D token offsets, and -1e7 outside the window.

    The table has (2w-1, 2w-1, heads) entries indexed by (dy + w-1, dx + w-1) with (dy, dx) = query - key.
    Offsets with |dy| or |dx| > w-1 get -1e7, so each token only attends to its (2w-1)^2 neighbourhood: this
    is the transformer's only positional information and what keeps its cost local. The index is rebuilt per
    grid size (never stored in the state dict) and cached in a plain dict.
    """

    def __init__(self, window: int, heads: int):
        super().__init__()
        self.window = window
        self.relative_bias_table = nn.Parameter(torch.zeros(2 * window - 1, 2 * window - 1, heads))
        self._index_cache: dict = {}

    def _index(self, gh: int, gw: int, device) -> torch.Tensor:
        """(N, N) long index into the flattened table plus one trailing 'outside the window' slot."""
        key = (gh, gw, str(device))
        if key not in self._index_cache:
            w = self.window
            ys, xs = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
            ys, xs = ys.flatten(), xs.flatten()
            dy = ys[:, None] - ys[None, :]
            dx = xs[:, None] - xs[None, :]
            inside = (dy.abs() < w) & (dx.abs() < w)
            idx = (dy + w - 1) * (2 * w - 1) + (dx + w - 1)
            self._index_cache[key] = torch.where(inside, idx, torch.full_like(idx, (2 * w - 1) ** 2))
        return self._index_cache[key]

    def forward(self, gh: int, gw: int) -> torch.Tensor:
        """-> (heads, N, N) additive float bias, N = gh * gw."""
        table = self.relative_bias_table
        flat = table.reshape(-1, table.shape[-1])
        flat = torch.cat([flat, flat.new_full((1, flat.shape[-1]), -1e7)], dim=0)
        return flat[self._index(gh, gw, table.device)].permute(2, 0, 1)


class Attention(nn.Module):
    """(B, N, C) -> (B, N, C) multi-head self-attention with an additive (heads, N, N) bias; no QK-norm."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape

        def split(t):  # (B, N, C) -> (B, heads, N, C/heads)
            return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        # A float mask rules out FlashAttention; PyTorch picks the memory-efficient or math kernel.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype).unsqueeze(0))
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


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

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, grid) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x, ctx, grid), self.relative_position_bias(*grid))
        return x + self.ff(self.norm2(x))


class MidTransformer(nn.Module):
    """(B, C, gh, gw) -> (B, C, gh, gw): GroupNorm -> tokens -> proj_in -> blocks -> proj_out -> + input.

    With `feature_block` set, also returns the (B, N, C) output of that block (REPA's student features).
    """

    def __init__(self, dim: int, depth: int, heads: int, ctx_channels: int, window: int):
        super().__init__()
        self.norm = nn.GroupNorm(32, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(dim, heads, ctx_channels, window) for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, feature_block: int | None = None):
        b, c, gh, gw = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        feats = None
        for i, block in enumerate(self.transformer_blocks):
            h = block(h, ctx, (gh, gw))
            if i == feature_block:
                feats = h
        h = self.proj_out(h).transpose(1, 2).reshape(b, c, gh, gw)
        return x + h, feats


# ----------------------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------------------


class SSDDDecoder(nn.Module):
    """Velocity predictor v(x_t, t, z).

    x_t: (B, 3, H, W) noisy image, H and W multiples of 8;
    t:   (B,) float noise level in [0, 1] (1 = pure noise), scaled by `timescale` before the embedding;
    z:   (B, z_channels, h, w) latent at 1/F of the image (F = 4, 8, 16, 32).
    Returns v (B, 3, H, W), or (v, feats) with feats (B, H/8 * W/8, C_mid) from block `repa_block`.
    """

    def __init__(self, size: str = "M", z_channels: int = 4, attn_window: int = 8, timescale: float = 1000.0):
        super().__init__()
        if size not in DECODER_SIZES:
            raise UserError(f"unknown decoder size {size!r}: choose one of {', '.join(DECODER_SIZES)}")
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
        self.mid_block = MidTransformer(c_mid, cfg["depth"], cfg["heads"], c0, attn_window)
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

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor, return_features: bool = False):
        self._check_shapes(x_t, z)
        ctx = self.ada_ctx_proj(z)  # (B, C0, h, w): shared by all adaptive norms
        t_feat = timestep_embedding(t * self.timescale, self.conv_in.out_channels)
        temb = self.time_embedding(t_feat.to(self.time_embedding.linear_1.weight.dtype))  # (B, 4*C0)

        h = self.conv_in(torch.cat([x_t, resize_nearest(z, x_t.shape[-2:])], dim=1))
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, ctx)
            skips.extend(block_skips)

        h, feats = self.mid_block(h, ctx, self.repa_block if return_features else None)

        for block in self.up_blocks:
            h = block(h, skips, temb, ctx)
        v = self.conv_out(F.silu(self.conv_norm_out(h)))
        return (v, feats) if return_features else v

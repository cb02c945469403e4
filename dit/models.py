"""Class-conditional Diffusion Transformer (DiT) with adaLN-Zero blocks.

Architecture of Peebles & Xie, "Scalable Diffusion Models with Transformers" (2023), written
from the paper and the published checkpoint layout (parameter names and shapes), so that the
released DiT checkpoints load with `load_state_dict(strict=True)`:

    x_embedder.proj                 Conv2d(C, h, kernel=p, stride=p)     patch embedding
    t_embedder.mlp.{0,2}            Linear(256, h), Linear(h, h)          timestep MLP (SiLU between)
    y_embedder.embedding_table      Embedding(num_classes + 1, h)         last row = null class
    pos_embed                       (1, T, h)                             fixed 2-D sin-cos, not trained
    blocks.N.norm1 / norm2          LayerNorm(h, no affine, eps 1e-6)
    blocks.N.attn.{qkv,proj}        Linear(h, 3h), Linear(h, h)
    blocks.N.mlp.{fc1,fc2}          Linear(h, 4h), Linear(4h, h)          GELU (tanh approximation)
    blocks.N.adaLN_modulation.1     Linear(h, 6h)                         index 0 is the SiLU
    final_layer.norm_final          LayerNorm(h, no affine)
    final_layer.linear              Linear(h, p*p*C_out)
    final_layer.adaLN_modulation.1  Linear(h, 2h)

Shapes: B batch, C latent channels, H x W latent size, p patch size, T = (H/p)(W/p) tokens,
h hidden size. All sizes live in the single table `_SIZES` below.

Differences from the published code, all layout-neutral:
  * timestep conditioning multiplies t by `t_scale` (default 1000) before the frequency
    embedding, so a flow-matching model can be fed t in [0, 1] and still see the 0..999 range
    the released checkpoints were trained on;
  * optional QK-norm (RMSNorm per head on queries and keys) adds `attn.q_norm` / `attn.k_norm`
    keys; it is off by default, and a QK-norm model is not checkpoint-compatible with DiT;
  * no `forward_with_cfg`: classifier-free guidance lives in the sampler (`dit.flow`) and is
    applied to all latent channels.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import Attention, Mlp, PatchEmbed

from tokenizer.common.errors import UserError
from tokenizer.decoder import timestep_embedding  # the one sinusoidal embedding: [cos, sin], as DiT's

__all__ = ["DiT", "DiT_models", "build_dit", "sincos_pos_embed_2d"]


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------

def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos: (M,) float64 -> (M, dim) as [sin(pos*w), cos(pos*w)], w_i = 10000^(-i/(dim/2))."""
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE / DiT convention), on CPU, float64.

    Returns (grid_h * grid_w, dim), tokens in row-major order (the order PatchEmbed flattens).
    The first dim/2 channels encode the column index, the last dim/2 the row index: this is
    what the published `pos_embed` tensors contain, so a recomputed table equals the stored one.
    """
    if dim % 4:
        raise UserError(f"sin-cos position embedding needs hidden size divisible by 4, got {dim}")
    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)
    return torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps (B,) -> conditioning vectors (B, h) via a 256-d frequency embedding."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, t_scale: float = 1000.0):
        super().__init__()
        # Indices 0 and 2 carry the weights, matching t_embedder.mlp.{0,2} in DiT checkpoints.
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.t_scale = float(t_scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t.float() * self.t_scale, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels (B,) -> (B, h), with label dropout for classifier-free guidance.

    The extra row `num_classes` is the null ("unconditional") class. It exists only when
    dropout_prob > 0, because the published checkpoints have 1001 rows exactly in that case.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def drop_labels(self, y: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Replace labels by the null class: randomly, or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def forward(
        self, y: torch.Tensor, train: bool, force_drop_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            y = self.drop_labels(y, force_drop_ids)
        return self.embedding_table(y)


# --------------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------------

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: (B, T, h), shift/scale: (B, h). Scale is 1 + scale so zero-initialised adaLN is identity."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated by the conditioning (adaLN-Zero).

    x: (B, T, h), c: (B, h) -> (B, T, h). The six modulation vectors are, in checkpoint order:
    shift/scale/gate for attention, then shift/scale/gate for the MLP. Gates start at zero,
    so every block is the identity at initialisation.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        # The norms carry no affine parameters: adaLN supplies shift and scale instead.
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        # timm's Attention has DiT's key names (qkv, proj) and shapes; with qk_norm=False its
        # q_norm/k_norm are Identity and add no keys.
        self.attn = Attention(
            hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm,
            norm_layer=partial(nn.RMSNorm, eps=1e-6) if qk_norm else None,
        )
        # timm decides fused vs. manual attention from TIMM_FUSED_ATTN; we always want the
        # F.scaled_dot_product_attention path (flash / memory-efficient kernels).
        self.attn.fused_attn = True
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(
            in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio),
            act_layer=partial(nn.GELU, approximate="tanh"), drop=0.0,
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mod = self.adaLN_modulation(c).chunk(6, dim=1)  # each (B, h)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Modulated norm + linear projection of every token to a p x p x C_out patch.

    x: (B, T, h), c: (B, h) -> (B, T, p*p*C_out). Modulation order: shift, then scale.
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer on a latent grid, conditioned on a timestep and a class label.

    forward(x (B, C, H, W), t (B,) float, y (B,) long) -> (B, C_out, H, W) with
    C_out = 2C when learn_sigma (the extra channels are DiT's variance output; a flow-matching
    sampler ignores them) and C otherwise.

    t_scale: t is multiplied by it before the sinusoidal embedding. Released DiT checkpoints
    were trained on integer timesteps 0..999, so with the default 1000 a model fed t in [0, 1]
    (flow matching) sees the same embedding range; use t_scale=1 to feed raw 0..999 timesteps.
    """

    def __init__(
        self,
        *,
        input_size: Union[int, Tuple[int, int]] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        qk_norm: bool = False,
        t_scale: float = 1000.0,
    ):
        super().__init__()
        grid = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if any(s % patch_size for s in grid):
            raise UserError(f"DiT input size {grid} is not divisible by the patch size {patch_size}")
        if hidden_size % num_heads:
            raise UserError(f"DiT hidden size {hidden_size} is not divisible by {num_heads} heads")
        self.input_size = grid
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.num_heads = num_heads
        self.t_scale = float(t_scale)

        self.x_embedder = PatchEmbed(grid, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size, t_scale=t_scale)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # A Parameter (not a buffer) so it is in the state dict and parameter count exactly as
        # in the published checkpoints; frozen because it is a fixed sin-cos table.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def null_class(self) -> Optional[int]:
        """Label index of the unconditional class, or None when the model has no null row."""
        return self.num_classes if self.y_embedder.dropout_prob > 0 else None

    def initialize_weights(self) -> None:
        """DiT paper initialisation; zero adaLN and output layers make the network output 0."""
        def _basic_init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

        self.apply(_basic_init)

        gh, gw = self.x_embedder.grid_size
        pe = sincos_pos_embed_2d(self.pos_embed.shape[-1], gh, gw)
        self.pos_embed.data.copy_(pe.float().unsqueeze(0))

        # The patch conv is a linear map on flattened patches: initialise it as one.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C_out) -> (B, C_out, H, W); per-token channel order is (p_row, p_col, c)."""
        p, c = self.patch_size, self.out_channels
        gh, gw = self.x_embedder.grid_size
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, gh * p, gw * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,) or scalar, y: (B,) long -> (B, C_out, H, W).

        Labels are dropped to the null class with probability class_dropout_prob in training
        mode, or exactly where force_drop_ids == 1 if it is given (any mode).
        """
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (B, T, h)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # (B, h)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))


# --------------------------------------------------------------------------------------------
# Model table
# --------------------------------------------------------------------------------------------

# The one size table: name -> (depth, hidden_size, num_heads). S, B, L, XL are the DiT paper's sizes
# (Table 1). "Ti" is NOT a paper size: it is this project's CPU size (depth 6, hidden 192, 3 heads of 64, as
# DeiT-Ti's width) for the embedded Fashion-MNIST default, small enough to train on 2 CPU cores and to ship.
_SIZES = {
    "Ti": (6, 192, 3),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
_PATCH_SIZES: Sequence[int] = (1, 2, 4, 8)

# "DiT-XL/2" -> callable(input_size=..., in_channels=..., num_classes=..., learn_sigma=..., **kw).
DiT_models: dict[str, Callable[..., DiT]] = {
    f"DiT-{size}/{p}": partial(DiT, depth=d, hidden_size=h, num_heads=n, patch_size=p)
    for size, (d, h, n) in _SIZES.items()
    for p in _PATCH_SIZES
}


def build_dit(name: str, **kwargs) -> DiT:
    """Build a table model by name, e.g. build_dit("DiT-XL/2", input_size=32, num_classes=1000)."""
    try:
        factory = DiT_models[name]
    except KeyError:
        raise UserError(f"unknown DiT model {name!r}; valid names: {', '.join(DiT_models)}") from None
    return factory(**kwargs)

"""KL-VAE image encoder of SSDD (docs/ARCHITECTURE.md §2): the LDM / Stable-Diffusion VAE encoder layout.

An encoder is named `f{F}c{C}`: F = spatial downsampling factor, C = latent channels. It maps an RGB image
in [-1, 1] of shape (B, 3, H, W) to a diagonal Gaussian posterior over latents of shape (B, C, H/F, W/F).

Layout for base width 128 and F = 8 (levels = log2(F) + 1, downsample after all but the last level):

    conv_in 3 -> 128
    down.0   2 x ResNet(128)           + downsample    H   -> H/2
    down.1   2 x ResNet(256)           + downsample    H/2 -> H/4
    down.2   2 x ResNet(512)           + downsample    H/4 -> H/8
    down.3   2 x ResNet(512)
    mid      ResNet -> single-head attention -> ResNet
    head     GroupNorm -> SiLU -> conv_out (512 -> 2C) -> out_proj 1x1 (2C -> 2C)

Parameter names follow the released checkpoints (docs/ARCHITECTURE.md §9) so that they load strictly.
"""

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer.common.errors import UserError

VALID_FACTORS = (4, 8, 16, 32)
_NAME_RE = re.compile(r"f(\d+)c(\d+)")
# The Stable-Diffusion VAE encoder is this layout at f8c4 and base width 128 (weights: tokenizer.sdvae).
SDVAE_ENCODER = "sdvae"


def parse_encoder_name(name: str) -> tuple[int, int]:
    """'f8c4' -> (8, 4): (downsampling factor F, latent channels C); 'sdvae' -> (8, 4)."""
    if isinstance(name, str) and name.strip().lower() == SDVAE_ENCODER:
        return 8, 4
    m = _NAME_RE.fullmatch(name.strip().lower()) if isinstance(name, str) else None
    if m is None or int(m.group(1)) not in VALID_FACTORS or int(m.group(2)) < 1:
        raise UserError(
            f"bad encoder name {name!r}: expected 'f<F>c<C>' with F in {{4, 8, 16, 32}} and C >= 1, e.g. 'f8c4' or "
            f"'f16c16', or 'sdvae'"
        )
    return int(m.group(1)), int(m.group(2))


class DiagonalGaussian:
    """Posterior N(mean, diag(var)) built from encoder moments (B, 2C, H, W) = [mean, logvar] along channels."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        # Clamping keeps exp() finite early in training when the head still outputs wild values.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        """Most likely latent (B, C, H, W): the mean. Used at evaluation and for z statistics."""
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample mean + std * eps (B, C, H, W); fixed by `generator` when given."""
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, (B,): summed over C, H, W, in fp32 even under bf16 autocast."""
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))


def _norm(channels: int) -> nn.GroupNorm:
    # eps 1e-6 as in the LDM/SD VAE, not PyTorch's default 1e-5.
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """(B, C_in, H, W) -> (B, C_out, H, W): two GroupNorm -> SiLU -> conv3x3 stages plus a shortcut.

    No time embedding and no dropout: the encoder is a plain (deterministic) feature extractor.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # A learned 1x1 projection only where the identity cannot be added (width change).
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """(B, C, H, W) -> (B, C, H // 2, W // 2): right/bottom zero pad by 1, conv3x3 stride 2, padding 0.

    The asymmetric pad is what the SD VAE does; keeping it makes official weights produce identical latents.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class AttnBlock(nn.Module):
    """(B, C, H, W) -> (B, C, H, W): single-head global self-attention with 1x1-conv projections, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)

        def tokens(t):  # (B, C, H, W) -> (B, 1 head, H*W, C)
            return t.flatten(2).transpose(1, 2).unsqueeze(1)

        out = F.scaled_dot_product_attention(tokens(self.q(hn)), tokens(self.k(hn)), tokens(self.v(hn)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class DownLevel(nn.Module):
    """One resolution level: `block` (2 ResNets) then, except on the last level, `downsample`."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: bool):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels) for j in range(num_blocks)
        )
        if downsample:
            self.downsample = Downsample(out_channels)
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class MidBlock(nn.Module):
    """Lowest resolution: ResNet -> attention -> ResNet (the only global mixing in the encoder)."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> DiagonalGaussian over (B, z_channels, H/patch_size, W/patch_size).

    `base_channels` < 128 only serves small CPU runs; every width must stay divisible by 32 (GroupNorm).
    """

    num_res_blocks = 2

    def __init__(self, patch_size: int = 8, z_channels: int = 4, base_channels: int = 128, in_channels: int = 3):
        super().__init__()
        if patch_size not in VALID_FACTORS:
            raise UserError(f"encoder patch size must be one of {VALID_FACTORS}, got {patch_size}")
        if base_channels < 32 or base_channels % 32:
            raise UserError(f"encoder base_channels must be a positive multiple of 32 (GroupNorm), got {base_channels}")
        self.patch_size = patch_size
        self.z_channels = z_channels
        n_down = int(math.log2(patch_size))
        ch_mult = (1, 2) + (4,) * (n_down - 1)  # f8 -> (1, 2, 4, 4): levels = log2(F) + 1
        widths = [base_channels * m for m in ch_mult]

        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList(
            DownLevel(
                widths[max(i - 1, 0)], widths[i], self.num_res_blocks, downsample=i < len(widths) - 1
            )
            for i in range(len(widths))
        )
        self.mid = MidBlock(widths[-1])
        self.norm_out = _norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * z_channels, 3, padding=1)
        # Extra 1x1 on the moments: plays the role of SD's `quant_conv`, kept for checkpoint compatibility.
        self.out_proj = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        # The release's initialisation of an encoder trained from scratch (docs/ARCHITECTURE.md §2); GroupNorm keeps
        # PyTorch's weight 1 / bias 0.
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> DiagonalGaussian:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return DiagonalGaussian(self.out_proj(h))


def build_encoder(name: str, base_channels: int = 128) -> Encoder:
    """Encoder from an 'f{F}c{C}' name, e.g. build_encoder('f8c4'); 'sdvae' is f8c4 at SD-VAE's width 128."""
    patch_size, z_channels = parse_encoder_name(name)
    if name.strip().lower() == SDVAE_ENCODER and base_channels != 128:
        raise UserError(f"the sdvae encoder has SD-VAE's base width 128, not {base_channels}")
    return Encoder(patch_size=patch_size, z_channels=z_channels, base_channels=base_channels)

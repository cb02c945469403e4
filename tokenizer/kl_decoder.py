"""The classic KL-VAE decoder (LDM / Stable-Diffusion VAE), the baseline SSDD is compared with.

The KL-VAE decodes a latent in one deterministic forward pass; it is trained with L1 + LPIPS + optionally a patch
discriminator (hinge loss; tokenizer.losses.PatchDiscriminator). It is the mirror image of our encoder
(tokenizer/encoder.py) and reuses its blocks.

Layout for base width 128 and F = 8 (levels = log2(F) + 1, as the encoder; upsample on all but the finest level):

    post_quant_conv 1x1 C -> C          (SD keeps it outside the decoder; here an attribute, see below)
    conv_in  C -> 512
    mid      ResNet(512) -> single-head attention -> ResNet(512)
    up.3     3 x ResNet(512)           + upsample    H/8 -> H/4
    up.2     3 x ResNet(512)           + upsample    H/4 -> H/2
    up.1     3 x ResNet(256)           + upsample    H/2 -> H
    up.0     3 x ResNet(128)
    head     GroupNorm -> SiLU -> conv_out (128 -> 3)

`up.{i}` is indexed like the encoder's `down.{i}` (0 = finest) and runs from coarse to fine, as in LDM. Key
names are those of the LDM checkpoints (`conv_in`, `mid.block_1`, `mid.attn_1`, `up.{i}.block.{j}`,
`up.{i}.upsample.conv`, `norm_out`, `conv_out`), so an SD-VAE `first_stage_model.decoder.*` state dict loads
with that prefix stripped, and `first_stage_model.post_quant_conv.*` maps onto `post_quant_conv.*`.
Without post_quant_conv, f8c4 at base 128 has exactly the parameter count of the SD-VAE decoder (a test checks).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer.common.errors import UserError
from tokenizer.decoder import Upsample
from tokenizer.encoder import VALID_FACTORS, Encoder, MidBlock, ResnetBlock, _norm, parse_encoder_name


class UpLevel(nn.Module):
    """One resolution level: `block` (num_res_blocks + 1 ResNets) then, except on the finest level, `upsample`."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool, subpixel: bool):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels) for j in range(num_blocks)
        )
        self.upsample = Upsample(out_channels, subpixel) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        return x if self.upsample is None else self.upsample(x)


class KLDecoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, 3, h * patch_size, w * patch_size), about [-1, 1] (not clamped).

    `base_channels` < 128 only serves small CPU runs; every width must stay divisible by 32 (GroupNorm).
    `subpixel_upsample`: False (default) upsamples as LDM and diffusers do, nearest x2 then a 3x3 conv, so this
    decoder stays the classic baseline SSDD is measured against; True gives it SSDD's exact shortcut
    (`tokenizer.decoder.subpixel_upsample_conv`), same weights and outputs, fewer FLOPs.
    """

    num_res_blocks = 2  # as the encoder; the decoder uses num_res_blocks + 1 ResNets per level (LDM)

    def __init__(self, z_channels: int = 4, patch_size: int = 8, base_channels: int = 128,
                 subpixel_upsample: bool = False):
        super().__init__()
        if patch_size not in VALID_FACTORS:
            raise UserError(f"KL decoder patch size must be one of {VALID_FACTORS}, got {patch_size}")
        if base_channels < 32 or base_channels % 32:
            raise UserError(f"KL decoder base_channels must be a positive multiple of 32 (GroupNorm), "
                            f"got {base_channels}")
        self.z_channels = z_channels
        self.patch_size = patch_size
        self.base_channels = base_channels
        n_up = int(math.log2(patch_size))
        ch_mult = (1, 2) + (4,) * (n_up - 1)  # same widths as the encoder: f8 -> (1, 2, 4, 4)
        widths = [base_channels * m for m in ch_mult]
        n = len(widths)

        # SD applies this 1x1 to z before the decoder proper; it mirrors the encoder's out_proj (SD's quant_conv).
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        # Level i takes the width of level i + 1 (the coarser one it comes from); the coarsest takes the mid width.
        self.up = nn.ModuleList(
            UpLevel(widths[min(i + 1, n - 1)], widths[i], self.num_res_blocks + 1, upsample=i > 0,
                    subpixel=subpixel_upsample)
            for i in range(n)
        )
        self.norm_out = _norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)
        # Same initialisation as the encoder it is trained with (conv N(0, 0.02), biases 0; GroupNorm 1/0).
        self.apply(Encoder._init_weights)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4 or z.shape[1] != self.z_channels:
            raise UserError(f"KL decoder expects latents (B, {self.z_channels}, h, w), got {tuple(z.shape)}")
        h = self.conv_in(self.post_quant_conv(z))
        h = self.mid(h)
        for level in reversed(self.up):  # coarse to fine
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Same as forward; named like SSDD.decode so callers can treat both decoders alike."""
        return self(z)

    @property
    def last_layer(self) -> torch.Tensor:
        """conv_out's weight: where the adaptive GAN weight compares gradient norms (see `adaptive_gan_weight`)."""
        return self.conv_out.weight


def build_kl_decoder(encoder_name: str, base_channels: int = 128, subpixel_upsample: bool = False) -> KLDecoder:
    """KL decoder matching an 'f{F}c{C}' encoder, e.g. build_kl_decoder('f8c4')."""
    patch_size, z_channels = parse_encoder_name(encoder_name)
    return KLDecoder(z_channels=z_channels, patch_size=patch_size, base_channels=base_channels,
                     subpixel_upsample=subpixel_upsample)

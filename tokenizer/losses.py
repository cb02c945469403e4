"""Auxiliary training losses of the tokenizer: LPIPS (VGG), REPA against DINOv2-base, and the PatchGAN of the KL-VAE
baseline (docs/ARCHITECTURE.md §4; the KL term is the posterior's own, `tokenizer.encoder`).

Frozen networks (the LPIPS trunk and heads, the DINOv2 teacher) are *held outside* the module tree: they live in a
one-element Python list, so they never appear in ``state_dict()``, ``parameters()`` or ``modules()`` (training
checkpoints, optimizers and DDP only see trainable weights, e.g. the REPA projector), and ``.train()`` on a parent
cannot switch them out of eval mode. ``_apply`` is overridden so that ``.to(device)``, ``.cuda()``, ``.float()``, ...
still move/cast them together with the owning module.

Weights: every pretrained network can be loaded from a local file (``weights_path``); otherwise the library's normal
download path is used (which also finds a pre-seeded local cache). If neither works a one-line
``WeightsUnavailableError`` says which file is missing, where to put it and how to switch the loss off.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer.common.downloads import cache_path
from tokenizer.common.errors import UserError, WeightsUnavailableError, one_line
from tokenizer.common.weights import read_weight_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _HoldsFrozen(nn.Module):
    """Base for modules that keep one frozen network out of their state dict (see module docstring)."""

    def _hold(self, net: nn.Module) -> None:
        net.requires_grad_(False).eval()
        self._frozen = [net]  # a list: invisible to nn.Module registration

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if getattr(self, "_frozen", None):
            self._frozen[0]._apply(fn)
        return self


# --------------------------------------------------------------------------------------------------------- LPIPS
def _torchvision_weights_file(net: str) -> str:
    """File name torchvision caches for the ImageNet backbone lpips builds (``pretrained=True`` → IMAGENET1K_V1)."""
    from torchvision import models

    enum = {"vgg": models.VGG16_Weights, "vgg16": models.VGG16_Weights, "alex": models.AlexNet_Weights,
            "squeeze": models.SqueezeNet1_1_Weights}[net]
    return enum.IMAGENET1K_V1.url.rsplit("/", 1)[-1]


# What a user sets when LPIPS weights cannot be had: AlexNet is the eval metric, the others (VGG) the training loss.
LPIPS_HINTS = {"alex": "set eval.lpips_weights=<full LPIPS state dict>, or eval.lpips=false to skip the metric"}
LPIPS_LOSS_HINT = "set aux_losses.lpips_weights=<full LPIPS state dict>, or losses.lpips=0 to train without it"


def build_lpips(net: str = "vgg", pretrained: bool = True, weights_path: str | Path | None = None) -> nn.Module:
    """A frozen, eval-mode ``lpips.LPIPS`` (v0.1, with linear heads).

    weights_path: full LPIPS state dict (trunk + heads), loaded strictly into a randomly built network.
    pretrained=True: torchvision ImageNet trunk via lpips' normal path (download to / cache in
    ``$TORCH_HOME/hub/checkpoints``) and the calibrated heads shipped in the lpips wheel.
    pretrained=False: random trunk (tests only).
    """
    import lpips

    with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" warnings from inside lpips
        warnings.simplefilter("ignore")
        if weights_path is not None:
            model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
            state = read_weight_file(weights_path, f"LPIPS ({net}) weights file", entries=())[0]
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as err:
                raise WeightsUnavailableError(
                    f"{weights_path} is not a full lpips.LPIPS(net={net!r}) state dict "
                    f"({one_line(err, with_type=True)[:200]})"
                ) from None
        elif pretrained:
            try:
                model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=False, verbose=False)
            except Exception as err:  # no network and no cached file, or a broken cached file
                name = _torchvision_weights_file(net)
                where = cache_path(name)
                raise WeightsUnavailableError(
                    f"LPIPS ({net}) needs the torchvision ImageNet weights {name}, which could not be loaded or "
                    f"downloaded ({one_line(err, with_type=True)[:120]}); put the file at {where}, or "
                    f"{LPIPS_HINTS.get(net, LPIPS_LOSS_HINT)}"
                ) from None
        else:
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    return model.requires_grad_(False).eval()


class LPIPSLoss(_HoldsFrozen):
    """Frozen LPIPS distance between images in [-1, 1]; ``forward`` returns the batch mean (a scalar).

    The lpips network is held outside the state dict (``state_dict()`` is empty). Feature normalisation uses
    eps = 1e-8 instead of lpips' 1e-10 to avoid NaNs (as the official training entry point does): this forward
    re-implements lpips' v0.1 forward with its own normalisation rather than patching ``lpips.normalize_tensor``
    globally.
    """

    EPS = 1e-8

    def __init__(self, net: str = "vgg", pretrained: bool = True, weights_path: str | Path | None = None):
        super().__init__()
        self.net_name = net
        self._hold(build_lpips(net, pretrained=pretrained, weights_path=weights_path))

    @property
    def lpips(self) -> nn.Module:
        return self._frozen[0]

    def per_image(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS per image, shape (B,)."""
        m = self.lpips
        fx, fy = m.net(m.scaling_layer(x)), m.net(m.scaling_layer(y))
        total = 0.0
        for k in range(m.L):
            a = fx[k] / (fx[k].square().sum(1, keepdim=True).sqrt() + self.EPS)
            b = fy[k] / (fy[k].square().sum(1, keepdim=True).sqrt() + self.EPS)
            total = total + m.lins[k]((a - b).square()).mean((2, 3))
        return total.flatten()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.per_image(x, y).mean()


# ---------------------------------------------------------------------------------------------------------- REPA
class DinoV2Teacher(nn.Module):
    """Frozen DINOv2-base (timm ``vit_base_patch14_dinov2.lvd142m``, 768-d, patch 14) used as REPA teacher.

    weights_path: a local state dict (.safetensors or torch file) in timm format, or in the original
    facebookresearch/dinov2 format (converted by timm's ``checkpoint_filter_fn``). pretrained=True without a file
    downloads from the Hugging Face hub (cache: $HF_HOME/hub). pretrained=False: random weights (tests only).
    The module always stays in eval mode.
    """

    MODEL_NAME = "vit_base_patch14_dinov2.lvd142m"
    PATCH = 14
    DIM = 768

    def __init__(self, pretrained: bool = True, weights_path: str | Path | None = None):
        super().__init__()
        import timm

        kwargs = dict(dynamic_img_size=True, num_classes=0)
        if weights_path is not None:
            model = timm.create_model(self.MODEL_NAME, pretrained=False, **kwargs)
            from timm.models.vision_transformer import checkpoint_filter_fn

            state = read_weight_file(weights_path, "DINOv2 weights file", entries=())[0]
            try:
                model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
            except Exception as err:
                raise WeightsUnavailableError(
                    f"{weights_path} is not a DINOv2-base ({self.MODEL_NAME}) state dict "
                    f"({one_line(err, with_type=True)[:200]})"
                ) from None
        elif pretrained:
            try:
                model = timm.create_model(self.MODEL_NAME, pretrained=True, **kwargs)
            except Exception as err:  # no network / not in the HF cache
                raise WeightsUnavailableError(
                    f"DINOv2 teacher weights (hf-hub timm/{self.MODEL_NAME}) could not be loaded or downloaded "
                    f"({one_line(err, with_type=True)[:120]}); set aux_losses.repa.dino_weights=<file>, or "
                    f"losses.repa=0 to train without REPA"
                ) from None
        else:
            model = timm.create_model(self.MODEL_NAME, pretrained=False, **kwargs)
        self.model = model.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def features(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch tokens (B, gh*gw, 768), row-major, for images in [-1, 1] resized to (14·gh, 14·gw)."""
        gh, gw = grid
        x = ((images.float() + 1) / 2 - self.mean) / self.std
        x = F.interpolate(x, size=(self.PATCH * gh, self.PATCH * gw), mode="bicubic", align_corners=False)
        tokens = self.model.forward_features(x)
        return tokens[:, self.model.num_prefix_tokens:]  # drop CLS (and register) tokens


class REPALoss(_HoldsFrozen):
    """REPA: 1 − mean token-wise cosine similarity between projected student tokens and DINOv2 tokens (fp32).

    Only the trainable ``projector`` (Linear C→C, SiLU, Linear C→768 for n_layers=2) is in the state dict; the
    teacher is held outside it. ``teacher=None`` builds the pretrained ``DinoV2Teacher()``.
    """

    def __init__(self, student_dim: int, teacher_dim: int = 768, n_layers: int = 2,
                 teacher: DinoV2Teacher | None = None):
        super().__init__()
        if n_layers < 1:
            raise UserError("n_layers must be >= 1")
        layers: list[nn.Module] = []
        for _ in range(n_layers - 1):
            layers += [nn.Linear(student_dim, student_dim), nn.SiLU()]
        layers.append(nn.Linear(student_dim, teacher_dim))
        self.projector = nn.Sequential(*layers)
        self._hold(teacher if teacher is not None else DinoV2Teacher(pretrained=True))

    @property
    def teacher(self) -> DinoV2Teacher:
        return self._frozen[0]

    def forward(self, student_feats: torch.Tensor, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """student_feats (B, gh*gw, C) row-major tokens; images (B, 3, H, W) in [-1, 1] (the real images)."""
        if student_feats.shape[1] != grid[0] * grid[1]:
            raise UserError(f"student has {student_feats.shape[1]} tokens, grid {grid} needs {grid[0] * grid[1]}")
        target = self.teacher.features(images, grid)
        pred = self.projector(student_feats)
        return 1 - F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()


# ----------------------------------------------------------------------------------------------------------
# PatchGAN discriminator and its losses
# ----------------------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """(B, 3, H, W) -> (B, 1, H', W') real/fake logits, one per overlapping patch (pix2pix "NLayer" PatchGAN).

    n_layers stride-2 4x4 convs (the first without norm), one stride-1 4x4 conv, then a 4x4 conv to 1 channel;
    LeakyReLU 0.2 and BatchNorm in between. With n_layers = 3 each logit sees a 70x70 receptive field and a
    256-px image gives a 30x30 map (H' = H/8 - 2). Inputs need H, W >= 24 for n_layers = 3.
    Kept as one nn.Sequential named `main`, as the taming checkpoints are.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        width = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden conv keeps the resolution
            # No conv bias before BatchNorm: BN's own shift makes it redundant.
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        # pix2pix / DCGAN init: conv N(0, 0.02); BatchNorm scale N(1, 0.02), shift 0.
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (E[relu(1 - D(real))] + E[relu(1 + D(fake))]); 0 once D separates by 1.

    Pass D(x_rec.detach()) as logits_fake so this loss does not reach the decoder.
    """
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator (decoder) adversarial loss -E[D(x_rec)]: lower when D scores the reconstructions as real."""
    return -logits_fake.mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """LDM's balance of the GAN term: ||d rec / d W|| / (||d g / d W|| + 1e-4) at the decoder's last layer W.

    Scales the generator loss so its gradient at the output matches the reconstruction loss's. Returns a
    detached scalar, clamped to [0, max_weight]; multiply it by the configured discriminator weight.
    Both losses must still have their graphs (call before backward).
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()

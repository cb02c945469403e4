"""SSDD as a drop-in VAE for diffusers pipelines (`pip install ".[diffusers]"`).

    from diffusers import DiTPipeline
    from tokenizer.diffusers_vae import SSDDVAE
    pipe = DiTPipeline.from_pretrained("facebook/DiT-XL-2-256")
    pipe.vae = SSDDVAE.from_ssdd("SDVAE_M_256").manual_seed(0)   # SSDD-M decoding SD-VAE latents (scale 0.18215)
    images = pipe(class_labels=[207, 360], num_inference_steps=25).images

`SSDDVAE` answers what pipelines ask of an `AutoencoderKL`: `encode(x).latent_dist` (a diffusers
DiagonalGaussianDistribution: `.sample(generator)`, `.mode()`), `decode(z).sample` (also `return_dict=False`),
`forward`, `config.scaling_factor` / `shift_factor` / `latents_mean` / `latents_std` / `latent_channels` /
`block_out_channels` (whose length gives the pipelines' `vae_scale_factor`, the encoder's downsampling factor) /
`force_upcast`, `.dtype`, `.device`, `.to(device, dtype)`, `enable_slicing()`, and `save_pretrained` /
`from_pretrained` (it is a diffusers `ModelMixin`).

It wraps any SSDD model (tokenizer.ssdd): the released SDVAE_* decoders on SD-VAE latents (scaling 0.18215), or a
tokenizer of this project, whose z_stats give the scaling (1 / z_std) and the shift (z_mean). The shift is folded into
the VAE: its latents are z - z_mean (encode subtracts it, decode adds it back) and `config.shift_factor` is 0, so the
pipelines that apply only `scaling_factor` (DiT, Stable Diffusion 1/2) and those that also apply `shift_factor`
(SD3, Flux) both give the diffusion model (z - z_mean) / z_std.

Decoding runs the SSDD sampler: one step for a distilled decoder, else the model's default (8), or `steps`. Its noise
is drawn on the CPU (as SSDD.decode draws it) from the `generator` given to `decode`, else from `noise_generator`
(`manual_seed(seed)` sets it; pipelines call `decode(latents)` without one), else from torch's global generator.
"""

from __future__ import annotations

import os

import torch

from tokenizer.common.errors import UserError

try:
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.autoencoders.vae import AutoencoderMixin, DecoderOutput, DiagonalGaussianDistribution
    from diffusers.models.modeling_outputs import AutoencoderKLOutput
    from diffusers.utils.accelerate_utils import apply_forward_hook
except ImportError as err:  # an optional extra: say how to get it
    raise ImportError(f"tokenizer.diffusers_vae needs diffusers: pip install \".[diffusers]\" ({err})") from None

from tokenizer.latent_stats import FILE_NAME as Z_STATS_FILE
from tokenizer.latent_stats import fixed_z_stats, read_z_stats
from tokenizer.ssdd import SSDD


def encoder_widths(model: SSDD) -> list[int]:
    """The encoder's level widths (SD-VAE: 128, 256, 512, 512): diffusers derives the downsampling factor
    2 ** (len - 1) from their number."""
    levels = getattr(model.encoder, "down", None)
    if levels is not None:
        return [int(level.block[-1].conv2.out_channels) for level in levels]
    return [128] * (int(model.patch_size).bit_length())  # a custom encoder module: only the count matters


class SSDDVAE(ModelMixin, AutoencoderMixin, ConfigMixin):
    """An SSDD model behind the AutoencoderKL interface (see the module docstring)."""

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, encoder: str = "sdvae", decoder: str = "M", encoder_base_channels: int = 128,
                 kl_base_channels: int = 128, single_step: bool = False, steps: int | None = None,
                 t_pow_shift: float = 2.0, scaling_factor: float = 0.18215, latent_shift: float = 0.0,
                 sample_size: int = 256, latent_channels: int | None = None, block_out_channels: tuple | None = None,
                 in_channels: int = 3, out_channels: int = 3, shift_factor: float = 0.0, latents_mean=None,
                 latents_std=None, force_upcast: bool = False):
        super().__init__()
        if shift_factor not in (0, None) or latents_mean is not None or latents_std is not None:
            raise UserError("SSDDVAE folds its shift into encode/decode (latent_shift): shift_factor must be 0 and "
                            "latents_mean / latents_std unset")
        self.ssdd = SSDD(encoder=encoder, decoder=decoder, encoder_base_channels=encoder_base_channels,
                         kl_base_channels=kl_base_channels, single_step=single_step,
                         fm_sampler={"t_pow_shift": t_pow_shift})
        self._describe(latent_channels, block_out_channels)
        self.use_slicing = False
        self.noise_generator: torch.Generator | None = None

    def _describe(self, latent_channels=None, block_out_channels=None) -> None:
        """Record in the config what the wrapped model's architecture says (given values must agree with it)."""
        derived = {"latent_channels": int(self.ssdd.encoder.z_channels),
                   "block_out_channels": tuple(encoder_widths(self.ssdd))}
        for key, given in (("latent_channels", latent_channels), ("block_out_channels", block_out_channels)):
            if given is not None and (tuple(given) if key == "block_out_channels" else given) != derived[key]:
                raise UserError(f"config {key}={given} does not fit encoder {self.config.encoder} "
                                f"({derived[key]})")
        self.register_to_config(**derived)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_ssdd(cls, model, scaling_factor: float | None = None, latent_shift: float | None = None,
                  z_stats=None, steps: int | None = None, sample_size: int = 256) -> "SSDDVAE":
        """Wrap `model`: an SSDD, a released name ('SDVAE_M_256', 'F8C4_M_256', ...) or a checkpoint file.

        The latent normalisation, first found of: `scaling_factor` (and `latent_shift`) given; `z_stats` (a dict with
        z_mean / z_std, or a z_stats.json path); the published one of the latent space (SD-VAE: 0.18215, shift 0);
        the z_stats.json beside a checkpoint file (or in its run's results). `steps`: the decoder steps (default: 1
        for a distilled decoder, else the model's default)."""
        source = None
        if not isinstance(model, SSDD):
            source = str(model)
            model = SSDD.from_checkpoint(source)
        model = model.eval().requires_grad_(False)
        if scaling_factor is None:
            stats = _latent_stats(model, z_stats, source)
            scaling_factor, shift = 1.0 / stats["z_std"], stats["z_mean"]
            latent_shift = shift if latent_shift is None else latent_shift
        with torch.device("meta"):  # the architecture only; the model's own weights replace it below
            vae = cls(encoder=model.encoder_name, decoder=model.decoder_name,
                      encoder_base_channels=model.encoder_base_channels, kl_base_channels=model.kl_base_channels,
                      single_step=bool(model.single_step), steps=steps, t_pow_shift=model.t_pow_shift,
                      scaling_factor=float(scaling_factor), latent_shift=float(latent_shift or 0.0),
                      sample_size=sample_size)
        vae.ssdd = model
        vae._describe()
        return vae.eval()

    def manual_seed(self, seed: int) -> "SSDDVAE":
        """Seed the decoder's noise for the calls that pass no generator (a pipeline's `vae.decode(latents)`)."""
        self.noise_generator = torch.Generator("cpu").manual_seed(int(seed))
        return self

    @property
    def default_steps(self) -> int:
        """Decoder steps when `decode` is not told: config.steps, else 1 for a distilled decoder, else the model's."""
        if self.config.steps is not None:
            return int(self.config.steps)
        return 1 if self.ssdd.single_step or self.ssdd.is_kl else self.ssdd.default_steps

    # ------------------------------------------------------------------ AutoencoderKL interface

    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Images (B, 3, H, W) in [-1, 1] -> posterior over the VAE's latents z - latent_shift (unscaled, as
        AutoencoderKL's: pipelines multiply by config.scaling_factor)."""
        parts = x.split(1) if self.use_slicing and x.shape[0] > 1 else [x]
        post = [self.ssdd.encode(p.to(self.dtype)) for p in parts]
        moments = torch.cat([torch.cat([q.mean - self.config.latent_shift, q.logvar], dim=1) for q in post])
        dist = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    @apply_forward_hook
    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None,
               steps: int | None = None, noise: torch.Tensor | None = None):
        """Latents (z - latent_shift, unscaled) -> images (B, 3, h*F, w*F) in about [-1, 1]; `noise` (the decoder's
        starting point, image-shaped) or `generator` fix the SSDD sampler's noise."""
        z = z.to(self.dtype) + self.config.latent_shift
        f = self.ssdd.patch_size
        shape = (z.shape[0], 3, z.shape[2] * f, z.shape[3] * f)
        if noise is None and not self.ssdd.is_kl:  # drawn for the whole batch, so slicing leaves images unchanged
            gen = generator if generator is not None else self.noise_generator
            noise = torch.randn(shape, generator=gen, device="cpu" if gen is None else gen.device)
        if noise is not None:
            noise = noise.to(device=z.device, dtype=z.dtype)
        steps = steps or self.default_steps
        count = 1 if self.use_slicing else z.shape[0]
        images = torch.cat([
            self.ssdd.decode(z[i:i + count], steps=steps, noise=None if noise is None else noise[i:i + count])
            for i in range(0, z.shape[0], count)])
        return DecoderOutput(sample=images) if return_dict else (images,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None):
        """Reconstruct `sample` (posterior mode, or a sample of it), as AutoencoderKL.forward."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict, generator=generator)


def _latent_stats(model: SSDD, z_stats, source: str | None) -> dict:
    """{"z_mean", "z_std"} for `SSDDVAE.from_ssdd` (see there for the order)."""
    if isinstance(z_stats, dict):
        if not float(z_stats.get("z_std", 0)) > 0:
            raise UserError(f"z_stats needs z_mean and a positive z_std, got {z_stats}")
        return {"z_mean": float(z_stats.get("z_mean", 0.0)), "z_std": float(z_stats["z_std"])}
    if z_stats is not None:
        return read_z_stats(str(z_stats))
    fixed = fixed_z_stats(model.encoder_name)
    if fixed is not None:
        return fixed
    if source is not None and os.path.isfile(source):
        from tokenizer.common.runs import find_result

        path = find_result(source, Z_STATS_FILE)
        if os.path.isfile(path):
            return read_z_stats(path)
    raise UserError(f"the latents of this {model.encoder_name} tokenizer have no known scale: pass z_stats= (a "
                    f"z_stats.json from `python -m tokenizer.train task=z_stats`) or scaling_factor= and latent_shift=")

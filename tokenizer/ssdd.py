"""SSDD: a KL encoder plus the single-step-distillable diffusion decoder, behind one small API.

    model = SSDD.from_pretrained("F8C4_M_256")  # a released model by name (Hugging Face cache, pinned revision)
    model = SSDD(encoder="f8c4", decoder="M", checkpoint="F8C4_M_256.safetensors")   # the same from a local file
    z = model.encode(x).mode()                 # x: (B, 3, H, W) in [-1, 1] -> z: (B, 4, H/8, W/8)
    x_rec = model.decode(z, steps=8)           # Euler on the (1 - i/N)^2 grid, from fixed or fresh noise

The state dict is `encoder.*` + `decoder.*`, exactly the layout of the released files (docs/ARCHITECTURE.md §9), so
those load unchanged. `decoder="kl"` swaps in the classic KL-VAE decoder (the baseline SSDD is judged against) behind
the same API. Files written by this project also carry the architecture in their safetensors metadata, so
`SSDD.from_checkpoint(path)` rebuilds the right model without being told.

`encoder="sdvae"` is the frozen Stable-Diffusion VAE encoder (tokenizer/sdvae.py), as in the official release's
SD-VAE decoders, which load as decoder-only files:

    model = SSDD(encoder="sdvae", decoder="M", checkpoint="SDVAE_M_256.safetensors")   # `decoder.*` keys only
    sdvae = SSDD(encoder="sdvae", decoder="kl", checkpoint="sd-vae-ft-mse")            # SD-VAE itself, any layout

Its encoder weights come from `encoder_checkpoint` (an SD-VAE file in either layout, or a known name), else from
sd-vae-ft-mse, fetched at the first `encode()`. Latents are SD-VAE's raw ones (no 0.18215 factor).
"""

import hashlib
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from tokenizer.common.checkpoint import (
    check_state_dict,
    load_weights,
    read_header,
    read_metadata,
    read_shapes,
    read_weights,
    save_weights,
)
from tokenizer.common.downloads import RELEASED_SSDD, fetch_released, released_architecture, released_name
from tokenizer.common.errors import UserError
from tokenizer.decoder import DECODER_SIZES, SSDDDecoder
from tokenizer.encoder import SDVAE_ENCODER, DiagonalGaussian, build_encoder, parse_encoder_name
from tokenizer.flow import clean_estimate, euler_sample, flow_matching_loss, noisy_input, sample_t
from tokenizer.kl_decoder import KLDecoder
from tokenizer.latent_stats import fixed_z_stats
from tokenizer.sdvae import (
    DEFAULT_SDVAE,
    SDVAE_WEIGHTS,
    detect_layout,
    from_layout,
    read_state_file,
    sdvae_file,
    sdvae_state,
)


def infer_decoder_size(state: dict, z_channels: int, source: str = "the file") -> str:
    """The SSDD decoder size ('M', ...) whose `decoder.*` keys and shapes are exactly those of `state`.

    Released decoder-only files (e.g. SDVAE_M_256.safetensors) carry no metadata; each size is built on the meta
    device (no memory) and compared.
    """
    shapes = {k.removeprefix("decoder."): tuple(v.shape) for k, v in state.items() if k.startswith("decoder.")}
    for size in DECODER_SIZES:
        with torch.device("meta"):
            own = {k: tuple(v.shape) for k, v in SSDDDecoder(size, z_channels=z_channels).state_dict().items()}
        if own == shapes:
            return size
    raise UserError(f"{source} holds no SSDD decoder for {z_channels}-channel latents of any size "
                    f"({', '.join(DECODER_SIZES)}); pass decoder='M'-style to see the mismatching keys")


ARCHITECTURE_KEYS = ("encoder", "decoder", "encoder_base_channels", "kl_base_channels")


def checkpoint_architecture(path: str, encoder: str | None = None, strict: bool = False) -> dict:
    """What a checkpoint says of its architecture: the `ARCHITECTURE_KEYS` its safetensors metadata records
    (integers as integers), or for a released file without metadata those its name gives (F8C4_M_256); {} for a
    file of another format or without either.

    A file that records no decoder (a released `F8C4_M_256`-style file) but holds `decoder.*` weights gets its
    decoder size from their shapes (`infer_decoder_size`, header only), for the latents of its recorded encoder
    or else of `encoder`; an SD-VAE autoencoder or (unless `strict`) a decoder of no known size is left without
    one. Likewise the encoder's width is read from its first convolution.
    """
    if not str(path).endswith(".safetensors"):
        return {}
    keys, meta = read_header(path)
    arch = {k: meta[k] for k in ARCHITECTURE_KEYS if k in meta}
    if not arch:  # a released file carries no metadata: its name says what it is
        arch = released_architecture(os.path.basename(path)) or {}
    for key in ("encoder_base_channels", "kl_base_channels"):
        if key in arch:
            arch[key] = int(arch[key])
    encoder = arch.get("encoder", encoder)
    has_decoder = any(k.startswith("decoder.") for k in keys)
    if "encoder_base_channels" not in arch and encoder != SDVAE_ENCODER and "encoder.conv_in.weight" in keys:
        arch["encoder_base_channels"] = read_shapes(path)["encoder.conv_in.weight"][0]  # the encoder's first width
    if "decoder" not in arch and encoder and has_decoder and detect_layout(keys) is None:
        shapes = {k: torch.empty(shape, device="meta") for k, shape in read_shapes(path).items()}
        try:
            arch["decoder"] = infer_decoder_size(shapes, parse_encoder_name(encoder)[1], path)
        except UserError:  # not an SSDD decoder of any size: the caller's own choice stands, unless `strict`
            if strict:
                raise
    return arch


@dataclass
class TrainStep:
    """What one training forward returns: the pieces the auxiliary losses need, and the core losses."""

    x0_gt: torch.Tensor  # the image the one-step estimate should match (real image, or teacher sample)
    x0_pred: torch.Tensor  # x_t + t * v_pred
    t: torch.Tensor | None  # None for the KL-VAE baseline (no diffusion)
    z: torch.Tensor
    noise: torch.Tensor | None
    features: torch.Tensor | None  # middle-transformer tokens for REPA, (B, N, C_mid); None for the KL-VAE
    token_grid: tuple
    losses: dict = field(default_factory=dict)


class SSDD(nn.Module):
    def __init__(
        self,
        encoder: str | nn.Module = "f8c4",
        decoder: str = "M",
        encoder_checkpoint: str | None = None,
        encoder_train: bool = False,
        fm_trainer: dict | None = None,
        fm_sampler: dict | None = None,
        checkpoint: str | None = None,
        encoder_base_channels: int = 128,
        single_step: bool = False,
        kl_base_channels: int = 128,
        attention: str = "auto",
        upsample: str = "subpixel",
    ):
        super().__init__()
        self.encoder = build_encoder(encoder, encoder_base_channels) if isinstance(encoder, str) else encoder
        if decoder == "kl":  # the KL-VAE baseline: one deterministic conv pass, trained with L1 (+ LPIPS, GAN)
            self.decoder = KLDecoder(self.encoder.z_channels, self.encoder.patch_size, kl_base_channels)
        else:
            # attention: how the middle transformer applies its window (auto | dense | local | flex; same result);
            # upsample: how the upsamplings are computed (subpixel | nearest; same result)
            self.decoder = SSDDDecoder(decoder, z_channels=self.encoder.z_channels, attention=attention,
                                       upsample=upsample)
        self.kl_base_channels = kl_base_channels
        self.encoder_name = encoder if isinstance(encoder, str) else type(encoder).__name__
        self.decoder_name = decoder
        self.encoder_base_channels = encoder_base_channels
        self.encoder_train = encoder_train
        fm_trainer = dict(fm_trainer or {})
        t_args = dict(fm_trainer.get("t_sampler_args") or {})
        self.t_mean, self.t_std = float(t_args.get("t_mean", 0.0)), float(t_args.get("t_std", 1.0))
        fm_sampler = dict(fm_sampler or {})
        self.default_steps = int(fm_sampler.get("steps", 8))
        self.t_pow_shift = float(fm_sampler.get("t_pow_shift", 2.0))
        # A distilled decoder was trained for one step only: decode() must default to 1 (docs/ARCHITECTURE.md §6).
        self.single_step = single_step
        # False after loading a decoder-only file (what a generator needs to ship): encode() then refuses.
        self.has_encoder = True
        # The SD-VAE encoder is never trained here: until its weights are in, encode() fetches them from here.
        self.sdvae_pending = DEFAULT_SDVAE if self.encoder_name == SDVAE_ENCODER else None
        if encoder_checkpoint:
            self.load_encoder(encoder_checkpoint)
        if checkpoint:
            self.load_checkpoint(checkpoint)
        if not encoder_train:
            self.encoder.requires_grad_(False)

    # ------------------------------------------------------------------ construction helpers

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    @property
    def is_kl(self) -> bool:
        """True for the KL-VAE baseline decoder (`decoder="kl"`), which has no steps, noise or transformer."""
        return self.decoder_name == "kl"

    def architecture(self) -> dict:
        """What `from_checkpoint` needs to rebuild this model (stored in safetensors metadata)."""
        arch = {
            "encoder": self.encoder_name,
            "decoder": self.decoder_name,
            "encoder_base_channels": self.encoder_base_channels,
            "single_step": int(self.single_step),
        }
        return arch | ({"kl_base_channels": self.kl_base_channels} if self.is_kl else {})

    def encoder_sha256(self) -> str:
        """sha256 of the encoder weights (names, shapes and float32 bytes, in key order): the encoder's identity.

        Latents are only interchangeable between models whose encoders have the same hash (latent caches, DiT
        checkpoints and bundles record it).
        """
        self._fetch_sdvae_encoder()
        h = hashlib.sha256()
        for k, v in sorted(self.encoder.state_dict().items()):
            h.update(f"{k}:{tuple(v.shape)};".encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    @property
    def fixed_z_stats(self) -> dict | None:
        """The fixed latent normalisation of a published latent space (SD-VAE: z_std 1/0.18215), else None (this
        project's tokenizers measure theirs: z_stats.json)."""
        return fixed_z_stats(self.encoder_name)

    def load_encoder(self, spec: str) -> None:
        """Strictly load encoder weights: `encoder.*` of an SSDD file, or for `sdvae` an SD-VAE file / known name."""
        if self.encoder_name != SDVAE_ENCODER:
            load_weights(self.encoder, spec, what=f"encoder {self.encoder_name}", prefix="encoder.")
            return
        state = sdvae_state(spec, [f"encoder.{k}" for k in self.encoder.state_dict()])
        state = {k.removeprefix("encoder."): v for k, v in state.items()}
        check_state_dict(self.encoder, state, spec, "the SD-VAE encoder")
        self.encoder.load_state_dict(state, strict=True)
        self.sdvae_pending, self.has_encoder = None, True

    def _fetch_sdvae_encoder(self) -> None:
        if self.sdvae_pending is not None:
            device = next(self.encoder.parameters()).device
            self.load_encoder(self.sdvae_pending)
            self.encoder.to(device)

    def load_checkpoint(self, path: str) -> dict:
        """Strict load of a whole-model file, a decoder-only file (`save_decoder`'s, or a released `decoder.*`-only
        one such as SDVAE_M_256.safetensors), or (for `decoder="kl"`) an SD-VAE autoencoder in either layout."""
        what = f"SSDD(encoder={self.encoder_name}, decoder={self.decoder_name})"
        if path in SDVAE_WEIGHTS:  # a known SD-VAE name: fetched (cache or download)
            path = sdvae_file(path)
        elif not os.path.isfile(str(path)) and released_name(path) is not None:  # a facebook/SSDD release name
            path = fetch_released(path)
        state, meta = read_weights(path) if str(path).endswith(".safetensors") else (read_state_file(path), {})
        layout = detect_layout(state)
        if layout is not None:  # SD-VAE itself: its decoder is the KL-VAE one
            if not self.is_kl or self.encoder_name != SDVAE_ENCODER:
                raise UserError(f"{path} is an SD-VAE autoencoder ({layout} layout): load it as "
                                f"SSDD(encoder='sdvae', decoder='kl'), or give it as encoder_checkpoint of an sdvae "
                                "model")
            state = from_layout(state, self.state_dict())
            check_state_dict(self, state, path, what)
            self.load_state_dict(state, strict=True)
            self.sdvae_pending = None
            return meta
        if not any(k.startswith(("encoder.", "decoder.")) for k in state):
            hint = " (it looks like a DiT/SiT generator)" if "x_embedder.proj.weight" in state else ""
            raise UserError(f"{path} is not an SSDD checkpoint: it has no encoder.* or decoder.* weights{hint}")
        if meta.get("parts") == "decoder" or all(k.startswith("decoder.") for k in state):
            state = {k.removeprefix("decoder."): v for k, v in state.items()}
            check_state_dict(self.decoder, state, path, f"the decoder of {what}")
            self.decoder.load_state_dict(state, strict=True)
            self.has_encoder = self.encoder_name == SDVAE_ENCODER  # SD-VAE's encoder: loaded, or fetched when needed
        else:
            check_state_dict(self, state, path, what)
            self.load_state_dict(state, strict=True)
            self.sdvae_pending = None
        if meta.get("single_step") == "1":
            self.single_step = True
        return meta

    def save_decoder(self, path: str, dtype: torch.dtype | None = None, metadata: dict | None = None) -> None:
        """Write only `decoder.*` (optionally cast, e.g. to fp16 for shipping) with the architecture metadata.

        Generation needs no encoder; `from_checkpoint` rebuilds a decode-only model from such a file. The file
        records `encoder_sha256`, the identity of the encoder whose latents it decodes (a model loaded from a
        decoder-only file has no encoder of its own: pass it in `metadata`).
        """
        state = {f"decoder.{k}": v.to(dtype) if dtype is not None and v.is_floating_point() else v
                 for k, v in self.decoder.state_dict().items()}
        identity = {"encoder_sha256": self.encoder_sha256()} if self.has_encoder else {}
        save_weights(state, path, {**self.architecture(), "parts": "decoder", **identity, **(metadata or {})})

    @classmethod
    def from_checkpoint(cls, path: str, **overrides) -> "SSDD":
        """Build from a file this project wrote (architecture in its metadata), a released file (architecture from
        its name, e.g. F8C4_M_256.safetensors, or from `encoder=`/`decoder=`; a decoder size from its shapes), or a
        release name (fetched)."""
        path = str(path)
        if not os.path.isfile(path) and released_name(path) is not None:
            path = fetch_released(path)
        meta = read_metadata(path)
        released = None if any(k in meta for k in ARCHITECTURE_KEYS) else released_architecture(os.path.basename(path))
        if released:  # a released file carries no metadata: its name says what it is
            clash = {k: v for k, v in overrides.items() if k in released and str(v).lower() != released[k].lower()}
            if clash:
                raise UserError(f"{path} is the released SSDD model {released_name(os.path.basename(path))} "
                                f"(encoder {released['encoder']}, decoder {released['decoder']}), not "
                                + ", ".join(f"{k} {v}" for k, v in clash.items()))
        arch = checkpoint_architecture(path, overrides.get("encoder"), strict="decoder" not in overrides) | overrides
        if "encoder" not in arch or "decoder" not in arch:
            raise UserError(f"{path} does not say its architecture: pass encoder='f8c4'-style and decoder='M'-style")
        for key in ("encoder_base_channels", "kl_base_channels"):
            arch[key] = int(arch.get(key, 128))
        return cls(checkpoint=path, **arch)

    @classmethod
    def from_pretrained(cls, name: str, **overrides) -> "SSDD":
        """An eval-mode model of the facebook/SSDD release by name (`RELEASED_SSDD`: F8C4_M_256, F16C16_XL_256,
        SDVAE_M_256, demo_f8c4_M_128, ...), fetched through the Hugging Face cache at the pinned revision. The
        architecture comes from the name; the strict load checks every tensor's shape against it."""
        if released_name(name) is None:
            raise UserError(f"{name!r} is not a released SSDD model; known names: {', '.join(RELEASED_SSDD)} "
                            f"(for a file or a run of your own use SSDD.from_checkpoint)")
        return cls.from_checkpoint(fetch_released(name), **overrides).eval()

    @classmethod
    def build(cls, config, checkpoint: str | None = None, freeze: bool = True, eval: bool = True) -> "SSDD":
        """Build from the `ssdd:` section of a YAML file (path) or mapping, as the official `SSDD.build`.

        Keys used: encoder, decoder, encoder_base_channels, kl_base_channels, encoder_checkpoint, encoder_train,
        fm_trainer, fm_sampler, attention, upsample, checkpoint (the `checkpoint` argument wins). Training-only keys
        (compile, ema) are ignored.
        """
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(config) if isinstance(config, str) else OmegaConf.create(config)
        cfg = OmegaConf.to_container(cfg.get("ssdd", cfg), resolve=True)
        keys = ("encoder", "decoder", "encoder_base_channels", "kl_base_channels", "encoder_checkpoint",
                "encoder_train", "fm_trainer", "fm_sampler", "attention", "upsample", "checkpoint")
        kwargs = {k: cfg[k] for k in keys if cfg.get(k) is not None}
        if checkpoint is not None:
            kwargs["checkpoint"] = checkpoint
        model = cls(**kwargs)
        if freeze:
            model.requires_grad_(False)
        return model.eval() if eval else model

    # ------------------------------------------------------------------ inference API

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: (B, 3, H, W) in [-1, 1], H and W multiples of the encoder factor -> posterior over (B, C, H/F, W/F)."""
        self._fetch_sdvae_encoder()
        if not self.has_encoder:
            raise UserError("this model was loaded from a decoder-only checkpoint: it can decode latents but not "
                            "encode images")
        f = self.patch_size
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-1] % f or x.shape[-2] % f:
            raise UserError(f"encode expects (B, 3, H, W) with H, W multiples of {f}, got {tuple(x.shape)}")
        return self.encoder(x)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(x_t, t, z)

    def image_shape(self, z: torch.Tensor) -> tuple:
        """(B, 3, H, W) of the image that latent z (B, C, h, w) decodes to."""
        f = self.patch_size
        return (z.shape[0], 3, z.shape[2] * f, z.shape[3] * f)

    def decode_noise(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The starting noise `decode(z)` draws when given none, on z's device and dtype: drawn on the generator's
        device (the CPU without one, so a seed gives the same images on any device), then moved. Timings draw it
        beforehand and pass it as `noise=`, so that they measure the decoder, not the draw and the copy."""
        noise = torch.randn(self.image_shape(z), generator=generator,
                            device="cpu" if generator is None else generator.device)
        return noise.to(device=z.device, dtype=z.dtype)

    @torch.compiler.disable  # the sampler loop stays eager; the decoder inside it may be compiled
    def decode(self, z: torch.Tensor, steps: int | None = None, noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Latent (B, C, h, w) -> image (B, 3, h*F, w*F) in about [-1, 1] (not clamped).

        `noise` fixes the starting point (same shape as the image: `decode_noise`); otherwise it is drawn with
        `generator`. The KL-VAE baseline ignores steps and noise: it decodes in one deterministic pass.
        """
        if self.is_kl:
            return self.decoder(z)
        if steps is None:
            steps = 1 if self.single_step else self.default_steps
        shape = self.image_shape(z)
        if noise is None:
            noise = self.decode_noise(z, generator)
        elif tuple(noise.shape) != shape:
            raise UserError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        return euler_sample(lambda x, t: self.velocity(x, t, z), noise, steps, power=self.t_pow_shift)

    # ------------------------------------------------------------------ training / reconstruction

    def forward(self, x: torch.Tensor, steps: int | None = None, noise: torch.Tensor | None = None,
                z: torch.Tensor | None = None, from_noise: bool = False, target: torch.Tensor | None = None,
                generator: torch.Generator | None = None):
        """Eval mode: reconstruct x. Train mode: one flow-matching step, returns a `TrainStep`.

        In training, `from_noise=True` forces t = 1 (the student of distillation starts from pure noise)
        and `target` replaces x as the clean end of the path (the teacher's sample x_T).
        """
        if not self.training:
            if z is None:
                z = self.encode(x).mode()
            return self.decode(z, steps=steps, noise=noise, generator=generator)

        b = x.shape[0]
        losses = {}
        if z is None:
            with torch.set_grad_enabled(self.encoder_train and torch.is_grad_enabled()):
                posterior = self.encode(x)
                z = posterior.sample(generator=generator)
            if self.encoder_train:
                losses["kl"] = posterior.kl().mean()
        grid = (x.shape[-2] // 8, x.shape[-1] // 8)
        if self.is_kl:  # plain reconstruction; LPIPS and the GAN term are added by the trainer on x0_pred
            x_rec = self.decoder(z)
            losses["l1"] = (x_rec.float() - x.float()).abs().mean()
            return TrainStep(x, x_rec, None, z, None, None, grid, losses)
        x0 = x if target is None else target
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if from_noise:
            t = torch.ones(b, device=x0.device, dtype=x0.dtype)
        else:
            t = sample_t(b, "logit_normal", self.t_mean, self.t_std, generator=generator, device=x0.device).to(x0.dtype)
        x_t = noisy_input(x0, t, noise)
        v, feats = self.decoder(x_t, t, z, return_features=True)
        losses["diffusion"] = flow_matching_loss(v, x0, noise)
        return TrainStep(x0, clean_estimate(x_t, t, v), t, z, noise, feats, grid, losses)

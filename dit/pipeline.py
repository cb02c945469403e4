"""Class-conditional image generation: a DiT on SSDD latents plus decoders of those latents, behind one small API.

    from dit.pipeline import load_generator
    gen = load_generator()                         # the embedded Fashion-MNIST bundle (dit/assets/fmnist/)
    ids = gen.resolve_classes(["sneaker", 9])      # names (case-insensitive) or ids -> [7, 9]
    images, timings = gen.generate(ids, num=4, seed=0)   # (8, 3, 32, 32) in [-1, 1]; {"dit_s": ..., "decoder_s": ...}
    # the same latents, decoded by every decoder the bundle offers (single-step SSDD, its teacher, the KL-VAE):
    by_decoder, timings = gen.compare(ids, num=4, seed=0)  # {name: images}; timings["decoders"][name]["decoder_s"]

The steps underneath, for callers that need them separately (sampling scripts, the app, benchmarks):
`draw_noise(n, seed)` -> CPU noise for the DiT and for the decoder (`draw_sample_noise(indices, seed)`: the same,
drawn per sample from (seed, i), for sampling runs whose images must not depend on batching);
`sample_latents(y, noise, ...)` -> latents (de-normalised, what a decoder takes); `decode(z, decoder_noise,
decoder=name)` -> images.

`load_generator(path)` takes a bundle directory (dit_ema.safetensors + decoder files + bundle.json, as
`python -m dit.export` writes it), or a DiT checkpoint written by `dit.train` (model_dit_ema.safetensors or its
checkpoints/last directory), whose metadata names the tokenizer checkpoint that provides the decoder.
It also takes the published ImageNet generators on SD-VAE latents (dit/official.py): `DiT-XL-2-256x256.pt`,
`DiT-XL-2-512x512.pt`, `SiT-XL-2-256x256.pt` (a known name, fetched to the cache, or a local file, optionally
prefixed `dit:` / `sit:`), each sampled with its own convention (`family`: "dit" = discrete DDPM/DDIM,
dit/diffusion.py; "sit" = SiT's interpolant SDE/ODE, dit/sit.py; this project's models: "flow", dit/flow.py).

Decoders are given as specs (`decoder=[...]`): a decoder name of the bundle ("KL-VAE", as bundle.json lists them),
a checkpoint file, a tokenizer run name `<run>[@best]` under `ckpt_dir`, `ssdd:<file or released name>` (an SSDD
decoder, including the released decoder-only SDVAE_*_256 files), `sdvae` or `sdvae:<file or name>` (the SD-VAE KL
decoder, either published layout; default sd-vae-ft-mse). Generators on SD-VAE latents default to `sdvae`.
`timings["decoder_label"]` (compare: `["decoders"][name]["label"]`) names a decoder with the steps it actually ran.

Progress: `progress(stage, done, total)` is called per DiT step ("dit") and per decoder batch (the decoder's name)
with counts that start at 0 before the work (dit/progress.py; `TqdmProgress` draws tqdm bars). True colours: a
generator of greyscale data (`image_channels` 1, from bundle.json or the DiT's training run) gives grey images.
All noise is drawn on the CPU from `seed`, so the same call gives the same images on any device (the per-step
noise of the stochastic samplers excepted, which is drawn on the device unless `step_noise` draws it per
sample).

This module loads generators and holds `Generator`, which samples through the family table (dit/samplers.py), times
and decodes; the modules beside it do the rest: class names (dit/class_names.py), the noise policy (dit/noise.py),
decoder files (dit/decoder_files.py).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dit.class_names import class_choices, class_display_names, imagenet_class_names, resolve_class_ids
from dit.decoder_files import (
    decoder_label,
    default_decoder_steps,
    load_decoder,
    load_decoder_spec,
    load_sdvae_decoder,
    named_decoders,
    resolve_decoder_spec,
    run_label,
)
from dit.models import DiT, build_dit
from dit.noise import draw_batch_noise, draw_per_sample_noise, per_sample_step_noise, sample_seed
from dit.official import FAMILY_DEFAULTS, is_official_spec, load_official
from dit.progress import DiTProgress, report_decoder, start_stage
from dit.samplers import ALL_METHODS, FAMILY_METHODS, run_sampler
from tokenizer.common.checkpoint import check_state_dict, read_weights, verify_file
from tokenizer.common.errors import UserError
from tokenizer.latent_stats import fixed_z_stats
from tokenizer.ssdd import SSDD

# What the modules beside it do, re-exported because callers import them from here.
__all__ = ["BUNDLE_DIR", "DIT_FILE", "DECODER_FILE", "INFO_FILE", "SAMPLE_DEFAULTS", "FAMILY_METHODS", "ALL_METHODS",
           "Generator", "load_generator", "load_official_generator", "load_dit", "verify_bundle_file",
           "bundle_decoders", "imagenet_class_names", "sample_seed", "decoder_label", "default_decoder_steps",
           "load_decoder", "load_decoder_spec", "load_sdvae_decoder", "named_decoders", "run_label", "pick_decoders",
           "image_channels", "GREYSCALE_DATASETS"]

BUNDLE_DIR = Path(__file__).resolve().parent / "assets" / "fmnist"
DIT_FILE, DECODER_FILE, INFO_FILE = "dit_ema.safetensors", "decoder.safetensors", "bundle.json"
GREYSCALE_DATASETS = ("fmnist",)  # built-in data sets of grey images (read as 3 equal channels)
SAMPLE_DEFAULTS = {"method": "euler", "steps": 50, "cfg_scale": 4.0, "guidance_interval": [0.0, 1.0],
                   "time_shift": 1.0, "decoder_steps": None}


def load_dit(path: str) -> tuple[DiT, dict]:
    """(eval-mode float32 DiT, metadata) from a safetensors file written by dit.train or dit.export."""
    state, meta = read_weights(path)
    if meta.get("kind") != "dit":
        raise UserError(f"{path} is not a DiT checkpoint of this project (no 'kind: dit' in its metadata)")
    try:
        model = build_dit(meta["model"], input_size=int(meta["input_size"]), in_channels=int(meta["in_channels"]),
                          num_classes=int(meta["num_classes"]), learn_sigma=bool(int(meta["learn_sigma"])),
                          class_dropout_prob=float(meta["class_dropout_prob"]), qk_norm=bool(int(meta["qk_norm"])))
    except KeyError as e:
        raise UserError(f"{path} lacks the architecture field {e} in its metadata") from None
    check_state_dict(model, state, path, meta["model"])
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval().requires_grad_(False), meta


@dataclass
class Generator:
    """A DiT, the decoders of its latents, and what relates them (z_stats, class names, sampler defaults).

    `decoders` maps a display name to a decoder (an `SSDD`, or the KL-VAE baseline behind the same API) and the
    step count it runs by default; the first entry is the default decoder (`decoder`). `family` says how the DiT
    samples (a key of `dit.samplers.SAMPLER_FAMILIES`): "flow" (this project's), "dit" (DiT's discrete diffusion) or
    "sit" (SiT's interpolant).
    """

    model: DiT
    decoders: dict  # name -> (SSDD, default steps)
    class_names: list
    z_mean: float
    z_std: float
    latent_shape: tuple
    defaults: dict = field(default_factory=lambda: dict(SAMPLE_DEFAULTS))
    source: str = ""
    name: str = "DiT"
    info: dict = field(default_factory=dict)
    family: str = "flow"
    image_channels: int = 3  # of the data the DiT learnt: 1 makes every decoded image grey (R = G = B)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def decoder_names(self) -> list:
        return list(self.decoders)

    @property
    def decoder(self) -> SSDD:
        """The default decoder (the bundle's first)."""
        return next(iter(self.decoders.values()))[0]

    @property
    def image_shape(self) -> tuple:
        f = self.decoder.patch_size
        return (3, self.latent_shape[1] * f, self.latent_shape[2] * f)

    def to(self, device) -> "Generator":
        self.model.to(device)
        for decoder, _ in self.decoders.values():
            decoder.to(device)
        return self

    def pick_decoder(self, name: str | None) -> tuple[str, SSDD, int]:
        """(name, decoder, default steps) of `name` (None: the default decoder); a UserError lists the choices."""
        if name is None:
            name = self.decoder_names[0]
        if name not in self.decoders:
            raise UserError(f"unknown decoder {name!r}; this generator offers: {', '.join(self.decoder_names)}")
        decoder, steps = self.decoders[name]
        return name, decoder, steps

    # ------------------------------------------------------------------ classes

    def display_names(self) -> list:
        return class_display_names(self.class_names, self.num_classes)

    def class_name(self, class_id: int) -> str:
        names = self.display_names()
        return names[class_id] if class_id < len(names) else str(class_id)

    def resolve_classes(self, specs) -> list[int]:
        """Ids (int or digit strings) or names (case-insensitive) -> class ids; a UserError lists the choices."""
        return resolve_class_ids(specs, self.class_names, self.num_classes)

    def _choices(self, limit: int = 10) -> str:
        return class_choices(self.class_names, self.num_classes, limit)

    # ------------------------------------------------------------------ sampling

    def sampler_settings(self, cfg_scale=None, steps=None, sampler=None) -> dict:
        """The DiT sampler settings of a call: None takes the generator's defaults; bad values are UserErrors."""
        d = self.defaults
        settings = {"cfg_scale": float(d["cfg_scale"] if cfg_scale is None else cfg_scale),
                    "steps": int(d["steps"] if steps is None else steps),
                    "sampler": d["method"] if sampler is None else sampler,
                    "guidance_interval": tuple(d["guidance_interval"]), "time_shift": float(d["time_shift"]),
                    "cfg_channels": d.get("cfg_channels")}
        methods = FAMILY_METHODS[self.family]
        if settings["sampler"] not in methods:
            raise UserError(f"unknown sampler {settings['sampler']!r} for {self.name} ({self.family} convention); "
                            f"valid: {', '.join(methods)}")
        return settings

    def draw_noise(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(DiT noise (n, C, h, w), decoder noise (n, 3, H, W)), drawn on the CPU from `seed` in that order."""
        return draw_batch_noise(n, seed, self.latent_shape, self.image_shape)

    def draw_sample_noise(self, indices, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample noise: sample i's (DiT noise (C, h, w), decoder noise (3, H, W)) come, in that order, from its
        own CPU generator seeded from (seed, i), so an image does not depend on which samples share its batch, the
        batch size or the number of processes. -> two stacked tensors (len(indices), ...)."""
        return draw_per_sample_noise(indices, seed, self.latent_shape, self.image_shape)

    def step_noise(self, indices, seed: int):
        """`step_noise` for `sample_latents`: sample i's per-step noise from its own CPU generator seeded from
        (seed, i, 1), moved to the device. Only stochastic samplers (flow `sde`, DiT `ddpm`, SiT `sde`) call it, so
        it can always be passed."""
        return per_sample_step_noise(indices, seed)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def sample_latents(self, y: torch.Tensor, noise: torch.Tensor, settings: dict, seed: int = 0,
                       batch_size: int = 256, progress=None, step_noise=None) -> tuple[torch.Tensor, float]:
        """(latents (n, C, h, w) on the device, de-normalised for the decoders, seconds) for labels y (n,).

        The sde sampler draws its per-step noise from a device generator seeded with `seed`, or from
        `step_noise(x)` when given (one batch only: see `Generator.step_noise`). progress: the "dit" stage of the
        callback of dit/progress.py, reported per sampler step."""
        if step_noise is not None and len(y) > batch_size:
            raise ValueError("step_noise draws for one batch: give at most batch_size samples")
        device = self.device
        sde_gen = torch.Generator(device).manual_seed(int(seed))
        latents = []
        self._sync()
        t0 = time.perf_counter()
        steps = DiTProgress(progress, self.family, settings["sampler"], settings["steps"],
                            math.ceil(len(y) / batch_size), device) if progress else None
        for i in range(0, len(y), batch_size):
            model_fn = steps.wrap(self.model) if steps else self.model
            z = self._sample_batch(noise[i:i + batch_size].to(device), y[i:i + batch_size].to(device), settings,
                                   sde_gen, step_noise, model_fn)
            latents.append(z * self.z_std + self.z_mean)
            if steps:
                steps.batch_done()
        self._sync()
        return torch.cat(latents), time.perf_counter() - t0

    def _sample_batch(self, noise: torch.Tensor, y: torch.Tensor, settings: dict, generator,
                      step_noise=None, model_fn=None) -> torch.Tensor:
        """Normalised latents of one batch, by the sampler of the model's family (docs/ARCHITECTURE.md §8).

        step_noise(x), when given, draws the stochastic samplers' per-step noise instead of `generator`; model_fn:
        the DiT as the sampler calls it (default the model; dit.progress wraps it to count steps)."""
        return run_sampler(self.family, model_fn or self.model, noise, y, settings, generator, step_noise,
                           quiet=model_fn is not None)  # a counted model: dit.progress reports, not the sampler

    @torch.no_grad()
    def decode(self, z: torch.Tensor, decoder_noise: torch.Tensor, decoder: str | None = None,
               steps: int | None = None, batch_size: int = 256, progress=None) -> tuple[torch.Tensor, dict]:
        """(images (n, 3, H, W) float32 CPU in [-1, 1], {"decoder", "label", "decoder_s", "decoder_steps", "finite"})
        of latents z; "finite" (n,) bool says which decoder outputs were free of NaN and inf before clamping; "label"
        names the decoder with the steps it ran (`run_label`). A generator of greyscale data (image_channels 1) gives
        grey images: the mean of the decoder's three channels in each (progress: dit/progress.py, per batch)."""
        name, model, default_steps = self.pick_decoder(decoder)
        steps = default_steps if steps is None else int(steps)
        if steps < 1:
            raise UserError(f"decoder steps must be >= 1, got {steps}")
        images, finite = [], []
        start_stage(progress, name, len(z), "img")
        self._sync()
        t0 = time.perf_counter()
        for i in range(0, len(z), batch_size):
            x = model.decode(z[i:i + batch_size], steps=steps, noise=decoder_noise[i:i + batch_size].to(self.device))
            finite.append(torch.isfinite(x.flatten(1)).all(1).cpu())
            x = x.float().clamp(-1, 1)
            if self.image_channels == 1:  # the data was grey: so are its samples (a decoder's 3 channels drift apart)
                x = x.mean(1, keepdim=True).expand_as(x).contiguous()
            images.append(x.cpu())
            report_decoder(progress, name, min(i + batch_size, len(z)), len(z), self.device)
        self._sync()
        ran = 1 if model.is_kl else steps
        return torch.cat(images), {"decoder": name, "label": run_label(name, model, ran),
                                   "decoder_s": time.perf_counter() - t0, "decoder_steps": ran,
                                   "finite": torch.cat(finite)}

    def _labels(self, class_ids, num: int) -> torch.Tensor:
        ids = self.resolve_classes(list(class_ids))
        if num < 1:
            raise UserError(f"the number of images per class must be >= 1, got {num}")
        return torch.tensor(ids, dtype=torch.long).repeat_interleave(num)

    @torch.no_grad()
    def generate(self, class_ids, num: int = 1, seed: int = 0, cfg_scale: float | None = None, steps: int | None = None,
                 sampler: str | None = None, decoder_steps: int | None = None, batch_size: int = 256,
                 progress=None, decoder: str | None = None) -> tuple[torch.Tensor, dict]:
        """`num` images per class id, class after class -> (images (len(ids)*num, 3, H, W) float32 CPU in [-1, 1],
        timings {"dit_s", "decoder_s", "decoder", "decoder_label", "decoder_steps", ...}). None arguments take the
        bundle's defaults. progress(stage, done, total): per DiT step, then per decoder batch (dit/progress.py)."""
        y = self._labels(class_ids, num)
        settings = self.sampler_settings(cfg_scale, steps, sampler)
        if decoder_steps is None:
            decoder_steps = self.defaults.get("decoder_steps")  # None: the decoder's own default (1 when distilled)
        noise, decoder_noise = self.draw_noise(len(y), seed)
        z, dit_s = self.sample_latents(y, noise, settings, seed, batch_size, progress)
        images, dec = self.decode(z, decoder_noise, decoder, decoder_steps, batch_size, progress)
        timings = {"dit_s": dit_s, "decoder_s": dec["decoder_s"], "images": len(y), "steps": settings["steps"],
                   "sampler": settings["sampler"], "cfg_scale": settings["cfg_scale"],
                   "decoder_steps": dec["decoder_steps"], "decoder": dec["decoder"], "decoder_label": dec["label"],
                   "device": str(self.device)}
        return images, timings

    @torch.no_grad()
    def compare(self, class_ids, num: int = 1, seed: int = 0, cfg_scale: float | None = None, steps: int | None = None,
                sampler: str | None = None, decoders=None, batch_size: int = 256,
                progress=None, decoder_steps: int | None = None) -> tuple[dict, dict]:
        """The same DiT latents (and decoder noise) decoded by several decoders (default: all of them) ->
        ({name: images}, {"dit_s", ..., "decoders": {name: {"decoder_s", "decoder_steps", "label"}}}).
        decoder_steps: the steps of every SSDD decoder (None: each decoder's default). progress: as `generate`'s,
        one stage per decoder."""
        y = self._labels(class_ids, num)
        settings = self.sampler_settings(cfg_scale, steps, sampler)
        noise, decoder_noise = self.draw_noise(len(y), seed)
        z, dit_s = self.sample_latents(y, noise, settings, seed, batch_size, progress)
        images, per_decoder = {}, {}
        for name in decoders or self.decoder_names:
            images[name], dec = self.decode(z, decoder_noise, name, decoder_steps, batch_size, progress)
            per_decoder[name] = {"decoder_s": dec["decoder_s"], "decoder_steps": dec["decoder_steps"],
                                 "label": dec["label"]}
        timings = {"dit_s": dit_s, "images": len(y), "steps": settings["steps"], "sampler": settings["sampler"],
                   "cfg_scale": settings["cfg_scale"], "device": str(self.device), "decoders": per_decoder}
        return images, timings


# ----------------------------------------------------------------------------- loading


def _json_field(meta: dict, key: str, default=None):
    try:
        return json.loads(meta[key]) if key in meta else default
    except ValueError:
        raise UserError(f"the metadata field {key!r} of the DiT checkpoint is not valid JSON") from None


def verify_bundle_file(path: Path, info: dict) -> None:
    """Check a bundle file against the size and sha256 that bundle.json records for it (in `files`, or in its
    `decoders` entry); a mismatch is a one-line UserError naming the file. Files it does not list pass."""
    record = dict(info.get("files", {}).get(path.name) or {})
    for entry in info.get("decoders") or []:
        if entry.get("file") == path.name:
            record.update({k: entry[k] for k in ("bytes", "sha256") if k in entry})
    if record:
        verify_file(str(path), record, str(path.parent / INFO_FILE))


def bundle_decoders(path: Path, info: dict) -> list:
    """[(name or None, file, steps or None)] of a bundle: bundle.json's `decoders` list, else decoder.safetensors."""
    entries = info.get("decoders") or [{"file": DECODER_FILE}]
    return [(e.get("name"), str(path / e["file"]), e.get("steps")) for e in entries]


def pick_decoders(specs, entries: list | None, ckpt_dir: str = "runs") -> list:
    """[(name or None, spec, steps or None)] for the decoders a user asked for: a bundle decoder's name (any case;
    `entries`: the bundle's decoders) picks it, anything else is read by `resolve_decoder_spec` (a file, a tokenizer
    run `<run>[@best]` under ckpt_dir, ssdd:<file or released name>, sdvae[:...])."""
    named = {n.lower(): (n, f, s) for n, f, s in entries or [] if n}
    return [named.get(str(spec).strip().lower())
            or (None, resolve_decoder_spec(spec, ckpt_dir, [n for n, _, _ in entries or [] if n]), None)
            for spec in specs]


def image_channels(info: dict, meta: dict, dit_path) -> int:
    """The channel count of the data the DiT learnt (1: greyscale), so that its samples have it: bundle.json's
    `image_channels`, else the DiT's metadata, else the latent cache its run trained on (`dit.cache` records it),
    else 1 for the built-in greyscale data sets (GREYSCALE_DATASETS), else 3."""
    for record in (info, meta):
        if record.get("image_channels") is not None:
            return int(record["image_channels"])
    cached = run_cache_channels(dit_path)
    if cached is not None:
        return cached
    return 1 if meta.get("dataset") in GREYSCALE_DATASETS else 3


def run_cache_channels(dit_path) -> int | None:
    """`image_channels` of the latent cache named in the data.json of the DiT run that `dit_path` (a file in its
    checkpoints/<step>/ folder) belongs to; None when there is no such run, cache or record."""
    for folder in list(Path(dit_path).resolve().parents)[:3]:
        try:
            cache = json.loads((folder / "data.json").read_text()).get("cache")
            return int(json.loads((Path(cache) / "cache.json").read_text())["image_channels"]) if cache else None
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
    return None


def load_generator(path: str | os.PathLike | None = None, device=None, decoder=None,
                   ckpt_dir: str = "runs") -> Generator:
    """A bundle directory (default: the embedded one), a DiT checkpoint file, or a run's checkpoints/last directory.

    `decoder` (one spec or a list) chooses the decoders, in that order: a decoder name of the bundle (as listed in
    bundle.json) or a spec `pick_decoders` reads (a file, a tokenizer run name under `ckpt_dir`, ssdd:<file or
    released name>, sdvae[:...]); by default a bundle's decoders (as listed in bundle.json, else
    decoder.safetensors) or the tokenizer named in the DiT's metadata.
    """
    if decoder is not None and isinstance(decoder, (str, os.PathLike)):
        decoder = [decoder]
    if path is not None and is_official_spec(path):
        return load_official_generator(path, device, decoder, ckpt_dir)
    if path is not None:
        from dit.hub import resolve_generator  # imported here: dit.hub builds on this module

        path = resolve_generator(path) or path  # a Hugging Face repository id -> its folder in the cache
    path = Path(path) if path is not None else BUNDLE_DIR
    info, entries, bundle = {}, None, False
    if path.is_dir():
        if (path / DIT_FILE).is_file():
            dit_path, bundle = path / DIT_FILE, True
            if (path / INFO_FILE).is_file():
                try:
                    info = json.loads((path / INFO_FILE).read_text())
                except ValueError as e:
                    raise UserError(f"cannot read {path / INFO_FILE}: {e}") from None
            entries = bundle_decoders(path, info)
        elif (path / "model_dit_ema.safetensors").is_file():
            dit_path = path / "model_dit_ema.safetensors"
        else:
            raise UserError(f"{path} holds neither a generator bundle ({DIT_FILE} + {DECODER_FILE}) nor a DiT "
                            f"training checkpoint (model_dit_ema.safetensors)")
    elif path.is_file():
        dit_path = path
    else:
        raise UserError(f"checkpoint not found: {path} (give a bundle directory such as {BUNDLE_DIR}, or a DiT "
                        f".safetensors file from dit.train)")
    if decoder is not None:
        entries = pick_decoders(decoder, entries, ckpt_dir)
    if bundle:  # the bundle's files in use, checked against bundle.json (a missing file gets its own message below)
        for file in [dit_path] + [Path(file) for _, file, _ in entries]:
            if file.is_file() and file.parent == path:
                verify_bundle_file(file, info)
    model, meta = load_dit(str(dit_path))
    tokenizer = meta.get("tokenizer_checkpoint")
    if entries is None:
        if not tokenizer:
            raise UserError(f"{dit_path} does not name its tokenizer; pass the SSDD decoder checkpoint explicitly")
        entries = [(None, tokenizer, None)]
    latent_shape = tuple(_json_field(meta, "latent_shape"))
    # a DiT trained on a cache of SD-VAE latents (dit.cache tokenizer.checkpoint=sd-vae-ft-mse) names sdvae:<source>
    sdvae_latents = str(tokenizer or "").startswith("sdvae:")
    decoders = named_decoders(entries, latent_shape[0], f"the DiT {dit_path}", sdvae_latents,
                              encoder_sha256=meta.get("encoder_sha256"))
    defaults = {**SAMPLE_DEFAULTS, **_json_field(meta, "sample", {}), **info.get("sample", {})}
    gen = Generator(model=model, decoders=decoders, class_names=_json_field(meta, "class_names", []),
                    z_mean=float(meta["z_mean"]), z_std=float(meta["z_std"]), latent_shape=latent_shape,
                    defaults=defaults, source=str(dit_path), name=meta["model"], info=info,
                    image_channels=image_channels(info, meta, dit_path))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return gen.to(device)


def load_official_generator(spec, device=None, decoder=None, ckpt_dir: str = "runs") -> Generator:
    """A published DiT / SiT ImageNet generator (dit/official.py) with SD-VAE-latent decoders (default: `sdvae`)."""
    model, info = load_official(spec)
    stats = fixed_z_stats("sdvae")  # the generator's latents are 0.18215 * z
    what = f"{info['model']} ({info['source']})"
    specs = pick_decoders(decoder or ["sdvae"], None, ckpt_dir)
    decoders = named_decoders(specs, info["latent_shape"][0], what, sdvae_latents=True)
    names = imagenet_class_names() if model.num_classes == 1000 else [str(i) for i in range(model.num_classes)]
    gen = Generator(model=model, decoders=decoders, class_names=names, z_mean=stats["z_mean"], z_std=stats["z_std"],
                    latent_shape=tuple(info["latent_shape"]), defaults=dict(FAMILY_DEFAULTS[info["family"]]),
                    source=info["source"], name=info["model"], info=info, family=info["family"])
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return gen.to(device)

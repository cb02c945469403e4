"""Class-conditional image generation: a DiT on SSDD latents plus the SSDD decoder, behind one small API.

    from dit.pipeline import load_generator
    gen = load_generator()                         # the embedded Fashion-MNIST bundle (dit/assets/fmnist/)
    ids = gen.resolve_classes(["sneaker", 9])      # names (case-insensitive) or ids -> [7, 9]
    images, timings = gen.generate(ids, num=4, seed=0)   # (8, 3, 32, 32) in [-1, 1]; {"dit_s": ..., "decoder_s": ...}

`load_generator(path)` takes a bundle directory (dit_ema.safetensors + decoder.safetensors + bundle.json, as
`python -m dit.export` writes it), or a DiT checkpoint written by `dit.train` (model_dit_ema.safetensors or its
checkpoints/last directory), whose metadata names the tokenizer checkpoint that provides the decoder.
All noise is drawn on the CPU from `seed`, so the same call gives the same images on any device (the `sde`
sampler's per-step noise excepted, which is drawn on the device).
"""

from __future__ import annotations

import difflib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dit.flow import METHODS, sample
from dit.models import DiT, build_dit
from tokenizer.checkpoint import check_state_dict, read_weights
from tokenizer.errors import UserError
from tokenizer.ssdd import SSDD

BUNDLE_DIR = Path(__file__).resolve().parent / "assets" / "fmnist"
DIT_FILE, DECODER_FILE, INFO_FILE = "dit_ema.safetensors", "decoder.safetensors", "bundle.json"
SAMPLE_DEFAULTS = {"method": "euler", "steps": 50, "cfg_scale": 4.0, "guidance_interval": [0.0, 1.0],
                   "time_shift": 1.0, "decoder_steps": None}


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names (torchvision's table; no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


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
    """A DiT, the SSDD decoder of its latents, and what relates them (z_stats, class names, sampler defaults)."""

    model: DiT
    decoder: SSDD
    class_names: list
    z_mean: float
    z_std: float
    latent_shape: tuple
    defaults: dict = field(default_factory=lambda: dict(SAMPLE_DEFAULTS))
    source: str = ""
    name: str = "DiT"
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "Generator":
        self.model.to(device)
        self.decoder.to(device)
        return self

    # ------------------------------------------------------------------ classes

    def _name_table(self) -> dict:
        """lower-case name -> id: the model's own class names, plus torchvision's ImageNet names for 1000 classes."""
        table = {}
        if self.num_classes == 1000:
            table.update({n.lower(): i for i, n in enumerate(imagenet_class_names())})
        table.update({str(n).lower(): i for i, n in enumerate(self.class_names)})
        return table

    def display_names(self) -> list:
        if self.num_classes == 1000 and all(n.startswith("n") and n[1:].isdigit() for n in self.class_names):
            return imagenet_class_names()  # folder names are WordNet ids; show words
        return [str(n) for n in self.class_names]

    def class_name(self, class_id: int) -> str:
        names = self.display_names()
        return names[class_id] if class_id < len(names) else str(class_id)

    def resolve_classes(self, specs) -> list[int]:
        """Ids (int or digit strings) or names (case-insensitive) -> class ids; a UserError lists the choices."""
        if isinstance(specs, (str, int)):
            specs = [specs]
        table, ids = None, []
        n = self.num_classes
        for spec in specs:
            text = str(spec).strip()
            if text.lstrip("-").isdigit():
                cid = int(text)
                if not 0 <= cid < n:
                    raise UserError(f"class {cid} is outside this model's classes 0..{n - 1} "
                                    f"({self._choices()})")
                ids.append(cid)
                continue
            table = table if table is not None else self._name_table()
            cid = table.get(text.lower())
            if cid is None:
                close = difflib.get_close_matches(text.lower(), list(table), n=3, cutoff=0.6)
                hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
                raise UserError(f"unknown class name {text!r}; {hint}valid names: {self._choices()}")
            ids.append(cid)
        if not ids:
            raise UserError(f"no class given; valid: {self._choices()}")
        return ids

    def _choices(self, limit: int = 10) -> str:
        names = self.display_names()
        shown = ", ".join(f"{i} {names[i]!r}" for i in range(min(limit, len(names))))
        more = f", ... ({len(names)} classes in all)" if len(names) > limit else f" ({len(names)} classes)"
        return f"ids 0..{self.num_classes - 1} or names: {shown}{more}"

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def generate(self, class_ids, num: int = 1, seed: int = 0, cfg_scale: float | None = None, steps: int | None = None,
                 sampler: str | None = None, decoder_steps: int | None = None, batch_size: int = 256,
                 progress=None) -> tuple[torch.Tensor, dict]:
        """`num` images per class id, class after class -> (images (len(ids)*num, 3, H, W) float32 CPU in [-1, 1],
        timings {"dit_s", "decoder_s", ...}). None arguments take the bundle's defaults."""
        ids = self.resolve_classes(list(class_ids))
        if num < 1:
            raise UserError(f"the number of images per class must be >= 1, got {num}")
        d = self.defaults
        cfg_scale = float(d["cfg_scale"] if cfg_scale is None else cfg_scale)
        steps = int(d["steps"] if steps is None else steps)
        sampler = d["method"] if sampler is None else sampler
        if sampler not in METHODS:
            raise UserError(f"unknown sampler {sampler!r}; valid: {', '.join(METHODS)}")
        if decoder_steps is None:
            decoder_steps = d.get("decoder_steps")  # None: the decoder's own default (1 when distilled)
        if decoder_steps is not None and int(decoder_steps) < 1:
            raise UserError(f"decoder steps must be >= 1, got {decoder_steps}")
        device = self.device
        y = torch.tensor(ids, dtype=torch.long).repeat_interleave(num)
        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn((len(y), *self.latent_shape), generator=g)
        f = self.decoder.patch_size
        dec_noise = torch.randn((len(y), 3, self.latent_shape[1] * f, self.latent_shape[2] * f), generator=g)
        sde_gen = torch.Generator(device).manual_seed(int(seed))

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        latents, images = [], []
        sync()
        t0 = time.perf_counter()
        for i in range(0, len(y), batch_size):
            z = sample(self.model, noise[i:i + batch_size].to(device), y[i:i + batch_size].to(device), steps=steps,
                       method=sampler, cfg_scale=cfg_scale, guidance_interval=tuple(d["guidance_interval"]),
                       time_shift=float(d["time_shift"]), generator=sde_gen)
            latents.append(z)
            if progress:
                progress("dit", min(i + batch_size, len(y)), len(y))
        sync()
        t1 = time.perf_counter()
        for i, z in zip(range(0, len(y), batch_size), latents):
            x = self.decoder.decode(z * self.z_std + self.z_mean, steps=decoder_steps,
                                    noise=dec_noise[i:i + batch_size].to(device))
            images.append(x.float().clamp(-1, 1).cpu())
            if progress:
                progress("decoder", min(i + batch_size, len(y)), len(y))
        sync()
        t2 = time.perf_counter()
        used_dec_steps = decoder_steps or (1 if self.decoder.single_step else self.decoder.default_steps)
        timings = {"dit_s": t1 - t0, "decoder_s": t2 - t1, "images": len(y), "steps": steps, "sampler": sampler,
                   "cfg_scale": cfg_scale, "decoder_steps": int(used_dec_steps), "device": str(device)}
        return torch.cat(images), timings


# ----------------------------------------------------------------------------- loading


def _json_field(meta: dict, key: str, default=None):
    try:
        return json.loads(meta[key]) if key in meta else default
    except ValueError:
        raise UserError(f"the metadata field {key!r} of the DiT checkpoint is not valid JSON") from None


def load_generator(path: str | os.PathLike | None = None, device=None, decoder: str | None = None) -> Generator:
    """A bundle directory (default: the embedded one), a DiT checkpoint file, or a run's checkpoints/last directory.

    `decoder` overrides the SSDD checkpoint (file) that decodes the latents; by default a bundle's decoder.safetensors
    or the tokenizer checkpoint named in the DiT's metadata.
    """
    path = Path(path) if path is not None else BUNDLE_DIR
    info = {}
    if path.is_dir():
        if (path / DIT_FILE).is_file():
            dit_path = path / DIT_FILE
            if (path / INFO_FILE).is_file():
                try:
                    info = json.loads((path / INFO_FILE).read_text())
                except ValueError as e:
                    raise UserError(f"cannot read {path / INFO_FILE}: {e}") from None
            if decoder is None:
                decoder = str(path / DECODER_FILE)
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
    model, meta = load_dit(str(dit_path))
    if decoder is None:
        decoder = meta.get("tokenizer_checkpoint")
        if not decoder:
            raise UserError(f"{dit_path} does not name its tokenizer; pass the SSDD decoder checkpoint explicitly")
    if not os.path.isfile(decoder):
        raise UserError(f"decoder checkpoint not found: {decoder}")
    dec = SSDD.from_checkpoint(str(decoder)).eval().requires_grad_(False)
    latent_shape = tuple(_json_field(meta, "latent_shape"))
    if dec.encoder.z_channels != latent_shape[0]:
        raise UserError(f"the decoder {decoder} takes {dec.encoder.z_channels}-channel latents but the DiT "
                        f"{dit_path} makes {latent_shape[0]}-channel ones")
    defaults = {**SAMPLE_DEFAULTS, **_json_field(meta, "sample", {}), **info.get("sample", {})}
    gen = Generator(model=model, decoder=dec, class_names=_json_field(meta, "class_names", []),
                    z_mean=float(meta["z_mean"]), z_std=float(meta["z_std"]), latent_shape=latent_shape,
                    defaults=defaults, source=str(dit_path), name=meta["model"], info=info)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return gen.to(device)

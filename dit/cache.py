"""Latent cache: encode a dataset once with an SSDD encoder, so DiT training never runs the encoder.

    python -m dit.cache config=configs/dit_fmnist.yaml [key=value ...]        # one process
    accelerate launch -m dit.cache config=configs/dit.yaml [key=value ...]    # sharded over every process / GPU

For every image x of `dataset.split` it stores z = (E(x).mode() - z_mean) / z_std and, with cache.flip, the same for
the horizontally flipped image (a second entry; DiT trains with flips). z_mean / z_std are the encoder's scalar
statistics from the z_stats.json that `python -m tokenizer.train task=z_stats` writes for the checkpoint.

A cache is a directory (docs/ARCHITECTURE.md §9):
    shard_00000.safetensors ...   images [k * shard_size, (k + 1) * shard_size) of the split: latents (n, C, h, w),
                                  latents_flip (n, C, h, w) when flipped, labels (n,) int64; in cache.dtype
    cache.json                    what made it: encoder checkpoint + sha256 of its encoder weights, resolution,
                                  z_stats, latent shape, class names, counts, shard list, the identity of its
                                  data ("data": root, split, classes, file count, fingerprint; tokenizer.data_check)
                                  and its channel count ("image_channels": 1 when every image is grey, so that
                                  generators of it make grey images)

The tokenizer is this project's (a file, a run name, a released name) or SD-VAE: `tokenizer.checkpoint=sd-vae-ft-mse`
(or sd-vae-ft-ema, `sdvae:<file>`, or an SD-VAE file in the diffusers or the original LDM layout) caches SD-VAE
latents of any image folder with SD-VAE's fixed scaling (z_mean 0, z_std 1 / 0.18215, no z_stats.json), as DiT and
fast-DiT train on them; the DiT then names `sdvae:<file or name>` as its tokenizer and samples decode with SD-VAE.

Each data set gets its own cache: the default folder is <ckpt_dir>/latents/<kind>-<split>-<px>px-<data
fingerprint[:8]>-<encoder hash[:12]>, and a build never replaces a cache made from other data.

Building. Shard k covers a fixed range of images and is encoded in batches that start at its first image, so its
bytes do not depend on how many processes share the work; the missing shards are dealt round robin to the
processes. The build lives in `<dir>.partial/` beside `build.json` (what is being built); each shard file appears
there atomically and is itself the record that the shard is done, so a killed build, re-run with the same command
(and any number of processes), encodes only the missing shards. The main process then writes cache.json and renames
the directory into place: a cache directory is always complete, and an older cache stays until the new one is.

Reading (`LatentCache`). Nothing is loaded up front: each item is one positional read of its row at the tensor's
offset in the safetensors file (no memory map, whose touched pages would count as the process's resident memory),
so a process holds only the labels (8 bytes per image) whatever the cache's size. Training refuses a cache made
from other data than the config's, or by another encoder, or at another resolution (`LatentCache.open`); dit.train
also checks its z_stats.
"""

import bisect
import json
import math
import os
import shutil
import struct
import sys
import time

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from dit.config_checks import CACHE_DTYPES, DIT_CHECKS
from dit.decoder_files import load_sdvae_decoder, sdvae_source
from tokenizer.common.atomic import atomic_file, atomic_json, remove_stale_temporaries, swap_in
from tokenizer.common.config import load_config
from tokenizer.common.errors import UserError, one_line, run_cli
from tokenizer.common.runs import find_result, resolve_checkpoint
from tokenizer.common.training import make_accelerator
from tokenizer.common.validation import check_config
from tokenizer.data import build_dataset
from tokenizer.data_check import banner, short
from tokenizer.latent_stats import FILE_NAME as Z_STATS_FILE
from tokenizer.latent_stats import FIXED_Z_STATS
from tokenizer.latent_stats import read_z_stats as read_z_stats_file
from tokenizer.ssdd import SSDD

FORMAT = 3  # 3: cache.json records its data; 2: shard k holds exactly images [k * shard_size, ...); all read alike
DTYPES = {name: getattr(torch, name) for name in CACHE_DTYPES}
BUILD_FILE = "build.json"


# ----------------------------------------------------------------------------- the tokenizer a config names


def read_z_stats(cfg, checkpoint: str) -> dict:
    """The z_stats.json named by tokenizer.z_stats, or the checkpoint's (tokenizer.common.runs.find_result: in its run's
    results/step<N>/, or beside it); for SD-VAE (`sdvae:<source>`, as `load_tokenizer` names it) its fixed scaling,
    z_mean 0 and z_std 1 / 0.18215, as DiT and fast-DiT scale SD-VAE latents."""
    if str(checkpoint).startswith("sdvae:") and not cfg.tokenizer.z_stats:
        stats = FIXED_Z_STATS["sdvae"]
        return {"z_mean": stats["z_mean"], "z_std": stats["z_std"], "path": stats["source"]}
    path = cfg.tokenizer.z_stats or find_result(checkpoint, Z_STATS_FILE)
    return read_z_stats_file(path, f"write them with: python -m tokenizer.train task=z_stats config=<the tokenizer's "
                                   f"config> ssdd.checkpoint={checkpoint} (or set tokenizer.z_stats=)")


def load_tokenizer(cfg) -> tuple[SSDD, str]:
    """(eval-mode SSDD, resolved checkpoint path) for tokenizer.checkpoint.

    SD-VAE (`sdvae`, `sdvae:<file or name>`, a known name such as sd-vae-ft-mse, or a file in either published
    layout) gives SD-VAE's encoder and KL decoder, named `sdvae:<file or name>`: the DiT trained on its latents
    records that name, and dit.pipeline decodes its samples with SD-VAE."""
    if not cfg.tokenizer.checkpoint:
        raise UserError("set tokenizer.checkpoint=<SSDD file or tokenizer run_name, or sd-vae-ft-mse>: its encoder "
                        "makes the latents")
    source = sdvae_source(str(cfg.tokenizer.checkpoint), cfg.ckpt_dir)
    if source is not None:  # known names are fetched (or, offline, one line says where to place the file)
        return load_sdvae_decoder(source), f"sdvae:{source}"
    path = resolve_checkpoint(cfg.ckpt_dir, cfg.tokenizer.checkpoint)
    model = SSDD.from_checkpoint(path).eval().requires_grad_(False)
    if not model.has_encoder:
        raise UserError(f"{path} is a decoder-only file; the latent cache needs the whole tokenizer (encoder too)")
    return model, path


def default_dir(cfg, data: dict, enc_hash: str) -> str:
    """<ckpt_dir>/latents/<kind>-<split>-<px>px-<data fingerprint[:8]>-<encoder hash[:12]>: one per data and encoder."""
    name = f"{data['kind']}-{data['split']}-{cfg.dataset.im_size}px-{data['fingerprint'][:8]}-{enc_hash[:12]}"
    return os.path.join(cfg.ckpt_dir, "latents", name)


def cache_dir(cfg, data: dict, enc_hash: str) -> str:
    return cfg.cache.dir or default_dir(cfg, data, enc_hash)


def read_meta(directory: str) -> dict | None:
    """The cache.json of `directory`, or None when there is none (or it cannot be read)."""
    try:
        with open(os.path.join(directory, "cache.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def other_caches(cfg, enc_hash: str, data: dict) -> list:
    """(directory, data identity) of the caches in <ckpt_dir>/latents of this encoder, split and resolution but of
    other data, newest first: what a user who points at another data set may have meant."""
    root = os.path.join(cfg.ckpt_dir, "latents")
    found = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else ():
        meta = read_meta(os.path.join(root, name))
        if meta and isinstance(meta.get("data"), dict) and meta.get("encoder_sha256") == enc_hash \
                and meta.get("im_size") == cfg.dataset.im_size and meta["data"].get("split") == data["split"] \
                and meta["data"].get("fingerprint") != data["fingerprint"]:
            found.append((os.path.join(root, name), meta["data"], meta.get("created", "")))
    return [(d, m) for d, m, _ in sorted(found, key=lambda f: f[2], reverse=True)]


def cache_command() -> str:
    return "python -m dit.cache " + (" ".join(a for a in sys.argv[1:] if "=" in a) or "<the same config>")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


# ----------------------------------------------------------------------------- reading


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
                       "I32": torch.int32}


class ShardReader:
    """Rows of the tensors in one safetensors file, each read on demand with one positional read.

    A safetensors file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets: [begin, end]}} and the tensors' bytes (offsets relative to the end of the header). The file is
    opened once per process (DataLoader workers reopen it after the fork).
    """

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ValueError("header longer than the file")
                header = json.loads(f.read(n))
            self.base = 8 + n
            self.tensors, self.metadata = {}, dict(header.get("__metadata__") or {})
            for name, t in header.items():
                if name == "__metadata__":
                    continue
                dtype = _SAFETENSORS_DTYPES[t["dtype"]]
                begin, end = t["data_offsets"]
                if end - begin != math.prod(t["shape"]) * dtype.itemsize or self.base + end > size:
                    raise ValueError(f"tensor {name} does not fit the file (truncated?)")
                self.tensors[name] = (dtype, tuple(t["shape"]), begin)
        except (OSError, ValueError, KeyError, struct.error) as e:  # missing, truncated, not safetensors
            raise UserError(f"cannot read latent shard {path}: {one_line(e)}") from None
        self._fd, self._pid = None, None

    def __len__(self) -> int:
        return self.tensors["labels"][1][0]

    def shape(self, name: str) -> tuple:
        return self.tensors[name][1]

    def _read(self, nbytes: int, offset: int) -> bytearray:
        if self._pid != os.getpid():  # first use in this process (or a forked worker): its own descriptor
            self._fd, self._pid = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0)), os.getpid()
        if hasattr(os, "pread"):
            data = os.pread(self._fd, nbytes, offset)
        else:  # no pread (Windows): seek + read on this process's own descriptor
            os.lseek(self._fd, offset, os.SEEK_SET)
            data = os.read(self._fd, nbytes)
        if len(data) != nbytes:
            raise UserError(f"latent shard {self.path} is truncated (read {len(data)} of {nbytes} bytes)")
        return bytearray(data)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """tensor[start:stop], read from the file."""
        dtype, shape, begin = self.tensors[name]
        row = math.prod(shape[1:]) * dtype.itemsize
        data = self._read((stop - start) * row, self.base + begin + start * row)
        return torch.frombuffer(data, dtype=dtype).view(stop - start, *shape[1:])

    def read(self, name: str) -> torch.Tensor:
        return self.rows(name, 0, self.shape(name)[0])

    def __getstate__(self):  # a descriptor number means nothing in another process
        return {**self.__dict__, "_fd": None, "_pid": None}


class LatentCache(Dataset):
    """The cached latents as a dataset of (z (C, h, w) float32, normalised, label int), read from disk per item.

    Entry j is image j // 2, flipped when j is odd (with flips); otherwise entry j is image j.
    """

    def __init__(self, directory: str):
        self.dir = directory
        meta_path = os.path.join(directory, "cache.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"no latent cache in {directory} (no cache.json); build it with python -m dit.cache "
                            f"with the same config")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.shards = [ShardReader(os.path.join(directory, s["file"])) for s in self.meta["shards"]]
        shape = tuple(self.meta["latent_shape"])
        for reader, entry in zip(self.shards, self.meta["shards"]):
            names = ["latents", "labels"] + (["latents_flip"] if self.meta["flip"] else [])
            if any(n not in reader.tensors for n in names) or any(reader.shape(n)[0] != entry["count"] for n in names) \
                    or any(reader.shape(n)[1:] != shape for n in names if n != "labels"):
                raise UserError(f"latent shard {reader.path} does not hold {entry['count']} latents {shape} with "
                                f"labels as cache.json says; rebuild the cache with python -m dit.cache")
        self.starts = [0]  # image index of each shard's first row
        for entry in self.meta["shards"]:
            self.starts.append(self.starts[-1] + entry["count"])
        if self.starts[-1] != self.meta["images"]:
            raise UserError(f"latent cache {directory} is inconsistent: its shards hold {self.starts[-1]} images, "
                            f"cache.json says {self.meta['images']}")
        self.labels = (torch.cat([r.read("labels") for r in self.shards]) if self.shards
                       else torch.zeros(0, dtype=torch.int64))
        self.flip = bool(self.meta["flip"])
        self.epoch = 0

    @classmethod
    def open(cls, cfg, enc_hash: str, ckpt: str, data: dict) -> "LatentCache":
        """The cache of this config's data (`data`: its identity, tokenizer.data.identify), refused in one line if
        other data, another encoder or another resolution made it."""
        directory = cache_dir(cfg, data, enc_hash)
        if not os.path.isfile(os.path.join(directory, "cache.json")):
            others = other_caches(cfg, enc_hash, data)
            there = f"; {others[0][0]} holds the latents of other data, {short(others[0][1])}" if others else ""
            raise UserError(f"no latent cache of {short(data)} in {directory}{there}; build it first: "
                            f"{cache_command()}")
        cache = cls(directory)
        m = cache.meta
        if not isinstance(m.get("data"), dict):
            raise UserError(f"latent cache {directory} does not record which data made it (an older version wrote "
                            f"it); rebuild it: {cache_command()}")
        if m["data"].get("fingerprint") != data["fingerprint"]:
            raise UserError(f"latent cache {directory} was made from {short(m['data'])}, not from {short(data)} "
                            f"that this config reads; build a cache of this data with {cache_command()} (without "
                            f"cache.dir=, each data set gets its own folder)")
        if m["encoder_sha256"] != enc_hash:
            raise UserError(f"latent cache {directory} was made by another encoder ({m['encoder_checkpoint']}, "
                            f"sha256 {m['encoder_sha256'][:12]}) than tokenizer.checkpoint={ckpt} (sha256 "
                            f"{enc_hash[:12]}); rebuild it with python -m dit.cache or point cache.dir elsewhere")
        if m["im_size"] != cfg.dataset.im_size:
            raise UserError(f"latent cache {directory} holds {m['im_size']}-px images but dataset.im_size="
                            f"{cfg.dataset.im_size}; rebuild it with python -m dit.cache or set dataset.im_size="
                            f"{m['im_size']}")
        return cache

    @property
    def class_names(self) -> list:
        return self.meta["class_names"] or [str(i) for i in range(self.meta["num_classes"])]

    def set_epoch(self, epoch: int) -> None:  # the DataLoader helpers call it; latents carry no randomness
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.starts[-1] * (2 if self.flip else 1)

    def __getitem__(self, item):
        j = int(item[0] if isinstance(item, (tuple, list)) else item)
        if not 0 <= j < len(self):
            raise IndexError(f"latent cache entry {j} out of range 0..{len(self) - 1}")
        i, flipped = divmod(j, 2) if self.flip else (j, 0)
        s = bisect.bisect_right(self.starts, i) - 1
        row = i - self.starts[s]
        z = self.shards[s].rows("latents_flip" if flipped else "latents", row, row + 1)[0]
        return z.float(), int(self.labels[i])


# ----------------------------------------------------------------------------- building


def encode_normalised(model: SSDD, x: torch.Tensor, stats: dict, dtype: torch.dtype) -> torch.Tensor:
    """(z - z_mean) / z_std of the `.mode()` latents, computed in float64, stored as `dtype` on the CPU."""
    return ((model.encode(x).mode().double() - stats["z_mean"]) / stats["z_std"]).to(dtype).cpu()


def write_shard(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """Write one shard atomically (`atomic_file`: temporary file, fsync, rename): a shard file that exists is
    complete."""
    atomic_file(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata))


def encode_shard(model, dataset, start: int, stop: int, cfg, stats: dict, device, bar) -> tuple[dict, dict]:
    """(the tensors, the metadata) of the shard holding images [start, stop): batches of cache.batch_size from
    `start` on. The metadata says whether every image was grey (`image_channels` "1": R = G = B exactly, as
    greyscale files read as RGB are), so that a generator of this data can make grey images (dit.pipeline)."""
    loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=cfg.cache.batch_size,
                        num_workers=cfg.dataset.num_workers, pin_memory=device.type == "cuda")
    dtype, n = DTYPES[cfg.cache.dtype], stop - start
    names = ["latents", "latents_flip"] if cfg.cache.flip else ["latents"]
    out, i, grey = {"labels": torch.empty(n, dtype=torch.int64)}, 0, True
    for x, y in loader:
        grey = grey and bool((x[:, 0] == x[:, 1]).all() and (x[:, 1] == x[:, 2]).all())
        x = x.to(device, non_blocking=True)
        for name in names:
            z = encode_normalised(model, x.flip(-1) if name == "latents_flip" else x, stats, dtype)
            if name not in out:  # filled in place: a shard is held once, not as batches plus their concatenation
                out[name] = torch.empty(n, *z.shape[1:], dtype=dtype)
            out[name][i:i + len(z)] = z
        out["labels"][i:i + len(x)] = torch.as_tensor(y, dtype=torch.int64)
        i += len(x)
        bar.update(len(x))
    return out, {"image_channels": "1" if grey else "3"}


def build_plan(cfg, ckpt: str, enc_hash: str, stats: dict, images: int, data: dict) -> dict:
    """Everything that decides a shard's bytes: a partial build made under another plan is started afresh."""
    d = cfg.dataset
    return {"format": FORMAT, "encoder_checkpoint": ckpt, "encoder_sha256": enc_hash, "im_size": int(d.im_size),
            "dataset": {"name": d.name, "root": d.root, "split": d.split, "limit": d.limit},
            "data_fingerprint": data["fingerprint"], "skipped": [u["file"] for u in data["unreadable"]],
            "images": images,
            "shard_size": int(cfg.cache.shard_size), "batch_size": int(cfg.cache.batch_size),
            "dtype": cfg.cache.dtype, "flip": bool(cfg.cache.flip), "z_mean": stats["z_mean"], "z_std": stats["z_std"]}


def prepare_partial(partial: str, plan: dict) -> None:
    """Create `<dir>.partial` for this plan, or keep it (resume) when it was made for the same plan."""
    plan_path = os.path.join(partial, BUILD_FILE)
    if os.path.isdir(partial):
        try:
            with open(plan_path) as f:
                same = json.load(f) == plan
        except (OSError, ValueError):
            same = False
        if not same:
            print(f"{partial} holds a build with other settings: starting afresh")
            shutil.rmtree(partial)
    os.makedirs(partial, exist_ok=True)
    remove_stale_temporaries(partial)  # shard files a killed writer left half-written
    if not os.path.isfile(plan_path):
        atomic_json(plan_path, plan)


def finished_shards(partial: str, counts: list) -> set:
    """Indices of the shards already written in `partial` with the expected number of images."""
    done = set()
    for k, count in enumerate(counts):
        path = os.path.join(partial, shard_name(k))
        if os.path.isfile(path):
            try:
                if len(ShardReader(path)) == count:
                    done.add(k)
            except (UserError, KeyError):
                pass
    return done


def cache_metadata(cfg, model: SSDD, ckpt: str, enc_hash: str, stats: dict, class_names: list, partial: str,
                   counts: list, seconds: float, data: dict | None) -> dict:
    readers = [ShardReader(os.path.join(partial, shard_name(k))) for k in range(len(counts))]
    labels = torch.cat([r.read("labels") for r in readers])
    per_class = torch.bincount(labels).tolist()
    images = len(labels)
    channels = {r.metadata.get("image_channels") for r in readers}  # "1": every image grey; None: not recorded
    return {
        "format": FORMAT,
        "encoder_checkpoint": ckpt,
        "encoder_sha256": enc_hash,
        "encoder": model.architecture(),
        "im_size": int(cfg.dataset.im_size),
        "dataset": {"name": cfg.dataset.name, "root": cfg.dataset.root, "split": cfg.dataset.split,
                    "limit": cfg.dataset.limit},
        "data": data,  # which images made it (tokenizer.data_check.data_identity): dit.train compares it
        "z_mean": stats["z_mean"],
        "z_std": stats["z_std"],
        "z_stats_file": stats["path"],
        "normalisation": "z_cached = (encode(x).mode() - z_mean) / z_std",
        "latent_shape": list(readers[0].shape("latents")[1:]),
        "image_channels": None if None in channels else 1 if channels == {"1"} else 3,
        "dtype": cfg.cache.dtype,
        "flip": bool(cfg.cache.flip),
        "class_names": class_names,
        "num_classes": len(class_names) or len(per_class),
        "images": images,
        "entries": images * (2 if cfg.cache.flip else 1),
        "per_class": {str(c): n for c, n in enumerate(per_class) if n},
        "shard_size": int(cfg.cache.shard_size),
        "shards": [{"file": shard_name(k), "count": n} for k, n in enumerate(counts)],
        "seconds": round(seconds, 1),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


@torch.no_grad()
def build_cache(cfg) -> str:
    """Encode dataset.split (plus flips) over all processes and write the cache; returns its directory."""
    if cfg.cache.dtype not in DTYPES:
        raise UserError(f"unknown cache.dtype '{cfg.cache.dtype}' (choose {', '.join(DTYPES)})")
    if cfg.cache.shard_size < 1 or cfg.cache.batch_size < 1:
        raise UserError("cache.shard_size and cache.batch_size must be positive")
    accelerator = make_accelerator("no")
    rank, world, device, main = (accelerator.process_index, accelerator.num_processes, accelerator.device,
                                 accelerator.is_main_process)
    model, ckpt = load_tokenizer(cfg)
    stats = read_z_stats(cfg, ckpt)
    enc_hash = model.encoder_sha256()
    dataset = build_dataset(cfg.dataset, cfg.dataset.split, train=False)  # listed and checked before any work
    data = dataset.identity
    if main:
        print(banner(data))
    out = cache_dir(cfg, data, enc_hash)
    partial = out + ".partial"
    old = read_meta(out)
    if old and isinstance(old.get("data"), dict) and old["data"].get("fingerprint") != data["fingerprint"]:
        raise UserError(f"{out} holds the latent cache of other data, {short(old['data'])}; building the latents "
                        f"of {short(data)} there would replace it: leave cache.dir unset (each data set gets its own "
                        f"folder) or choose another cache.dir")
    model.to(device)
    images = len(dataset)
    if images == 0:
        raise UserError(f"dataset {cfg.dataset.name}/{cfg.dataset.split} is empty: nothing to cache")
    size = cfg.cache.shard_size
    counts = [min(size, images - k * size) for k in range(math.ceil(images / size))]

    t0 = time.time()
    if main:
        os.makedirs(os.path.dirname(os.path.abspath(partial)), exist_ok=True)
        prepare_partial(partial, build_plan(cfg, ckpt, enc_hash, stats, images, data))
    accelerator.wait_for_everyone()
    done = finished_shards(partial, counts)
    accelerator.wait_for_everyone()  # every process listed the same shards before any writes a new one
    todo = [k for k in range(len(counts)) if k not in done]
    if main:
        print(f"encoding {images} images of {cfg.dataset.name}/{cfg.dataset.split} at {cfg.dataset.im_size} px"
              f"{' (+ flips)' if cfg.cache.flip else ''} with {ckpt} on {world} process(es) -> {out}: "
              f"{len(counts)} shards of up to {size} images"
              + (f", {len(done)} already done in {partial} (resuming)" if done else ""))
    mine = todo[rank::world]
    with tqdm(total=sum(counts[k] for k in mine), desc=f"cache (process {rank}/{world})", unit="img",
              dynamic_ncols=True) as bar:
        for k in mine:
            start = k * size
            write_shard(os.path.join(partial, shard_name(k)),
                        *encode_shard(model, dataset, start, start + counts[k], cfg, stats, device, bar))
    accelerator.wait_for_everyone()
    if main:
        class_names = [str(c) for c in getattr(dataset, "classes", [])]
        meta = cache_metadata(cfg, model, ckpt, enc_hash, stats, class_names, partial, counts, time.time() - t0,
                              data)
        atomic_json(os.path.join(partial, "cache.json"), meta)
        swap_in(partial, out)  # the old cache (if any) stays until this rename
        os.remove(os.path.join(out, BUILD_FILE))  # only now: a kill before the swap resumes with every shard done
        print(f"cached {meta['entries']} latents {tuple(meta['latent_shape'])} of {images} images in "
              f"{meta['seconds']} s: {out}")
    accelerator.wait_for_everyone()
    return out


def run(argv: list[str]) -> str:
    cfg = check_config(load_config("dit.yaml", argv), DIT_CHECKS)
    return build_cache(cfg)


def main(argv=None) -> int:
    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())

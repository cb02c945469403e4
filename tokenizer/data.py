"""Datasets: Fashion-MNIST (offline, 32 px) and ImageNet-style image folders (docs/ARCHITECTURE.md §7).

* `load_fashion_mnist` reads the gzipped IDX files installed by the Debian package
  `dataset-fashion-mnist` (or `$FASHION_MNIST_ROOT`) and falls back to the small committed subset
  `tokenizer/assets/fmnist_subset.npz` when they are absent.
* `FashionMNIST` yields 28x28 images zero-padded to 32x32 (background -1) as 3-channel float32 in [-1, 1].
* `ImageFolderDataset` reads `root/{train,val}/<class>/<image>` with the SSDD augmentation: train = random
  shorter-side resize in [S, aug_scale*S) (Lanczos) or plain resize to S (bilinear), random S crop and random
  horizontal flip; eval = shorter-side resize to S (bilinear) + centre crop.
* `build_dataset` reads a config's `dataset:` section. A `dataset.root` that holds an image folder is read as one
  whatever `dataset.name` says; Fashion-MNIST's bundled subset is used only when no root is given. Every dataset
  carries `identity`, the record of its data (tokenizer.data_check: listing, fingerprint, subsets, checks), and an
  image folder is checked before any work: empty class folders refused, every file's header read.
* Per-item randomness comes from an RNG seeded with (seed, epoch, index), so it does not depend on which
  worker loads which item. Call `dataset.set_epoch(e)` before each epoch, or let
  `tokenizer.common.training.EpochSampler(with_epoch=True)` hand `(index, epoch)` pairs to the dataset (robust
  with `persistent_workers=True`).
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from tokenizer.common.errors import UserError, one_line
from tokenizer.data_check import (
    FOLDER_LAYOUT,
    SUBSETS,
    check_images,
    data_identity,
    fingerprint,
    is_main_process,
    list_image_folder,
    looks_like_image_folder,
    open_rgb,
    select,
)

log = logging.getLogger(__name__)

FMNIST_CLASSES: tuple[str, ...] = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

FMNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FMNIST_SUBSET_PATH = Path(__file__).resolve().parent / "assets" / "fmnist_subset.npz"
FMNIST_IM_SIZE = 32  # 28 px + 2 px of padding on each side

_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dims
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dim

_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_cache_lock = threading.Lock()
_subset_warned = False


# --------------------------------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------------------------------


def _read_gz(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise UserError(f"cannot read Fashion-MNIST file {path}: corrupt or truncated gzip ({one_line(e)})") from None


def _parse_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    data = _read_gz(path)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"Fashion-MNIST file {path} is truncated: {len(data)} bytes, shorter than its IDX header")
    got_magic, *dims = struct.unpack(f">{1 + ndim}I", data[:header])
    if got_magic != magic:
        raise UserError(f"Fashion-MNIST file {path} is not an IDX file of the expected kind: "
                        f"magic number {got_magic}, expected {magic}")
    expected = header + math.prod(dims)
    if len(data) != expected:
        raise UserError(f"Fashion-MNIST file {path} has {len(data)} bytes after decompression, expected {expected} "
                        f"for shape {tuple(dims)} (truncated or corrupt)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _fmnist_split(split: str) -> str:
    if split == "val":
        split = "test"
    if split not in _FMNIST_FILES:
        raise UserError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test' ('val' means 'test')")
    return split


def _read_package_files(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    img_path, lbl_path = (root / name for name in _FMNIST_FILES[split])
    images = _parse_idx(img_path, _IDX_IMAGES_MAGIC, 3)
    labels = _parse_idx(lbl_path, _IDX_LABELS_MAGIC, 1)
    if images.shape[1:] != (28, 28):
        raise UserError(f"Fashion-MNIST file {img_path} holds {images.shape[1]}x{images.shape[2]} images, "
                        "expected 28x28")
    if len(images) != len(labels):
        raise UserError(f"Fashion-MNIST files disagree: {img_path} has {len(images)} images but {lbl_path} has "
                        f"{len(labels)} labels")
    if labels.size and labels.max() >= len(FMNIST_CLASSES):
        raise UserError(f"Fashion-MNIST file {lbl_path} holds label {int(labels.max())}, expected 0..9")
    return images, labels.astype(np.int64)


def _read_subset(split: str) -> tuple[np.ndarray, np.ndarray]:
    path = FMNIST_SUBSET_PATH
    if not path.is_file():
        raise UserError(f"Fashion-MNIST not found: neither the Debian package files ({FMNIST_DEFAULT_ROOT} or "
                        f"$FASHION_MNIST_ROOT) nor the bundled subset {path}; install dataset-fashion-mnist")
    try:
        with np.load(path) as z:
            images = np.asarray(z[f"{split}_images"], dtype=np.uint8)
            labels = np.asarray(z[f"{split}_labels"], dtype=np.int64)
    except Exception as e:  # zipfile.BadZipFile, KeyError, ValueError, OSError
        raise UserError(f"cannot read the Fashion-MNIST subset {path}: {one_line(e)}") from None
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise UserError(f"the Fashion-MNIST subset {path} is malformed: {split} images {images.shape}, "
                        f"labels {labels.shape}")
    return images, labels


def _fmnist_files(split: str, root) -> tuple[Path, list, list]:
    """(root, the split's two IDX files, those missing); root defaults to `$FASHION_MNIST_ROOT`, else the package's."""
    root = Path(root if root is not None else os.environ.get("FASHION_MNIST_ROOT") or FMNIST_DEFAULT_ROOT)
    paths = [root / name for name in _FMNIST_FILES[split]]
    return root, paths, [p for p in paths if not p.is_file()]


def fashion_mnist_source(split: str, root: str | os.PathLike | None = None) -> str:
    """Where `load_fashion_mnist(split, root)` reads: the IDX files' folder, or the bundled subset file."""
    root, _, missing = _fmnist_files(_fmnist_split(split), root)
    return str(FMNIST_SUBSET_PATH if missing else root.resolve())


def load_fashion_mnist(split: str, root: str | os.PathLike | None = None,
                       allow_subset: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Return `(images uint8 (N, 28, 28), labels int64 (N,))` for split 'train' (60k) or 'test' (10k).

    Reads the gzipped IDX files under `root` (default `$FASHION_MNIST_ROOT`, else the Debian package's
    /usr/share/datasets/fashion-mnist). When those files are absent it falls back, with a one-time warning, to the
    committed subset (3,000 train + 1,000 test images) unless `allow_subset=False`. A corrupt or truncated file
    raises `UserError` naming it. The returned arrays are cached and read-only.
    """
    global _subset_warned
    split = _fmnist_split(split)
    root, paths, missing = _fmnist_files(split, root)
    use_subset = bool(missing)
    if use_subset and not allow_subset:
        raise UserError(f"Fashion-MNIST file {missing[0]} not found; install the Debian package "
                        f"dataset-fashion-mnist or set FASHION_MNIST_ROOT")
    key = ("subset", split) if use_subset else ("files", split, *(str(p.resolve()) for p in paths))
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        if use_subset:
            images, labels = _read_subset(split)
            if not _subset_warned:
                _subset_warned = True
                log.warning("Fashion-MNIST files not found under %s (missing %s); using the bundled subset %s "
                            "(3,000 train / 1,000 test images)", root, missing[0].name, FMNIST_SUBSET_PATH)
        else:
            images, labels = _read_package_files(root, split)
        images = np.ascontiguousarray(images)
        labels = np.ascontiguousarray(labels)
        images.flags.writeable = False
        labels.flags.writeable = False
        _cache[key] = (images, labels)
        return images, labels


def _split_item(item: Any) -> tuple[int, int | None]:
    """Accept `index` or `(index, epoch)` (the latter from `EpochSampler(with_epoch=True)`)."""
    if isinstance(item, (tuple, list)):
        index, epoch = item
        return int(index), int(epoch)
    return int(item), None


def _check_limit(limit: int | None) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or int(limit) != limit or limit <= 0:
        raise UserError(f"dataset.limit must be a positive integer or null, got {limit!r}")
    return int(limit)


class FashionMNIST(Dataset):
    """Fashion-MNIST as (image float32 (3, 32, 32) in [-1, 1], label int).

    28x28 images are padded by 2 px on each side with the background value -1 and repeated to 3 channels.
    `split` is 'train' or 'test' ('val' is accepted for 'test'); `limit=N` keeps N images (`subset`: 'balanced',
    the same number of each class, or 'first'). A given `root` must hold the IDX files: the bundled subset is
    used only when no root is given.
    """

    classes = FMNIST_CLASSES

    def __init__(self, split: str, limit: int | None = None, root: str | os.PathLike | None = None,
                 subset: str = "balanced"):
        self.split = _fmnist_split(split)
        images, labels = load_fashion_mnist(self.split, root=root, allow_subset=root is None)
        limit, total = _check_limit(limit), len(labels)
        keep = select(labels, limit, subset)
        if len(keep) < total:
            images, labels = images[keep], labels[keep]
        self.images, self.labels = images, labels
        self.epoch = 0
        fp = fingerprint(self.classes, [np.ascontiguousarray(images).tobytes(), labels.tobytes()])
        self.identity = data_identity("fmnist", fashion_mnist_source(self.split, root), self.split, self.classes,
                                      files=total, selected=len(labels), fp=fp, limit=limit, subset=subset)

    @property
    def targets(self) -> list:
        return self.labels.tolist()

    def set_epoch(self, epoch: int) -> None:  # no randomness; kept for a uniform interface
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item) -> tuple[torch.Tensor, int]:
        index, _ = _split_item(item)
        img = torch.from_numpy(self.images[index].astype(np.float32)) / 127.5 - 1.0
        img = torch.nn.functional.pad(img, (2, 2, 2, 2), value=-1.0)
        return img.unsqueeze(0).repeat(3, 1, 1), int(self.labels[index])


# --------------------------------------------------------------------------------------------------------------------
# Image folders (ImageNet)
# --------------------------------------------------------------------------------------------------------------------


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB (greyscale, palette and RGBA are converted); unreadable files raise `UserError`."""
    try:
        return open_rgb(path)
    except Exception as e:  # UnidentifiedImageError, OSError (truncated), ValueError, DecompressionBombError, ...
        why = one_line(e) or type(e).__name__
        raise UserError(f"cannot read image {path}: {why}") from None


def _resize_shorter(img: Image.Image, size: int, resample) -> Image.Image:
    """Resize so the shorter side is `size` (torchvision `Resize(int)` rounding: long side truncated)."""
    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    return img.resize((new_w, new_h), resample)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class ImageFolderDataset(Dataset):
    """ImageNet-style folder `root/<split>/<class>/<image>` -> (image float32 (3, S, S) in [-1, 1], label int).

    Class index = position in the sorted class-folder names (like torchvision ImageFolder); an empty class folder
    is refused unless `allow_empty_classes`. `limit=N` keeps N images (`subset`: 'balanced' or 'first', see
    tokenizer.data_check.select). With `check_files` every kept file's header is read first (over `workers`
    processes); an unreadable file is refused in one line, or left out with `skip_unreadable` (which also replaces
    a file that fails later, while training, by the next readable one). Training augmentation is drawn from an
    RNG seeded with (seed, epoch, index): call `set_epoch` each epoch (or pass `(index, epoch)` items).
    """

    def __init__(self, root: str | os.PathLike, split: str, im_size: int, train: bool,
                 aug_scale: float | None = None, limit: int | None = None, seed: int = 0, subset: str = "balanced",
                 allow_empty_classes: bool = False, check_files: bool = True, skip_unreadable: bool = False,
                 workers: int = 0):
        if root is None or str(root) == "":
            raise UserError(f"dataset root is not set; {FOLDER_LAYOUT}")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise UserError(f"dataset root {root} does not exist or is not a folder; {FOLDER_LAYOUT}")
        if isinstance(im_size, bool) or int(im_size) != im_size or im_size <= 0:
            raise UserError(f"dataset.im_size must be a positive integer, got {im_size!r}")
        if aug_scale is not None and not float(aug_scale) >= 1.0:
            raise UserError(f"dataset.aug_scale must be >= 1 (or null for no scale augmentation), got {aug_scale!r}")
        if int(seed) < 0:
            raise UserError(f"dataset.seed must be >= 0, got {seed!r}")
        self.root, self.split, self.im_size, self.train = root, split, int(im_size), bool(train)
        self.aug_scale = None if aug_scale is None or float(aug_scale) == 1.0 else float(aug_scale)
        self.seed, self.epoch, self.skip_unreadable = int(seed), 0, bool(skip_unreadable)
        self.classes, samples, sizes = list_image_folder(str(root), split, allow_empty_classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        limit = _check_limit(limit)
        keep = select([t for _, t in samples], limit, subset)
        self.samples = [samples[i] for i in keep]
        prefix = len(os.path.join(str(root), ""))  # the listing's paths all start with it
        relative = [p[prefix:] for p, _ in self.samples]
        fp = fingerprint(self.classes, [(r, sizes[i]) for r, i in zip(relative, keep)])
        unreadable, seconds = [], None
        if check_files:
            t0 = time.perf_counter()
            many = len(self.samples) >= 20000 and is_main_process()  # a bar only where the check takes a while
            bad = check_images([p for p, _ in self.samples], workers=workers,
                               desc=f"checking {split} file headers" if many else None)
            seconds = time.perf_counter() - t0
            unreadable = [(relative[i], why) for i, why in bad]
            if unreadable and not skip_unreadable:
                (first, why), more = unreadable[0], len(unreadable) - 1
                raise UserError(f"unreadable image {root / first}: {why}" + (f" (and {more} more)" if more else "")
                                + f"; list them all with python -m tokenizer.data_check {root} --split {split}, "
                                  f"or set dataset.skip_unreadable=true to leave them out")
            dropped = {i for i, _ in bad}
            self.samples = [s for i, s in enumerate(self.samples) if i not in dropped]
        self.targets = [t for _, t in self.samples]
        present = set(self.targets)
        self.identity = data_identity(
            "imagefolder", str(root.resolve()), split, self.classes, files=len(samples), selected=len(keep), fp=fp,
            limit=limit, subset=subset, unreadable=unreadable, checked="headers" if check_files else None,
            check_seconds=seconds, empty_classes=[c for i, c in enumerate(self.classes) if i not in present])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def rng(self, index: int, epoch: int | None = None) -> np.random.Generator:
        epoch = self.epoch if epoch is None else epoch
        return np.random.default_rng(np.random.SeedSequence([self.seed, int(epoch), int(index)]))

    def transform(self, img: Image.Image, rng: np.random.Generator | None) -> torch.Tensor:
        S = self.im_size
        if not self.train:
            img = _resize_shorter(img, S, Image.BILINEAR)
            w, h = img.size
            left, top = int(round((w - S) / 2.0)), int(round((h - S) / 2.0))
            return _to_tensor(img.crop((left, top, left + S, top + S)))
        assert rng is not None
        if self.aug_scale is not None:
            size = int(rng.uniform(S, self.aug_scale * S))  # uniform in [S, aug_scale*S), floored
            img = _resize_shorter(img, size, Image.LANCZOS)
        else:
            img = _resize_shorter(img, S, Image.BILINEAR)
        w, h = img.size
        left = int(rng.integers(0, w - S + 1))
        top = int(rng.integers(0, h - S + 1))
        img = img.crop((left, top, left + S, top + S))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_tensor(img)

    def _read(self, index: int) -> tuple[Image.Image, int]:
        """The image and label of item `index`; with skip_unreadable, a file that fails to decode (a damage the
        header check cannot see) is replaced by the next readable one, so the run goes on."""
        for attempt in range(len(self.samples)):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                return load_rgb(path), target
            except UserError as e:
                if not self.skip_unreadable:
                    raise UserError(f"{e}; list every unreadable file with python -m tokenizer.data_check "
                                    f"{self.root} --split {self.split}, or set dataset.skip_unreadable=true") from None
                log.warning("%s: skipped (dataset.skip_unreadable=true), the next image takes its place", e)
        raise UserError(f"no readable image in {self.root / self.split}")

    def __getitem__(self, item) -> tuple[torch.Tensor, int]:
        index, epoch = _split_item(item)
        img, target = self._read(index)
        rng = self.rng(index, epoch) if self.train else None
        return self.transform(img, rng), target


def take_subset(dataset: Dataset, n: int | None, how: str = "balanced") -> Dataset:
    """`n` items of `dataset` (all when n is None or not smaller): a class-balanced or first-n subset
    (tokenizer.data_check.select), the same for every process count and run. `training.eval_images` uses it."""
    if n is None or n >= len(dataset):
        return dataset
    targets = getattr(dataset, "targets", None)
    keep = select(targets, n, how) if targets is not None else list(range(n))
    return torch.utils.data.Subset(dataset, keep)


# --------------------------------------------------------------------------------------------------------------------
# Config entry point
# --------------------------------------------------------------------------------------------------------------------

DATASET_NAMES = ("fmnist", "imagefolder", "imagenet")  # "imagenet" is an alias of "imagefolder"


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    try:
        value = cfg.get(key, default)
    except Exception:  # e.g. omegaconf struct-mode oddities
        value = getattr(cfg, key, default)
    return default if value is None else value


def dataset_kind(cfg_dataset: Any) -> str:
    """'imagefolder' or 'fmnist': what a config's dataset section reads. A given root decides: one that holds an
    image folder is read as one (also under dataset.name=fmnist), one that holds neither an image folder nor the
    Fashion-MNIST IDX files is refused; the bundled Fashion-MNIST subset is read only when no root is given."""
    name = str(_cfg_get(cfg_dataset, "name", "")).lower()
    root = _cfg_get(cfg_dataset, "root") or _cfg_get(cfg_dataset, "imagenet_root")
    if name in ("imagefolder", "imagenet"):
        return "imagefolder"
    if name != "fmnist":
        raise UserError(f"unknown dataset.name {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    if not root:
        return "fmnist"
    if looks_like_image_folder(os.path.expanduser(str(root))):
        return "imagefolder"
    if any((Path(root).expanduser() / f).is_file() for pair in _FMNIST_FILES.values() for f in pair):
        return "fmnist"
    raise UserError(f"dataset.root={root} holds neither an image folder (<root>/<split>/<class>/<image>) nor "
                    f"Fashion-MNIST's IDX files (*-ubyte.gz); give one of them, or dataset.root=null for the bundled "
                    f"Fashion-MNIST")


def build_dataset(cfg_dataset: Any, split: str, train: bool, check_files: bool | None = None) -> Dataset:
    """Build a dataset from a config's dataset section (name, root, im_size, aug_scale, limit, subset,
    allow_empty_classes, check_files, skip_unreadable, num_workers, seed); `dataset.identity` records its data.

    `split` is 'train' or 'val' ('val' maps to Fashion-MNIST 'test'). `train` switches on augmentation.
    `check_files=False` skips the file check whatever the config says (to identify the data without reading it).
    """
    kind = dataset_kind(cfg_dataset)
    root = _cfg_get(cfg_dataset, "root") or _cfg_get(cfg_dataset, "imagenet_root")
    im_size = _cfg_get(cfg_dataset, "im_size")
    limit = _cfg_get(cfg_dataset, "limit")
    subset = str(_cfg_get(cfg_dataset, "subset", "balanced"))
    if subset not in SUBSETS:
        raise UserError(f"unknown dataset.subset {subset!r}: choose {', '.join(SUBSETS)}")
    if kind == "fmnist":
        if im_size is not None and im_size != FMNIST_IM_SIZE:
            raise UserError(f"dataset.im_size={im_size} is not supported for fmnist: the embedded data is "
                            f"{FMNIST_IM_SIZE} px (28 px padded), set dataset.im_size={FMNIST_IM_SIZE}")
        if split not in ("train", "val", "test"):
            raise UserError(f"unknown split {split!r} for fmnist; use 'train' or 'val'")
        return FashionMNIST(split, limit=limit, root=root, subset=subset)
    if im_size is None:
        raise UserError("dataset.im_size must be set for an image-folder dataset")
    check = bool(_cfg_get(cfg_dataset, "check_files", True)) if check_files is None else check_files
    return ImageFolderDataset(root, split, im_size, train, aug_scale=_cfg_get(cfg_dataset, "aug_scale"),
                              limit=limit, seed=int(_cfg_get(cfg_dataset, "seed", 0)), subset=subset,
                              allow_empty_classes=bool(_cfg_get(cfg_dataset, "allow_empty_classes", False)),
                              check_files=check, skip_unreadable=bool(_cfg_get(cfg_dataset, "skip_unreadable", False)),
                              workers=int(_cfg_get(cfg_dataset, "num_workers", 0)))


def identify(cfg_dataset: Any, split: str) -> dict:
    """The identity record of the data a config names, without checking its files (e.g. dit.train, which reads
    only the latent cache, finds the cache of this data with it)."""
    return build_dataset(cfg_dataset, split, train=False, check_files=False).identity

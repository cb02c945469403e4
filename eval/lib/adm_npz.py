"""The ADM evaluator's batch format (openai/guided-diffusion `evaluations/`), written and read in a streaming way.

A *sample batch* is an uncompressed `.npz` whose `arr_0` is uint8 (N, H, W, 3) (NHWC, RGB, 0..255); guided-diffusion's
class-conditional sampler stores the labels beside it as `arr_1`. A *reference batch* such as
`VIRTUAL_imagenet256_labeled.npz` also holds `arr_0` (10,000 images, for precision/recall) and precomputed Inception
statistics: `mu` (2048,), `sigma` (2048, 2048) of the pool features and `mu_s`, `sigma_s` of the spatial ones (sFID).

50,000 samples at 256 px are 9.8 GB, so neither side holds them in memory: `write_sample_batch` streams images into
the zip member one by one, and `NpzImages` reads `arr_0` batch by batch from the archive (an `.npz` is a zip of
`.npy` files: a short header, then the raw array bytes in C order).
"""

from __future__ import annotations

import os
import zipfile
from contextlib import contextmanager
from typing import Iterable, Iterator

import numpy as np

from tokenizer.common.atomic import atomic_file
from tokenizer.common.errors import UserError, one_line

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def _write_member(zf: zipfile.ZipFile, name: str, shape: tuple, dtype, chunks: Iterable[np.ndarray]) -> None:
    """Write `name.npy` (an .npy header for `shape`/`dtype`, then the chunks' bytes, which must add up) into zf."""
    count = 0
    with zf.open(name + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                 "fortran_order": False, "shape": tuple(shape)})
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=dtype)
            f.write(chunk.tobytes())
            count += chunk.shape[0]
    if count != shape[0]:
        raise ValueError(f"{name}: {count} rows written, {shape[0]} announced")


def write_sample_batch(path: str, images: Iterable[np.ndarray], n: int, image_shape: tuple,
                       labels: np.ndarray | None = None) -> None:
    """Write an ADM sample batch: `images` yields uint8 (H, W, 3) arrays (or (b, H, W, 3) blocks), n in all.

    Written to a temporary sibling and moved into place, so a kill or a full disk never leaves a truncated .npz (a
    full disk is a one-line UserError)."""
    blocks = (im[None] if im.ndim == 3 else im for im in images)

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            _write_member(zf, "arr_0", (n, *image_shape), np.uint8, blocks)
            if labels is not None:
                _write_member(zf, "arr_1", (len(labels),), np.int64, [np.asarray(labels)])

    atomic_file(path, write)


class NpzImages:
    """`arr_0` of an ADM batch, read in batches without loading the file: len(), shape, `batches(size)`.

    Also `stats`: the precomputed `mu`/`sigma` (and `mu_s`/`sigma_s`) when the file carries them (float64), else
    None, and `labels` (`arr_1`) when present. A file that is not such a batch is a one-line UserError.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            with zipfile.ZipFile(path) as zf:
                members = {os.path.splitext(n)[0] for n in zf.namelist()}
        except (OSError, zipfile.BadZipFile) as e:
            raise UserError(f"cannot read {path} as an .npz: {one_line(e)}") from None
        self.members = members
        self.shape, self.dtype = None, None
        if "arr_0" in members:
            with self._member("arr_0") as f:
                self.shape, self.dtype = self._header(f)
            if self.dtype != np.uint8 or len(self.shape) != 4 or self.shape[3] != 3:
                raise UserError(f"{path}: arr_0 must be uint8 (N, H, W, 3) images (the ADM format), got "
                                f"{self.dtype} {self.shape}")
        self.stats = None
        if {"mu", "sigma"} <= members:
            with np.load(path) as z:
                self.stats = {k: np.asarray(z[k], dtype=np.float64) for k in STAT_KEYS if k in members}
        if self.shape is None and self.stats is None:
            raise UserError(f"{path} holds neither images (arr_0) nor statistics (mu, sigma): not an ADM batch")

    @contextmanager
    def _member(self, name: str):
        with zipfile.ZipFile(self.path) as zf, zf.open(name + ".npy") as f:
            yield f

    @staticmethod
    def _header(f) -> tuple[tuple, np.dtype]:
        version = np.lib.format.read_magic(f)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise UserError(f".npy format version {version} is not supported in an ADM batch (1.0 or 2.0)")
        shape, fortran, dtype = readers[version](f)
        if fortran:
            raise UserError("Fortran-ordered arrays are not supported in an ADM batch")
        return tuple(shape), dtype

    def __len__(self) -> int:
        return 0 if self.shape is None else self.shape[0]

    @property
    def labels(self) -> np.ndarray | None:
        if "arr_1" not in self.members:
            return None
        with np.load(self.path) as z:
            return np.asarray(z["arr_1"])

    def batches(self, size: int) -> Iterator[np.ndarray]:
        """uint8 (b, H, W, 3) arrays in file order, b <= size."""
        if self.shape is None:
            raise UserError(f"{self.path} holds no images (arr_0)")
        per_image = int(np.prod(self.shape[1:]))
        with self._member("arr_0") as f:
            self._header(f)
            for start in range(0, self.shape[0], size):
                b = min(size, self.shape[0] - start)
                data = f.read(b * per_image)
                if len(data) != b * per_image:
                    raise UserError(f"{self.path}: arr_0 is truncated ({start + len(data) // per_image} of "
                                    f"{self.shape[0]} images)")
                yield np.frombuffer(data, dtype=np.uint8).reshape(b, *self.shape[1:])

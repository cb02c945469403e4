# Fashion-MNIST (c) Zalando SE, MIT licence (https://github.com/zalandoresearch/fashion-mnist); subset redistributed
# under it.
"""Make tokenizer/assets/fmnist_subset.npz: a class-balanced Fashion-MNIST subset for machines without the
Debian package `dataset-fashion-mnist`.

Deterministic (seed 0): per class, PER_CLASS[split] images drawn without replacement from the official split, kept in
their original order. Run from the repository root:

    PYTHONPATH=. python tokenizer/assets/make_fmnist_subset.py [--root /usr/share/datasets/fashion-mnist]
"""

import argparse
from pathlib import Path

import numpy as np

from tokenizer.data import FMNIST_CLASSES, load_fashion_mnist

PER_CLASS = {"train": 300, "test": 100}
OUT = Path(__file__).resolve().parent / "fmnist_subset.npz"
MAX_BYTES = 2_000_000


def select(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    picks = [rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False)
             for c in range(len(FMNIST_CLASSES))]
    return np.sort(np.concatenate(picks))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=None, help="folder with the gzipped IDX files (default: Debian package path)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    arrays = {}
    for split, per_class in PER_CLASS.items():
        images, labels = load_fashion_mnist(split, root=args.root, allow_subset=False)
        idx = select(labels, per_class, rng)
        arrays[f"{split}_images"] = images[idx]
        arrays[f"{split}_labels"] = labels[idx].astype(np.int64)
    np.savez_compressed(args.out, **arrays)
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {size:,} bytes; " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))
    if size > MAX_BYTES:
        raise SystemExit(f"subset is {size:,} bytes, over the {MAX_BYTES:,}-byte budget: lower PER_CLASS")


if __name__ == "__main__":
    main()

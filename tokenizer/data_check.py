"""What the data is and whether it reads: the listing of an image folder, the identity record that every cache, run
and result keeps, class-balanced subsets, and the checks of the files made before any work.

    python -m tokenizer.data_check <root> [--split train] [--workers 8]   # decode every image, list unreadable ones

Identity. `data_identity` describes the images a run reads: kind, resolved root, split, class names, file count,
what `dataset.limit` selected, and a fingerprint, the sha256 of the class names and of the selected files'
relative paths and sizes (no file contents: it costs one `stat` per file). The fingerprint does not depend on
where the folder lies, so moving a data set keeps its caches and runs valid; any added, removed, renamed or
resized file changes it.

Subsets. `select(targets, n, how)` keeps n images: `balanced` takes the same share of every class (classes too
small to fill their share give the rest to the others), each class's images drawn by a permutation seeded with
(seed, class); `first` keeps the first n in sorted order. Either is a pure function of (file list, n, seed), so
every process count and every run selects the same images, and a balanced subset of n lies inside that of a larger n.

Checks. `check_image` opens a file's header (Pillow reads the format and size, no pixels) and reads its last
bytes: a JPEG or PNG without its end marker (a truncated copy or download) is decoded in full to decide. Measured
on generated 160x120 JPEGs and PNGs with the files in the page cache: ~0.4 s of CPU per 10,000 files (1.3-1.5 s
on 2 busy shared cores), so ImageNet's 1.28 M files take ~1 min of CPU, split over `dataset.num_workers`
processes (a cold disk adds two small reads per file). It is on by default (`dataset.check_files`); listing and
fingerprinting cost ~0.07 s per 10,000 files. `python -m tokenizer.data_check` decodes every image in full, as
training would (~1-3 s of CPU per 10,000 such small images; ImageNet's ~7x larger ones take ~40 min of CPU).
"""

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import time

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from tokenizer.common.atomic import atomic_json
from tokenizer.common.errors import UserError, one_line, run_cli

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FOLDER_LAYOUT = "expected an ImageNet-style folder ROOT/{train,val}/<class>/<image>"
SUBSETS = ("balanced", "first")
RUN_DATA_FILE = "data.json"  # in a run folder: the identity of each split the run reads
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
_PARALLEL_FROM = 2000  # files; fewer are checked in the calling process (starting workers costs more)
_LISTED_UNREADABLE = 100  # unreadable files named in an identity record


# ----------------------------------------------------------------------------- listing an image folder


def _image_files(folder: str) -> list:
    """(relative path, size) of every image file under `folder` (recursively, following links), sorted by path."""
    found = []

    def walk(directory: str, prefix: str) -> None:
        for entry in os.scandir(directory):
            if entry.is_dir():
                walk(entry.path, prefix + entry.name + "/")
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                found.append((prefix + entry.name, entry.stat().st_size))

    walk(folder, "")
    return sorted(found)


def list_image_folder(root: str, split: str, allow_empty_classes: bool = False):
    """(class names, [(path, class index)], [size]) of `root/split/<class>/...`, like torchvision's ImageFolder:
    classes are the sorted sub-folders, files sorted within each class. An empty class folder is refused (it would
    become a class without images) unless `allow_empty_classes`."""
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise UserError(f"split folder {split_dir} not found; {FOLDER_LAYOUT}")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not classes:
        raise UserError(f"no class folders in {split_dir}; {FOLDER_LAYOUT}")
    samples, sizes, empty = [], [], []
    for index, name in enumerate(classes):
        files = _image_files(os.path.join(split_dir, name))
        if not files:
            empty.append(name)
        samples += [(os.path.join(split_dir, name, rel), index) for rel, _ in files]
        sizes += [size for _, size in files]
    if not samples:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {split_dir}; {FOLDER_LAYOUT}")
    if empty and not allow_empty_classes:
        one = len(empty) == 1
        them, holds, kind = ("it", "holds", "a class") if one else ("them", "hold", "classes")
        raise UserError(f"{len(empty)} of the {len(classes)} class folders in {split_dir} {holds} no images: "
                        f"{_names(empty)}; remove {them}, or set dataset.allow_empty_classes=true to keep {them} as "
                        f"{kind} without images")
    return classes, samples, sizes


def looks_like_image_folder(root: str) -> bool:
    """True when `root` holds a folder of folders (<root>/<split>/<class>/): an image folder, not Fashion-MNIST."""
    try:
        return any(e.is_dir() and any(c.is_dir() for c in os.scandir(e.path)) for e in os.scandir(root))
    except OSError:
        return False


# ----------------------------------------------------------------------------- subsets


def select(targets, n: int | None, how: str = "balanced", seed: int = 0) -> list:
    """Sorted indices of the n items to keep (all when n is None or not smaller); see the module docstring."""
    total = len(targets)
    if n is None or n >= total:
        return list(range(total))
    if how == "first":
        return list(range(n))
    if how != "balanced":
        raise UserError(f"unknown dataset.subset {how!r}: choose {', '.join(SUBSETS)}")
    by_class = {}
    for i, t in enumerate(np.asarray(targets).tolist()):
        by_class.setdefault(int(t), []).append(i)
    classes = sorted(by_class)
    quota, left, open_classes = dict.fromkeys(classes, 0), n, list(classes)
    while left:  # fill equal shares; a class with too few images gives its rest to the others
        share = left // len(open_classes)
        if share == 0:  # fewer images left than classes: one more each for a seeded choice of classes
            order = np.random.default_rng(np.random.SeedSequence([seed])).permutation(len(classes))
            for c in [classes[i] for i in order if classes[i] in open_classes][:left]:
                quota[c] += 1
            break
        for c in open_classes:
            take = min(share, len(by_class[c]) - quota[c])
            quota[c], left = quota[c] + take, left - take
        open_classes = [c for c in open_classes if quota[c] < len(by_class[c])]
    keep = []
    for c in classes:
        order = np.random.default_rng(np.random.SeedSequence([seed, c])).permutation(len(by_class[c]))
        keep += [by_class[c][i] for i in order[:quota[c]]]
    return sorted(keep)


# ----------------------------------------------------------------------------- reading and checking files


def open_rgb(path) -> Image.Image:
    """The image as RGB, decoded in full (greyscale, palette and RGBA converted); Pillow's errors pass through."""
    with Image.open(path) as im:
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        return im.convert("RGB")  # convert() forces a full decode, so truncation errors surface here


def check_image(path, decode: bool = False) -> str | None:
    """None when the file reads as an image, else why not (one line). Without `decode` only the header is parsed
    and the last bytes are read; a JPEG or PNG that lacks its end marker is then decoded in full to decide."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 12))
            tail = f.read()
            f.seek(0)
            with Image.open(f) as im:
                width, height = im.size
                marker = _END_MARKERS.get(im.format)
                if decode or (marker is not None and not tail.endswith(marker)):
                    if im.mode == "P" and "transparency" in im.info:
                        im = im.convert("RGBA")
                    im.convert("RGB")
        if width < 1 or height < 1:
            return f"{width}x{height} pixels"
    except UnidentifiedImageError:  # its message would name the file object
        return "not an image (Pillow knows no format with this header)"
    except Exception as e:  # OSError (truncated), SyntaxError, DecompressionBombError, ...
        return one_line(e) or type(e).__name__
    return None


def _check_job(args):
    return check_image(*args)


def check_images(paths: list, decode: bool = False, workers: int = 0, desc: str | None = None) -> list:
    """[(index, why)] of the unreadable files among `paths`, in order; over `workers` processes for long lists, with
    a progress bar when `desc` is given."""
    jobs = [(p, decode) for p in paths]
    bad = []
    with tqdm(total=len(jobs), desc=desc, unit="file", disable=desc is None, dynamic_ncols=True) as bar:
        if workers > 1 and len(jobs) >= _PARALLEL_FROM:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with multiprocessing.get_context(method).Pool(workers) as pool:
                for i, why in enumerate(pool.imap(_check_job, jobs, chunksize=64)):
                    if why is not None:
                        bad.append((i, why))
                    bar.update(1)
        else:
            for i, job in enumerate(jobs):
                why = _check_job(job)
                if why is not None:
                    bad.append((i, why))
                bar.update(1)
    return bad


def is_main_process() -> bool:
    """True outside a multi-process launch and on its rank 0 (torchrun and accelerate set RANK)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


# ----------------------------------------------------------------------------- identity


def fingerprint(class_names, entries) -> str:
    """sha256 of the class names and of (relative path, size) lines (or raw bytes chunks for in-memory data)."""
    h = hashlib.sha256()
    h.update(("classes\t" + "\t".join(map(str, class_names)) + "\n").encode())
    for entry in entries:
        h.update(entry if isinstance(entry, bytes) else (f"{entry[0]}\t{entry[1]}\n").encode())
    return h.hexdigest()


def data_identity(kind: str, root: str, split: str, class_names, files: int, selected: int, fp: str,
                  limit=None, subset: str = "balanced", empty_classes=(), unreadable=None, checked=None,
                  check_seconds=None) -> dict:
    """The record of which data made something (see the module docstring); `unreadable` = [(relative path, why)]
    of the files skipped (None: not checked)."""
    unreadable = unreadable or []
    return {
        "kind": kind,
        "root": root,
        "split": split,
        "classes": len(class_names),
        "class_names": [str(c) for c in class_names],
        "empty_classes": list(empty_classes),
        "files": files,
        "limit": limit,
        "subset": subset if limit is not None and limit < files else None,
        "selected": selected,
        "images": selected - len(unreadable),
        "fingerprint": fp,
        "checked": checked,
        "check_seconds": None if check_seconds is None else round(check_seconds, 2),
        "skipped": len(unreadable),
        "unreadable": [{"file": f, "why": w} for f, w in unreadable[:_LISTED_UNREADABLE]],
    }


def _names(names, shown: int = 5) -> str:
    names = [str(n) for n in names]
    return ", ".join(names[:shown]) + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")


def short(identity: dict) -> str:
    """`<root> (split train, 1,600 images, fingerprint 1a2b3c4d)`: enough to tell two data sets apart."""
    return (f"{identity['root']} (split {identity['split']}, {identity['images']:,} images, "
            f"fingerprint {identity['fingerprint'][:8]})")


def banner(identity: dict, what: str = "data") -> str:
    """The line every trainer and the cache print at start: kind, root, split, images, classes."""
    i = identity
    count = f"{i['selected']:,} of {i['files']:,} images ({i['subset']} subset, dataset.limit={i['limit']})" \
        if i["subset"] else f"{i['files']:,} images"
    line = (f"{what}: {i['kind']} {i['root']}, split {i['split']}: {count}, {i['classes']} classes "
            f"({_names(i['class_names'])}); fingerprint {i['fingerprint'][:8]}")
    if i["empty_classes"]:
        line += f"; {len(i['empty_classes'])} empty classes kept ({_names(i['empty_classes'], 3)})"
    if i["checked"]:
        line += f"; {i['checked']} of {i['selected']:,} files checked in {i['check_seconds']} s"
    if i["skipped"]:
        line += (f"; {i['skipped']} unreadable skipped (dataset.skip_unreadable=true): "
                 f"{_names([u['file'] for u in i['unreadable']], 3)}")
    return line


# ----------------------------------------------------------------------------- the record of a run


def check_run_data(out_dir: str, identities: dict) -> None:
    """Refuse (before anything of the run changes) to resume a run on other data than it was trained on."""
    path = os.path.join(out_dir, RUN_DATA_FILE)
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {one_line(e)}") from None
    for split, identity in identities.items():
        old = recorded.get(split)
        if isinstance(old, dict) and old.get("fingerprint") != identity["fingerprint"]:
            raise UserError(f"run {out_dir} was trained on {short(old)} but this start reads {short(identity)}: "
                            f"nothing was changed; resume it on its own data (dataset.root, dataset.limit) or "
                            f"start another run_name")


def write_run_data(out_dir: str, identities: dict) -> None:
    """Save the identities of the data a run reads as <run>/data.json (main process)."""
    atomic_json(os.path.join(out_dir, RUN_DATA_FILE), identities)


# ----------------------------------------------------------------------------- the check command


def _splits(root: str, wanted: list | None) -> list:
    if wanted:
        return wanted
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and any(c.is_dir() for c in os.scandir(e.path)))
    if not found:
        raise UserError(f"no split folders in {root}; {FOLDER_LAYOUT}")
    return found


def check_folder(root: str, splits: list | None = None, workers: int = 0, headers_only: bool = False) -> int:
    """Scan every split of an image folder, decoding each image in full; print the classes, the empty classes and
    every unreadable file. Returns the number of problems found (unreadable files + empty classes)."""
    if not os.path.isdir(root):
        raise UserError(f"{root} is not a folder; {FOLDER_LAYOUT}")
    problems = 0
    for split in _splits(root, splits):
        classes, samples, _ = list_image_folder(root, split, allow_empty_classes=True)
        counts = np.bincount([t for _, t in samples], minlength=len(classes))
        empty = [c for c, n in zip(classes, counts) if n == 0]
        print(f"{os.path.join(root, split)}: {len(samples):,} images, {len(classes)} classes "
              f"({_names(classes)}), {counts.min()}..{counts.max()} images per class")
        t0 = time.perf_counter()
        bad = check_images([p for p, _ in samples], decode=not headers_only, workers=workers,
                           desc=f"{split}: {'headers' if headers_only else 'decoding'}")
        for i, why in bad:
            print(f"unreadable: {os.path.relpath(samples[i][0], root)}: {why}")
        if empty:
            print(f"empty class folders: {', '.join(empty)}")
        print(f"{split}: {len(bad)} unreadable of {len(samples):,} ({time.perf_counter() - t0:.1f} s), "
              f"{len(empty)} empty class folders")
        problems += len(bad) + len(empty)
    if problems:
        print(f"{problems} problems: train without the unreadable files with dataset.skip_unreadable=true, keep "
              f"empty classes with dataset.allow_empty_classes=true")
    return problems


def run(argv: list) -> int:
    ap = argparse.ArgumentParser(prog="python -m tokenizer.data_check", description=(
        "Check an image folder ROOT/<split>/<class>/<image> before training: decode every image with the "
        "training code's reader and list the unreadable files and empty class folders. Exit status 0: all clean; "
        "1: problems found; 2: not an image folder."))
    ap.add_argument("root", help="the dataset.root of the config")
    ap.add_argument("--split", action="append", help="split folder to check (repeatable; default: every split)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes (default %(default)s)")
    ap.add_argument("--headers-only", action="store_true", help="the quick check training makes (no full decode)")
    args = ap.parse_args(argv)
    return check_folder(args.root, args.split, max(0, args.workers), args.headers_only)


def main(argv=None) -> int:
    found = []
    rc = run_cli(lambda a: found.append(run(a)), sys.argv[1:] if argv is None else argv)
    return rc or (1 if found and found[0] else 0)


if __name__ == "__main__":
    sys.exit(main())

"""Resident memory of DiT training on a large latent cache: a synthetic cache of N latents, a few dit.train steps.

    python eval/stress/cache_memory.py --entries 500000 --dir /tmp/synthetic_cache --out docs/reports/cache_memory_cpu
    python eval/stress/cache_memory.py --entries 500000 --dir /tmp/synthetic_cache --keep ...   # keep the cache

Writes a cache in the real format (dit.cache shards + cache.json) holding `--entries` random latents of shape
`--latent` (ImageNet-256 with f8c4: 4 x 32 x 32; entries = images x 2 with flips), made for a small randomly
initialised tokenizer written beside it (training checks the encoder's sha256, so the cache must name a real
one). Then runs `python -m dit.train` on it in a subprocess for `--steps` steps and samples, every 0.2 s, the
resident memory of the trainer and of its DataLoader workers from /proc (VmRSS, split into anonymous memory and
file pages, the trainer's high-water mark VmHWM, and the sum of everyone's PSS, which counts pages the forked
workers share with the trainer once). Writes <out>.json and <out>.md; deletes the cache it wrote
unless --keep. `--code-root` runs the trainer from another checkout (e.g. an older commit) on the same cache, to
compare readers side by side.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

import torch
from PIL import Image

from dit.cache import FORMAT, cache_metadata, shard_name, write_shard
from eval.lib.report import command_line, machine_info, markdown_table, run_script, today, write_report
from tokenizer.common.checkpoint import save_weights
from tokenizer.common.config import load_config
from tokenizer.common.errors import UserError
from tokenizer.data import identify
from tokenizer.ssdd import SSDD

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def write_tokenizer(directory: str) -> tuple[SSDD, str]:
    """A small random f8c4 tokenizer (32-wide encoder, XS decoder) with a z_stats.json beside it."""
    os.makedirs(directory, exist_ok=True)
    torch.manual_seed(0)
    model = SSDD(encoder="f8c4", decoder="XS", encoder_base_channels=32)
    path = os.path.join(directory, "tok.safetensors")
    save_weights(model, path, model.architecture())
    with open(os.path.join(directory, "z_stats.json"), "w") as f:
        json.dump({"z_mean": 0.0, "z_std": 1.0}, f)
    return model, path


def stand_in_data(args) -> str:
    """dit.train reads only the cache but finds it by the data the config names: a one-image folder stands for the
    data this synthetic cache records."""
    root = os.path.join(args.dir, "data")
    os.makedirs(os.path.join(root, "train", "all"), exist_ok=True)
    Image.new("RGB", (8, 8)).save(os.path.join(root, "train", "all", "0.png"))
    return root


def train_args(args, tok: str, cache: str) -> list:
    return ([f"tokenizer.checkpoint={tok}", f"cache.dir={cache}", f"ckpt_dir={args.dir}/runs", "run_name=memory",
             "dataset.name=imagefolder", f"dataset.root={os.path.join(args.dir, 'data')}",
             f"dataset.im_size={args.latent[1] * 8}", f"dataset.num_workers={args.workers}",
             f"model.name={args.model}", f"training.batch_size={args.batch_size}", f"training.max_steps={args.steps}",
             "training.log_freq=1", "training.ckpt_every=1000000000", "training.sample_every=1000000000",
             "sample.steps=2", "sample.per_class=1", "sample.grid_classes=[0]", "sample.decoder_steps=1"])


def write_cache(args, model: SSDD, tok: str, cache: str) -> dict:
    """Random N(0, 1) latents (the scale of normalised latents) and labels, shard by shard, then cache.json."""
    images = args.entries // 2
    cfg = load_config("dit.yaml", [*train_args(args, tok, cache), f"cache.shard_size={args.shard_size}",
                                   f"cache.dtype={args.dtype}", "cache.flip=true"])
    counts = [min(args.shard_size, images - k * args.shard_size) for k in range(math.ceil(images / args.shard_size))]
    dtype = getattr(torch, args.dtype)
    os.makedirs(cache, exist_ok=True)
    t0 = time.time()
    g = torch.Generator().manual_seed(0)
    for k, n in enumerate(counts):
        print(f"writing shard {k + 1}/{len(counts)} ({n} images)", flush=True)
        write_shard(os.path.join(cache, shard_name(k)), {
            "latents": torch.randn(n, *args.latent, generator=g).to(dtype),
            "latents_flip": torch.randn(n, *args.latent, generator=g).to(dtype),
            "labels": torch.randint(0, args.classes, (n,), generator=g)})
    stats = {"z_mean": 0.0, "z_std": 1.0, "path": os.path.join(os.path.dirname(tok), "z_stats.json")}
    meta = cache_metadata(cfg, model, tok, model.encoder_sha256(), stats, [], cache, counts, time.time() - t0,
                          identify(cfg.dataset, cfg.dataset.split))
    assert meta["format"] == FORMAT
    with open(os.path.join(cache, "cache.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def read_status(pid: int) -> dict | None:
    """VmRSS, VmHWM, RssAnon, RssFile and Pss (shared pages divided among their users) in MB, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            values = {line.split(":")[0]: line.split()[1] for line in f if line.split(":")[0] in FIELDS}
        with open(f"/proc/{pid}/smaps_rollup") as f:
            values.update({line.split(":")[0]: line.split()[1] for line in f if line.startswith("Pss:")})
        return {k: int(v) / 1024 for k, v in values.items()}
    except (OSError, IndexError, ValueError):
        return None


def children(pid: int) -> list:
    """Every descendant process id of `pid` (DataLoader workers), from /proc/<pid>/task/*/children."""
    found = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        return found
    return found + [d for c in found for d in children(c)]


def watch(cmd: list, env: dict, log_path: str, cwd: str) -> dict:
    """Run `cmd` (output to log_path), sampling the memory of it and its children until it exits; peaks in MB."""
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    main = {k: 0.0 for k in (*FIELDS, "Pss")}
    workers = {"VmRSS": 0.0, "RssAnon": 0.0, "RssFile": 0.0, "count": 0}
    total = 0.0
    while proc.poll() is None:
        status = read_status(proc.pid)
        if status:
            for k, v in status.items():
                main[k] = max(main[k], v)
            pss = status.get("Pss", 0.0)
            kids = children(proc.pid)
            workers["count"] = max(workers["count"], len(kids))
            for child in kids:
                s = read_status(child)
                if s:
                    pss += s.get("Pss", 0.0)
                    for k in ("VmRSS", "RssAnon", "RssFile"):
                        workers[k] = max(workers[k], s.get(k, 0.0))
            total = max(total, pss)
        time.sleep(0.2)
    log.close()
    text = open(log_path).read()
    if proc.returncode != 0:
        last = text.strip().splitlines()[-1] if text.strip() else ""
        raise UserError(f"dit.train failed (exit {proc.returncode}): {last}")
    return {"trainer_mb": main, "worker_peak_mb": workers, "trainer_plus_workers_pss_peak_mb": total,
            "log_tail": text[-2000:]}


def read_rate(cache: str, items: int) -> dict:
    """Items/s of LatentCache.__getitem__ over `items` random entries in this process (one reader, no workers)."""
    from dit.cache import LatentCache

    dataset = LatentCache(cache)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(1))[:items].tolist()
    t0 = time.perf_counter()
    for j in order:
        dataset[j]
    seconds = time.perf_counter() - t0
    return {"items": len(order), "seconds": seconds, "items_per_s": len(order) / seconds}


def run(args) -> dict:
    if args.entries < 2 or args.steps < 1:
        raise UserError("--entries must be >= 2 and --steps >= 1")
    if args.entries % 2:
        raise UserError("--entries counts images x 2 (flips): give an even number")
    code_root = os.path.abspath(args.code_root or ROOT)
    tok_dir, cache = os.path.join(args.dir, "tokenizer"), os.path.join(args.dir, "cache")
    model, tok = write_tokenizer(tok_dir)
    stand_in_data(args)
    need_gb = args.entries * math.prod(args.latent) * getattr(torch, args.dtype).itemsize / 1e9
    reuse = os.path.isfile(os.path.join(cache, "cache.json")) and \
        json.load(open(os.path.join(cache, "cache.json")))["entries"] == args.entries
    if not reuse:
        free_gb = shutil.disk_usage(os.path.dirname(os.path.abspath(args.dir)) or ".").free / 1e9
        if need_gb > 0.9 * free_gb:
            raise UserError(f"the cache needs {need_gb:.1f} GB but {args.dir} has {free_gb:.1f} GB free")
        shutil.rmtree(cache, ignore_errors=True)
        t0 = time.time()
        write_cache(args, model, tok, cache)
        print(f"wrote {args.entries} latents ({need_gb:.2f} GB) in {time.time() - t0:.0f} s", flush=True)
    disk_gb = sum(os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache)) / 1e9
    shutil.rmtree(os.path.join(args.dir, "runs"), ignore_errors=True)  # a fresh run, not a resume
    env = {**os.environ, "PYTHONPATH": code_root, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "dit.train", *train_args(args, tok, cache)]
    t0 = time.time()
    result = watch(cmd, env, os.path.join(args.dir, "train.log"), code_root)  # python -m imports from the cwd
    wall = time.time() - t0
    reads = read_rate(cache, args.read_items) if code_root == ROOT else None  # this checkout's reader only
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    machine = machine_info("cpu")
    record = {"machine": machine, "date": today(), "command": command_line("eval/stress/cache_memory.py", args.argv),
              "code_root": code_root, "entries": args.entries, "latent": args.latent, "dtype": args.dtype,
              "cache_gb_on_disk": disk_gb, "model": args.model, "batch_size": args.batch_size, "steps": args.steps,
              "workers": args.workers, "train_wall_s": wall, "random_reads": reads,
              "train_command": "python -m dit.train " + " ".join(cmd[3:]),
              **result}
    m, w = result["trainer_mb"], result["worker_peak_mb"]
    row = {"entries": args.entries, "disk": f"{disk_gb:.2f} GB", "hwm": m["VmHWM"], "anon": m["RssAnon"],
           "file": m["RssFile"], "workers": f"{w['count']} x {w['VmRSS']:.0f}",
           "total": result["trainer_plus_workers_pss_peak_mb"]}
    table = markdown_table([row], [("hwm", "trainer peak RSS (VmHWM, MB)", "{:.0f}"),
                                   ("anon", "of it anonymous (MB)", "{:.0f}"), ("file", "file pages (MB)", "{:.0f}"),
                                   ("workers", "workers x peak RSS (MB)", "{}"),
                                   ("total", "trainer + workers, PSS (MB)", "{:.0f}")],
                           lead=[("entries", "latents"), ("disk", "cache on disk")])
    text = ["# Resident memory of dit.train on a large latent cache", "",
            f"{machine['cpu']}, torch {machine['torch']}, {record['date']}, load average {machine['load_average']}; "
            f"{args.model}, batch {args.batch_size}, {args.steps} steps ({wall:.0f} s), {args.workers} DataLoader "
            f"workers, {args.threads} thread(s); latents {'x'.join(map(str, args.latent))} in {args.dtype}; trainer "
            f"code from {code_root}.", "", f"Command: `{record['command']}`", "", *table]
    if reads:
        text += ["", f"Random reads through `LatentCache` in one process: {reads['items_per_s']:.0f} items/s "
                     f"({reads['items']} items; the page cache may hold part of the file)."]
    written = write_report(args.out, record, "\n".join(text) + "\n")
    print("\n".join(text))
    print("wrote " + ", ".join(written))
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=500_000, help="latents in the cache (images x 2 with flips)")
    ap.add_argument("--latent", type=int, nargs=3, default=[4, 32, 32], metavar=("C", "H", "W"))
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--shard-size", type=int, default=20000, help="images per shard (configs/dit.yaml default)")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--dir", required=True, help="where the tokenizer, the cache and the run go")
    ap.add_argument("--keep", action="store_true",
                    help="keep the cache (a later run with the same --entries reuses it)")
    ap.add_argument("--model", default="DiT-S/2")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the trainer")
    ap.add_argument("--read-items", type=int, default=20000, help="random items read to time the reader")
    ap.add_argument("--code-root", default=None, help="run dit.train from this checkout (default: this one)")
    ap.add_argument("--out", default="docs/reports/cache_memory")
    return run_script(ap, run, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Sample many class-conditional images for FID, on any number of processes: a PNG folder plus the ADM sample batch.

    accelerate launch sample/sample_ddp.py --ckpt dit/assets/fmnist --num-fid-samples 10000 --cfg 2 --steps 12 \\
        --sampler heun --per-proc-batch-size 250 --out samples/fmnist_cfg2
    python eval/gfid.py configs/fmnist.yaml:test samples/fmnist_cfg2.npz --out samples/fmnist_cfg2.json

--ckpt takes whatever `dit.pipeline.load_generator` takes (a bundle directory, a DiT checkpoint); --decoder picks
one of its decoders by name, or is any decoder sample/generate.py takes (a file, a tokenizer run name, ssdd:<...>,
sdvae[:...]). Writes <out>/ (one PNG per sample, named by its index, and sampling.json with the settings) and, once
every sample exists, <out>.npz: `arr_0` uint8 (N, H, W, 3) in index order and `arr_1` the labels (the format of
guided-diffusion's samplers, which the ADM evaluator and eval/gfid.py read). Progress: a bar of the samples of all
processes and, below it, the current batch's DiT steps and decoding (dit/progress.py), each with its true rate.

Reproducibility. Sample i has class i mod num_classes (class-balanced; any num_classes consecutive samples hold
every class once, so IS splits of consecutive samples are balanced too) and its noise comes from its own CPU
generator seeded from (--seed, i) (`Generator.draw_sample_noise`; a stochastic sampler's step noise likewise). The work
is cut into fixed batches [k B, (k + 1) B) of B = --per-proc-batch-size samples, batch k going to process
k mod P: a batch always has the same members, so the images are bit-identical for any number of processes P at the
same B. Another B gives the same noise but other floating-point rounding in batched kernels: at most a level in a
few pixels.

Resuming. Each PNG is written atomically; a rerun with the same settings recomputes only the batches with a
missing PNG (whole, so their rounding is that of an uninterrupted run) and skips the rest: a killed run continues
with no duplicate and no gap. A rerun with other settings into the same --out is refused.

A non-finite sample (NaN or inf in its latent or image) is never written: it is counted and reported, its index is
listed in <out>/nonfinite.json, and the run ends with a one-line error and no .npz.
"""

import argparse
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dit.pipeline import ALL_METHODS, load_generator
from dit.progress import TqdmProgress
from eval.lib.adm_npz import write_sample_batch
from tokenizer.common.atomic import atomic_file, atomic_json, remove_stale_temporaries
from tokenizer.common.errors import UserError, run_cli
from tokenizer.common.training import make_accelerator
from tokenizer.common.validation import check_output_dir, check_sampling_args, in_range
from tokenizer.metrics import to_uint8

SETTINGS_FILE, NONFINITE_FILE = "sampling.json", "nonfinite.json"
SAME_RUN_KEYS = ("checkpoint", "decoder", "decoder_steps", "num_samples", "seed", "cfg_scale", "steps", "sampler",
                 "guidance_interval", "time_shift", "num_classes", "image_shape")


def png_name(i: int, n: int) -> str:
    return f"{i:0{max(6, len(str(n - 1)))}d}.png"


def existing_indices(folder: str) -> set:
    """Indices of the complete PNGs in `folder` (temporary files of a killed write are not counted)."""
    return {int(m.group(1)) for name in os.listdir(folder) if (m := re.fullmatch(r"(\d+)\.png", name))}


def batches_to_do(n: int, batch: int, done: set) -> list:
    """[(k, range of indices)] of the fixed batches that miss at least one PNG."""
    return [(k, range(k * batch, min(n, (k + 1) * batch))) for k in range(math.ceil(n / batch))
            if not all(i in done for i in range(k * batch, min(n, (k + 1) * batch)))]


def write_png(path: str, image: np.ndarray) -> None:
    atomic_file(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def check_settings(out: str, settings: dict) -> None:
    """Refuse to continue a run in `out` that was made with other settings (its images would not match)."""
    path = os.path.join(out, SETTINGS_FILE)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        old = json.load(f)
    changed = [k for k in SAME_RUN_KEYS if old.get(k) != settings[k]]
    if changed:
        k = changed[0]
        raise UserError(f"{out} holds samples made with other settings ({k}: {old.get(k)!r} there, {settings[k]!r} "
                        f"now); rerun with the same settings to resume, or choose another --out")
    if old.get("per_proc_batch_size") != settings["per_proc_batch_size"]:
        print(f"note: --per-proc-batch-size {settings['per_proc_batch_size']} differs from the "
              f"{old.get('per_proc_batch_size')} this run started with; the remaining images may differ from an "
              f"uninterrupted run in rounding")


def check_args(args) -> None:
    """Every argument's type and range, before any model is loaded or anything written."""
    in_range("--num-fid-samples", args.num_fid_samples, 1)
    in_range("--per-proc-batch-size", args.per_proc_batch_size, 1)
    check_sampling_args(args.cfg_scale, args.steps, args.decoder_steps, args.seed)
    check_output_dir(args.out, "--out")


def sample(args) -> dict:
    accelerator = make_accelerator("no")
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    check_args(args)
    gen = load_generator(args.ckpt, device=accelerator.device, decoder=args.decoder, ckpt_dir=args.ckpt_dir)
    decoder_name, _, default_steps = gen.pick_decoder(None)  # the one asked for, else the bundle's default
    decoder_steps = default_steps if args.decoder_steps is None else args.decoder_steps
    s = gen.sampler_settings(args.cfg_scale, args.steps, args.sampler)
    n, batch, out = args.num_fid_samples, args.per_proc_batch_size, args.out.rstrip("/")
    settings = {"checkpoint": os.path.abspath(gen.source), "decoder": decoder_name, "decoder_steps": decoder_steps,
                "num_samples": n, "seed": args.seed, **{k: s[k] for k in ("cfg_scale", "steps", "sampler")},
                "guidance_interval": list(s["guidance_interval"]), "time_shift": s["time_shift"],
                "num_classes": gen.num_classes, "image_shape": list(gen.image_shape), "per_proc_batch_size": batch,
                "labels": "i mod num_classes", "noise": "per sample, CPU generator seeded from (seed, i)"}
    os.makedirs(out, exist_ok=True)
    check_settings(out, settings)  # every process checks, so a refusal stops all of them alike
    accelerator.wait_for_everyone()
    if main:
        remove_stale_temporaries(out)  # leftovers of writes cut short by a kill
        atomic_json(os.path.join(out, SETTINGS_FILE), settings)
    accelerator.wait_for_everyone()
    todo = batches_to_do(n, batch, existing_indices(out))
    mine = todo[rank::world]
    if main:
        print(f"{gen.name} ({gen.source}) -> {decoder_name}, {decoder_steps} decoder step(s); {s['sampler']} "
              f"{s['steps']} steps, cfg {s['cfg_scale']:g}; {n} samples, {n - sum(len(r) for _, r in todo)} already "
              f"in {out}; {world} process(es) x batch {batch}", flush=True)
    dit_s = decoder_s = 0.0
    bad = []
    # the run's bar (images of every process) and, below it, the current batch's DiT steps and decoder batch
    steps_bar = TqdmProgress(leave=False, position=1, disable=not main)
    with tqdm(total=sum(len(r) for _, r in todo), desc="sampling", unit="img", disable=not main, position=0) as bar:
        for _, indices in mine:
            y = torch.tensor([i % gen.num_classes for i in indices])
            noise, decoder_noise = gen.draw_sample_noise(indices, args.seed)
            step_noise = gen.step_noise(indices, args.seed)  # used only by stochastic samplers
            z, t = gen.sample_latents(y, noise, s, args.seed, batch_size=len(indices), step_noise=step_noise,
                                      progress=steps_bar)
            images, dec = gen.decode(z, decoder_noise, decoder_name, decoder_steps, batch_size=len(indices),
                                     progress=steps_bar)
            dit_s, decoder_s = dit_s + t, decoder_s + dec["decoder_s"]
            finite = (torch.isfinite(z.flatten(1)).all(1).cpu() & dec["finite"]).tolist()
            pixels = to_uint8(images)
            for j, i in enumerate(indices):
                if finite[j]:
                    write_png(os.path.join(out, png_name(i, n)), pixels[j])
                else:
                    bad.append(i)
            bar.update(min(len(indices) * world, bar.total - bar.n))
            if bad:
                bar.set_postfix_str(f"{len(bad)} non-finite")
    steps_bar.close()
    accelerator.wait_for_everyone()
    if not main:
        return {}
    missing = sorted(set(range(n)) - existing_indices(out))
    if missing:
        atomic_json(os.path.join(out, NONFINITE_FILE), missing)
        raise UserError(f"{len(missing)} of {n} samples were not finite (NaN or inf; first: {missing[:5]}) and were "
                        f"not written; their indices are in {os.path.join(out, NONFINITE_FILE)}; no .npz was written")
    if os.path.exists(os.path.join(out, NONFINITE_FILE)):
        os.remove(os.path.join(out, NONFINITE_FILE))
    labels = np.arange(n) % gen.num_classes
    h, w = gen.image_shape[1:]

    def read(i):
        with Image.open(os.path.join(out, png_name(i, n))) as im:
            a = np.asarray(im.convert("RGB"))
        if a.shape != (h, w, 3):
            raise UserError(f"{png_name(i, n)} in {out} is {a.shape}, not the generator's ({h}, {w}, 3)")
        return a

    t0 = time.perf_counter()
    write_sample_batch(out + ".npz", (read(i) for i in tqdm(range(n), desc="npz", unit="img")), n, (h, w, 3), labels)
    print(f"wrote {out}.npz (arr_0 uint8 {n}x{h}x{w}x3, arr_1 labels) in {time.perf_counter() - t0:.1f} s; "
          f"this process: DiT {dit_s:.1f} s, decoder {decoder_s:.1f} s for {sum(len(r) for _, r in mine)} samples")
    return {"npz": out + ".npz", "dit_s": dit_s, "decoder_s": decoder_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=None, help="bundle directory or DiT checkpoint (default: the embedded bundle)")
    ap.add_argument("--num-fid-samples", type=int, default=50000)
    ap.add_argument("--cfg", dest="cfg_scale", type=float, default=None, help="guidance scale (default: the bundle's)")
    ap.add_argument("--steps", type=int, default=None, help="DiT sampling steps (default: the bundle's)")
    ap.add_argument("--sampler", choices=ALL_METHODS, default=None,
                    help="default: the model's (this project's DiT: a flow sampler; DiT-XL/2: ddpm or ddim; "
                         "SiT: sde or ode)")
    ap.add_argument("--decoder", default=None,
                    help="a decoder name of the bundle (e.g. KL-VAE), a decoder checkpoint file, a tokenizer run name "
                         "<run>[@best] under --ckpt-dir, ssdd:<file or released name>, sdvae[:<file or name>]")
    ap.add_argument("--ckpt-dir", default="runs", help="where --decoder run names are looked up (<dir>/jobs/<run>)")
    ap.add_argument("--decoder-steps", type=int, default=None, help="default: the decoder's (1 when distilled)")
    ap.add_argument("--per-proc-batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="samples/NAME: writes the folder samples/NAME/ and samples/NAME.npz")
    return run_cli(sample, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

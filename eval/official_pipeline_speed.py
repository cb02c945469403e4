"""Time of the whole class-to-image pipeline of the published generators: DiT-XL/2 sampling, then SD-VAE's decoder or
an SSDD decoder on SD-VAE latents, and the speed-up of the pipeline that a one-step SSDD decoder gives.

    python eval/official_pipeline_speed.py --out docs/reports/official_pipeline_cpu              # CPU, 1 image
    python eval/official_pipeline_speed.py --device cuda --images 4 --measure-steps 250 \
        --out docs/reports/official_pipeline_h100

Weights are random (speed does not depend on their values; docs/ARCHITECTURE.md §10): DiT-XL/2 at 256 px (32x32x4
SD-VAE latents, learn_sigma, 1000 classes, t_scale 1, as the released file), the SD-VAE KL decoder (49.5 M) and the
SSDD decoders of the sizes asked (--ssdd, decoded in --ssdd-steps steps), all behind `dit.pipeline.Generator`, so the
timed code is the code `sample/generate.py` runs (DiT's respaced DDPM with guidance on 3 channels, cfg 4).

DiT-XL/2 with guidance costs seconds per step on a CPU, so the script times `--measure-steps` sampler steps (one
`sample_latents` call of that many respaced steps, after one untimed warm-up call of 1 step) and computes the DiT
time of each `--steps` count as steps x the measured time per step; it says so in the report. With
--measure-steps equal to a --steps value that row is measured whole. Each decoder is timed --repeats times after
one warm-up; the median counts. Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from dit.models import build_dit
from dit.official import FAMILY_DEFAULTS
from dit.pipeline import Generator, imagenet_class_names
from eval.lib.report import command_line, load_average, machine_info, markdown_table, run_script, today, write_report
from tokenizer import SSDD, UserError
from tokenizer.common.devices import pick_device
from tokenizer.latent_stats import fixed_z_stats


def build_generator(model_name: str, image_size: int, ssdd_sizes, ssdd_steps: int, device) -> Generator:
    """A DiT-family generator (default DiT-XL/2) with random weights and the SD-VAE + SSDD decoders, all random."""
    torch.manual_seed(0)
    grid = image_size // 8
    model = build_dit(model_name, input_size=grid, in_channels=4, num_classes=1000, learn_sigma=True, t_scale=1.0)
    with torch.no_grad():  # off the zero init, so the latents handed to the decoders are not all zero
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    decoders = {}
    sdvae = SSDD(encoder="sdvae", decoder="kl")
    sdvae.sdvae_pending = None  # random weights stand in for SD-VAE's: nothing to fetch
    decoders["SD-VAE"] = (sdvae.eval().requires_grad_(False), 1)
    for size in ssdd_sizes:
        dec = SSDD(encoder="sdvae", decoder=size)
        dec.sdvae_pending = None
        decoders[f"SSDD-{size} {ssdd_steps}-step"] = (dec.eval().requires_grad_(False), ssdd_steps)
    stats = fixed_z_stats("sdvae")
    gen = Generator(model=model.eval().requires_grad_(False), decoders=decoders, class_names=imagenet_class_names(),
                    z_mean=stats["z_mean"], z_std=stats["z_std"], latent_shape=(4, grid, grid),
                    defaults=dict(FAMILY_DEFAULTS["dit"]), name=f"{model_name} (random weights)", family="dit")
    return gen.to(device)


def run(args) -> dict:
    device = pick_device(args.device)
    if args.images < 1 or args.measure_steps < 1 or args.repeats < 1 or min(args.steps) < 1:
        raise UserError("--images, --measure-steps, --repeats and --steps must be >= 1")
    if args.image_size % 64:
        raise UserError(f"--image-size must be a multiple of 64 (SD-VAE f8 latents, patch 2, SSDD tokens), got "
                        f"{args.image_size}")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = load_average()  # a shared CPU slows every timing: recorded at both ends
    t0 = time.perf_counter()
    gen = build_generator(args.model, args.image_size, args.ssdd, args.ssdd_steps, device)
    print(f"built {args.model} + {len(gen.decoders)} decoders in {time.perf_counter() - t0:.0f} s", flush=True)
    y = torch.full((args.images,), 207, dtype=torch.long)
    noise, decoder_noise = gen.draw_noise(args.images, seed=0)
    decoder_noise = decoder_noise.to(device)  # on the device before the timed decodes: copying it is not decoding
    settings = gen.sampler_settings(cfg_scale=args.cfg, steps=1, sampler="ddpm")
    gen.sample_latents(y, noise, settings)  # warm-up (allocations, kernels)
    settings = gen.sampler_settings(cfg_scale=args.cfg, steps=args.measure_steps, sampler="ddpm")
    z, dit_measured_s = gen.sample_latents(y, noise, settings)
    per_step = dit_measured_s / args.measure_steps
    print(f"{args.model}: {dit_measured_s:.1f} s for {args.measure_steps} steps ({per_step:.2f} s/step, "
          f"{args.images} image(s), cfg {args.cfg})", flush=True)
    decode = {}
    for name in gen.decoder_names:
        gen.decode(z, decoder_noise, name)  # warm-up
        times = [gen.decode(z, decoder_noise, name)[1]["decoder_s"] for _ in range(args.repeats)]
        decode[name] = {"decoder_s": statistics.median(times), "all_s": times,
                        "params": sum(p.numel() for p in gen.decoders[name][0].decoder.parameters())}
        print(f"{name}: {decode[name]['decoder_s']:.2f} s (median of {args.repeats})", flush=True)
    base = decode["SD-VAE"]["decoder_s"]
    rows = []
    for steps in args.steps:
        dit_s = per_step * steps
        measured = steps == args.measure_steps
        for name, d in decode.items():
            total = dit_s + d["decoder_s"]
            rows.append({"dit_steps": steps, "decoder": name, "dit_s": dit_s, "dit_timing": "measured" if measured
                         else f"{steps} x {per_step:.2f} s/step", "decoder_s": d["decoder_s"], "total_s": total,
                         "decoder_speedup": base / d["decoder_s"], "pipeline_speedup": (dit_s + base) / total})
    record = {"date": today(), "command": command_line("eval/official_pipeline_speed.py", args.argv),
              "machine": machine_info(device), "load_average_start": load_start, "model": args.model,
              "image_size": args.image_size, "images": args.images, "cfg_scale": args.cfg,
              "sampler": "ddpm (DiT's respaced DDPM, learned variance, guidance on 3 of 4 channels)",
              "measured_dit_steps": args.measure_steps, "dit_s_measured": dit_measured_s, "dit_s_per_step": per_step,
              "decoders": decode, "rows": rows}
    extrapolated = any(r["dit_timing"] != "measured" for r in rows)
    table = markdown_table(rows, [("dit_s", "DiT (s)", "{:.1f}"), ("decoder_s", "decoder (s)", "{:.2f}"),
                                  ("total_s", "pipeline (s)", "{:.1f}"),
                                  ("decoder_speedup", "decoder speed-up", "{:.2f}x"),
                                  ("pipeline_speedup", "pipeline speed-up", "{:.3f}x")],
                           lead=[("dit_steps", "DiT steps"), ("decoder", "decoder"), ("dit_timing", "DiT time from")])
    m = record["machine"]
    md = "\n".join([
        f"# {args.model} + decoder: time of the whole pipeline", "",
        f"{record['date']}; {m['cpu']} ({m['cpus']} CPUs, {m['torch_threads']} torch threads)"
        f"{', ' + m['gpu'] if m['gpu'] else ''}, device {m['device']}, torch {m['torch']}, load average "
        f"{load_start} at the start and {m['load_average']} at the end (1, 5, 15 min). Random weights, "
        f"{args.image_size} px, {args.images} image(s), class 207, cfg {args.cfg}, fp32. "
        f"Command: `{record['command']}`", "",
        (f"DiT time: {args.measure_steps} respaced DDPM steps measured in one call ({dit_measured_s:.1f} s, "
         f"{per_step:.2f} s/step); the rows for other step counts are that per-step time multiplied, not measured "
         f"whole." if extrapolated else "DiT time: measured whole for every row."),
        "Decoder time: median of the repeats after a warm-up. Speed-ups are against the SD-VAE decoder row of the "
        "same DiT step count.", "", *table, ""])
    write_report(args.out, record, md)
    print(md)
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="DiT-XL/2", help="DiT size (the released generators are DiT-XL/2)")
    ap.add_argument("--image-size", type=int, default=256, help="pixels (SD-VAE latents of size / 8)")
    ap.add_argument("--images", type=int, default=1, help="images per call (one class-207 batch)")
    ap.add_argument("--steps", type=int, nargs="+", default=[250, 50], help="DiT step counts to report")
    ap.add_argument("--measure-steps", type=int, default=3, help="DiT steps actually run and timed")
    ap.add_argument("--cfg", type=float, default=4.0, help="guidance scale (4.0: DiT's sample.py)")
    ap.add_argument("--ssdd", nargs="+", default=["M"], help="SSDD decoder sizes on SD-VAE latents")
    ap.add_argument("--ssdd-steps", type=int, default=1, help="SSDD decoder steps (1: distilled)")
    ap.add_argument("--repeats", type=int, default=3, help="timed decodes per decoder")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="docs/reports/official_pipeline_cpu")
    return run_script(ap, run, argv)


if __name__ == "__main__":
    sys.exit(main())

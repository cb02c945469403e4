"""DiT training throughput: steps/s and images/s of one full training step, and the model FLOP utilisation.

    python eval/dit_throughput.py --model DiT-S/2 --batch-size 32 --device cpu --out docs/reports/dit_throughput_cpu
    python eval/dit_throughput.py --model DiT-S/2 DiT-B/2 DiT-L/2 DiT-XL/2 --batch-size 128 --device cuda \
        --out docs/reports/dit_throughput_h100         # bf16 autocast, torch.compile, fused AdamW, TF32 on CUDA

The step is the one dit.train runs, on random latents of the given shape: flow-matching loss (uniform t, label
dropout 0.1), backward, AdamW (the trainer's `build_optimizer`: fused on CUDA), the EMA update, and a grad clip
only with --grad-clip (DiT clips nothing). On CUDA: bf16 autocast, TF32 and torch.compile of the DiT (as
`training.compile`), with SDPA attention (timm's fused path: FlashAttention for bf16 on recent GPUs); on CPU fp32
and eager unless asked. After --warmup steps, --iters steps are timed one by one (CUDA synchronised); the median
gives steps/s. FLOPs: the matmul and attention FLOPs of one forward pass counted analytically (`dit_forward_flops`,
checked against torch's FLOP counter in the tests) times 3 for forward + backward; MFU divides the achieved
FLOP/s by the GPU's dense bf16 peak (`eval.lib.flops.PEAK_TFLOPS`, or --peak-tflops). Writes <out>.json and <out>.md.
"""

import argparse
import statistics
import sys

import torch

from dit.models import DiT_models
from eval.lib.flops import datasheet_peak_tflops
from eval.lib.report import command_line, machine_info, markdown_table, run_script, today, write_report
from eval.lib.train_steps import dit_forward_flops, dit_train_step
from tokenizer.common.devices import AUTOCAST_DTYPES, autocast_dtype, pick_device, timed
from tokenizer.common.errors import UserError
from tokenizer.common.training import enable_tf32


def peak_tflops(device: torch.device, override: float | None):
    if override is not None:
        return override, "--peak-tflops"
    return datasheet_peak_tflops(device)


def measure(name: str, latent, batch: int, device: torch.device, args) -> dict:
    train = dit_train_step(name, latent, batch, device, args.amp_dtype, args.compile, num_classes=args.num_classes,
                           learn_sigma=args.learn_sigma, ema=args.ema, grad_clip=args.grad_clip)
    model = train.model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup_s = timed(lambda: [train.run(i) for i in range(args.warmup)], device)
    times = [timed(lambda i=i: train.run(args.warmup + i), device) for i in range(args.iters)]
    med = statistics.median(times)
    flops = dit_forward_flops(model, latent, batch)
    train_flops = 3 * flops["total"]  # backward = 2 x forward for every matrix product
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    achieved = train_flops / med / 1e12
    return {
        "model": name, "latent": list(latent), "batch_size": batch,
        "params": sum(p.numel() for p in model.parameters()), "tokens": model.x_embedder.num_patches,
        "precision": f"{args.dtype_name} autocast" if args.amp_dtype is not None else "fp32",
        "compile": bool(args.compile), "ema": bool(args.ema), "fused_adamw": train.info["fused_adamw"],
        "step_s_median": med, "step_s_mean": statistics.mean(times), "step_s_min": min(times),
        "steps_per_s": 1 / med, "images_per_s": batch / med, "warmup": args.warmup, "warmup_s": warmup_s,
        "iters": args.iters, "train_tflop_per_step": train_flops / 1e12, "achieved_tflops": achieved,
        "peak_tflops": peak, "peak_source": peak_source, "mfu": achieved / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def run(args) -> list:
    device = pick_device(args.device)
    if args.iters < 1 or args.warmup < 0:
        raise UserError("--iters must be >= 1 and --warmup >= 0")
    unknown = [m for m in args.model if m not in DiT_models]
    if unknown:
        raise UserError(f"unknown DiT model {unknown[0]!r}; valid names: {', '.join(DiT_models)}")
    args.amp_dtype, args.dtype_name = autocast_dtype(args.dtype, device)
    if args.compile is None:  # as training.compile: on for CUDA, off on a CPU (compiling would dominate)
        args.compile = device.type == "cuda"
    enable_tf32()
    rows = []
    for model in args.model:
        for bs in args.batch_size:
            r = measure(model, args.latent, bs, device, args)
            mfu = f", MFU {100 * r['mfu']:.1f} %" if r["mfu"] is not None else ""
            print(f"{model} latent {tuple(args.latent)} batch {bs}: {r['steps_per_s']:.3g} steps/s, "
                  f"{r['images_per_s']:.1f} images/s ({r['precision']}{', compiled' if r['compile'] else ''}"
                  f"{mfu})", flush=True)
            rows.append(r)
    machine = machine_info(device)
    record = {"machine": machine, "date": today(), "command": command_line("eval/dit_throughput.py", args.argv),
              "results": rows}
    where = machine["gpu"] or f"{machine['cpu']}, {machine['torch_threads']} torch threads"
    for r in rows:
        r["step_ms"] = 1000 * r["step_s_median"]
        r["mfu_pct"] = 100 * r["mfu"] if r["mfu"] is not None else None
        r["params_m"] = r["params"] / 1e6
    table = markdown_table(rows, [("params_m", "params (M)", "{:.1f}"), ("tokens", "tokens", "{}"),
                                  ("batch_size", "batch", "{}"), ("precision", "precision", "{}"),
                                  ("compile", "compiled", "{}"), ("step_ms", "median step (ms)", "{:.0f}"),
                                  ("steps_per_s", "steps/s", "{:.3g}"), ("images_per_s", "images/s", "{:.1f}"),
                                  ("achieved_tflops", "TFLOP/s", "{:.3g}"), ("mfu_pct", "MFU %", "{:.1f}"),
                                  ("peak_memory_gib", "peak GiB", "{:.1f}")], lead=[("model", "model")])
    text = ["# DiT training throughput", "",
            f"One training step (flow-matching loss, backward, AdamW{', EMA' if args.ema else ''}"
            f"{', grad clip' if args.grad_clip else ''}) on random latents {'x'.join(map(str, args.latent))}; "
            f"{where}, torch {machine['torch']}, {record['date']}. Median of {args.iters} steps after {args.warmup} "
            f"warm-up steps; load average {machine['load_average']} at the end (1, 5, 15 min). FLOPs: 3 x the "
            f"forward matmul + attention FLOPs; MFU against {rows[0]['peak_source'] or 'no known peak (n/a)'}.", "",
            f"Command: `{record['command']}`", "", *table]
    written = write_report(args.out, record, "\n".join(text) + "\n")
    print("wrote " + ", ".join(written))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", default=["DiT-S/2"], help="DiT-{S,B,L,XL}/{1,2,4,8} or DiT-Ti/*")
    ap.add_argument("--latent", type=int, nargs=3, default=[4, 32, 32], metavar=("C", "H", "W"),
                    help="latent shape (ImageNet 256 px with f8c4: 4 32 32)")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[32])
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=True,
                    help="DiT's 2C output channels (configs/dit.yaml default; dit_fmnist uses --no-learn-sigma)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="auto", choices=["auto", *AUTOCAST_DTYPES],
                    help="autocast dtype; auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the DiT (default: on for CUDA, off on CPU)")
    ap.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA update every step")
    ap.add_argument("--grad-clip", type=float, default=None, help="max grad norm (DiT: none)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for the MFU (default: known GPUs)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default="docs/reports/dit_throughput")
    return run_script(ap, run, argv)


if __name__ == "__main__":
    sys.exit(main())

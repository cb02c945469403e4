"""DiT training throughput: images/s of one full training step (forward + backward + AdamW step).

    python eval/dit_throughput.py --model DiT-S/2 --latent 4 32 32 --batch-size 32 --device cpu \
        --out docs/dit_throughput_cpu
    python eval/dit_throughput.py --model DiT-XL/2 --batch-size 32 64 --device cuda --out docs/dit_throughput_h100

The step is the one dit.train runs: flow-matching loss (logit-normal t, label dropout 0.1), backward, grad clip,
AdamW, on random latents of the given shape; bf16 autocast on CUDA, fp32 on CPU. After --warmup steps, --iters
steps are timed one by one (CUDA synchronised); the median gives images/s. Writes <out>.json and <out>.md.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from dit.flow import training_loss
from dit.models import build_dit
from tokenizer.errors import UserError, run_cli


def measure(name: str, latent, batch: int, device: torch.device, warmup: int, iters: int, num_classes: int,
            learn_sigma: bool) -> dict:
    c, h, w = latent
    torch.manual_seed(0)
    model = build_dit(name, input_size=(h, w), in_channels=c, num_classes=num_classes, learn_sigma=learn_sigma).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    amp = device.type == "cuda"
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, c, h, w, device=device, generator=g)
    y = torch.randint(0, num_classes, (batch,), device=device, generator=g)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step():
        drop = (torch.rand(batch, device=device, generator=g) < 0.1).long()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = training_loss(lambda a, t, b: model(a, t, b, force_drop_ids=drop), x, y, generator=g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "model": name, "latent": list(latent), "batch_size": batch, "params": sum(p.numel() for p in model.parameters()),
        "tokens": model.x_embedder.num_patches, "precision": "bf16 autocast" if amp else "fp32",
        "step_s_median": med, "step_s_mean": statistics.mean(times), "step_s_min": min(times),
        "images_per_s": batch / med, "warmup": warmup, "iters": iters,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def run(args) -> list:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available")
    if args.iters < 1 or args.warmup < 0:
        raise UserError("--iters must be >= 1 and --warmup >= 0")
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                    f"{torch.get_num_threads()} torch threads")
    rows = []
    for model in args.model:
        for bs in args.batch_size:
            r = measure(model, args.latent, bs, device, args.warmup, args.iters, args.num_classes, args.learn_sigma)
            print(f"{model} latent {tuple(args.latent)} batch {bs}: {r['images_per_s']:.1f} images/s "
                  f"(median step {1000 * r['step_s_median']:.0f} ms, {r['precision']})", flush=True)
            rows.append(r)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None  # other jobs on a shared CPU slow the steps
    result = {"device": str(device), "machine": machine, "torch": torch.__version__, "load_average_1_5_15": load,
              "date": time.strftime("%Y-%m-%d %H:%M"), "command": "python eval/dit_throughput.py " + " ".join(sys.argv[1:]),
              "results": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = ["# DiT training throughput", "",
             f"One training step (flow-matching loss, backward, grad clip, AdamW) on random latents; {machine} "
             f"({result['device']}), torch {torch.__version__}, {result['date']}. Median of {args.iters} steps after "
             f"{args.warmup} warm-up steps" + (f"; load average {load[0]:.1f} at the end (a shared machine)" if load else "")
             + f". Command: `{result['command']}`", "",
             "| model | params | latent | tokens | batch | precision | median step (ms) | images/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f} M | {'x'.join(map(str, r['latent']))} | {r['tokens']} | "
                     f"{r['batch_size']} | {r['precision']} | {1000 * r['step_s_median']:.0f} | {r['images_per_s']:.1f} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}.json and {args.out}.md")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", default=["DiT-S/2"])
    ap.add_argument("--latent", type=int, nargs=3, default=[4, 32, 32], metavar=("C", "H", "W"))
    ap.add_argument("--batch-size", type=int, nargs="+", default=[32])
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=True,
                    help="DiT's 2C output channels (configs/dit.yaml default; dit_fmnist uses --no-learn-sigma)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default="docs/dit_throughput")
    return run_cli(run, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

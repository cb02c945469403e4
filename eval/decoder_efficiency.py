"""Decoder efficiency: FLOPs per image, achieved FLOP/s beside the machine's measured matmul peak, and throughput
ratios, for SSDD decoders against the SD-VAE-sized KL-VAE decoders (ours and diffusers'), all in one run.

    OMP_NUM_THREADS=1 python eval/decoder_efficiency.py --out docs/reports/decoder_efficiency_cpu
    # defaults: SSDD-S and SSDD-M in 1 step, our KL-VAE decoder and diffusers' AutoencoderKL decoder (base width 128,
    # the SD-VAE's; both upsample the classic way), and ours again with SSDD's sub-pixel upsampling (what the same
    # exact shortcut would give the baseline), 256 px, batch 1 and 4, fp32, one thread on a CPU
    python eval/decoder_efficiency.py --device cuda --batch-sizes 1 32 --out docs/reports/decoder_efficiency_gpu
    # is the sub-pixel upsampling faster on this device too? SSDD-M both ways, in one run
    python eval/decoder_efficiency.py --decoders M M-nearest kl diffusers --out docs/reports/decoder_upsampling

Weights are random (speed does not depend on them). diffusers is an optional extra: without it its row is left out
with a note. Each decoder's FLOPs are counted by torch's counter (eval/lib/flops.py: matrix products, convolutions,
attention; element-wise work is not counted) over one decode at the smallest batch, divided by the batch; that call
also warms the decoder up. The latents and SSDD's starting noise are drawn on the device before any timing. Then
every (decoder, batch) call takes turns (eval/lib/timing.py: one call of each, --warmup untimed rounds, then
--repeats timed ones), so a shared machine's drifting load weighs on all alike and the ratios hold; each time is the
median of its rounds. Achieved GFLOP/s = counted GFLOP per image x images/s. The peak is a large matrix product in
the run's precision (fp32 on a CPU, on the run's threads; the autocast dtype on a GPU), timed five times at the start
and at the end of the run and once after every decoder call of the timed rounds: the best of all is the machine's
peak, beside which each decoder's GFLOP/s is put; the median of those taken in turns is recorded as what the load of
a shared machine left the product (short products vary more than long decoder calls, so it is context, not a
ceiling). Writes <out>.json, <out>.md and <out>.png (achieved GFLOP/s per decoder and batch, the peak as a line).
"""

import argparse
import statistics
import sys
import time

import torch

from eval.lib.decoders import DIFFUSERS, KL_SUBPIXEL, DecoderUnavailable, build_decode_fn, decoder_inputs
from eval.lib.flops import count_flops_by_op, matmul_call, matmul_peak
from eval.lib.report import command_line, load_average, machine_info, run_script, save_figure, today, write_report
from eval.lib.timing import inference, take_turns
from tokenizer.common.devices import AUTOCAST_DTYPES, autocast_dtype, pick_device
from tokenizer.common.errors import UserError
from tokenizer.common.training import enable_tf32
from tokenizer.decoder import DECODER_SIZES
from tokenizer.encoder import parse_encoder_name

KL_DECODERS = ("kl", KL_SUBPIXEL, DIFFUSERS)
NOISY_SPREAD = 1.5  # slowest / fastest timed call above this marks a row as disturbed


def canonical(name: str) -> str:
    low = str(name).lower()
    if low in KL_DECODERS:
        return low
    size, dash, mode = str(name).partition("-")
    if size.upper() in DECODER_SIZES and (not dash or mode.lower() == "nearest"):
        return size.upper() + (dash and "-nearest")
    raise UserError(f"unknown decoder {name!r}: choose from {', '.join(KL_DECODERS)}, {', '.join(DECODER_SIZES)} "
                    f"(an SSDD size may end in -nearest)")


def label(decoder: str, steps: int, kl_base: int) -> str:
    if decoder == "kl":
        return f"KL-VAE (ours, base {kl_base})"
    if decoder == KL_SUBPIXEL:
        return f"KL-VAE (ours, base {kl_base}, sub-pixel upsampling)"
    if decoder == DIFFUSERS:
        return f"AutoencoderKL (diffusers, base {kl_base})"
    size, _, mode = decoder.partition("-")
    return f"SSDD-{size} {steps}-step" + (f" ({mode} upsampling)" if mode else "")


def ratio_lines(rows: list) -> list:
    """Each SSDD row's throughput against each KL-VAE row of the same batch (same run)."""
    lines = []
    for r in rows:
        if r["decoder"] in KL_DECODERS:
            continue
        for kl in rows:
            if kl["decoder"] in KL_DECODERS and kl["batch"] == r["batch"]:
                mark = " *" if max(r["spread"], kl["spread"]) > NOISY_SPREAD else ""
                lines.append(f"- {r['label']} vs {kl['label']}, batch {r['batch']}: "
                             f"**{r['images_per_s'] / kl['images_per_s']:.2f}x** the throughput{mark} "
                             f"({r['gflop_per_image'] / kl['gflop_per_image']:.2f}x the counted FLOPs per image)")
    return lines


def markdown(record: dict) -> str:
    m, s, p = record["machine"], record["settings"], record["peak"]
    where = m["gpu"] or f"{m['cpu']}, {m['torch_threads']} torch thread(s)"
    threads = "" if p["threads"] is None else f", {p['threads']} thread(s)"
    lines = [f"# Decoder efficiency ({where})", "",
             f"{record['date']}, torch {m['torch']}, {s['dtype']}, {s['size']} px, encoder {s['encoder']}, random "
             f"weights; warm-up {s['warmup']} round(s), median of {s['repeats']} rounds taken in turns. Load average "
             f"(1, 5, 15 min) {m['load_average']} at the start, {record['load_average_end']} at the end.", "",
             f"Command: `{record['command']}`", "",
             f"Measured matmul peak: **{p['gflops']:.1f} GFLOP/s** ({p['n']}x{p['n']} {p['dtype']} products"
             f"{threads}; best call: {p['start_gflops']:.1f} at the start, {p['end_gflops']:.1f} at the end, "
             f"{p['in_turns_best_gflops']:.1f} in turns with the decoders; the median of the {p['in_turns_calls']} "
             f"taken in turns, one after each timed decoder call: {p['in_turns_gflops']:.1f}, what the machine's "
             "load left a short product).", "",
             "| decoder | params | batch | GFLOP/image | images/s | ms/image | GFLOP/s | of the peak |",
             "|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        mark = " *" if r["spread"] > NOISY_SPREAD else ""
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.1f} M | {r['batch']} | {r['gflop_per_image']:.1f} | "
                     f"{r['images_per_s']:.4g}{mark} | {r['ms_per_image']:.1f} | {r['gflops']:.1f} | "
                     f"{100 * r['peak_fraction']:.0f} % |")
    lines += ["", "Throughput ratios (same run, same batch):", "", *(record["ratios"] or ["- none"])]
    lines += ["", "Where the counted FLOPs are (share of each decoder's count):", ""]
    for name, ops in record["flops_by_op"].items():
        total = sum(ops.values()) or 1
        parts = ", ".join(f"{op.removeprefix('aten.')} {100 * v / total:.0f} %"
                          for op, v in sorted(ops.items(), key=lambda kv: -kv[1]))
        lines.append(f"- {name}: {parts}")
    if any(r["spread"] > NOISY_SPREAD for r in record["rows"]):
        lines += ["", f"\\* the slowest timed call took more than {NOISY_SPREAD}x the fastest (shared machine; "
                  "`times_s` in the JSON)."]
    if record["notes"]:
        lines += ["", "Notes:", "", *[f"- {n}" for n in record["notes"]]]
    lines += ["", f"![achieved GFLOP/s]({record['plot'].rsplit('/', 1)[-1]})", ""]
    return "\n".join(lines)


def plot(path: str, record: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.6))
    names = [f"{r['label']}, batch {r['batch']}" for r in rows]
    ax.barh(names, [r["gflops"] for r in rows], color=["C1" if r["decoder"] in KL_DECODERS else "C0" for r in rows])
    ax.axvline(record["peak"]["gflops"], color="k", linestyle="--", label="measured matmul peak")
    ax.invert_yaxis()
    ax.set_xlabel("achieved GFLOP/s (counted FLOPs x images/s)")
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    m, s = record["machine"], record["settings"]
    ax.set_title(f"Decoders at {s['size']} px, {s['dtype']} ({m['gpu'] or 'CPU, %d thread(s)' % m['torch_threads']})",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def run(args) -> dict:
    decoders = list(dict.fromkeys(canonical(d) for d in args.decoders))
    f = parse_encoder_name(args.encoder)[0]
    if args.size < 1 or args.size % max(f, 8):
        raise UserError(f"--size must be a positive multiple of {max(f, 8)} for {args.encoder}, got {args.size}")
    if min(args.batch_sizes) < 1 or args.steps < 1 or args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        raise UserError("--batch-sizes, --steps, --repeats and --threads must be >= 1, --warmup >= 0")
    device = pick_device(args.device)
    amp_dtype, dtype_name = autocast_dtype(args.dtype, device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    else:
        enable_tf32()
    machine = machine_info(device)
    t0 = time.perf_counter()
    peak_dtype = amp_dtype or torch.float32
    peak_start = matmul_peak(device, peak_dtype, args.peak_size)
    print(f"matmul peak at the start: {1000 * peak_start['tflops']:.1f} GFLOP/s", flush=True)

    built, notes = {}, []
    for d in decoders:
        try:
            built[d] = build_decode_fn(d, args.encoder, args.kl_base_channels, device, compile_=False)
        except DecoderUnavailable as e:
            notes.append(f"{label(d, args.steps, args.kl_base_channels)} left out: {e}")
    if not built:
        raise UserError("no decoder could be built: " + "; ".join(notes))
    batches = sorted(set(args.batch_sizes))
    latent = next(iter(built.values()))[2]
    inputs = {b: decoder_inputs(b, latent, args.size, device) for b in batches}  # shared by every decoder

    def call(d, b):
        fn = built[d][0]
        z, noise = inputs[b]
        return inference(lambda: fn(z, noise, args.steps), device, amp_dtype)

    flops, by_op = {}, {}
    for d in built:  # counted once, at the smallest batch (no operation of these decoders mixes images)
        total, ops = count_flops_by_op(call(d, batches[0]))
        flops[d] = total / batches[0]
        by_op[label(d, args.steps, args.kl_base_channels)] = ops
        print(f"{label(d, args.steps, args.kl_base_channels)}: {flops[d] / 1e9:.1f} GFLOP per image", flush=True)
    matmul, matmul_flop = matmul_call(device, peak_dtype, args.peak_size)
    calls = {}
    for d in built:
        for b in batches:  # each decoder call followed by a matrix product, which then meets the same load
            calls[(d, b)] = call(d, b)
            calls[("matmul", d, b)] = matmul
    times = take_turns(calls, args.repeats, device, warmup=args.warmup, progress="rounds")
    peak_end = matmul_peak(device, peak_dtype, args.peak_size)
    in_turns = [matmul_flop / t / 1e12 for key, ts in times.items() if key[0] == "matmul" for t in ts]
    peak_tflops = max(peak_start["tflops"], peak_end["tflops"], *in_turns)
    in_turns_tflops = statistics.median(in_turns)

    rows = []
    for (d, b), t in ((k, t) for k, t in times.items() if k[0] != "matmul"):
        median = statistics.median(t)
        ips = b / median
        gflops = flops[d] / 1e9 * ips
        rows.append({"decoder": d, "label": label(d, args.steps, args.kl_base_channels),
                     "steps": 1 if d in KL_DECODERS else args.steps, "batch": b, "params": built[d][1],
                     "gflop_per_image": flops[d] / 1e9, "median_s": median, "times_s": [round(x, 5) for x in t],
                     "spread": round(max(t) / min(t), 3), "images_per_s": ips, "ms_per_image": 1000 * median / b,
                     "gflops": gflops, "peak_fraction": gflops / (1000 * peak_tflops)})
    record = {"machine": machine, "date": today(), "command": command_line("eval/decoder_efficiency.py", args.argv),
              "settings": {"size": args.size, "batch_sizes": batches, "steps": args.steps, "encoder": args.encoder,
                           "kl_base_channels": args.kl_base_channels, "dtype": dtype_name, "warmup": args.warmup,
                           "repeats": args.repeats, "device": str(device)},
              "peak": {"gflops": 1000 * peak_tflops, "start_gflops": 1000 * peak_start["tflops"],
                       "end_gflops": 1000 * peak_end["tflops"], "in_turns_gflops": 1000 * in_turns_tflops,
                       "in_turns_best_gflops": 1000 * max(in_turns), "in_turns_calls": len(in_turns),
                       "n": peak_start["n"], "dtype": peak_start["dtype"], "threads": peak_start["threads"],
                       "start": peak_start, "end": peak_end},
              "rows": rows, "ratios": ratio_lines(rows), "flops_by_op": by_op, "notes": notes,
              "note": "random weights; FLOPs by torch's counter (matrix products, convolutions, attention)",
              "plot": args.out + ".png", "load_average_end": load_average(),
              "seconds": round(time.perf_counter() - t0, 1)}
    plot(record["plot"], record)
    md = markdown(record)
    written = write_report(args.out, record, md)
    print(md)
    print("wrote " + ", ".join([*written, record["plot"]]))
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--decoders", nargs="+", default=["S", "M", "kl", DIFFUSERS, KL_SUBPIXEL],
                    help=f"SSDD sizes ({', '.join(DECODER_SIZES)}; M-nearest: M with its upsamplings computed as "
                         "written, not sub-pixel), kl (ours), {DIFFUSERS} (AutoencoderKL) and/or "
                         f"{KL_SUBPIXEL} (ours with SSDD's sub-pixel upsampling: what the same shortcut gives the "
                         "baseline)")
    ap.add_argument("--steps", type=int, default=1, help="SSDD sampler steps (the KL-VAEs: always one pass)")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--encoder", default="f8c4", help="latent format f<F>c<C>")
    ap.add_argument("--kl-base-channels", type=int, default=128, help="KL-VAE width (SD-VAE: 128)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds after the counting call")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (the peak is measured on them)")
    ap.add_argument("--peak-size", type=int, default=None, help="side of the peak's matrices (CPU 2048, GPU 8192)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", *AUTOCAST_DTYPES],
                    help="auto: bf16 autocast on CUDA, fp32 on CPU")
    ap.add_argument("--out", default="docs/reports/decoder_efficiency")
    return run_script(ap, run, argv)


if __name__ == "__main__":
    sys.exit(main())

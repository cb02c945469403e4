"""End-to-end sampling speed at paper sizes (random weights): DiT steps plus one decode, for several decoders.

    python eval/sampling_speed.py --out docs/reports/sampling_speed_cpu              # CPU, fp32
    python eval/sampling_speed.py --compile --out docs/reports/sampling_speed_h100   # GPU: bf16 autocast + compile

The paper's "3.8x faster sampling" has two readings, and both are measured here in one run:
  1. the same latent, a one-step decoder instead of a multi-step one: DiT-XL/2 on f8c4 latents (256 px -> 32x32x4,
     256 tokens) decoded by SSDD-M in 1 step, against SSDD-M in 8 steps and the SD-VAE-sized KL-VAE decoder;
  2. a more compressed latent made usable by a better decoder: an f16 encoder (f16c16, 16x16x16 latents) whose
     DiT sees 256 tokens with patch 1 (as many as DiT-XL/2 on f8) or 64 with patch 2 (4x fewer), again with each
     decoder, against the f8c4 DiT-XL/2 + KL-VAE pipeline.

Speed does not depend on the weights, so all models are randomly initialised. A DiT step is one guided velocity
(classifier-free guidance: a forward of batch 2B). All models stay loaded and are timed in turns (a DiT step of each,
a decode of each, then again, --repeats rounds after --warmup one-step rounds), so the drifting load of a shared
machine weighs on all alike; each time is the median of its rounds. A pipeline of S steps is taken as
S x (step time) + (decoder time): the stated figures for 250, 50 and 25 steps are computed this way, not timed end to
end. CPU: fp32; GPU: bf16
autocast (and --compile). Writes <out>.json, <out>.md (tables and speed-ups next to the paper's 3.8x) and <out>.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from dit.flow import guided_velocity
from dit.models import build_dit
from eval.lib.decoders import build_decode_fn, decoder_inputs
from eval.lib.report import command_line, load_average, machine_info, run_script, save_figure, today, write_report
from eval.lib.timing import inference, take_turns
from tokenizer.common.devices import AUTOCAST_DTYPES, autocast_dtype, pick_device
from tokenizer.common.errors import UserError
from tokenizer.encoder import parse_encoder_name

PAPER_SPEEDUP = 3.8
DEFAULT_DITS = ["f8c4:DiT-XL/2", "f16c16:DiT-XL/1", "f16c16:DiT-XL/2"]
DEFAULT_DECODERS = ["M:1", "M:8", "kl"]


def parse_dit(text: str) -> tuple[str, str]:
    encoder, sep, model = text.partition(":")
    if not sep:
        raise UserError(f"--dits entries look like 'f8c4:DiT-XL/2', got {text!r}")
    parse_encoder_name(encoder)
    return encoder, model


def parse_decoder(text: str) -> tuple[str, int]:
    """'M:8' -> ('M', 8); 'kl' -> ('kl', 1)."""
    name, _, steps = text.partition(":")
    if name.lower() == "kl":
        return "kl", 1
    if not steps.isdigit() or int(steps) < 1:
        raise UserError(f"--decoders entries look like 'M:1', 'M:8' or 'kl', got {text!r}")
    return name.upper(), int(steps)


def decoder_label(name: str, steps: int) -> str:
    return "KL-VAE (SD-VAE size)" if name == "kl" else f"SSDD-{name} {steps}-step"


def dit_timer(model_name: str, encoder: str, size: int, batch: int, cfg_scale: float, device, compile_):
    """(row, call(steps), 1): one guided DiT velocity on random latents of `encoder` at `size` px."""
    f, c = parse_encoder_name(encoder)
    torch.manual_seed(0)
    model = build_dit(model_name, input_size=size // f, in_channels=c, num_classes=1000, learn_sigma=True)
    model = model.eval().requires_grad_(False).to(device)
    fn = torch.compile(model) if compile_ else model
    x = torch.randn(batch, c, size // f, size // f, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)

    def step(_steps):
        guided_velocity(fn, x, 0.5, y, cfg_scale, null_class=model.null_class)

    row = {"dit": model_name, "encoder": encoder, "latent": [c, size // f, size // f],
           "tokens": model.x_embedder.num_patches, "params": sum(p.numel() for p in model.parameters())}
    return row, step, 1


def decoder_timer(name: str, steps: int, encoder: str, size: int, batch: int, device, compile_):
    """(row, call(steps), steps): one decode of random latents, from SSDD noise drawn on the device beforehand
    (drawing it and copying it to the device is not decoding, and the KL-VAE pays neither)."""
    fn, params, latent = build_decode_fn(name, encoder, 128, device, compile_)
    z, noise = decoder_inputs(batch, latent, size, device)
    row = {"decoder": name, "steps": steps, "label": decoder_label(name, steps), "encoder": encoder, "params": params}
    return row, (lambda n: fn(z, noise, n)), steps


def time_in_turns(timers: list, device, amp_dtype, warmup: int, repeats: int) -> list:
    """Median seconds of each timer's call, timed in turns (one call of each, then again, ...: eval.lib.timing), so
    that the load of a shared machine, which drifts over minutes, weighs on every configuration alike. Warm-up
    calls use one step."""
    take_turns({i: inference(lambda call=call: call(1), device, amp_dtype) for i, (_, call, _) in enumerate(timers)},
               warmup, device)
    times = take_turns({i: inference(lambda call=call, steps=steps: call(steps), device, amp_dtype)
                        for i, (_, call, steps) in enumerate(timers)}, repeats, device, progress="timing rounds")
    return [(statistics.median(t), [round(x, 4) for x in t]) for t in times.values()]


def pipelines(dits: list, decoders: list, dit_steps: list, batch: int) -> list:
    """Every (DiT, decoder of the same latent, steps) with its computed time and images/s."""
    rows = []
    for s in dit_steps:
        for d in dits:
            for dec in (x for x in decoders if x["encoder"] == d["encoder"]):
                total = s * d["step_s"] + dec["decode_s"]
                rows.append({"pipeline": f"{d['encoder']}:{d['dit']}", "dit": d["dit"], "encoder": d["encoder"],
                             "tokens": d["tokens"], "decoder": dec["label"], "decoder_key": dec["decoder"],
                             "decoder_steps": dec["steps"], "dit_steps": s, "dit_s": s * d["step_s"],
                             "decoder_s": dec["decode_s"], "total_s": total, "images_per_s": batch / total,
                             "decoder_share": dec["decode_s"] / total})
    return rows


def speedups(rows: list, baseline: str) -> list:
    """Ratios of pipeline times at equal DiT steps: a 1-step SSDD vs the multi-step SSDD and the KL-VAE on the same
    latent (reading 1), and every pipeline vs `baseline` (the first --dits entry, by default f8c4 DiT-XL/2, the
    standard DiT pipeline) decoded by the KL-VAE (reading 2)."""
    out = []
    for r in rows:
        same = [o for o in rows if o["pipeline"] == r["pipeline"] and o["dit_steps"] == r["dit_steps"]]
        base = [o for o in rows if o["pipeline"] == baseline and o["decoder_key"] == "kl"
                and o["dit_steps"] == r["dit_steps"]]
        if r["decoder_key"] != "kl" and r["decoder_steps"] == 1:
            for o in same:
                if o is not r and (o["decoder_key"] == "kl" or o["decoder_steps"] > 1):
                    out.append({"reading": 1, "fast": f"{r['pipeline']} + {r['decoder']}",
                                "slow": f"{o['pipeline']} + {o['decoder']}", "dit_steps": r["dit_steps"],
                                "speedup": o["total_s"] / r["total_s"]})
        if base and r["pipeline"] != baseline:
            out.append({"reading": 2, "fast": f"{r['pipeline']} + {r['decoder']}",
                        "slow": f"{baseline} + {base[0]['decoder']}", "dit_steps": r["dit_steps"],
                        "speedup": base[0]["total_s"] / r["total_s"]})
    return out


def plot(path: str, rows: list, dit_steps: list, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(dit_steps), figsize=(4.2 * len(dit_steps), 0.45 * len(rows) / len(dit_steps) + 1.6),
                             sharey=True, squeeze=False)
    for ax, s in zip(axes[0], dit_steps):
        sel = [r for r in rows if r["dit_steps"] == s]
        labels = [f"{r['pipeline']} + {r['decoder']}" for r in sel]
        ax.barh(labels, [r["dit_s"] for r in sel], label="DiT")
        ax.barh(labels, [r["decoder_s"] for r in sel], left=[r["dit_s"] for r in sel], label="decoder")
        ax.set_title(f"{s} DiT steps", fontsize=9)
        ax.set_xlabel("seconds per batch")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].invert_yaxis()  # shared y: once for all panels; the first pipeline on top
    axes[0][0].tick_params(axis="y", labelsize=7)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def markdown(record: dict) -> str:
    r, m, s = record, record["machine"], record["settings"]
    where = m["gpu"] or f"{m['cpu']}, {m['torch_threads']} threads"
    lines = [f"# End-to-end sampling speed at paper sizes ({where})", "",
             f"{r['date']}; {s['size']} px, batch {s['batch']}, cfg {s['cfg_scale']:g} (a DiT step is a forward of "
             f"batch {2 * s['batch']}), {s['dtype']}{', torch.compile' if s['compile'] else ''}; random weights; "
             f"warm-up {s['warmup']} round(s) of one step, median of {s['repeats']} rounds timed in turns (every model "
             f"loaded). Load average (1, 5, 15 min) {m['load_average']} at "
             f"start, {r['load_average_end']} at end.", f"Command: `{r['command']}`", "",
             "**Pipeline times are computed, not timed end to end:** S x (median DiT step) + (median decode), both "
             "measured in this run.", "", "Measured parts:", "",
             "| DiT | latent | tokens | params | s per guided step |", "|---|---|---|---|---|"]
    lines += [f"| {d['dit']} | {d['encoder']} {'x'.join(map(str, d['latent']))} | {d['tokens']} | "
              f"{d['params'] / 1e6:.1f} M | {d['step_s']:.4g} |" for d in r["dits"]]
    lines += ["", "| decoder | latent | params | s per decode |", "|---|---|---|---|"]
    lines += [f"| {d['label']} | {d['encoder']} | {d['params'] / 1e6:.1f} M | {d['decode_s']:.4g} |"
              for d in r["decoders"]]
    lines += ["", "Pipelines:", "", "| DiT steps | pipeline | decoder | DiT s | decoder s | total s | images/s | "
              "decoder share |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {p['dit_steps']} | {p['pipeline']} | {p['decoder']} | {p['dit_s']:.4g} | {p['decoder_s']:.4g} | "
              f"{p['total_s']:.4g} | {p['images_per_s']:.3g} | {100 * p['decoder_share']:.1f} % |" for p in r["rows"]]
    for reading, what in ((1, "Reading 1, a one-step decoder on the same latent (same DiT):"),
                          (2, f"Reading 2, against the {r['baseline']} + KL-VAE pipeline (a more compressed latent "
                              "and/or another decoder):")):
        lines += ["", what, "", "| DiT steps | faster | than | speed-up | paper |", "|---|---|---|---|---|"]
        lines += [f"| {x['dit_steps']} | {x['fast']} | {x['slow']} | {x['speedup']:.2f}x | {PAPER_SPEEDUP}x |"
                  for x in r["speedups"] if x["reading"] == reading]
    lines += ["", f"![sampling time]({r['plot'].rsplit('/', 1)[-1]})", ""]
    return "\n".join(lines)


def measure(args) -> dict:
    device = pick_device(args.device)
    amp_dtype, dtype_name = autocast_dtype(args.dtype, device)
    if args.compile and device.type != "cuda":
        raise UserError("--compile is for GPU runs only")
    dits = [parse_dit(t) for t in args.dits]
    decoders = [parse_decoder(t) for t in args.decoders]
    for encoder, _ in dits:
        f = parse_encoder_name(encoder)[0]
        if args.size % max(f, 8):
            raise UserError(f"--size {args.size} must be a multiple of {max(f, 8)} for {encoder}")
    if min(args.dit_steps) < 1 or args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        raise UserError("--dit-steps, --batch and --repeats must be >= 1, --warmup >= 0")
    machine = machine_info(device)
    t0 = time.perf_counter()
    # every model stays in memory (three DiT-XL: ~8 GB in fp32) so that the timings can take turns
    dit_timers = [dit_timer(model, encoder, args.size, args.batch, args.cfg_scale, device, args.compile)
                  for encoder, model in dits]
    dec_timers = [decoder_timer(name, steps, encoder, args.size, args.batch, device, args.compile)
                  for encoder in dict.fromkeys(e for e, _ in dits) for name, steps in decoders]
    timed = time_in_turns(dit_timers + dec_timers, device, amp_dtype, args.warmup, args.repeats)
    dit_rows, dec_rows = [t[0] for t in dit_timers], [t[0] for t in dec_timers]
    for row, (median, times) in zip(dit_rows + dec_rows, timed):
        row.update({"step_s": median, "step_times_s": times} if "dit" in row else {"decode_s": median,
                                                                                   "decode_times_s": times})
    for d in dit_rows:
        print(f"{d['dit']} on {d['encoder']}: {d['tokens']} tokens, {d['step_s']:.3f} s per guided step", flush=True)
    for d in dec_rows:
        print(f"{d['label']} on {d['encoder']}: {d['decode_s']:.3f} s per decode", flush=True)
    rows = pipelines(dit_rows, dec_rows, args.dit_steps, args.batch)
    record = {"settings": {"size": args.size, "batch": args.batch, "cfg_scale": args.cfg_scale, "dtype": dtype_name,
                           "compile": args.compile, "warmup": args.warmup, "repeats": args.repeats,
                           "dit_steps": args.dit_steps},
              "note": "random weights; pipeline time = steps x median guided DiT step + median decode (computed)",
              "dits": dit_rows, "decoders": dec_rows, "rows": rows, "baseline": f"{dits[0][0]}:{dits[0][1]}",
              "speedups": speedups(rows, f"{dits[0][0]}:{dits[0][1]}"),
              "paper_speedup": PAPER_SPEEDUP, "plot": args.out + ".png", "machine": machine,
              "load_average_end": load_average(), "seconds": round(time.perf_counter() - t0, 1), "date": today(),
              "command": command_line("eval/sampling_speed.py", args.argv)}
    plot(args.out + ".png", rows, args.dit_steps, f"Sampling time per batch of {args.batch} at {args.size} px "
         f"({machine['gpu'] or 'CPU'}, {dtype_name}; random weights)")
    md = markdown(record)
    write_report(args.out, record, md)
    print(md)
    print(f"wrote {args.out}.json, {args.out}.md, {args.out}.png")
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dits", nargs="+", default=DEFAULT_DITS, help="ENCODER:DIT pairs, e.g. f8c4:DiT-XL/2")
    ap.add_argument("--decoders", nargs="+", default=DEFAULT_DECODERS, help="SIZE:STEPS or kl, e.g. M:1 M:8 kl")
    ap.add_argument("--dit-steps", type=int, nargs="+", default=[250, 50, 25])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale (!= 1: each step runs batch 2B)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", *AUTOCAST_DTYPES],
                    help="auto: bf16 autocast on CUDA, fp32 on CPU")
    ap.add_argument("--compile", action="store_true", help="torch.compile the DiT and decoders (GPU only)")
    ap.add_argument("--out", default="docs/reports/sampling_speed", help="output path without extension")
    return run_script(ap, measure, argv)


if __name__ == "__main__":
    sys.exit(main())

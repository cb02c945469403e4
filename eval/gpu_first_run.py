"""One command for the first GPU: the GPU rows of docs/RESULTS.md in one run of under 8 minutes on one H100.

    python eval/gpu_first_run.py --out docs/reports/gpu_first_run                # CUDA, bf16, the paper's sizes
    python eval/gpu_first_run.py --tiny --device cpu --out /tmp/gpu_first_run    # the same code at toy sizes

Sections, in this order (--sections picks some), with random weights throughout (speed does not depend on them):
  peaks            the GPU's data-sheet dense bf16 peak (eval/lib/flops.py's table) and measured matmul peaks: bf16,
                   and fp32 with TF32 as the trainers set it
  decoders         SSDD-S and SSDD-M in 1 step against the SD-VAE-sized KL-VAE decoder (ours, base 128), 256 and 512
                   px, batch 32, bf16 autocast: eager, then torch.compile (static shapes: one compile per size);
                   images/s and the SSDD / KL-VAE ratios, the decoders of one size timed in turns
  dit_train        DiT-XL/2 training steps/s at batch 128 (32x32x4 latents), bf16 autocast, torch.compile, fused
                   AdamW, EMA (dit.train's step); MFU = FLOPs of one step counted by torch's counter / step time / the
                   data-sheet peak, and against the measured bf16 matmul peak; the analytic count beside it
  pipeline         DiT-XL/2 (Euler, --pipeline-steps steps, cfg 1.5: a guided step runs batch 2B) followed by the
                   SSDD-M 1-step or the KL-VAE decoder, end to end, eager bf16; and the DiT sampling alone
  tokenizer_train  tokenizer.train's step at 128 px: encoder f8c4 (frozen) + SSDD-M decoder, batch 32, bf16,
                   compiled decoder, schedule-free RAdam, grad clip 0.1, EMA (LPIPS and REPA off: no weights)

Time budget: each section has a wall-clock budget (--budget NAME=SECONDS; defaults in BUDGETS) and the run one in
all (--total-budget); a section checks before each item (a model to build, compile, warm up or time) and, once its
budget or the run's is spent, skips the rest with a note naming what was skipped. A compile is not started with
less than a minute of its section left (it could not be stopped halfway), and timed rounds are cut to what fits.
The reports are rewritten after every section, so a run killed from outside keeps the sections it finished. An item
that raises (a compile failure, out of memory) is recorded with its error and the run goes on; the exit status is
then non-zero. Budgets hold the run under 8 minutes on an H100 if compiles take about a minute each; the report
gives every first-call time, so the budgets can be set from the first run.

Compilation: torch's `recompiles` log is on (reasons on stderr), and each section and each timed group records its
recompiles with their reasons, graphs, graph breaks and Dynamo/Inductor and Python warnings (eval/lib/compile_log.py);
a recompile while calls were being timed is flagged in the report. Sections end with torch._dynamo.reset().

--tiny runs the same code at toy sizes (SSDD-XS and a 32-wide KL-VAE at 32 and 64 px, DiT-Ti/2 on 8x8 latents,
batch 2, 2 DiT steps) so the tests run it on a CPU. On a CPU the compile backend defaults to aot_eager (Dynamo's
capture and AOTAutograd, so the same graphs, breaks and recompiles, without minutes of Inductor C++ builds).
Writes <out>.json and <out>.md (the figures in the shape of RESULTS' GPU rows, each with this command).
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import sys
import time

import torch

from dit.flow import sample as flow_sample
from dit.models import DiT_models, build_dit
from eval.lib.compile_log import CompileLog, PythonWarnings
from eval.lib.decoders import build_decode_fn, decoder_inputs
from eval.lib.flops import datasheet_peak_tflops, matmul_peak
from eval.lib.report import command_line, load_average, machine_info, run_script, today, write_report
from eval.lib.timing import inference, take_turns
from eval.lib.train_steps import dit_forward_flops, dit_train_step, tokenizer_train_step
from tokenizer.common.devices import AUTOCAST_DTYPES, autocast_dtype, pick_device, synchronize, timed
from tokenizer.common.errors import UserError
from tokenizer.common.training import enable_tf32
from tokenizer.decoder import DECODER_SIZES, clear_attention_cache
from tokenizer.encoder import parse_encoder_name

SECTIONS = ["peaks", "decoders", "dit_train", "pipeline", "tokenizer_train"]
BUDGETS = {"peaks": 15, "decoders": 200, "dit_train": 100, "pipeline": 45, "tokenizer_train": 100}  # seconds
TOTAL_BUDGET = 420  # seconds for the sections; start-up (imports, CUDA) and the reports come on top

SIZES = {  # what each section runs: the paper's sizes, and toy ones for a CPU
    "full": {"compile_reserve_s": 60,  # no compile starts with less of its section's budget left
             "decoders": ["M", "kl", "S"], "kl_base": 128, "decoder_px": [256, 512], "decoder_batch": 32,
             "decoder_warmup": 2, "decoder_repeats": 10,
             "dit": "DiT-XL/2", "dit_latent": (4, 32, 32), "dit_batch": 128, "dit_warmup": 3, "dit_iters": 10,
             "pipeline_px": 256, "pipeline_batch": 32, "pipeline_steps": 50, "pipeline_decoder": "M",
             "pipeline_repeats": 3,
             "tok_decoder": "M", "tok_encoder": "f8c4", "tok_encoder_base": 128, "tok_px": 128, "tok_batch": 32,
             "tok_warmup": 3, "tok_iters": 10, "peak_n": 8192},
    "tiny": {"compile_reserve_s": 0,
             "decoders": ["XS", "kl"], "kl_base": 32, "decoder_px": [32, 64], "decoder_batch": 2,
             "decoder_warmup": 1, "decoder_repeats": 2,
             "dit": "DiT-Ti/2", "dit_latent": (4, 8, 8), "dit_batch": 2, "dit_warmup": 1, "dit_iters": 2,
             "pipeline_px": 64, "pipeline_batch": 2, "pipeline_steps": 2, "pipeline_decoder": "XS",
             "pipeline_repeats": 1,
             "tok_decoder": "XS", "tok_encoder": "f8c4", "tok_encoder_base": 32, "tok_px": 32, "tok_batch": 2,
             "tok_warmup": 1, "tok_iters": 2, "peak_n": 256},
}
CFG_SCALE = 1.5
ENCODER = "f8c4"  # the decoders' and the pipeline's latent format (SD-VAE's shape: 4 channels, factor 8)


# ----------------------------------------------------------------------------------------------------------
# Budget and items
# ----------------------------------------------------------------------------------------------------------


class Budget:
    """The run's wall-clock budget and the current section's; skipped items become notes."""

    def __init__(self, total_s: float):
        self.run_end = time.perf_counter() + total_s

    def start_section(self, seconds: float) -> None:
        self.section_s = seconds
        self.section_end = min(time.perf_counter() + seconds, self.run_end)
        self.notes: list = []

    def left(self) -> float:
        return self.section_end - time.perf_counter()

    def allows(self, what: str, need_s: float = 0.0) -> bool:
        """True while more than `need_s` seconds of the section's budget are left; else records that `what` was
        skipped, and False."""
        left = self.left()
        if left > need_s:
            return True
        whose = "run's" if self.run_end <= self.section_end else "section's"
        self.notes.append(f"skipped {what}: {max(left, 0):.0f} s left of the {whose} time budget"
                          + (f", {need_s:.0f} s needed" if need_s else ""))
        return False

    def rounds(self, what: str, wanted: int, round_s: float) -> int:
        """How many timed rounds of `round_s` seconds fit in what is left (at most `wanted`); a note if fewer."""
        fit = min(wanted, int(max(self.left(), 0) // max(round_s, 1e-9)))
        if fit < wanted:
            self.notes.append(f"{what}: {fit} of {wanted} timed rounds fit in the time budget")
        return fit


def brief(e: BaseException, lines: int = 4, chars: int = 600) -> str:
    """The first few non-empty lines of an error on one line: a compiler's first line alone ("backend='inductor'
    raised:") does not say what failed."""
    text = " / ".join([line.strip() for line in str(e).splitlines() if line.strip()][:lines]) or "(no message)"
    return f"{type(e).__name__}: {text[:chars]}"


def attempt(errors: list, what: str, fn, *args):
    """fn(*args), or None with `what: <the error, briefly>` appended to `errors` (the run goes on)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - a failing item is a result to report, not the end of the run
        if isinstance(e, UserError):
            raise
        errors.append(f"{what}: {brief(e)}")
        print(f"error in {what}: {brief(e)}", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def free_memory(device) -> None:
    """Between sections: compiled code, cached attention indices (possibly made in inference mode, which a later
    training step cannot use) and cached CUDA blocks go."""
    torch._dynamo.reset()
    clear_attention_cache()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_memory_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------------------------------------
# Sections: each returns its record (rows and figures); notes and errors are added by the caller
# ----------------------------------------------------------------------------------------------------------


def section_peaks(ctx) -> dict:
    dev, size = ctx.device, ctx.size
    tflops, source = datasheet_peak_tflops(dev)
    out = {"datasheet_bf16_tflops": tflops, "datasheet_source": source, "measured": {}}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        if ctx.budget.allows(f"the {name} matmul peak"):
            m = attempt(ctx.errors, f"{name} matmul peak", matmul_peak, dev, dtype, size["peak_n"])
            if m is not None:
                out["measured"][name] = m
                print(f"measured {name} matmul peak: {m['tflops']:.1f} TFLOP/s", flush=True)
    ctx.peaks = out
    return out


def time_group(ctx, calls: dict, repeats: int) -> tuple[dict, dict]:
    """Seconds of each warmed-up call, timed in turns; the compile record of the timed rounds (a recompile there
    means the timing includes compilation)."""
    mark = ctx.log.mark()
    failed = {}

    def skip(key, e):
        failed[key] = brief(e)
        return True

    times = take_turns(calls, repeats, ctx.device, skip=skip)
    for key, err in failed.items():
        ctx.errors.append(f"timing {key}: {err}")
    return {k: t for k, t in times.items() if t and k not in failed}, ctx.log.since(mark)


def decoder_rows(ctx, compiled: bool) -> list:
    """One mode (eager or compiled) of the decoders section: build, then per size warm up each decoder and time
    them in turns."""
    size, dev = ctx.size, ctx.device
    rows, built = [], {}
    need = size["compile_reserve_s"] if compiled else 0.0  # a compile started with less left would overrun
    for d in size["decoders"]:
        what = f"building {'compiled ' if compiled else ''}{label(d, size['kl_base'])}"
        if ctx.budget.allows(what):
            fn = attempt(ctx.errors, what, build_decode_fn, d, ENCODER, size["kl_base"], dev, compiled, False,
                         {"dynamic": False, "backend": ctx.backend} if compiled else None)
            if fn is not None:
                built[d] = fn
    for px in size["decoder_px"]:
        calls, first = {}, {}
        for d, (fn, _, latent) in built.items():
            what = f"{'compiled ' if compiled else ''}{label(d, size['kl_base'])} at {px} px"
            if not ctx.budget.allows(what, need):
                continue
            z, noise = decoder_inputs(size["decoder_batch"], latent, px, dev)
            call = inference(lambda fn=fn, z=z, noise=noise: fn(z, noise, 1), dev, ctx.amp)
            mark = ctx.log.mark()
            reset_peak_memory(dev)
            warm = attempt(ctx.errors, what, lambda c=call: [timed(c, dev) for _ in range(size["decoder_warmup"])])
            if warm is not None:
                calls[d], first[d] = call, (warm[0], warm[-1], ctx.log.since(mark), peak_memory_gib(dev))
        group = f"timing the {'compiled' if compiled else 'eager'} decoders at {px} px"
        rounds = ctx.budget.rounds(group, size["decoder_repeats"], sum(f[1] for f in first.values()))
        if not calls or rounds < 1:
            continue
        times, timed_compile = time_group(ctx, calls, rounds)
        for d, t in times.items():
            med = statistics.median(t)
            first_s, _, warm_compile, peak_gib = first[d]
            rows.append({"decoder": d, "label": label(d, size["kl_base"]), "px": px, "batch": size["decoder_batch"],
                         "compiled": compiled, "params": built[d][1], "median_s": med,
                         "times_s": [round(x, 5) for x in t], "images_per_s": size["decoder_batch"] / med,
                         "ms_per_image": 1000 * med / size["decoder_batch"], "first_call_s": round(first_s, 3),
                         "warmup_recompiles": warm_compile["recompiles"], "warmup_graphs": warm_compile["graphs"],
                         "recompiles_while_timed": timed_compile["recompiles"],
                         "peak_memory_gib": peak_gib})  # of its warm-up calls
    return rows


def section_decoders(ctx) -> dict:
    rows = decoder_rows(ctx, compiled=False)
    free_memory(ctx.device)
    rows += decoder_rows(ctx, compiled=True)
    return {"rows": rows, "ratios": decoder_ratios(rows)}


def decoder_ratios(rows: list) -> list:
    out = []
    for r in rows:
        if r["decoder"] == "kl":
            continue
        for kl in rows:
            if kl["decoder"] == "kl" and (kl["px"], kl["compiled"]) == (r["px"], r["compiled"]):
                out.append({"decoder": r["label"], "px": r["px"], "compiled": r["compiled"],
                            "vs_kl": r["images_per_s"] / kl["images_per_s"]})
    return out


def time_train_step(ctx, step, name: str, warmup: int, iters: int) -> dict:
    """Warm-up steps (the first compiles), then timed steps, each while the budget lasts: the step's record."""
    dev = ctx.device
    reset_peak_memory(dev)
    out = {"info": step.info, "precision": ctx.dtype_name, "warmup_s": []}
    mark = ctx.log.mark()
    for i in range(warmup):
        if not ctx.budget.allows(f"{name} warm-up step {i + 1}"):
            return out
        s = attempt(ctx.errors, f"{name} warm-up step {i + 1}", timed, lambda i=i: step.run(i), dev)
        if s is None:
            return out
        out["warmup_s"].append(round(s, 3))
    out["warmup_recompiles"] = ctx.log.since(mark)["recompiles"]
    mark = ctx.log.mark()
    times = []
    for i in range(iters):
        if not ctx.budget.allows(f"{name} timed step {i + 1}"):
            break
        times.append(timed(lambda i=i: step.run(warmup + i), dev))
    if times:
        med = statistics.median(times)
        out.update({"times_s": [round(t, 5) for t in times], "step_s": med, "steps_per_s": 1 / med,
                    "images_per_s": step.batch / med, "recompiles_while_timed": ctx.log.since(mark)["recompiles"],
                    "peak_memory_gib": peak_memory_gib(dev)})
    return out


def section_dit_train(ctx) -> dict:
    size, dev = ctx.size, ctx.device
    name, latent, batch = size["dit"], size["dit_latent"], size["dit_batch"]
    if not ctx.budget.allows(f"building and compiling {name}", size["compile_reserve_s"]):
        return {}
    step = dit_train_step(name, latent, batch, dev, ctx.amp, True, compile_options={"backend": ctx.backend})
    counted = attempt(ctx.errors, "counting the DiT step's FLOPs", step.count_flops)
    analytic = 3 * dit_forward_flops(step.model, latent, batch)["total"]
    out = time_train_step(ctx, step, name, size["dit_warmup"], size["dit_iters"])
    out.update({"counted_tflop_per_step": None if counted is None else counted / 1e12,
                "analytic_tflop_per_step": analytic / 1e12})
    if "step_s" in out:
        achieved = (counted if counted is not None else analytic) / out["step_s"] / 1e12
        measured = ctx.peaks.get("measured", {}).get("bf16", {}).get("tflops")
        sheet = datasheet_peak_tflops(dev)[0]
        out.update({"achieved_tflops": achieved, "flops_from": "counter" if counted is not None else "analytic",
                    "datasheet_tflops": sheet, "mfu_datasheet": achieved / sheet if sheet else None,
                    "measured_bf16_tflops": measured, "mfu_measured_peak": achieved / measured if measured else None})
    return out


def section_pipeline(ctx) -> dict:
    """DiT sampling + decode, end to end, for the SSDD decoder and the KL-VAE; the DiT alone beside them."""
    size, dev = ctx.size, ctx.device
    px, batch, steps = size["pipeline_px"], size["pipeline_batch"], size["pipeline_steps"]
    if not ctx.budget.allows(f"building {size['dit']} and the decoders"):
        return {}
    f, c = parse_encoder_name(ENCODER)
    torch.manual_seed(0)
    dit = build_dit(size["dit"], input_size=px // f, in_channels=c, num_classes=1000, learn_sigma=True)
    with torch.no_grad():  # off DiT's zero init, so the decoders get latents that are not all zero
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    dit = dit.eval().requires_grad_(False).to(dev)
    g = torch.Generator(dev).manual_seed(0)
    noise = torch.randn(batch, c, px // f, px // f, device=dev, generator=g)
    y = torch.randint(0, 1000, (batch,), device=dev, generator=g)
    decoders = {d: build_decode_fn(d, ENCODER, size["kl_base"], dev, False) for d in (size["pipeline_decoder"], "kl")}
    image_noise = decoder_inputs(batch, (c, f), px, dev)[1]

    def sample():
        return flow_sample(dit, noise, y, steps=steps, method="euler", cfg_scale=CFG_SCALE)

    def sample_and_decode(decode):
        return lambda: decode(sample(), image_noise, 1)

    calls = {"DiT only": inference(sample, dev, ctx.amp)}
    for d, (fn, _, _) in decoders.items():
        calls[f"DiT + {label(d, size['kl_base'])}"] = inference(sample_and_decode(fn), dev, ctx.amp)
    if not ctx.budget.allows("the pipeline warm-up"):
        return {}
    warm = attempt(ctx.errors, "pipeline warm-up", lambda: {k: timed(call, dev) for k, call in calls.items()})
    rounds = 0 if warm is None else ctx.budget.rounds("timing the pipelines", size["pipeline_repeats"],
                                                       sum(warm.values()))
    if rounds < 1:
        return {}
    times, _ = time_group(ctx, calls, rounds)
    rows = [{"pipeline": k, "dit": size["dit"], "dit_steps": steps, "cfg_scale": CFG_SCALE, "px": px, "batch": batch,
             "median_s": statistics.median(t), "times_s": [round(x, 4) for x in t],
             "images_per_s": batch / statistics.median(t)} for k, t in times.items()]
    by = {r["pipeline"]: r for r in rows}
    ssdd = by.get(f"DiT + {label(size['pipeline_decoder'], size['kl_base'])}")
    kl = by.get(f"DiT + {label('kl', size['kl_base'])}")
    speedup = kl["median_s"] / ssdd["median_s"] if ssdd and kl else None
    return {"rows": rows, "ssdd_vs_kl_speedup": speedup, "compiled": False, "precision": ctx.dtype_name}


def section_tokenizer_train(ctx) -> dict:
    size, dev = ctx.size, ctx.device
    if not ctx.budget.allows("building and compiling the tokenizer", size["compile_reserve_s"]):
        return {}
    step = tokenizer_train_step(size["tok_decoder"], size["tok_encoder"], size["tok_px"], size["tok_batch"], dev,
                                ctx.amp, True, encoder_base_channels=size["tok_encoder_base"],
                                compile_options={"backend": ctx.backend})
    counted = attempt(ctx.errors, "counting the tokenizer step's FLOPs", step.count_flops)
    out = time_train_step(ctx, step, "tokenizer", size["tok_warmup"], size["tok_iters"])
    out["counted_tflop_per_step"] = None if counted is None else counted / 1e12
    if "step_s" in out and counted is not None:
        out["achieved_tflops"] = counted / out["step_s"] / 1e12
    return out


SECTION_FUNCTIONS = {"peaks": section_peaks, "decoders": section_decoders, "dit_train": section_dit_train,
                     "pipeline": section_pipeline, "tokenizer_train": section_tokenizer_train}


def label(decoder: str, kl_base: int) -> str:
    return f"KL-VAE (base {kl_base})" if decoder == "kl" else f"SSDD-{decoder} 1-step"


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def fmt(value, spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def short(reason: str, lines: int = 2) -> str:
    """A compiler message on one line: its first lines, without object addresses."""
    text = " / ".join([line.strip() for line in reason.splitlines() if line.strip()][:lines])
    return re.sub(r" at 0x[0-9a-f]+", "", text)


def pct(fraction) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.1f} %"


def results_rows(record: dict) -> list:
    """The figures in the shape of RESULTS' GPU rows: (what, result)."""
    s, out = record["sections"], []
    dec = s.get("decoders", {})
    for compiled in (False, True):
        rows = [r for r in dec.get("rows", []) if r["compiled"] == compiled]
        ratios = [r for r in dec.get("ratios", []) if r["compiled"] == compiled]
        what = f"decoders 1-step vs KL-VAE, bf16, {'torch.compile' if compiled else 'eager'}"
        if rows:
            parts = [f"{r['label']} {r['px']} px: {r['images_per_s']:.1f} img/s" for r in rows]
            parts += [f"{x['decoder']} / KL-VAE at {x['px']} px = {x['vs_kl']:.2f}x" for x in ratios]
            out.append((what, "; ".join(parts)))
        else:
            out.append((what, "not measured (see the section's notes)"))
    dit = s.get("dit_train", {})
    if dit.get("steps_per_s"):
        out.append((f"{dit['info']['model']} training, batch {dit['info']['batch_size']}, bf16 + compile",
                    f"{dit['steps_per_s']:.3g} steps/s ({dit['images_per_s']:.3g} img/s), "
                    f"{dit['achieved_tflops']:.3g} TFLOP/s, MFU {pct(dit['mfu_datasheet'])} of the data-sheet peak, "
                    f"{pct(dit['mfu_measured_peak'])} of the measured bf16 matmul peak"))
    else:
        out.append(("DiT training", "not measured (see the section's notes)"))
    pipe = s.get("pipeline", {})
    if pipe.get("rows"):
        parts = [f"{r['pipeline']}: {r['median_s']:.2f} s per batch of {r['batch']} ({r['images_per_s']:.1f} img/s)"
                 for r in pipe["rows"]]
        if pipe.get("ssdd_vs_kl_speedup"):
            parts.append(f"SSDD pipeline {pipe['ssdd_vs_kl_speedup']:.3f}x the KL-VAE one")
        r0 = pipe["rows"][0]
        out.append((f"{r0['dit']} {r0['dit_steps']} Euler steps, cfg {r0['cfg_scale']:g} + decoder, end to end, eager",
                    "; ".join(parts)))
    else:
        out.append(("DiT + decoder end to end", "not measured (see the section's notes)"))
    tok = s.get("tokenizer_train", {})
    if tok.get("steps_per_s"):
        i = tok["info"]
        out.append((f"tokenizer training, SSDD-{i['decoder']} {i['encoder']}, {i['px']} px, batch {i['batch_size']}, "
                    "bf16, compiled decoder", f"{tok['steps_per_s']:.3g} steps/s ({tok['images_per_s']:.3g} img/s)"))
    else:
        out.append(("tokenizer training", "not measured (see the section's notes)"))
    return out


def markdown(record: dict) -> str:
    m = record["machine"]
    where = m["gpu"] or f"{m['cpu']}, {m['torch_threads']} torch thread(s)"
    lines = [f"# First GPU run ({where})", "",
             f"{record['date']}, torch {m['torch']}, {record['dtype']} autocast, compile backend "
             f"{record['compile_backend']}, sizes: {'tiny (a smoke run, not figures)' if record['tiny'] else 'full'}; "
             f"random weights. {record['seconds']:.0f} s in all (budget {record['total_budget_s']:.0f} s of sections)"
             f"{'' if record['finished'] else '; UNFINISHED: the sections after the last one listed did not run'}.",
             "", f"Command: `{record['command']}`", "", "| what | result |", "|---|---|"]
    lines += [f"| {what} | {result} |" for what, result in results_rows(record)]
    peaks = record["sections"].get("peaks", {})
    if peaks:
        meas = ", ".join(f"{k} {v['tflops']:.1f} TFLOP/s ({v['n']}x{v['n']})" for k, v in peaks["measured"].items())
        sheet = (f"{peaks['datasheet_bf16_tflops']:.1f} TFLOP/s ({peaks['datasheet_source']})"
                 if peaks.get("datasheet_bf16_tflops") else "none for this device")
        lines += ["", f"Peaks: data-sheet bf16 dense {sheet}; measured matmul: {meas or 'none'}."]
    dec = record["sections"].get("decoders", {})
    if dec.get("rows"):
        lines += ["", "## Decoders", "", "| decoder | px | batch | compiled | images/s | ms/image | first call s | "
                  "recompiles (warm-up / timed) | peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['label']} | {r['px']} | {r['batch']} | {r['compiled']} | {r['images_per_s']:.2f} | "
                  f"{r['ms_per_image']:.2f} | {r['first_call_s']} | {r['warmup_recompiles']} / "
                  f"{r['recompiles_while_timed']} | {fmt(r['peak_memory_gib'], '.1f')} |" for r in dec["rows"]]
    for name in ("dit_train", "tokenizer_train"):
        sec = record["sections"].get(name, {})
        if sec.get("steps_per_s"):
            info = ", ".join(f"{k} {v}" for k, v in sec["info"].items())
            lines += ["", f"## {name}", "", f"- {info}",
                      f"- median step {1000 * sec['step_s']:.1f} ms ({len(sec['times_s'])} timed), warm-up steps "
                      f"{sec['warmup_s']} s, recompiles during warm-up {sec['warmup_recompiles']}, while timed "
                      f"{sec['recompiles_while_timed']}; peak {fmt(sec['peak_memory_gib'], '.1f')} GiB"]
            if name == "dit_train":
                lines.append(f"- FLOPs per step: counted {fmt(sec['counted_tflop_per_step'], '.3g')} TFLOP, "
                             f"analytic {sec['analytic_tflop_per_step']:.3g} TFLOP; achieved "
                             f"{sec['achieved_tflops']:.3g} TFLOP/s")
    lines += ["", "## Sections", "", "| section | status | seconds | budget s | recompiles | graphs | graph breaks |",
              "|---|---|---|---|---|---|---|"]
    for name, sec in record["sections"].items():
        c = sec.get("compile", {})
        lines.append(f"| {name} | {sec['status']} | {sec['seconds']:.1f} | {sec['budget_s']:.0f} | "
                     f"{c.get('recompiles', 0)} | {c.get('graphs', 0)} | {sum(c.get('graph_breaks', {}).values())} |")
    for name, sec in record["sections"].items():
        c = sec.get("compile", {})
        items = ([f"note: {n}" for n in sec.get("notes", [])] + [f"error: {e}" for e in sec.get("errors", [])]
                 + [f"recompile: {r}" for r in c.get("reasons", [])]
                 + [f"graph break (x{v}): {short(k)}" for k, v in c.get("graph_breaks", {}).items()]
                 + [f"warning: {w}" for w in c.get("warnings", []) + sec.get("python_warnings", [])])
        if items:
            lines += ["", f"{name}:", "", *[f"- {i}" for i in items]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------


class Context:
    """What the sections share: device, precision, sizes, the budget, the compile log, errors and peaks."""

    def __init__(self, device, amp, dtype_name, size, backend, budget, log):
        self.device, self.amp, self.dtype_name, self.size = device, amp, dtype_name, size
        self.backend, self.budget, self.log = backend, budget, log
        self.errors: list = []
        self.peaks: dict = {}


def parse_budgets(items: list) -> dict:
    budgets = dict(BUDGETS)
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or name not in BUDGETS:
            raise UserError(f"--budget takes NAME=SECONDS with NAME in {', '.join(BUDGETS)}, got {item!r}")
        try:
            budgets[name] = float(value)
        except ValueError:
            raise UserError(f"--budget {item!r}: {value!r} is not a number of seconds") from None
        if budgets[name] < 0:
            raise UserError(f"--budget {item!r}: seconds must be >= 0")
    return budgets


def run(args) -> dict:
    device = pick_device(args.device)
    amp, dtype_name = autocast_dtype(args.dtype, device)
    sections = args.sections or SECTIONS
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise UserError(f"unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    budgets = parse_budgets(args.budget)
    if args.total_budget <= 0:
        raise UserError(f"--total-budget must be > 0 seconds, got {args.total_budget}")
    size = dict(SIZES["tiny" if args.tiny else "full"])
    for key, value in (("decoder_batch", args.decoder_batch), ("dit_batch", args.dit_batch),
                       ("pipeline_steps", args.pipeline_steps), ("tok_batch", args.tokenizer_batch)):
        if value is not None:
            if value < 1:
                raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
            size[key] = value
    if size["dit"] not in DiT_models or any(d != "kl" and d not in DECODER_SIZES for d in size["decoders"]):
        raise ValueError("SIZES names an unknown model")
    backend = args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
    if device.type == "cuda":
        enable_tf32()  # as the trainers: TF32 for whatever runs in fp32
    elif args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info(device)
    log = CompileLog()
    budget = Budget(args.total_budget)
    ctx = Context(device, amp, dtype_name, size, backend, budget, log)
    t_run = time.perf_counter()
    record = {"machine": machine, "date": today(), "command": command_line("eval/gpu_first_run.py", args.argv),
              "tiny": bool(args.tiny), "dtype": dtype_name, "compile_backend": backend, "sizes": size,
              "total_budget_s": args.total_budget, "budgets_s": budgets, "finished": False, "seconds": 0.0,
              "sections": {}}
    try:
        for name in sections:
            budget.start_section(budgets[name])
            print(f"== {name} (budget {min(budgets[name], budget.run_end - time.perf_counter()):.0f} s)", flush=True)
            ctx.errors = []
            mark, t0 = log.mark(), time.perf_counter()
            with PythonWarnings() as caught:
                if budget.allows(f"the whole {name} section"):
                    result = attempt(ctx.errors, name, SECTION_FUNCTIONS[name], ctx) or {}
                else:
                    result = {}
            synchronize(device)
            sec = {**result, "seconds": time.perf_counter() - t0, "budget_s": budgets[name], "notes": budget.notes,
                   "errors": ctx.errors, "compile": log.since(mark), "python_warnings": caught.messages}
            sec["status"] = "error" if ctx.errors else "partial" if budget.notes else "ok"
            record["sections"][name] = sec
            print(f"== {name}: {sec['status']} in {sec['seconds']:.1f} s", flush=True)
            free_memory(device)
            record["seconds"] = time.perf_counter() - t_run
            write_report(args.out, record, markdown(record))  # after every section: a killed run keeps what it measured
    finally:
        log.close()
    record.update(finished=True, load_average_end=load_average())
    md = markdown(record)
    written = write_report(args.out, record, md)
    print(md)
    print("wrote " + ", ".join(written))
    failed = [f"{n}: {e}" for n, s in record["sections"].items() for e in s["errors"]]
    if failed:
        raise UserError(f"{len(failed)} item(s) failed (the reports list them): {failed[0]}")
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="toy sizes (SSDD-XS, DiT-Ti/2, batch 2): a CPU smoke run")
    ap.add_argument("--sections", nargs="+", default=None, help=f"some of {', '.join(SECTIONS)} (default: all)")
    ap.add_argument("--budget", nargs="+", action="extend", default=None, metavar="NAME=SECONDS",
                    help=f"a section's wall-clock budget (defaults: {BUDGETS})")
    ap.add_argument("--total-budget", type=float, default=TOTAL_BUDGET, help="seconds for all sections together")
    ap.add_argument("--decoder-batch", type=int, default=None, help="decoders section batch (default 32)")
    ap.add_argument("--dit-batch", type=int, default=None, help="DiT training batch (default 128)")
    ap.add_argument("--pipeline-steps", type=int, default=None, help="DiT sampling steps end to end (default 50)")
    ap.add_argument("--tokenizer-batch", type=int, default=None, help="tokenizer training batch (default 32)")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor on CUDA, "
                    "aot_eager on a CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on a CPU (default: torch's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bf16", choices=["auto", *AUTOCAST_DTYPES], help="autocast dtype")
    ap.add_argument("--out", default="docs/reports/gpu_first_run", help="output path without extension")
    return run_script(ap, run, argv)


if __name__ == "__main__":
    sys.exit(main())

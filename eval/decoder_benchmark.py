"""Decoding speed and peak memory: the KL-VAE decoder against SSDD decoders at 1 and 8 steps, in one run.

    python eval/decoder_benchmark.py --decoders kl S B M L XL H --steps 1 8 --sizes 128 256 512 \
        --batch-sizes 1 4 16 --out docs/reports/decoder_benchmark [--quality quality.json]
    # cost growth with the image: dense (reference) vs local attention, 128 -> 1024 px, plot <out>_cost_growth.png
    python eval/decoder_benchmark.py --decoders S --steps 1 --sizes 128 256 512 1024 --batch-sizes 1 \
        --attention dense local --out docs/reports/decoder_cost_growth

Weights are random: speed and memory do not depend on their values, so no checkpoint is needed. For each
configuration (decoder, steps, resolution, batch) the decode call runs `--warmup` times untimed, then `--repeats`
times timed; images/s is batch / median time. The latents and SSDD's starting noise are drawn on the device before
any timing (drawing and copying them is not decoding). CUDA is synchronised around every call; peak memory is
torch.cuda.max_memory_allocated on GPU and the peak RSS (VmHWM, reset through /proc/self/clear_refs before each
configuration's memory call) on CPU, reported both as the increase over what was held before decoding (the model
weights and inputs excluded) and as all the memory held at that peak (resident MB). Configurations
that run out of memory or whose estimated time exceeds --max-seconds-per-config are recorded as skipped; on a CPU,
so are SSDD configurations whose attention would need more than --max-memory-gb (estimated before running, since
there the out-of-memory killer, not an exception, would end the run). The index tensors of the attention are
rebuilt inside the timed calls, so the peak includes them. `--attention` picks the middle transformer's path(s);
each row records the path taken at its grid size (`auto` resolves per grid and device).

Writes <out>.json (machine, settings, every row), <out>.md (table and speed ratios) and, with --quality, a
quality-vs-speed scatter <out>_quality_vs_speed.png (x: images/s measured here for the quality file's decoder
configurations at its im_size and the largest batch measured; y: the chosen metric). With more than one image size
it also plots time per image and peak memory against the size, <out>_cost_growth.png, and lists the growth ratios.
"""

import argparse
import ctypes
import json
import statistics
import sys

import torch
from tqdm import tqdm

from eval.lib.decoders import build_decode_fn, decoder_inputs
from eval.lib.report import (
    command_line,
    load_average,
    machine_info,
    run_script,
    save_figure,
    today,
    write_report,
)
from eval.lib.timing import inference, take_turns
from tokenizer.common.devices import AUTOCAST_DTYPES, autocast_dtype, available_memory, pick_device, timed
from tokenizer.common.errors import UserError
from tokenizer.common.training import enable_tf32
from tokenizer.decoder import (
    ATTENTION_MODES,
    DECODER_SIZES,
    TOKEN_STRIDE,
    attention_memory_bytes,
    clear_attention_cache,
    resolve_attention,
)
from tokenizer.encoder import parse_encoder_name

DECODERS = ["kl", *DECODER_SIZES]  # "kl" = KL-VAE decoder; the rest are SSDD sizes
METRICS = {"fd_classifier": "lower", "psnr": "higher", "ssim": "higher", "lpips": "lower", "rfid": "lower"}
NOISY_SPREAD = 1.5  # slowest / fastest timed call above this flags a row as disturbed (shared machine)
WEIGHTS_NOTE = "random weights (decoding speed and memory do not depend on weight values)"


# ----------------------------------------------------------------------------------------------------------
# Input checking
# ----------------------------------------------------------------------------------------------------------


def canonical_decoder(name: str) -> str:
    """'KL' -> 'kl', 'xs' -> 'XS'; anything else is a one-line UserError listing the valid names."""
    if str(name).lower() == "kl":
        return "kl"
    if str(name).upper() in DECODER_SIZES:
        return str(name).upper()
    raise UserError(f"unknown decoder {name!r}: choose from {', '.join(DECODERS)}")


def load_quality(path: str, metric: str) -> dict:
    """Read and check the quality file: {"im_size", "encoder", "rows": [{"name", "decoder", "steps", metric...}]}."""
    try:
        with open(path) as f:
            q = json.load(f)
    except FileNotFoundError:
        raise UserError(f"--quality file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--quality file {path} is not valid JSON: {e}") from None
    if not isinstance(q, dict) or not isinstance(q.get("im_size"), int) or not isinstance(q.get("rows"), list):
        raise UserError(f"--quality file {path} needs an integer 'im_size' and a list 'rows'")
    for r in q["rows"]:
        if not isinstance(r, dict) or "decoder" not in r or "name" not in r:
            raise UserError(f"--quality file {path}: every row needs 'name' and 'decoder', got {r!r}")
        r["decoder"] = canonical_decoder(r["decoder"])
        r["steps"] = 1 if r["decoder"] == "kl" else int(r.get("steps", 1))
    if not any(isinstance(r.get(metric), (int, float)) for r in q["rows"]):
        raise UserError(f"no row of --quality file {path} has a numeric {metric!r} (see --quality-metric)")
    return q


# ----------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------


class CpuPeakMemory:
    """Peak resident memory of this process above a baseline, via Linux's resettable high-water mark (VmHWM).

    Writing "5" to /proc/self/clear_refs resets VmHWM to the current RSS; `available` is False elsewhere.
    Freed heap memory is handed back to the OS first (malloc_trim) so that a previous, larger configuration
    does not leave cached pages that the next one reuses without raising the peak.
    """

    def __init__(self):
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:
            self._trim = None
        self.available = self._reset()

    @staticmethod
    def _status_kb(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise OSError(f"{field} not in /proc/self/status")

    def _reset(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._status_kb("VmHWM")
            return True
        except OSError:
            return False

    def start(self):
        if self._trim is not None:
            self._trim(0)
        self._reset()
        self.baseline_kb = self._status_kb("VmRSS")

    def peak_mb(self) -> float:
        return (self._status_kb("VmHWM") - self.baseline_kb) / 1024

    def resident_peak_mb(self) -> float:
        """The whole process's peak resident memory since `start` (torch, the model, inputs and the decode)."""
        return self._status_kb("VmHWM") / 1024


def is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and ("out of memory" in str(e) or "can't allocate memory" in str(e))
    )


def decode_call(fn, inputs, cfg, device, amp_dtype):
    """One decode of `inputs` (latents and SSDD's starting noise, both already on the device: drawing and copying
    them is not part of decoding) with the configuration's steps and attention path, as a timeable call."""
    z, noise = inputs
    return inference(lambda: fn(z, noise, cfg["steps"], cfg["attention"]), device, amp_dtype)


class CostModel:
    """Predicts one call's seconds from the largest config already measured for the same decoder.

    Cost is taken as proportional to batch * px^2 * steps (SSDD) or batch * px^2 (KL), and for dense attention
    times (px / px_measured)^2 more (its attention grows with the square of the area). Larger batches are usually
    cheaper per image, so extrapolating upwards overestimates: skipping errs on the safe side.
    """

    def __init__(self):
        self.best = {}  # decoder key -> (work, px, seconds per call)

    @staticmethod
    def work(cfg) -> float:
        return cfg["batch"] * cfg["px"] ** 2 * cfg["steps"]

    def add(self, cfg, seconds: float):
        key = cost_key(cfg)
        if key not in self.best or self.work(cfg) >= self.best[key][0]:
            self.best[key] = (self.work(cfg), cfg["px"], seconds)

    def estimate(self, cfg):
        known = self.best.get(cost_key(cfg))
        if known is None:
            return None
        work, px, seconds = known
        quadratic = cfg.get("attention_path") == "dense" and cfg["px"] > px
        return seconds * self.work(cfg) / work * ((cfg["px"] / px) ** 2 if quadratic else 1)


def decoder_key(cfg) -> tuple:
    """One model per key: the attention path is switched on the same model."""
    return (cfg["decoder"], cfg["encoder"], cfg.get("kl_base_channels"))


def cost_key(cfg) -> tuple:
    return (*decoder_key(cfg), cfg.get("attention"))


def label(row) -> str:
    if row["decoder"] == "kl":
        return f"KL-VAE (base {row['kl_base_channels']})"
    mode = row.get("attention") or "auto"
    return f"SSDD-{row['decoder']}" + ("" if mode == "auto" else f" ({mode})")


def attention_memory_skip(cfg, device, args) -> str | None:
    """A reason to skip an SSDD configuration whose attention would not fit, before it runs (CPU only: there the
    kernel's out-of-memory killer, not an exception, would end the run). None when it fits."""
    if cfg["decoder"] == "kl" or device.type != "cpu":
        return None
    grid = (cfg["px"] // TOKEN_STRIDE, cfg["px"] // TOKEN_STRIDE)
    need = attention_memory_bytes(cfg["attention_path"], grid, DECODER_SIZES[cfg["decoder"]]["heads"], cfg["batch"])
    limit = args.max_memory_gb
    if limit is None:
        available = available_memory("cpu")
        limit = None if available is None else available / 2**30 / 2
    if limit is not None and need / 2**30 > limit:
        return (f"memory: {cfg['attention_path']} attention over {grid[0] * grid[1]} tokens needs about "
                f"{need / 2**30:.1f} GB (index, bias, scores), over the {limit:.1f} GB allowed "
                f"(--max-memory-gb; default half of the memory available)")
    return None


def prepare(cfg, fn, device, amp_dtype, args, costs: CostModel):
    """Skip checks, first call and warm-up of one configuration: a skipped row (dict), or (inputs, first call
    seconds)."""
    n_calls = args.warmup + args.repeats
    too_big = attention_memory_skip(cfg, device, args)
    if too_big:
        return {"status": "skipped", "reason": too_big}
    est = costs.estimate(cfg)
    if est is not None and est * n_calls > args.max_seconds_per_config:
        return {"status": "skipped", "reason": f"time budget: estimated {est * n_calls:.0f} s for {n_calls} calls "
                f"> --max-seconds-per-config {args.max_seconds_per_config:g}"}
    inputs = decoder_inputs(cfg["batch"], cfg["latent"], cfg["px"], device)
    call = decode_call(fn, inputs, cfg, device, amp_dtype)
    first = timed(call, device)
    costs.add(cfg, first)
    # The first call may include one-off work (compilation, kernel selection); only a clear overrun stops here.
    if first * (n_calls - 1) > args.max_seconds_per_config and not args.compile:
        return {"status": "skipped", "first_call_s": round(first, 3),
                "reason": f"time budget: one call took {first:.1f} s, {n_calls} calls exceed "
                          f"--max-seconds-per-config {args.max_seconds_per_config:g}"}
    for _ in range(args.warmup - 1):
        timed(call, device)
    return inputs, first


def peak_memory(cfg, fn, inputs, device, amp_dtype, cpu_mem: CpuPeakMemory):
    """(MB above what was held before, MB held in all at the peak, how measured) of one call made with the attention
    index cache cleared, so the peak includes the index tensors the path builds for this grid. On a CPU "in all" is
    the process's resident peak over this call alone (VmHWM reset before it), on CUDA the allocated peak."""
    clear_attention_cache()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    elif cpu_mem.available:
        cpu_mem.start()
    timed(decode_call(fn, inputs, cfg, device, amp_dtype), device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        return (peak - base) / 2**20, peak / 2**20, "cuda_max_allocated_above_model"
    if cpu_mem.available:
        return cpu_mem.peak_mb(), cpu_mem.resident_peak_mb(), "rss_hwm_above_baseline"
    return None, None, "unavailable"


def measure_group(group, fn, device, amp_dtype, args, costs: CostModel, cpu_mem: CpuPeakMemory) -> list:
    """Rows (status 'ok' or 'skipped' with a reason) of configurations that differ only in the attention path.

    Their timed calls take turns (a, b, a, b, ...), so the load of a shared machine falls on every path alike
    and their ratio holds even when absolute times do not; then one more call each measures peak memory.
    """
    rows = [None] * len(group)
    live = {}  # index -> (inputs, first)

    def out_of_memory(i, e) -> bool:  # out-of-memory ends this configuration only; anything else re-raises
        if not is_oom(e):
            return False
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows[i] = {"status": "skipped", "reason": f"out of memory ({type(e).__name__})", "oom": True}
        live.pop(i, None)
        return True

    def guarded(i, action):
        try:
            return action()
        except Exception as e:  # noqa: BLE001 - see out_of_memory
            if not out_of_memory(i, e):
                raise
            return None

    for i, cfg in enumerate(group):
        prep = guarded(i, lambda cfg=cfg: prepare(cfg, fn, device, amp_dtype, args, costs))
        if isinstance(prep, dict):
            rows[i] = prep
        elif prep is not None:
            live[i] = prep
    calls = {i: decode_call(fn, live[i][0], group[i], device, amp_dtype) for i in live}
    times = take_turns(calls, args.repeats, device, skip=out_of_memory)
    for i in list(live):
        inputs, first = live[i]
        cfg = group[i]
        memory = guarded(i, lambda cfg=cfg, inputs=inputs: peak_memory(cfg, fn, inputs, device, amp_dtype, cpu_mem))
        if memory is None:
            continue
        peak, resident, mem_kind = memory
        t = times[i]
        median = statistics.median(t)
        costs.add(cfg, median)
        rows[i] = {"status": "ok", "images_per_s": cfg["batch"] / median, "ms_per_image": 1000 * median / cfg["batch"],
                   "median_s": median, "times_s": [round(x, 5) for x in t], "spread": round(max(t) / min(t), 3),
                   "first_call_s": round(first, 4), "peak_mb": None if peak is None else round(peak, 1),
                   "resident_peak_mb": None if resident is None else round(resident, 1), "memory": mem_kind}
    return rows


def configurations(args, quality) -> list:
    """Every (decoder, steps, px, batch) to run, grouped by decoder and in increasing cost within a decoder.

    The KL decoder is deterministic and single-pass, so it runs once per (px, batch) whatever --steps says.
    With a quality file, its decoder configurations are added at its im_size and encoder.
    """
    wanted = []  # (decoder, encoder, kl_base, steps, px, attention)
    for d in args.decoders:
        for px in args.sizes:
            for s in ([1] if d == "kl" else args.steps):
                for a in ([None] if d == "kl" else args.attention):
                    wanted.append((d, args.encoder, args.kl_base_channels if d == "kl" else None, s, px, a))
    if quality is not None:
        enc = quality.get("encoder", args.encoder)
        for r in quality["rows"]:
            kl_base = int(r.get("kl_base_channels", args.kl_base_channels)) if r["decoder"] == "kl" else None
            wanted.append((r["decoder"], enc, kl_base, r["steps"], quality["im_size"],
                           None if r["decoder"] == "kl" else args.attention[0]))
    seen, cfgs = set(), []
    for d, enc, kl_base, s, px, a in wanted:
        for b in args.batch_sizes:
            key = (d, enc, kl_base, s, px, b, a)
            if key not in seen:
                seen.add(key)
                cfgs.append({"decoder": d, "encoder": enc, "kl_base_channels": kl_base, "steps": s, "px": px,
                             "batch": b, "attention": a})
    order = {k: i for i, k in enumerate(dict.fromkeys(decoder_key(c) for c in cfgs))}
    cfgs.sort(key=lambda c: (order[decoder_key(c)], c["px"], c["steps"], c["batch"]))
    for c in cfgs:
        f = parse_encoder_name(c["encoder"])[0]
        if c["px"] % max(f, 8):
            raise UserError(f"image size {c['px']} must be a multiple of {max(f, 8)} for encoder {c['encoder']}")
    return cfgs


def run_all(cfgs, device, amp_dtype, args) -> list:
    costs, cpu_mem, rows, oom_at = CostModel(), CpuPeakMemory(), [], {}
    current_key, fn, n_params = None, None, None
    groups = {}  # configurations that differ only in the attention path are measured together
    for cfg in cfgs:
        groups.setdefault((decoder_key(cfg), cfg["steps"], cfg["px"], cfg["batch"]), []).append(cfg)
    bar = tqdm(groups.values(), desc="decoder configs", unit="cfg")
    for group in bar:
        key = decoder_key(group[0])
        if key != current_key:  # one model in memory at a time
            fn = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            fn, n_params, latent = build_decode_fn(group[0]["decoder"], group[0]["encoder"],
                                                   group[0]["kl_base_channels"] or 128, device, args.compile,
                                                   args.channels_last)
            current_key = key
        c = group[0]
        bar.set_postfix_str(f"{label(c)} {c['steps']} step {c['px']} px x{c['batch']}")
        grid = (c["px"] // TOKEN_STRIDE, c["px"] // TOKEN_STRIDE)
        group = [{**cfg, "latent": latent, "attention_path": None if cfg["decoder"] == "kl"  # the path taken here
                  else resolve_attention(cfg["attention"], 8, grid, device)} for cfg in group]
        todo, out = [], {}
        for i, cfg in enumerate(group):
            # Memory grows with px and batch but hardly with steps: a smaller config that ran out rules this one out.
            small = oom_at.get(cost_key(cfg))
            if small is not None and cfg["px"] >= small[0] and cfg["batch"] >= small[1]:
                out[i] = {"status": "skipped", "reason": f"out of memory already at {small[0]} px, batch {small[1]}"}
            else:
                todo.append(i)
        results = measure_group([group[i] for i in todo], fn, device, amp_dtype, args, costs, cpu_mem)
        for i, result in zip(todo, results):
            if result.pop("oom", False):
                oom_at[cost_key(group[i])] = (group[i]["px"], group[i]["batch"])
            out[i] = result
        for i, cfg in enumerate(group):
            cfg = {k: v for k, v in cfg.items() if k != "latent"}
            rows.append({"label": label(cfg), **cfg, "params": n_params, **out[i]})
    return rows


# ----------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------


def find(rows, decoder, steps, px, batch, encoder, kl_base=None, attention=None):
    """The measured row of this configuration; attention None matches any mode (the KL-VAE has none)."""
    for r in rows:
        if (r["status"] == "ok" and r["decoder"] == decoder and r["steps"] == steps and r["px"] == px
                and r["batch"] == batch and r["encoder"] == encoder and r["kl_base_channels"] == kl_base
                and (attention is None or r.get("attention") == attention)):
            return r
    return None


def noisy_mark(*rows) -> str:
    """' *' when any of the rows had disturbed timings (see NOISY_SPREAD), else ''."""
    return " *" if any(r["spread"] > NOISY_SPREAD for r in rows) else ""


def ratio_lines(rows, args) -> list:
    """SSDD 1-step vs KL-VAE and SSDD 1-step vs N-step throughput, for each size/px/batch measured in this run."""
    lines = []
    others = [s for s in args.steps if s != 1]
    for d in args.decoders:
        if d == "kl":
            continue
        for a in args.attention:
            name = label({"decoder": d, "attention": a})
            for px in args.sizes:
                for b in args.batch_sizes:
                    one = find(rows, d, 1, px, b, args.encoder, attention=a)
                    if one is None:
                        continue
                    parts = []
                    kl = find(rows, "kl", 1, px, b, args.encoder, args.kl_base_channels)
                    if kl is not None:
                        parts.append(f"1-step throughput = {one['images_per_s'] / kl['images_per_s']:.2f}x "
                                     f"KL-VAE (base {args.kl_base_channels}){noisy_mark(one, kl)}")
                    for s in others:
                        many = find(rows, d, s, px, b, args.encoder, attention=a)
                        if many is not None:
                            parts.append(f"1-step = {one['images_per_s'] / many['images_per_s']:.2f}x {s}-step"
                                         f"{noisy_mark(one, many)}")
                    if parts:
                        lines.append(f"- {name}, {px} px, batch {b}: " + "; ".join(parts))
    return lines


def growth_lines(rows, args) -> list:
    """Cost growth with image size: dense vs local at each size, and each mode's time and memory from the smallest
    to the largest size it ran at (per SSDD decoder, steps and batch), all from this run."""
    lines = []
    for d in [d for d in args.decoders if d != "kl"]:
        for s in args.steps:
            for b in args.batch_sizes:
                if "dense" in args.attention and "local" in args.attention:
                    for px in args.sizes:
                        dense = find(rows, d, s, px, b, args.encoder, attention="dense")
                        local = find(rows, d, s, px, b, args.encoder, attention="local")
                        if dense and local:
                            mem = (f", peak memory dense / local = {dense['peak_mb']:.0f} / {local['peak_mb']:.0f} MB"
                                   if dense["peak_mb"] and local["peak_mb"] else "")
                            lines.append(f"- SSDD-{d}, {s} step(s), {px} px, batch {b}: dense time / local time = "
                                         f"{dense['median_s'] / local['median_s']:.2f}{noisy_mark(dense, local)}{mem}")
                for a in args.attention:
                    ok = [r for r in rows if r["status"] == "ok" and r["decoder"] == d and r["steps"] == s
                          and r["batch"] == b and r.get("attention") == a and r["encoder"] == args.encoder]
                    if len(ok) < 2:
                        continue
                    lo, hi = min(ok, key=lambda r: r["px"]), max(ok, key=lambda r: r["px"])
                    area = (hi["px"] / lo["px"]) ** 2
                    mem = (f", peak memory x{hi['peak_mb'] / lo['peak_mb']:.1f}" if lo["peak_mb"] and hi["peak_mb"]
                           else "")
                    lines.append(f"- {label(hi)}, {s} step(s), batch {b}, {lo['px']} -> {hi['px']} px "
                                 f"(area x{area:g}): time x{hi['median_s'] / lo['median_s']:.1f}"
                                 f"{noisy_mark(lo, hi)}{mem}")
    return lines


def cost_growth_figure(path, rows, report) -> None:
    """Time per image and peak memory against image size (log-log), one line per SSDD decoder, attention, steps
    and batch (and the KL-VAE per batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for r in rows:
        if r["status"] == "ok":
            name = f"{label(r)}" + ("" if r["decoder"] == "kl" else f", {r['steps']} step") + f", batch {r['batch']}"
            series.setdefault(name, []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, pts in series.items():
        pts = sorted(pts, key=lambda r: r["px"])
        style = "--" if any(r.get("attention") == "dense" for r in pts) else "-"
        px = [r["px"] for r in pts]
        axes[0].plot(px, [r["ms_per_image"] for r in pts], style, marker="o", label=name)
        mem = [(r["px"], r["peak_mb"]) for r in pts if r["peak_mb"]]
        if mem:
            axes[1].plot(*zip(*mem), style, marker="o", label=name)
    where = report["machine"]["gpu"] or "CPU"
    for ax, what in zip(axes, ("ms per image (median)", "peak memory above the model (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("image side (px)")
        ax.set_ylabel(what)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Decoder cost against image size ({where}, {report['settings']['dtype']}; dashed: dense attention)",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def markdown(report) -> str:
    m, s = report["machine"], report["settings"]
    where = m["gpu"] if m["gpu"] else f"{m['cpu']}, {m['torch_threads']} threads"
    out = [f"# Decoder throughput ({where})", "",
           f"{report['date']}, torch {m['torch']}, {s['dtype']}, encoder {s['encoder']}, "
           f"warm-up {s['warmup']}, median of {s['repeats']}{', torch.compile' if s['compile'] else ''}; "
           f"{WEIGHTS_NOTE}. Peak MB: memory above the loaded model during decoding; resident MB: all the "
           f"memory held at that peak, model and inputs included "
           f"({'CUDA max allocated' if m['gpu'] else 'peak RSS of the process, reset before each configuration'}). "
           f"Load average (1, 5, 15 min) at start "
           f"{m['load_average']}, at end {m.get('load_average_end')}.", "",
           f"Command: `{report['command']}`", ""]
    if report.get("user_note"):
        out += [f"Note: {report['user_note']}", ""]
    out += ["| decoder | steps | px | batch | images/s | ms/image | peak MB | resident MB | attention path |",
            "|---|---|---|---|---|---|---|---|---|"]
    noisy = False
    for r in report["rows"]:
        if r["status"] == "ok":
            peak = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
            resident = "n/a" if r.get("resident_peak_mb") is None else f"{r['resident_peak_mb']:.0f}"
            mark = noisy_mark(r)
            noisy = noisy or bool(mark)
            out.append(f"| {r['label']} | {r['steps']} | {r['px']} | {r['batch']} | {r['images_per_s']:.3g}{mark} | "
                       f"{r['ms_per_image']:.1f} | {peak} | {resident} | {r.get('attention_path') or '-'} |")
    skipped = [r for r in report["rows"] if r["status"] != "ok"]
    if skipped:
        out += ["", "Skipped:", ""]
        out += [f"- {r['label']}, {r['steps']} step(s), {r['px']} px, batch {r['batch']}: {r['reason']}"
                for r in skipped]
    out += ["", "Throughput ratios (same run, same px and batch):", ""]
    out += report["ratios"] or ["- none: a ratio needs the 1-step SSDD row and the KL-VAE or N-step row measured"]
    if report.get("growth"):
        out += ["", "Cost growth with image size (same run; figure `*_cost_growth.png`):", "", *report["growth"]]
    if noisy:
        out += ["", f"\\* noisy: the slowest timed call took more than {NOISY_SPREAD}x the fastest (see times_s in "
                "the JSON); a ratio marked * involves such a row."]
    q = report.get("quality")
    if q:
        metric = q["metric"]
        out += ["", f"Quality vs speed ({q['file']}, {q['im_size']} px; figure `*_quality_vs_speed.png`):", "",
                f"| name | images/s | batch | {metric} |", "|---|---|---|---|"]
        out += [f"| {p['name']} | {p['images_per_s']:.3g} | {p['batch']} | {p[metric]:.4g} |" for p in q["points"]]
        out += [f"- left out: {n}" for n in q["notes"]]
    return "\n".join(out) + "\n"


def quality_figure(path, quality, rows, metric, report) -> list:
    """Scatter of quality vs images/s; returns the points and notes on quality rows that could not be placed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    enc, px = quality.get("encoder", report["settings"]["encoder"]), quality["im_size"]
    points, notes = [], []
    for q in quality["rows"]:
        if not isinstance(q.get(metric), (int, float)):
            notes.append(f"{q['name']}: no numeric {metric}")
            continue
        kl_base = (int(q.get("kl_base_channels", report["settings"]["kl_base_channels"])) if q["decoder"] == "kl"
                   else None)
        measured = [r for r in rows if r["status"] == "ok" and r["decoder"] == q["decoder"] and r["steps"] == q["steps"]
                    and r["px"] == px and r["encoder"] == enc and r["kl_base_channels"] == kl_base]
        if not measured:
            notes.append(f"{q['name']}: not measured in this run (skipped)")
            continue
        r = max(measured, key=lambda r: r["batch"])
        points.append((q["name"], r["images_per_s"], q[metric], r["batch"]))
    if not points:
        raise UserError(f"no quality row could be matched to a measured configuration at {px} px: {'; '.join(notes)}")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ips, val, b in points:
        ax.scatter(ips, val, s=40)
        ax.annotate(f"{name} (batch {b})", (ips, val), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.margins(x=0.35, y=0.15)  # room for the labels right of the points
    ax.set_xlabel(f"decoding throughput, images/s ({px} px, {report['settings']['dtype']}, "
                  f"{report['machine']['gpu'] or 'CPU'})")
    ax.set_ylabel(f"{metric} ({METRICS[metric]} is better)")
    ax.set_title(f"Quality vs speed ({enc}; speed with random weights)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    return [{"name": n, "images_per_s": ips, metric: val, "batch": b} for n, ips, val, b in points], notes


def benchmark(args) -> None:
    args.decoders = [canonical_decoder(d) for d in args.decoders]
    parse_encoder_name(args.encoder)
    for name, vals in [("--steps", args.steps), ("--sizes", args.sizes), ("--batch-sizes", args.batch_sizes)]:
        if any(v < 1 for v in vals):
            raise UserError(f"{name} must be positive integers, got {vals}")
    if args.repeats < 1 or args.warmup < 1:
        raise UserError("--warmup and --repeats must be >= 1")
    device = pick_device(args.device)
    amp_dtype, dtype_name = autocast_dtype(args.dtype, device)
    if args.compile and device.type != "cuda":
        raise UserError("--compile is for GPU runs only (on CPU compilation dominates a short benchmark)")
    if args.channels_last and device.type != "cuda":
        raise UserError("--channels-last is for GPU runs only")
    if device.type == "cuda":
        enable_tf32()  # as the trainers: TF32 for whatever runs in fp32
    quality = load_quality(args.quality, args.quality_metric) if args.quality else None
    cfgs = configurations(args, quality)

    machine = machine_info(device)
    rows = run_all(cfgs, device, amp_dtype, args)
    machine["load_average_end"] = load_average()
    report = {"machine": machine, "date": today(),
              "command": command_line("eval/decoder_benchmark.py", args.argv), "note": WEIGHTS_NOTE,
              "user_note": args.note,
              "settings": {"device": str(device), "dtype": dtype_name, "encoder": args.encoder,
                           "kl_base_channels": args.kl_base_channels, "warmup": args.warmup,
                           "repeats": args.repeats, "compile": args.compile, "channels_last": args.channels_last,
                           "attention": args.attention, "max_seconds_per_config": args.max_seconds_per_config},
              "rows": rows}
    report["ratios"] = ratio_lines(rows, args)
    report["growth"] = growth_lines(rows, args)
    written = []
    if quality is not None:
        fig_path = args.out + "_quality_vs_speed.png"
        points, notes = quality_figure(fig_path, quality, rows, args.quality_metric, report)
        report["quality"] = {"file": args.quality, "metric": args.quality_metric, "im_size": quality["im_size"],
                             "points": points, "notes": notes}
        written.append(fig_path)
    if len({r["px"] for r in rows if r["status"] == "ok"}) > 1:
        cost_growth_figure(args.out + "_cost_growth.png", rows, report)
        written.append(args.out + "_cost_growth.png")
    md = markdown(report)
    written = write_report(args.out, report, md) + written
    print(md)
    print("wrote " + ", ".join(written))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--decoders", nargs="+", default=["kl", "S", "B", "M", "L", "XL", "H"],
                    help=f"kl (KL-VAE) and/or SSDD sizes: {', '.join(DECODER_SIZES)}")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 8], help="SSDD sampler steps (KL-VAE: always 1)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512], help="image side in pixels")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--encoder", default="f8c4", help="latent format f<F>c<C> (sets latent shape and KL-VAE depth)")
    ap.add_argument("--kl-base-channels", type=int, default=128, help="KL-VAE decoder base width (SD-VAE: 128)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", default="auto", choices=["auto", *AUTOCAST_DTYPES],
                    help="auto: bf16 autocast on CUDA, fp32 on CPU")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decoder (GPU only)")
    ap.add_argument("--channels-last", action="store_true", help="channels-last convolutions (GPU only)")
    ap.add_argument("--attention", nargs="+", default=["auto"], choices=ATTENTION_MODES,
                    help="SSDD attention path(s) to measure: auto (what decode() uses), dense (the reference), "
                         "local (windowed), flex (FlexAttention)")
    ap.add_argument("--max-memory-gb", type=float, default=None,
                    help="CPU: skip configurations whose attention needs more (default: half the available memory)")
    ap.add_argument("--max-seconds-per-config", type=float, default=120.0,
                    help="skip a configuration whose warm-up + repeats are estimated to take longer")
    ap.add_argument("--quality", default=None,
                    help="quality JSON (im_size, encoder, rows) for the quality-vs-speed plot")
    ap.add_argument("--quality-metric", default="fd_classifier", choices=list(METRICS))
    ap.add_argument("--out", default="docs/reports/decoder_benchmark", help="output path without extension")
    ap.add_argument("--note", default=None, help="free text recorded in the JSON and Markdown (e.g. machine load)")
    return run_script(ap, benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())

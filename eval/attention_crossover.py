"""Where local attention starts to beat dense: one decoder attention layer, dense vs windowed, across grid sizes.

    OMP_NUM_THREADS=1 python eval/attention_crossover.py --grids 16 20 24 28 32 40 48 64 --widths 96 288 \
        --out docs/reports/attention_crossover_cpu

One `tokenizer.decoder.Attention` layer with its relative bias (4 heads, random weights) on a batch of one square
token grid, forward only (what decoding runs), timed per path with the index tensors cached, the two paths taking
turns call by call so a shared machine's load falls on both alike; the fastest of --repeats calls is kept (the
least disturbed). `tokenizer.decoder.DENSE_MAX_TOKENS`, the largest grid `auto` keeps dense when FlexAttention is
not available, comes from this measurement. Writes <out>.json and <out>.md.
"""

import argparse
import sys

import torch

from eval.lib.report import command_line, machine_info, markdown_table, run_script, today, write_report
from eval.lib.timing import inference, take_turns
from tokenizer.common.errors import UserError
from tokenizer.decoder import DENSE_MAX_TOKENS, Attention, RelativePositionBias, attention_plan


def time_paths(width: int, grid: int, repeats: int, heads: int = 4) -> dict:
    torch.manual_seed(0)
    attn, rpb = Attention(width, heads), RelativePositionBias(8, heads)
    x = torch.randn(1, grid * grid, width)
    plans = {mode: attention_plan(mode, 8, (grid, grid), "cpu") for mode in ("dense", "local")}
    calls = {mode: inference(lambda plan=plan: attn(x, rpb, plan), "cpu") for mode, plan in plans.items()}
    best = {mode: min(times) for mode, times in take_turns(calls, repeats, "cpu", warmup=1).items()}
    return {"width": width, "grid": f"{grid}x{grid}", "tokens": grid * grid, "px": 8 * grid,
            "dense_ms": 1000 * best["dense"], "local_ms": 1000 * best["local"],
            "dense_over_local": best["dense"] / best["local"]}


def run(args) -> list:
    if any(g < 1 for g in args.grids) or any(w % 4 for w in args.widths) or args.repeats < 1:
        raise UserError("--grids must be positive, --widths multiples of the 4 heads, --repeats >= 1")
    rows = [time_paths(w, g, args.repeats) for w in args.widths for g in args.grids]
    for r in rows:
        print(f"width {r['width']} grid {r['grid']}: dense {r['dense_ms']:.2f} ms, local {r['local_ms']:.2f} ms "
              f"(dense / local {r['dense_over_local']:.2f})", flush=True)
    machine = machine_info("cpu")
    record = {"machine": machine, "date": today(), "command": command_line("eval/attention_crossover.py", args.argv),
              "dense_max_tokens": DENSE_MAX_TOKENS, "rows": rows}
    table = markdown_table(rows, [("tokens", "tokens", "{}"), ("px", "image px", "{}"),
                                  ("dense_ms", "dense ms", "{:.2f}"), ("local_ms", "local ms", "{:.2f}"),
                                  ("dense_over_local", "dense / local", "{:.2f}")],
                           lead=[("width", "width"), ("grid", "grid")])
    text = ["# Dense vs local attention, one decoder layer", "",
            f"{machine['cpu']}, {machine['torch_threads']} thread(s), torch {machine['torch']}, {record['date']}, load "
            f"average {machine['load_average']}; 4 heads, batch 1, forward, fastest of {args.repeats} alternating "
            f"calls. `auto` keeps dense up to {DENSE_MAX_TOKENS} tokens.", "", f"Command: `{record['command']}`", "",
            *table]
    write_report(args.out, record, "\n".join(text) + "\n")
    print(f"wrote {args.out}.json and {args.out}.md")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grids", type=int, nargs="+", default=[16, 20, 24, 28, 32, 40, 48, 64], help="token grid sides")
    ap.add_argument("--widths", type=int, nargs="+", default=[96, 288], help="transformer widths (XS: 96, M: 288)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default="docs/reports/attention_crossover")
    return run_script(ap, run, argv)


if __name__ == "__main__":
    sys.exit(main())

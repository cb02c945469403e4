"""Plot the training losses of one or more runs (from their losses.jsonl) into a PNG.

    python eval/plot_losses.py runs/jobs/fmnist_f8c4_XS --out docs/reports/fmnist_training_loss.png
"""

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from eval.lib.report import save_figure  # noqa: E402
from tokenizer.common.errors import run_cli  # noqa: E402
from tokenizer.common.runs import read_loss_log  # noqa: E402


def smooth(values: list, window: int) -> list:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot(args) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for run in args.runs:
        records = read_loss_log(run)
        steps = list(records)
        for key in args.keys:
            values = [records[s][key] for s in steps if key in records[s]]
            if values:
                name = os.path.basename(run.rstrip("/"))
                ax.plot(steps[: len(values)], smooth(values, args.smooth), label=f"{name} {key}")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(f"loss (moving average over {args.smooth} steps)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, args.out)
    print(f"saved {args.out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (runs/jobs/<run_name>)")
    ap.add_argument("--keys", nargs="+", default=["diffusion"],
                    help="loss names to plot (diffusion, kl, lpips, repa, loss)")
    ap.add_argument("--smooth", type=int, default=20)
    ap.add_argument("--out", default="losses.png")
    return run_cli(plot, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

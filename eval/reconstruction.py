"""Reconstruction quality of an SSDD checkpoint at several decoder step counts, side by side.

    python eval/reconstruction.py --steps 1 8 -- config=configs/fmnist.yaml ssdd.checkpoint=fmnist_f8c4_XS

Everything after `--` is the usual tokenizer config (`key=value`). For each step count the whole eval split is
reconstructed from the same fixed noise (seed 0 per process) and scored on 8-bit images: PSNR over the whole set,
SSIM, LPIPS (AlexNet) and rFID when their weights are available. Writes `<out>.json`, `<out>.md` and a grid
`<out>.png` (rows: input, then one row per step count); by default into the checkpoint's results folder
(`<run>/results/step<N>/reconstruction.*` for a run's checkpoint).
"""

import argparse
import os
import sys
import time

import torch

from eval.lib.report import command_line, machine_info, markdown_table, row_notes, run_script, today, write_report
from tokenizer.common.config import load_config
from tokenizer.common.runs import results_dir, save_grid
from tokenizer.common.validation import check_config
from tokenizer.config_checks import SSDD_CHECKS
from tokenizer.evaluation import load_for_eval, reconstruct_split

COLUMNS = [("psnr", "PSNR (dB) ↑", "{:.2f}"), ("ssim", "SSIM ↑", "{:.4f}"), ("lpips", "LPIPS ↓", "{:.4f}"),
           ("rfid", "rFID ↓", "{:.2f}"), ("mse", "MSE ↓", "{:.5f}")]


def markdown(rows: list, header: str) -> str:
    lines = [header, ""] + markdown_table(rows, COLUMNS, lead=[("steps", "steps")])
    notes = row_notes(rows)
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"


def evaluate(args) -> None:
    cfg = check_config(load_config("ssdd.yaml", args.overrides), SSDD_CHECKS)
    accelerator, model, dataset, ckpt = load_for_eval(cfg)
    out = args.out or os.path.join(results_dir(ckpt), "reconstruction")  # outside checkpoints/: saves keep it
    rows, decoded = [], []
    fixed = torch.stack([dataset[i][0] for i in range(cfg.show_samples)]).to(accelerator.device)
    for steps in args.steps:
        t0 = time.time()
        r = reconstruct_split(cfg, accelerator, model, dataset, steps)
        if accelerator.is_main_process:
            rows.append({"steps": steps, "seconds": round(time.time() - t0, 1), **r})
            with torch.no_grad():
                g = torch.Generator(accelerator.device).manual_seed(0)
                decoded.append(model.decode(model.encode(fixed).mode(), steps=steps, generator=g))
    if not accelerator.is_main_process:
        return
    meta = {"checkpoint": ckpt, "split": cfg.eval.split, "n_images": rows[0]["n_images"],
            "im_size": cfg.dataset.im_size, "dataset": cfg.dataset.name, "machine": machine_info(accelerator.device),
            "date": today(), "command": command_line("eval/reconstruction.py", args.argv)}
    header = (f"Reconstruction of {meta['n_images']} {cfg.dataset.name} {cfg.eval.split} images "
              f"({cfg.dataset.im_size} px), {os.path.relpath(ckpt)}")
    write_report(out, {**meta, "results": rows}, markdown(rows, header))
    save_grid(out + ".png", [fixed] + decoded)
    print(markdown(rows, header))
    print(f"wrote {out}.json, .md, .png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 8], help="decoder step counts to compare")
    ap.add_argument("--out", default=None, help="output path without extension (default: beside the checkpoint)")
    ap.add_argument("overrides", nargs="*", help="tokenizer config overrides, key=value")
    return run_script(ap, evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())

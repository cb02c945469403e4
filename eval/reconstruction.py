"""Reconstruction quality of an SSDD checkpoint at several decoder step counts, side by side.

    python eval/reconstruction.py --steps 1 8 -- config=configs/fmnist.yaml ssdd.checkpoint=fmnist_f8c4_XS

Everything after `--` is the usual tokenizer config (`key=value`). For each step count the whole eval split is
reconstructed from the same fixed noise (seed 0 per process) and scored on 8-bit images: PSNR over the whole set,
SSIM, LPIPS (AlexNet) and rFID when their weights are available. Writes `<out>.json`, `<out>.md` and a grid
`<out>.png` (rows: input, then one row per step count).
"""

import argparse
import json
import os
import platform
import sys
import time

import torch

from tokenizer.config import load_config
from tokenizer.errors import run_cli
from tokenizer.train import load_for_eval, reconstruct_split, save_grid

COLUMNS = [("psnr", "PSNR (dB) ↑", "{:.2f}"), ("ssim", "SSIM ↑", "{:.4f}"), ("lpips", "LPIPS ↓", "{:.4f}"),
           ("rfid", "rFID ↓", "{:.2f}"), ("mse", "MSE ↓", "{:.5f}")]


def markdown(rows: list, header: str) -> str:
    lines = [header, "", "| steps | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for r in rows:
        cells = [fmt.format(r[k]) if r.get(k) is not None else "n/a" for k, _, fmt in COLUMNS]
        lines.append(f"| {r['steps']} | " + " | ".join(cells) + " |")
    notes = sorted({n for r in rows for n in (r.get("notes") or [])})
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"


def evaluate(args) -> None:
    cfg = load_config("ssdd.yaml", args.overrides)
    accelerator, model, dataset, ckpt = load_for_eval(cfg)
    out = args.out or os.path.join(os.path.dirname(ckpt), "reconstruction")
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
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    meta = {"checkpoint": ckpt, "split": cfg.eval.split, "n_images": rows[0]["n_images"],
            "im_size": cfg.dataset.im_size, "dataset": cfg.dataset.name, "machine": platform.node(),
            "device": str(accelerator.device), "date": time.strftime("%Y-%m-%d"),
            "command": "python eval/reconstruction.py " + " ".join(args.argv)}
    with open(out + ".json", "w") as f:
        json.dump({**meta, "results": rows}, f, indent=2)
    header = (f"Reconstruction of {meta['n_images']} {cfg.dataset.name} {cfg.eval.split} images "
              f"({cfg.dataset.im_size} px), {os.path.relpath(ckpt)}")
    with open(out + ".md", "w") as f:
        f.write(markdown(rows, header))
    save_grid(out + ".png", [fixed] + decoded)
    print(markdown(rows, header))
    print(f"wrote {out}.json, .md, .png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 8], help="decoder step counts to compare")
    ap.add_argument("--out", default=None, help="output path without extension (default: beside the checkpoint)")
    ap.add_argument("overrides", nargs="*", help="tokenizer config overrides, key=value")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(evaluate, args)


if __name__ == "__main__":
    sys.exit(main())

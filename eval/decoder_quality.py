"""Reconstruction quality of several decoders on the same encoder and eval split: the equal-budget table.

    python eval/decoder_quality.py --out docs/reports/decoder_quality \
        --entry "KL-VAE=fmnist_f8c4_kl:1" --entry "SSDD-XS teacher=fmnist_f8c4_XS:8" \
        --entry "SSDD-XS teacher=fmnist_f8c4_XS:1" --entry "SSDD-XS distilled=fmnist_f8c4_XS_distill:1" \
        -- config=configs/fmnist.yaml

An entry is `name=checkpoint:steps`, the checkpoint a file or a run name (`run[@best]`, EMA weights), its
architecture read from the file. Everything after `--` is the tokenizer config that picks the data and metrics.
Each decoder reconstructs the whole eval split from the same fixed noise and is scored on 8-bit images: PSNR,
SSIM, LPIPS and rFID when their weights exist, and always the Fréchet distance in the feature space of the
project's Fashion-MNIST classifier (eval/lib/fmnist_classifier.py), which needs no download. Writes <out>.json
(read by eval/decoder_benchmark.py --quality for the quality-vs-speed figure), <out>.md and <out>.png.
"""

import argparse
import json
import os
import sys
import time

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from eval.lib.fmnist_classifier import FeatureStats, frechet_distance, load_classifier
from eval.lib.report import command_line, machine_info, markdown_table, row_notes, run_script, today, write_report
from tokenizer.common.config import load_config
from tokenizer.common.errors import UserError
from tokenizer.common.runs import resolve_checkpoint, save_grid
from tokenizer.common.training import make_accelerator
from tokenizer.common.validation import check_config
from tokenizer.config_checks import SSDD_CHECKS
from tokenizer.data import build_dataset
from tokenizer.evaluation import reconstruct_split
from tokenizer.metrics import quantize
from tokenizer.ssdd import SSDD

COLUMNS = [("psnr", "PSNR (dB) ↑", "{:.2f}"), ("ssim", "SSIM ↑", "{:.4f}"), ("lpips", "LPIPS ↓", "{:.4f}"),
           ("fd_classifier", "FD (classifier) ↓", "{:.3f}"), ("rfid", "rFID ↓", "{:.2f}"),
           ("decoder_params_m", "decoder params (M)", "{:.2f}"), ("images_seen", "images seen", "{:,}")]


def parse_entry(text: str) -> tuple[str, str, int]:
    name, sep, rest = text.partition("=")
    ckpt, sep2, steps = rest.rpartition(":")
    if not sep or not sep2 or not name or not ckpt or not steps.isdigit() or int(steps) < 1:
        raise UserError(f"--entry must look like 'name=checkpoint:steps' with steps >= 1, got '{text}'")
    return name, ckpt, int(steps)


def training_budget(checkpoint: str) -> dict:
    """Images the decoder was trained on, from its run's training_state.json and config.yaml (if it has a run)."""
    ckpt_dir = os.path.dirname(checkpoint)
    run = os.path.dirname(os.path.dirname(ckpt_dir))
    state_path, cfg_path = os.path.join(ckpt_dir, "training_state.json"), os.path.join(run, "config.yaml")
    if not (os.path.isfile(state_path) and os.path.isfile(cfg_path)):
        return {}
    with open(state_path) as f:
        step = json.load(f)["step"]
    cfg = OmegaConf.load(cfg_path)
    out = {"train_steps": step, "images_seen": step * cfg.dataset.batch_size}
    if cfg.get("distill_teacher"):
        out["distilled_from"] = str(cfg.ssdd.checkpoint)
    return out


def load_previous(args, cfg) -> list:
    """Rows of an earlier run of the same table (`--append`), refused if it scored another split or size."""
    path = args.out + ".json"
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        old = json.load(f)
    wanted = {"dataset": cfg.dataset.name, "split": cfg.eval.split, "im_size": cfg.dataset.im_size}
    if any(old.get(k) != v for k, v in wanted.items()) or (args.limit and old["n_images"] != args.limit):
        raise UserError(f"--append: {path} scored another split, size or image count than this run ({wanted})")
    return old["rows"]


def markdown(rows: list, header: str) -> str:
    lines = [header, ""] + markdown_table(rows, COLUMNS, lead=[("name", "decoder"), ("steps", "steps")])
    notes = row_notes(rows)
    notes += sorted({f"{r['name']}: distilled from {r['distilled_from']} (its images seen are the distillation's own)"
                     for r in rows if r.get("distilled_from")})
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"


def evaluate(args) -> None:
    entries = [parse_entry(e) for e in args.entry]
    cfg = check_config(load_config("ssdd.yaml", args.overrides), SSDD_CHECKS)
    accelerator = make_accelerator(cfg.training.mixed_precision)
    device = accelerator.device
    dataset = build_dataset(cfg.dataset, cfg.eval.split, train=False)
    classifier = load_classifier(args.classifier, device=device)
    fixed = torch.stack([dataset[i][0] for i in range(cfg.show_samples)]).to(device)
    real_stats, rows, decoded = None, [], []
    previous = load_previous(args, cfg) if args.append else []
    for name, spec, steps in entries:
        checkpoint = resolve_checkpoint(cfg.ckpt_dir, spec)
        model = SSDD.from_checkpoint(checkpoint).to(device).eval()
        real, fake = FeatureStats(classifier), FeatureStats(classifier)

        def observe(x, rec, real=real, fake=fake, first=real_stats is None):
            fake.update(quantize(rec) * 2 - 1)  # score what a user would save: 8-bit images
            if first:
                real.update(quantize(x) * 2 - 1)

        t0 = time.time()
        result = reconstruct_split(cfg, accelerator, model, dataset, steps, args.limit, observers=[observe])
        if not accelerator.is_main_process:
            continue
        real_stats = real_stats or real  # the originals are the same for every entry: featurise them once
        row = {"name": name, "checkpoint": checkpoint, "decoder": model.decoder_name, "steps": steps,
               "decoder_params_m": sum(p.numel() for p in model.decoder.parameters()) / 1e6,
               "fd_classifier": frechet_distance(real_stats, fake), "seconds": round(time.time() - t0, 1),
               **training_budget(checkpoint), **result}
        if model.is_kl:
            row["kl_base_channels"] = model.kl_base_channels
        rows.append(row)
        print(f"{name} ({steps} step(s)): PSNR {row['psnr']:.2f} SSIM {row['ssim']:.4f} "
              f"FD {row['fd_classifier']:.3f} in {row['seconds']} s")
        with torch.no_grad():
            decoded.append(model.decode(model.encode(fixed).mode(), steps=steps,
                                        generator=torch.Generator(device).manual_seed(0)))
    if not accelerator.is_main_process:
        return
    out = args.out
    rows = previous + rows
    meta = {"dataset": cfg.dataset.name, "split": cfg.eval.split, "n_images": rows[0]["n_images"],
            "im_size": cfg.dataset.im_size, "encoder": SSDD.from_checkpoint(rows[0]["checkpoint"]).encoder_name,
            "classifier": "eval/assets/fmnist_classifier.safetensors (penultimate features)" if args.classifier is None
            else args.classifier, "machine": machine_info(device), "date": today(),
            "command": command_line("eval/decoder_quality.py", args.argv)}
    header = (f"Reconstruction of {meta['n_images']} {meta['dataset']} {meta['split']} images "
              f"({meta['im_size']} px), encoder {meta['encoder']}; grid rows: input, then the decoders in order")
    write_report(out, {**meta, "rows": rows}, markdown(rows, header))
    grid_rows = out + ".grid.safetensors"  # the decodes of the grid, so that --append can extend it
    if args.append and os.path.isfile(grid_rows):
        earlier = load_file(grid_rows)
        decoded = [earlier[str(i)].to(device) for i in range(len(earlier))] + decoded
    save_grid(out + ".png", [fixed] + decoded)
    save_file({str(i): d.float().cpu().contiguous() for i, d in enumerate(decoded)}, grid_rows)
    print(markdown(rows, header))
    print(f"wrote {out}.json, .md, .png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entry", action="append", required=True, help="'name=checkpoint:steps', repeatable")
    ap.add_argument("--out", default="docs/reports/decoder_quality", help="output path without extension")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images of the split")
    ap.add_argument("--append", action="store_true", help="add rows to an existing <out>.json of the same split")
    ap.add_argument("--classifier", default=None, help="classifier weights (default: the committed asset)")
    ap.add_argument("overrides", nargs="*", help="tokenizer config overrides, key=value")
    return run_script(ap, evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())

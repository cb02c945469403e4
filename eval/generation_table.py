"""The generation table: one DiT, several decoders of its latents, several guidance scales; quality next to speed.

    python eval/generation_table.py --cfg 1 2 3 --num-samples 10000 --out docs/reports/generation_table
    python eval/generation_table.py --ckpt my_bundle --ref VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights pt_inception.pth --cfg 1.5 --num-samples 50000 --out results/table

For every guidance scale the DiT samples --num-samples latents once (sample i: class i mod num_classes, noise from
(--seed, i) as sample/sample_ddp.py draws it), and every decoder of the bundle (by default all: the distilled
single-step SSDD, its multi-step teacher and the KL-VAE baseline, as `python -m dit.export --extra-decoder` adds
them) decodes the same latents. Each (decoder, scale) row reports

  * quality: for a Fashion-MNIST generator, always (offline), the class accuracy and the Fréchet distance of the
    project's classifier features (eval/lib/fmnist_classifier.py) against the real test split, next to the classifier's
    own accuracy and a real-vs-real floor; with Inception weights (--inception-weights or the standard download),
    gFID, sFID, IS, precision, recall and KID against --ref, computed as eval/gfid.py does (eval/lib/gfid.py);
  * speed of the whole pipeline: images/s over the run (batch --batch-size) split into DiT and decoder time per
    image, and the latency of one image (batch 1, median of --latency-repeats), again split; the SSDD decoders'
    starting noise is on the device before their timed calls (copying it there is not decoding);
  * the speed-up of the single-step SSDD over the multi-step teacher and over the KL-VAE, at the same scale.

Samples are scored as 8-bit images (what a PNG holds). Writes <out>.json, <out>.md and <out>.png (quality against
images/s, one point per decoder and scale).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys

import numpy as np
import torch
from tqdm import tqdm

from dit.pipeline import BUNDLE_DIR, load_generator
from eval.lib.adm_npz import write_sample_batch
from eval.lib.fmnist_classifier import FeatureStats, frechet_distance, load_classifier, predict
from eval.lib.fmnist_reference import real_reference
from eval.lib.gfid import ImageSource, InceptionFeatures, compare, extract
from eval.lib.report import (
    command_line,
    load_average,
    machine_info,
    markdown_table,
    run_script,
    save_figure,
    today,
    write_report,
)
from tokenizer.common.config import CONFIG_DIR
from tokenizer.common.devices import pick_device
from tokenizer.common.errors import UserError, WeightsUnavailableError
from tokenizer.metrics import quantize, to_uint8

FMNIST_REF = os.path.join(CONFIG_DIR, "fmnist.yaml") + ":test"  # the real test split, 8-bit
INCEPTION_KEYS = ("fid", "sfid", "inception_score", "precision", "recall", "kid")


def role(decoder, steps: int) -> str:
    """'kl' (the KL-VAE baseline), 'single-step' (an SSDD decoding in one step: the distilled one) or 'multi-step'
    (an SSDD teacher)."""
    return "kl" if decoder.is_kl else "single-step" if steps == 1 else "multi-step"


def is_fmnist(gen) -> bool:
    return gen.num_classes == 10 and tuple(gen.image_shape[1:]) == (32, 32)


class Judge:
    """The quality side: classifier metrics (Fashion-MNIST) and Inception metrics (when weights exist)."""

    def __init__(self, args, gen, device):
        self.device, self.notes, self.real = device, [], None
        self.classifier = None
        if is_fmnist(gen):
            self.classifier = load_classifier(args.classifier, device=device)
            self.real, self.test_stats = real_reference(self.classifier, args.real_images,
                                                        min(args.num_samples, 60000), args.seed)
        else:
            self.notes.append(f"classifier metrics not computed: {gen.source} is not a Fashion-MNIST generator "
                              f"(10 classes, 32 px)")
        self.inception, self.ref_feats, self.ref_stats = None, None, None
        ref = args.ref or (FMNIST_REF if is_fmnist(gen) else None)
        if args.no_inception:
            self.notes.append("Inception metrics not computed (--no-inception)")
        elif ref is None:
            self.notes.append("Inception metrics not computed: give --ref (an ADM reference batch or image folder)")
        else:
            try:
                self.inception = InceptionFeatures(args.inception_weights, device)
            except WeightsUnavailableError as e:
                self.notes.append(f"Inception metrics not computed: {e}")
            else:
                source = ImageSource(ref)
                self.ref_stats = source.stats
                self.ref_feats = extract(source, self.inception, 64, "reference") if source.count else None
                self.ref = source.describe()

    def start(self) -> dict:
        """A fresh accumulator for one row."""
        return {"stats": FeatureStats(self.classifier) if self.classifier else None, "correct": 0, "n": 0,
                "inception": []}

    def update(self, acc: dict, images: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch of samples (float in [-1, 1], scored as 8-bit) with their labels."""
        if self.classifier is not None:
            x = quantize(images) * 2 - 1
            acc["stats"].update(x.to(self.device))
            acc["correct"] += int((predict(x, self.classifier) == y).sum())
        acc["n"] += len(images)
        if self.inception is not None:
            acc["inception"].append(self.inception(torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2)))

    def result(self, acc: dict, args) -> dict:
        out = {}
        if self.classifier is not None:
            out["accuracy"] = acc["correct"] / acc["n"]
            out["fd_classifier"] = frechet_distance(acc["stats"], self.test_stats)
        if self.inception is not None:
            feats = {k: torch.cat([f[k] for f in acc["inception"]]).numpy() for k in acc["inception"][0]}
            r = compare(self.ref_feats, feats, self.ref_stats, None, device=self.device)
            out.update({k: r[k] for k in (*INCEPTION_KEYS, "inception_score_std", "kid_std")})
            out["inception_notes"] = r["notes"]
        return out


def latency(gen, name: str, steps: int, settings: dict, repeats: int) -> tuple[float, float]:
    """Median seconds of the DiT and of the decoder for one image (batch 1), after one untimed call."""
    y = torch.zeros(1, dtype=torch.long)
    noise, decoder_noise = gen.draw_sample_noise([0], 0)
    decoder_noise = decoder_noise.to(gen.device)  # copied before the timed decode: not part of decoding
    dit, dec = [], []
    for r in range(repeats + 1):
        z, t = gen.sample_latents(y, noise, settings, batch_size=1)
        _, d = gen.decode(z, decoder_noise, name, steps, batch_size=1)
        if r:  # the first call warms up
            dit.append(t)
            dec.append(d["decoder_s"])
    return statistics.median(dit), statistics.median(dec)


def speedups(rows: list) -> list:
    """Per scale: the pipeline throughput (and batch-1 latency) of each 1-step SSDD row over the multi-step SSDD and
    KL-VAE rows (stored in the fast row's "speedup"), as lines of text."""
    lines = []
    for cfg_scale in dict.fromkeys(r["cfg_scale"] for r in rows):
        same = [r for r in rows if r["cfg_scale"] == cfg_scale]
        for fast in (r for r in same if r["role"] == "single-step"):
            for other in (r for r in same if r["role"] != "single-step"):
                fast.setdefault("speedup", {})[other["decoder"]] = {
                    "throughput": fast["images_per_s"] / other["images_per_s"],
                    "latency": other["latency_ms"] / fast["latency_ms"]}
                lines.append(f"- cfg {cfg_scale:g}: {fast['decoder']} vs {other['decoder']}: "
                             f"{fast['images_per_s'] / other['images_per_s']:.2f}x the throughput, "
                             f"{other['latency_ms'] / fast['latency_ms']:.2f}x faster at batch 1")
    return lines


def plot(path: str, rows: list, metric: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in dict.fromkeys(r["decoder"] for r in rows):
        pts = [r for r in rows if r["decoder"] == name and r.get(metric) is not None]
        ax.plot([r["images_per_s"] for r in pts], [r[metric] for r in pts], "o-", label=name)
        for r in pts:
            ax.annotate(f"cfg {r['cfg_scale']:g}", (r["images_per_s"], r[metric]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("whole-pipeline throughput, images/s (DiT + decoder)")
    ax.set_ylabel(f"{metric} (lower is better)" if metric != "accuracy" else "class accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


COLUMNS = [("accuracy", "class acc. ↑", "{:.2%}"), ("fd_classifier", "FD classifier ↓", "{:.3f}"),
           ("fid", "gFID ↓", "{:.2f}"), ("sfid", "sFID ↓", "{:.2f}"), ("inception_score", "IS ↑", "{:.2f}"),
           ("precision", "prec. ↑", "{:.3f}"), ("recall", "recall ↑", "{:.3f}"),
           ("images_per_s", "images/s", "{:.3g}"), ("dit_ms_per_image", "DiT ms/img", "{:.2f}"),
           ("decoder_ms_per_image", "decoder ms/img", "{:.2f}"), ("latency_ms", "latency ms (b=1)", "{:.1f}"),
           ("latency_dit_ms", "of which DiT", "{:.1f}"), ("latency_decoder_ms", "of which decoder", "{:.1f}")]


def markdown(record: dict) -> str:
    r, m = record, record["machine"]
    where = m["gpu"] or f"{m['cpu']}, {m['torch_threads']} threads"
    lines = [f"# Generation table: {r['dit']} with {len(r['decoders'])} decoders", "",
             f"{r['num_samples']} samples per row (class i mod {r['num_classes']}, noise from seed {r['seed']} and i), "
             f"{r['sampler']} {r['steps']} DiT steps, batch {r['batch_size']}; {where} ({m['device']}), torch "
             f"{m['torch']}; load average {m['load_average']} at start, {r['load_average_end']} at end; {r['date']}.",
             f"Command: `{r['command']}`", ""]
    if r["real"]:
        lines += [f"Classifier on the real test split ({r['real']['n_test']} images): "
                  f"{100 * r['real']['test_accuracy']:.2f} % accuracy; real-vs-real floor of the classifier FD "
                  f"({r['real']['n_reference']} training images vs the test split): "
                  f"{r['real']['fd_train_vs_test']:.3f}.",
                  ""]
    cols = [c for c in COLUMNS if any(row.get(c[0]) is not None for row in r["rows"])]
    lines += markdown_table(r["rows"], cols, lead=[("cfg", "cfg"), ("decoder", "decoder"),
                                                   ("decoder_steps", "steps")])
    lines += ["", "Speed-up of the single-step decoder's whole pipeline (same latents, same run):", ""]
    lines += r["speedups"] or ["- none: needs a 1-step SSDD row and a multi-step SSDD or KL-VAE row at the same scale"]
    lines += ["", "Throughput is samples / (DiT + decoder seconds) over the whole run; latency is one image at batch "
              "1 (median of repeats). Timings on a shared CPU vary with the load: compare rows of one run only."]
    lines += [""] + [f"- {n}" for n in r["notes"]]
    lines += ["", f"![quality vs speed]({os.path.basename(r['plot'])})", ""]
    return "\n".join(lines)


def evaluate(args) -> dict:
    device = pick_device(args.device)
    gen = load_generator(args.ckpt, device=device)
    names = args.decoders or gen.decoder_names
    for name in names:
        gen.pick_decoder(name)  # a one-line error listing the choices
    if args.num_samples < 2 or args.batch_size < 1 or args.latency_repeats < 1:
        raise UserError("--num-samples must be >= 2, --batch-size and --latency-repeats >= 1")
    machine = machine_info(device)
    judge = Judge(args, gen, device)
    rows, n, b = [], args.num_samples, args.batch_size
    for cfg_scale in args.cfg_scales or [gen.defaults["cfg_scale"]]:
        settings = gen.sampler_settings(cfg_scale, args.steps, args.sampler)
        accs = {name: judge.start() for name in names}
        dit_s, dec_s, kept = 0.0, dict.fromkeys(names, 0.0), {name: [] for name in names}
        for start in tqdm(range(0, n, b), desc=f"cfg {cfg_scale:g}", unit="batch"):
            idx = range(start, min(n, start + b))
            y = torch.tensor([i % gen.num_classes for i in idx])
            noise, decoder_noise = gen.draw_sample_noise(idx, args.seed)
            step_noise = gen.step_noise(idx, args.seed)  # used only by stochastic samplers
            z, t = gen.sample_latents(y, noise, settings, args.seed, batch_size=len(idx), step_noise=step_noise)
            dit_s += t
            decoder_noise = decoder_noise.to(gen.device)  # once per batch, outside the decoders' timed calls
            for name in names:
                images, d = gen.decode(z, decoder_noise, name, batch_size=len(idx))
                dec_s[name] += d["decoder_s"]
                judge.update(accs[name], images, y)
                if args.save_npz:
                    kept[name].append(to_uint8(images))
        for name in names:
            _, decoder, steps = gen.pick_decoder(name)
            lat_dit, lat_dec = latency(gen, name, steps, settings, args.latency_repeats)
            row = {"cfg_scale": float(cfg_scale), "cfg": f"{cfg_scale:g}", "decoder": name,
                   "role": role(decoder, steps), "distilled": bool(decoder.single_step),
                   "decoder_steps": 1 if decoder.is_kl else steps, "n": n, "dit_s": dit_s, "decoder_s": dec_s[name],
                   "images_per_s": n / (dit_s + dec_s[name]), "dit_ms_per_image": 1000 * dit_s / n,
                   "decoder_ms_per_image": 1000 * dec_s[name] / n, "latency_ms": 1000 * (lat_dit + lat_dec),
                   "latency_dit_ms": 1000 * lat_dit, "latency_decoder_ms": 1000 * lat_dec,
                   **judge.result(accs[name], args)}
            rows.append(row)
            if args.save_npz:
                os.makedirs(args.save_npz, exist_ok=True)
                arr = np.concatenate(kept[name])
                slug = re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_")
                row["npz"] = os.path.join(args.save_npz, f"{slug}_cfg{cfg_scale:g}.npz")
                write_sample_batch(row["npz"], [arr], n, arr.shape[1:], np.arange(n) % gen.num_classes)
            quality = ", ".join(f"{k} {row[k]:.4g}" for k in ("accuracy", "fd_classifier", "fid")
                                if row.get(k) is not None)
            print(f"cfg {cfg_scale:g} {name}: {quality}; {row['images_per_s']:.3g} images/s "
                  f"(DiT {row['dit_ms_per_image']:.2f} + decoder {row['decoder_ms_per_image']:.2f} ms/image), "
                  f"latency {row['latency_ms']:.1f} ms", flush=True)
    lines = speedups(rows)
    metric = "fid" if any(r.get("fid") is not None for r in rows) else "fd_classifier" if judge.real else "accuracy"
    record = {"dit": gen.name, "generator": gen.source, "decoders": names, "num_classes": gen.num_classes,
              "num_samples": n, "seed": args.seed, "steps": settings["steps"], "sampler": settings["sampler"],
              "batch_size": b, "real": judge.real, "inception_reference": getattr(judge, "ref", None),
              "rows": rows, "speedups": lines, "plot_metric": metric, "plot": args.out + ".png",
              "notes": judge.notes + sorted({n for r in rows for n in r.get("inception_notes", [])}),
              "machine": machine, "load_average_end": load_average(),
              "date": today(), "command": command_line("eval/generation_table.py", args.argv)}
    plot(args.out + ".png", rows, metric, f"{gen.name}: quality vs whole-pipeline speed ({n} samples per point)")
    write_report(args.out, record, markdown(record))
    print("\n".join(lines))
    print(f"wrote {args.out}.json, {args.out}.md, {args.out}.png")
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=None, help=f"bundle directory or DiT checkpoint (default: {BUNDLE_DIR})")
    ap.add_argument("--decoders", nargs="+", default=None, help="decoder names of the bundle (default: all)")
    ap.add_argument("--cfg", dest="cfg_scales", type=float, nargs="+", default=None, help="guidance scales")
    ap.add_argument("--num-samples", type=int, default=10000, help="samples per row")
    ap.add_argument("--steps", type=int, default=None, help="DiT steps (default: the bundle's)")
    ap.add_argument("--sampler", default=None, help="default: the bundle's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--latency-repeats", type=int, default=5)
    ap.add_argument("--ref", default=None,
                    help="Inception reference (default for Fashion-MNIST: configs/fmnist.yaml:test)")
    ap.add_argument("--inception-weights", default=None, help="local Inception weights (else the standard download)")
    ap.add_argument("--no-inception", action="store_true", help="skip the Inception metrics")
    ap.add_argument("--real-images", type=int, default=None, help="random subset of the test split (default: all)")
    ap.add_argument("--classifier", default=None, help="classifier weights (default: the committed asset)")
    ap.add_argument("--save-npz", default=None, help="also write every row's samples as an ADM .npz in this folder")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="docs/reports/generation_table", help="output path without extension")
    return run_script(ap, evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Judge class-conditional generation with the project's Fashion-MNIST classifier.

    python eval/generation.py                                  # the embedded bundle, 100 per class, its default cfg
    python eval/generation.py --ckpt runs/jobs/dit_fmnist/checkpoints/last --cfg 1 2 4 --out docs/reports/dit_generation

For every guidance scale it generates --per-class images of every class (1,000 for Fashion-MNIST) with fixed
seeds and reports, with the classifier of eval/lib/fmnist_classifier.py:
  * class accuracy of the generated samples (the classifier's label == the requested class), overall and per class,
    next to the classifier's own accuracy on the real test split (its ceiling);
  * the Fréchet distance of classifier features, generated vs the real test split, next to the same distance for
    as many real training images (the value a perfect generator would get at this sample size).
Writes <out>.json, <out>.md and <out>.png (a sample grid, one row per class, of the scale with the lowest distance).
"""

import argparse
import os
import platform
import sys

import torch

from dit.pipeline import BUNDLE_DIR, load_generator
from eval.lib.fmnist_classifier import feature_stats, frechet_distance, load_classifier, predict
from eval.lib.fmnist_reference import real_reference
from eval.lib.report import command_line, run_script, today, write_report
from tokenizer.common.devices import pick_device
from tokenizer.common.errors import UserError


def markdown(result: dict) -> str:
    r = result
    names = r["class_names"]
    lines = [
        "# Class-conditional generation on Fashion-MNIST (DiT on SSDD latents)",
        "",
        f"Generator: `{r['generator']}` ({r['dit_model']}, decoder {r['decoder']}), {r['per_class']} samples per class "
        f"({r['per_class'] * len(names)} in all), sampler {r['sampler']} {r['steps']} steps, decoder "
        f"{r['decoder_steps']} step(s), seed {r['seed']}. Judge: `{r['classifier']}`.",
        f"Machine: {r['machine']}; {r['date']}. Command: `{r['command']}`",
        "",
        f"Classifier accuracy on the real test split ({r['real']['n_test']} images): "
        f"**{100 * r['real']['test_accuracy']:.2f} %**. Feature Fréchet distance of {r['real']['n_reference']} real "
        f"training images vs the test split (the floor at this sample size): "
        f"**{r['real']['fd_train_vs_test']:.3f}**.",
        "",
        "| cfg scale | class accuracy of samples | feature FD vs real test | DiT time (s) | decoder time (s) |",
        "|---|---|---|---|---|",
    ]
    for s in r["scales"]:
        best = " (lowest FD)" if s["cfg_scale"] == r["best_fd_cfg"] else ""
        lines.append(f"| {s['cfg_scale']:g}{best} | {100 * s['accuracy']:.2f} % | {s['fd']:.3f} | {s['dit_s']:.1f} | "
                     f"{s['decoder_s']:.1f} |")
    lines += ["", "Per-class accuracy of the samples (and of the classifier on real test images):", "",
              "| class | real test | " + " | ".join(f"cfg {s['cfg_scale']:g}" for s in r["scales"]) + " |",
              "|---|---|" + "---|" * len(r["scales"])]
    for c, name in enumerate(names):
        lines.append(f"| {c} {name} | {100 * r['real']['per_class'][c]:.1f} % | "
                     + " | ".join(f"{100 * s['per_class'][c]:.1f} %" for s in r["scales"]) + " |")
    lines += ["", f"Sample grid (`{os.path.basename(r['grid'])}`, cfg {r['best_fd_cfg']:g}, one row per class): "
              f"![samples]({os.path.basename(r['grid'])})", ""]
    return "\n".join(lines)


def evaluate(args) -> dict:
    device = pick_device(args.device)
    gen = load_generator(args.ckpt, device=device)
    if gen.num_classes != 10:
        raise UserError(f"this evaluation judges Fashion-MNIST generators (10 classes); {gen.source} has "
                        f"{gen.num_classes}")
    if gen.decoder.patch_size * gen.latent_shape[1] != 32:
        raise UserError("the generator does not make 32-px images, which the Fashion-MNIST classifier needs")
    clf = load_classifier(args.classifier, device=device)

    print("real test split ...", flush=True)
    n_gen = args.per_class * gen.num_classes
    real, test_stats = real_reference(clf, args.real_images, n_gen, args.seed)
    print(f"classifier on real test: {100 * real['test_accuracy']:.2f} %; FD {n_gen} train vs test: "
          f"{real['fd_train_vs_test']:.3f}", flush=True)

    scales, samples = [], {}
    ids = list(range(gen.num_classes))
    labels = torch.tensor(ids).repeat_interleave(args.per_class)
    for cfg_scale in args.cfg_scales or [gen.defaults["cfg_scale"]]:
        images, t = gen.generate(ids, num=args.per_class, seed=args.seed, cfg_scale=cfg_scale, steps=args.steps,
                                 sampler=args.sampler, decoder_steps=args.decoder_steps, batch_size=args.batch_size)
        pred = predict(images, clf)
        s = {"cfg_scale": float(cfg_scale), "accuracy": float((pred == labels).float().mean()),
             "per_class": [float((pred[labels == c] == c).float().mean()) for c in ids],
             "fd": frechet_distance(feature_stats(images, clf), test_stats), "dit_s": t["dit_s"],
             "decoder_s": t["decoder_s"]}
        scales.append(s)
        samples[float(cfg_scale)] = images
        print(f"cfg {cfg_scale:g}: accuracy {100 * s['accuracy']:.2f} %, FD {s['fd']:.3f} "
              f"(DiT {t['dit_s']:.1f} s, decoder {t['decoder_s']:.1f} s)", flush=True)
    best = min(scales, key=lambda s: s["fd"])
    out = args.out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    from torchvision.utils import save_image

    show = min(10, args.per_class)
    best_images = samples[best["cfg_scale"]]
    grid_images = best_images.view(gen.num_classes, args.per_class, *best_images.shape[1:])
    save_image(grid_images[:, :show].flatten(0, 1), out + ".png", nrow=show, normalize=True, value_range=(-1, 1),
               padding=1)
    result = {
        "generator": os.path.relpath(gen.source), "dit_model": gen.name,
        "decoder": gen.decoder.decoder_name, "bundle": gen.info or None,
        "class_names": gen.display_names(), "per_class": args.per_class, "seed": args.seed,
        "sampler": t["sampler"], "steps": t["steps"], "decoder_steps": t["decoder_steps"],
        "classifier": args.classifier or "eval/assets/fmnist_classifier.safetensors",
        "real": real, "scales": scales, "best_fd_cfg": best["cfg_scale"],
        "best_accuracy_cfg": max(scales, key=lambda s: s["accuracy"])["cfg_scale"],
        "grid": out + ".png",
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {device}, torch {torch.__version__}",
        "date": today(),
        "command": args.command or command_line("eval/generation.py", args.argv),
    }
    write_report(out, result, markdown(result))
    print(f"wrote {out}.json, {out}.md, {out}.png")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=None, help=f"bundle directory or DiT checkpoint (default: {BUNDLE_DIR})")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--cfg", dest="cfg_scales", type=float, nargs="+", default=None,
                    help="guidance scales (default: the bundle's)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--sampler", default=None)
    ap.add_argument("--decoder-steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real-images", type=int, default=None,
                    help="random subset of the test split (default: all 10k)")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--classifier", default=None, help="classifier weights (default: the committed asset)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="docs/reports/dit_generation", help="output path without extension")
    ap.add_argument("--command", default=None, help=argparse.SUPPRESS)
    return run_script(ap, evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())

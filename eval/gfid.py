"""Generation metrics the way papers report them (the ADM evaluator's conventions), in PyTorch: FID, sFID, Inception
Score, precision and recall, and KID.

    python eval/gfid.py VIRTUAL_imagenet256_labeled.npz samples/dit_xl_cfg1.5.npz --out results/dit_xl.json
    python eval/gfid.py /data/photos/val samples/mine.npz --image-size 32 --out results/mine.json
    python eval/gfid.py configs/fmnist.yaml:test samples/fmnist_cfg2 --inception-weights pt_inception.pth

REF and SAMPLES take the forms of FORMS below (also printed by --help). How each metric is computed: eval/lib/gfid.py
and docs/ARCHITECTURE.md §10. Writes `--out FILE.json` (keys fid, sfid, inception_score, precision, recall, kid,
warnings, ...) and prints one summary line; a set of at most 2,048 images is warned about on stderr and in the JSON.
"""

from __future__ import annotations

import argparse
import sys

from eval.lib.gfid import FEATURE_DIM, ImageSource, InceptionFeatures, compare, extract, small_set_warning
from eval.lib.report import command_line, machine_info, run_script, today, write_json
from tokenizer.common.devices import pick_device
from tokenizer.data_check import IMAGE_EXTENSIONS

FORMS = f"""REF and SAMPLES, each one of:
  FOLDER      a folder of images, searched recursively: a flat folder of samples, or a class-folder tree such
              as <root>/val of the ImageNet layout (<root>/val/<class>/*.JPEG: every image of every class
              folder). The extensions the data loader reads: {' '.join(IMAGE_EXTENSIONS)}.
  FILE.npz    an ADM batch: uint8 N x H x W x 3 images in arr_0, as sample/sample_ddp.py writes. A reference
              batch that also holds precomputed mu/sigma (and mu_s/sigma_s), as VIRTUAL_imagenet256_labeled.npz
              does, gives FID (and sFID) from those as they are; its images still serve precision, recall, KID.
  CONFIG.yaml[:SPLIT]
              the images that a tokenizer config's dataset section reads from split SPLIT (default: the
              config's eval.split, val unless it sets another), as evaluation reads them. The file is layered
              on configs/ssdd.yaml (looked up as given, then in configs/), so its dataset.root, dataset.im_size
              (shorter side resized, centre crop), dataset.limit (a class-balanced subset) and the data checks
              apply; images are quantised to 8 bits. The part after the last ':' is the split, unless the whole
              argument names an existing file.
              Examples: configs/fmnist.yaml:test is Fashion-MNIST's test split at 32 x 32 (28 px padded);
              mine.yaml:val, where mine.yaml holds `dataset: {{root: /data/photos, im_size: 32}}`, is the
              val split of your folder at 32 x 32, prepared exactly as the tokenizer's evaluation sees it.

Sizes: the metrics need one image size per set. A folder whose images differ in size is refused before any
work unless --image-size N brings every image of both sets to N x N (shorter side resized, then the central
square, as ADM and DiT prepare reference images). The two sets may differ in size (Inception resizes to 299),
but FID then also measures that difference: compare at the samples' size.

Set sizes: FID and sFID estimate covariances of {FEATURE_DIM:,} (sFID 2,023) features. A set of at most {FEATURE_DIM:,}
images makes its covariance singular and FID biased and unreliable: a warning on stderr and in the JSON's
"warnings". Papers use 50,000 samples against the full reference.

Inception weights: --inception-weights FILE (a state dict of torch-fidelity's FeatureExtractorInceptionV3),
else torch-fidelity's standard download where a network exists; otherwise a one-line error says what to place
where."""


def summary(r: dict) -> str:
    def f(key, fmt):
        return "n/a" if r.get(key) is None else fmt.format(r[key])

    return (f"FID {f('fid', '{:.3f}')} | sFID {f('sfid', '{:.3f}')} | IS {f('inception_score', '{:.2f}')} | "
            f"precision {f('precision', '{:.4f}')} | recall {f('recall', '{:.4f}')} | KID {f('kid', '{:.5f}')} "
            f"({r['n_samples']} samples vs {r['n_ref'] or 'precomputed'} reference)")


def evaluate(args) -> dict:
    ref, samples = ImageSource(args.ref, args.image_size), ImageSource(args.samples, args.image_size)
    device = pick_device(args.device)
    print(f"reference: {ref.describe()}\nsamples: {samples.describe()}", flush=True)
    warnings = [w for w in (small_set_warning(ref, "reference"), small_set_warning(samples, "samples")) if w]
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr, flush=True)
    inception = InceptionFeatures(args.inception_weights, device)
    ref_feats = extract(ref, inception, args.batch_size, "reference") if ref.count else None
    sample_feats = extract(samples, inception, args.batch_size, "samples")
    result = compare(ref_feats, sample_feats, ref.stats, samples.stats, args.is_splits, args.k,
                     not args.pr_fp32, device)
    result.update(ref=args.ref, samples=args.samples, n_ref=ref.count, n_samples=samples.count,
                  image_size=args.image_size, warnings=warnings,
                  feature_extractor="torch-fidelity inception-v3-compat",
                  inception_weights=args.inception_weights or "torch-fidelity download",
                  machine=machine_info(device), date=today(), command=command_line("eval/gfid.py", args.argv))
    if args.out:
        write_json(args.out, result)  # (creates the folder)
    print(summary(result))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=FORMS,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ref", help="reference: FOLDER (flat or class-folder tree), FILE.npz, or CONFIG.yaml[:SPLIT]")
    ap.add_argument("samples", help="samples: FOLDER, FILE.npz, or CONFIG.yaml[:SPLIT]")
    ap.add_argument("--image-size", type=int, default=None, metavar="N",
                    help="bring every image of both sets to N x N (shorter side resized, centre crop) first; "
                         "needed for a folder of images of several sizes")
    ap.add_argument("--inception-weights", default=None,
                    help="torch-fidelity FeatureExtractorInceptionV3 state dict (default: its standard download)")
    ap.add_argument("--out", default=None, help="write the figures to this JSON file")
    ap.add_argument("--batch-size", type=int, default=64, help="images per Inception batch (ADM: 64)")
    ap.add_argument("--is-splits", type=int, default=10)
    ap.add_argument("--k", type=int, default=3, help="neighbourhood size of precision/recall (ADM: 3)")
    ap.add_argument("--pr-fp32", action="store_true", help="keep fp32 distances (ADM rounds them to fp16)")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    return run_script(ap, evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())

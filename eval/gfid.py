"""Generation metrics the way papers report them (the ADM evaluator's conventions), in PyTorch: FID, sFID, Inception
Score, precision and recall, and KID.

    python eval/gfid.py VIRTUAL_imagenet256_labeled.npz samples/dit_xl_cfg1.5.npz --out results/dit_xl.json
    python eval/gfid.py configs/fmnist.yaml:test samples/fmnist_cfg2 --inception-weights pt_inception.pth

REF and SAMPLES are each a folder of PNG (or JPEG) images, an ADM `.npz` batch (images in `arr_0`, uint8
N x H x W x 3), or `CONFIG.yaml[:SPLIT]`: the images of a dataset config's split (default: its `eval.split`),
quantised to 8 bits. An `.npz` that carries precomputed `mu`/`sigma` (and `mu_s`/`sigma_s`), as ADM's reference
batches do, is used as it is for FID (and sFID); its images still serve precision, recall and KID. How each metric
is computed: eval/lib/gfid.py and docs/ARCHITECTURE.md §10.

Inception weights: `--inception-weights FILE` (a state dict of torch-fidelity's FeatureExtractorInceptionV3), else
torch-fidelity's standard download where a network exists; otherwise a one-line error says what to place where.
Writes `--out FILE.json` (keys fid, sfid, inception_score, precision, recall, kid, ...) and prints one summary line.
"""

from __future__ import annotations

import argparse
import sys

from eval.lib.gfid import ImageSource, InceptionFeatures, compare, extract
from eval.lib.report import command_line, machine_info, run_script, today, write_json
from tokenizer.common.devices import pick_device


def summary(r: dict) -> str:
    def f(key, fmt):
        return "n/a" if r.get(key) is None else fmt.format(r[key])

    return (f"FID {f('fid', '{:.3f}')} | sFID {f('sfid', '{:.3f}')} | IS {f('inception_score', '{:.2f}')} | "
            f"precision {f('precision', '{:.4f}')} | recall {f('recall', '{:.4f}')} | KID {f('kid', '{:.5f}')} "
            f"({r['n_samples']} samples vs {r['n_ref'] or 'precomputed'} reference)")


def evaluate(args) -> dict:
    ref, samples = ImageSource(args.ref), ImageSource(args.samples)
    device = pick_device(args.device)
    inception = InceptionFeatures(args.inception_weights, device)
    print(f"reference: {ref.describe()}\nsamples: {samples.describe()}", flush=True)
    ref_feats = extract(ref, inception, args.batch_size, "reference") if ref.count else None
    sample_feats = extract(samples, inception, args.batch_size, "samples")
    result = compare(ref_feats, sample_feats, ref.stats, samples.stats, args.is_splits, args.k,
                     not args.pr_fp32, device)
    result.update(ref=args.ref, samples=args.samples, n_ref=ref.count, n_samples=samples.count,
                  feature_extractor="torch-fidelity inception-v3-compat",
                  inception_weights=args.inception_weights or "torch-fidelity download",
                  machine=machine_info(device), date=today(), command=command_line("eval/gfid.py", args.argv))
    if args.out:
        write_json(args.out, result)  # (creates the folder)
    print(summary(result))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ref", help="reference: image folder, ADM .npz, or CONFIG.yaml[:SPLIT]")
    ap.add_argument("samples", help="samples: image folder, ADM .npz, or CONFIG.yaml[:SPLIT]")
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

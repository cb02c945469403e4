"""Export a generator bundle: the EMA DiT and the SSDD decoder in fp16, plus a JSON of stats and provenance.

    python -m dit.export --dit dit_fmnist --out dit/assets/fmnist
    python -m dit.export --dit runs/jobs/dit_fmnist/checkpoints/last/model_dit_ema.safetensors \
        --decoder runs/jobs/fmnist_distilled/checkpoints/last/model_ae_ema.safetensors --out dit/assets/fmnist

--dit is a DiT run name under --ckpt-dir or a model_dit_ema.safetensors file. --decoder is an SSDD checkpoint (file
or tokenizer run name; default: the tokenizer the DiT was trained on). A whole-model decoder checkpoint must carry
the same encoder as the one that made the DiT's latents (checked by the sha256 of its encoder weights); a
distilled single-step decoder of the same encoder passes that check and makes the bundle decode in one step.
--cfg / --steps / --sampler / --decoder-steps set the bundle's default sampler (else the run's `sample:` config).
bundle.json records `image_channels`, the channel count of the training data (from the latent cache the DiT run
trained on, else 1 for Fashion-MNIST, else 3; --image-channels sets it): with 1, the generator's decoded images are
made grey (dit.pipeline), as its data was.

--extra-decoder "NAME=CKPT[:STEPS]" (repeatable) adds further decoders of the same latents, e.g. the multi-step
teacher and the KL-VAE baseline next to the distilled default, so that `Generator.compare` and
eval/generation_table.py can set them side by side:

    python -m dit.export --dit dit_fmnist --decoder fmnist_f8c4_XS_distill --out dit/assets/fmnist \
        --extra-decoder "SSDD-XS 8-step (teacher)=fmnist_f8c4_XS:8" --extra-decoder "KL-VAE=fmnist_f8c4_kl"

Each is checked like the main one (the sha256 of a whole-model checkpoint's encoder, or the `encoder_sha256` a
decoder-only file records, must be the DiT's), written decoder-only in fp16 as decoder_<name>.safetensors, and
listed in bundle.json `decoders` ({name, file, steps, sha256, ...}; the default decoder first).

--hub makes the folder ready for the Hugging Face Hub (dit/hub.py): a model card README.md with the Hub's metadata
and the figures of --results (JSON of eval/generation_table.py or eval/gfid.py, also kept in bundle.json
`evaluation`), config.json and samples.png; --push-to-hub REPO also uploads it, after which
`load_generator(resolve_generator("REPO"))` loads it anywhere:

    python -m dit.export --dit dit_fmnist --out runs/hub/dit_fmnist --results docs/reports/generation_table.json \
        --push-to-hub user/dit-fmnist
"""

import argparse
import json
import os
import re
import sys
import time

import torch

from dit.decoder_files import decoder_label, default_decoder_steps
from dit.flow import METHODS
from dit.hub import push_to_hub, read_results, write_hub_files
from dit.pipeline import DECODER_FILE, DIT_FILE, INFO_FILE, SAMPLE_DEFAULTS, _json_field, image_channels, load_dit
from tokenizer.common.atomic import atomic_json, remove_stale_temporaries
from tokenizer.common.checkpoint import file_record, read_metadata, save_weights
from tokenizer.common.downloads import hub_repo_id
from tokenizer.common.errors import UserError, run_cli
from tokenizer.common.runs import resolve_checkpoint
from tokenizer.common.validation import check_output_dir, check_sampling_args, in_range
from tokenizer.ssdd import SSDD

BUNDLE_LIMIT_MB = 25.0  # the DiT plus the default decoder; extra decoders are optional files beside them


def resolve_dit(spec: str, ckpt_dir: str) -> str:
    if os.path.isfile(spec):
        return spec
    for candidate in (os.path.join(spec, "model_dit_ema.safetensors"),
                      os.path.join(ckpt_dir, "jobs", spec, "checkpoints", "last", "model_dit_ema.safetensors")):
        if os.path.isfile(candidate):
            return candidate
    raise UserError(f"--dit {spec!r} is neither a file nor a DiT run with saved weights under {ckpt_dir}/jobs/")


def check_args(args) -> None:
    """The bundle's default sampler settings, and the output folder, before anything is loaded."""
    check_sampling_args(args.cfg, args.steps, args.decoder_steps)
    check_output_dir(args.out, "--out")
    in_range("--grid-per-class", args.grid_per_class, 0, 64)
    if args.push_to_hub and hub_repo_id(args.push_to_hub) is None:
        raise UserError(f"--push-to-hub {args.push_to_hub!r}: give a Hub repository id such as user/my-dit")


def parse_extra_decoder(text: str) -> tuple[str, str, int | None]:
    """'NAME=CKPT[:STEPS]' -> (name, checkpoint, steps or None)."""
    name, sep, rest = text.partition("=")
    ckpt, steps = rest, None
    head, colon, tail = rest.rpartition(":")
    if colon and tail.isdigit():
        ckpt, steps = head, int(tail)
    if not sep or not name.strip() or not ckpt or (steps is not None and steps < 1):
        raise UserError(f"--extra-decoder must look like 'NAME=CKPT[:STEPS]' with STEPS >= 1, got {text!r}")
    return name.strip(), ckpt, steps


def decoder_file_name(name: str) -> str:
    return "decoder_" + (re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "extra") + ".safetensors"


def check_decoder(decoder: SSDD, path: str, meta: dict) -> str:
    """Refuse a decoder of another encoder than the DiT's; returns how the check was made."""
    if decoder.has_encoder:
        h = decoder.encoder_sha256()
        how = "sha256 of the encoder weights matches the DiT's cache"
    else:
        h = read_metadata(path).get("encoder_sha256")
        if h is None:
            return "not checked (decoder-only file without encoder_sha256)"
        how = "encoder_sha256 recorded in the decoder-only file matches the DiT's"
    if h != meta["encoder_sha256"]:
        raise UserError(f"the decoder checkpoint {path} comes with another encoder (sha256 {h[:12]}) than the "
                        f"one whose latents the DiT learnt (sha256 {meta['encoder_sha256'][:12]}); its latents "
                        f"would not match")
    latent = _json_field(meta, "latent_shape")
    if decoder.encoder.z_channels != latent[0] or decoder.patch_size * latent[1] != int(meta["im_size"]):
        raise UserError(f"the decoder {path} takes {decoder.encoder.z_channels}-channel latents at 1/"
                        f"{decoder.patch_size} scale, not the DiT's {latent} for {meta['im_size']} px")
    return how


def decoder_summary(decoder: SSDD) -> dict:
    return {**decoder.architecture(), "single_step": bool(decoder.single_step),
            "params": sum(p.numel() for p in decoder.decoder.parameters()), "dtype": "float16"}


def export(args) -> dict:
    check_args(args)
    hub = args.hub or bool(args.push_to_hub)
    figures = read_results(args.results)  # before any work: a bad --results file stops here
    dit_path = resolve_dit(args.dit, args.ckpt_dir)
    model, meta = load_dit(dit_path)
    if str(args.decoder or meta["tokenizer_checkpoint"]).startswith("sdvae:"):
        raise UserError(f"{dit_path} was trained on SD-VAE latents ({meta['tokenizer_checkpoint']}): a bundle ships "
                        f"an SSDD decoder of this project's latents; sample from the run itself with "
                        f"sample/generate.py --ckpt {dit_path}")
    channels = args.image_channels or image_channels({}, meta, dit_path)  # of the data: 1 makes samples grey
    dec_path = resolve_checkpoint(args.ckpt_dir, args.decoder or meta["tokenizer_checkpoint"])
    decoder = SSDD.from_checkpoint(dec_path).eval()
    enc_check = check_decoder(decoder, dec_path, meta)
    if enc_check.startswith("not checked"):
        print(f"warning: {dec_path} is a decoder-only file that does not record its encoder's sha256; "
              f"nothing shows it decodes the latents the DiT learnt")
    extras = []  # (name, source path, steps, SSDD, check); all checked before anything is written
    for text in args.extra_decoder or []:
        name, spec, steps = parse_extra_decoder(text)
        path = resolve_checkpoint(args.ckpt_dir, spec)
        extra = SSDD.from_checkpoint(path).eval()
        extras.append((name, path, steps or default_decoder_steps(extra), extra, check_decoder(extra, path, meta)))
    sample = {**SAMPLE_DEFAULTS, **_json_field(meta, "sample", {})}
    sample = {k: sample[k] for k in SAMPLE_DEFAULTS}
    for key, value in (("cfg_scale", args.cfg), ("steps", args.steps), ("method", args.sampler),
                       ("decoder_steps", args.decoder_steps)):
        if value is not None:
            sample[key] = value
    if sample["method"] not in METHODS:
        raise UserError(f"unknown sampler {sample['method']!r}; valid: {', '.join(METHODS)}")
    main_steps = sample["decoder_steps"] or default_decoder_steps(decoder)
    main_name = args.decoder_name or decoder_label(decoder, main_steps)
    names = [main_name] + [e[0] for e in extras]
    if len(set(names)) != len(names) or len({decoder_file_name(n) for n in names[1:]}) != len(extras):
        raise UserError(f"decoder names must differ (also once reduced to file names): {names}")

    os.makedirs(args.out, exist_ok=True)
    remove_stale_temporaries(args.out)
    for stale in os.listdir(args.out):  # extra decoders of an earlier export into the same folder
        if stale.startswith("decoder_") and stale.endswith(".safetensors"):
            os.remove(os.path.join(args.out, stale))
    provenance = {"dit_source": dit_path, "dit_step": meta.get("step"), "decoder_source": dec_path}
    dit_meta = {**meta, "sample": json.dumps(sample), "exported_from": dit_path}
    save_weights({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()},
                 os.path.join(args.out, DIT_FILE), dit_meta)
    decoder.save_decoder(os.path.join(args.out, DECODER_FILE), dtype=torch.float16,
                         metadata={"exported_from": dec_path, "encoder_sha256": meta["encoder_sha256"]})
    written = [DIT_FILE, DECODER_FILE]
    listing = [{"name": main_name, "file": DECODER_FILE, "steps": main_steps, **decoder_summary(decoder),
                "source": dec_path, "encoder_check": enc_check}]
    for name, path, steps, extra, check in extras:
        file = decoder_file_name(name)
        extra.save_decoder(os.path.join(args.out, file), dtype=torch.float16,
                           metadata={"exported_from": path, "encoder_sha256": meta["encoder_sha256"]})
        written.append(file)
        listing.append({"name": name, "file": file, "steps": steps, **decoder_summary(extra), "source": path,
                        "encoder_check": check})
    files = {name: file_record(os.path.join(args.out, name)) for name in written}
    for entry in listing:
        entry.update(files[entry["file"]])
    info = {
        "what": "class-conditional DiT + SSDD decoder generator bundle (dit.pipeline.load_generator)",
        "dit": {"model": meta["model"], "params": sum(p.numel() for p in model.parameters()),
                "num_classes": int(meta["num_classes"]), "class_names": _json_field(meta, "class_names", []),
                "learn_sigma": bool(int(meta["learn_sigma"])), "dtype": "float16"},
        "decoder": {**decoder_summary(decoder), "default_steps": 1 if decoder.single_step else decoder.default_steps},
        "latent_shape": _json_field(meta, "latent_shape"),
        "im_size": int(meta["im_size"]),
        "dataset": meta.get("dataset"),
        "image_channels": channels,
        "z_mean": float(meta["z_mean"]),
        "z_std": float(meta["z_std"]),
        "encoder_sha256": meta["encoder_sha256"],
        "encoder_check": enc_check,
        "tokenizer_checkpoint": meta["tokenizer_checkpoint"],
        "sample": sample,
        "provenance": provenance,
        "files": files,
        "exported": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if extras:  # without extras bundle.json keeps its earlier form (decoder.safetensors is the one decoder)
        info["decoders"] = listing
    if figures:
        info["evaluation"] = figures
    atomic_json(os.path.join(args.out, INFO_FILE), info)
    default_mb = sum(files[n]["bytes"] for n in (DIT_FILE, DECODER_FILE)) / 1e6
    total = sum(f["bytes"] for f in files.values()) / 1e6
    print(f"exported {meta['model']} (step {meta.get('step')}) + {decoder.decoder_name} decoder "
          f"({'single-step' if decoder.single_step else f'{decoder.default_steps}-step'}) to {args.out}: "
          f"{default_mb:.1f} MB" + (f", plus {len(extras)} extra decoder(s) ({', '.join(names[1:])}): "
                                    f"{total:.1f} MB in all" if extras else ""))
    if default_mb > BUNDLE_LIMIT_MB and not hub:
        print(f"warning: the DiT and default decoder are larger than the {BUNDLE_LIMIT_MB:.0f} MB the repository "
              f"allows")
    if hub:
        files = write_hub_files(args.out, info, figures, args.license, args.push_to_hub, args.grid_per_class)
        print(f"Hub files in {args.out}: {', '.join(files)}")
    if args.push_to_hub:
        print(f"pushed {args.out} to {push_to_hub(args.out, args.push_to_hub, private=args.private)}")
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dit", required=True, help="DiT run name under --ckpt-dir or a model_dit_ema.safetensors file")
    ap.add_argument("--decoder", default=None, help="SSDD checkpoint, tokenizer run name or released name "
                    "(default: the DiT's tokenizer)")
    ap.add_argument("--out", default="dit/assets/fmnist")
    ap.add_argument("--ckpt-dir", default="runs")
    ap.add_argument("--cfg", type=float, default=None, help="default guidance scale of the bundle")
    ap.add_argument("--steps", type=int, default=None, help="default DiT sampling steps")
    ap.add_argument("--sampler", default=None, help=f"default sampler ({', '.join(METHODS)})")
    ap.add_argument("--decoder-steps", type=int, default=None, help="default decoder steps (default: the decoder's)")
    ap.add_argument("--decoder-name", default=None, help="display name of the default decoder (default: e.g. "
                    "'SSDD-XS 1-step (distilled)')")
    ap.add_argument("--extra-decoder", action="append", default=None, metavar="NAME=CKPT[:STEPS]",
                    help="a further decoder of the same latents (repeatable); CKPT a file or tokenizer run name")
    ap.add_argument("--image-channels", type=int, choices=(1, 3), default=None,
                    help="channels of the training data, recorded in bundle.json (1: samples are made grey); default: "
                         "from the DiT run's latent cache, else 1 for fmnist, else 3")
    ap.add_argument("--hub", action="store_true", help="also write the Hugging Face Hub files: model card "
                    "README.md, config.json, samples.png")
    ap.add_argument("--results", action="append", default=None, metavar="JSON",
                    help="measured figures for the card and bundle.json (eval/generation_table.py or eval/gfid.py "
                    "output; repeatable)")
    ap.add_argument("--license", default=None, help="the card's licence (default: cc-by-nc-4.0 for decoders from "
                    "the facebook/SSDD release, else mit)")
    ap.add_argument("--grid-per-class", type=int, default=4, help="images per class in samples.png (0: none)")
    ap.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the folder to this Hub model "
                    "repository (implies --hub; token from HF_TOKEN or `hf auth login`)")
    ap.add_argument("--private", action="store_true", help="create the Hub repository private")
    return run_cli(export, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""Export a generator bundle: the EMA DiT and the SSDD decoder in fp16, plus a JSON of stats and provenance.

    python -m dit.export --dit dit_fmnist --out dit/assets/fmnist
    python -m dit.export --dit runs/jobs/dit_fmnist/checkpoints/last/model_dit_ema.safetensors \
        --decoder runs/jobs/fmnist_distilled/checkpoints/last/model_ae_ema.safetensors --out dit/assets/fmnist

--dit is a DiT run name under --ckpt-dir or a model_dit_ema.safetensors file. --decoder is an SSDD checkpoint (file
or tokenizer run name; default: the tokenizer the DiT was trained on). A whole-model decoder checkpoint must carry
the same encoder as the one that made the DiT's latents (checked by the sha256 of its encoder weights); a
distilled single-step decoder of the same encoder passes that check and makes the bundle decode in one step.
--cfg / --steps / --sampler / --decoder-steps set the bundle's default sampler (else the run's `sample:` config).
"""

import argparse
import json
import os
import sys
import time

import torch

from dit.flow import METHODS
from dit.pipeline import DECODER_FILE, DIT_FILE, INFO_FILE, SAMPLE_DEFAULTS, _json_field, load_dit
from tokenizer.atomic import remove_stale_temporaries
from tokenizer.checkpoint import file_record, read_metadata, save_weights, sha256_file  # noqa: F401 (re-exported)
from tokenizer.errors import UserError, run_cli
from tokenizer.runs import resolve_checkpoint, save_json
from tokenizer.ssdd import SSDD
from tokenizer.validation import MAX_STEPS, check_output_dir, in_range

BUNDLE_LIMIT_MB = 25.0


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
    if args.cfg is not None:
        in_range("--cfg", args.cfg, 0, 100)
    for name, value in (("--steps", args.steps), ("--decoder-steps", args.decoder_steps)):
        if value is not None:
            in_range(name, value, 1, MAX_STEPS)
    check_output_dir(args.out, "--out")


def decoder_encoder_sha256(decoder: SSDD, path: str) -> str | None:
    """The sha256 of the encoder whose latents `decoder` decodes: its own encoder's, or for a decoder-only file the
    `encoder_sha256` it records (None when it records none)."""
    if decoder.has_encoder:
        return decoder.encoder_sha256()
    return read_metadata(path).get("encoder_sha256")


def export(args) -> dict:
    check_args(args)
    dit_path = resolve_dit(args.dit, args.ckpt_dir)
    model, meta = load_dit(dit_path)
    dec_path = resolve_checkpoint(args.ckpt_dir, args.decoder or meta["tokenizer_checkpoint"])
    decoder = SSDD.from_checkpoint(dec_path).eval()
    h = decoder_encoder_sha256(decoder, dec_path)
    if h is not None and h != meta["encoder_sha256"]:
        kind = "checkpoint" if decoder.has_encoder else "decoder-only file"
        raise UserError(f"the decoder {kind} {dec_path} comes with another encoder (sha256 {h[:12]}) than the "
                        f"one whose latents the DiT learnt (sha256 {meta['encoder_sha256'][:12]}); its latents "
                        f"would not match")
    if h is not None:
        enc_check = "sha256 of the decoder's encoder matches the DiT's cache"
    else:
        enc_check = "not checked (decoder-only file without encoder_sha256)"
        print(f"warning: {dec_path} is a decoder-only file that does not record its encoder's sha256; "
              f"nothing shows it decodes the latents the DiT learnt")
    sample = {**SAMPLE_DEFAULTS, **_json_field(meta, "sample", {})}
    sample = {k: sample[k] for k in SAMPLE_DEFAULTS}
    for key, value in (("cfg_scale", args.cfg), ("steps", args.steps), ("method", args.sampler),
                       ("decoder_steps", args.decoder_steps)):
        if value is not None:
            sample[key] = value
    if sample["method"] not in METHODS:
        raise UserError(f"unknown sampler {sample['method']!r}; valid: {', '.join(METHODS)}")

    os.makedirs(args.out, exist_ok=True)
    remove_stale_temporaries(args.out)
    provenance = {"dit_source": dit_path, "dit_step": meta.get("step"), "decoder_source": dec_path}
    dit_meta = {**meta, "sample": json.dumps(sample), "exported_from": dit_path}
    save_weights({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()},
                 os.path.join(args.out, DIT_FILE), dit_meta)
    decoder.save_decoder(os.path.join(args.out, DECODER_FILE), dtype=torch.float16,
                         metadata={"exported_from": dec_path, "encoder_sha256": meta["encoder_sha256"]})
    files = {name: file_record(os.path.join(args.out, name)) for name in (DIT_FILE, DECODER_FILE)}
    info = {
        "what": "class-conditional DiT + SSDD decoder generator bundle (dit.pipeline.load_generator)",
        "dit": {"model": meta["model"], "params": sum(p.numel() for p in model.parameters()),
                "num_classes": int(meta["num_classes"]), "class_names": _json_field(meta, "class_names", []),
                "learn_sigma": bool(int(meta["learn_sigma"])), "dtype": "float16"},
        "decoder": {**decoder.architecture(), "single_step": bool(decoder.single_step),
                    "default_steps": 1 if decoder.single_step else decoder.default_steps,
                    "params": sum(p.numel() for p in decoder.decoder.parameters()), "dtype": "float16"},
        "latent_shape": _json_field(meta, "latent_shape"),
        "im_size": int(meta["im_size"]),
        "dataset": meta.get("dataset"),
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
    save_json(os.path.join(args.out, INFO_FILE), info)
    total = sum(os.path.getsize(os.path.join(args.out, n)) for n in os.listdir(args.out)) / 1e6
    print(f"exported {meta['model']} (step {meta.get('step')}) + {decoder.decoder_name} decoder "
          f"({'single-step' if decoder.single_step else f'{decoder.default_steps}-step'}) to {args.out}: {total:.1f} MB")
    if total > BUNDLE_LIMIT_MB:
        print(f"warning: the bundle is larger than the {BUNDLE_LIMIT_MB:.0f} MB the repository allows")
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dit", required=True, help="DiT run name under --ckpt-dir or a model_dit_ema.safetensors file")
    ap.add_argument("--decoder", default=None, help="SSDD checkpoint or tokenizer run name (default: the DiT's tokenizer)")
    ap.add_argument("--out", default="dit/assets/fmnist")
    ap.add_argument("--ckpt-dir", default="runs")
    ap.add_argument("--cfg", type=float, default=None, help="default guidance scale of the bundle")
    ap.add_argument("--steps", type=int, default=None, help="default DiT sampling steps")
    ap.add_argument("--sampler", default=None, help=f"default sampler ({', '.join(METHODS)})")
    ap.add_argument("--decoder-steps", type=int, default=None, help="default decoder steps (default: the decoder's)")
    return run_cli(export, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

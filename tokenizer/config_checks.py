"""The checks of configs/ssdd.yaml (used by tokenizer.train and the evaluation scripts before any work): the rules
both trainers share (tokenizer.common.validation.SHARED_RULES) plus the tokenizer's own keys."""

import os

from omegaconf import OmegaConf

from tokenizer.common.downloads import released_architecture
from tokenizer.common.errors import UserError
from tokenizer.common.validation import (
    MAX_STEPS,
    Rule,
    _text,
    boolean,
    choice,
    existing_file,
    integer,
    number,
    optional,
    text,
    trainer_checks,
)
from tokenizer.data import dataset_kind
from tokenizer.data_check import SUBSETS
from tokenizer.decoder import ATTENTION_MODES, DECODER_SIZES, UPSAMPLE_MODES
from tokenizer.encoder import parse_encoder_name

# The data keys both trainers add to the shared rules (tokenizer.data, tokenizer.data_check).
DATASET_RULES = {
    "dataset.subset": choice(*SUBSETS),
    "dataset.allow_empty_classes": boolean,
    "dataset.check_files": boolean,
    "dataset.skip_unreadable": boolean,
}


def read_given_root(cfg) -> None:
    """A dataset.root the user gives is read or refused: one holding an image folder is read as one even under
    dataset.name=fmnist (the name is set to imagefolder, and the config saved with the run says so); one holding
    neither an image folder nor Fashion-MNIST's files stops the run (tokenizer.data.dataset_kind)."""
    kind = dataset_kind(cfg.dataset)
    if kind != cfg.dataset.name:
        print(f"dataset.root={cfg.dataset.root} holds an image folder: reading it with dataset.name={kind} (the "
              f"config said {cfg.dataset.name}), at dataset.im_size={cfg.dataset.im_size}")
        cfg.dataset.name = kind


def _image_size_fits_encoder(cfg) -> None:
    factor = max(parse_encoder_name(cfg.ssdd.encoder)[0], 8)  # the decoder's U-Net halves the image 3 times
    if cfg.dataset.im_size % factor:
        raise UserError(f"dataset.im_size={cfg.dataset.im_size} must be a multiple of {factor} for encoder "
                        f"{cfg.ssdd.encoder} and the decoder")


def _released_architecture(cfg) -> None:
    """A released name in ssdd.checkpoint (F8C4_M_256, SDVAE_M_256, ...) sets ssdd.encoder, ssdd.decoder and the
    released encoder width from the name; one in ssdd.encoder_checkpoint sets the encoder. (A run of that name in
    ckpt_dir would win in resolve_checkpoint, so it is left alone.)"""
    for key, parts in (("ssdd.encoder_checkpoint", ("encoder",)), ("ssdd.checkpoint", ("encoder", "decoder"))):
        spec = OmegaConf.select(cfg, key)
        arch = released_architecture(spec) if spec and not os.path.exists(str(spec)) else None
        if arch is None or os.path.isdir(os.path.join(cfg.ckpt_dir, "jobs", str(spec).partition("@")[0])):
            continue
        for part in parts:
            cfg.ssdd[part] = arch[part]
        cfg.ssdd.encoder_base_channels = 128  # every released encoder (and SD-VAE's) is 128 wide


def _encoder_name(v):
    try:
        parse_encoder_name(_text(v))
    except UserError:
        raise ValueError(v) from None
    return v


SSDD_CHECKS = trainer_checks({
    "task": choice("train", "eval", "z_stats"),
    "distill_teacher": boolean,
    "dataset.im_size": integer(8, 8192),
    "dataset.batch_size": integer(1),
    "dataset.aug_scale": optional(number(lo=1)),
    **DATASET_RULES,
    "ssdd.compile": boolean,
    "ssdd.channels_last": boolean,
    "ssdd.attention": choice(*ATTENTION_MODES),
    "ssdd.upsample": choice(*UPSAMPLE_MODES),
    "ssdd.checkpoint": optional(text),
    "ssdd.encoder": Rule("an encoder name f<F>c<C>, F in {4, 8, 16, 32} (e.g. f8c4)", _encoder_name),
    "ssdd.encoder_base_channels": integer(32, multiple_of=32),  # GroupNorm(32) needs multiples of 32
    "ssdd.encoder_checkpoint": optional(text),
    "ssdd.encoder_train": boolean,
    "ssdd.decoder": choice(*DECODER_SIZES, "kl"),
    "ssdd.kl_base_channels": integer(32, multiple_of=32),
    "ssdd.fm_trainer.t_sampler_args.t_mean": number(),
    "ssdd.fm_trainer.t_sampler_args.t_std": number(above=0),
    "ssdd.fm_sampler.steps": integer(1, MAX_STEPS),
    "ssdd.fm_sampler.t_pow_shift": number(above=0),
    "ssdd.ema.decay": number(0, 1),
    "ssdd.ema.start_iter": integer(0),
    "aux_losses.repa.i_extract": integer(0),
    "aux_losses.repa.n_layers": integer(1),
    "aux_losses.repa.dino_weights": optional(existing_file),
    "aux_losses.lpips_weights": optional(existing_file),
    **{f"losses.{name}": number(lo=0) for name in ("diffusion", "lpips", "repa", "kl", "l1", "gan")},
    "training.grad_accumulate": integer(1),
    "training.gan_start_step": integer(0),
    "training.eval_freq": integer(1),
    "training.eval_images": optional(integer(1)),
    "training.save_on_best": choice("psnr", "ssim", "lpips", "rfid", "mse", "mae"),
    "eval.split": text,
    "eval.steps": optional(integer(1, MAX_STEPS)),
    "eval.lpips": boolean,
    "eval.lpips_weights": optional(existing_file),
    "eval.fid": boolean,
    "eval.inception_weights": optional(existing_file),
    "eval.batch_size": integer(1),
    "show_samples": integer(1, 256),
}, checkpoint_keys=("ssdd.checkpoint", "ssdd.encoder_checkpoint"),
   cross=(read_given_root, _released_architecture, _image_size_fits_encoder))

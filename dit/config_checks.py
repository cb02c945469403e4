"""The checks of configs/dit.yaml (used by dit.cache and dit.train before any work): the rules both trainers share
(tokenizer.common.validation.SHARED_RULES) plus the DiT's own keys."""

from dit.decoder_files import sdvae_name
from dit.flow import METHODS
from dit.models import DiT_models
from tokenizer.common.errors import UserError
from tokenizer.common.runs import resolve_checkpoint
from tokenizer.common.validation import (
                                         MAX_STEPS,
                                         SAMPLING_LIMITS,
                                         Rule,
                                         boolean,
                                         choice,
                                         existing_file,
                                         int_list,
                                         integer,
                                         number,
                                         optional,
                                         text,
                                         trainer_checks,
                                         unit_interval_pair,
)
from tokenizer.config_checks import DATASET_RULES, read_given_root
from tokenizer.flow import T_KINDS
from tokenizer.sdvae import SDVAE_WEIGHTS

CACHE_DTYPES = ("float32", "float16", "bfloat16")


def tokenizer_exists(cfg) -> None:
    """tokenizer.checkpoint names a file, a run with saved weights, a released SSDD name, or SD-VAE (sdvae[:...],
    sd-vae-ft-mse, sd-vae-ft-ema: dit.cache then caches SD-VAE latents)."""
    spec = cfg.tokenizer.checkpoint
    if spec and sdvae_name(str(spec), cfg.ckpt_dir) is None:
        try:
            resolve_checkpoint(cfg.ckpt_dir, str(spec))
        except UserError as e:
            if type(e) is not UserError:  # a known name that cannot be fetched says what to do itself
                raise
            raise UserError(f"tokenizer.checkpoint={spec}: {e}, nor SD-VAE (sdvae, sdvae:<file>, "
                            f"{', '.join(SDVAE_WEIGHTS)})") from None


DIT_CHECKS = trainer_checks({
    "tokenizer.checkpoint": optional(text),
    "tokenizer.z_stats": optional(existing_file),
    "dataset.split": text,
    "dataset.im_size": integer(8, 8192, multiple_of=8),
    **DATASET_RULES,
    "cache.dir": optional(text),
    "cache.flip": boolean,
    "cache.batch_size": integer(1),
    "cache.shard_size": integer(1),
    "cache.dtype": choice(*CACHE_DTYPES),
    "model.name": choice(*DiT_models),
    "model.learn_sigma": boolean,
    "model.class_dropout_prob": number(0, 1),
    "model.qk_norm": boolean,
    "flow.t_kind": choice(*T_KINDS),
    "flow.t_mean": number(),
    "flow.t_std": number(above=0),
    "flow.t_shift": number(above=0),
    "training.batch_size": integer(1),
    "training.compile": boolean,
    "training.grad_accumulate": Rule("1: dit.train counts one batch per optimiser step (its data order and step "
                                     "generator rely on it); use more processes or a larger batch",
                                     integer(1, 1).convert),
    "training.ema.decay": number(0, 1),
    "training.ema.start_iter": integer(0),
    "sample.method": choice(*METHODS),
    "sample.steps": integer(1, MAX_STEPS),
    "sample.cfg_scale": number(*SAMPLING_LIMITS["cfg_scale"]),
    "sample.guidance_interval": unit_interval_pair,
    "sample.time_shift": number(above=0),
    "sample.decoder_steps": optional(integer(1, MAX_STEPS)),
    "sample.grid_classes": optional(int_list),
    "sample.per_class": integer(1, 256),
}, folder_keys=("cache.dir",), cross=(read_given_root, tokenizer_exists))

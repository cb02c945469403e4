"""An SSDD model from a tokenizer config, and the reconstruction of a split with the official protocol.

Used by the trainer's in-training evaluation, `task=eval`, and the evaluation scripts in eval/. The protocol
(docs/ARCHITECTURE.md §10): fixed noise (a generator seeded with the process index: seed 0 on one process),
originals and reconstructions quantised to 8 bits, PSNR over the whole set, SSIM per image, AlexNet LPIPS and rFID
when their weights exist.
"""

import os

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from tokenizer.common.errors import CheckpointMismatchError, UserError, one_line
from tokenizer.common.runs import resolve_checkpoint, save_grid
from tokenizer.common.training import make_accelerator
from tokenizer.data import build_dataset, take_subset
from tokenizer.ssdd import ARCHITECTURE_KEYS, SSDD, checkpoint_architecture

# The config keys of the architecture each kind of checkpoint decides: the whole model, or only its encoder.
MODEL_KEYS = ARCHITECTURE_KEYS
ENCODER_KEYS = ("encoder", "encoder_base_channels")


def command_line_keys(argv: list) -> dict:
    """{key: value as given} of the values a user set explicitly: the `key=value` arguments (a `config=` file's
    values are defaults)."""
    pairs = (arg.split("=", 1) for arg in argv if "=" in arg and not arg.startswith("config="))
    return {key.lstrip("+~"): value for key, value in pairs}


def checkpoint_sources(cfg, resume_state: str | None = None) -> list:
    """(config key, checkpoint file, architecture keys it decides) of every checkpoint `cfg` loads, most decisive
    first: the run's own training state when it resumes one, `ssdd.checkpoint`, `ssdd.encoder_checkpoint`."""
    s = cfg.ssdd
    sources = [("run_name", resume_state, MODEL_KEYS)] if resume_state else []
    if s.checkpoint:
        sources.append(("ssdd.checkpoint", resolve_checkpoint(cfg.ckpt_dir, s.checkpoint), MODEL_KEYS))
    if s.encoder_checkpoint:
        encoder = resolve_checkpoint(cfg.ckpt_dir, s.encoder_checkpoint)
        sources.append(("ssdd.encoder_checkpoint", encoder, ENCODER_KEYS))
    return sources


def adopt_checkpoint_architecture(cfg, explicit: dict | None = None, resume_state: str | None = None):
    """Set the `ssdd.*` architecture keys of `cfg` (encoder, decoder, widths) to those of the checkpoints it loads
    (`checkpoint_sources`), as dit.cache and dit.export build their tokenizer: a run trained with ssdd.decoder=S
    is then evaluated, measured or distilled with any config. A value the user gave on the command line
    (`explicit`: `command_line_keys`) that contradicts a checkpoint stops here, in one line; keys a file does not
    record keep the config's values. Idempotent; returns cfg."""
    explicit = explicit or {}
    decided = {}  # key -> (value, config key of its source, file)
    for source, path, keys in checkpoint_sources(cfg, resume_state):
        recorded = checkpoint_architecture(path, decided.get("encoder", (cfg.ssdd.encoder,))[0])
        for key in keys:
            if key not in recorded:
                continue
            if key in decided and decided[key][0] != recorded[key]:
                value, other, _ = decided[key]
                raise UserError(f"{source} ({path}) has {key} {recorded[key]} but {other} has {value}: they cannot "
                                f"load into one model; give checkpoints of one architecture")
            decided.setdefault(key, (recorded[key], source, path))
    if decided.get("decoder", (cfg.ssdd.decoder,))[0] != "kl":
        decided.pop("kl_base_channels", None)  # only the KL-VAE decoder has this width
    adopted = []
    for key, (value, source, path) in decided.items():
        given = explicit.get(f"ssdd.{key}")
        if given is not None and str(given).strip().lower() != str(value).lower():
            fix = (f"drop ssdd.{key}= to go on with this run, or use another run_name (nothing was changed)"
                   if source == "run_name" else
                   f"drop ssdd.{key}= (the checkpoint decides) or set ssdd.{key}={value}")
            raise UserError(f"ssdd.{key}={given} contradicts {source}: {path} holds a model with {key} {value}; {fix}")
        mine = cfg.ssdd[key]
        if mine == value:
            continue
        cfg.ssdd[key] = value
        adopted.append(f"ssdd.{key}={value} (config: {mine})")
    if adopted and os.environ.get("RANK", "0") == "0":  # said once per job
        print(f"architecture from the checkpoint: {', '.join(adopted)}")
    return cfg


def model_from_config(cfg) -> SSDD:
    """The SSDD of a tokenizer config's `ssdd:` section, with `ssdd.checkpoint` / `encoder_checkpoint` resolved;
    the architecture is that of the checkpoints it loads (`adopt_checkpoint_architecture`, which sets it in cfg)."""
    adopt_checkpoint_architecture(cfg)
    s = cfg.ssdd
    enc_ckpt = resolve_checkpoint(cfg.ckpt_dir, s.encoder_checkpoint) if s.encoder_checkpoint else None
    try:
        model = SSDD(
            encoder=s.encoder,
            decoder=s.decoder,
            encoder_checkpoint=enc_ckpt,
            encoder_train=s.encoder_train and not cfg.distill_teacher,  # a student decodes the teacher's z: no encoder
            fm_trainer=OmegaConf.to_container(s.fm_trainer),
            fm_sampler=OmegaConf.to_container(s.fm_sampler),
            encoder_base_channels=s.encoder_base_channels,
            kl_base_channels=s.kl_base_channels,
            attention=s.get("attention", "auto"),
            upsample=s.get("upsample", "subpixel"),
        )
        if not model.is_kl:
            model.decoder.repa_block = min(cfg.aux_losses.repa.i_extract, model.decoder.depth // 2)
        if s.checkpoint:
            model.load_checkpoint(resolve_checkpoint(cfg.ckpt_dir, s.checkpoint))
    except CheckpointMismatchError as e:  # a file that records no architecture (or not all of it)
        raise CheckpointMismatchError(f"{one_line(e)}; set ssdd.encoder, ssdd.decoder and ssdd.encoder_base_channels "
                                      f"to those the file was trained with") from None
    return model


def load_for_eval(cfg):
    """(accelerator, eval-mode model, eval split, checkpoint file) for evaluating `ssdd.checkpoint` (its
    architecture from the file: `model_from_config`)."""
    if not cfg.ssdd.checkpoint:
        raise UserError("evaluation needs ssdd.checkpoint=<file or run_name>")
    checkpoint = resolve_checkpoint(cfg.ckpt_dir, cfg.ssdd.checkpoint)
    accelerator = make_accelerator(cfg.training.mixed_precision)
    model = model_from_config(cfg).to(accelerator.device).eval()
    return accelerator, model, build_dataset(cfg.dataset, cfg.eval.split, train=False), checkpoint


@torch.no_grad()
def reconstruct_split(cfg, accelerator, model: SSDD, dataset, steps: int, limit=None, grid_path=None, observers=()):
    """Reconstruct (part of) a split with fixed noise (seed = process index, as the official eval); return metrics.

    `cfg` is a tokenizer config (its eval section picks the metrics). Each `observer(originals, reconstructions)`
    also sees every gathered batch (main process, [-1, 1], unquantised), so a caller can add a metric of its own
    without a second pass.
    """
    from tokenizer.metrics import ReconstructionMetrics

    # a class-balanced subset by default (dataset.subset), the same for every process count
    dataset = take_subset(dataset, limit, OmegaConf.select(cfg, "dataset.subset", default="balanced"))
    # accelerate shards the split and gather_for_metrics drops the padding of the last batch: every image counts once
    loader = DataLoader(dataset, batch_size=cfg.eval.batch_size, num_workers=cfg.dataset.num_workers)
    loader = accelerator.prepare(loader)
    metrics = ReconstructionMetrics(accelerator.device, lpips=cfg.eval.lpips, lpips_weights_path=cfg.eval.lpips_weights,
                                    fid=cfg.eval.fid, inception_weights_path=cfg.eval.inception_weights)
    g = torch.Generator(accelerator.device).manual_seed(accelerator.process_index)
    shown = None
    for x, _ in tqdm(loader, desc=f"eval {steps}-step", disable=not accelerator.is_main_process, leave=False):
        x = x.to(accelerator.device)
        with accelerator.autocast():
            rec = model.decode(model.encode(x).mode(), steps=steps, generator=g).float()
        x_all, rec_all = accelerator.gather_for_metrics((x, rec))
        if accelerator.is_main_process:
            metrics.update(x_all, rec_all)
            for observe in observers:
                observe(x_all, rec_all)
            if shown is None:
                shown = (x_all[: cfg.show_samples], rec_all[: cfg.show_samples])
    result = metrics.compute() if accelerator.is_main_process else None
    if grid_path and accelerator.is_main_process:
        save_grid(grid_path, [shown[0], shown[1]])
    return result

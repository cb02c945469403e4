"""Train a class-conditional DiT with flow matching on cached SSDD latents.

    python -m dit.cache config=configs/dit_fmnist.yaml                    # once: the latent cache
    accelerate launch -m dit.train config=configs/dit_fmnist.yaml run_name=dit_fmnist key=value ...

Every knob is in configs/dit.yaml. A run lives in <ckpt_dir>/jobs/<run_name>/: checkpoints/last/ (model_dit,
model_dit_ema, optimizer, training_state.json), TensorBoard logs, samples/*.png (EMA model, CFG, one row per class,
decoded by the tokenizer's decoder), losses.jsonl. Re-running the same run_name resumes exactly: the data order
(EpochSampler), timesteps, noise and label dropout are functions of (seed, step, rank), and the model, EMA,
optimiser and RNG states come back from checkpoints/last.

The loop is built from the same pieces as the tokenizer's (tokenizer.common.training: accelerator, optimiser, per-step
RNG, resumable batches, finite-loss guard, checkpoints; tokenizer.common.runs: run directory, loss log, grids;
tokenizer.common.ema: the EMA), so a fix to resume, logging or checkpointing is made once.
"""

import functools
import json
import os
import sys

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from dit.cache import LatentCache, load_tokenizer, read_z_stats
from dit.config_checks import DIT_CHECKS
from dit.flow import sample, training_loss
from dit.models import build_dit
from tokenizer.common.config import load_config
from tokenizer.common.ema import EMA
from tokenizer.common.errors import UserError, run_cli
from tokenizer.common.runs import LossLog, default_run_name, save_grid, unlock_runs
from tokenizer.common.tracking import ImageLog
from tokenizer.common.training import (
    build_optimizer,
    check_finite,
    complete_finished_run,
    epoch_batches,
    plan_steps,
    resume_run,
    save_checkpoint,
    start_run,
    step_generator,
    train_loader,
)
from tokenizer.common.validation import check_config
from tokenizer.data import identify
from tokenizer.data_check import banner, check_run_data, write_run_data


def dit_architecture(cfg, cache: LatentCache) -> dict:
    """What a generator needs besides the weights (stored in the safetensors metadata of every checkpoint)."""
    m = cache.meta
    return {
        "kind": "dit",
        "model": cfg.model.name,
        "input_size": m["latent_shape"][1],
        "in_channels": m["latent_shape"][0],
        "latent_shape": json.dumps(m["latent_shape"]),
        "num_classes": m["num_classes"],
        "learn_sigma": int(cfg.model.learn_sigma),
        "class_dropout_prob": float(cfg.model.class_dropout_prob),
        "qk_norm": int(cfg.model.qk_norm),
        "class_names": json.dumps(cache.class_names),
        "z_mean": m["z_mean"],
        "z_std": m["z_std"],
        "im_size": m["im_size"],
        "tokenizer_checkpoint": m["encoder_checkpoint"],
        "encoder_sha256": m["encoder_sha256"],
        "dataset": m["dataset"]["name"],
        "sample": json.dumps(OmegaConf.to_container(cfg.sample)),  # the generator's default sampler settings
    }


def build_model(cfg, num_classes: int, latent_shape) -> torch.nn.Module:
    c, h, w = latent_shape
    return build_dit(cfg.model.name, input_size=(h, w), in_channels=c, num_classes=num_classes,
                     learn_sigma=cfg.model.learn_sigma, class_dropout_prob=cfg.model.class_dropout_prob,
                     qk_norm=cfg.model.qk_norm)


def grid_classes(cfg, num_classes: int) -> list:
    classes = (list(cfg.sample.grid_classes) if cfg.sample.grid_classes is not None
               else list(range(min(num_classes, 10))))
    bad = [c for c in classes if not 0 <= int(c) < num_classes]
    if bad:
        raise UserError(f"sample.grid_classes {bad} outside the model's classes 0..{num_classes - 1}")
    return [int(c) for c in classes]


@torch.no_grad()
def sample_images(model, decoder, y, noise, cfg, z_mean: float, z_std: float, decoder_noise=None):
    """Latents from noise with the configured sampler and CFG, de-normalised and decoded to images in [-1, 1]."""
    s = cfg.sample
    z = sample(model, noise, y, steps=s.steps, method=s.method, cfg_scale=s.cfg_scale,
               guidance_interval=tuple(s.guidance_interval), time_shift=s.time_shift,
               generator=torch.Generator(noise.device).manual_seed(cfg.seed))
    return decoder.decode(z * z_std + z_mean, steps=s.decoder_steps, noise=decoder_noise).clamp(-1, 1)


def sample_grid(tb, model, decoder, grid, cfg, arch: dict, shown: list, step: int, out_dir: str) -> None:
    """EMA samples of fixed classes from fixed noise (one row per class), saved and sent to TensorBoard."""
    y, noise, decoder_noise = grid
    images = sample_images(model, decoder, y, noise, cfg, arch["z_mean"], arch["z_std"], decoder_noise)
    rows = list(images.split(cfg.sample.per_class))
    grid_image = save_grid(os.path.join(out_dir, "samples", f"step{step:07d}.png"), rows)
    tb.add_image(f"samples (EMA, cfg {cfg.sample.cfg_scale}, rows: classes {shown})", grid_image, step)


# ----------------------------------------------------------------------------- the loop


def train(cfg):
    """The training loop. Returns the trained (unwrapped) model."""
    training = cfg.training
    accelerator, out_dir = start_run(cfg, training.mixed_precision, training.grad_accumulate, project="dit")
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device

    # The tokenizer: its encoder hash picks (and checks) the cache, its decoder draws the sample grids.
    tokenizer, tok_ckpt = load_tokenizer(cfg)
    z_stats = read_z_stats(cfg, tok_ckpt)
    # The data the config names (listed, not read) picks the cache: a cache of other data is refused.
    cache = LatentCache.open(cfg, tokenizer.encoder_sha256(), tok_ckpt, identify(cfg.dataset, cfg.dataset.split))
    data = {"train": cache.meta["data"], "cache": cache.dir}  # the run's data.json
    if accelerator.is_main_process:
        print(banner(cache.meta["data"], f"data (latent cache {cache.dir})"))
    check_run_data(out_dir, {"train": cache.meta["data"]})
    if abs(cache.meta["z_mean"] - z_stats["z_mean"]) > 1e-6 or abs(cache.meta["z_std"] - z_stats["z_std"]) > 1e-6:
        raise UserError(f"latent cache {cache.dir} was normalised with z_mean={cache.meta['z_mean']:.5f}, "
                        f"z_std={cache.meta['z_std']:.5f} but {z_stats['path']} now says {z_stats['z_mean']:.5f}, "
                        f"{z_stats['z_std']:.5f}; rebuild the cache with python -m dit.cache")
    decoder = tokenizer.to(device)
    num_classes, latent_shape = cache.meta["num_classes"], cache.meta["latent_shape"]
    arch = dit_architecture(cfg, cache)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, num_classes, latent_shape).to(device)
    optimizer = build_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad],
                                training.optimizer, training.lr, training.weight_decay)
    ema = EMA(model, training.ema.decay, training.ema.start_iter)
    if training.compile and torch.cuda.is_available():  # in place: state-dict keys stay those of DiT
        model.compile()
    if accelerator.is_main_process:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{cfg.model.name}: {n_params / 1e6:.2f} M parameters, latents {tuple(latent_shape)}, "
              f"{num_classes} classes, cache {cache.dir} ({len(cache)} entries)")

    plan = plan_steps(len(cache), training.batch_size, world, training.epochs, training.max_steps,
                      what="the latent cache", batch_key="training.batch_size")
    loader, sampler = train_loader(cache, plan.per_rank_batch, world, rank, cfg.seed, cfg.dataset.num_workers)

    # Resume: everything needed to continue bit-for-bit is in checkpoints/last.
    ckpt_root = os.path.join(out_dir, "checkpoints")
    state = resume_run(accelerator, cfg, out_dir, {"dit": model, "dit_ema": ema.model}, optimizer)
    step = state["step"] if state is not None else 0
    if accelerator.is_main_process:
        write_run_data(out_dir, data)

    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    modules = {"dit": raw_model, "dit_ema": ema.model}  # the files of a training state
    accelerator.init_trackers("tensorboard")
    tb = ImageLog(accelerator) if accelerator.is_main_process else None  # grids to every tracker of log_with
    loss_log = LossLog(out_dir, accelerator, training.log_freq, step) if accelerator.is_main_process else None

    # Sample grids: fixed classes and fixed noise (drawn on the CPU), so grids of different steps compare.
    shown = grid_classes(cfg, num_classes)
    g = torch.Generator().manual_seed(cfg.seed)
    grid_y = torch.tensor(shown).repeat_interleave(cfg.sample.per_class).to(device)
    grid_noise = torch.randn((len(grid_y), *latent_shape), generator=g).to(device)
    f = decoder.patch_size
    grid_dec_noise = torch.randn((len(grid_y), 3, latent_shape[1] * f, latent_shape[2] * f), generator=g).to(device)
    grid = (grid_y, grid_noise, grid_dec_noise)

    model.train()
    optimizer.train()  # a no-op for AdamW; schedule-free optimisers need it (accelerate forwards it where it exists)
    if step >= plan.total_steps:  # a finished run: draw the final grid if a kill after its last save left it out
        def final_grid():
            if accelerator.is_main_process:
                sample_grid(tb, ema.model, decoder, grid, cfg, arch, shown, step, out_dir)

        path = os.path.join("samples", f"step{step:07d}.png")
        complete_finished_run(accelerator, out_dir, step, {path: os.path.isfile(os.path.join(out_dir, path))},
                              final_grid)
    batches = epoch_batches(loader, sampler, cache, plan, step) if step < plan.total_steps else ()
    with tqdm(total=plan.total_steps, initial=step, desc="train", disable=not accelerator.is_main_process,
              dynamic_ncols=True) as bar:
        for x, y in batches:  # a finished run, re-run, has nothing to do
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with accelerator.accumulate(model):
                gen = step_generator(cfg.seed, step, rank, device)
                # Label dropout for CFG from the step's generator (not the global RNG): resume stays exact.
                drop = (torch.rand(x.shape[0], generator=gen, device=device) < cfg.model.class_dropout_prob).long()
                with accelerator.autocast():
                    loss = training_loss(functools.partial(model, force_drop_ids=drop), x, y, generator=gen,
                                         t_kind=cfg.flow.t_kind, t_mean=cfg.flow.t_mean, t_std=cfg.flow.t_std,
                                         t_shift=cfg.flow.t_shift)
                total = accelerator.reduce(loss.detach(), "sum")
                check_finite(total, step)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and training.grad_clip:
                    grad_norm = accelerator.clip_grad_norm_(raw_model.parameters(), training.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            ema.update(raw_model, step)
            bar.update(1)

            if accelerator.is_main_process:
                record = {"step": step, "loss": float(total) / world}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                if loss_log.write(record, force=step == plan.total_steps):
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                if step % training.sample_every == 0 or step == plan.total_steps:
                    sample_grid(tb, ema.model, decoder, grid, cfg, arch, shown, step, out_dir)
            if step % training.ckpt_every == 0 or step == plan.total_steps:
                save_checkpoint(accelerator, [os.path.join(ckpt_root, "last")], modules, optimizer,
                                {"step": step, "config": OmegaConf.to_container(cfg)}, {**arch, "step": step})
            if step >= plan.total_steps:
                break
    accelerator.end_training()
    if loss_log:
        loss_log.close()
    return raw_model


def run(argv: list[str]) -> None:
    cfg = check_config(load_config("dit.yaml", argv), DIT_CHECKS)
    if cfg.run_name is None:
        cfg.run_name = default_run_name()
    try:
        train(cfg)
    finally:
        unlock_runs()  # the run's lock (start_run took it), also when training stops with an error


def main(argv=None) -> int:
    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())

"""Train, evaluate and measure latent statistics of an SSDD tokenizer (tasks `train`, `eval`, `z_stats`).

    accelerate launch -m tokenizer.train config=configs/fmnist.yaml run_name=fmnist     # train (resumes if it exists)
    accelerate launch -m tokenizer.train task=eval ssdd.checkpoint=fmnist ssdd.fm_sampler.steps=1
    accelerate launch -m tokenizer.train distill_teacher=true ssdd.checkpoint=fmnist ssdd.fm_sampler.steps=7  # student
    python -m tokenizer.train task=z_stats ssdd.checkpoint=fmnist

Every knob is in configs/ssdd.yaml (checked before any work: tokenizer.common.validation). A run lives in
<ckpt_dir>/jobs/<run_name>/: checkpoints/{last,best}/, TensorBoard logs, samples/*.png, losses.jsonl, and
results/step<N>/ (each evaluation's metrics; task=eval and task=z_stats of a run's checkpoint write there too).
Re-running with the same run_name resumes exactly: data order, noise and timesteps are functions of
(seed, step, rank), and the model, EMA, optimiser and RNG states are restored from checkpoints/last; a re-run of a
finished run completes its final evaluation and best/ if a kill left them out. One job writes a run at a time
(`<run>/.lock`: a second job with the same run_name stops in one line).

The architecture (ssdd.encoder, ssdd.decoder and their widths) is that of the checkpoints a task loads: the run's
own when it resumes, ssdd.checkpoint (eval, z_stats, the teacher of distillation) and ssdd.encoder_checkpoint (e.g.
the KL-VAE baseline), so `task=eval ssdd.checkpoint=<a run trained with ssdd.decoder=S>` needs no ssdd.decoder=S;
a value given on the command line that contradicts the checkpoint stops in one line.
"""

import json
import os
import sys

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from tokenizer.common.atomic import atomic_json
from tokenizer.common.checkpoint import resolve_state_dir
from tokenizer.common.config import load_config
from tokenizer.common.ema import EMA
from tokenizer.common.errors import UserError, run_cli
from tokenizer.common.runs import (
    LossLog,
    default_run_name,
    resolve_checkpoint,
    results_dir,
    run_dir,
    save_grid,
    step_results_dir,
    unlock_runs,
)
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
from tokenizer.config_checks import SSDD_CHECKS
from tokenizer.data import build_dataset
from tokenizer.data_check import banner, check_run_data, write_run_data
from tokenizer.evaluation import (
    adopt_checkpoint_architecture,
    command_line_keys,
    load_for_eval,
    model_from_config,
    reconstruct_split,
)
from tokenizer.latent_stats import FILE_NAME as Z_STATS_FILE
from tokenizer.latent_stats import compute_z_stats
from tokenizer.losses import PatchDiscriminator, adaptive_gan_weight, generator_loss, hinge_d_loss
from tokenizer.metrics import selection_score
from tokenizer.ssdd import SSDD

EVAL_FILE = "eval_training.json"  # the in-training evaluation of a step, in <run>/results/step<N>/

# ----------------------------------------------------------------------------- set-up helpers


def build_teacher(cfg) -> SSDD:
    """The frozen multi-step teacher of distillation: the model of `ssdd.checkpoint` (its architecture from the
    file), never checkpointed (docs/ARCHITECTURE.md §6)."""
    if not cfg.ssdd.checkpoint:
        raise UserError("distill_teacher=true needs ssdd.checkpoint=<file or run_name> of the multi-step teacher")
    if cfg.ssdd.decoder == "kl":
        raise UserError("distill_teacher=true distils a diffusion decoder; the KL-VAE (ssdd.decoder=kl) has one step "
                        "already")
    return model_from_config(cfg).eval().requires_grad_(False)


@torch.no_grad()
def distillation_targets(teacher: SSDD, x: torch.Tensor, steps: int, generator: torch.Generator):
    """(z, noise, x_T): the teacher encodes with .mode(), draws noise and runs its `steps`-step sampler from it.

    The student then learns the map noise -> x_T in one step: trained at t = 1 on the same (z, noise), with
    x_T as the clean end of the path, so its flow-matching target is x_T - noise.
    """
    z = teacher.encode(x).mode()
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return z, noise, teacher.decode(z, steps=steps, noise=noise)


def build_aux_losses(cfg, model: SSDD) -> torch.nn.ModuleDict:
    """LPIPS and REPA, each only when its weight is > 0 (so its pretrained weights are only needed then)."""
    from tokenizer.losses import DinoV2Teacher, LPIPSLoss, REPALoss

    aux = torch.nn.ModuleDict()
    if cfg.losses.lpips > 0:
        aux["lpips"] = LPIPSLoss(net="vgg", pretrained=True, weights_path=cfg.aux_losses.lpips_weights)
    if cfg.losses.repa > 0:
        if model.is_kl:
            raise UserError("REPA aligns the SSDD decoder's transformer tokens: set losses.repa=0 for ssdd.decoder=kl")
        teacher = DinoV2Teacher(pretrained=True, weights_path=cfg.aux_losses.repa.dino_weights)
        aux["repa"] = REPALoss(model.decoder.mid_channels, n_layers=cfg.aux_losses.repa.n_layers, teacher=teacher)
    return aux


def state_modules(model: SSDD, ema: EMA, aux, disc) -> dict:
    """The files of a training state: model_ae, model_ae_ema, model_aux_losses (+ model_discriminator)."""
    return {"ae": model, "ae_ema": ema.model, "aux_losses": aux} | ({"discriminator": disc} if disc else {})


def evaluate(cfg, accelerator, model: SSDD, val_set, step_counts: list, step: int, out_dir: str) -> dict:
    """{steps: metrics} of (part of) the val split at each step count, logged, with a grid per count."""
    results = {}
    for n in step_counts:
        grid = os.path.join(out_dir, "samples", f"eval_step{step:07d}_{n}steps.png")
        results[n] = reconstruct_split(cfg, accelerator, model, val_set, n, cfg.training.eval_images, grid)
    if accelerator.is_main_process:
        for n, r in results.items():
            accelerator.log({f"eval_{n}step/{k}": v for k, v in r.items() if isinstance(v, (int, float))}, step=step)
        tqdm.write(f"step {step}: " + " | ".join(
            f"{n}-step PSNR {r['psnr']:.2f} SSIM {r['ssim']:.4f}" for n, r in results.items()))
    return results


@torch.no_grad()
def sample_grid(tb, model: SSDD, teacher, fixed_x, step_counts: list, teacher_steps: int, step: int, out_dir: str):
    """Reconstruction grid: input, then 1-step and N-step decodes (distillation: input, teacher, 1-step student)."""
    def seeded():
        return torch.Generator(fixed_x.device).manual_seed(0)

    z = model.encode(fixed_x).mode()
    decoded = [model.decode(z, steps=n, generator=seeded()) for n in step_counts]
    if teacher is not None:  # the same noise, so the student's one step can be compared with the teacher's N
        decoded.insert(0, teacher.decode(z, steps=teacher_steps, generator=seeded()))
    grid = save_grid(os.path.join(out_dir, "samples", f"step{step:07d}.png"), [fixed_x] + decoded)
    title = "input, teacher, 1-step student" if teacher is not None else "input, then 1-step, N-step"
    tb.add_image(f"reconstructions (top to bottom: {title})", grid, step)


# ----------------------------------------------------------------------------- tasks


def train(cfg):
    """The training loop. Returns the trained (unwrapped) model."""
    training = cfg.training
    accelerator, out_dir = start_run(cfg, training.mixed_precision, training.grad_accumulate)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    torch.manual_seed(cfg.seed)

    model = model_from_config(cfg).to(device)
    teacher = None
    if cfg.distill_teacher:  # the student starts from the teacher's weights and becomes a one-step decoder
        teacher = build_teacher(cfg).to(device)
        model.single_step = True  # recorded in its checkpoints: decode() then defaults to one step
    aux = build_aux_losses(cfg, model).to(device)
    named = [(n, p) for n, p in list(model.named_parameters()) + list(aux.named_parameters()) if p.requires_grad]
    optimizer = build_optimizer(named, training.optimizer, training.lr, training.weight_decay)
    disc = disc_optimizer = None
    if cfg.losses.gan > 0:  # optional PatchGAN (hinge loss, LDM's adaptive weight) for the KL-VAE baseline
        if not model.is_kl:
            raise UserError("losses.gan > 0 trains a PatchGAN for the KL-VAE baseline: it needs ssdd.decoder=kl")
        disc = PatchDiscriminator().to(device)
        disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=training.lr, betas=(0.5, 0.9), weight_decay=0.0)
    optimizers = optimizer if disc is None else {"ae": optimizer, "discriminator": disc_optimizer}
    ema = EMA(model, cfg.ssdd.ema.decay, cfg.ssdd.ema.start_iter)
    if cfg.ssdd.compile and torch.cuda.is_available():
        model.decoder.compile()
    if cfg.ssdd.channels_last and torch.cuda.is_available():  # NHWC convolutions, where measured faster
        model.decoder.to(memory_format=torch.channels_last)

    train_set = build_dataset(cfg.dataset, "train", train=True)
    val_set = build_dataset(cfg.dataset, "val", train=False)
    data = {"train": train_set.identity, "val": val_set.identity}  # what the run reads, saved as its data.json
    if accelerator.is_main_process:
        print("\n".join(banner(identity, f"data ({split})") for split, identity in data.items()))
    check_run_data(out_dir, data)  # a resume on other data is refused before anything of the run changes
    plan = plan_steps(len(train_set), cfg.dataset.batch_size, world, training.epochs, training.max_steps)
    loader, sampler = train_loader(train_set, plan.per_rank_batch, world, rank, cfg.seed, cfg.dataset.num_workers)

    # Resume: everything needed to continue bit-for-bit is in checkpoints/last.
    ckpt_root = os.path.join(out_dir, "checkpoints")
    step, best, best_step = 0, None, None
    state = resume_run(accelerator, cfg, out_dir, state_modules(model, ema, aux, disc), optimizers)
    if state is not None:
        step, best, best_step = state["step"], state.get("best"), state.get("best_step")
    if accelerator.is_main_process:
        write_run_data(out_dir, data)

    model, optimizer = accelerator.prepare(model, optimizer)
    if disc is not None:
        disc, disc_optimizer = accelerator.prepare(disc, disc_optimizer)
    raw_model = accelerator.unwrap_model(model)
    modules = state_modules(raw_model, ema, aux, disc)
    accelerator.init_trackers("tensorboard")
    tb = ImageLog(accelerator) if accelerator.is_main_process else None  # grids to every tracker of log_with
    loss_log = LossLog(out_dir, accelerator, training.log_freq, step) if accelerator.is_main_process else None
    fixed_x = torch.stack([val_set[i][0] for i in range(min(cfg.show_samples, len(val_set)))]).to(device)
    # Samples and evals show 1-step next to N-step decodes; a distilled student is judged at one step only.
    step_counts = [1] if teacher is not None or raw_model.is_kl else sorted({1, cfg.ssdd.fm_sampler.steps})
    teacher_steps = cfg.ssdd.fm_sampler.steps

    def evaluate_and_save(step: int) -> None:
        """Evaluate the EMA model, keep the metrics in results/step<N>/, refresh best/ if it is better (or missing),
        then last/: in that order, so a kill never leaves last/ past a step whose outputs are incomplete."""
        nonlocal best, best_step
        results = evaluate(cfg, accelerator, ema.model, val_set, step_counts, step, out_dir)
        saves = ["last"]
        if accelerator.is_main_process:
            atomic_json(os.path.join(step_results_dir(out_dir, step), EVAL_FILE),
                      {"step": step, "images": training.eval_images, "split": "val", "data": val_set.identity,
                       "results": {f"{n}_steps": r for n, r in results.items()}})
            score = selection_score(results[step_counts[-1]], training.save_on_best)
            if best is None or score > best or resolve_state_dir(os.path.join(ckpt_root, "best")) is None:
                best, best_step, saves = score, step, ["best", "last"]
        save(saves, step)

    def save(names: list, step: int) -> None:
        save_checkpoint(accelerator, [os.path.join(ckpt_root, name) for name in names], modules, optimizers,
                        {"step": step, "best": best, "best_step": best_step, "config": OmegaConf.to_container(cfg)},
                        raw_model.architecture())

    model.train()
    # Schedule-free optimisers keep two weight sequences; the model holds the training one throughout, since
    # evaluation and sample grids use the EMA copy (accelerate's wrapper forwards train() where it exists).
    optimizer.train()
    trainable_aux = list(aux.parameters())
    if step >= plan.total_steps:  # a finished run: make what a kill after its last save may have left out
        final_eval = os.path.join(step_results_dir(out_dir, step), EVAL_FILE)
        complete_finished_run(accelerator, out_dir, step, {
            os.path.relpath(final_eval, out_dir): os.path.isfile(final_eval),
            "checkpoints/best": resolve_state_dir(os.path.join(ckpt_root, "best")) is not None,
        }, lambda: evaluate_and_save(step))

    batches = epoch_batches(loader, sampler, train_set, plan, step) if step < plan.total_steps else ()
    with tqdm(total=plan.total_steps, initial=step, desc="train", disable=not accelerator.is_main_process,
              dynamic_ncols=True) as bar:
        for x, _ in batches:  # a finished run, re-run, has nothing to do
            x = x.to(device, non_blocking=True)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    gen = step_generator(cfg.seed, step, rank, device)
                    if teacher is None:
                        out = model(x, generator=gen)
                    else:
                        z, noise, x_teacher = distillation_targets(teacher, x, teacher_steps, gen)
                        out = model(x, z=z, noise=noise, from_noise=True, target=x_teacher)
                    losses = dict(out.losses)
                    if "lpips" in aux:
                        losses["lpips"] = aux["lpips"](out.x0_pred.float(), out.x0_gt.float())
                    if "repa" in aux:
                        losses["repa"] = aux["repa"](out.features.float(), x, out.token_grid)
                    loss = sum(cfg.losses[name] * value for name, value in losses.items())
                    if disc is not None and step >= training.gan_start_step:
                        g_loss = generator_loss(disc(out.x0_pred))
                        scale = adaptive_gan_weight(loss, g_loss, raw_model.decoder.last_layer)
                        losses["gan"] = scale * g_loss
                        loss = loss + cfg.losses.gan * losses["gan"]
                total = accelerator.reduce(loss.detach(), "sum")
                check_finite(total, step, losses)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    if world > 1:  # the REPA projector sits outside DDP: average its gradients by hand
                        for p in trainable_aux:
                            torch.distributed.all_reduce(p.grad)
                            p.grad /= world
                    if training.grad_clip:
                        grad_norm = accelerator.clip_grad_norm_(raw_model.parameters(), training.grad_clip)
                        if trainable_aux:
                            accelerator.clip_grad_norm_(trainable_aux, training.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if disc is not None and step >= training.gan_start_step:  # then the discriminator, on detached outputs
                    disc_optimizer.zero_grad(set_to_none=True)  # drop what the generator term left in D
                    with accelerator.autocast():
                        losses["disc"] = hinge_d_loss(disc(x), disc(out.x0_pred.detach()))
                    accelerator.backward(losses["disc"])
                    disc_optimizer.step()
                    disc_optimizer.zero_grad(set_to_none=True)
            step += 1
            ema.update(raw_model, step)
            bar.update(1)

            if accelerator.is_main_process:
                record = {"step": step, "loss": float(total) / world,
                          **{k: float(v.detach()) for k, v in losses.items()}}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                if loss_log.write(record, force=step == plan.total_steps):
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                if step % training.sample_every == 0:
                    sample_grid(tb, ema.model, teacher, fixed_x, step_counts, teacher_steps, step, out_dir)
            end_of_epoch = step % plan.steps_per_epoch == 0
            if (end_of_epoch and (step // plan.steps_per_epoch) % training.eval_freq == 0) or step == plan.total_steps:
                # EMA reconstructions at 1 and N steps (also at the very end, so every run finishes with metrics
                # and a best/ checkpoint)
                evaluate_and_save(step)
            elif step % training.ckpt_every == 0:
                save(["last"], step)
            if step >= plan.total_steps:
                break
    accelerator.end_training()
    if loss_log:
        loss_log.close()
    return raw_model


def task_eval(cfg):
    """Reconstruct the eval split with `ssdd.fm_sampler.steps` (or eval.steps) and write eval_<N>steps.json (and a
    grid) into the checkpoint's results folder (`tokenizer.common.runs.results_dir`)."""
    accelerator, model, dataset, checkpoint = load_for_eval(cfg)
    if accelerator.is_main_process:
        print(banner(dataset.identity))
    steps = cfg.eval.steps or cfg.ssdd.fm_sampler.steps
    out_dir = results_dir(checkpoint)
    grid_path = os.path.join(out_dir, f"eval_{steps}steps.png")
    result = reconstruct_split(cfg, accelerator, model, dataset, steps, grid_path=grid_path)
    if accelerator.is_main_process:
        result = {"checkpoint": checkpoint, "steps": steps, "split": cfg.eval.split,
                  "im_size": cfg.dataset.im_size, **result, "data": dataset.identity}
        atomic_json(os.path.join(out_dir, f"eval_{steps}steps.json"), result)
        print(json.dumps(result, indent=2))
        print(f"saved {os.path.join(out_dir, f'eval_{steps}steps.json')}")
    return result


def task_z_stats(cfg):
    """Scalar mean and (unbiased) std of `.mode()` latents over the eval split, in float64; saved in the checkpoint's
    results folder."""
    spec = cfg.ssdd.checkpoint or cfg.ssdd.encoder_checkpoint
    if not spec:
        raise UserError("task=z_stats needs ssdd.checkpoint= or ssdd.encoder_checkpoint=")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model_from_config(cfg).to(device).eval()
    dataset = build_dataset(cfg.dataset, cfg.eval.split, train=False)
    print(banner(dataset.identity))
    stats = compute_z_stats(model, dataset, cfg.eval.batch_size, cfg.dataset.num_workers, device)
    stats |= {"encoder": cfg.ssdd.encoder, "im_size": cfg.dataset.im_size, "split": cfg.eval.split,
              "checkpoint": resolve_checkpoint(cfg.ckpt_dir, spec), "data": dataset.identity}
    path = os.path.join(results_dir(stats["checkpoint"]), Z_STATS_FILE)
    atomic_json(path, stats)
    print(json.dumps(stats, indent=2))
    print(f"saved {path}")
    return stats


TASKS = {"train": train, "eval": task_eval, "z_stats": task_z_stats}


def own_state(cfg) -> str | None:
    """The model file of the run's checkpoints/last when `task=train` resumes one (its architecture goes on)."""
    if cfg.task != "train":
        return None
    found = resolve_state_dir(os.path.join(run_dir(cfg.ckpt_dir, cfg.run_name), "checkpoints", "last"))
    path = os.path.join(found, "model_ae.safetensors") if found else None
    return path if path and os.path.isfile(path) else None


def run(argv: list[str]) -> None:
    cfg = check_config(load_config("ssdd.yaml", argv), SSDD_CHECKS)
    if cfg.run_name is None:
        cfg.run_name = default_run_name()
    # Every task builds the architecture of the checkpoints it loads; a key set here that contradicts them stops.
    adopt_checkpoint_architecture(cfg, command_line_keys(argv), own_state(cfg))
    cfg = check_config(cfg, SSDD_CHECKS)  # again: the cross-checks see the adopted architecture
    try:
        TASKS[cfg.task](cfg)
    finally:
        unlock_runs()


def main(argv=None) -> int:
    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())

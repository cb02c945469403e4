"""Train, evaluate and measure latent statistics of an SSDD tokenizer (tasks `train`, `eval`, `z_stats`).

    accelerate launch -m tokenizer.train config=configs/fmnist.yaml run_name=fmnist     # train (resumes if it exists)
    accelerate launch -m tokenizer.train task=eval ssdd.checkpoint=fmnist ssdd.fm_sampler.steps=1
    accelerate launch -m tokenizer.train distill_teacher=true ssdd.checkpoint=fmnist ssdd.fm_sampler.steps=7  # 1-step student
    python -m tokenizer.train task=z_stats ssdd.checkpoint=fmnist

Every knob is in configs/ssdd.yaml. A run lives in <ckpt_dir>/jobs/<run_name>/: checkpoints/{last,best}/,
TensorBoard logs, samples/*.png, losses.jsonl, eval_*.json. Re-running with the same run_name resumes exactly:
data order, noise and timesteps are functions of (seed, step, rank), and the model, EMA, optimiser and RNG
states are restored from checkpoints/last.
"""

import json
import os
import sys
import time

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from tokenizer.checkpoint import load_training_state, resolve_state_dir, save_training_state
from tokenizer.config import load_config
from tokenizer.data import EpochSampler, build_dataset
from tokenizer.ema import EMA
from tokenizer.errors import UserError, run_cli
from tokenizer.kl_decoder import PatchDiscriminator, adaptive_gan_weight, generator_loss, hinge_d_loss
from tokenizer.ssdd import SSDD

# ----------------------------------------------------------------------------- set-up helpers

HIGHER_IS_BETTER = {"psnr", "ssim"}  # for the other metrics (rfid, lpips, mse) lower is better


def run_dir(cfg) -> str:
    return os.path.join(cfg.ckpt_dir, "jobs", cfg.run_name)


def resolve_checkpoint(cfg, spec: str) -> str:
    """A file path, or `<run_name>[@last|@best]` -> that run's EMA weights."""
    if os.path.isfile(spec):
        return spec
    run, _, which = spec.partition("@")
    path = os.path.join(cfg.ckpt_dir, "jobs", run, "checkpoints", which or "last")
    found = resolve_state_dir(path)
    if found is None:
        raise UserError(f"checkpoint '{spec}' is neither a file nor a run with saved weights (looked in {path})")
    return os.path.join(found, "model_ae_ema.safetensors")


def build_model(cfg) -> SSDD:
    s = cfg.ssdd
    enc_ckpt = resolve_checkpoint(cfg, s.encoder_checkpoint) if s.encoder_checkpoint else None
    model = SSDD(
        encoder=s.encoder,
        decoder=s.decoder,
        encoder_checkpoint=enc_ckpt,
        encoder_train=s.encoder_train and not cfg.distill_teacher,  # a student decodes the teacher's z: no encoder
        fm_trainer=OmegaConf.to_container(s.fm_trainer),
        fm_sampler=OmegaConf.to_container(s.fm_sampler),
        encoder_base_channels=s.encoder_base_channels,
        kl_base_channels=s.kl_base_channels,
    )
    if not model.is_kl:
        model.decoder.repa_block = min(cfg.aux_losses.repa.i_extract, model.decoder.depth // 2)
    if s.checkpoint:
        model.load_checkpoint(resolve_checkpoint(cfg, s.checkpoint))
    return model


def build_teacher(cfg) -> SSDD:
    """The frozen multi-step teacher of distillation: the model of `ssdd.checkpoint`, never checkpointed (spec §5)."""
    if not cfg.ssdd.checkpoint:
        raise UserError("distill_teacher=true needs ssdd.checkpoint=<file or run_name> of the multi-step teacher")
    if cfg.ssdd.decoder == "kl":
        raise UserError("distill_teacher=true distils a diffusion decoder; the KL-VAE (ssdd.decoder=kl) has one step already")
    return build_model(cfg).eval().requires_grad_(False)


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


def build_optimizer(cfg, named_params):
    """Weight decay on Linear/Conv/Norm weights only, not on biases or the relative-position tables (spec §3.5)."""
    t = cfg.training
    decay = [p for n, p in named_params if n.endswith("weight")]
    no_decay = [p for n, p in named_params if not n.endswith("weight")]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "radam_schedulefree":
        import schedulefree

        return schedulefree.RAdamScheduleFree(groups, lr=t.lr)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr)
    raise UserError(f"unknown training.optimizer '{t.optimizer}' (choose radam_schedulefree or adamw)")


def step_generator(cfg, step: int, rank: int, device) -> torch.Generator:
    """All randomness of one training step (timesteps, noise, posterior sample) derives from (seed, step, rank)."""
    return torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step * 1_009 + rank)


def make_accelerator(cfg, log: bool = False):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    mp = cfg.training.mixed_precision if torch.cuda.is_available() else "no"
    kw = {}
    if log:
        kw = dict(log_with="tensorboard", project_config=ProjectConfiguration(project_dir=run_dir(cfg), logging_dir=run_dir(cfg)))
    return Accelerator(mixed_precision=mp, gradient_accumulation_steps=cfg.training.grad_accumulate, **kw)


def start_run(cfg, accelerator) -> str:
    """Print the config and the process layout, create the run directory and save config.yaml in it; return it."""
    out_dir = run_dir(cfg)
    if accelerator.is_main_process:
        print(OmegaConf.to_yaml(cfg))
        print(f"{accelerator.num_processes} process(es) on {accelerator.device}, "
              f"mixed precision: {accelerator.mixed_precision}")
        os.makedirs(out_dir, exist_ok=True)
        OmegaConf.save(cfg, os.path.join(out_dir, "config.yaml"))
    return out_dir


def train_loader(cfg, dataset, batch_size, world, rank):
    """Each rank reads its own shard of a (seed, epoch)-shuffled order; `sampler.set_epoch(e, start_index=k)` resumes mid-epoch."""
    sampler = EpochSampler(len(dataset), num_replicas=world, rank=rank, seed=cfg.seed, shuffle=True)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=cfg.dataset.num_workers,
                        drop_last=True, pin_memory=torch.cuda.is_available())
    return loader, sampler


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def reconstruct_split(cfg, accelerator, model: SSDD, dataset, steps: int, limit=None, grid_path=None, observers=()):
    """Reconstruct (part of) a split with fixed noise (seed 0 per process, as the official eval); return metrics.

    Each `observer(originals, reconstructions)` also sees every gathered batch (main process, [-1, 1], unquantised),
    so a caller can add a metric of its own without a second pass.
    """
    from tokenizer.metrics import ReconstructionMetrics

    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    # accelerate shards the split and gather_for_metrics drops the padding of the last batch: every image counts once
    loader = accelerator.prepare(DataLoader(dataset, batch_size=cfg.eval.batch_size, num_workers=cfg.dataset.num_workers))
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


def save_grid(path: str, rows: list) -> torch.Tensor:
    """One row per tensor (B, 3, H, W) in [-1, 1]; saved as PNG, returned for TensorBoard."""
    n = min(r.shape[0] for r in rows)
    grid = make_grid(torch.cat([r[:n].float().cpu() for r in rows]).clamp(-1, 1), nrow=n, normalize=True,
                     value_range=(-1, 1), padding=1)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_image(grid, path)
    return grid


# ----------------------------------------------------------------------------- tasks


def train(cfg):
    """The training loop. Returns the trained (unwrapped) model."""
    accelerator = make_accelerator(cfg, log=True)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    out_dir = start_run(cfg, accelerator)
    t = cfg.training
    if cfg.dataset.batch_size % world:
        raise UserError(f"dataset.batch_size={cfg.dataset.batch_size} must be divisible by the {world} processes")
    per_rank_bs = cfg.dataset.batch_size // world
    torch.manual_seed(cfg.seed)

    model = build_model(cfg).to(device)
    teacher = None
    if cfg.distill_teacher:  # the student starts from the teacher's weights and becomes a one-step decoder
        teacher = build_teacher(cfg).to(device)
        model.single_step = True  # recorded in its checkpoints: decode() then defaults to one step
    aux = build_aux_losses(cfg, model).to(device)
    named = [(n, p) for n, p in list(model.named_parameters()) + list(aux.named_parameters()) if p.requires_grad]
    optimizer = build_optimizer(cfg, named)
    disc = disc_optimizer = None
    if cfg.losses.gan > 0:  # optional PatchGAN (hinge loss, LDM's adaptive weight) for the KL-VAE baseline
        if not model.is_kl:
            raise UserError("losses.gan > 0 trains a PatchGAN for the KL-VAE baseline: it needs ssdd.decoder=kl")
        disc = PatchDiscriminator().to(device)
        disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=t.lr, betas=(0.5, 0.9), weight_decay=0.0)
    ema = EMA(model, cfg.ssdd.ema.decay, cfg.ssdd.ema.start_iter)
    if cfg.ssdd.compile and torch.cuda.is_available():
        model.decoder.compile()

    train_set = build_dataset(cfg.dataset, "train", train=True)
    val_set = build_dataset(cfg.dataset, "val", train=False)
    loader, sampler = train_loader(cfg, train_set, per_rank_bs, world, rank)
    steps_per_epoch = len(sampler) // per_rank_bs
    if steps_per_epoch == 0:
        raise UserError(f"the training split ({len(train_set)} images) is smaller than one batch ({cfg.dataset.batch_size})")
    total_steps = t.max_steps if t.max_steps is not None else t.epochs * steps_per_epoch

    # Resume: everything needed to continue bit-for-bit is in checkpoints/last.
    ckpt_root = os.path.join(out_dir, "checkpoints")
    step, best = 0, None
    def optimizers():  # what a training state holds: one optimiser, or two with the discriminator
        return optimizer if disc is None else {"ae": optimizer, "discriminator": disc_optimizer}

    def state_modules(model):
        return {"ae": model, "ae_ema": ema.model, "aux_losses": aux} | ({"discriminator": disc} if disc else {})

    if resolve_state_dir(os.path.join(ckpt_root, "last")):
        state = load_training_state(os.path.join(ckpt_root, "last"), state_modules(model), optimizers())
        step, best = state["step"], state.get("best")
        if accelerator.is_main_process:
            print(f"resumed {out_dir} at step {step}")

    model, optimizer = accelerator.prepare(model, optimizer)
    if disc is not None:
        disc, disc_optimizer = accelerator.prepare(disc, disc_optimizer)
    raw_model = accelerator.unwrap_model(model)
    modules = state_modules(raw_model)  # the files of a training state
    accelerator.init_trackers("tensorboard")
    tb = accelerator.get_tracker("tensorboard", unwrap=True) if accelerator.is_main_process else None
    loss_log = open(os.path.join(out_dir, "losses.jsonl"), "a") if accelerator.is_main_process else None
    fixed_x = torch.stack([val_set[i][0] for i in range(min(cfg.show_samples, len(val_set)))]).to(device)
    # Samples and evals show 1-step next to N-step decodes; a distilled student is judged at one step only.
    step_counts = [1] if teacher is not None or raw_model.is_kl else sorted({1, cfg.ssdd.fm_sampler.steps})
    main_steps = step_counts[-1]

    def batches():
        """Training batches from the current step on, epoch after epoch, resuming mid-epoch exactly."""
        epoch, k = divmod(step, steps_per_epoch)
        while True:
            sampler.set_epoch(epoch, start_index=k * per_rank_bs)
            train_set.set_epoch(epoch)  # per-item augmentation randomness is a function of (seed, epoch, index)
            for x, _ in loader:
                yield x.to(device, non_blocking=True)
            epoch, k = epoch + 1, 0

    def checkpoint(*names):
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for name in names:
                save_training_state(os.path.join(ckpt_root, name), modules, optimizers(),
                                    {"step": step, "best": best, "config": OmegaConf.to_container(cfg)},
                                    raw_model.architecture())

    def evaluate():
        """EMA reconstructions of (part of) the val split at 1 and N steps; refreshes last/ and, if better, best/."""
        nonlocal best
        results = {}
        for n in step_counts:
            grid = os.path.join(out_dir, "samples", f"eval_step{step:07d}_{n}steps.png")
            results[n] = reconstruct_split(cfg, accelerator, ema.model, val_set, n, t.eval_images, grid)
        improved = False
        if accelerator.is_main_process:
            for n, r in results.items():
                accelerator.log({f"eval_{n}step/{k}": v for k, v in r.items() if isinstance(v, (int, float))}, step=step)
            tqdm.write(f"step {step}: " + " | ".join(
                f"{n}-step PSNR {r['psnr']:.2f} SSIM {r['ssim']:.4f}" for n, r in results.items()))
            main = results[main_steps]
            key = t.save_on_best if main.get(t.save_on_best) is not None else "psnr"
            score = main[key] if key in HIGHER_IS_BETTER else -main[key]
            improved = best is None or score > best
            best = score if improved else best
        checkpoint("last", "best") if improved else checkpoint("last")

    def sample_grid():
        def seeded():
            return torch.Generator(device).manual_seed(0)

        with torch.no_grad():
            z = ema.model.encode(fixed_x).mode()
            decoded = [ema.model.decode(z, steps=n, generator=seeded()) for n in step_counts]
            if teacher is not None:  # distillation: input, teacher N-step, student 1-step (same noise)
                decoded.insert(0, teacher.decode(z, steps=cfg.ssdd.fm_sampler.steps, generator=seeded()))
        grid = save_grid(os.path.join(out_dir, "samples", f"step{step:07d}.png"), [fixed_x] + decoded)
        title = "input, teacher, 1-step student" if teacher is not None else "input, then 1-step, N-step"
        tb.add_image(f"reconstructions (top to bottom: {title})", grid, step)

    model.train()
    # Schedule-free optimisers keep two weight sequences; the model holds the training one throughout, since
    # evaluation and sample grids use the EMA copy (accelerate's wrapper forwards train() where it exists).
    optimizer.train()
    trainable_aux = list(aux.parameters())
    t_last = time.time()
    with tqdm(total=total_steps, initial=step, desc="train", disable=not accelerator.is_main_process,
              dynamic_ncols=True) as bar:
        for x in batches() if step < total_steps else ():  # a finished run, re-run, has nothing to do
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    gen = step_generator(cfg, step, rank, device)
                    if teacher is None:
                        out = model(x, generator=gen)
                    else:
                        z, noise, x_teacher = distillation_targets(teacher, x, cfg.ssdd.fm_sampler.steps, gen)
                        out = model(x, z=z, noise=noise, from_noise=True, target=x_teacher)
                    losses = dict(out.losses)
                    if "lpips" in aux:
                        losses["lpips"] = aux["lpips"](out.x0_pred.float(), out.x0_gt.float())
                    if "repa" in aux:
                        losses["repa"] = aux["repa"](out.features.float(), x, out.token_grid)
                    loss = sum(cfg.losses[name] * value for name, value in losses.items())
                    if disc is not None and step >= t.gan_start_step:
                        g_loss = generator_loss(disc(out.x0_pred))
                        scale = adaptive_gan_weight(loss, g_loss, raw_model.decoder.last_layer)
                        losses["gan"] = scale * g_loss
                        loss = loss + cfg.losses.gan * losses["gan"]
                total = accelerator.reduce(loss.detach(), "sum")
                if not torch.isfinite(total):  # stop before the bad step reaches the weights or a checkpoint
                    raise UserError(f"non-finite loss at step {step} ({ {k: float(v) for k, v in losses.items()} }); "
                                    f"lower training.lr or check the data; checkpoints/last holds the last good state")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if world > 1:  # the REPA projector sits outside DDP: average its gradients by hand
                        for p in trainable_aux:
                            torch.distributed.all_reduce(p.grad)
                            p.grad /= world
                    if t.grad_clip:
                        accelerator.clip_grad_norm_(raw_model.parameters(), t.grad_clip)
                        if trainable_aux:
                            accelerator.clip_grad_norm_(trainable_aux, t.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if disc is not None and step >= t.gan_start_step:  # then the discriminator, on detached outputs
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
                record = {"step": step, "loss": float(total) / world, **{k: float(v.detach()) for k, v in losses.items()}}
                loss_log.write(json.dumps(record) + "\n")
                loss_log.flush()
                if step % t.log_freq == 0 or step == total_steps:
                    now = time.time()
                    accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}
                                    | {"train/steps_per_s": t.log_freq / max(now - t_last, 1e-9)}, step=step)
                    t_last = now
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                if step % t.sample_every == 0:
                    sample_grid()
            end_of_epoch = step % steps_per_epoch == 0
            if (end_of_epoch and (step // steps_per_epoch) % t.eval_freq == 0) or step == total_steps:
                evaluate()  # also at the very end, so every run finishes with metrics and a best/ checkpoint
            elif step % t.ckpt_every == 0:
                checkpoint("last")
            if step >= total_steps:
                break
    accelerator.end_training()
    if loss_log:
        loss_log.close()
    return raw_model


def load_for_eval(cfg):
    """(accelerator, model, eval split, checkpoint file) for evaluating `ssdd.checkpoint`."""
    if not cfg.ssdd.checkpoint:
        raise UserError("evaluation needs ssdd.checkpoint=<file or run_name>")
    checkpoint = resolve_checkpoint(cfg, cfg.ssdd.checkpoint)
    accelerator = make_accelerator(cfg)
    model = build_model(cfg).to(accelerator.device).eval()
    return accelerator, model, build_dataset(cfg.dataset, cfg.eval.split, train=False), checkpoint


def read_loss_log(run_directory: str) -> dict:
    """{step: record} from a run's losses.jsonl, keeping a step's last record (a resumed run logs re-done steps again)."""
    path = os.path.join(run_directory, "losses.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"no losses.jsonl in {run_directory}")
    records = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            records[r["step"]] = r
    return dict(sorted(records.items()))


def task_eval(cfg):
    """Reconstruct the eval split with `ssdd.fm_sampler.steps` (or eval.steps) and write eval_<N>steps.json."""
    accelerator, model, dataset, checkpoint = load_for_eval(cfg)
    steps = cfg.eval.steps or cfg.ssdd.fm_sampler.steps
    out_dir = os.path.dirname(checkpoint)
    result = reconstruct_split(cfg, accelerator, model, dataset, steps, grid_path=os.path.join(out_dir, f"eval_{steps}steps.png"))
    if accelerator.is_main_process:
        result = {"checkpoint": checkpoint, "steps": steps, "split": cfg.eval.split,
                  "im_size": cfg.dataset.im_size, **result}
        with open(os.path.join(out_dir, f"eval_{steps}steps.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(json.dumps(result, indent=2))
    return result


@torch.no_grad()
def task_z_stats(cfg):
    """Scalar mean and (unbiased) std of `.mode()` latents over the eval split, in float64; saved beside the checkpoint."""
    spec = cfg.ssdd.checkpoint or cfg.ssdd.encoder_checkpoint
    if not spec:
        raise UserError("task=z_stats needs ssdd.checkpoint= or ssdd.encoder_checkpoint=")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(cfg).to(device).eval()
    dataset = build_dataset(cfg.dataset, cfg.eval.split, train=False)
    loader = DataLoader(dataset, batch_size=cfg.eval.batch_size, num_workers=cfg.dataset.num_workers)
    n, s, s2 = 0, torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for x, _ in tqdm(loader, desc="z_stats"):
        z = model.encode(x.to(device)).mode().double().cpu()
        n, s, s2 = n + z.numel(), s + z.sum(), s2 + z.pow(2).sum()
    mean = s / n
    std = torch.sqrt((s2 - n * mean**2) / (n - 1))
    stats = {"z_mean": float(mean), "z_std": float(std), "n_values": n, "n_images": len(dataset),
             "encoder": cfg.ssdd.encoder, "im_size": cfg.dataset.im_size, "split": cfg.eval.split,
             "checkpoint": resolve_checkpoint(cfg, spec)}
    path = os.path.join(os.path.dirname(stats["checkpoint"]), "z_stats.json")
    with open(path, "w") as f:
        json.dump(stats, f, indent=2)
    print(json.dumps(stats, indent=2))
    print(f"saved {path}")
    return stats


TASKS = {"train": train, "eval": task_eval, "z_stats": task_z_stats}


def run(argv: list[str]) -> None:
    cfg = load_config("ssdd.yaml", argv)
    if cfg.run_name is None:
        cfg.run_name = time.strftime("%Y-%m-%d/%H-%M-%S")
    if cfg.task not in TASKS:
        raise UserError(f"unknown task '{cfg.task}' (choose one of {', '.join(TASKS)})")
    TASKS[cfg.task](cfg)


def main(argv=None) -> int:
    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())

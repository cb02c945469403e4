"""An SSDD model from a tokenizer config, and the reconstruction of a split with the official protocol.

Used by the trainer's in-training evaluation, `task=eval`, and the evaluation scripts in eval/. The protocol
(docs/ARCHITECTURE.md §10): fixed noise (a generator seeded with the process index: seed 0 on one process),
originals and reconstructions quantised to 8 bits, PSNR over the whole set, SSIM per image, AlexNet LPIPS and rFID
when their weights exist.
"""

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from tokenizer.common.errors import UserError
from tokenizer.common.runs import resolve_checkpoint, save_grid
from tokenizer.common.training import make_accelerator
from tokenizer.data import build_dataset, take_subset
from tokenizer.ssdd import SSDD


def model_from_config(cfg) -> SSDD:
    """The SSDD of a tokenizer config's `ssdd:` section, with `ssdd.checkpoint` / `encoder_checkpoint` resolved."""
    s = cfg.ssdd
    enc_ckpt = resolve_checkpoint(cfg.ckpt_dir, s.encoder_checkpoint) if s.encoder_checkpoint else None
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
    )
    if not model.is_kl:
        model.decoder.repa_block = min(cfg.aux_losses.repa.i_extract, model.decoder.depth // 2)
    if s.checkpoint:
        model.load_checkpoint(resolve_checkpoint(cfg.ckpt_dir, s.checkpoint))
    return model


def load_for_eval(cfg):
    """(accelerator, eval-mode model, eval split, checkpoint file) for evaluating `ssdd.checkpoint`."""
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

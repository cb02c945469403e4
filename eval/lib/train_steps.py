"""One full training step of each trainer, on random inputs, for the throughput benchmarks.

    step = dit_train_step("DiT-XL/2", (4, 32, 32), 128, device, torch.bfloat16, compile_=True)
    step.run(0); step.run(1)                   # loss, backward, optimiser, EMA: what dit.train does per step
    flops = step.count_flops()                 # torch's counter over one eager forward + backward

The steps are the trainers' own pieces (losses, `build_optimizer`, `EMA`, `step_generator`), with inputs drawn on
the device once beforehand: data loading, logging and checkpoints are not part of them. `count_flops` runs the
loss and its backward eagerly (`torch.compiler.set_stance("force_eager")`: nothing is compiled for it and the
counter sees every operation) under the same autocast, and leaves no gradients behind.
"""

from dataclasses import dataclass, field
from typing import Callable

import torch

from dit.flow import training_loss
from dit.models import build_dit
from eval.lib.flops import count_flops
from tokenizer.common.devices import autocast
from tokenizer.common.ema import EMA
from tokenizer.common.training import build_optimizer, step_generator
from tokenizer.ssdd import SSDD

# the tokenizer trainer's loss weights (configs/ssdd.yaml) for the losses a step without pretrained networks has:
# LPIPS and REPA need VGG / DINOv2 weights, which a benchmark does not fetch
TOKENIZER_LOSS_WEIGHTS = {"diffusion": 1.0, "kl": 1e-6, "l1": 1.0}


@dataclass
class TrainStep:
    """A runnable training step: `run(i)` does step i, `count_flops()` counts one forward + backward."""

    model: torch.nn.Module
    run: Callable[[int], None]
    loss: Callable[..., torch.Tensor]  # loss(net=None): the step's loss through `net` (default: the trained one)
    batch: int
    info: dict = field(default_factory=dict)

    def count_flops(self) -> int:
        with torch.compiler.set_stance("force_eager"):  # in-place compiled modules run eagerly too
            flops = count_flops(lambda: self.loss(self.model).backward())
        self.model.zero_grad(set_to_none=True)
        return flops


def dit_train_step(name: str, latent, batch: int, device, amp_dtype, compile_: bool, *, num_classes: int = 1000,
                   learn_sigma: bool = True, ema: bool = True, grad_clip: float | None = None,
                   compile_options: dict | None = None, seed: int = 0) -> TrainStep:
    """dit.train's step for a DiT `name` on random latents (C, H, W): flow-matching loss (uniform t, label dropout
    0.1), backward, AdamW (fused on CUDA), the EMA update, a grad clip only if asked (DiT clips nothing)."""
    c, h, w = latent
    torch.manual_seed(seed)
    model = build_dit(name, input_size=(h, w), in_channels=c, num_classes=num_classes,
                      learn_sigma=learn_sigma).to(device)
    model.train()
    opt = build_optimizer(list(model.named_parameters()), "adamw", 1e-4, 0.0)
    ema_model = EMA(model, 0.9999, 0) if ema else None
    fn = torch.compile(model, **(compile_options or {})) if compile_ else model
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(batch, c, h, w, device=device, generator=g)
    y = torch.randint(0, num_classes, (batch,), device=device, generator=g)

    def loss(net=None):
        net = fn if net is None else net
        drop = (torch.rand(batch, device=device, generator=g) < 0.1).long()
        with autocast(device, amp_dtype):
            return training_loss(lambda a, t, b: net(a, t, b, force_drop_ids=drop), x, y, generator=g,
                                 t_kind="uniform")

    def run(i: int) -> None:
        loss().backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema_model is not None:
            ema_model.update(model, i + 1)

    info = {"model": name, "latent": list(latent), "batch_size": batch, "tokens": model.x_embedder.num_patches,
            "params": sum(p.numel() for p in model.parameters()), "compile": bool(compile_), "ema": bool(ema),
            "fused_adamw": bool(opt.defaults.get("fused")), "grad_clip": grad_clip}
    return TrainStep(model, run, loss, batch, info)


def tokenizer_train_step(decoder: str, encoder: str, px: int, batch: int, device, amp_dtype, compile_: bool, *,
                         encoder_base_channels: int = 128, optimizer: str = "radam_schedulefree", lr: float = 8e-4,
                         weight_decay: float = 1e-2, grad_clip: float | None = 0.1, ema_decay: float = 0.999,
                         compile_options: dict | None = None, seed: int = 0) -> TrainStep:
    """tokenizer.train's step (configs/ssdd.yaml defaults: frozen encoder, schedule-free RAdam, grad clip 0.1, EMA)
    for SSDD `decoder` on `encoder` latents of random images (batch, 3, px, px): encode, flow-matching loss on the
    decoder, backward, optimiser, EMA. The decoder is compiled in place as the trainer does (`training.compile`).
    Losses: TOKENIZER_LOSS_WEIGHTS (LPIPS and REPA are off: they need pretrained weights)."""
    torch.manual_seed(seed)
    model = SSDD(encoder=encoder, decoder=decoder, encoder_base_channels=encoder_base_channels).to(device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = build_optimizer(named, optimizer, lr, weight_decay)
    ema = EMA(model, ema_decay, 0)
    if compile_:
        model.decoder.compile(**(compile_options or {}))
    model.train()
    if hasattr(opt, "train"):  # schedule-free optimisers hold the training weights while training
        opt.train()
    x = torch.rand(batch, 3, px, px, device=device, generator=torch.Generator(device).manual_seed(seed)) * 2 - 1

    def loss(net=None, step: int = 0):  # the decoder is compiled in place: `net` is always `model`
        with autocast(device, amp_dtype):
            out = model(x, generator=step_generator(seed, step, 0, device))
            unknown = set(out.losses) - set(TOKENIZER_LOSS_WEIGHTS)
            if unknown:
                raise ValueError(f"no weight for the losses {sorted(unknown)}")
            return sum(TOKENIZER_LOSS_WEIGHTS[k] * v for k, v in out.losses.items())

    def run(i: int) -> None:
        loss(model, i).backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(named_params(model), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, i + 1)

    info = {"decoder": decoder, "encoder": encoder, "px": px, "batch_size": batch, "optimizer": optimizer,
            "decoder_params": sum(p.numel() for p in model.decoder.parameters()),
            "trained_params": sum(p.numel() for _, p in named), "compile": bool(compile_), "grad_clip": grad_clip,
            "losses": "diffusion (+ kl when the encoder trains); LPIPS and REPA off (pretrained weights)"}
    return TrainStep(model, run, loss, batch, info)


def dit_forward_flops(model, latent, batch: int) -> dict:
    """FLOPs of one forward pass of `model` (a DiT) on `batch` latents (C, H, W): 2 per multiply-add.

    Counts every Linear and the patch convolution (what torch's FLOP counter sees on a CPU) and, separately, the
    attention matrix products QK^T and AV (4 T^2 h per block and image). Returns {"dense", "attention", "total"}.
    """
    c, h_lat, w_lat = latent
    p = model.x_embedder.patch_size
    p = p[0] if isinstance(p, tuple) else p
    hidden = model.blocks[0].attn.qkv.in_features
    depth = len(model.blocks)
    tokens = (h_lat // p) * (w_lat // p)
    out_ch = model.final_layer.linear.out_features  # p * p * C_out
    freq = model.t_embedder.mlp[0].in_features
    per_image = (tokens * c * p * p * hidden  # patch embedding
                 + freq * hidden + hidden * hidden  # timestep MLP
                 + depth * (6 * hidden * hidden  # adaLN modulation (once per image)
                            + tokens * 3 * hidden * hidden + tokens * hidden * hidden  # qkv, output projection
                            + tokens * 2 * 4 * hidden * hidden)  # MLP, ratio 4
                 + 2 * hidden * hidden + tokens * hidden * out_ch)  # final adaLN and projection
    attention = depth * 2 * tokens * tokens * hidden  # QK^T and AV, multiply-adds
    dense, attention = 2 * batch * per_image, 2 * batch * attention
    return {"dense": dense, "attention": attention, "total": dense + attention}


def named_params(model: torch.nn.Module) -> list:
    return [p for p in model.parameters() if p.requires_grad]

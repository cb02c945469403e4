"""The GPU defaults, as far as a CPU can check them: the DiT's attention is a FlashAttention-eligible SDPA call,
AdamW is fused only for CUDA parameters, TF32 is switched on only with CUDA, and the configs carry the switches."""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dit.models import build_dit
from tokenizer.common.config import load_config
from tokenizer.common.training import build_optimizer, enable_tf32


def test_dit_attention_is_a_flash_eligible_sdpa_call(monkeypatch):
    """FlashAttention on a GPU needs an SDPA call without a mask or dropout and a head size that is a multiple of
    8 up to 256 (bf16 comes from autocast): what every DiT block calls, for every paper size."""
    import torch.nn.functional as F

    from dit.models import DiT_models

    calls, real = [], F.scaled_dot_product_attention

    def record(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append((q.shape[-1], attn_mask, dropout_p))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    model = build_dit("DiT-Ti/2", input_size=8, in_channels=4, num_classes=10).train()
    model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    assert len(calls) == len(model.blocks) and all(m is None and p == 0.0 for _, m, p in calls)
    for name in ("DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2"):
        factory = DiT_models[name].keywords
        head = factory["hidden_size"] // factory["num_heads"]
        assert head % 8 == 0 and head <= 256, name
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # PyTorch's CPU build has a flash kernel too: it runs there
        model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])).sum().backward()


def test_fused_adamw_only_for_cuda_parameters():
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(list(model.named_parameters()), "adamw", 1e-3, 0.0)
    assert not opt.defaults.get("fused")  # CPU keeps PyTorch's default implementation
    assert build_optimizer(list(model.named_parameters()), "radam_schedulefree", 1e-3, 0.0) is not None


def test_tf32_left_alone_without_cuda():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    enable_tf32()
    if not torch.cuda.is_available():
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    else:
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_config_switches():
    dit = load_config("dit.yaml", [])
    assert dit.training.compile is True and dit.training.mixed_precision == "bf16"
    ssdd = load_config("ssdd.yaml", [])
    assert ssdd.ssdd.compile is True and ssdd.ssdd.channels_last is False and ssdd.ssdd.attention == "auto"

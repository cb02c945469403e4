"""The GPU defaults, as far as a CPU can check them: the DiT's attention is a FlashAttention-eligible SDPA call,
AdamW is fused only for CUDA parameters, TF32 is switched on only with CUDA, and the configs carry the switches."""

import math
import warnings

import pytest
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


# ----------------------------------------------------------------------------------------------------------
# The traps a first GPU run would meet, closed and checked on the CPU
# ----------------------------------------------------------------------------------------------------------


def compile_counter():
    """(backend, count): a torch.compile backend that counts compilations and runs each graph on fake tensors (the
    shapes are what matters here; the eager FlexAttention would materialise every N x N score)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_map

    count = [0]

    def backend(gm, example_inputs):
        count[0] += 1

        def run(*args):
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                outs = gm(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
            return tree_map(lambda o: torch.zeros(o.shape, dtype=o.dtype) if isinstance(o, torch.Tensor) else o, outs)

        return run

    return backend, count


@pytest.mark.slow
def test_flex_attention_compiles_once_per_head_size_over_the_benchmark_grid(monkeypatch):
    """The default decoder benchmark grid (SSDD-S ... H, 128-512 px, batches 1, 4, 16: 54 shapes) through the
    project's flex_window_attention, compiled as on a GPU (dynamic shapes): one compilation per head size, plus one
    for batch 1, far below PyTorch's recompile limit, past which FlexAttention would run unfused (N x N scores)."""
    import torch._dynamo

    import tokenizer.decoder as decoder
    from tokenizer.decoder import DECODER_SIZES, TOKEN_STRIDE, attention_plan, compile_flex, level_widths

    backend, count = compile_counter()
    compiled = compile_flex(backend)
    monkeypatch.setattr(decoder, "flex_attention_fn", lambda device: compiled)
    torch._dynamo.reset()
    head_sizes, shapes = set(), 0
    try:
        with torch.no_grad():
            for px in (128, 256, 512):
                side = px // TOKEN_STRIDE
                plan = attention_plan("flex", 8, (side, side), "cpu")
                for size in ("S", "B", "M", "L", "XL", "H"):
                    cfg = DECODER_SIZES[size]
                    width, heads = level_widths(cfg["channels"], cfg["ch_mult"])[-1], cfg["heads"]
                    head_sizes.add(width // heads)
                    tables = [torch.randn(15, 15, heads) for _ in range(2)]  # two blocks of one decoder
                    for batch in (1, 4, 16):
                        q = torch.empty(batch, side * side, heads, width // heads).transpose(1, 2)  # as Attention
                        for table in tables:
                            assert decoder.flex_window_attention(q, q, q, table, plan, 8).shape == q.shape
                        shapes += 1
    finally:
        torch._dynamo.reset()
    assert shapes == 54 and len(head_sizes) == 4
    assert count[0] <= len(head_sizes) + 1 < torch._dynamo.config.recompile_limit, count[0]


def test_flex_past_the_recompile_limit_falls_back_to_local_with_one_warning(monkeypatch):
    """Past the limit PyTorch would run FlexAttention unfused with only a log line; here it raises and the decoder
    goes on with the windowed path (same result), saying so once."""
    import torch._dynamo.exc

    import tokenizer.decoder as decoder

    def out_of_recompilations(*args, **kwargs):
        raise torch._dynamo.exc.FailOnRecompileLimitHit("recompile limit hit")

    monkeypatch.setattr(decoder, "flex_attention_fn", lambda device: out_of_recompilations)
    monkeypatch.setattr(decoder, "_WARNED", set())
    torch.manual_seed(0)
    model = decoder.SSDDDecoder("XS", attention="flex").eval()
    x, z, t = torch.randn(1, 3, 128, 128), torch.randn(1, 4, 16, 16), torch.rand(1)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = model(x, t, z)
        again = model(x, t, z)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "attention=local" in messages[0], messages
    assert model.mid_block.attention == "local" and torch.equal(out, again)
    model.mid_block.attention = "dense"
    with torch.no_grad():
        assert float((out - model(x, t, z)).norm() / out.norm()) <= 1e-5


@pytest.mark.slow
def test_decoder_compile_failure_falls_back_to_the_local_path(monkeypatch):
    """A compiler that cannot lower FlexAttention (as PyTorch's CPU inductor: LoweringException) does not end the
    run: one warning line, the decoder compiled again with attention=local, the same output as eager."""
    import tokenizer.decoder as decoder

    graphs = []

    def no_flex_backend(gm, example_inputs):  # stands in for the failing lowering
        if any("flex_attention" in str(node.target) for node in gm.graph.nodes):
            raise RuntimeError("LoweringException: not enough values to unpack (expected 4, got 2)")
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(decoder, "_WARNED", set())
    torch.manual_seed(0)
    model = decoder.SSDDDecoder("XS", attention="flex").eval()
    x, z, t = torch.randn(1, 3, 64, 64), torch.randn(1, 4, 8, 8), torch.rand(1)
    with torch.no_grad():
        model.mid_block.attention = "local"
        eager = model(x, t, z)
        model.mid_block.attention = "flex"
        model.compile(backend=no_flex_backend)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            out = model(x, t, z)
            model(x, t, z)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "attention=local" in messages[0], messages
    assert len(messages[0].splitlines()) == 1
    assert model.mid_block.attention == "local" and graphs  # compiled, without FlexAttention
    assert float((out - eager).norm() / eager.norm()) <= 1e-5
    assert {k for k in model.state_dict()} == {k for k in decoder.SSDDDecoder("XS").state_dict()}


@pytest.mark.slow
def test_compiled_decoder_matches_eager():
    """torch.compile (inductor, as on a GPU; here its CPU code) of the decoder: the same velocity as eager."""
    from tokenizer.decoder import SSDDDecoder

    torch.manual_seed(0)
    model = SSDDDecoder("XS", attention="local").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x, z, t = torch.randn(2, 3, 64, 64), torch.randn(2, 4, 8, 8), torch.rand(2)
    with torch.no_grad():
        eager = model(x, t, z)
        model.compile()
        compiled = model(x, t, z)
    assert float((compiled - eager).norm() / eager.norm()) <= 1e-4


def test_rng_state_touches_only_the_current_cuda_device(monkeypatch, tmp_path):
    """Saving reads, and resuming writes, this process's CUDA generator only (get/set_rng_state_all would create
    a context on every GPU and fail with fewer GPUs than saved); older states with one entry per GPU still load."""
    from tokenizer.common.checkpoint import load_training_state, rng_state, save_training_state, set_rng_state

    written, device = [], [0]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: device[0])
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.arange(16, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": written.append(state.tolist()))
    for name in ("get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: pytest.fail("an RNG call on every GPU"))

    state = rng_state()
    assert state["cuda"] == list(range(16))
    module = torch.nn.Linear(2, 2)
    save_training_state(str(tmp_path / "last"), {"m": module}, None, {"step": 3})
    assert load_training_state(str(tmp_path / "last"), {"m": module})["step"] == 3
    assert written == [list(range(16))]

    saved_on_four = dict(state, cuda=[[gpu] * 16 for gpu in range(4)])  # the older layout, written on 4 GPUs
    set_rng_state(saved_on_four)  # resumed on one GPU
    assert written[-1] == [0] * 16
    device[0] = 2
    set_rng_state(saved_on_four)
    assert written[-1] == [2] * 16
    device[0] = 5  # more GPUs now than then: nothing to restore for this one
    set_rng_state(saved_on_four)
    assert len(written) == 3


def test_compiled_models_keep_plain_checkpoint_keys(tmp_path):
    """Both trainers compile in place (`module.compile()`): checkpoints carry no `_orig_mod.` prefix and load
    strictly into an uncompiled model."""
    from safetensors.torch import load_file

    from tokenizer import SSDD
    from tokenizer.common.checkpoint import load_weights, save_training_state

    torch.manual_seed(0)
    ssdd = SSDD(encoder="f8c4", decoder="XS", encoder_base_channels=32)
    dit = build_dit("DiT-Ti/2", input_size=8, in_channels=4, num_classes=10)
    plain = {"ae": set(ssdd.state_dict()), "dit": set(dit.state_dict())}
    ssdd.decoder.compile()  # what tokenizer.train does with ssdd.compile on a GPU
    dit.compile()  # what dit.train does with training.compile on a GPU
    save_training_state(str(tmp_path / "last"), {"ae": ssdd, "dit": dit}, None, {"step": 1})
    for name, fresh in (("ae", SSDD(encoder="f8c4", decoder="XS", encoder_base_channels=32)),
                        ("dit", build_dit("DiT-Ti/2", input_size=8, in_channels=4, num_classes=10))):
        path = str(tmp_path / "last" / f"model_{name}.safetensors")
        assert set(load_file(path)) == plain[name]
        load_weights(fresh, path)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state, fixed by the first Accelerator: forget it around a bf16 run."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        PartialState._reset_state()

    reset()
    yield reset
    reset()


def autocast_dtypes(monkeypatch, module_class):
    """bf16 autocast also on the CPU (tokenizer.common.training.make_accelerator asks accelerate for it only where
    CUDA is): the trainers' mixed-precision path, at tiny sizes. Returns the set of output dtypes that every
    `module_class` forward produces."""
    import accelerate

    real, seen = accelerate.Accelerator, set()
    monkeypatch.setattr(accelerate, "Accelerator", lambda *a, mixed_precision=None, **kw: real(
        *a, mixed_precision="bf16", **kw))
    real_forward = module_class.forward

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        seen.add(out.dtype)
        return out

    monkeypatch.setattr(module_class, "forward", forward)
    return seen


@pytest.mark.slow
def test_tokenizer_trainer_bf16_autocast_steps(tmp_path, monkeypatch, fresh_accelerate_state):
    from tokenizer.common.runs import read_loss_log
    from tokenizer.train import main

    seen = autocast_dtypes(monkeypatch, torch.nn.Conv2d)
    args = ["config=configs/fmnist.yaml", "ssdd.encoder_base_channels=32", "dataset.batch_size=8",
            "training.eval_images=8", "training.sample_every=1000", "training.log_freq=1", "eval.batch_size=8",
            "training.mixed_precision=bf16", "training.max_steps=3", f"ckpt_dir={tmp_path}", "run_name=bf16"]
    assert main(args) == 0
    assert torch.bfloat16 in seen  # the convolutions did run under bf16 autocast
    losses = [r["loss"] for r in read_loss_log(str(tmp_path / "jobs" / "bf16")).values()]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert (tmp_path / "jobs" / "bf16" / "checkpoints" / "last" / "model_ae.safetensors").exists()


@pytest.mark.slow
def test_dit_trainer_bf16_autocast_steps(tmp_path, monkeypatch, fresh_accelerate_state):
    from helpers import make_tokenizer, tiny_args

    from dit.cache import main as cache_main
    from dit.train import main as train_main
    from tokenizer.common.runs import read_loss_log

    args = tiny_args(make_tokenizer(tmp_path / "tok"), tmp_path, images=16)
    assert cache_main(args) == 0
    fresh_accelerate_state()  # the cache's Accelerator fixed fp32
    seen = autocast_dtypes(monkeypatch, torch.nn.Linear)
    assert train_main([*args, "run_name=bf16", "training.max_steps=3", "training.mixed_precision=bf16"]) == 0
    assert torch.bfloat16 in seen
    losses = [r["loss"] for r in read_loss_log(str(tmp_path / "jobs" / "bf16")).values()]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)

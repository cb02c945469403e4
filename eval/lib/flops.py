"""FLOPs of a call (torch's counter), the machine's measured matmul peak, and GPUs' data-sheet peaks.

    flops = count_flops(lambda: decoder(z))             # matmuls, convolutions, attention: 2 per multiply-add
    peak = matmul_peak(device, torch.float32)           # {"tflops", "n", "dtype", "threads", ...}, measured now
    call, flop = matmul_call(device, torch.float32)     # the same product, to time in turns with other calls
    tflops, source = datasheet_peak_tflops(device)      # dense bf16 tensor-core peak from NVIDIA's data sheets

torch's counter (`torch.utils.flop_counter.FlopCounterMode`) counts matrix products, convolutions and the fused
attention kernels of CUDA; element-wise work (norms, activations, additions, resampling) is not counted, so
achieved FLOP/s against the matmul peak says how much of a model's time goes to its counted arithmetic. PyTorch's
CPU attention kernel has no formula in torch's table: `count_flops` gives it the CUDA kernels' formula, so a model
counts the same on either device.
"""

import statistics
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from tokenizer.common.devices import synchronize

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets; the first name found in
# torch.cuda.get_device_name() wins, so the specific variants come first.
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
               ("A100", 312.0), ("L40S", 362.05), ("A10G", 70.0), ("L4", 121.0)]



def _cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# PyTorch's CPU attention kernel, counted with the formulas torch uses for its CUDA attention kernels (the counter
# hands these functions the argument shapes).
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
                       torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward}


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, silent, with the CPU attention kernel counted (see the module docstring)."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)


def count_flops(fn: Callable) -> int:
    """FLOPs (2 per multiply-add) of the counted operations that `fn()` runs, backward passes included."""
    with flop_counter() as counter:
        fn()
    return int(counter.get_total_flops())


def count_flops_by_op(fn: Callable) -> tuple[int, dict]:
    """(total FLOPs, {operator name: FLOPs}) of `fn()`: which operations the count comes from."""
    with flop_counter() as counter:
        fn()
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def matmul_call(device, dtype=torch.float32, n: int | None = None) -> tuple:
    """(call, FLOPs of one call): (n x n) @ (n x n) products on `device` in `dtype`, for timing.

    n defaults to 2048 on a CPU (17 GFLOP a product: large enough for the BLAS kernel to reach its rate, short on
    one thread) and 8192 on a GPU, where a call runs 10 products back to back (launch latency amortised). The CPU
    uses torch's current thread count; on CUDA fp32 products use TF32 where it is enabled.
    """
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    per_call = 10 if device.type == "cuda" else 1
    g = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def call():
        for _ in range(per_call):
            torch.mm(a, b, out=out)

    return call, 2 * n**3 * per_call


def matmul_peak(device, dtype=torch.float32, n: int | None = None, repeats: int = 5) -> dict:
    """The machine's matrix-multiply throughput now: the best of `repeats` timed `matmul_call`s after one untimed
    (the median is recorded beside it: a shared machine lowers both), with the threads and TF32 setting used."""
    device = torch.device(device)
    call, flop = matmul_call(device, dtype, n)
    call()  # warm-up: kernel selection, page faults
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"tflops": flop / min(times) / 1e12, "tflops_median": flop / statistics.median(times) / 1e12,
            "n": n or (8192 if device.type == "cuda" else 2048), "dtype": str(dtype).removeprefix("torch."),
            "device": str(device), "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "tf32": bool(torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" and dtype == torch.float32
            else None, "seconds": [round(t, 5) for t in times]}


def datasheet_peak_tflops(device) -> tuple[float | None, str | None]:
    """(dense bf16 TFLOP/s, where it comes from) of a known GPU by name; (None, None) for a CPU or an unknown GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS:
        if key in name:
            return value, f"dense bf16 peak of the {key} (data sheet)"
    return None, None

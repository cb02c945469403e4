"""Devices, dtypes, memory and timing: the one helper every script and benchmark uses.

    device = pick_device(args.device)            # None/"auto" -> cuda if available else cpu; a bad name: UserError
    amp, name = autocast_dtype(args.dtype, device)   # "auto" -> bf16 autocast on CUDA, plain fp32 on CPU
    seconds = timed(lambda: model(x), device)    # wall time with CUDA synchronised on both sides
    check_memory(need_bytes, "a 1024-px decode", device)   # refused up front with both numbers

The CPU's available memory is Linux's MemAvailable (what can be allocated without swapping), read in one place.
"""

import math
import os
import time
from typing import Callable

import torch

from tokenizer.common.errors import UserError, one_line

MEMORY_SHARE = 0.8  # of the memory available now that one request may plan to use
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_device(spec: str | None) -> str:
    """A device that exists on this machine (None or "auto": cuda if available, else cpu); else a UserError listing
    what does."""
    if spec is None or spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--device {spec!r} is not a device name (cpu, cuda, cuda:1, mps): {one_line(e)}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {spec}: this machine has no CUDA device; use --device cpu")
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {spec}: this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {spec}: MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise UserError(f"--device {spec}: choose cpu, cuda[:N] or mps")
    return str(device)


def pick_device(spec: str | None) -> torch.device:
    """`check_device` as a torch.device."""
    return torch.device(check_device(spec))


def autocast_dtype(name: str, device) -> tuple:
    """-> (autocast dtype or None for plain fp32, its name). "auto": bf16 on CUDA, fp32 elsewhere (bf16 autocast
    on a CPU without bf16 units is many times slower)."""
    if name == "auto":
        name = "bf16" if torch.device(device).type == "cuda" else "fp32"
    if name not in AUTOCAST_DTYPES:
        raise UserError(f"--dtype {name}: choose auto, {', '.join(AUTOCAST_DTYPES)}")
    return AUTOCAST_DTYPES[name], name


def autocast(device, dtype):
    """torch.autocast for `dtype` (None: off), usable on every device type."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device) -> float:
    """Seconds `fn()` takes on `device`, with pending GPU work finished before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def available_memory(device="cpu") -> int | None:
    """Bytes that can be allocated now on `device` (CUDA: free device memory; CPU: MemAvailable); None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.0f} MiB"


def check_memory(need: float, what: str, device="cpu", advice: str = "") -> None:
    """Refuse up front a request whose estimated peak memory `need` (bytes) exceeds MEMORY_SHARE of what `device`
    has available now, with both numbers in the message."""
    have = available_memory(device)
    if have is not None and math.isfinite(need) and need > MEMORY_SHARE * have:
        raise UserError(f"{what} would need about {gib(need)} of memory, but {torch.device(device).type} memory "
                        f"available now is {gib(have)}" + (f"; {advice}" if advice else ""))

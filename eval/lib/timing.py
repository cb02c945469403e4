"""Timing several configurations in turns, so that the load of a shared machine falls on all of them alike.

    calls = {"dense": lambda: layer(x, dense), "local": lambda: layer(x, local)}
    times = take_turns(calls, rounds=5, device=device, warmup=1)   # {"dense": [s, s, ...], "local": [...]}

One call of each, then again, and so on: the load of a shared machine drifts over minutes, so timing one
configuration after the other would charge the drift to whichever ran last, while in turns it weighs on every
configuration alike and their ratios hold even when the absolute times do not. Each call is timed by
`tokenizer.common.devices.timed` (CUDA synchronised on both sides).
"""

from typing import Callable

import torch
from tqdm import tqdm

from tokenizer.common.devices import autocast, timed


def inference(fn: Callable, device, amp_dtype=None) -> Callable:
    """`fn` as a call that runs in inference mode under autocast to `amp_dtype` (None: plain fp32)."""

    def call():
        with torch.inference_mode(), autocast(device, amp_dtype):
            return fn()

    return call


def take_turns(calls: dict, rounds: int, device, warmup: int = 0, skip: Callable | None = None,
               progress: str | None = None) -> dict:
    """{key: [seconds of each timed call]}: `warmup` untimed rounds, then `rounds` timed ones, each round one call
    of every configuration in order (a progress bar named `progress` if given).

    `skip(key, error)` decides what a call that raises does: True drops that configuration from the later rounds
    (its times so far are kept), False (or no `skip`) lets the error through.
    """
    live, times = dict(calls), {key: [] for key in calls}
    for r in tqdm(range(warmup + rounds), desc=progress, disable=progress is None):
        for key, call in list(live.items()):
            try:
                seconds = timed(call, device)
            except Exception as e:  # noqa: BLE001 - `skip` says which errors end a configuration only
                if skip is None or not skip(key, e):
                    raise
                del live[key]
                continue
            if r >= warmup:
                times[key].append(seconds)
    return times

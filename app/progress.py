"""Honest progress for the app: a bar that moves per DiT step and per decoder, an ETA from time measured on this
machine, and the stop checks (time limit, client gone) that end a job between two layers of a network.

The app also watches the networks themselves: forward hooks, installed once per generator, count the DiT's
evaluations (one or two per sampler step: `dit.progress.dit_evaluations`, the table the CLIs' bars use too) and let
a job stop between two layers; the generator's progress callback (`Job.stage_done`, the `dit.progress` protocol)
says when the DiT and each decoder are done. The hooks act only for the thread running a `Job` (`with job:`), so
concurrent requests on one shared model each see their own.

The ETA: during the DiT, the remaining evaluations at this run's own pace so far; for the decoders, their measured
seconds per image-step (`Rates`, from the warm-up and every finished request) times this request's images and steps.
"""

import threading
import time
import weakref

from torch import nn

from dit.progress import EVALUATIONS as EVALS_PER_RUN  # noqa: F401  (the one table, shared with the CLIs)
from dit.progress import dit_evaluations  # noqa: F401

REPORT_EVERY = 0.1  # seconds between two progress messages (Gradio sends the latest one on its own clock anyway)
POLL_EVERY = 0.25  # seconds between two calls of a job's `gone` check (it takes a lock)


class Stopped(Exception):
    """A job ended early: past its time limit, or its client went away. The message is one line."""


class Rates:
    """Seconds per unit of work measured on this machine: the DiT per image-evaluation and each decoder per
    image-step (the KL decoders take one step). Starts from the warm-up; each finished request updates it (a
    running mean that favours the latest runs, which reflect the batch sizes users ask for)."""

    def __init__(self):
        self.dit = None
        self.decoders = {}
        self.lock = threading.Lock()

    @staticmethod
    def _mix(old, new):
        return new if old is None else 0.5 * old + 0.5 * new

    def record(self, timings: dict, evals: int | None) -> None:
        """Learn from the timings of a finished generate (one decoder) or compare (several) call."""
        images = timings["images"]
        with self.lock:
            if evals:
                self.dit = self._mix(self.dit, timings["dit_s"] / (images * evals))
            per = timings.get("decoders") or {timings["decoder"]: timings}
            for name, d in per.items():
                self.decoders[name] = self._mix(self.decoders.get(name),
                                                d["decoder_s"] / (images * max(1, d["decoder_steps"])))

    def decoder_seconds(self, name: str, images: int, steps: int) -> float | None:
        rate = self.decoders.get(name)
        return None if rate is None else rate * images * steps

    def estimate(self, images: int, evals: int | None, decoders: list) -> float | None:
        """Seconds a request should take: DiT evaluations and [(decoder name, steps)]; None if not yet measured."""
        parts = [None if self.dit is None or evals is None else self.dit * images * evals]
        parts += [self.decoder_seconds(name, images, steps) for name, steps in decoders]
        return None if None in parts else sum(parts)


class Job:
    """One request's progress and stop checks. `with job:` makes it the current job of this thread.

    images: how many images; evals: DiT evaluations (None: adaptive); decoders: [(name, steps)] in run order;
    report(fraction, text): the page's progress bar; gone(): True once the client has left;
    time_limit: seconds after which the job stops."""

    def __init__(self, rates: Rates, images: int, steps: int, evals: int | None, decoders: list, report=None,
                 gone=None, time_limit: float | None = None):
        self.rates, self.images, self.steps, self.evals, self.decoders = rates, images, steps, evals, decoders
        self.report, self.gone, self.time_limit = report, gone, time_limit
        self.start = time.perf_counter()
        self.evals_done, self.dit_start, self.dit_last = 0, None, None
        self.decoder_index, self.decoder_start = -1, None
        self.last_report, self.last_poll = 0.0, 0.0

    # ------------------------------------------------------------------ the hooks' side

    def check(self) -> None:
        """Raise Stopped if the job is past its time limit or its client has gone (polled every POLL_EVERY s)."""
        now = time.perf_counter()
        if self.time_limit is not None and now - self.start > self.time_limit:
            raise Stopped(f"stopped after {self.time_limit:g} s: the time limit of one request on this server")
        if self.gone is not None and now - self.last_poll > POLL_EVERY:
            self.last_poll = now
            if self.gone():
                raise Stopped("stopped: the client went away")

    def dit_evaluation(self) -> None:
        now = time.perf_counter()
        if self.dit_start is None:
            self.dit_start = now  # measured from the end of the first evaluation, so warm caches do not skew it
        else:
            self.evals_done += 1
            self.dit_last = now
        self.show(now)

    def stage_done(self, stage: str, done: int, total: int) -> None:
        """Generator.generate/compare's `progress` callback: a batch of the DiT ("dit") or of a decoder is done.
        When a stage's last batch is, the next decoder starts."""
        if done < total:
            return
        names = [n for n, _ in self.decoders]
        following = 0 if stage == "dit" else names.index(stage) + 1 if stage in names else None
        if following is not None and following > self.decoder_index:
            self.decoder_index, self.decoder_start = following, time.perf_counter()
            if following < len(self.decoders):
                self.show(force=True)

    # ------------------------------------------------------------------ what the page shows

    def eta(self, now: float) -> float | None:
        """Seconds left, or None while there is nothing to estimate from."""
        dit, decoders = self._left(now)
        return None if dit is None or decoders is None else dit + decoders

    def _left(self, now: float) -> tuple:
        """(seconds left in the DiT, seconds left in the decoders); None where not known yet."""
        dit = 0.0
        if self.decoder_index < 0:  # still in the DiT
            done = self.evals_done + (self.dit_start is not None)
            if self.evals is None:
                dit = None
            elif self.evals_done > 0:
                dit = max(0, self.evals - done) * (self.dit_last - self.dit_start) / self.evals_done
            elif self.rates.dit is not None:
                dit = max(0, self.evals - done) * self.rates.dit * self.images
            else:
                dit = None
        decoders = 0.0
        for i, (name, steps) in enumerate(self.decoders):
            if i < self.decoder_index:
                continue
            seconds = self.rates.decoder_seconds(name, self.images, steps)
            if seconds is None:
                return dit, None
            if i == self.decoder_index:
                seconds = max(0.0, seconds - (now - self.decoder_start))
            decoders += seconds
        return dit, decoders

    def stage(self) -> str:
        if self.decoder_index < 0:
            if self.evals is None:
                return f"DiT evaluation {self.evals_done + (self.dit_start is not None)} (adaptive steps)"
            per_step = self.evals / self.steps
            step = min(self.steps, int((self.evals_done + (self.dit_start is not None)) / per_step))
            return f"DiT step {step}/{self.steps}"
        if self.decoder_index >= len(self.decoders):
            return "done"
        name = self.decoders[self.decoder_index][0]
        if len(self.decoders) == 1:
            return f"decoding with {name}"
        return f"decoder {self.decoder_index + 1}/{len(self.decoders)}: {name}"

    def show(self, now: float | None = None, force: bool = False) -> None:
        now = time.perf_counter() if now is None else now
        if self.report is None or (not force and now - self.last_report < REPORT_EVERY):
            return
        self.last_report = now
        elapsed = now - self.start
        dit, decoders = self._left(now)
        if dit is not None and decoders is not None:
            left = dit + decoders
            fraction = elapsed / max(elapsed + left, 1e-9)
            text = f"{self.stage()} · about {left:.0f} s left" if left >= 1 else f"{self.stage()} · under 1 s left"
        elif dit is not None and self.decoder_index < 0:  # the decoders not timed yet on this machine
            fraction = self._unit_fraction()
            text = f"{self.stage()} · about {dit:.0f} s left in the DiT"
        else:
            fraction = self._unit_fraction()
            text = f"{self.stage()} · {elapsed:.0f} s so far"
        self.report(min(max(fraction, 0.0), 0.999), text)

    def _unit_fraction(self) -> float:
        parts = 1 + len(self.decoders)
        if self.decoder_index >= 0:
            return (1 + self.decoder_index) / parts
        return (self.evals_done / self.evals) / parts if self.evals else 0.0

    # ------------------------------------------------------------------ current job of this thread

    def __enter__(self):
        _current.job = self
        self.show(force=True)
        return self

    def __exit__(self, *exc):
        _current.job = None
        return False


_current = threading.local()
_installed = weakref.WeakSet()


def _job() -> Job | None:
    return getattr(_current, "job", None)


def _leaves(module: nn.Module):
    """The modules that hold weights themselves: between two of them a job can stop."""
    return [m for m in module.modules() if next(m.parameters(recurse=False), None) is not None]


def install_hooks(gen) -> None:
    """Hooks on the generator's networks (once per network): the DiT counts its evaluations, and every weighted
    layer of the DiT and the decoders lets the current job stop. Without a current job they do nothing."""
    def check(*_):
        job = _job()
        if job is not None:
            job.check()

    def evaluated(*_):
        job = _job()
        if job is not None:
            job.dit_evaluation()

    if gen.model not in _installed:
        _installed.add(gen.model)
        gen.model.register_forward_hook(evaluated)
        for layer in _leaves(gen.model):
            layer.register_forward_pre_hook(check)
    for decoder, _ in gen.decoders.values():
        if decoder not in _installed:
            _installed.add(decoder)
            for layer in _leaves(decoder):
                layer.register_forward_pre_hook(check)

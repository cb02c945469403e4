"""Progress of a generation, per DiT step and per decoder batch: one protocol for the command-line tools and the app.

`Generator.generate`, `compare`, `sample_latents` and `decode` (dit/pipeline.py) take `progress`, a callable

    progress(stage, done, total)

- stage: "dit" while the DiT samples, then the name of each decoder (a key of `Generator.decoders`) while it decodes;
- done, total: ints. For "dit" they count sampler steps over all batches (`steps` x batches); for the adaptive SiT
  ODE, whose step count is only known at the end, they count model evaluations and `total` is an estimate from how
  far along its path the solver is (it may change until the last report). For a decoder they count images.

Every stage is reported first as (stage, 0, total), before its work starts (so a bar's clock starts with the work and
its rate is the work's), then after each DiT step and each decoder batch; its last report has done == total.
Reports come from the thread that samples. On CUDA the device is synchronised before each report, so the times are
those of the work, not of the kernel launches (the cost: the host waits for each step, a few per cent on a GPU).

A callback may also have a method `start(stage, total, unit)`: it is called once before a stage's first report with
the unit of its counts ("step", "eval" or "img"). `TqdmProgress` is such a callback for command-line tools, one tqdm
bar per stage with its rate in step/s or img/s:

    from dit.progress import TqdmProgress
    images, timings = gen.generate([7], num=8, progress=TqdmProgress())

`dit_evaluations(family, sampler, steps)` says how many DiT evaluations one batch takes (a classifier-free-guided
evaluation runs the conditional and the unconditional pass as one batch); tests/test_progress.py checks the table
against the samplers themselves.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

__all__ = ["EVALUATIONS", "dit_evaluations", "DiTProgress", "report_decoder", "start_stage", "TqdmProgress"]

# DiT evaluations of one sampler run of `steps` steps, by model family and sampler (dit/flow.py, dit/diffusion.py,
# dit/sit.py); None: an adaptive solver whose count is only known at the end.
EVALUATIONS = {
    ("flow", "euler"): lambda s: s, ("flow", "heun"): lambda s: 2 * s, ("flow", "sde"): lambda s: s,
    ("dit", "ddpm"): lambda s: s, ("dit", "ddim"): lambda s: s,
    ("sit", "euler"): lambda s: s - 1, ("sit", "heun"): lambda s: 2 * (s - 1), ("sit", "sde"): lambda s: s,
    ("sit", "ode"): lambda s: None,
}


def dit_evaluations(family: str, sampler: str, steps: int) -> int | None:
    """DiT evaluations of one batch sampled with `sampler` in `steps` steps; None for the adaptive ODE."""
    count = EVALUATIONS.get((family, sampler))
    return count(int(steps)) if count else None


def start_stage(progress, stage: str, total: int, unit: str) -> None:
    """Announce a stage: `progress.start(stage, total, unit)` where the callback has it, then (stage, 0, total)."""
    if progress is None:
        return
    start = getattr(progress, "start", None)
    if callable(start):
        start(stage, total, unit)
    progress(stage, 0, total)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def report_decoder(progress, name: str, done: int, total: int, device: torch.device) -> None:
    """A decoder batch is done: report it once the device has finished it."""
    if progress is not None:
        _sync(device)
        progress(name, done, total)


class _CountedModel:
    """The DiT as the sampler sees it, calling `on_evaluation(t)` after each forward; any other attribute (the
    `null_class` the samplers read) is the model's."""

    def __init__(self, model, on_evaluation):
        self._model, self._on_evaluation = model, on_evaluation

    def __call__(self, x, t, y, *args, **kwargs):
        out = self._model(x, t, y, *args, **kwargs)
        self._on_evaluation(t)
        return out

    def __getattr__(self, name):
        return getattr(self._model, name)


class DiTProgress:
    """The "dit" stage of one `Generator.sample_latents` call: `wrap(model)` for each batch, `batch_done()` after it.

    Fixed-step samplers report sampler steps (the evaluations of a batch mapped onto its `steps`, so Heun's two
    evaluations make one step); the adaptive ODE reports evaluations, its total estimated from the largest model
    time seen so far (SiT's ODE runs its time s from 0 to 1)."""

    def __init__(self, progress, family: str, sampler: str, steps: int, batches: int, device: torch.device):
        self.progress, self.device, self.batches = progress, device, batches
        self.steps, self.per_batch = int(steps), dit_evaluations(family, sampler, steps)
        self.batch, self.evals = 0, 0  # batches finished; evaluations in this batch
        self.reported = (0, None)  # the last (done, total) reported
        self.evals_before = 0  # evaluations of the finished batches (the adaptive ODE)
        self.path = 0.0  # how far along its path the adaptive ODE is, in [0, 1]
        self.total = self.steps * batches if self.per_batch else None
        if self.total is None:  # a first guess, corrected as the solver goes: the adaptive ODE's usual count
            self.total = 100 * batches
        start_stage(progress, "dit", self.total, "step" if self.per_batch else "eval")
        self.reported = (0, self.total)

    def wrap(self, model):
        self.evals = 0
        return _CountedModel(model, self._evaluated)

    def _evaluated(self, t) -> None:
        self.evals += 1
        if self.per_batch:
            done = self.batch * self.steps + min(self.steps, self.evals * self.steps // self.per_batch)
            self._report(done)
            return
        # adaptive: the remaining evaluations at this batch's pace along its path so far
        self.path = max(self.path, min(1.0, float(torch.as_tensor(t).float().max())))
        done = self.evals_before + self.evals
        per_batch = max(self.evals + 1, math.ceil(self.evals / self.path)) if self.path > 0 else self.evals + 1
        self.total = max(done + 1, self.evals_before + per_batch * (self.batches - self.batch))
        self._report(done)

    def batch_done(self) -> None:
        self.batch += 1
        if self.per_batch:
            self._report(self.batch * self.steps)
        else:
            self.evals_before += self.evals
            self.path = 0.0
            if self.batch == self.batches:
                self.total = self.evals_before
            else:  # the rest at this batch's count
                self.total = self.evals_before + self.evals * (self.batches - self.batch)
            self._report(self.evals_before)

    def _report(self, done: int) -> None:
        """Report (done, total) unless it was the last report (Heun's second evaluation, the batch's end)."""
        if self.progress is None or (done, self.total) == self.reported:
            return
        _sync(self.device)
        self.reported = (done, self.total)
        self.progress("dit", done, self.total)


class TqdmProgress:
    """The `progress` callback for command-line tools: one tqdm bar per stage, created when the stage starts.

    leave: keep finished bars on screen (False: per-batch bars under a run's own bar, as sample/sample_ddp.py);
    position: the line of the bars (below an outer bar: 1); disable: no bars (e.g. on every process but the first);
    names: {stage: description} ("dit" is shown as "DiT"); file: where to draw (default stderr)."""

    def __init__(self, leave: bool = True, position: int | None = None, disable: bool = False,
                 names: dict | None = None, file=None):
        self.leave, self.position, self.disable, self.file = leave, position, disable, file
        self.names = {"dit": "DiT", **(names or {})}
        self.bars = {}

    def start(self, stage: str, total: int, unit: str) -> None:
        if stage in self.bars:
            self.bars.pop(stage).close()
        self.bars[stage] = tqdm(total=total, desc=self.names.get(stage, stage), unit=unit, leave=self.leave,
                                position=self.position, disable=self.disable, file=self.file, dynamic_ncols=True)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.bars:  # reported without start(): the unit is unknown
            self.start(stage, total, "it")
        bar = self.bars[stage]
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)
        if done >= total:
            self.bars.pop(stage).close()

    def close(self) -> None:
        """Close the bars of stages that did not finish (an error stopped them)."""
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()

"""Run directories: where a training run keeps its files, how a checkpoint name becomes a file, and its logs.

A run lives in `<ckpt_dir>/jobs/<run_name>/`:

    .lock                        held by the job writing the run (host, pid, job id): one writer at a time
    config.yaml                  the resolved config of the latest start (written once a resume is known to fit)
    checkpoints/{last,best}/     training states (tokenizer.common.checkpoint; written atomically)
    results/step<N>/             what was computed from the weights of step N (evaluations, z_stats.json): outside
                                 checkpoints/, so a later save, which replaces checkpoints/last, never deletes it
    losses.jsonl                 one JSON record per optimiser step (a resume cuts it back to its step, then appends)
    samples/*.png                sample or reconstruction grids
    events.out.tfevents.*        TensorBoard scalars and images

Both trainers (tokenizer.train, dit.train) and the evaluation scripts use these helpers; they take plain values,
not a whole config, so the DiT and the tokenizer configs need not share a schema.
"""

import atexit
import errno
import json
import os
import socket
import time

import torch
from omegaconf import OmegaConf
from torchvision.utils import make_grid, save_image

from tokenizer.common.atomic import atomic_file, process_exists, remove_stale_temporaries, settle
from tokenizer.common.checkpoint import STATE_FILE, read_state_json, resolve_state_dir
from tokenizer.common.downloads import fetch_released, released_name
from tokenizer.common.errors import UserError


def run_dir(ckpt_dir: str, run_name: str) -> str:
    return os.path.join(ckpt_dir, "jobs", run_name)


def default_run_name() -> str:
    return time.strftime("%Y-%m-%d/%H-%M-%S")


def resolve_checkpoint(ckpt_dir: str, spec: str, weights: str = "model_ae_ema.safetensors") -> str:
    """A file path, `<run_name>[@last|@best]` -> that run's `weights` file (by default the tokenizer's EMA), or the
    name of a released facebook/SSDD file ('F8C4_M_256', tokenizer.common.downloads.RELEASED_SSDD) -> that file,
    fetched through the Hugging Face cache. A run of the same name wins over a release name."""
    if os.path.isfile(spec):
        return spec
    run, _, which = spec.partition("@")
    path = os.path.join(ckpt_dir, "jobs", run, "checkpoints", which or "last")
    found = resolve_state_dir(path)
    if found is None and released_name(spec) is not None:
        return fetch_released(spec)
    if found is None:
        raise UserError(f"checkpoint '{spec}' is neither a file, a run with saved weights (looked in {path}) nor a "
                        f"released SSDD name such as F8C4_M_256")
    return os.path.join(found, weights)


def step_results_dir(out_dir: str, step: int) -> str:
    """`<run>/results/step<N>/`: what was computed from the weights of step N of the run in `out_dir`."""
    return os.path.join(out_dir, "results", f"step{int(step):07d}")


def results_dir(checkpoint: str) -> str:
    """Where results computed from a weights file are kept (z_stats.json, eval_<N>steps.json): for a file of a run's
    checkpoints/<last|best>/, `<run>/results/step<N>/` (N: that state's step), which no later save touches; for
    any other file, its own folder."""
    folder = os.path.dirname(checkpoint) or "."
    state = os.path.join(folder, STATE_FILE)
    if os.path.basename(os.path.dirname(os.path.abspath(folder))) == "checkpoints" and os.path.isfile(state):
        run = os.path.dirname(os.path.dirname(os.path.abspath(folder)))
        run = os.path.relpath(run) if not os.path.isabs(checkpoint) else run
        return step_results_dir(run, read_state_json(state)["step"])
    return folder


def find_result(checkpoint: str, name: str) -> str:
    """The file `name` computed from `checkpoint`: in `results_dir(checkpoint)`, else beside the checkpoint (where
    older versions wrote it); when neither exists, where it would be written."""
    for candidate in (os.path.join(results_dir(checkpoint), name), os.path.join(os.path.dirname(checkpoint), name)):
        if os.path.isfile(candidate):
            return candidate
    return os.path.join(results_dir(checkpoint), name)


def tidy_run(out_dir: str) -> list:
    """Clean up after killed processes: settle a half-done checkpoint swap and remove the temporary files and
    folders of writers that no longer run. Returns what was removed (main process, before anything is written)."""
    ckpt_root = os.path.join(out_dir, "checkpoints")
    if os.path.isdir(ckpt_root):
        for name in os.listdir(ckpt_root):
            if name.endswith(".old"):
                settle(os.path.join(ckpt_root, name[:-len(".old")]), STATE_FILE)
    results = os.path.join(out_dir, "results")
    folders = [out_dir, ckpt_root, results]
    folders += sorted(os.path.join(results, d) for d in os.listdir(results)) if os.path.isdir(results) else []
    return [os.path.join(folder, name) for folder in folders for name in remove_stale_temporaries(folder)]


def record_start(cfg, out_dir: str) -> None:
    """Tidy the run directory (`tidy_run`) and save the config of this start as config.yaml (main process)."""
    for path in tidy_run(out_dir):
        print(f"removed {path} (left by a process that no longer runs)")
    atomic_file(os.path.join(out_dir, "config.yaml"), lambda tmp: OmegaConf.save(cfg, tmp))


# ----------------------------------------------------------------------------- one writer per run

LOCK_FILE = ".lock"
_held: dict = {}  # real path of a run folder -> (fd, lock path): the locks this process holds


def job_id() -> str | None:
    """The scheduler's id of this job, where one says it (informative: the lock names its holder with it)."""
    for var in ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID"):
        if os.environ.get(var):
            return f"{var}={os.environ[var]}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return f"TORCHELASTIC_RUN_ID={run_id}" if run_id and run_id != "none" else None


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), telling a reused pid from the original."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
            "job": job_id(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read_holder(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "another process"
    job = f", job {holder['job']}" if holder.get("job") else ""
    return f"pid {holder['pid']} on {holder.get('host', '?')}{job}, since {holder.get('since', '?')}"


def _holder_gone(holder: dict) -> bool:
    """True when the recorded holder ran on this host and is no longer alive (its pid is gone or was reused)."""
    if not holder.get("pid") or holder.get("host") != socket.gethostname():
        return False
    pid = int(holder["pid"])
    if not process_exists(pid):
        return True
    return bool(holder.get("pid_start")) and _process_start(pid) != holder["pid_start"]


def lock_run(out_dir: str) -> None:
    """Make this process the one writer of the run in `out_dir` (its job's main process calls it; the other ranks
    of the job trust it), or raise a one-line UserError naming the job that writes it.

    `<run>/.lock` is held with flock(2) while the process lives, so the kernel frees it when the holder dies (a
    kill included) and the next start takes it over; where the filesystem has no flock, a lock whose holder ran
    on this host and is gone is taken over. Its content (host, pid, job id, start) names the holder.
    """
    key = os.path.realpath(out_dir)
    if key in _held:
        return
    path = os.path.join(out_dir, LOCK_FILE)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (ImportError, OSError) as e:
            os.close(fd)
            if isinstance(e, OSError) and e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _refusal(out_dir, _read_holder(path), path) from None
            _lock_without_flock(out_dir, path, key)
            return
        try:  # a holder that released meanwhile deleted the file we opened: lock the one at `path` instead
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_holder_record()).encode())
        _held[key] = (fd, path)
        return


def _lock_without_flock(out_dir: str, path: str, key: str) -> None:
    """`lock_run` on a filesystem without flock: an exclusively created file, taken over when its holder is gone."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            holder = _read_holder(path)
            if holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid():
                _held[key] = (None, path)  # this process's own, from an earlier start
                return
            if not _holder_gone(holder):
                raise _refusal(out_dir, holder, path, stale_hint=True) from None
            os.remove(path)  # its holder is gone
            continue
        os.write(fd, json.dumps(_holder_record()).encode())
        os.close(fd)
        _held[key] = (None, path)
        return
    raise _refusal(out_dir, _read_holder(path), path, stale_hint=True)


def _refusal(out_dir: str, holder: dict, path: str, stale_hint: bool = False) -> UserError:
    hint = f"; if that job is gone, delete {path}" if stale_hint else ""
    return UserError(f"run {out_dir} is being written by another job ({_describe(holder)}): wait for it to end or "
                     f"use another run_name (nothing was changed){hint}")


def unlock_run(out_dir: str) -> None:
    """Give up the lock `lock_run` took (the file goes, then the flock); nothing when this process holds none."""
    fd, path = _held.pop(os.path.realpath(out_dir), (None, None))
    if path is None:
        return
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    if fd is not None:
        os.close(fd)


def unlock_runs() -> None:
    """Give up every run lock this process holds (a trainer's entry point, when it returns or fails; and at exit)."""
    for key in list(_held):
        unlock_run(key)


atexit.register(unlock_runs)


# ----------------------------------------------------------------------------- logs


class LossLog:
    """The main process's training log: every step to losses.jsonl, every `every` steps to TensorBoard (+ steps/s).

    It starts at `start_step` (0, or the step a resume starts from): records of later steps, left by a run killed
    after its last checkpoint, are cut first, since the resumed run logs those steps again.
    """

    def __init__(self, out_dir: str, accelerator, every: int, start_step: int):
        path = os.path.join(out_dir, "losses.jsonl")
        cut_loss_log(path, start_step)
        self.file = open(path, "a")
        self.accelerator, self.every = accelerator, every
        self.t_last = time.time()

    def write(self, record: dict, force: bool = False) -> bool:
        """Append `record` ({"step": n, name: float, ...}); returns True when it also went to TensorBoard."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        if step % self.every and not force:
            return False
        now = time.time()
        scalars = {f"train/{k}": v for k, v in record.items() if k != "step"}
        self.accelerator.log(scalars | {"train/steps_per_s": self.every / max(now - self.t_last, 1e-9)}, step=step)
        self.t_last = now
        return True

    def close(self) -> None:
        self.file.close()


def _records(path: str):
    """(step or None, line) of each whole line of a JSON-lines log (None: not a record); a kill's cut line is left
    out."""
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                return
            try:
                yield int(json.loads(line)["step"]), line
            except (ValueError, KeyError, TypeError):
                yield None, line


def cut_loss_log(path: str, step: int) -> None:
    """Keep one record per step up to `step` in the log at `path` (the last of each, in step order), dropping later
    steps, repeats an older version wrote after a resume, a line a kill left half-written and lines that are no
    record. Rewritten atomically, and only when that changes it (the common start reads it once)."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    last, clean = 0, True
    for n, _ in _records(path):
        clean = clean and n is not None and last < n <= step
        last = n if n is not None else last
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        clean = clean and f.read(1) == b"\n"
    if clean:
        return
    kept = {n: line for n, line in _records(path) if n is not None and n <= step}

    def write(tmp):
        with open(tmp, "wb") as f:
            f.writelines(kept[n] for n in sorted(kept))

    atomic_file(path, write)


def read_loss_log(run_directory: str) -> dict:
    """{step: record} from a run's losses.jsonl, keeping a step's last record (logs of older versions repeat the
    steps a resumed run did again)."""
    path = os.path.join(run_directory, "losses.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"no losses.jsonl in {run_directory}")
    records = {}
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):  # a record a kill cut short (the resumed run logs that step again)
                break
            r = json.loads(line)
            records[r["step"]] = r
    return dict(sorted(records.items()))


def save_grid(path: str, rows: list) -> torch.Tensor:
    """One row per tensor (B, 3, H, W) in [-1, 1]; saved as PNG, returned for TensorBoard."""
    n = min(r.shape[0] for r in rows)
    grid = make_grid(torch.cat([r[:n].float().cpu() for r in rows]).clamp(-1, 1), nrow=n, normalize=True,
                     value_range=(-1, 1), padding=1)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_image(grid, path)
    return grid

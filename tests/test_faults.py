"""Faults a long run meets: a kill in the middle of writing best/, a full disk while saving, what killed processes
leave behind (temporary folders, a half-swapped checkpoint, a half-written log line), and damaged files."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, TINY, make_tokenizer, tiny_args
from safetensors import SafetensorError

import tokenizer.common.checkpoint as ck
from dit.cache import main as cache_main
from dit.train import main as dit_main
from tokenizer.common.atomic import remove_stale_temporaries
from tokenizer.common.checkpoint import load_training_state, save_training_state, verify_file
from tokenizer.common.errors import UserError
from tokenizer.common.runs import LossLog, read_loss_log, tidy_run
from tokenizer.train import main as tok_main


def env():
    # the in-process runs' thread count: another one changes float reduction order
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads()))


def temporaries(folder) -> list:
    return [p for _, dirs, files in os.walk(folder) for p in dirs + files if ".tmp-" in p or p.endswith(".old")]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# A tokenizer run killed (SIGKILL, by itself) right after the first file of best/ at its final step is written.
KILL_IN_BEST = """
import os, signal, sys
import tokenizer.common.checkpoint as ck, tokenizer.common.training as tr
from tokenizer.train import main
real_save, real_write = tr.save_training_state, ck.write_weights
def save(directory, modules, optimizer, state, metadata=None):
    if os.path.basename(directory) == "best" and state["step"] == int(os.environ["KILL_AT_STEP"]):
        def write_then_die(*a, **k):
            real_write(*a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        ck.write_weights = write_then_die
    return real_save(directory, modules, optimizer, state, metadata)
tr.save_training_state = save
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_while_writing_best_then_rerun_gives_best(tmp_path, capsys):
    args = [*TINY, f"ckpt_dir={tmp_path}", "run_name=k", "training.max_steps=2", "training.ckpt_every=1",
            "dataset.batch_size=8", "training.eval_images=8", "ssdd.fm_sampler.steps=2"]
    run = tmp_path / "jobs" / "k"
    proc = subprocess.run([sys.executable, "-c", KILL_IN_BEST, *args], cwd=ROOT, env=dict(env(), KILL_AT_STEP="2"),
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p for p in os.listdir(run / "checkpoints") if p.startswith(".tmp-best-")]  # the kill left half a best/
    assert not (run / "checkpoints" / "best").exists()
    # last/ is written after best/, so it still holds the step before: the re-run does the final steps again
    assert json.load(open(run / "checkpoints" / "last" / "training_state.json"))["step"] == 1

    capsys.readouterr()
    assert tok_main(args) == 0
    out = capsys.readouterr().out
    assert "resumed" in out and "at step 1" in out and ".tmp-best-" in out  # it says what it removed
    for which in ("best", "last"):
        assert json.load(open(run / "checkpoints" / which / "training_state.json"))["step"] == 2
    assert (run / "results" / "step0000002" / "eval_training.json").exists()
    assert temporaries(run) == []

    # A finished run missing its final outputs (an older version wrote best/ after last/): the re-run makes them.
    shutil.rmtree(run / "checkpoints" / "best")
    os.remove(run / "results" / "step0000002" / "eval_training.json")
    assert tok_main(args) == 0
    out = capsys.readouterr().out
    assert "completing what the last run left out" in out and "checkpoints/best" in out
    assert json.load(open(run / "checkpoints" / "best" / "training_state.json"))["step"] == 2
    assert (run / "results" / "step0000002" / "eval_training.json").exists()
    assert tok_main(args) == 0  # and now there is nothing left to do
    assert "nothing to do" in capsys.readouterr().out


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    """A latent cache and a DiT run whose checkpoints/last is at step 2."""
    tmp = tmp_path_factory.mktemp("faults")
    os.chdir(ROOT)
    args = tiny_args(make_tokenizer(tmp / "tok"), tmp)
    assert cache_main(args) == 0
    (cache,) = [p for p in (tmp / "latents").iterdir() if p.is_dir()]
    args = [*args, f"cache.dir={cache}", "training.ckpt_every=2"]
    assert dit_main([*args, "run_name=base", "training.max_steps=2"]) == 0
    return tmp, args


def files_of(directory) -> dict:
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


@pytest.mark.slow
@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   SafetensorError("Error while serializing: I/O error: No space left on device "
                                                   "(os error 28)")], ids=["OSError", "SafetensorError"])
def test_full_disk_while_saving_keeps_the_previous_checkpoint(dit_run, error, monkeypatch, capsys):
    tmp, args = dit_run
    name = f"full_{type(error).__name__}"
    shutil.copytree(tmp / "jobs" / "base", tmp / "jobs" / name)
    last = tmp / "jobs" / name / "checkpoints" / "last"
    before = files_of(last)

    def disk_full(*a, **k):
        raise error

    monkeypatch.setattr(ck, "save_file", disk_full)
    capsys.readouterr()
    assert dit_main([*args, f"run_name={name}", "training.max_steps=4"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: could not write")
    assert "No space left on device" in err and "previous version is kept" in err
    assert files_of(last) == before and temporaries(tmp / "jobs" / name) == []


@pytest.mark.slow
def test_full_disk_on_a_real_small_filesystem(dit_run, tmp_path):
    """The same on a tmpfs too small for a second checkpoint (mounted in a user namespace where that is allowed)."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs user namespaces); the patched-writer test covers the logic")
    tmp, args = dit_run
    base = tmp / "jobs" / "base"
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(base) for f in fs)
    mount, copy = tmp_path / "small", tmp_path / "copy"
    mount.mkdir()
    cmd = " ".join([sys.executable, "-m", "dit.train", *[f"'{a}'" for a in args], f"ckpt_dir={mount}", "run_name=base",
                    "training.max_steps=4"])
    script = (f"mount -t tmpfs -o size={int(size * 1.5) + 2**20} tmpfs {mount} && mkdir -p {mount}/jobs && "
              f"cp -a {base} {mount}/jobs/ && {cmd}; echo $? > {tmp_path}/rc; cp -a {mount} {copy}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=900)
    assert open(tmp_path / "rc").read().strip() == "2", proc.stderr[-2000:]
    last_line = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr and last_line.startswith("error: could not write") and "No space" in last_line
    last = copy / "jobs" / "base" / "checkpoints" / "last"
    assert files_of(last) == files_of(base / "checkpoints" / "last")  # the previous checkpoint, intact
    assert temporaries(copy) == []


def test_stale_temporaries_go_and_live_ones_stay(tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    dead, live = dead_pid(), os.getppid()
    for name in (f".tmp-last-{dead}", f".tmp-best-{dead}", f".tmp-last-{live}"):
        (ckpts / name).mkdir(parents=True)
        (ckpts / name / "model_ae.safetensors").write_bytes(b"x" * 100)
    (run / "results" / "step0000004").mkdir(parents=True)
    (run / "results" / "step0000004" / f"z_stats.json.tmp-{dead}").write_text("{")
    (run / f"config.yaml.tmp-{dead}").write_text("")
    net, opt = torch.nn.Linear(2, 2), None
    save_training_state(str(ckpts / "last"), {"net": net}, opt, {"step": 1})
    os.rename(ckpts / "last", ckpts / "last.old")  # a kill between the two renames of a swap
    removed = tidy_run(str(run))
    assert sorted(os.path.basename(p) for p in removed) == sorted(
        [f".tmp-last-{dead}", f".tmp-best-{dead}", f"z_stats.json.tmp-{dead}", f"config.yaml.tmp-{dead}"])
    assert sorted(os.listdir(ckpts)) == [f".tmp-last-{live}", "last"]  # the swap finished, the live writer's kept
    assert load_training_state(str(ckpts / "last"), {"net": net})["step"] == 1
    assert remove_stale_temporaries(str(tmp_path / "nowhere")) == []


def test_half_written_log_line_is_cut_before_appending(tmp_path):
    path = tmp_path / "losses.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    assert list(read_loss_log(str(tmp_path))) == [1]  # a reader skips the cut line

    class Quiet:
        def log(self, *a, **k):
            pass

    log = LossLog(str(tmp_path), Quiet(), every=100, start_step=1)  # resumed at step 1
    log.write({"step": 2, "loss": 0.25})
    log.close()
    assert path.read_text() == '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n'


def test_damaged_state_file_is_named_and_each_file_hashed_once(tmp_path, monkeypatch):
    net = torch.nn.Linear(4, 3)
    d = tmp_path / "last"
    save_training_state(str(d), {"net": net}, None, {"step": 5})
    state = json.load(open(d / "training_state.json"))
    assert set(state["files"]) == {"model_net.safetensors"}
    assert len(state["files"]["model_net.safetensors"]["sha256"]) == 64
    calls = []
    real = ck.sha256_file
    monkeypatch.setattr(ck, "sha256_file", lambda p: calls.append(p) or real(p))
    for _ in range(3):
        load_training_state(str(d), {"net": net})
    assert len(calls) == 1  # verified once per process, not at every read
    with open(d / "model_net.safetensors", "r+b") as f:  # same size, other bytes
        f.seek(-8, os.SEEK_END)
        f.write(b"\xff" * 8)
    with pytest.raises(UserError, match="model_net.safetensors is damaged: its sha256"):
        load_training_state(str(d), {"net": net})
    with open(d / "model_net.safetensors", "ab") as f:
        f.write(b"more")
    with pytest.raises(UserError, match="bytes, but .*training_state.json records"):
        verify_file(str(d / "model_net.safetensors"), state["files"]["model_net.safetensors"], "training_state.json")
    (d / "training_state.json").write_text("{ half")
    with pytest.raises(UserError, match="training state is damaged"):
        load_training_state(str(d), {"net": net})

"""What a run keeps straight: the architecture comes from the checkpoint a task loads (eval, z_stats, distillation,
the KL-VAE baseline), one job writes a run (a lock; several processes on a machine without GPUs form one job),
losses.jsonl holds each step once after a kill and resume, weight files get the permissions of the files beside
them, and offline notes name the config key a user sets. Refused input leaves the runs as they were."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from helpers import TINY

from tokenizer import SSDD
from tokenizer.common.atomic import atomic_json
from tokenizer.common.checkpoint import check_state_dict, read_metadata, save_training_state, save_weights, umask
from tokenizer.common.errors import CheckpointMismatchError, UserError
from tokenizer.common.runs import LOCK_FILE, cut_loss_log, lock_run, read_loss_log, unlock_run
from tokenizer.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A run trained with ssdd.decoder=S (and a 32-wide encoder) ...
TRAIN_S = [*TINY, "ssdd.decoder=S", "dataset.limit=16", "dataset.batch_size=8", "training.eval_images=8",
           "ssdd.fm_sampler.steps=2", "training.max_steps=1"]
# ... used with a config that says neither (configs/fmnist.yaml: decoder XS, encoder width 64)
PLAIN = ["config=configs/fmnist.yaml", "dataset.limit=16", "eval.batch_size=16", "ssdd.fm_sampler.steps=2"]


def env(**extra):
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)


def snapshot(folder) -> dict:
    """{relative path: bytes} of every file under `folder`: what refused input must leave as it was."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


def raw_steps(run) -> list:
    return [json.loads(line)["step"] for line in open(os.path.join(run, "losses.jsonl"))]


def modes(folder) -> dict:
    return {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}


@pytest.fixture(scope="module")
def run_s(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    assert main([*TRAIN_S, f"ckpt_dir={tmp}", "run_name=s"]) == 0
    return tmp


# ----------------------------------------------------------------------------- the architecture from the checkpoint


@pytest.mark.slow
def test_eval_and_z_stats_of_an_s_run_with_a_config_that_says_otherwise(run_s, capsys):
    assert main([*PLAIN, f"ckpt_dir={run_s}", "task=eval", "ssdd.checkpoint=s"]) == 0
    out = capsys.readouterr().out
    assert "ssdd.decoder=S (config: XS)" in out and "ssdd.encoder_base_channels=32 (config: 64)" in out
    results = run_s / "jobs" / "s" / "results" / "step0000001"
    assert json.load(open(results / "eval_2steps.json"))["n_images"] == 16

    assert main([*PLAIN, f"ckpt_dir={run_s}", "task=z_stats", "ssdd.checkpoint=s"]) == 0
    stats = json.load(open(results / "z_stats.json"))
    assert stats["n_values"] == 16 * 4 * 4 * 4 and stats["z_std"] > 0


@pytest.mark.slow
def test_a_contradicting_key_on_the_command_line_is_one_short_line(run_s, capsys):
    before = snapshot(run_s)
    for key, value in (("ssdd.decoder", "M"), ("ssdd.encoder_base_channels", "128")):
        assert main([*PLAIN, f"ckpt_dir={run_s}", "task=eval", "ssdd.checkpoint=s", f"{key}={value}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and len(err) < 300, err
        assert f"{key}={value} contradicts ssdd.checkpoint" in err and f"drop {key}=" in err
    # a resumed run keeps its architecture too: a contradicting key stops before anything is written
    assert main([*TRAIN_S, f"ckpt_dir={run_s}", "run_name=s", "ssdd.decoder=XS", "training.max_steps=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "ssdd.decoder=XS contradicts run_name" in err and "use another run_name" in err and "\n" not in err
    assert snapshot(run_s) == before


@pytest.mark.slow
def test_distillation_and_kl_baseline_from_an_s_run(run_s):
    common = [*PLAIN, f"ckpt_dir={run_s}", "dataset.batch_size=4", "training.eval_images=4", "training.max_steps=1"]
    assert main([*common, "run_name=s1", "distill_teacher=true", "ssdd.checkpoint=s", "ssdd.encoder_train=false"]) == 0
    meta = read_metadata(str(run_s / "jobs" / "s1" / "checkpoints" / "last" / "model_ae_ema.safetensors"))
    assert meta["decoder"] == "S" and meta["encoder_base_channels"] == "32" and meta["single_step"] == "1"

    # the KL-VAE baseline on the S run's encoder: its width comes from there (the config says 64)
    assert main([*common, "run_name=kl", "ssdd.decoder=kl", "ssdd.kl_base_channels=32", "ssdd.encoder_checkpoint=s",
                 "ssdd.encoder_train=false"]) == 0
    meta = read_metadata(str(run_s / "jobs" / "kl" / "checkpoints" / "last" / "model_ae_ema.safetensors"))
    assert meta["decoder"] == "kl" and meta["encoder_base_channels"] == "32"


@pytest.mark.slow
def test_a_file_without_metadata_gets_its_sizes_from_its_shapes(tmp_path):
    from tokenizer.common.config import load_config
    from tokenizer.evaluation import model_from_config

    torch.manual_seed(0)
    model = SSDD(encoder="f8c4", decoder="S", encoder_base_channels=32)
    path = str(tmp_path / "released.safetensors")
    save_weights(model, path)  # no architecture metadata, as the released files
    built = model_from_config(load_config("ssdd.yaml", [f"ssdd.checkpoint={path}"]))
    assert built.decoder_name == "S" and built.encoder_base_channels == 32
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in built.state_dict().items())


def test_mismatch_messages_give_counts_and_a_few_keys():
    with torch.device("meta"):
        small, big = SSDD(decoder="S", encoder_base_channels=32), SSDD(decoder="M")
    with pytest.raises(CheckpointMismatchError) as err:
        check_state_dict(big, small.state_dict(), "s.safetensors", "SSDD(decoder=M)")
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 300, msg
    assert "missing" in msg and "mis-shaped keys" in msg and msg.count("decoder.") + msg.count("encoder.") <= 2


# ----------------------------------------------------------------------------- one writer per run


HOLD = """
import sys, time
from tokenizer.common.runs import lock_run
lock_run(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def hold_lock(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow
def test_second_job_is_refused_and_a_dead_holders_lock_is_taken_over(run_s, capsys):
    run = run_s / "jobs" / "s"
    holder = hold_lock(run)
    try:
        before = snapshot(run)
        assert main([*TRAIN_S, f"ckpt_dir={run_s}", "run_name=s", "training.max_steps=2"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and "being written by another job" in err
        assert f"pid {holder.pid}" in err and "nothing was changed" in err
        assert snapshot(run) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / LOCK_FILE).exists()  # a killed holder leaves its lock file behind ...
    assert main([*TRAIN_S, f"ckpt_dir={run_s}", "run_name=s", "training.max_steps=2"]) == 0  # ... which is taken over
    assert raw_steps(run) == [1, 2] and not (run / LOCK_FILE).exists()  # and given up at the end
    # the weights the trainer wrote have the permissions of the JSON beside them
    assert set(modes(run / "checkpoints" / "last").values()) == {0o666 & ~umask()}


def test_lock_without_flock_takes_over_only_a_dead_holder(tmp_path, monkeypatch):
    import fcntl

    def no_flock(*a):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid}))
    lock_run(str(tmp_path))
    assert json.load(open(tmp_path / LOCK_FILE))["pid"] == os.getpid()
    unlock_run(str(tmp_path))
    assert not (tmp_path / LOCK_FILE).exists()

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        with pytest.raises(UserError, match=f"pid {holder.pid}.*delete .*{LOCK_FILE}"):
            lock_run(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_two_processes_without_gpus_form_one_job_that_shares_the_lock(tmp_path):
    assert not torch.cuda.is_available(), "this test is about machines without GPUs"
    clean = {k: v for k, v in env().items() if k != "ACCELERATE_USE_CPU"}  # as a user who never heard of it
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tokenizer.train",
           *TINY, f"ckpt_dir={tmp_path}", "run_name=two", "dataset.limit=32", "dataset.batch_size=8",
           "training.eval_images=8", "ssdd.fm_sampler.steps=2", "training.max_steps=3", "training.log_freq=1"]
    res = subprocess.run(cmd, cwd=ROOT, env=clean, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("process(es) on") == 1 and "2 process(es) on cpu" in res.stdout
    run = tmp_path / "jobs" / "two"
    assert raw_steps(run) == [1, 2, 3] and not (run / LOCK_FILE).exists()


# ----------------------------------------------------------------------------- records


KILL_AFTER_LOGGING = """
import os, signal, sys
import tokenizer.common.runs as runs
from tokenizer.train import main
real_write = runs.LossLog.write
def write(self, record, force=False):
    real_write(self, record, force)
    if record["step"] == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
runs.LossLog.write = write
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_losses_jsonl_holds_each_step_once_after_a_kill_and_resume(tmp_path):
    args = [*TINY, f"ckpt_dir={tmp_path}", "run_name=k", "dataset.limit=64", "dataset.batch_size=8",
            "training.eval_images=8", "ssdd.fm_sampler.steps=2", "training.max_steps=7", "training.ckpt_every=3"]
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_LOGGING, *args], cwd=ROOT, env=env(KILL_AT_STEP="5"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = tmp_path / "jobs" / "k"
    assert raw_steps(run) == [1, 2, 3, 4, 5]  # checkpoints/last is at step 3: steps 4 and 5 will be done again
    assert main(args) == 0
    assert raw_steps(run) == list(range(1, 8))


def test_cut_loss_log_keeps_one_record_per_step(tmp_path):
    path = tmp_path / "losses.jsonl"
    # an older version's log after a kill at step 5 and a resume from 3, then a kill mid-line
    lines = [{"step": s, "loss": s} for s in (1, 2, 3, 4, 5)] + [{"step": s, "loss": -s} for s in (4, 5, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 7, "lo')
    cut_loss_log(str(path), 5)
    assert [json.loads(line) for line in open(path)] == [
        {"step": 1, "loss": 1}, {"step": 2, "loss": 2}, {"step": 3, "loss": 3}, {"step": 4, "loss": -4},
        {"step": 5, "loss": -5}]
    before = path.stat().st_mtime_ns
    time.sleep(0.01)
    cut_loss_log(str(path), 5)  # a clean log is left alone
    assert path.stat().st_mtime_ns == before
    assert list(read_loss_log(str(tmp_path))) == [1, 2, 3, 4, 5]


def test_weight_files_get_the_permissions_of_the_json_beside_them(tmp_path):
    old = os.umask(0o027)  # a stricter umask than the usual 022: both follow it
    try:
        save_training_state(str(tmp_path / "last"), {"ae": torch.nn.Linear(2, 2)}, torch.optim.AdamW(
            torch.nn.Linear(2, 2).parameters()), {"step": 1})
        save_weights(torch.nn.Linear(2, 2), str(tmp_path / "w.safetensors"))
        atomic_json(str(tmp_path / "w.json"), {})
    finally:
        os.umask(old)
    assert set(modes(tmp_path / "last").values()) == {0o640}, modes(tmp_path / "last")
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == (tmp_path / "w.json").stat().st_mode & 0o777 == 0o640


# ----------------------------------------------------------------------------- offline notes


@pytest.mark.slow
def test_offline_notes_name_the_config_keys(monkeypatch, tmp_path):
    from tokenizer.common.errors import WeightsUnavailableError
    from tokenizer.losses import DinoV2Teacher, LPIPSLoss
    from tokenizer.metrics import ReconstructionMetrics

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached, and downloads are off
    notes = " ".join(ReconstructionMetrics(lpips=True, fid=True).notes)
    for key in ("eval.inception_weights=", "eval.fid=false", "eval.lpips_weights=", "eval.lpips=false"):
        assert key in notes, notes
    assert "inception_weights_path" not in notes and "weights_path" not in notes
    with pytest.raises(WeightsUnavailableError) as err:
        LPIPSLoss("vgg", pretrained=True)
    assert "aux_losses.lpips_weights=" in str(err.value) and "losses.lpips=0" in str(err.value)
    with pytest.raises(WeightsUnavailableError) as err:
        DinoV2Teacher(pretrained=True)
    assert "aux_losses.repa.dino_weights=" in str(err.value) and "losses.repa=0" in str(err.value)

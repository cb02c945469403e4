"""The training task end to end on the embedded data: loss falls, exact resume after a kill, 2-process DDP,
and one-line errors for user mistakes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, TINY, losses
from safetensors.torch import load_file

from tokenizer.train import main


def cli(args, **kw):
    # the in-process runs' thread count: another one changes float reduction order, and resume must be bit-exact
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    return subprocess.Popen([sys.executable, "-m", "tokenizer.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_loss_falls_on_embedded_data(tmp_path):
    assert main([*TINY, f"ckpt_dir={tmp_path}", "run_name=fall", "training.max_steps=60", "training.lr=1e-3"]) == 0
    run = tmp_path / "jobs" / "fall"
    values = list(losses(run).values())
    assert len(values) == 60
    first, last = sum(values[:10]) / 10, sum(values[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    assert (run / "checkpoints" / "last" / "model_ae_ema.safetensors").exists()
    assert any(p.startswith("events.out.tfevents") for _, _, fs in os.walk(run) for p in fs)


@pytest.mark.slow
def test_killed_run_resumes_exactly(tmp_path):
    common = [*TINY, f"ckpt_dir={tmp_path}", "training.max_steps=14", "training.ckpt_every=4"]
    assert main([*common, "run_name=straight"]) == 0
    reference = losses(tmp_path / "jobs" / "straight")

    proc = cli([*common, "run_name=killed"])
    state = tmp_path / "jobs" / "killed" / "checkpoints" / "last" / "training_state.json"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    saved_step = json.load(open(state))["step"]
    assert saved_step < 14

    assert main([*common, "run_name=killed"]) == 0
    resumed = losses(tmp_path / "jobs" / "killed")
    assert resumed == reference  # every step's loss, bit for bit


@pytest.mark.slow
def test_two_process_ddp_ends_with_identical_weights(tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "tests/ddp_worker.py",
           *TINY, f"ckpt_dir={tmp_path}", "run_name=ddp",
           "training.max_steps=8"]  # RAdam: the first ~5 steps are silent
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stdout and "rank 1 done" in res.stdout
    # ranks see different data shards and noise: equal weights mean gradients were averaged by DDP
    a, b = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and training moved them (the test would pass trivially on untouched weights)
    from tokenizer.common.config import load_config
    from tokenizer.evaluation import model_from_config

    torch.manual_seed(0)
    init = model_from_config(load_config("ssdd.yaml", TINY)).state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a)


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    cases = [
        (["ssdd.decoder=Q"], "decoder"),
        (["training.lrr=1"], "lrr"),
        (["task=fly"], "unknown task"),
        (["dataset.name=imagefolder", f"dataset.root={tmp_path}/nowhere"], "nowhere"),
        (["task=eval", f"ssdd.checkpoint={tmp_path}/missing.safetensors"], "missing"),
    ]
    for args, needle in cases:
        assert main([*TINY, f"ckpt_dir={tmp_path}", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and needle in err, (args, err)


def test_corrupt_image_in_dataset_is_reported_by_name(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "val"):
        d = tmp_path / "data" / split / "cls"
        d.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(d / f"ok{i}.png")
    (tmp_path / "data" / "train" / "cls" / "broken.png").write_bytes(os.urandom(200))
    rc = main([*TINY, f"ckpt_dir={tmp_path}", "run_name=c", "dataset.name=imagefolder",
               f"dataset.root={tmp_path}/data", "dataset.batch_size=4", "training.max_steps=2"])
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # above it only the progress bar
    assert rc == 2 and last.startswith("error:") and "broken.png" in last and "Traceback" not in err


@pytest.mark.slow
def test_checkpoint_of_another_architecture_is_one_short_line(tmp_path):
    from tokenizer import SSDD
    from tokenizer.common.checkpoint import save_weights

    path = tmp_path / "s.safetensors"  # no architecture metadata, and an encoder the config does not describe
    save_weights(SSDD(encoder="f16c4", decoder="S", encoder_base_channels=32), str(path))
    proc = cli([*TINY, f"ckpt_dir={tmp_path}", "task=eval", f"ssdd.checkpoint={path}"])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "unexpected keys (e.g. encoder." in lines[0] and "set ssdd.encoder" in lines[0], err
    assert len(lines[0]) < 300 + len(str(path)), lines[0]


def test_losses_whose_weights_cannot_be_had_stop_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty cache: nothing to find offline
    for switch, needle in [("losses.lpips=0.5", "losses.lpips=0"), ("losses.repa=0.25", "losses.repa=0")]:
        assert main([*TINY, f"ckpt_dir={tmp_path}", "run_name=w", switch, "training.max_steps=1"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and needle in err, err


@pytest.mark.slow
def test_eval_and_z_stats_tasks(tmp_path):
    common = [*TINY, f"ckpt_dir={tmp_path}", "run_name=e", "dataset.limit=48"]
    assert main([*common, "training.max_steps=2"]) == 0
    ckpt_dir = tmp_path / "jobs" / "e" / "checkpoints" / "last"
    results = tmp_path / "jobs" / "e" / "results" / "step0000002"  # outside checkpoints/: later saves keep it
    assert main([*common, "task=eval", "ssdd.checkpoint=e", "ssdd.fm_sampler.steps=2"]) == 0
    result = json.load(open(results / "eval_2steps.json"))
    assert result["n_images"] == 48 and result["steps"] == 2 and 0 < result["psnr"] < 100 and -1 <= result["ssim"] <= 1
    assert (results / "eval_2steps.png").exists()

    assert main([*common, "task=z_stats", "ssdd.checkpoint=e"]) == 0
    stats = json.load(open(results / "z_stats.json"))
    # the same numbers computed directly from the saved EMA weights
    from tokenizer import SSDD
    from tokenizer.data import FashionMNIST

    model = SSDD.from_checkpoint(str(ckpt_dir / "model_ae_ema.safetensors")).eval()
    val = FashionMNIST("test", limit=48)  # the class-balanced subset dataset.limit=48 takes
    x = torch.stack([val[i][0] for i in range(48)])
    with torch.no_grad():
        z = model.encode(x).mode().double()
    assert stats["z_mean"] == pytest.approx(float(z.mean()), rel=1e-6, abs=1e-9)
    assert stats["z_std"] == pytest.approx(float(z.std()), rel=1e-6)
    assert stats["n_values"] == z.numel()

    # the run goes on: its new checkpoints/last replaces the folder, and the results of step 2 stay
    assert main([*common, "training.max_steps=3"]) == 0
    assert json.load(open(results / "z_stats.json")) == stats and (results / "eval_2steps.json").exists()
    assert json.load(open(ckpt_dir / "training_state.json"))["step"] == 3

"""sample/sample_ddp.py: per-sample noise, class-balanced labels, PNGs + ADM npz, resuming after a kill, several
processes, non-finite samples and one-line errors; with a randomly initialised DiT and tokenizer."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch
from helpers import ROOT, make_bundle
from PIL import Image

from dit.pipeline import load_generator
from sample import sample_ddp
from tokenizer import SSDD


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """Random DiT-Ti/1 (2 steps by default) + the distilled stand-in, a 2-step teacher and a KL-VAE."""
    return make_bundle(tmp_path_factory.mktemp("ddp"))


@contextmanager
def one_thread():
    """One intra-op thread, as the OMP_NUM_THREADS=1 subprocesses use: the thread count changes float rounding."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(*args) -> int:
    with one_thread():
        return sample_ddp.main([str(a) for a in args])


def pngs(folder) -> list:
    return sorted(p for p in os.listdir(folder) if p.endswith(".png"))


def npz(path) -> tuple:
    with np.load(path) as z:
        return z["arr_0"], z["arr_1"]


def one_line_error(capsys) -> str:
    """The run's last stderr line (progress bars come before it) must be the whole error."""
    err = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert err.startswith("error:") and "\r" not in err, err
    return err


def test_per_sample_noise_does_not_depend_on_batching(bundle):
    gen = load_generator(bundle, device="cpu")
    noise, decoder_noise = gen.draw_sample_noise(range(6), seed=3)
    part, part_dec = gen.draw_sample_noise([4, 5], seed=3)
    assert noise.shape == (6, 4, 4, 4) and decoder_noise.shape == (6, 3, 32, 32)
    assert torch.equal(noise[4:], part) and torch.equal(decoder_noise[4:], part_dec)
    assert not torch.equal(gen.draw_sample_noise([4], seed=4)[0], part[:1])
    assert not torch.equal(noise[0], noise[1])
    x = torch.zeros(4, 4, 4, 4)
    whole, half = gen.step_noise(range(4), 3), gen.step_noise([2, 3], 3)
    first = whole(x)
    assert torch.equal(first[2:], half(x[2:])) and not torch.equal(first, whole(x))  # next draw: next step's noise


@pytest.mark.slow
def test_samples_npz_labels_resume_and_settings(bundle, tmp_path, capsys):
    out = tmp_path / "s"
    assert run("--ckpt", bundle, "--num-fid-samples", 7, "--per-proc-batch-size", 3, "--out", out) == 0
    assert pngs(out) == [f"{i:06d}.png" for i in range(7)]
    images, labels = npz(f"{out}.npz")
    assert images.shape == (7, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(7)]  # class-balanced: class i mod 10
    assert all(np.array_equal(np.asarray(Image.open(out / p)), images[i]) for i, p in enumerate(pngs(out)))
    settings = json.load(open(out / "sampling.json"))
    assert settings["decoder"] == "SSDD-XS 1-step (distilled)"
    assert settings["steps"] == 2 and settings["num_samples"] == 7

    # resume: a lost PNG and a half-written temporary file; only the batch that misses a PNG runs again
    before = {p: (out / p).read_bytes() for p in pngs(out)}
    os.remove(out / "000004.png")
    (out / "000005.png.tmp-123").write_bytes(b"partial")
    with mock.patch.object(sample_ddp, "write_png", wraps=sample_ddp.write_png) as written:
        assert run("--ckpt", bundle, "--num-fid-samples", 7, "--per-proc-batch-size", 3, "--out", out) == 0
    assert sorted(os.path.basename(c.args[0]) for c in written.call_args_list) == [f"{i:06d}.png" for i in (3, 4, 5)]
    assert {p: (out / p).read_bytes() for p in pngs(out)} == before
    assert np.array_equal(npz(f"{out}.npz")[0], images) and sorted(os.listdir(out)) == [*pngs(out), "sampling.json"]

    # other settings into the same folder: refused, nothing written
    assert run("--ckpt", bundle, "--num-fid-samples", 7, "--cfg", 5, "--out", out) == 2
    assert "other settings (cfg_scale" in one_line_error(capsys)

    # another batch size: the same noise, so the same images up to rounding in batched kernels
    assert run("--ckpt", bundle, "--num-fid-samples", 7, "--per-proc-batch-size", 2, "--out", tmp_path / "b2") == 0
    other = npz(f"{tmp_path / 'b2'}.npz")[0]
    assert np.abs(other.astype(int) - images).max() <= 1 and (other == images).mean() > 0.99

    # another decoder of the bundle decodes the same latents
    assert run("--ckpt", bundle, "--num-fid-samples", 3, "--decoder", "KL-VAE", "--out", tmp_path / "kl") == 0
    assert json.load(open(tmp_path / "kl" / "sampling.json"))["decoder"] == "KL-VAE"
    assert not np.array_equal(npz(f"{tmp_path / 'kl'}.npz")[0], images[:3])


def test_nonfinite_samples_are_counted_not_written(bundle, tmp_path, capsys):
    decode = SSDD.decode

    def first_of_batch_is_nan(self, z, *a, **k):
        x = decode(self, z, *a, **k)
        x[0] = float("nan")
        return x

    out = tmp_path / "nan"
    with mock.patch.object(SSDD, "decode", first_of_batch_is_nan):
        assert run("--ckpt", bundle, "--num-fid-samples", 4, "--per-proc-batch-size", 2, "--out", out) == 2
    err = one_line_error(capsys)
    assert "2 of 4 samples were not finite" in err and "no .npz" in err
    assert json.load(open(out / "nonfinite.json")) == [0, 2]
    assert pngs(out) == ["000001.png", "000003.png"] and not os.path.exists(f"{out}.npz")


def test_user_errors_are_one_line(bundle, tmp_path, capsys):
    base = ["--num-fid-samples", 2, "--out", tmp_path / "e"]
    assert run("--ckpt", tmp_path / "nowhere", *base) == 2
    assert "not found" in one_line_error(capsys)
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(os.urandom(200))
    assert run("--ckpt", bad, *base) == 2
    assert "cannot read" in one_line_error(capsys)
    assert run("--ckpt", bundle, "--decoder", "nope", *base) == 2
    assert "offers" in one_line_error(capsys)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with mock.patch.object(Image.Image, "save", full):
        assert run("--ckpt", bundle, *base) == 2
    err = one_line_error(capsys)
    assert "No space left on device" in err and "000000.png" in err
    assert pngs(tmp_path / "e") == [] and not [p for p in os.listdir(tmp_path / "e") if ".tmp-" in p]


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


@pytest.mark.slow
def test_two_processes_write_identical_images(bundle, tmp_path):
    args = ["--ckpt", bundle, "--num-fid-samples", "7", "--per-proc-batch-size", "2"]
    assert run(*args, "--out", tmp_path / "one") == 0
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "sample/sample_ddp.py",
           *args, "--out", str(tmp_path / "two")]
    res = subprocess.run(cmd, cwd=ROOT, env=dict(_env(), ACCELERATE_USE_CPU="true"), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es) x batch 2" in res.stdout and "for 4 samples" in res.stdout  # rank 0: batches 0 and 2
    assert pngs(tmp_path / "one") == pngs(tmp_path / "two")
    one, two = tmp_path / "one", tmp_path / "two"
    assert all((one / p).read_bytes() == (two / p).read_bytes() for p in pngs(one))
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "two.npz").read_bytes()


@pytest.mark.slow
def test_killed_run_resumes_with_no_duplicate_and_no_gap(bundle, tmp_path):
    args = ["--ckpt", bundle, "--num-fid-samples", "40", "--per-proc-batch-size", "2", "--steps", "20"]
    assert run(*args, "--out", tmp_path / "straight") == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "sample/sample_ddp.py", *args, "--out", str(out)], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while (not out.is_dir() or len(pngs(out)) < 5) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert 5 <= len(pngs(out)) < 40 and not os.path.exists(f"{out}.npz")
    assert run(*args, "--out", out) == 0
    assert pngs(out) == [f"{i:06d}.png" for i in range(40)]  # no gap, and one file per index: no duplicate
    assert (tmp_path / "straight.npz").read_bytes() == (tmp_path / "killed.npz").read_bytes()

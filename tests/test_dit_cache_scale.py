"""The latent cache at scale: read per item from disk (the same batches as loading it whole), stored in 16 bit on
request, built identically by 1 and 2 processes, and a killed build resumes where it stopped."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, make_tokenizer, tiny_args
from safetensors.torch import load_file

from dit.cache import BUILD_FILE, LatentCache, prepare_partial
from dit.cache import main as cache_main
from tokenizer.common.errors import UserError
from tokenizer.common.training import train_loader

IMAGES = 20
SHARD = ["cache.shard_size=6", "cache.batch_size=4", "dataset.num_workers=0"]  # shards of 6, 6, 6, 2 images


def build_args(tok, tmp, name, *extra):
    return [*tiny_args(tok, tmp, images=IMAGES), *SHARD, f"cache.dir={tmp / name}", *extra]


def env():
    return {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "ACCELERATE_USE_CPU": "true"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One single-process build (one thread, as the subprocess builds below) of 20 images with flips."""
    tmp = tmp_path_factory.mktemp("scale")
    tok = make_tokenizer(tmp / "tok")
    cmd = [sys.executable, "-m", "dit.cache", *build_args(tok, tmp, "ref")]
    res = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp, tok, tmp / "ref"


def shard_bytes(directory) -> dict:
    return {p: open(os.path.join(directory, p), "rb").read() for p in sorted(os.listdir(directory))
            if p.endswith(".safetensors")}


def stable_meta(directory) -> dict:
    meta = json.load(open(os.path.join(directory, "cache.json")))
    return {k: v for k, v in meta.items() if k not in ("seconds", "created")}


class InMemoryCache(torch.utils.data.Dataset):
    """The previous reader: every shard loaded whole with safetensors.load_file, then indexed."""

    def __init__(self, directory):
        meta = json.load(open(os.path.join(directory, "cache.json")))
        parts = [load_file(os.path.join(directory, s["file"])) for s in meta["shards"]]
        self.latents = torch.cat([p["latents"] for p in parts]).float()
        self.latents_flip = torch.cat([p["latents_flip"] for p in parts]).float()
        self.labels = torch.cat([p["labels"] for p in parts])

    def __len__(self):
        return 2 * len(self.latents)

    def __getitem__(self, j):
        i, flipped = divmod(int(j), 2)
        return (self.latents_flip if flipped else self.latents)[i], int(self.labels[i])


@pytest.mark.slow
def test_reader_gives_the_batches_of_a_full_load(reference):
    tmp, tok, directory = reference
    meta = json.load(open(directory / "cache.json"))
    assert [s["count"] for s in meta["shards"]] == [6, 6, 6, 2] and meta["entries"] == 2 * IMAGES
    cache, full = LatentCache(str(directory)), InMemoryCache(directory)
    assert len(cache) == len(full) == 40
    for j in range(len(cache)):
        z, y = cache[j]
        assert z.dtype == torch.float32 and torch.equal(z, full[j][0]) and y == full[j][1]
    for epoch in (0, 1):  # the trainer's loader, two ranks' shards of a shuffled epoch
        for rank in (0, 1):
            a, sa = train_loader(cache, 4, 2, rank, seed=0, num_workers=0)
            b, sb = train_loader(full, 4, 2, rank, seed=0, num_workers=0)
            sa.set_epoch(epoch)
            sb.set_epoch(epoch)
            batches = list(zip(a, b))
            assert len(batches) == 5
            for (za, ya), (zb, yb) in batches:
                assert torch.equal(za, zb) and torch.equal(ya, yb)
    # the dataset a DataLoader worker receives holds no latents, only the 8-byte labels
    assert len(pickle.dumps(cache)) < 8_000 and not any(isinstance(v, torch.Tensor) and v.dtype != torch.int64
                                                        for v in vars(cache).values())
    with pytest.raises(IndexError):
        cache[40]


@pytest.mark.slow
def test_half_precision_cache(reference, capsys, one_thread):
    tmp, tok, directory = reference
    os.chdir(ROOT)
    assert cache_main(build_args(tok, tmp, "bf16", "cache.dtype=bfloat16")) == 0
    capsys.readouterr()
    half, full = LatentCache(str(tmp / "bf16")), LatentCache(str(directory))
    half_shard, full_shard = tmp / "bf16" / "shard_00000.safetensors", directory / "shard_00000.safetensors"
    assert half.meta["dtype"] == "bfloat16" and load_file(half_shard)["latents"].dtype == torch.bfloat16
    assert os.path.getsize(half_shard) < 0.6 * os.path.getsize(full_shard)
    for j in (0, 1, 13, 39):
        z, y = half[j]
        assert z.dtype == torch.float32 and torch.equal(z, full[j][0].to(torch.bfloat16).float()) and y == full[j][1]


@pytest.mark.slow
def test_truncated_shard_is_a_one_line_error(reference, tmp_path):
    _, _, directory = reference
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(directory):
        data = open(directory / name, "rb").read()
        open(copy / name, "wb").write(data[:-100] if name == "shard_00001.safetensors" else data)
    with pytest.raises(UserError, match="shard_00001.safetensors") as e:
        LatentCache(str(copy))
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_two_processes_build_the_same_cache(reference):
    tmp, tok, directory = reference
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dit.cache",
           *build_args(tok, tmp, "two")]
    res = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "on 2 process(es)" in res.stdout
    assert "process 0/2" in res.stderr and "process 1/2" in res.stderr  # both encoded their share
    assert shard_bytes(tmp / "two") == shard_bytes(directory)  # byte for byte
    assert stable_meta(tmp / "two") == stable_meta(directory)
    assert not os.path.exists(str(tmp / "two") + ".partial")


SLOW_ENCODE = ("import sys, time\nimport dit.cache as c\nencode = c.encode_normalised\n"
               "c.encode_normalised = lambda *a: (time.sleep(0.4), encode(*a))[1]\nsys.exit(c.main(sys.argv[1:]))\n")


@pytest.mark.slow
def test_killed_build_resumes(reference, capsys):
    tmp, tok, directory = reference
    args = build_args(tok, tmp, "killed")
    partial = tmp / "killed.partial"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_ENCODE, *args], cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (partial / "shard_00001.safetensors").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert not (tmp / "killed").exists()  # no half cache where training looks
    done = sorted(p for p in os.listdir(partial) if p.endswith(".safetensors"))
    assert "shard_00000.safetensors" in done and "shard_00003.safetensors" not in done
    before = {p: os.stat(partial / p).st_mtime_ns for p in done}

    r = subprocess.run([sys.executable, "-m", "dit.cache", *args], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{len(done)} already done" in r.stdout and "(resuming)" in r.stdout
    assert {p: os.stat(tmp / "killed" / p).st_mtime_ns for p in done} == before  # not encoded again
    assert shard_bytes(tmp / "killed") == shard_bytes(directory)
    assert stable_meta(tmp / "killed") == stable_meta(directory)
    assert not partial.exists() and not (tmp / "killed" / BUILD_FILE).exists()


def test_partial_build_of_other_settings_starts_afresh(tmp_path, capsys):
    partial = tmp_path / "c.partial"
    prepare_partial(str(partial), {"dtype": "float32"})
    (partial / "shard_00000.safetensors").write_bytes(b"x")
    (partial / "shard_00001.safetensors.tmp-123").write_bytes(b"x")
    prepare_partial(str(partial), {"dtype": "float32"})  # same plan: kept, a killed writer's temporary file removed
    assert sorted(os.listdir(partial)) == [BUILD_FILE, "shard_00000.safetensors"]
    prepare_partial(str(partial), {"dtype": "bfloat16"})
    assert "starting afresh" in capsys.readouterr().out
    assert os.listdir(partial) == [BUILD_FILE] and json.load(open(partial / BUILD_FILE)) == {"dtype": "bfloat16"}

"""dit.train end to end on a tiny cache: run outputs, exact resume in a new process, one-line non-finite loss."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, make_tokenizer, tiny_args
from safetensors.torch import load_file

from dit.cache import main as cache_main
from dit.train import main as train_main
from tokenizer.common.runs import read_loss_log


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ditrain")
    tok = make_tokenizer(tmp / "tok")
    os.chdir(ROOT)
    args = tiny_args(tok, tmp, images=32)  # 64 cache entries (flips), batch 8: 8 steps per epoch
    assert cache_main(args) == 0
    return tmp, args


def losses(run_dir):
    return {step: r["loss"] for step, r in read_loss_log(str(run_dir)).items()}


def test_run_outputs(setup):
    tmp, args = setup
    assert train_main([*args, "run_name=out", "training.max_steps=4", "training.sample_every=2"]) == 0
    run = tmp / "jobs" / "out"
    assert sorted(losses(run)) == [1, 2, 3, 4]
    assert all(0 < v < 10 for v in losses(run).values())
    assert (run / "samples" / "step0000002.png").exists() and (run / "samples" / "step0000004.png").exists()
    assert any(p.startswith("events.out.tfevents") for _, _, fs in os.walk(run) for p in fs)
    last = run / "checkpoints" / "last"
    state = json.load(open(last / "training_state.json"))
    assert state["step"] == 4
    from dit.pipeline import load_dit

    model, meta = load_dit(str(last / "model_dit_ema.safetensors"))
    assert meta["model"] == "DiT-Ti/1" and json.loads(meta["class_names"])[7] == "sneaker"
    assert float(meta["z_std"]) == 0.5 and json.loads(meta["latent_shape"]) == [4, 4, 4]
    assert model.null_class == 10 and model.out_channels == 4  # label dropout row for CFG, learn_sigma off


@pytest.mark.slow
def test_resume_in_a_new_process_is_exact(setup):
    tmp, args = setup
    k = 12  # the resume point (6) is mid-epoch and the run crosses an epoch boundary (8)
    assert train_main([*args, "run_name=straight", f"training.max_steps={k}"]) == 0
    # Same thread count as the in-process straight run: another count changes float reduction order.
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    first = subprocess.run([sys.executable, "-m", "dit.train", *args, "run_name=split", f"training.max_steps={k // 2}"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.load(open(tmp / "jobs" / "split" / "checkpoints" / "last" / "training_state.json"))["step"] == k // 2
    second = subprocess.run([sys.executable, "-m", "dit.train", *args, "run_name=split", f"training.max_steps={k}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"resumed {tmp / 'jobs' / 'split'} at step {k // 2}" in second.stdout
    straight, split = losses(tmp / "jobs" / "straight"), losses(tmp / "jobs" / "split")
    assert sorted(split) == list(range(1, k + 1))
    assert split == straight  # every step's loss, bit for bit
    for name in ("model_dit", "model_dit_ema"):
        a = load_file(tmp / "jobs" / "straight" / "checkpoints" / "last" / f"{name}.safetensors")
        b = load_file(tmp / "jobs" / "split" / "checkpoints" / "last" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), name
    # and training moved the weights away from the zero-initialised output layer
    assert a["final_layer.linear.weight"].abs().sum() > 0


def test_non_finite_loss_is_one_line(setup, capsys):
    tmp, args = setup
    rc = train_main([*args, "run_name=nan", "training.max_steps=6", "training.lr=1e30", "training.grad_clip=null"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("error: non-finite loss") and "training.lr" in err, err

"""generate.py --decoder takes what sample_ddp.py and dit.export take (a decoder name of the bundle, a tokenizer run
name under --ckpt-dir, a file, ssdd:<...>, sdvae[:...]), and its labels and folders say the decoder steps that ran."""

import json
import os
import shutil

import numpy as np
import pytest
from helpers import make_bundle
from PIL import Image

from dit.pipeline import load_generator
from sample import generate, sample_ddp


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A bundle (decoders 'SSDD-XS 1-step (distilled)', 'SSDD-XS 2-step (teacher)', 'KL-VAE') and, under runs/, a
    tokenizer run 'teacher_run' whose last and best weights are the bundle's tokenizer (an 8-step SSDD-XS)."""
    tmp = tmp_path_factory.mktemp("specs")
    bundle = make_bundle(tmp)
    tok = str(tmp / "tok" / "tok.safetensors")
    runs = tmp / "runs"
    for which in ("last", "best"):
        folder = runs / "jobs" / "teacher_run" / "checkpoints" / which
        folder.mkdir(parents=True)
        shutil.copy(tok, folder / "model_ae_ema.safetensors")
        (folder / "training_state.json").write_text(json.dumps({"step": 1}))
    return bundle, tok, runs


def run(setup, tmp_path, *args):
    bundle, _, runs = setup
    return generate.main(["--ckpt", bundle, "--ckpt-dir", str(runs), "--class", "7", "--num", "2", "--steps", "1",
                          "--out", str(tmp_path / "out"), "--device", "cpu", "--scale", "1", *map(str, args)])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert err.startswith("error:") and "\r" not in err, err
    return err


def pixels(folder) -> dict:
    return {p: np.asarray(Image.open(os.path.join(folder, p))) for p in sorted(os.listdir(folder)) if p[0].isdigit()}


def test_a_decoder_name_of_the_bundle(setup, tmp_path, capsys):
    assert run(setup, tmp_path, "--decoder", "kl-vae") == 0  # any case, as bundle.json lists it
    printed = capsys.readouterr().out
    assert "decoder KL-VAE: " in printed and "(1 step)" in printed
    assert sorted(pixels(tmp_path / "out")) == ["0007_sneaker_0.png", "0007_sneaker_1.png"]
    gen = load_generator(setup[0], device="cpu", decoder="KL-VAE")  # only the decoder asked for is loaded
    assert gen.decoder_names == ["KL-VAE"]


def test_a_tokenizer_run_name_and_its_best_weights(setup, tmp_path, capsys):
    _, tok, _ = setup
    assert run(setup, tmp_path / "file", "--decoder", tok, "--decoder-steps", "2") == 0
    by_file = pixels(tmp_path / "file" / "out")
    for spec in ("teacher_run", "teacher_run@best"):
        assert run(setup, tmp_path / spec, "--decoder", spec, "--decoder-steps", "2") == 0
        assert "decoder SSDD-XS 2-step: " in capsys.readouterr().out
        got = pixels(tmp_path / spec / "out")
        assert got.keys() == by_file.keys() and all(np.array_equal(got[k], by_file[k]) for k in got)
    assert run(setup, tmp_path / "ssdd", "--decoder", f"ssdd:{tok}", "--decoder-steps", "2") == 0


def test_labels_and_folders_say_the_steps_that_ran(setup, tmp_path, capsys):
    # the bundle's 2-step teacher run for 4 steps, beside the KL-VAE
    assert run(setup, tmp_path, "--decoder", "SSDD-XS 2-step (teacher)", "--decoder", "KL-VAE",
               "--decoder-steps", "4") == 0
    printed = capsys.readouterr().out
    assert "decoder SSDD-XS 4-step (teacher): " in printed and "(4 steps)" in printed and "2-step" not in printed
    assert sorted(p for p in os.listdir(tmp_path / "out") if p != "grid.png") == ["kl-vae", "ssdd-xs-4-step-teacher"]
    # a tokenizer of 8 default steps run for 4: 'SSDD-XS 4-step' in ssdd-xs-4-step/, not 'SSDD-XS 8-step ... (4 steps)'
    assert run(setup, tmp_path / "b", "--decoder", "teacher_run", "--decoder", "KL-VAE", "--decoder-steps", "4") == 0
    printed = capsys.readouterr().out
    assert "decoder SSDD-XS 4-step: " in printed and "8-step" not in printed
    assert sorted(p for p in os.listdir(tmp_path / "b" / "out") if p != "grid.png") == ["kl-vae", "ssdd-xs-4-step"]
    # the API says it too
    gen = load_generator(setup[0], device="cpu")
    _, t = gen.compare([7], num=1, seed=0, steps=1, decoder_steps=3)
    assert [d["label"] for d in t["decoders"].values()] == ["SSDD-XS 3-step (distilled)", "SSDD-XS 3-step (teacher)",
                                                            "KL-VAE"]
    _, t = gen.generate([7], num=1, seed=0, steps=1)
    assert t["decoder_label"] == t["decoder"] == "SSDD-XS 1-step (distilled)"  # the default steps: the bundle's name


def test_bad_decoders_are_one_line(setup, tmp_path, capsys):
    assert run(setup, tmp_path, "--decoder", "no-such-decoder") == 2
    err = one_line_error(capsys)
    assert "decoder 'no-such-decoder' not found" in err and "run name" in err and "sdvae" in err
    assert "KL-VAE" in err and "SSDD-XS 2-step (teacher)" in err  # the bundle's own names
    assert run(setup, tmp_path, "--decoder", "sdvae") == 2  # this generator's latents are not SD-VAE's
    assert "does not make SD-VAE latents" in one_line_error(capsys)
    assert not os.path.exists(tmp_path / "out")


def test_sample_ddp_takes_the_same_decoders(setup, tmp_path):
    bundle, tok, runs = setup
    common = ["--ckpt", bundle, "--ckpt-dir", str(runs), "--num-fid-samples", "3", "--per-proc-batch-size", "3",
              "--steps", "1", "--decoder-steps", "2"]
    assert sample_ddp.main([*common, "--decoder", "teacher_run", "--out", str(tmp_path / "run")]) == 0
    assert sample_ddp.main([*common, "--decoder", tok, "--out", str(tmp_path / "file")]) == 0
    with np.load(tmp_path / "run.npz") as a, np.load(tmp_path / "file.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
    assert json.load(open(tmp_path / "run" / "sampling.json"))["decoder"] == "SSDD-XS 8-step"

"""eval/generation_table.py (quality and whole-pipeline speed per decoder and guidance scale) and
eval/sampling_speed.py (end-to-end speed-ups), with random weights: the numbers are meaningless, the plumbing is not."""

import json
import os

import numpy as np
import pytest
import torch
from helpers import make_bundle
from PIL import Image

import eval.generation_table as table
import eval.sampling_speed as sampling_speed
from sample import sample_ddp


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("table"))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from eval.lib.fmnist_classifier import FMNISTClassifier
    from tokenizer.common.checkpoint import save_weights

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clf") / "clf.safetensors"
    save_weights(FMNISTClassifier(), str(path))
    return str(path)


@pytest.mark.slow
def test_generation_table_rows_speedups_and_samples(bundle, classifier, tmp_path):
    out = str(tmp_path / "t")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as sample_ddp below: the same rounding
    try:
        assert table.main(["--ckpt", bundle, "--cfg", "1", "3", "--num-samples", "12", "--batch-size", "5",
                           "--latency-repeats", "1", "--real-images", "100", "--classifier", classifier,
                           "--no-inception", "--save-npz", str(tmp_path / "npz"), "--out", out]) == 0
        assert sample_ddp.main(["--ckpt", bundle, "--num-fid-samples", "12", "--per-proc-batch-size", "5",
                                "--cfg", "3", "--out", str(tmp_path / "ddp")]) == 0
    finally:
        torch.set_num_threads(before)
    r = json.load(open(out + ".json"))
    names = ["SSDD-XS 1-step (distilled)", "SSDD-XS 2-step (teacher)", "KL-VAE"]
    assert r["decoders"] == names and [(x["cfg_scale"], x["decoder"]) for x in r["rows"]] == [
        (c, n) for c in (1.0, 3.0) for n in names]
    for row in r["rows"]:
        assert 0 <= row["accuracy"] <= 1 and row["fd_classifier"] > 0 and row["n"] == 12
        assert row["images_per_s"] == pytest.approx(12 / (row["dit_s"] + row["decoder_s"]))
        assert row["dit_ms_per_image"] + row["decoder_ms_per_image"] == pytest.approx(1000 / row["images_per_s"])
        assert row["latency_ms"] == pytest.approx(row["latency_dit_ms"] + row["latency_decoder_ms"])
        assert row.get("fid") is None
    rows = {(x["cfg_scale"], x["decoder"]): x for x in r["rows"]}
    assert [x["role"] for x in r["rows"][:3]] == ["single-step", "multi-step", "kl"]
    assert rows[1.0, names[0]]["dit_s"] == rows[1.0, names[2]]["dit_s"]  # one DiT run per scale, shared
    fast = rows[3.0, names[0]]
    assert set(fast["speedup"]) == set(names[1:])
    assert fast["speedup"][names[1]]["throughput"] == pytest.approx(
        fast["images_per_s"] / rows[3.0, names[1]]["images_per_s"])
    assert len(r["speedups"]) == 4 and "(distilled) vs SSDD-XS 2-step (teacher): " in r["speedups"][0]
    assert r["real"]["n_test"] == 100 and r["real"]["n_reference"] == 12 and r["plot_metric"] == "fd_classifier"
    md = open(out + ".md").read()
    assert "| 3 | KL-VAE | 1 |" in md and "Speed-up" in md and "t.png" in md
    assert Image.open(out + ".png").size[0] > 300
    # the table's samples are sample_ddp's: same per-sample noise, labels and batch
    with np.load(tmp_path / "npz" / "SSDD_XS_1_step_distilled_cfg3.npz") as a, np.load(tmp_path / "ddp.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


@pytest.mark.slow
def test_generation_table_with_inception(bundle, classifier, inception_file, tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    x = (np.random.default_rng(0).random((12, 32, 32, 3)) * 255).astype(np.uint8)
    for i, im in enumerate(x):
        Image.fromarray(im).save(ref / f"{i}.png")
    out = str(tmp_path / "t")
    assert table.main(["--ckpt", bundle, "--decoders", "SSDD-XS 1-step (distilled)", "KL-VAE", "--cfg", "2",
                       "--num-samples", "12", "--batch-size", "6", "--latency-repeats", "1", "--real-images", "50",
                       "--classifier", classifier, "--ref", str(ref), "--inception-weights", str(inception_file),
                       "--out", out]) == 0
    r = json.load(open(out + ".json"))
    assert r["plot_metric"] == "fid" and len(r["rows"]) == 2
    for row in r["rows"]:
        assert row["fid"] > 0 and row["sfid"] > 0 and row["inception_score"] >= 1 - 1e-6
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and row["kid"] is not None
    assert any("mixed_6/conv" in n for n in r["notes"])
    assert "gFID" in open(out + ".md").read()


def test_generation_table_errors_are_one_line(bundle, capsys):
    assert table.main(["--ckpt", bundle, "--decoders", "nope", "--out", "/tmp/never"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "offers" in err and "\n" not in err


@pytest.mark.slow
def test_sampling_speed_computes_pipelines_and_both_readings(tmp_path):
    out = str(tmp_path / "s")
    assert sampling_speed.main(["--dits", "f8c4:DiT-S/2", "f16c16:DiT-S/2", "--decoders", "XS:1", "XS:2", "kl",
                                "--size", "64", "--dit-steps", "10", "2", "--warmup", "0", "--repeats", "1",
                                "--device", "cpu", "--out", out]) == 0
    r = json.load(open(out + ".json"))
    assert [d["tokens"] for d in r["dits"]] == [16, 4] and len(r["decoders"]) == 6  # 3 decoders x 2 latents
    assert len(r["rows"]) == 2 * 2 * 3  # steps x DiTs x decoders
    step = {d["encoder"]: d["step_s"] for d in r["dits"]}
    for row in r["rows"]:
        dec = next(d for d in r["decoders"] if d["label"] == row["decoder"] and d["encoder"] == row["encoder"])
        assert row["total_s"] == pytest.approx(row["dit_steps"] * step[row["encoder"]] + dec["decode_s"])
    one = {(x["reading"], x["fast"], x["slow"], x["dit_steps"]): x["speedup"] for x in r["speedups"]}
    rows = {(x["pipeline"], x["decoder"], x["dit_steps"]): x["total_s"] for x in r["rows"]}
    key = (1, "f8c4:DiT-S/2 + SSDD-XS 1-step", "f8c4:DiT-S/2 + SSDD-XS 2-step", 10)
    two_step, one_step = rows["f8c4:DiT-S/2", "SSDD-XS 2-step", 10], rows["f8c4:DiT-S/2", "SSDD-XS 1-step", 10]
    assert one[key] == pytest.approx(two_step / one_step)
    assert (2, "f16c16:DiT-S/2 + SSDD-XS 1-step", "f8c4:DiT-S/2 + KL-VAE (SD-VAE size)", 2) in one
    assert not [k for k in one if k[0] == 2 and k[1].startswith("f8c4")]  # reading 2 compares other pipelines
    md = open(out + ".md").read()
    assert "computed, not timed end to end" in md and "3.8x" in md and os.path.exists(out + ".png")
    assert sampling_speed.main(["--dits", "f8c4", "--out", out]) == 2

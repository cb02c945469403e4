"""eval/decoder_benchmark.py end to end on a tiny CPU configuration."""

import json
import os
import subprocess
import sys

import pytest

import eval.decoder_benchmark as bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "eval", "decoder_benchmark.py")


@pytest.mark.slow
def test_benchmark_end_to_end(tmp_path):
    quality = {"im_size": 32, "encoder": "f8c4", "rows": [
        {"name": "KL-VAE", "decoder": "kl", "kl_base_channels": 32, "steps": 1, "psnr": 20.0, "fd_classifier": 3.0},
        {"name": "SSDD-XS 8-step teacher", "decoder": "XS", "steps": 8, "psnr": 22.0, "fd_classifier": 1.0},
        {"name": "SSDD-XS 1-step distilled", "decoder": "XS", "steps": 1, "psnr": 21.5, "fd_classifier": 1.4},
    ]}
    qpath = tmp_path / "quality.json"
    qpath.write_text(json.dumps(quality))
    out = str(tmp_path / "bench")
    cmd = [sys.executable, SCRIPT, "--decoders", "kl", "XS", "--steps", "1", "2", "--sizes", "32",
           "--batch-sizes", "1", "2", "--kl-base-channels", "32", "--warmup", "1", "--repeats", "2",
           "--device", "cpu", "--quality", str(qpath), "--out", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]

    report = json.loads(open(out + ".json").read())
    assert report["machine"]["cpu"] and report["machine"]["torch"]
    assert report["settings"]["dtype"] == "fp32" and "random weights" in report["note"]
    rows = report["rows"]
    # kl x 2 batches; XS x (1, 2 steps from the CLI + 8 steps from the quality file) x 2 batches.
    assert len(rows) == 2 + 3 * 2
    assert all(r["status"] == "ok" for r in rows)
    assert {(r["decoder"], r["steps"]) for r in rows} == {("kl", 1), ("XS", 1), ("XS", 2), ("XS", 8)}
    for r in rows:
        assert r["images_per_s"] > 0 and r["ms_per_image"] > 0 and len(r["times_s"]) == 2 and r["spread"] >= 1
        assert r["peak_mb"] is None or r["peak_mb"] >= 0
    # More steps cost more: the 8-step decode is slower than the 1-step one at the same batch.
    by = {(r["decoder"], r["steps"], r["batch"]): r for r in rows}
    assert by[("XS", 8, 2)]["images_per_s"] < by[("XS", 1, 2)]["images_per_s"]

    md = open(out + ".md").read()
    assert "| decoder | steps | px | batch | images/s | ms/image | peak MB | resident MB |" in md
    assert "| KL-VAE (base 32) | 1 | 32 | 2 |" in md and "| SSDD-XS | 2 | 32 | 1 |" in md
    for b in (1, 2):
        assert f"- SSDD-XS, 32 px, batch {b}: 1-step throughput = " in md
    assert "x KL-VAE (base 32); 1-step = " in md and "x 2-step" in md

    png = out + "_quality_vs_speed.png"
    assert os.path.getsize(png) > 1000
    assert [p["name"] for p in report["quality"]["points"]] == [r["name"] for r in quality["rows"]]
    assert all(p["batch"] == 2 for p in report["quality"]["points"])


def test_unknown_decoder_is_a_one_line_error(tmp_path, capsys):
    assert bench.main(["--decoders", "kl", "XXL", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "unknown decoder 'XXL'" in err and "XS, S, B, M, L, XL, H" in err
    assert not os.path.exists(tmp_path / "b.json")


def test_bad_quality_file_is_a_one_line_error(tmp_path, capsys):
    q = tmp_path / "q.json"
    q.write_text(json.dumps({"im_size": 32, "rows": [{"name": "a", "decoder": "kl", "psnr": 20.0}]}))
    argv = ["--decoders", "kl", "--sizes", "32", "--batch-sizes", "1", "--kl-base-channels", "32", "--device", "cpu",
            "--quality", str(q), "--out", str(tmp_path / "b")]
    assert bench.main(argv) == 2  # default metric fd_classifier is missing from every row
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "fd_classifier" in err


def test_time_budget_skips_and_records(tmp_path):
    out = str(tmp_path / "b")
    argv = ["--decoders", "kl", "--sizes", "32", "--batch-sizes", "1", "4", "--kl-base-channels", "32",
            "--warmup", "1", "--repeats", "2", "--device", "cpu", "--max-seconds-per-config", "1e-6", "--out", out]
    assert bench.main(argv) == 0
    rows = json.load(open(out + ".json"))["rows"]
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    assert all(r["reason"].startswith("time budget") for r in rows)
    assert "Skipped:" in open(out + ".md").read()


@pytest.mark.slow
def test_cost_growth_dense_vs_local(tmp_path, one_thread):
    out = str(tmp_path / "g")
    argv = ["--decoders", "XS", "--steps", "1", "--sizes", "32", "136", "--batch-sizes", "1", "--attention", "dense",
            "local", "--warmup", "1", "--repeats", "1", "--device", "cpu", "--max-seconds-per-config", "1e9",
            "--out", out]
    assert bench.main(argv) == 0
    report = json.load(open(out + ".json"))
    rows = {(r["attention"], r["px"]): r for r in report["rows"]}
    assert set(rows) == {("dense", 32), ("local", 32), ("dense", 136), ("local", 136)}
    assert all(r["status"] == "ok" and r["attention_path"] == r["attention"] for r in rows.values()), rows
    assert rows[("dense", 136)]["peak_mb"] is None or rows[("dense", 136)]["peak_mb"] > 0
    for r in rows.values():  # the resident peak holds the decode's peak and what was held before it
        assert r["peak_mb"] is None or r["resident_peak_mb"] >= r["peak_mb"] > 0
    growth = report["growth"]
    assert any(line.startswith("- SSDD-XS, 1 step(s), 136 px, batch 1: dense time / local time = ") for line in growth)
    assert any(line.startswith("- SSDD-XS (local), 1 step(s), batch 1, 32 -> 136 px") for line in growth)
    md = open(out + ".md").read()
    assert "| SSDD-XS (dense) | 1 | 136 | 1 |" in md and "Cost growth with image size" in md
    assert os.path.getsize(out + "_cost_growth.png") > 1000


def test_attention_that_would_not_fit_is_skipped_before_running(tmp_path, one_thread):
    out = str(tmp_path / "m")
    argv = ["--decoders", "kl", "XS", "--steps", "1", "--sizes", "32", "--batch-sizes", "1", "--kl-base-channels", "32",
            "--attention", "dense", "--warmup", "1", "--repeats", "1", "--device", "cpu", "--max-memory-gb", "1e-9",
            "--out", out]
    assert bench.main(argv) == 0
    rows = json.load(open(out + ".json"))["rows"]
    kl, xs = rows
    assert kl["status"] == "ok"  # the KL-VAE has no attention of this kind
    assert xs["status"] == "skipped" and xs["reason"].startswith("memory: dense attention over 16 tokens needs")

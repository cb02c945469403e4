"""eval/gpu_first_run.py: the first GPU's one command, run on a CPU at toy sizes; its budget guard, error handling
and compile log."""

import json
import os
import subprocess
import sys

import pytest
import torch

import eval.gpu_first_run as first_run
from eval.lib.compile_log import CompileLog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "eval", "gpu_first_run.py")


@pytest.mark.slow
def test_tiny_run_fills_every_row(tmp_path):
    """The whole script (every section, compiled paths included) at toy sizes, in a fresh process as a user runs it.
    The eager backend keeps Dynamo's capture, guards and recompiles, without AOTAutograd's tracing time."""
    out = str(tmp_path / "first")
    cmd = [sys.executable, SCRIPT, "--tiny", "--device", "cpu", "--threads", "1", "--compile-backend", "eager",
           "--total-budget", "3000", "--budget", "decoders=1500", "dit_train=500", "pipeline=500",
           "tokenizer_train=500", "--out", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.load(open(out + ".json"))
    assert r["finished"] and r["tiny"] and r["dtype"] == "bf16" and r["compile_backend"] == "eager"
    s = r["sections"]
    assert list(s) == first_run.SECTIONS
    assert {name: sec["status"] for name, sec in s.items()} == dict.fromkeys(first_run.SECTIONS, "ok")
    assert set(s["peaks"]["measured"]) == {"bf16", "fp32"} and s["peaks"]["datasheet_bf16_tflops"] is None

    rows = {(x["decoder"], x["px"], x["compiled"]): x for x in s["decoders"]["rows"]}
    assert set(rows) == {(d, px, c) for d in ("XS", "kl") for px in (32, 64) for c in (False, True)}
    for x in rows.values():
        assert x["images_per_s"] > 0 and len(x["times_s"]) == 2 and x["recompiles_while_timed"] == 0
    # static shapes: the compiled decoders compile at 32 px and recompile once they meet 64 px, never while timed
    assert rows[("XS", 32, True)]["warmup_graphs"] > 0 and rows[("kl", 64, True)]["warmup_recompiles"] >= 1
    assert s["decoders"]["compile"]["recompiles"] == len(s["decoders"]["compile"]["reasons"]) >= 2
    assert len(s["decoders"]["ratios"]) == 4

    dit = s["dit_train"]
    assert dit["steps_per_s"] > 0 and dit["images_per_s"] == pytest.approx(2 * dit["steps_per_s"])
    assert dit["flops_from"] == "counter" and dit["mfu_datasheet"] is None and 0 < dit["mfu_measured_peak"]
    # the counter (attention backward counted as torch does) and 3 x the analytic forward agree closely
    assert dit["counted_tflop_per_step"] == pytest.approx(dit["analytic_tflop_per_step"], rel=0.05)
    assert dit["recompiles_while_timed"] == 0 and s["dit_train"]["compile"]["graphs"] >= 1

    pipe = s["pipeline"]
    assert {x["pipeline"] for x in pipe["rows"]} == {"DiT only", "DiT + SSDD-XS 1-step", "DiT + KL-VAE (base 32)"}
    assert pipe["ssdd_vs_kl_speedup"] > 0 and all(x["dit_steps"] == 2 for x in pipe["rows"])
    tok = s["tokenizer_train"]  # after the pipeline's inference-mode decodes in the same process
    assert tok["steps_per_s"] > 0 and tok["counted_tflop_per_step"] > 0 and tok["info"]["decoder"] == "XS"

    md = open(out + ".md").read()
    assert "| what | result |" in md and "tiny (a smoke run, not figures)" in md
    assert "python eval/gpu_first_run.py --tiny --device cpu" in md
    assert "| decoders 1-step vs KL-VAE, bf16, torch.compile | SSDD-XS 1-step 32 px:" in md
    assert "DiT-Ti/2 training, batch 2, bf16 + compile" in md and "recompile: " in md


def test_budget_guard_skips_with_a_note(tmp_path, one_thread):
    out = str(tmp_path / "b")
    argv = ["--tiny", "--device", "cpu", "--sections", "peaks", "decoders", "dit_train", "--budget", "decoders=0",
            "--budget", "dit_train=0", "--out", out]
    assert first_run.main(argv) == 0
    r = json.load(open(out + ".json"))
    assert r["finished"] and r["sections"]["peaks"]["status"] == "ok"
    for name in ("decoders", "dit_train"):
        sec = r["sections"][name]
        assert sec["status"] == "partial" and sec["errors"] == []
        assert sec["notes"] == [f"skipped the whole {name} section: 0 s left of the section's time budget"]
    assert "not measured (see the section's notes)" in open(out + ".md").read()


def test_a_failing_item_is_reported_and_the_run_goes_on(tmp_path, monkeypatch, capsys, one_thread):
    def broken(ctx):
        raise RuntimeError("compiler exploded\nsecond line")

    monkeypatch.setitem(first_run.SECTION_FUNCTIONS, "dit_train", broken)
    out = str(tmp_path / "f")
    argv = ["--tiny", "--device", "cpu", "--sections", "dit_train", "peaks", "--out", out]
    assert first_run.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: 1 item(s) failed") and "compiler exploded" in err
    r = json.load(open(out + ".json"))
    assert r["sections"]["dit_train"]["status"] == "error"
    assert r["sections"]["dit_train"]["errors"] == ["dit_train: RuntimeError: compiler exploded / second line"]
    assert r["sections"]["peaks"]["status"] == "ok" and r["finished"]  # the next section still ran


@pytest.mark.parametrize("argv, message", [
    (["--sections", "warp"], "unknown section 'warp'"),
    (["--budget", "decoders"], "--budget takes NAME=SECONDS"),
    (["--budget", "decoders=soon"], "is not a number of seconds"),
    (["--dit-batch", "0"], "--dit-batch must be >= 1"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    assert first_run.main([*argv, "--device", "cpu", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and message in err
    assert not os.path.exists(tmp_path / "x.json")


def test_compile_log_counts_recompiles_with_reasons():
    log = CompileLog()
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    mark = log.mark()
    fn(torch.ones(2))
    fn(torch.ones(2))
    fn(torch.ones(3))  # a new static shape: one recompile
    seen = log.since(mark)
    assert seen["recompiles"] == 1 and seen["graphs"] == 2
    assert "size mismatch" in seen["reasons"][0] and "\n" not in seen["reasons"][0]
    assert log.since(log.mark())["recompiles"] == 0
    log.close()

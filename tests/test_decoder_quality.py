"""eval/decoder_quality.py end to end on tiny stand-in decoders: one table row per entry, offline Fréchet distance."""

import json

import pytest
import torch

from eval.decoder_quality import main
from tokenizer import SSDD
from tokenizer.common.checkpoint import save_weights


def stand_in(path, **kw):
    torch.manual_seed(0)
    model = SSDD(encoder="f8c4", encoder_base_channels=32, **kw)
    save_weights(model, str(path), model.architecture())
    return str(path)


@pytest.mark.slow
def test_quality_table_end_to_end(tmp_path, capsys):
    ssdd = stand_in(tmp_path / "ssdd.safetensors", decoder="XS")
    kl = stand_in(tmp_path / "kl.safetensors", decoder="kl", kl_base_channels=32)
    out = tmp_path / "q"
    argv = ["--out", str(out), "--limit", "24", "--entry", f"KL={kl}:1", "--entry", f"SSDD 2-step={ssdd}:2",
            "--entry", f"SSDD 1-step={ssdd}:1", "config=configs/fmnist.yaml", "eval.batch_size=8",
            "eval.lpips=false", "eval.fid=false"]
    assert main(argv) == 0
    result = json.load(open(f"{out}.json"))
    assert result["im_size"] == 32 and result["encoder"] == "f8c4" and result["n_images"] == 24
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"KL", "SSDD 2-step", "SSDD 1-step"}
    assert rows["KL"]["decoder"] == "kl" and rows["KL"]["kl_base_channels"] == 32
    for r in rows.values():
        assert r["fd_classifier"] > 0 and 0 < r["psnr"] < 60
    # different step counts decode differently, hence different scores
    assert rows["SSDD 2-step"]["psnr"] != rows["SSDD 1-step"]["psnr"]
    table = open(f"{out}.md").read()
    assert "FD (classifier)" in table and "| KL | 1 |" in table
    assert (tmp_path / "q.png").stat().st_size > 0


def test_bad_entry_is_a_one_line_error(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "q"), "--entry", "no-steps-here", "config=configs/fmnist.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert "name=checkpoint:steps" in err and "\n" not in err


@pytest.mark.slow
def test_append_adds_rows_and_refuses_another_split(tmp_path):
    ssdd = stand_in(tmp_path / "ssdd.safetensors", decoder="XS")
    out = str(tmp_path / "q")
    common = ["--out", out, "--limit", "16", "config=configs/fmnist.yaml", "eval.batch_size=8"]
    assert main(["--entry", f"A={ssdd}:1", *common]) == 0
    assert main(["--append", "--entry", f"B={ssdd}:2", *common]) == 0
    assert [r["name"] for r in json.load(open(f"{out}.json"))["rows"]] == ["A", "B"]
    assert main(["--append", "--entry", f"C={ssdd}:1", *common[:2], "--limit", "8", *common[4:]]) == 2

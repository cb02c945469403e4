"""sample/reconstruct.py: a bundled 256-px photo through a (random, small) tokenizer, and its error paths."""


import pytest
import torch
from PIL import Image

from sample import reconstruct
from tokenizer import SSDD
from tokenizer.common.checkpoint import save_weights


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = SSDD(encoder="f8c4", decoder="XS", encoder_base_channels=32)
    path = str(tmp_path_factory.mktemp("ck") / "tiny.safetensors")
    save_weights(model, path, model.architecture())
    return path


@pytest.mark.slow
def test_bundled_photo_at_256(ckpt, tmp_path, capsys):
    out = str(tmp_path / "rec.png")
    assert reconstruct.main(["--ckpt", ckpt, "--image", "chelsea", "--steps", "1", "2", "--out", out]) == 0
    assert Image.open(out).size == (3 * 256, 256)  # input, 1-step, 2-step side by side
    printed = capsys.readouterr().out
    assert "latent (1, 4, 32, 32)" in printed and "decode 2 step(s)" in printed


def test_user_file_is_resized_and_cropped(ckpt, tmp_path):
    src = tmp_path / "wide.png"
    Image.new("RGB", (120, 80), (200, 10, 10)).save(src)
    x = reconstruct.load_image(str(src), 64)
    assert x.shape == (1, 3, 64, 64) and x.min() >= -1 and x.max() <= 1


def test_errors(ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\x00" * 50)
    assert reconstruct.main(["--ckpt", ckpt, "--image", str(bad), "--out", str(tmp_path / "o.png")]) == 2
    assert "bad.jpg" in capsys.readouterr().err
    assert reconstruct.main(["--ckpt", ckpt, "--size", "100", "--out", str(tmp_path / "o.png")]) == 2
    assert "multiple of 8" in capsys.readouterr().err
    assert reconstruct.main(["--ckpt", str(tmp_path / "none.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err

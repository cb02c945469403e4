"""The KL-VAE baseline inside the SSDD framework (`ssdd.decoder=kl`): same API, same trainer, optional PatchGAN."""

import pytest
import torch
from helpers import TINY, losses

from tokenizer import SSDD, UserError
from tokenizer.common.checkpoint import save_weights
from tokenizer.train import main

KL = [*TINY, "ssdd.decoder=kl", "ssdd.kl_base_channels=32", "training.optimizer=adamw", "training.lr=1e-3"]


def test_kl_model_round_trips_and_ignores_steps(tmp_path):
    torch.manual_seed(0)
    model = SSDD(encoder="f8c4", decoder="kl", encoder_base_channels=32, kl_base_channels=32).eval()
    path = str(tmp_path / "kl.safetensors")
    save_weights(model, path, model.architecture())
    again = SSDD.from_checkpoint(path).eval()
    assert again.is_kl and again.kl_base_channels == 32
    z = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        out = again.decode(z, steps=8)
        assert out.shape == (2, 3, 32, 32)
        torch.testing.assert_close(out, model.decode(z, steps=1))  # deterministic, one pass, no noise


@pytest.mark.slow
def test_kl_training_with_gan_resumes_exactly(tmp_path):
    common = [*KL, f"ckpt_dir={tmp_path}", "training.max_steps=6", "training.ckpt_every=3",
              "losses.gan=0.5", "training.gan_start_step=2"]
    assert main([*common, "run_name=straight"]) == 0
    reference = losses(tmp_path / "jobs" / "straight")
    assert len(reference) == 6
    last = tmp_path / "jobs" / "straight" / "checkpoints" / "last"
    for name in ("model_discriminator", "optimizer_ae", "optimizer_discriminator"):
        assert (last / f"{name}.safetensors").exists(), name

    assert main([*common, "run_name=resumed", "training.max_steps=3"]) == 0
    assert main([*common, "run_name=resumed"]) == 0
    assert losses(tmp_path / "jobs" / "resumed") == reference


@pytest.mark.slow
def test_kl_baseline_loss_falls(tmp_path):
    assert main([*KL, f"ckpt_dir={tmp_path}", "run_name=fall", "training.max_steps=40"]) == 0
    values = list(losses(tmp_path / "jobs" / "fall").values())
    assert sum(values[-5:]) / 5 < 0.6 * sum(values[:5]) / 5, values


@pytest.mark.parametrize("extra, message", [
    (["losses.repa=0.25"], "set losses.repa=0 for ssdd.decoder=kl"),
    (["distill_teacher=true", "ssdd.checkpoint=whatever"], "has one step already"),
])
def test_kl_misuse_is_a_one_line_error(tmp_path, capsys, extra, message):
    if "distill_teacher=true" in extra:  # the teacher file must exist for the check to reach the decoder kind
        torch.manual_seed(0)
        path = tmp_path / "t.safetensors"
        m = SSDD(encoder="f8c4", decoder="kl", encoder_base_channels=32, kl_base_channels=32)
        save_weights(m, str(path), m.architecture())
        extra = ["distill_teacher=true", f"ssdd.checkpoint={path}"]
    assert main([*KL, f"ckpt_dir={tmp_path}", "run_name=x", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_gan_needs_the_kl_decoder(tmp_path, capsys):
    assert main([*TINY, f"ckpt_dir={tmp_path}", "run_name=x", "losses.gan=0.5"]) == 2
    assert "needs ssdd.decoder=kl" in capsys.readouterr().err


def test_unknown_kl_width_is_a_user_error():
    with pytest.raises(UserError, match="multiple of 32"):
        SSDD(encoder="f8c4", decoder="kl", kl_base_channels=48)

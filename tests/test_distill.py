"""Single-step distillation (docs/ARCHITECTURE.md §6): the student learns the teacher's noise -> x_T map, and a
distilled checkpoint records that it is a one-step decoder."""

import copy
import os

import pytest
import torch
from helpers import TINY

from tokenizer import SSDD
from tokenizer.common.checkpoint import read_weights, save_weights
from tokenizer.data import FashionMNIST
from tokenizer.train import distillation_targets, main


def perturbed_teacher(seed=0):
    """A tiny SSDD whose decoder does something non-trivial (its zero-initialised output layers would make the
    teacher's sample equal to its noise), standing in for a trained multi-step model."""
    torch.manual_seed(seed)
    model = SSDD(encoder="f8c4", decoder="XS", encoder_base_channels=32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval().requires_grad_(False)


def fixed_batch(n=8):
    data = FashionMNIST("test", limit=n)
    return torch.stack([data[i][0] for i in range(n)])


@pytest.mark.slow
def test_distillation_step_moves_student_towards_teacher():
    teacher, x = perturbed_teacher(), fixed_batch()
    z, noise, x_teacher = distillation_targets(teacher, x, steps=7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, teacher.encode(x).mode())
    torch.testing.assert_close(x_teacher, teacher.decode(z, steps=7, noise=noise))

    student = copy.deepcopy(teacher).train().requires_grad_(True)
    student.encoder.requires_grad_(False)

    def gap():  # how far the student's one-step decode is from the teacher's 7-step sample
        with torch.no_grad():
            return (student.eval().decode(z, steps=1, noise=noise) - x_teacher).pow(2).mean().item()

    before = gap()
    assert before > 1e-3, "teacher's 1- and 7-step decodes should differ before distillation"
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(30):
        out = student.train()(x, z=z, noise=noise, from_noise=True, target=x_teacher)
        assert torch.all(out.t == 1) and torch.equal(out.x0_gt, x_teacher)
        # at t = 1 the one-step estimate noise + v is exactly the student's 1-step decode
        torch.testing.assert_close(out.losses["diffusion"], (out.x0_pred - x_teacher).pow(2).mean())
        opt.zero_grad()
        out.losses["diffusion"].backward()
        opt.step()
    after = gap()
    assert after < 0.5 * before, (before, after)


@pytest.mark.slow
def test_distilled_checkpoint_is_single_step_and_teacher_untouched(tmp_path):
    teacher_path = str(tmp_path / "teacher.safetensors")
    teacher = perturbed_teacher()
    save_weights(teacher, teacher_path, teacher.architecture())
    before = os.path.getmtime(teacher_path), read_weights(teacher_path)[0]
    args = [*TINY, f"ckpt_dir={tmp_path}", "run_name=student", "distill_teacher=true",
            f"ssdd.checkpoint={teacher_path}", "ssdd.fm_sampler.steps=3", "training.max_steps=6",
            "training.optimizer=adamw", "training.lr=1e-3"]
    assert main(args) == 0

    last = tmp_path / "jobs" / "student" / "checkpoints" / "last"
    assert read_weights(str(last / "model_ae_ema.safetensors"))[1]["single_step"] == "1"
    student = SSDD.from_checkpoint(str(last / "model_ae_ema.safetensors")).eval()
    assert student.single_step
    x = fixed_batch(2)
    z, noise = student.encode(x).mode(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        default = student.decode(z, noise=noise)
        torch.testing.assert_close(default, student.decode(z, steps=1, noise=noise))
        assert not torch.allclose(default, student.decode(z, steps=3, noise=noise))
    # the student moved away from the teacher; the teacher file was only read
    trained = read_weights(str(last / "model_ae.safetensors"))[0]
    assert any(not torch.equal(trained[k], before[1][k]) for k in trained if k.startswith("decoder."))
    assert os.path.getmtime(teacher_path) == before[0]


def test_distillation_without_teacher_is_a_one_line_error(tmp_path, capsys):
    assert main([*TINY, f"ckpt_dir={tmp_path}", "run_name=x", "distill_teacher=true", "ssdd.checkpoint=null"]) == 2
    err = capsys.readouterr().err.strip()
    assert "distill_teacher=true needs ssdd.checkpoint" in err and "\n" not in err

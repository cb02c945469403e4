"""LPIPS / REPA / KL losses and reconstruction metrics, offline, with randomly initialised networks."""

import math
import warnings
from unittest import mock

import numpy as np
import pytest
import torch

from tokenizer.common.errors import WeightsUnavailableError
from tokenizer.losses import DinoV2Teacher, LPIPSLoss, REPALoss
from tokenizer.metrics import ReconstructionMetrics, pad_to_pow2, quantize


def _images(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _from_levels(levels):
    return levels.double() / 127.5 - 1


@pytest.fixture(scope="module")
def lpips_alex_file(tmp_path_factory):
    """A full random lpips.LPIPS(net='alex') state dict, plus the network it came from."""
    import lpips

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation warnings from inside lpips
        net = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    path = tmp_path_factory.mktemp("lpips") / "lpips_alex_random.pth"
    torch.save(net.state_dict(), path)
    return path, net


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return DinoV2Teacher(pretrained=False)


# ----------------------------------------------------------------------------------------------------- LPIPS loss
def test_lpips_random_backbone_values_grad_and_no_state():
    import lpips

    torch.manual_seed(0)
    loss = LPIPSLoss("vgg", pretrained=False)
    x, y = _images(2, 32, 1), _images(2, 32, 2).requires_grad_(True)
    assert loss(x, x).item() == 0
    d = loss(x, y)
    assert d.dim() == 0 and d.item() > 0
    d.backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    # same value as lpips' own forward (which only differs by the normalisation eps)
    with torch.no_grad():
        ref = lpips.LPIPS.forward(loss.lpips, x, y).flatten()
    torch.testing.assert_close(loss.per_image(x, y.detach()), ref, rtol=1e-4, atol=1e-6)
    # frozen network out of the state dict / parameters, but moved by .to()
    assert loss.state_dict() == {} and list(loss.parameters()) == []
    loss.train()
    assert not loss.lpips.training
    loss.double()
    assert next(loss.lpips.parameters()).dtype == torch.float64


def test_lpips_pretrained_missing_weights_is_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailableError) as info:
        LPIPSLoss("vgg", pretrained=True)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth") in msg and "losses.lpips=0" in msg


def test_lpips_weights_path_roundtrip_and_bad_files(lpips_alex_file, tmp_path):
    path, original = lpips_alex_file
    loss = LPIPSLoss("alex", weights_path=path)
    x, y = _images(3, 64, 3), _images(3, 64, 4)
    with torch.no_grad():
        torch.testing.assert_close(loss.per_image(x, y), original(x, y).flatten(), rtol=1e-5, atol=1e-7)
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    for p in (bad, tmp_path / "missing.pth"):
        with pytest.raises(WeightsUnavailableError, match=str(p)):
            LPIPSLoss("alex", weights_path=p)


@pytest.mark.slow
def test_lpips_finds_preseeded_torch_hub_cache(monkeypatch, tmp_path):
    """The real pretrained path, with the torchvision file placed in $TORCH_HOME/hub/checkpoints beforehand."""
    import torchvision

    torch.manual_seed(0)
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    alex = torchvision.models.alexnet()
    torch.save(alex.state_dict(), ckpt / "alexnet-owt-7be5be79.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    loss = LPIPSLoss("alex", pretrained=True)
    torch.testing.assert_close(loss.lpips.net.slice1[0].weight, alex.features[0].weight)


# ----------------------------------------------------------------------------------------------------------- REPA
@pytest.mark.parametrize("grid", [(4, 4), (8, 8)])
def test_repa_random_teacher(teacher, grid):
    torch.manual_seed(0)
    gh, gw = grid
    repa = REPALoss(32, teacher=teacher)
    images = _images(2, 8 * gh, 5)
    with mock.patch.object(teacher.model, "forward_features", wraps=teacher.model.forward_features) as spy:
        feats = teacher.features(images, grid)
    assert spy.call_args.args[0].shape[-2:] == (14 * gh, 14 * gw)
    assert feats.shape == (2, gh * gw, 768)

    student = torch.randn(2, gh * gw, 32, requires_grad=True)
    loss = repa(student, images, grid)
    assert torch.isfinite(loss) and 0 <= loss.item() <= 2
    loss.backward()
    assert student.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in repa.projector.parameters())
    assert set(repa.state_dict()) == {"projector.0.weight", "projector.0.bias", "projector.2.weight",
                                      "projector.2.bias"}
    assert not any(p.requires_grad for p in teacher.parameters())
    repa.train()
    assert not teacher.training
    with pytest.raises(ValueError):
        repa(student[:, :-1], images, grid)


def test_repa_teacher_non_square_grid_and_moves_with_module(teacher):
    assert teacher.features(torch.rand(1, 3, 32, 48) * 2 - 1, (4, 6)).shape == (1, 24, 768)
    repa = REPALoss(16, teacher=teacher)
    try:
        repa.double()
        assert teacher.model.pos_embed.dtype == torch.float64
    finally:
        repa.float()


def test_dino_pretrained_offline_fails_fast(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsUnavailableError) as info:
        DinoV2Teacher(pretrained=True)
    msg = str(info.value)
    assert "\n" not in msg and "losses.repa=0" in msg and "aux_losses.repa.dino_weights" in msg


@pytest.mark.slow
def test_dino_weights_path(teacher, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.model.state_dict().items()}, str(path))
    loaded = DinoV2Teacher(weights_path=path)
    x = _images(1, 32, 7)
    torch.testing.assert_close(loaded.features(x, (4, 4)), teacher.features(x, (4, 4)))
    with pytest.raises(WeightsUnavailableError, match="nope"):
        DinoV2Teacher(weights_path=tmp_path / "nope.safetensors")


# -------------------------------------------------------------------------------------------------------- metrics
def test_quantize_and_padding():
    q = quantize(torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]))
    torch.testing.assert_close(q * 255, (q * 255).round())
    assert q.min() == 0 and q.max() == 1
    for size, want in ((28, 64), (64, 64), (100, 128), (16, 64), (256, 256)):
        assert pad_to_pow2(torch.zeros(1, 3, size, size)).shape[-2:] == (want, want)
    assert pad_to_pow2(torch.zeros(1, 3, 28, 100)).shape[-2:] == (64, 128)


def test_psnr_known_mse_identical_and_ssim():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(10, 246, (4, 3, 16, 16), generator=g)
    delta = 3 * (torch.randint(0, 2, a.shape, generator=g) * 2 - 1)
    m = ReconstructionMetrics(lpips=False, fid=False)
    m.update(_from_levels(a), _from_levels(a + delta))
    r = m.compute()
    mse = 9 / 255**2
    assert r["n_images"] == 4
    assert abs(r["psnr"] - 10 * math.log10(1 / mse)) < 1e-6
    assert abs(r["mse"] - mse) < 1e-12 and abs(r["mae"] - 3 / 255) < 1e-12
    assert r["lpips"] is None and r["rfid"] is None

    same = ReconstructionMetrics(lpips=False, fid=False)
    same.update(_from_levels(a), _from_levels(a) + 1e-4)  # below half a level: identical after quantisation
    r = same.compute()
    assert r["psnr"] == math.inf and r["mse"] == 0 and r["ssim"] == pytest.approx(1.0, abs=1e-12)


def test_psnr_is_global_not_mean_of_images():
    a = torch.full((2, 3, 16, 16), 100)
    b = a.clone()
    b[0] += 1
    b[1] += 20
    m = ReconstructionMetrics(lpips=False, fid=False)
    m.update(_from_levels(a), _from_levels(b))
    psnr = m.compute()["psnr"]
    global_psnr = 10 * math.log10(255**2 / ((1 + 400) / 2))
    mean_psnr = np.mean([10 * math.log10(255**2 / e) for e in (1, 400)])
    assert abs(psnr - global_psnr) < 1e-9 and abs(psnr - mean_psnr) > 1


def test_sum_reduction_matches_single_process():
    x, y = _images(5, 16, 8), _images(5, 16, 9)
    parts = [ReconstructionMetrics(lpips=False, fid=False) for _ in range(2)]
    parts[0].update(x[:3], y[:3])
    parts[1].update(x[3:], y[3:])
    other = iter(list(parts[1].state.values()))
    parts[0].all_reduce(lambda t: t + next(other))
    whole = ReconstructionMetrics(lpips=False, fid=False)
    whole.update(x, y)
    got, want = parts[0].compute(), whole.compute()
    for k in ("n_images", "psnr", "ssim", "mse", "mae"):
        assert got[k] == pytest.approx(want[k], rel=1e-12)
    with pytest.raises(RuntimeError):
        parts[0].update(x, y)


def test_lpips_metric_on_small_images(lpips_alex_file):
    path, _ = lpips_alex_file
    m = ReconstructionMetrics(lpips=True, lpips_weights_path=path, fid=False)
    x = _images(2, 28, 10)
    m.update(x, x)
    assert m.compute()["lpips"] == 0
    m.update(x, _images(2, 28, 11))
    r = m.compute()
    assert r["lpips"] > 0 and r["notes"] == []


def test_missing_weights_give_none_and_notes(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    m = ReconstructionMetrics(lpips=True, fid=True)
    m.update(_images(2, 16, 12), _images(2, 16, 13))
    r = m.compute()
    assert r["lpips"] is None and r["rfid"] is None and math.isfinite(r["psnr"])
    assert len(r["notes"]) == 2 and all("\n" not in n for n in r["notes"])
    assert any("weights-inception-2015-12-05-6726825d.pth" in n for n in r["notes"])
    assert any("alexnet-owt-7be5be79.pth" in n for n in r["notes"])


def test_fid_gaussian_matches_numpy_cov():
    f = torch.randn(10, 2048, dtype=torch.float64) * 3 + 1
    stats = ReconstructionMetrics._gaussian(f.sum(0), f.T @ f, 10)
    np.testing.assert_allclose(stats["mu"], f.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(stats["sigma"], np.cov(f.numpy(), rowvar=False), atol=1e-10)


@pytest.mark.slow
def test_rfid_random_inception(inception_file):
    """Same distribution → small rFID, shifted → clearly larger. Few images: Inception runs ~3-10 img/s here."""
    g = torch.Generator().manual_seed(0)

    def sample(n, shift=0.0):
        base = torch.rand(n, 3, 1, 1, generator=g) * 0.3 - 0.15 + shift
        return (base + 0.3 * torch.randn(n, 3, 16, 16, generator=g)).clamp(-1, 1)

    n = 10  # gives ~0.3 vs ~300 (seeds 0-2)
    x, y, z = sample(n), sample(n), sample(n, 0.5)
    same = ReconstructionMetrics(lpips=False, fid=True, inception_weights_path=inception_file)
    same.update(x[:5], y[:5])
    same.update(x[5:], y[5:])
    shifted = ReconstructionMetrics(lpips=False, fid=True, inception_weights_path=inception_file)
    shifted.update(x, z)
    r_same, r_shift = same.compute(), shifted.compute()
    assert r_same["notes"] == [] and 0 <= r_same["rfid"] < 1
    assert r_shift["rfid"] > 20 * max(r_same["rfid"], 0.05)

    one = ReconstructionMetrics(lpips=False, fid=True, inception_weights_path=inception_file)
    one.update(x[:1], y[:1])
    r = one.compute()
    assert r["rfid"] is None and any("at least 2" in n for n in r["notes"])

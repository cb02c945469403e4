"""The bundled Fashion-MNIST classifier (eval/lib/fmnist_classifier.py) and its offline Fréchet distance.

Everything runs on the committed test subset (tokenizer/assets/fmnist_subset.npz: 1,000 test images, 100 per class,
never seen in training), loaded explicitly so the numbers are the same with or without the Debian package.
"""

import numpy as np
import pytest
import torch

from eval.lib.fmnist_classifier import (
    DEFAULT_WEIGHTS,
    FEATURE_DIM,
    FeatureStats,
    classifier_fd,
    frechet_distance,
    load_classifier,
    predict,
)
from tokenizer.common.errors import UserError
from tokenizer.data import FMNIST_SUBSET_PATH


@pytest.fixture(scope="module")
def model():
    return load_classifier()


@pytest.fixture(scope="module")
def subset():
    """(images (1000, 3, 32, 32) in [-1, 1] as `FashionMNIST` yields them, labels (1000,))."""
    with np.load(FMNIST_SUBSET_PATH) as z:
        images, labels = z["test_images"], z["test_labels"]
    x = torch.from_numpy(images.astype(np.float32)) / 127.5 - 1.0
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0).unsqueeze(1).repeat(1, 3, 1, 1)
    return x, torch.from_numpy(labels.astype(np.int64))


def test_subset_matches_the_data_pipeline(subset):
    from tokenizer.data import FashionMNIST, load_fashion_mnist

    images, _ = load_fashion_mnist("test")
    with np.load(FMNIST_SUBSET_PATH) as z:
        first = z["test_images"][0]
    # The subset is drawn from the official test split; find its first image there and compare the tensors.
    idx = int(np.flatnonzero((images == first).all(axis=(1, 2)))[0])
    assert torch.equal(FashionMNIST("test")[idx][0], subset[0][0])


def test_accuracy_on_the_committed_test_subset(model, subset):
    x, y = subset
    acc = (predict(x, model) == y).float().mean().item()
    assert acc >= 0.88, f"accuracy {acc:.3f}"


def test_rgb_and_single_channel_input_agree(model, subset):
    x = subset[0][:16]
    torch.testing.assert_close(model(x), model(x[:, :1]))
    with pytest.raises(ValueError, match="32, 32"):
        model.features(torch.zeros(2, 3, 28, 28))


def test_features_shape(model, subset):
    f = model.features(subset[0][:8])
    assert f.shape == (8, FEATURE_DIM) and f.dtype == torch.float32 and torch.isfinite(f).all()


def test_feature_stats_streaming_equals_numpy(model, subset):
    x = subset[0][:300]
    with torch.no_grad():
        feats = model.features(x).double().numpy()
    acc = FeatureStats(model)
    for batch in x.split(64):  # ragged last batch on purpose
        acc.update(batch)
    mu, sigma = acc.compute()
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-5, atol=1e-7)


def test_frechet_distance_of_gaussians_matches_closed_form():
    # Diagonal covariances commute, so FD = |mu_a - mu_b|^2 + sum (sqrt(var_a) - sqrt(var_b))^2 exactly.
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200_000, 4)) * np.array([1.0, 2.0, 0.5, 1.0])
    b = rng.standard_normal((200_000, 4)) * np.array([2.0, 1.0, 0.5, 3.0]) + np.array([1.0, 0.0, 0.0, -1.0])
    expected = 2.0 + (1 + 1 + 0 + 4)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.01)


@pytest.mark.slow
def test_frechet_distance_separates_real_from_degraded(model, subset):
    x, y = subset
    # Two disjoint halves with exactly 50 images of each class (the subset has 100 per class).
    order = torch.argsort(y, stable=True)
    half_a, half_b = x[order[0::2]], x[order[1::2]]
    g = torch.Generator().manual_seed(0)
    noised = (half_b + 0.5 * torch.randn(half_b.shape, generator=g)).clamp(-1, 1)
    blurred = torch.nn.functional.avg_pool2d(half_b, 5, stride=1, padding=2, count_include_pad=False)
    fd_real = classifier_fd(half_a, half_b, model)
    fd_noise = classifier_fd(half_a, noised, model)
    fd_blur = classifier_fd(half_a, blurred, model)
    assert fd_noise > 10 * fd_real and fd_blur > 5 * fd_real, (fd_real, fd_noise, fd_blur)
    assert abs(classifier_fd(half_a, half_a, model)) < 1e-6


def test_corrupt_weights_raise_user_error_naming_the_file(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a safetensors header at all")
    with pytest.raises(UserError, match="garbage.safetensors") as e:
        load_classifier(bad)
    assert "\n" not in str(e.value)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(DEFAULT_WEIGHTS.read_bytes()[:5000])
    with pytest.raises(UserError, match="truncated.safetensors"):
        load_classifier(truncated)

    with pytest.raises(UserError, match="missing.safetensors"):
        load_classifier(tmp_path / "missing.safetensors")


def test_weights_of_another_model_raise_user_error(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(other))
    with pytest.raises(UserError, match="other.safetensors"):
        load_classifier(other)


def test_committed_weights_are_small_and_documented():
    from safetensors import safe_open

    assert DEFAULT_WEIGHTS.stat().st_size < 2_000_000
    with safe_open(str(DEFAULT_WEIGHTS), framework="pt") as f:
        meta = f.metadata()
    assert float(meta["test_accuracy"]) >= 0.9 and int(meta["test_images"]) == 10_000, meta

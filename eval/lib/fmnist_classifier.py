"""A small Fashion-MNIST classifier shipped with the project, for offline evaluation.

Inception weights (rFID) cannot be downloaded everywhere, and Inception features of 32-px clothing are a poor fit
anyway. This CNN, trained by `eval/train_fmnist_classifier.py` on the 60k training split and committed as
`eval/assets/fmnist_classifier.safetensors`, gives

* `model.features(x)`: 128-d penultimate features, for a Fréchet distance between real and reconstructed or
  generated images (`FeatureStats`, `feature_stats`, `frechet_distance`, `classifier_fd`);
* `model(x)` / `predict(x)`: logits / labels, to judge the class accuracy of class-conditional samples.

Images are what the data pipeline yields (`tokenizer.data.FashionMNIST`): (B, 3, 32, 32) in [-1, 1], the 28-px
image padded by 2 px of background -1. The channels are averaged first, so generated RGB (or 1-channel) input works.

    from eval.lib.fmnist_classifier import load_classifier, classifier_fd
    model = load_classifier()                  # the committed weights, eval mode, on CPU
    fd = classifier_fd(real, fake, model)      # (N, 3, 32, 32) tensors in [-1, 1]
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tokenizer.common.checkpoint import load_weights
from tokenizer.common.errors import UserError

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "fmnist_classifier.safetensors"  # eval/assets
IM_SIZE = 32
NUM_CLASSES = 10
FEATURE_DIM = 128


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv + BatchNorm + ReLU, then 2x2 max-pool: (B, c_in, H, W) -> (B, c_out, H/2, W/2)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


class FMNISTClassifier(nn.Module):
    """CNN 32/64/128 -> 128-d features -> 10 logits, for (B, C, 32, 32) images in [-1, 1] (C = 1 or 3)."""

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES, dropout: float = 0.3):
        super().__init__()
        self.blocks = nn.Sequential(_conv_block(1, 32), _conv_block(32, 64), _conv_block(64, 128))
        # Flattening the 4x4 map (rather than global pooling) keeps where things are: sleeve vs. no sleeve, heel
        # vs. flat sole. BatchNorm before the ReLU keeps every feature alive, so the feature covariance is well
        # conditioned for the Fréchet distance.
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, feature_dim, bias=False),
                                   nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)  # training only; features() never sees it
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, 32, 32) images in [-1, 1] -> (B, feature_dim) penultimate features (post-ReLU, as the head sees)."""
        if x.ndim != 4 or x.shape[-2:] != (IM_SIZE, IM_SIZE):
            raise UserError(f"expected images (B, C, {IM_SIZE}, {IM_SIZE}), got {tuple(x.shape)}")
        x = x.float().mean(dim=1, keepdim=True)  # greyscale, so generated RGB is judged like the 1-channel data
        return self.embed(self.blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, 32, 32) images in [-1, 1] -> (B, 10) logits."""
        return self.head(self.dropout(self.features(x)))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, 32, 32) images -> (B,) int64 class indices (see `tokenizer.data.FMNIST_CLASSES`)."""
        return self(x).argmax(dim=1)


def load_classifier(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> FMNISTClassifier:
    """The classifier with weights from `path` (default: the committed asset), in eval mode on `device`.

    An unreadable, corrupt or mismatched file raises a one-line `UserError` naming it.
    """
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        hint = " (run: python eval/train_fmnist_classifier.py)" if path == DEFAULT_WEIGHTS else ""
        raise UserError(f"Fashion-MNIST classifier weights not found: {path}{hint}")
    model = FMNISTClassifier()
    load_weights(model, str(path), what="the Fashion-MNIST classifier")
    return model.eval().to(device)


def predict(x: torch.Tensor, model: FMNISTClassifier | None = None, batch_size: int = 500) -> torch.Tensor:
    """(N, C, 32, 32) images in [-1, 1] -> (N,) int64 class indices on the CPU, in batches."""
    model = model if model is not None else load_classifier()
    device = next(model.parameters()).device
    return torch.cat([model.predict(b.to(device)).cpu() for b in x.split(batch_size)])


class FeatureStats:
    """Running mean and covariance of classifier features, fed batch by batch (nothing stored per image).

    Holds n, Σf and Σf·fᵀ in float64 (as `tokenizer.metrics` does for rFID), so per-process states can simply be
    summed (`merge`, or an all-reduce of `n`, `sum`, `outer`) before `compute()`.
    """

    def __init__(self, model: FMNISTClassifier | None = None, feature_dim: int = FEATURE_DIM):
        self.model = model
        self.n = 0
        self.sum = torch.zeros(feature_dim, dtype=torch.float64)
        self.outer = torch.zeros(feature_dim, feature_dim, dtype=torch.float64)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add a batch of images (B, C, 32, 32) in [-1, 1]; the model is loaded on first use if none was given."""
        if self.model is None:
            self.model = load_classifier(device=x.device)
        self.update_features(self.model.features(x))

    def update_features(self, feats: torch.Tensor) -> None:
        """Add precomputed features (B, D)."""
        f = feats.detach().to("cpu", torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def merge(self, other: FeatureStats) -> None:
        self.n += other.n
        self.sum += other.sum
        self.outer += other.outer

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean (D,), unbiased covariance (D, D)), float64 numpy, as `np.mean` / `np.cov(rowvar=False)`."""
        if self.n < 2:
            raise UserError(f"need at least 2 images for a covariance, got {self.n}")
        mu = (self.sum / self.n).numpy()
        sigma = (self.outer.numpy() - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, sigma


@torch.no_grad()
def feature_stats(images: torch.Tensor, model: FMNISTClassifier | None = None, batch_size: int = 500) -> FeatureStats:
    """`FeatureStats` of an image set (N, C, 32, 32) in [-1, 1], fed in batches on the model's device."""
    model = model if model is not None else load_classifier()
    device = next(model.parameters()).device
    acc = FeatureStats(model)
    for batch in images.split(batch_size):
        acc.update(batch.to(device))
    return acc


def frechet_distance(a: FeatureStats | torch.Tensor | np.ndarray,
                     b: FeatureStats | torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets: (N, D) arrays/tensors or `FeatureStats`.

    ||mu_a - mu_b||² + Tr(S_a + S_b - 2 (S_a S_b)^½) in float64, computed by torch-fidelity's own
    `fid_statistics_to_metric` (the trace of the square root from the eigenvalues of S_a S_b), as rFID is.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    def stats(s) -> dict:
        if not isinstance(s, FeatureStats):
            f = torch.as_tensor(np.asarray(s) if not torch.is_tensor(s) else s)
            if f.ndim != 2:
                raise UserError(f"expected features (N, D), got shape {tuple(f.shape)}")
            acc = FeatureStats(feature_dim=f.shape[1])
            acc.update_features(f)
            s = acc
        mu, sigma = s.compute()
        return {"mu": mu, "sigma": sigma}

    sa, sb = stats(a), stats(b)
    if sa["mu"].shape != sb["mu"].shape:
        raise UserError(f"feature dimensions differ: {sa['mu'].shape[0]} vs {sb['mu'].shape[0]}")
    # Not clipped at 0: identical sets give ~1e-13 (rounding), and a clearly negative value would reveal a bug.
    return float(fid_statistics_to_metric(sa, sb, verbose=False)[KEY_METRIC_FID])


@torch.no_grad()
def classifier_fd(images_a: torch.Tensor, images_b: torch.Tensor, model: FMNISTClassifier | None = None,
                  batch_size: int = 500) -> float:
    """Fréchet distance in classifier feature space between two image sets (N, C, 32, 32) in [-1, 1]."""
    model = model if model is not None else load_classifier()
    return frechet_distance(feature_stats(images_a, model, batch_size), feature_stats(images_b, model, batch_size))

"""The real Fashion-MNIST images that generated ones are judged against, and what the classifier makes of them.

    real, test_stats = real_reference(classifier, n_test=None, n_reference=1000, seed=0)
    fd = frechet_distance(feature_stats(samples, classifier), test_stats)   # next to real["fd_train_vs_test"]

`real` holds the classifier's accuracy on the real test split (its ceiling for the class accuracy of samples) and
the Fréchet distance of as many real training images as there are samples against the test split (the value a
perfect generator would get at that sample size).
"""

import torch

from eval.lib.fmnist_classifier import NUM_CLASSES, FeatureStats, feature_stats, frechet_distance, predict
from tokenizer.data import FashionMNIST


def real_images(split: str, n: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 3, 32, 32) in [-1, 1], labels (N,)) of a Fashion-MNIST split: all of it, or `n` drawn at random
    with `seed`."""
    data = FashionMNIST(split)
    if n is None:
        idx = range(len(data))
    else:
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    items = [data[i] for i in idx]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def real_reference(classifier, n_test: int | None, n_reference: int, seed: int) -> tuple[dict, FeatureStats]:
    """({n_test, test_accuracy, per_class, n_reference, fd_train_vs_test}, feature statistics of the test split):
    the classifier on `n_test` real test images (None: all), and `n_reference` real training images against them."""
    x_test, y_test = real_images("test", n_test, seed=seed)
    pred = predict(x_test, classifier)
    test_stats = feature_stats(x_test, classifier)
    x_ref, _ = real_images("train", n_reference, seed=seed)
    real = {"n_test": len(x_test), "test_accuracy": float((pred == y_test).float().mean()),
            "per_class": [float((pred[y_test == c] == c).float().mean()) for c in range(NUM_CLASSES)],
            "n_reference": len(x_ref),
            "fd_train_vs_test": frechet_distance(feature_stats(x_ref, classifier), test_stats)}
    return real, test_stats

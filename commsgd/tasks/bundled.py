"""Data sets that need no download: scikit-learn's handwritten digits and a Gaussian-mixture problem.

Both are fixed (their seeds do not depend on the run seed) so every run is scored on the same test set.
"""

from __future__ import annotations

import numpy as np
import torch

from commsgd.tasks.dataset import Dataset, DatasetSpec

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
SYNTHETIC_SEED = 1234
SYNTHETIC_CLASSES = 10
SYNTHETIC_DIM = 32
SYNTHETIC_TRAIN = 4000
SYNTHETIC_TEST = 1000
SYNTHETIC_COMPONENTS = 2  # clusters per class: not linearly separable, so an MLP beats logistic regression
SYNTHETIC_SPREAD = 0.65  # centre scale vs unit noise: logreg ~79%, MLP ~90% test accuracy


def _standardise(train: np.ndarray, test: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Shift and scale both sets with statistics of the training set only."""
    mean = train.mean(axis=axis, keepdims=True)
    std = train.std(axis=axis, keepdims=True) + 1e-8
    return (train - mean) / std, (test - mean) / std


def load_digits_dataset() -> Dataset:
    """1797 8x8 digit images, stratified 80/20 split, pixels in [0,1] normalised by the train mean and std.

    One scalar mean and std: several border pixels are always zero, so per-pixel std would divide by 0.
    scikit-learn is imported here, not at module level: it (with scipy) is about 1 s of start-up that
    workers training on other data sets, and `commsgd --help`, would otherwise pay.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images = bunch.data.astype(np.float32) / 16.0
    labels = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=DIGITS_TEST_FRACTION, stratify=labels, random_state=DIGITS_SPLIT_SEED
    )
    x_tr, x_te = _standardise(x_tr, x_te, axis=None)
    spec = DatasetSpec("digits", "image", (1, 8, 8), 10)
    return Dataset(
        spec,
        torch.from_numpy(x_tr.reshape(-1, 1, 8, 8).astype(np.float32)),
        torch.from_numpy(y_tr),
        torch.from_numpy(x_te.reshape(-1, 1, 8, 8).astype(np.float32)),
        torch.from_numpy(y_te),
    )


def _mixture(rng: np.random.Generator, centres: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw `count` points: a balanced random class, one of its clusters, unit Gaussian noise."""
    labels = rng.permutation(np.arange(count) % SYNTHETIC_CLASSES)
    component = rng.integers(0, SYNTHETIC_COMPONENTS, size=count)
    points = centres[labels, component] + rng.normal(size=(count, SYNTHETIC_DIM))
    return points, labels.astype(np.int64)


def load_synthetic_dataset() -> Dataset:
    """A 10-class Gaussian mixture in 32 dimensions with overlapping classes, standardised per feature."""
    rng = np.random.default_rng(SYNTHETIC_SEED)
    shape = (SYNTHETIC_CLASSES, SYNTHETIC_COMPONENTS, SYNTHETIC_DIM)
    centres = rng.normal(scale=SYNTHETIC_SPREAD, size=shape)
    x_tr, y_tr = _mixture(rng, centres, SYNTHETIC_TRAIN)
    x_te, y_te = _mixture(rng, centres, SYNTHETIC_TEST)
    x_tr, x_te = _standardise(x_tr, x_te, axis=0)
    spec = DatasetSpec("synthetic", "vector", (SYNTHETIC_DIM,), SYNTHETIC_CLASSES)
    return Dataset(
        spec,
        torch.from_numpy(x_tr.astype(np.float32)),
        torch.from_numpy(y_tr),
        torch.from_numpy(x_te.astype(np.float32)),
        torch.from_numpy(y_te),
    )

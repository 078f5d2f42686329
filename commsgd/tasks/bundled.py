"""Data sets that need no download: scikit-learn's handwritten digits and a Gaussian-mixture problem.

Both are fixed (their seeds do not depend on the run seed) so every run is scored on the same test set.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
from pathlib import Path

import numpy as np
import torch

from commsgd.files import write_atomically
from commsgd.tasks.dataset import Dataset, DatasetSpec

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
DIGITS_SAMPLES = 1797
DIGITS_CLASSES = 10
DIGITS_SHAPE = (1, 8, 8)
DIGITS_CACHE_FORMAT = 1  # bump when the cached arrays or their preparation change
_DIGITS_DTYPES = {"x_tr": np.float32, "y_tr": np.int64, "x_te": np.float32, "y_te": np.int64}
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


def _compute_digits_arrays() -> dict[str, np.ndarray]:
    """The prepared digits arrays (x_tr, y_tr, x_te, y_te), computed with scikit-learn.

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
    return {
        "x_tr": x_tr.reshape(-1, *DIGITS_SHAPE).astype(np.float32),
        "y_tr": y_tr,
        "x_te": x_te.reshape(-1, *DIGITS_SHAPE).astype(np.float32),
        "y_te": y_te,
    }


def cache_dir() -> Path:
    """Where commsgd keeps files it can recompute: $COMMSGD_CACHE_DIR, else the XDG cache directory.

    That is $XDG_CACHE_HOME/commsgd, or ~/.cache/commsgd when it is unset (or, per XDG, relative).
    """
    explicit = os.environ.get("COMMSGD_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "commsgd"


def _safe_version(package: str) -> str | None:
    """The installed version of `package` as a file-name-safe string (metadata only: no import), or None."""
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if not version:  # broken metadata without a Version field
        return None
    return re.sub(r"[^A-Za-z0-9.]", "_", version)


def _digits_cache_path() -> Path | None:
    """The cache file for the installed scikit-learn and numpy (split and standardisation), or None.

    Both versions are in the name, so an upgrade of either never serves arrays it would not compute.
    """
    sklearn_version = _safe_version("scikit-learn")
    numpy_version = _safe_version("numpy")
    if sklearn_version is None or numpy_version is None:
        return None
    name = f"digits-v{DIGITS_CACHE_FORMAT}-sklearn{sklearn_version}-numpy{numpy_version}.npz"
    try:
        return cache_dir() / name
    except RuntimeError:  # Path.home() when no home directory can be found
        return None


def _valid_digits_arrays(arrays: dict[str, np.ndarray]) -> bool:
    """Whether `arrays` have the names, dtypes, shapes and value ranges of a prepared digits set."""
    if sorted(arrays) != sorted(_DIGITS_DTYPES):
        return False
    if any(arrays[key].dtype != dtype for key, dtype in _DIGITS_DTYPES.items()):
        return False
    total = 0
    for x, y in ((arrays["x_tr"], arrays["y_tr"]), (arrays["x_te"], arrays["y_te"])):
        if y.ndim != 1 or y.size == 0 or x.shape != (y.size, *DIGITS_SHAPE):
            return False
        if not (np.isfinite(x).all() and y.min() >= 0 and y.max() < DIGITS_CLASSES):
            return False
        total += y.size
    return total == DIGITS_SAMPLES


def _read_digits_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays in cache file `path`, or None if it is missing, unreadable, corrupt or not a digits set.

    A cache must never fail a run, so any error reading it means "not cached".
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception:  # missing, truncated, bad zip or CRC, object arrays, a bare .npy (not an archive), ...
        return None
    return arrays if _valid_digits_arrays(arrays) else None


def _write_digits_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` to `path` atomically, readable by everyone sharing the cache.

    Concurrent readers see the old file or the whole new one, never a partial write. Any OS error
    (read-only or full disk, a file where the directory should be) leaves the cache unwritten.
    """
    with contextlib.suppress(OSError):
        write_atomically(
            path,
            lambda handle: np.savez(
                handle, x_tr=arrays["x_tr"], y_tr=arrays["y_tr"], x_te=arrays["x_te"], y_te=arrays["y_te"]
            ),
            mode=0o644,
        )


def load_digits_dataset() -> Dataset:
    """1797 8x8 digit images, stratified 80/20 split, pixels in [0,1] normalised by the train mean and std.

    The prepared arrays are cached on disk (see `cache_dir`): the CLI loads the set once before starting
    the workers, so the workers read the cache and skip importing scikit-learn.
    """
    path = _digits_cache_path()
    arrays = _read_digits_cache(path) if path is not None else None
    if arrays is None:
        arrays = _compute_digits_arrays()
        if path is not None:
            _write_digits_cache(path, arrays)
    spec = DatasetSpec("digits", "image", DIGITS_SHAPE, DIGITS_CLASSES)
    return Dataset(
        spec,
        torch.from_numpy(arrays["x_tr"]),
        torch.from_numpy(arrays["y_tr"]),
        torch.from_numpy(arrays["x_te"]),
        torch.from_numpy(arrays["y_te"]),
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

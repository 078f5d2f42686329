"""CIFAR-10 from the standard python-format batch files, read with a restricted unpickler.

The official files are pickles, and unpickling runs code named in the file; `SafeUnpickler` only
lets through the few numpy globals that rebuild a uint8 array, so a crafted file cannot execute anything.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from commsgd.errors import DataError
from commsgd.tasks.dataset import Dataset, DatasetSpec
from commsgd.tasks.transforms import CenterCropTransform, CropFlipTransform

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
LAYOUT = f"{FOLDER}/{{data_batch_1..5,{TEST_FILE}}} (the extracted cifar-10-python.tar.gz)"
LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CROP_28_MODELS = frozenset({"cnn7", "resnet20"})

# numpy's array-rebuilding function; taken from a live reduce so it is right on numpy 1.x and 2.x alike.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals needed for CIFAR batch files."""

    def __init__(self, file: BinaryIO, source: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.source}: refusing to unpickle {module}.{name}; CIFAR-10 files hold only numpy arrays"
            ) from None


def _field(batch: dict[Any, Any], key: str, path: Path) -> Any:
    """Look a key up under its bytes name (Python 2 pickles) or str name (re-pickled files)."""
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise DataError(f"{path}: not a CIFAR-10 batch, it has no '{key}' entry")


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file into uint8 images (N, 3, 32, 32) and int64 labels (N,), validating both."""
    try:
        with path.open("rb") as handle:
            batch = SafeUnpickler(handle, path).load()
    except DataError:
        raise
    except Exception as exc:  # unpickling malformed bytes can fail with almost any exception type
        raise DataError(
            f"{path}: unreadable or truncated CIFAR-10 batch file ({exc.__class__.__name__})"
        ) from exc
    if not isinstance(batch, dict):
        raise DataError(f"{path}: not a CIFAR-10 batch, expected a pickled dict")
    data = _field(batch, "data", path)
    labels = np.asarray(_field(batch, "labels", path))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {shape}")
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: 'labels' must be {data.shape[0]} integers, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels must lie in 0..9, found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def locate(data_dir: str) -> Path:
    """Accept either the directory that holds `cifar-10-batches-py` or that folder itself."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"cifar10 data directory {root} does not exist; expected {root}/{LAYOUT}")
    folder = root / FOLDER if (root / FOLDER).is_dir() else root
    missing = [name for name in (*TRAIN_FILES, TEST_FILE) if not (folder / name).is_file()]
    if missing:
        raise DataError(f"cifar10: {folder} lacks {', '.join(missing)}; expected {root}/{LAYOUT}")
    return folder


def _stack(paths: list[Path]) -> tuple[Tensor, Tensor]:
    parts = [read_batch(p) for p in paths]
    images = np.concatenate([x for x, _ in parts])
    labels = np.concatenate([y for _, y in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


def cifar_transforms(model: str) -> tuple[int, CropFlipTransform, CenterCropTransform]:
    """Crop size and transforms of 32x32 images for `model` (LSGD supplement sec. 9.1).

    cnn7 and resnet20 see random 28x28 crops (the centre 28x28 at test); other models random 32x32
    crops of the image zero-padded to 40x40 (the whole image at test). Both flip with p=0.5.
    """
    crop, pad = (28, 0) if model in CROP_28_MODELS else (32, 4)
    return crop, CropFlipTransform(crop, pad), CenterCropTransform(crop)


def load_cifar10(data_dir: str, model: str) -> Dataset:
    """Load CIFAR-10 kept as uint8, with the preprocessing of `cifar_transforms`."""
    folder = locate(data_dir)
    train_x, train_y = _stack([folder / name for name in TRAIN_FILES])
    test_x, test_y = _stack([folder / TEST_FILE])
    crop, train_transform, test_transform = cifar_transforms(model)
    spec = DatasetSpec("cifar10", "image", (3, crop, crop), 10)
    return Dataset(spec, train_x, train_y, test_x, test_y, train_transform, test_transform)


def _fake_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noisy images whose mean colour depends on the class, so a model can learn something from them."""
    colours = np.linspace(40, 215, 10)[labels]
    offsets = np.array([0.0, 25.0, -25.0])
    base = colours[:, None, None] + offsets[None, :, None]
    noise = rng.normal(0.0, 30.0, size=(labels.size, 3, 1024))
    return np.clip(base + noise, 0, 255).astype(np.uint8).reshape(labels.size, 3072)


def _dump(path: Path, obj: dict[bytes, Any]) -> None:
    # Protocol 4 stores bytes natively and numpy arrays via _reconstruct, like the official files load.
    with path.open("wb") as handle:
        pickle.dump(obj, handle, protocol=4)


def write_fake_cifar10(directory: str | Path, n_train_per_batch: int, n_test: int, seed: int = 0) -> Path:
    """Write a small CIFAR-10 look-alike in the official layout; returns the `cifar-10-batches-py` folder.

    Used by tests and docs to exercise the real loader without the 170 MB download.
    """
    folder = Path(directory) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, count in [*((n, n_train_per_batch) for n in TRAIN_FILES), (TEST_FILE, n_test)]:
        labels = rng.permutation(np.arange(count) % 10)
        batch = {
            b"batch_label": f"fake {name}".encode(),
            b"labels": [int(v) for v in labels],
            b"data": _fake_images(labels, rng),
            b"filenames": [f"fake_{i}.png".encode() for i in range(count)],
        }
        _dump(folder / name, batch)
    meta = {
        b"label_names": [n.encode() for n in LABEL_NAMES],
        b"num_cases_per_batch": n_train_per_batch,
        b"num_vis": 3072,
    }
    _dump(folder / "batches.meta", meta)
    return folder

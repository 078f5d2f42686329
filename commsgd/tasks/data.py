"""`load_dataset`: the one entry point from a data set name (and data directory, if any) to a `Dataset`."""

from __future__ import annotations

from commsgd.errors import ConfigError
from commsgd.tasks.bundled import load_digits_dataset, load_synthetic_dataset
from commsgd.tasks.cifar import LAYOUT, load_cifar10
from commsgd.tasks.dataset import Dataset
from commsgd.tasks.imagefiles import LAYOUT as IMAGEFOLDER_LAYOUT
from commsgd.tasks.imagefolder import load_imagefolder
from commsgd.tasks.text import load_text_dataset
from commsgd.tasks.user import is_user_spec, load_user_dataset

DATASETS = ("digits", "synthetic", "cifar10", "imagefolder", "text")


def load_dataset(name: str, data_dir: str | None, *, model: str, seed: int) -> Dataset:
    """Load data set `name`; `model` picks the crop size of 32x32 images (28 for cnn7/resnet20, else 32).

    `data_dir` is required for cifar10 and imagefolder, optional for text (None: generated corpus) and
    ignored by the bundled sets. `seed` does not change the data: splits and generated sets are fixed so
    that every run is scored on the same test set; runs differ only in sampling and augmentation.
    ``package.module:function`` is the user's own builder (`commsgd.tasks.user`).
    """
    if is_user_spec(name):
        return load_user_dataset(name, data_dir)
    if name == "digits":
        return load_digits_dataset()
    if name == "synthetic":
        return load_synthetic_dataset()
    if name == "text":
        return load_text_dataset(data_dir)
    if name == "cifar10":
        if data_dir is None:
            raise ConfigError(f"cifar10 needs data_dir: a directory holding {LAYOUT}")
        return load_cifar10(data_dir, model)
    if name == "imagefolder":
        if data_dir is None:
            raise ConfigError(f"imagefolder needs data_dir: a directory holding {IMAGEFOLDER_LAYOUT}")
        return load_imagefolder(data_dir, model)
    raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")

"""Tasks: data sets held in memory, the models that fit them, and the shared loss."""

from commsgd.tasks.cifar import write_fake_cifar10
from commsgd.tasks.data import DATASETS, load_dataset
from commsgd.tasks.dataset import Dataset, DatasetSpec
from commsgd.tasks.imagefolder import write_fake_image_folder
from commsgd.tasks.loss import derived_metrics, loss_and_errors
from commsgd.tasks.models import MODELS, build_model

__all__ = [
    "DATASETS",
    "MODELS",
    "Dataset",
    "DatasetSpec",
    "build_model",
    "derived_metrics",
    "load_dataset",
    "loss_and_errors",
    "write_fake_cifar10",
    "write_fake_image_folder",
]

"""The user's own model and data: ``--model package.module:function``, ``--dataset package.module:function``.

A name with a colon is imported (the current directory comes first on the import path, as with
``python -m``) and called in every worker, and once before the workers start, so that a failed
import or a builder returning the wrong thing is one line, said once:

* model builder: ``function(input_shape, num_classes) -> torch.nn.Module`` (`input_shape` is one
  sample's shape, `num_classes` the number of classes, or the vocabulary size for text);
* data set builder: ``function()`` (``function(data_dir)`` when ``data.data_dir`` is set) returning
  ``(train, test)``, each a map-style ``torch.utils.data.Dataset`` of ``(x, y)`` samples or an
  ``(x, y)`` pair of tensors (x: samples along the first dimension; y: integer class labels, or one
  label per position for sequences). The sets are held in memory, like the bundled ones; every worker
  must get the same sets (build them deterministically: workers draw their own shards).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from commsgd.errors import ConfigError
from commsgd.tasks.dataset import Dataset, DatasetSpec

#: samples a torch Dataset may have to be copied into memory (beyond: refused, not swapped to death)
MAX_SAMPLES = 10_000_000


def is_user_spec(name: str) -> bool:
    """Whether a model or data set name is ``package.module:function`` (the user's code)."""
    return ":" in name


def import_callable(spec: str, what: str) -> Callable[..., Any]:
    """The callable `spec` names; ConfigError (naming the field `what`) when it cannot be had."""
    module_name, _, attr = spec.partition(":")
    if not (_dotted(module_name) and _dotted(attr)):
        raise ConfigError(f"{what}: {spec!r} is not package.module:function")
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:  # console scripts do not put it there
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"{what}: cannot import {module_name!r} for {spec!r} ({exc})") from None
    except Exception as exc:  # the user's module raised while being imported
        raise ConfigError(f"{what}: importing {module_name!r} failed ({_said(exc)})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{what}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{what}: {spec!r} is a {type(obj).__name__}, not a function")
    return obj


def build_user_model(spec: str, data: DatasetSpec) -> nn.Module:
    """Call the model builder `spec` with the data set's input shape and number of classes."""
    builder = import_callable(spec, "model")
    try:
        model = builder(data.input_shape, data.num_classes)
    except Exception as exc:
        raise ConfigError(
            f"model: {spec}({data.input_shape}, {data.num_classes}) failed ({_said(exc)})"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_user_dataset(spec: str, data_dir: str | None) -> Dataset:
    """Call the data set builder `spec` and hold its train and test sets in memory."""
    builder = import_callable(spec, "data.dataset")
    try:
        result = builder(data_dir) if data_dir is not None else builder()
    except Exception as exc:
        raise ConfigError(f"data.dataset: {spec}() failed ({_said(exc)})") from None
    if not (isinstance(result, Sequence) and not isinstance(result, str | Tensor) and len(result) == 2):
        raise ConfigError(
            f"data.dataset: {spec} returned a {type(result).__name__}; "
            "expected (train, test), each a torch Dataset or an (x, y) pair of tensors"
        )
    train_x, train_y = _tensors(result[0], f"{spec}'s train set")
    test_x, test_y = _tensors(result[1], f"{spec}'s test set")
    if train_x.shape[1:] != test_x.shape[1:] or train_y.shape[1:] != test_y.shape[1:]:
        raise ConfigError(
            f"data.dataset: {spec}'s train and test samples differ in shape "
            f"(x {list(train_x.shape[1:])} vs {list(test_x.shape[1:])}, "
            f"y {list(train_y.shape[1:])} vs {list(test_y.shape[1:])})"
        )
    sequence = train_y.dim() == 2
    labels = max(int(train_y.max()), int(test_y.max())) + 1
    if sequence and not train_x.is_floating_point():
        labels = max(labels, int(train_x.max()) + 1, int(test_x.max()) + 1)  # the vocabulary
    kind: Literal["image", "vector", "text"] = (
        "text" if sequence else ("image" if train_x.dim() == 4 else "vector")
    )
    shape = tuple(int(d) for d in train_x.shape[1:])
    return Dataset(DatasetSpec(spec, kind, shape, labels), train_x, train_y, test_x, test_y)


def _tensors(part: Any, where: str) -> tuple[Tensor, Tensor]:
    """(x, y) of one set: from an (x, y) pair of tensors, or by reading every sample of a Dataset."""
    if isinstance(part, Sequence) and len(part) == 2 and all(isinstance(t, Tensor) for t in part):
        x, y = part
    elif isinstance(part, torch.utils.data.TensorDataset) and len(part.tensors) == 2:
        x, y = part.tensors
    elif hasattr(part, "__getitem__") and hasattr(part, "__len__"):
        x, y = _read_all(part, where)
    else:
        raise ConfigError(
            f"data.dataset: {where} is a {type(part).__name__}; expected a torch Dataset or (x, y) tensors"
        )
    if x.dim() == 1:  # one number per sample
        x = x.reshape(-1, 1)
    if len(x) != len(y) or len(x) == 0:
        raise ConfigError(
            f"data.dataset: {where} has {len(x)} inputs and {len(y)} labels (needs as many, > 0)"
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() not in (1, 2):
        raise ConfigError(
            f"data.dataset: {where}'s labels must be integer class indices, one per sample (or per "
            f"position), got {y.dtype} of shape {list(y.shape)}"
        )
    if int(y.min()) < 0:
        raise ConfigError(f"data.dataset: {where} has a negative label ({int(y.min())})")
    return x.contiguous(), y.to(torch.int64).contiguous()


def _read_all(data: Any, where: str) -> tuple[Tensor, Tensor]:
    """Every (x, y) sample of a map-style Dataset, stacked."""
    try:
        n = len(data)
    except Exception as exc:
        raise ConfigError(f"data.dataset: len() of {where} failed ({_said(exc)})") from None
    if n > MAX_SAMPLES:
        raise ConfigError(f"data.dataset: {where} has {n} samples; at most {MAX_SAMPLES} are held in memory")
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    for i in range(n):
        try:
            sample = data[i]
        except Exception as exc:
            raise ConfigError(f"data.dataset: {where}[{i}] failed ({_said(exc)})") from None
        if not (isinstance(sample, Sequence) and len(sample) == 2):
            raise ConfigError(f"data.dataset: {where}[{i}] is a {type(sample).__name__}, not an (x, y) pair")
        try:
            xs.append(torch.as_tensor(sample[0]))
            ys.append(torch.as_tensor(sample[1]))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"data.dataset: {where}[{i}] is not tensors ({_said(exc)})") from None
    try:
        return torch.stack(xs), torch.stack(ys)
    except RuntimeError as exc:
        raise ConfigError(f"data.dataset: {where}'s samples differ in shape ({_said(exc)})") from None


def _dotted(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def _said(exc: BaseException) -> str:
    """An exception as `Type: first line` (one line, short)."""
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


__all__ = ["build_user_model", "import_callable", "is_user_spec", "load_user_dataset"]

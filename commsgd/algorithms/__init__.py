"""Algorithms, registered by name. Every module in this package is imported here, so adding an
algorithm is adding a module with a `@register`-ed class, plus its line in the torch-free
`commsgd/catalogue.py` that `--help` and `list` read (a test says so when it is missing)."""

from __future__ import annotations

import importlib
import pkgutil

from commsgd.algorithms.base import (
    REGISTRY,
    Algorithm,
    algorithm_names,
    build_algorithm,
    get_algorithm_class,
    register,
    validate_params,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "REGISTRY",
    "Algorithm",
    "algorithm_names",
    "build_algorithm",
    "get_algorithm_class",
    "register",
    "validate_params",
]

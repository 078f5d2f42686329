"""Algorithms, registered by name. Every module in this package is imported here, so adding an
algorithm is adding a module with a `@register`-ed class; nothing else needs editing."""

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

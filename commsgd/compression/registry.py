"""Compressors by name, built from config parameters."""

from __future__ import annotations

import inspect

from commsgd.compression.base import Compressor
from commsgd.compression.cast import BFloat16, Float16, Identity
from commsgd.compression.powersgd import PowerSGD
from commsgd.compression.quantize import QSGD, Rounding
from commsgd.compression.sign import BlockSign, ScaledSign, Sign
from commsgd.compression.sparse import RandomK, TopK
from commsgd.errors import ConfigError

_CLASSES: tuple[type[Compressor], ...] = (
    Identity,
    Float16,
    BFloat16,
    Sign,
    ScaledSign,
    BlockSign,
    TopK,
    RandomK,
    QSGD,
    Rounding,
    PowerSGD,
)
_BY_NAME: dict[str, type[Compressor]] = {cls.name: cls for cls in _CLASSES}

COMPRESSORS: tuple[str, ...] = tuple(_BY_NAME)
"""Every registered compressor name."""


def get(name: str, **params: object) -> Compressor:
    """A new compressor `name` built with `params`; ConfigError for an unknown name or parameter, or a
    value out of range."""
    cls = _BY_NAME.get(name)
    if cls is None:
        raise ConfigError(f"unknown compressor {name!r}; choose one of: {', '.join(COMPRESSORS)}")
    allowed = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{name}: unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(allowed) or 'none'}"
        )
    return cls(**params)

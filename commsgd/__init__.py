"""commsgd: communication-efficient distributed training on PyTorch.

Leader SGD and its baselines, gradient compression with error feedback, and decentralized gossip,
all on torch.distributed. See the README for the command line and `commsgd.api` for your own loop.

The names below are imported on first use (PEP 562), not with the package: `commsgd --help` and
`commsgd list` must not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from commsgd.errors import CheckpointError, ConfigError, DataError, UserError

if TYPE_CHECKING:
    from commsgd.algorithms import algorithm_names, build_algorithm
    from commsgd.api import CommOptimizer, MiniBatch, NonFiniteError, init
    from commsgd.config import Config, load_config
    from commsgd.context import WorkerContext
    from commsgd.ddp_hooks import ddp_hook

__version__ = "0.1.0"

#: public name -> the module that defines it
_LAZY = {
    "algorithm_names": "commsgd.algorithms",
    "build_algorithm": "commsgd.algorithms",
    "CommOptimizer": "commsgd.api",
    "MiniBatch": "commsgd.api",
    "NonFiniteError": "commsgd.api",
    "init": "commsgd.api",
    "Config": "commsgd.config",
    "load_config": "commsgd.config",
    "WorkerContext": "commsgd.context",
    "ddp_hook": "commsgd.ddp_hooks",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'commsgd' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CheckpointError",
    "CommOptimizer",
    "Config",
    "ConfigError",
    "DataError",
    "MiniBatch",
    "NonFiniteError",
    "UserError",
    "WorkerContext",
    "__version__",
    "algorithm_names",
    "build_algorithm",
    "ddp_hook",
    "init",
    "load_config",
]

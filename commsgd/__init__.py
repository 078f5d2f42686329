"""commsgd: communication-efficient distributed training on PyTorch.

Leader SGD and its baselines, gradient compression with error feedback, and decentralized gossip,
all on torch.distributed. See the README for the command line and `commsgd.api` for your own loop.
"""

from commsgd.algorithms import algorithm_names, build_algorithm
from commsgd.api import CommOptimizer, MiniBatch, NonFiniteError, init
from commsgd.config import Config, load_config
from commsgd.context import WorkerContext
from commsgd.errors import CheckpointError, ConfigError, DataError, UserError

__version__ = "0.1.0"

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
    "init",
    "load_config",
]

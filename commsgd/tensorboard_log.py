"""TensorBoard scalars for a run (`tensorboard: true`), written by rank 0 into ``RUN_DIR/tensorboard/``.

An install extra: ``pip install -e ".[tensorboard]"`` (or ``pip install tensorboard``) brings the
`tensorboard` package that `torch.utils.tensorboard` needs. `require_tensorboard` is called before any
worker starts, so a missing package is one line and exit code 2, not one traceback per worker.

Per logged step: ``train/loss``, ``train/lr``, ``comm/bytes_per_step`` and ``comm/seconds_per_step``
(rank 0's, averaged over the steps since the previous record when ``log_every`` > 1) and the running
totals ``comm/bytes_sent`` and ``comm/seconds``; per evaluation every number it gives, as ``eval/<key>``
(``eval/test_error``, ``eval/test_loss``, ...).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from commsgd.errors import ConfigError

MISSING = (
    "tensorboard: true needs the tensorboard package: pip install tensorboard "
    '(the install extra: pip install -e ".[tensorboard]" in a commsgd checkout)'
)


def tensorboard_installed() -> bool:
    """Whether `torch.utils.tensorboard` can import its backend (the `tensorboard` package)."""
    return importlib.util.find_spec("tensorboard") is not None


def require_tensorboard() -> None:
    """ConfigError (one line) when the package is missing; the CLI calls it before spawning workers."""
    if not tensorboard_installed():
        raise ConfigError(MISSING)


class TensorBoardLog:
    """Rank 0's writer: per-step scalars from the cumulative counters of `metrics/rank0.jsonl`."""

    def __init__(self, run_dir: Path) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer: Any = SummaryWriter(str(run_dir / "tensorboard"))
        self._previous: tuple[int, float, float] | None = None  # (step, bytes, comm seconds) last logged

    def log_step(self, step: int, loss: float, lr: float, bytes_sent: float, comm_s: float) -> None:
        """One training record; `bytes_sent` and `comm_s` are totals since the start of the run."""
        w = self.writer
        w.add_scalar("train/loss", loss, step)
        w.add_scalar("train/lr", lr, step)
        w.add_scalar("comm/bytes_sent", bytes_sent, step)
        w.add_scalar("comm/seconds", comm_s, step)
        if self._previous is not None and step > self._previous[0]:
            last_step, last_bytes, last_s = self._previous
            steps = step - last_step
            w.add_scalar("comm/bytes_per_step", (bytes_sent - last_bytes) / steps, step)
            w.add_scalar("comm/seconds_per_step", (comm_s - last_s) / steps, step)
        elif self._previous is None and step == 1:  # the first step's totals are its own
            w.add_scalar("comm/bytes_per_step", bytes_sent, step)
            w.add_scalar("comm/seconds_per_step", comm_s, step)
        self._previous = (step, bytes_sent, comm_s)

    def log_eval(self, step: int, result: dict[str, float]) -> None:
        for key, value in result.items():
            self.writer.add_scalar(f"eval/{key}", value, step)

    def close(self) -> None:
        self.writer.close()

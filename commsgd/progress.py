"""Rank 0's progress display: a tqdm bar on a terminal, plain lines in batch jobs.

Why two forms. A bar redraws one line with carriage returns; written to a file (SLURM's output, nohup,
a pipe) it becomes one ever-growing line of redraws that `tail -f` and `less` cannot follow. So when
stderr (the bar's stream) is not a terminal, `Progress` writes a whole line to stdout every
`every_steps` steps or `every_s` seconds, whichever comes first, and never a carriage return. Both
forms show the last test error.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

#: without `progress_every`, a plain line every this share of the run's steps
DEFAULT_SHARE = 0.1


def line_interval(total: int, every_steps: int) -> int:
    """Steps between plain lines: `every_steps`, or (0) a tenth of the run, at least 1."""
    return every_steps if every_steps > 0 else max(1, math.ceil(total * DEFAULT_SHARE))


def format_line(
    desc: str, step: int, total: int, loss: float | None, test_error: float | None, elapsed_s: float
) -> str:
    """One plain progress line, e.g. ``allreduce step 60/600 (10 %) loss 0.4123 test error 12.34 %
    elapsed 13.2 s``; values not known yet are left out."""
    share = f" ({100 * step / total:.0f} %)" if total > 0 else ""
    parts = [f"{desc} step {step}/{total}{share}"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if test_error is not None:
        parts.append(f"test error {100 * test_error:.2f} %")
    parts.append(f"elapsed {elapsed_s:.1f} s")
    return " ".join(parts)


class Progress:
    """`update(step, loss)` after each step, `test_error(e)` after an evaluation, `close()` at the end.

    When `bar_stream` (default stderr, where tqdm writes) is a terminal it gets the bar; otherwise the
    plain lines go to `line_stream` (default stdout, with the final table: stderr is for errors).
    `clock` is injectable for tests."""

    def __init__(
        self,
        total: int,
        initial: int,
        desc: str,
        *,
        every_steps: int = 0,
        every_s: float = 30.0,
        bar_stream: TextIO | None = None,
        line_stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.desc, self.clock = total, desc, clock
        self.stream = line_stream or sys.stdout
        bar_stream = bar_stream or sys.stderr
        self.every_steps, self.every_s = line_interval(total, every_steps), every_s
        self.start = clock()
        self.loss: float | None = None
        self.error: float | None = None
        self._last_line_at, self._last_line_step = self.start, initial
        self.bar: Any = None
        if _is_terminal(bar_stream):
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=bar_stream
            )

    def update(self, step: int, loss: float) -> None:
        self.loss = loss
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if step % 10 == 0:
                self._postfix()
            return
        now = self.clock()
        due = step - self._last_line_step >= self.every_steps or now - self._last_line_at >= self.every_s
        if due or step == self.total:
            self._write(step, now)

    def test_error(self, error: float) -> None:
        self.error = error
        if self.bar is not None:
            self._postfix()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _postfix(self) -> None:
        shown = {"loss": f"{self.loss:.4f}"} if self.loss is not None else {}
        if self.error is not None:
            shown["test error"] = f"{100 * self.error:.2f}%"
        self.bar.set_postfix(shown, refresh=False)

    def _write(self, step: int, now: float) -> None:
        line = format_line(self.desc, step, self.total, self.loss, self.error, now - self.start)
        self.stream.write(line + "\n")
        self.stream.flush()
        self._last_line_at, self._last_line_step = now, step


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or stream-like object without a terminal
        return False

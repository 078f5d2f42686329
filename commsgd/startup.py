"""When the command the user typed started, so that rank 0 can report the start-up they waited for.

`commsgd train` marks the time its process started in the environment (`mark_command_start`, in
the launcher) before it spawns the workers, which inherit it (a launch from code, `cli.main`, marks
the launch itself); rank 0 subtracts it from the time of its first step (`startup_s`). The process
start (Linux: /proc/self/stat) includes the interpreter's start and every import before commsgd's
code ran. Under torchrun nobody marks it: rank 0 then counts from its own process start, which
leaves out torchrun's own start-up.
"""

from __future__ import annotations

import os
import time
from collections.abc import MutableMapping

#: the environment variable that carries the command's start (seconds since the epoch)
ENV = "COMMSGD_COMMAND_START"


def process_age_s() -> float | None:
    """Seconds since this process started (Linux, to 1/100 s), or None where /proc cannot tell."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        # fields after the command name (which may hold spaces, in parentheses); starttime is field 22
        started_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        ticks = os.sysconf("SC_CLK_TCK")
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / ticks)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def process_start() -> float:
    """This process's start as seconds since the epoch (now, where it cannot be told)."""
    return time.time() - (process_age_s() or 0.0)


_program_start: float | None = None


def note_program_start() -> None:
    """The `commsgd` program (`commsgd.cli.run`) began in this process: its start is the command's."""
    global _program_start
    _program_start = process_start()


def mark_command_start(env: MutableMapping[str, str] | None = None) -> None:
    """Put the command's start into `env` (default os.environ) for the workers about to start: the
    process start when this is the `commsgd` program, else now (`commsgd.cli.main` called from code)."""
    env = os.environ if env is None else env
    env[ENV] = repr(_program_start if _program_start is not None else time.time())


def command_start(env: MutableMapping[str, str] | None = None) -> float:
    """The marked start of the command, or this process's start when there is no (valid) mark."""
    text = (os.environ if env is None else env).get(ENV)
    try:
        value = float(text) if text is not None else None
    except ValueError:
        value = None
    return value if value is not None and value > 0 else process_start()


def startup_s(first_step_at: float, env: MutableMapping[str, str] | None = None) -> float:
    """Seconds from the command's start to `first_step_at` (seconds since the epoch); never negative."""
    return max(0.0, first_step_at - command_start(env))

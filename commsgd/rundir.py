"""Run directories: one run at a time in each, fresh names for runs without ``--out``.

A run holds an exclusive lock on ``RUN_DIR/.lock`` (``flock``) from before it writes anything in the
directory until it ends, so a second ``commsgd train --out RUN_DIR`` or ``--resume RUN_DIR`` is refused
with one line instead of truncating the first run's records and deleting its temporary files. The
kernel drops the lock when the holding process ends, also on SIGKILL, so a crash leaves no stale lock;
the ``.lock`` file itself stays (it names the last holder) and is never deleted, because deleting a
lock file lets two processes lock two different files of one name.

Who holds it: the embedded launcher (``commsgd train --workers N``) for the whole run, across worker
restarts; under torchrun the process of rank 0, which takes it before its worker joins the process
group, so the other ranks (which cannot get past process-group creation without rank 0) touch
nothing in the directory before rank 0 holds the lock. Ranks on other nodes take no lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from commsgd.config import shown
from commsgd.errors import ConfigError, say

LOCK_NAME = ".lock"
#: errno values of file systems that cannot lock files: the run goes on, with a warning
_NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS})


def shown_path(path: Path | str) -> str:
    """`path` for a one-line message: as `shown` writes it, shortened in the middle when very long."""
    text = shown(path)
    return text if len(text) <= 160 else f"{text[:100]}...{text[-40:]} ({len(str(path))} characters)"


def path_problem(what: str, path: Path | str, exc: OSError) -> ConfigError:
    """The one-line error for an OS error on `path` (unwritable, over-long name, not a directory, ...)."""
    reason = exc.strerror or type(exc).__name__
    return ConfigError(f"{what}: {shown_path(path)}: cannot be used as a run directory ({reason})")


def holds_run(run_dir: Path, what: str = "out") -> bool:
    """Whether `run_dir` holds a run that was started (a summary or checkpoints)."""
    try:
        return (run_dir / "summary.json").exists() or (run_dir / "checkpoints").exists()
    except OSError as exc:  # e.g. a name too long for the file system
        raise path_problem(what, run_dir, exc) from None


def new_run_dir(parent: Path, stem: str) -> Path:
    """Create ``parent/<YYYYmmdd-HHMMSS>-<stem>-<6 hex digits>``: a directory no other run has.

    Created with ``mkdir(exist_ok=False)`` (a name taken by a run started in the same second is
    retried with another suffix), so two runs never share a default directory.
    """
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            path = parent / f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}-{secrets.token_hex(3)}"
            with contextlib.suppress(FileExistsError):
                path.mkdir()
                return path
    except OSError as exc:
        raise path_problem("out", parent, exc) from None
    raise ConfigError(f"out: no free run directory name in {shown_path(parent)}; pass --out")


def _holder(fd: int) -> str:
    """' (pid P on HOST)' from the lock file's contents, or '' if it cannot be read."""
    with contextlib.suppress(OSError, ValueError):
        pid, host = os.pread(fd, 300, 0).decode("utf-8").split()[:2]
        return f" (pid {int(pid)} on {shown(host)})"
    return ""


@contextlib.contextmanager
def locked(run_dir: Path, what: str = "out") -> Iterator[None]:
    """Hold the exclusive lock of `run_dir` (created if missing) for the body; refuse if another run has it.

    `what` names the flag in messages (``out`` or ``--resume``). Nothing in the directory is written
    before the lock is held; a refused run writes nothing at all.
    """
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"{what}: {shown_path(run_dir)} exists and is not a directory")
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise path_problem(what, run_dir, exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            again = " or choose another --out" if what == "out" else ""
            raise ConfigError(
                f"{what}: {shown_path(run_dir)} is in use by another commsgd run{_holder(fd)}; "
                f"wait for it to end{again}"
            ) from None
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise path_problem(what, run_dir, exc) from None
            say(
                f"commsgd: warning: {what}: {shown_path(run_dir)}: this file system cannot lock files "
                f"({exc.strerror}); nothing keeps another run out of this directory"
            )
        with contextlib.suppress(OSError):  # who holds it, for the message of a refused run
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock

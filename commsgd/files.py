"""Atomic file writes: a reader (or a resumed run) sees the old file or the whole new one, never a part."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(
    path: Path, write: Callable[[BinaryIO], object], *, durable: bool = False, mode: int | None = None
) -> None:
    """Write `path` through `write(handle)` into a temp file beside it, then rename it into place.

    The temp file is ``.<name>.<random>.tmp`` in the same directory (so the rename is atomic and
    concurrent writers never share one) and is removed if anything fails. `durable` also fsyncs the
    file and the directory entry, so the new file survives a power loss; `mode` sets its permissions
    (mkstemp makes files readable by their owner only).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable: flush the directory entry too (where the platform allows it)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

"""Atomic checkpoints, one file per worker per step, loaded without executing code.

Layout: ``RUN_DIR/checkpoints/step00000100/rank{r}.pt``. Each file is written to a temporary name
in the same directory, flushed to disk and renamed, so a crash never leaves a half-written file under
the final name. Loading uses ``torch.load(weights_only=True)``: tensors and plain data only; a file
holding anything else (e.g. a pickled callable) is refused. On resume the workers agree on the newest
step that every one of them can load; a truncated or corrupt file makes that worker fall back to an
older step, with a warning.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from commsgd.errors import CheckpointError
from commsgd.files import write_atomically

_STEP_DIR = re.compile(r"^step(\d{8})$")


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def checkpoint_path(run_dir: Path, step: int, rank: int) -> Path:
    return checkpoint_root(run_dir) / f"step{step:08d}" / f"rank{rank}.pt"


def save_checkpoint(run_dir: Path, step: int, rank: int, state: dict[str, Any]) -> Path:
    """Write one worker's state for `step` atomically and durably (temp file + fsync + rename)."""
    path = checkpoint_path(run_dir, step, rank)
    write_atomically(path, lambda handle: torch.save(state, handle), durable=True)
    return path


def saved_steps(run_dir: Path, rank: int) -> list[int]:
    """Steps for which this rank has a checkpoint file, newest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    steps = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and (entry / f"rank{rank}.pt").is_file():
            steps.append(int(match.group(1)))
    return sorted(steps, reverse=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load one checkpoint file safely; any problem is a CheckpointError naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: not found") from None
    except Exception as exc:  # truncated zip, bad pickle, a global outside the allow-list, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path}: cannot be loaded safely ({reason[:200]})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint {path}: not a commsgd checkpoint")
    return state


def loadable_steps(run_dir: Path, rank: int, limit: int) -> list[int]:
    """Up to `limit` newest steps whose file for `rank` loads; warns about (and skips) bad files."""
    good = []
    for step in saved_steps(run_dir, rank):
        try:
            load_checkpoint(checkpoint_path(run_dir, step, rank))
        except CheckpointError as exc:
            warnings.warn(f"{exc}; falling back to an older checkpoint", stacklevel=2)
            continue
        good.append(step)
        if len(good) >= limit:
            break
    return good


def prune_checkpoints(run_dir: Path, rank: int, keep: int) -> None:
    """Delete this rank's files beyond the newest `keep` steps; remove step folders left empty.

    Also removes this rank's temporary files left by a save that was killed (called right after a
    save of this rank has completed, so none of them is being written).
    """
    root = checkpoint_root(run_dir)
    for leftover in root.glob(f"step*/.rank{rank}.*.tmp") if root.is_dir() else []:
        leftover.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            leftover.parent.rmdir()
    for step in saved_steps(run_dir, rank)[keep:]:
        path = checkpoint_path(run_dir, step, rank)
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # other ranks' files are still there
            path.parent.rmdir()


def remove_all(run_dir: Path) -> None:
    shutil.rmtree(checkpoint_root(run_dir), ignore_errors=True)

"""Atomic, checksummed checkpoints, one file per worker per checkpoint, loaded without executing code.

Layout: ``RUN_DIR/checkpoints/step00000100/rank{r}.pt``. The folder's number is the checkpoint's
*label*: the step for synchronous algorithms, the job's virtual step (job iterations / workers) for
asynchronous ones, so that every worker's file of one checkpoint carries the same label while it
holds that worker's own local step and data position.

Writing: a temporary file in the same folder, flushed, fsynced and renamed (`commsgd.files`). The
file is torch's zip with the SHA-256 of all its bytes before the zip comment written as that comment
(``commsgd-sha256:<hex>``): one file, renamed into place at once, still a valid zip for `torch.load`.

Loading: the checksum is verified before anything is unpickled (a flipped bit is a damaged file, not
silently different numbers), then ``torch.load(weights_only=True)`` rebuilds tensors and plain data
only; a file holding anything else (e.g. a pickled callable) is refused. Files without the comment
(written before checksums existed) load unverified (`has_checksum` says which). On resume the
workers agree on the newest label that every one of them can load; a damaged file makes that worker
fall back to an older label, with a warning.

Pruning keeps, per worker, every checkpoint newer than the newest one all workers have completed
plus the newest `keep` of the rest, so a checkpoint common to all workers always stays on disk.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import pickle
import re
import shutil
import struct
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, cast

import torch

from commsgd.errors import CheckpointError, WorkerError
from commsgd.files import write_atomically

_STEP_DIR = re.compile(r"^step(\d{8})$")
_MARK = b"commsgd-sha256:"
_COMMENT_LEN = len(_MARK) + 64  # the zip comment: the mark and a hex SHA-256
_END_LEN = 22  # a zip's end-of-central-directory record (without its comment)
_END_SIG = b"PK\x05\x06"


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def checkpoint_path(run_dir: Path, step: int, rank: int) -> Path:
    return checkpoint_root(run_dir) / f"step{step:08d}" / f"rank{rank}.pt"


class _SealingWriter:
    """What `torch.save` writes into: passes the bytes on and hashes them, holding back the zip's end
    record so that `seal` can give the zip a comment that carries the hash."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.digest, self.tail = raw, hashlib.sha256(), b""
        self.error: OSError | None = None  # torch turns a failed write into its own RuntimeError

    def _emit(self, data: bytes | memoryview) -> None:
        try:
            self.raw.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise
        self.digest.update(data)

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        if len(view) >= _END_LEN:
            self._emit(self.tail)
            self._emit(view[:-_END_LEN])
            self.tail = bytes(view[-_END_LEN:])
        else:
            joined = self.tail + bytes(view)
            self._emit(joined[:-_END_LEN] if len(joined) > _END_LEN else b"")
            self.tail = joined[-_END_LEN:]
        return len(view)

    def flush(self) -> None:
        self.raw.flush()

    def seal(self) -> None:
        end = self.tail
        if len(end) != _END_LEN or not end.startswith(_END_SIG) or end[-2:] != b"\0\0":
            raise RuntimeError("torch.save did not end its zip with an end record without comment")
        self._emit(end[:-2] + struct.pack("<H", _COMMENT_LEN))
        self.raw.write(_MARK + self.digest.hexdigest().encode())


def save_checkpoint(run_dir: Path, step: int, rank: int, state: dict[str, Any]) -> Path:
    """Write one worker's state for checkpoint `step` atomically and durably, with its checksum.

    An OS error (a full disk, a read-only or vanished folder) is a one-line `WorkerError`; the temp
    file is removed and every earlier checkpoint is left as it was.
    """
    path = checkpoint_path(run_dir, step, rank)

    def write(handle: BinaryIO) -> None:
        sealed = _SealingWriter(handle)
        try:
            torch.save(state, cast(BinaryIO, sealed))  # it has what torch.save uses: write, flush
        except Exception:
            if sealed.error is not None:  # e.g. a full disk, which torch reports as "unexpected pos"
                raise sealed.error from None
            raise
        sealed.seal()

    _write(run_dir, rank, path, write)
    return path


def _write(run_dir: Path, rank: int, path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write_atomically(path, write, durable=True)`; an OS error is a one-line `WorkerError`."""
    try:
        write_atomically(path, write, durable=True)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            what = f"disk full while saving checkpoint {path} ({reason})"
        else:
            what = f"cannot save checkpoint {path} ({reason})"
        raise WorkerError(
            f"rank {rank}: {what}; the earlier checkpoints are intact: fix this, then continue with "
            f"--resume {run_dir}"
        ) from None


def _complete_record(run_dir: Path, rank: int) -> Path:
    return checkpoint_root(run_dir) / f"complete.rank{rank}"


def record_complete(run_dir: Path, rank: int, step: int) -> None:
    """Note on disk that every worker has finished checkpoint `step` (this rank's own record, so that
    it works without a shared file system): from then on, finding no common checkpoint is a loss."""
    _write(run_dir, rank, _complete_record(run_dir, rank), lambda handle: handle.write(f"{step}\n".encode()))


def recorded_complete(run_dir: Path, rank: int) -> int | None:
    """The newest checkpoint this rank has recorded as finished by every worker, None if none."""
    try:
        return int(_complete_record(run_dir, rank).read_text(encoding="ascii").strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def saved_steps(run_dir: Path, rank: int) -> list[int]:
    """Labels for which this rank has a checkpoint file, newest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    steps = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and (entry / f"rank{rank}.pt").is_file():
            steps.append(int(match.group(1)))
    return sorted(steps, reverse=True)


def _sealed(data: bytes) -> bool:
    """Whether `data` ends with a zip end record whose comment is a commsgd checksum."""
    end = data[-_COMMENT_LEN - _END_LEN : -_COMMENT_LEN]
    return (
        len(data) >= _COMMENT_LEN + _END_LEN
        and data[-_COMMENT_LEN:].startswith(_MARK)
        and end.startswith(_END_SIG)
        and struct.unpack("<H", end[-2:])[0] == _COMMENT_LEN
    )


def _unsealed_zip(data: bytes) -> bool:
    """Whether `data` ends like a zip without a comment: a file from before checksums."""
    return len(data) >= _END_LEN and data[-_END_LEN:].startswith(_END_SIG) and data[-2:] == b"\0\0"


def has_checksum(path: Path) -> bool:
    """Whether the checkpoint file carries a checksum (files written before checksums do not)."""
    with open(path, "rb") as handle:
        handle.seek(0, io.SEEK_END)
        handle.seek(max(0, handle.tell() - _COMMENT_LEN - _END_LEN))
        return _sealed(handle.read())


def _checked_bytes(path: Path) -> bytes:
    """The file's bytes once its checksum matches (or it is a whole zip from before checksums)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: not found") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({exc.strerror or exc})") from None
    if _sealed(data):
        if hashlib.sha256(data[:-_COMMENT_LEN]).hexdigest().encode() != data[-64:]:
            raise CheckpointError(
                f"checkpoint {path}: checksum mismatch: its bytes changed after it was written "
                "(a damaged disk, memory or copy)"
            )
        return data
    if _unsealed_zip(data):
        return data
    raise CheckpointError(f"checkpoint {path}: truncated or damaged (it does not end like a checkpoint)")


def _unpickling_problem(exc: Exception) -> str:
    """What went wrong in torch.load, in commsgd's words: never torch's advice to load unsafely."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", text)
        if found:
            what = f"loading it would call {found.group(1)}"
        else:
            detail = re.search(r"WeightsUnpickler error: (.*?)(?:\. |\n|$)", text)
            what = f"it holds {detail.group(1) if detail else 'objects'}"[:120]
        what = "".join(c for c in what if c.isprintable())
        return (
            f"refused: {what}, and commsgd loads only tensors and plain data from checkpoints "
            "(nothing in the file was run)"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"cannot be read ({''.join(c for c in first if c.isprintable())[:120]})"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load one checkpoint file safely; any problem is a one-line CheckpointError naming the file."""
    data = _checked_bytes(path)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged zip, a bad pickle, a global outside the allow-list, ...
        raise CheckpointError(f"checkpoint {path}: {_unpickling_problem(exc)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint {path}: not a commsgd checkpoint (no step)")
    meta = state.get("meta")
    if not (
        isinstance(meta, dict)
        and isinstance(meta.get("algorithm"), str)
        and isinstance(meta.get("world_size"), int)
    ):
        raise CheckpointError(
            f"checkpoint {path}: its metadata (algorithm, world size, config) is missing, so it cannot "
            "be matched to this run"
        )
    return state


def loadable_steps(run_dir: Path, rank: int, limit: int) -> list[int]:
    """Up to `limit` newest labels whose file for `rank` loads; warns about (and skips) bad files."""
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


def _listing(loadable: Sequence[Sequence[int]], saved: Sequence[Sequence[int]]) -> str:
    """What each rank has, for a one-line message: ``rank 0: steps 26, 13; rank 1: none``."""

    def steps(labels: Sequence[int]) -> str:
        return ", ".join(map(str, labels[:6])) + (", ..." if len(labels) > 6 else "")

    parts = []
    for rank, (good, files) in enumerate(zip(loadable, saved)):
        if good:
            parts.append(f"rank {rank}: steps {steps(good)}")
        elif files:
            parts.append(f"rank {rank}: none that loads (files for steps {steps(files)})")
        else:
            parts.append(f"rank {rank}: none")
    if len(parts) > 8:
        parts = [*parts[:8], f"{len(parts) - 8} more ranks"]
    return "; ".join(parts)


def agreed_label(
    run_dir: Path,
    loadable: Sequence[Sequence[int]],
    saved: Sequence[Sequence[int]],
    completed: Sequence[int | None],
    *,
    resume: bool,
) -> int | None:
    """The newest label that every worker can load (rank r's labels: `loadable[r]`, files `saved[r]`,
    `completed[r]` its `recorded_complete`).

    None when there is nothing to restore: no worker has a checkpoint file, or no worker has ever
    recorded a checkpoint as finished by all of them (the job failed before its first complete
    checkpoint: a fresh start loses nothing that could be resumed). Otherwise a missing common label
    is a one-line CheckpointError naming what each worker has (starting again would throw work
    away), as is any `resume` without a common label.
    """
    common = set(loadable[0]).intersection(*map(set, loadable[1:])) if loadable else set()
    if common:
        return max(common)
    written = set().union(*map(set, saved))
    if not resume and (not written or all(c is None for c in completed)):
        return None
    if not written:
        raise CheckpointError(f"resume {run_dir}: no checkpoint to resume from")
    raise CheckpointError(
        f"resume {run_dir}: no checkpoint is common to all workers, so the run cannot continue from "
        f"one ({_listing(loadable, saved)}); nothing in the run directory was changed"
    )


def _remove(run_dir: Path, step: int, rank: int) -> None:
    path = checkpoint_path(run_dir, step, rank)
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # other ranks' files are still there
        path.parent.rmdir()


def prune_checkpoints(run_dir: Path, rank: int, keep: int, complete: int | None) -> None:
    """Delete this rank's checkpoints that no resume can need; remove step folders left empty.

    `complete` is the newest label that every worker has finished writing (None: none is known).
    Kept: every label above it (the others may still be writing theirs) and the newest `keep` labels
    at or below it, so the newest complete checkpoint is never deleted by anyone. Also removes this
    rank's temporary files left by a save that was killed (called right after a save of this rank
    has completed, so none of them is being written).
    """
    root = checkpoint_root(run_dir)
    for leftover in root.glob(f"step*/.rank{rank}.*.tmp") if root.is_dir() else []:
        with contextlib.suppress(OSError):
            leftover.unlink(missing_ok=True)
            leftover.parent.rmdir()
    if complete is None:
        return
    finished = [step for step in saved_steps(run_dir, rank) if step <= complete]
    for step in finished[keep:]:
        _remove(run_dir, step, rank)


def discard_newer(run_dir: Path, rank: int, step: int) -> list[int]:
    """Delete this rank's checkpoints newer than `step` (after a restore from `step`: the others never
    completed them, and the resumed run writes its own); returns their labels."""
    newer = [s for s in saved_steps(run_dir, rank) if s > step]
    for s in newer:
        _remove(run_dir, s, rank)
    return newer


def remove_all(run_dir: Path) -> None:
    shutil.rmtree(checkpoint_root(run_dir), ignore_errors=True)

"""Run-directory records: ``metrics/rank{r}.jsonl``, ``eval.jsonl``, ``summary.json``, the end table.

A run directory holds everything a report needs:

    config.yaml            the resolved configuration
    metrics/rank{r}.jsonl  per logged step: loss, lr, cumulative bytes and seconds (compute/comm/wait)
    eval.jsonl             evaluations of the center variable: step, wall_s, test_loss, test_error
    events/rank{r}.jsonl   algorithm events (e.g. leader changes)
    summary.json           final per-worker totals and the final evaluation
    checkpoints/           see commsgd.checkpoint
"""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch

from commsgd.files import write_atomically


class JsonlLog:
    """An append-only JSON-lines file that can be cut back to a step (used after a resume)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle: IO[str] | None = None

    def truncate_after(self, step: int) -> None:
        """Drop records with ``step > step`` (they are recomputed after resuming from `step`).

        The file is replaced atomically through a temporary file of its own (a fixed temp name could
        be shared with another writer); an open append handle is closed first, since it would go on
        writing into the replaced file.
        """
        self.close()
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if int(record.get("step", 0)) <= step:
                kept.append(line)
        text = "".join(k + "\n" for k in kept).encode("utf-8")
        write_atomically(self.path, lambda handle: handle.write(text), mode=0o644)

    def write(self, record: dict[str, Any]) -> None:
        if self._handle is None:
            self._handle = self.path.open("a", encoding="utf-8")
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def peak_memory_mb(device: torch.device) -> float:
    """Peak resident memory of this process (CPU) or peak allocated memory (CUDA), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def write_json_atomic(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2) + "\n"
    write_atomically(path, lambda handle: handle.write(text.encode("utf-8")), mode=0o644)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


#: the final table lists every parameter when they fit in this many characters, else the ones set
SHORT_PARAMETERS = 60


def parameters_text(summary: dict[str, Any]) -> str:
    """The algorithm's parameters for the table: all when short, else those set away from defaults."""
    params: dict[str, Any] = summary["algorithm_params"]
    if not params:
        return "none"
    every = " ".join(f"{k}={_value(v)}" for k, v in params.items())
    if len(every) <= SHORT_PARAMETERS:
        return every
    set_ = [k for k in summary.get("algorithm_params_set", []) if k in params]
    more = f"`commsgd list {summary['algorithm']}` for all"
    if not set_:
        return f"defaults ({more})"
    return " ".join(f"{k}={_value(params[k])}" for k in set_) + f" (others default; {more})"


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def node_layout_text(counts: Sequence[int]) -> str:
    """``2 nodes x 4 workers``, or each node's count when they differ (``3 nodes: 4+4+2 workers``)."""
    nodes = f"{len(counts)} node{'s' if len(counts) != 1 else ''}"
    if len(set(counts)) == 1:
        return f"{nodes} x {counts[0]} worker{'s' if counts[0] != 1 else ''}"
    return f"{nodes}: {'+'.join(map(str, counts))} workers"


def _wall_clock(summary: dict[str, Any]) -> str:
    """The run's wall-clock time, with the evaluations' part of it when timed and, with the start-up
    known, the total the user waited."""
    wall = summary["wall_time_s"]
    evals = max(summary.get("eval_time_s") or [0.0])
    text = f"{wall:.1f} s" + (f" (evaluations {evals:.1f} s)" if evals > 0 else "")
    if "startup_s" not in summary:
        return text
    return f"{text}, {wall + summary['startup_s']:.1f} s with start-up"


def summary_table(summary: dict[str, Any]) -> str:
    """The short table printed at the end of `commsgd train`."""
    rows = [
        (
            "algorithm",
            f"{summary['algorithm']} ({summary['world_size']} workers, {summary['model']} on "
            f"{summary['dataset']})",
        ),
        (
            "steps per worker",
            f"{min(summary['steps'])}"
            + (f"-{max(summary['steps'])}" if max(summary["steps"]) != min(summary["steps"]) else ""),
        ),
        ("test error", f"{100 * summary['test_error']:.2f} %"),
        ("test loss", f"{summary['test_loss']:.4f}"),
        ("wall-clock time", _wall_clock(summary)),
        ("bytes sent per worker", human_bytes(mean(summary["bytes_sent"]))),
        ("bytes sent per step", human_bytes(mean(summary["bytes_per_step"]))),
        ("communication share", f"{100 * mean(summary['comm_share']):.1f} % of training time"),
    ]
    if "test_bits_per_char" in summary:  # character-level text
        rows.insert(4, ("test bits per character", f"{summary['test_bits_per_char']:.4f}"))
    # summaries written before these were recorded lack them
    if "algorithm_params" in summary:
        rows.insert(1, ("parameters", parameters_text(summary)))
    if "workers_per_node" in summary:
        rows.insert(2, ("node layout", node_layout_text(summary["workers_per_node"])))
    if "startup_s" in summary:
        at = [key for key, _ in rows].index("wall-clock time")
        rows.insert(at, ("start-up", f"{summary['startup_s']:.1f} s from the command to the first step"))
    if "data_share" in summary:  # summaries written before data time was measured lack it
        rows.append(("data share", f"{100 * mean(summary['data_share']):.1f} % of step time"))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    body = "\n".join(f"{k.ljust(width)} | {v}" for k, v in rows)
    return f"{line}\n{body}\n{line}"

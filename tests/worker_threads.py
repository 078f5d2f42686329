"""Threads standing in for the workers of a job, for tests of the store protocols (no processes)."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_workers(worker: Callable[[int], None], world: int, timeout_s: float = 60) -> None:
    """Run `worker(rank)` for every rank in its own thread and wait; fail if any of them hangs."""
    threads = [threading.Thread(target=worker, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not any(t.is_alive() for t in threads), "a worker hangs"

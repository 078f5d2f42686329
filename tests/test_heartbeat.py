"""The heartbeat thread of a context that is never closed ends before the interpreter finalizes.

A daemon thread still inside a store call during finalization aborts the process ("terminate called
without an active exception", exit code 134); `commsgd.init()` users rarely close their context.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import timedelta

import pytest
import torch.distributed as dist

from commsgd import context
from commsgd.launch import free_port

# Beats without a pause, so that the thread is inside a store call at almost any moment: without the
# exit hook this script aborted in 20 runs out of 20.
UNCLOSED = """
import time
from datetime import timedelta
import torch.distributed as dist
from commsgd.context import Heartbeat
from commsgd.launch import free_port
store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True, timeout=timedelta(seconds=30))
heartbeat = Heartbeat(store, 0, 2, 0.0)
time.sleep(0.2)
"""


def test_exit_with_a_running_heartbeat_is_clean() -> None:
    done = subprocess.run([sys.executable, "-c", UNCLOSED], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "terminate" not in done.stderr


def test_the_exit_hook_halts_running_heartbeats_without_a_status() -> None:
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True, timeout=timedelta(seconds=30))
    heartbeat = context.Heartbeat(store, 0, 2, 0.01)
    assert heartbeat._thread.is_alive() and heartbeat in context._RUNNING
    context._halt_heartbeats_at_exit()
    assert not heartbeat._thread.is_alive() and heartbeat not in context._RUNNING
    assert not store.check(["status/rank0"])  # halted, not "exited": the process may be failing


def test_beats_use_a_bounded_connection_of_their_own() -> None:
    """Each beat waits at most max(1 s, interval) for the store, on a clone; the job store keeps its own."""
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True, timeout=timedelta(seconds=30))
    heartbeat = context.Heartbeat(store, 0, 2, 2.0)
    try:
        assert heartbeat._beat_store is not store
        assert heartbeat._beat_store.timeout == timedelta(seconds=2)
        assert store.timeout == timedelta(seconds=30)
    finally:
        heartbeat.halt()


def test_a_failed_beat_does_not_end_the_heartbeat() -> None:
    """A store call that fails once (slow or briefly unreachable store) is retried at the next beat."""

    class FlakyStore:
        def __init__(self) -> None:
            self.calls, self.counts = 0, 0

        def clone(self) -> FlakyStore:
            return self

        def set_timeout(self, _: timedelta) -> None:
            pass

        def add(self, _key: str, amount: int) -> int:
            self.calls += 1
            if self.calls <= 2:
                raise RuntimeError("timed out")
            self.counts += amount
            return self.counts

    store = FlakyStore()
    heartbeat = context.Heartbeat(store, 0, 2, 0.01)
    try:
        for _ in range(500):
            if store.counts >= 3:
                break
            threading.Event().wait(0.01)
    finally:
        heartbeat.halt()
    assert store.counts >= 3


def test_a_beat_stuck_in_the_store_is_said_at_halt(capsys: pytest.CaptureFixture[str]) -> None:
    """A store server that stops answering holds a beat beyond its timeout (TCPStore's timeout does
    not bound `add`); halt cannot end that thread, so it says so instead of returning as if it had."""

    class StuckStore:
        def __init__(self) -> None:
            self.entered, self.release = threading.Event(), threading.Event()

        def clone(self) -> StuckStore:
            return self

        def set_timeout(self, _: timedelta) -> None:
            pass

        def add(self, _key: str, amount: int) -> int:
            self.entered.set()
            self.release.wait(30)
            return amount

    store = StuckStore()
    heartbeat = context.Heartbeat(store, 3, 4, 0.01)
    try:
        assert store.entered.wait(10)
        assert heartbeat.halt() is False
    finally:
        store.release.set()
        heartbeat._thread.join(10)
    err = capsys.readouterr().err
    assert "rank 3: the heartbeat thread is still inside a store call" in err
    assert not heartbeat._thread.is_alive()

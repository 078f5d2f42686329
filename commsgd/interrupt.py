"""Stopping a run on SIGINT / SIGTERM: the workers agree on one step, save it and exit 128 + signal.

A worker's signal handler only records the signal (`Signals`). The training loop asks a
`StopAgreement` at every step boundary whether to stop; the agreement lives in the job's store:

* ``interrupt/stop`` holds the stop step S. A worker that got a signal proposes the first check step
  after its own step (check steps are the multiples of `CHECK_EVERY`, and the last step); the first
  proposal wins. Workers without a signal of their own read the key at each check step (one store
  round trip every `CHECK_EVERY` steps: a round trip costs about 0.1 ms, a step of the smallest
  model about 1 ms).
* A worker that is already past S when it first sees the key raises S to its next check step
  (compare-and-set, so S only grows).
* A worker at S adds itself to ``interrupt/arrived/S`` and waits. When all workers arrived at the
  current S, none of them can move any more, so S is final: all save the checkpoint of S.

Why nobody waits forever in a collective: S is always a step after the proposer's own step, so in
an algorithm whose collectives belong to step numbers (`Algorithm.step_aligned`) a peer can only
finish step S after the proposer has entered it, that is after the key was written, and its check
at S sees the key. Asynchronous algorithms (rounds on a job-wide counter, a parameter server with a
job budget) have no such step: there each worker stops at the first check where it sees the key or
its own signal, without a new checkpoint; the run resumes from its last periodic checkpoint.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from commsgd.comm import Communicator

#: the signals that stop a run at a step boundary (what Ctrl-C and schedulers send)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: workers without a signal of their own look at the store every this many steps
CHECK_EVERY = 10
_STOP = "interrupt/stop"
_SIGNAL = "interrupt/signal"
#: what the store's signal key holds when `max_seconds` ended the run (no real signal is 0)
TIME_LIMIT = 0


def exit_code(signum: int) -> int:
    """The shell's code for a process ended by `signum`: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signum


class Interrupted(BaseException):
    """The workers stopped on a signal (a BaseException: no `except Exception` takes it for a crash).

    `step` is the step every worker saved, or None when nothing was saved (asynchronous algorithms).
    """

    def __init__(self, signum: int, step: int | None) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step


@dataclass
class Signals:
    """The first stop signal this process got (None: none yet); later ones are ignored.

    Ctrl-C reaches a worker twice (from the terminal and forwarded by the launcher's agent): both
    mean the same request.
    """

    signum: int | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum


#: this process's signals (set by `install`, read by the training loop and the worker entry)
RECEIVED = Signals()


def install() -> Signals:
    """Record SIGINT and SIGTERM instead of dying on them (call in the worker's main thread)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, RECEIVED.handle)
    return RECEIVED


class StopAgreement:
    """One worker's side of the stop protocol (see the module docstring)."""

    def __init__(
        self,
        comm: Communicator,
        store: Any,
        rank: int,
        world_size: int,
        last_step: int,
        aligned: bool,
        timeout_s: float,
        peers_lost: Callable[[], bool] | None = None,
        signals: Signals = RECEIVED,
        check_every: int = CHECK_EVERY,
    ) -> None:
        self.comm, self.store, self.rank, self.world_size = comm, store, rank, world_size
        self.check_every = check_every  # the same on every worker: they must check at the same steps
        self.last_step, self.aligned, self.timeout_s, self.signals = last_step, aligned, timeout_s, signals
        self.peers_lost = peers_lost  # e.g. the heartbeats: a dead peer never arrives, stop waiting
        self.target: int | None = None  # the stop step once known
        self.limit_reached = False  # rank 0 set it: `max_seconds` passed, stop as on a signal

    def own(self) -> int | None:
        """This worker's reason to stop: its signal, else TIME_LIMIT once `limit_reached`, else None."""
        if self.signals.signum is not None:
            return self.signals.signum
        return TIME_LIMIT if self.limit_reached else None

    def check_step(self, step: int) -> bool:
        return step % self.check_every == 0 or step >= self.last_step

    def next_check(self, step: int) -> int | None:
        """The first check step after `step` that the loop still reaches; None past the end."""
        if step >= self.last_step:
            return None
        return min((step // self.check_every + 1) * self.check_every, self.last_step)

    def signum(self) -> int:
        """The signal that stopped the job (TIME_LIMIT: `max_seconds`): this worker's own, else the
        one the store holds."""
        own = self.own()
        if own is not None:
            return own
        if self.world_size == 1:
            return int(signal.SIGINT)
        with self.comm.meter.in_phase("control"):
            return int(self.comm.store_get(self.store, _SIGNAL))

    def should_stop(self, step: int) -> bool:
        """Called after `step`: True when every worker stops here (aligned) or this one does (async)."""
        own = self.own()
        if self.world_size == 1:
            return own is not None
        if self.target is None:
            if own is not None:
                self._first_signal(own)
            if not self.aligned:
                if own is None and not (self.check_step(step) and self._requested()):
                    return False
                self._propose(step + 1)  # tells the others; the value does not matter here
                return True
            if self.check_step(step) and self._requested():
                self.target = self._read()
            elif own is None:
                return False
            else:
                want = self.next_check(step)
                if want is None:
                    return False  # the run ends at this step anyway: its final checkpoint is saved
                self.target = self._propose(want, only_first=True)
        if not self.aligned:
            return True
        if step > self.target:  # got here before the key was written: stop a little later
            self.target = self._propose(self.next_check(step) or step + 1)
        if step < self.target:
            return False
        return self._wait_at(step)

    # ---------------------------------------------------------------- the store

    def _requested(self) -> bool:
        with self.comm.meter.in_phase("control"):
            return self.comm.store_check(self.store, _STOP)

    def _read(self) -> int:
        with self.comm.meter.in_phase("control"):
            return int(self.comm.store_get(self.store, _STOP))

    def _first_signal(self, signum: int) -> None:
        with self.comm.meter.in_phase("control"):
            self.comm.store_compare_set(self.store, _SIGNAL, b"", str(signum).encode())

    def _propose(self, want: int, only_first: bool = False) -> int:
        """Make the stop step at least `want` (compare-and-set: it only grows); returns it.

        `only_first`: set it only if nobody did yet, and take the step already there otherwise.
        """
        with self.comm.meter.in_phase("control"):
            current = self.comm.store_compare_set(self.store, _STOP, b"", str(want).encode())
            while not only_first and int(current) < want:
                current = self.comm.store_compare_set(self.store, _STOP, current, str(want).encode())
        return int(current)

    def _wait_at(self, step: int) -> bool:
        """Wait at the stop step until everyone is here (True) or the step was raised (False)."""
        arrived = f"interrupt/arrived/{step}"
        with self.comm.meter.in_phase("control"):
            self.comm.store_add(self.store, arrived, 1)
        started = time.monotonic()
        pause = 0.002
        while True:
            current = self._read()
            if current != step:
                self.target = current
                return False
            with self.comm.meter.in_phase("control"):
                if self.comm.store_add(self.store, arrived, 0) >= self.world_size:
                    return True
            waited = time.monotonic() - started
            lost = waited > 1.0 and self.peers_lost is not None and self.peers_lost()
            if lost or waited > self.timeout_s:
                raise TimeoutError(
                    f"rank {self.rank}: interrupted, but not every worker reached step {step} "
                    f"({'a peer is gone' if lost else f'waited {self.timeout_s:g} s'})"
                )
            time.sleep(pause)
            pause = min(0.05, pause * 2)


def common_checkpoint(run_dir: Path, world_size: int) -> int | None:
    """The newest step for which every rank has a checkpoint file (what `--resume` starts from)."""
    from commsgd.checkpoint import saved_steps

    steps = [set(saved_steps(run_dir, rank)) for rank in range(world_size)]
    common = set.intersection(*steps) if steps else set()
    return max(common) if common else None


def interrupted_line(run_dir: Path, step: int | None) -> str:
    """The one line `commsgd train` prints when a signal stopped it."""
    if step is None:
        return "commsgd: interrupted before the first checkpoint; nothing to resume, start the run again"
    return f"commsgd: interrupted at step {step}; resume with `commsgd train --resume {run_dir}`"

"""One clock for the whole job: wall-clock learning-rate drops (`optim.drop_seconds`) by rank 0's time.

Each worker reading its own clock drops its rate at its own step (the clocks start apart, a slowed
worker reaches the mark in the middle of another step), and the replicas of a synchronous algorithm
then never agree again. So rank 0's clock decides, at decision boundaries: before the first step a
worker runs (also after a resume) and after every `EVERY`-th step. Between two of them the job clock
stands still, so a drop comes at most `EVERY` steps after rank 0's clock passed the mark.

* Algorithms whose workers advance together (`Algorithm.lockstep`: the synchronous ones, and the
  synchronous rounds of local SGD, LSGD, EASGD, D-PSGD): at the boundary after step t rank 0 writes
  its elapsed seconds to the store key ``jobclock/t`` and every other worker reads that key, waiting
  for rank 0 to get there if it is behind (no worker is far ahead of another, so the wait is short;
  it would wait at the next collective anyway). Every worker drops at the same step. No deadlock: a
  worker waiting at step t has done its part of every collective before t.
* Workers at their own pace (parameter servers, asynchronous rounds): rank 0 writes
  ``jobclock/latest`` at its boundaries and the others read whatever it holds at theirs, without
  waiting (rank 0 may have finished). A worker drops within `EVERY` of its own steps after it sees
  rank 0 pass the mark; the workers are at different steps anyway.

The cost: one store round trip per worker every `EVERY` steps (about 0.1 ms each), and none once the
job clock has passed every mark. With one worker its own clock decides at every step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from commsgd.comm import Communicator

#: decision boundaries: after every this many steps (and before a worker's first step)
EVERY = 10
_LATEST = "jobclock/latest"


class JobClock:
    """One worker's side: `seconds(step, own_s)` is the job's elapsed time for the step after `step`."""

    def __init__(
        self,
        comm: Communicator,
        store: Any,
        rank: int,
        world_size: int,
        marks: list[float],
        lockstep: bool,
    ) -> None:
        self.comm, self.store, self.rank, self.world_size = comm, store, rank, world_size
        self.last_mark = max(marks, default=0.0)
        self.lockstep = lockstep
        self.job_s = 0.0
        self._started = False

    def seconds(self, step: int, own_s: float) -> float:
        """The job's clock at the boundary after `step`, given this worker's own elapsed `own_s`."""
        if self.world_size == 1:
            return own_s
        first, self._started = not self._started, True
        if (not first and step % EVERY != 0) or self.job_s >= self.last_mark:
            return self.job_s  # between boundaries, or every mark passed: nothing more to agree on
        with self.comm.meter.in_phase("control"):
            if self.rank == 0:
                value = repr(max(self.job_s, own_s)).encode()
                self.comm.store_set(self.store, f"jobclock/{step}" if self.lockstep else _LATEST, value)
            elif self.lockstep:
                value = self.comm.store_get(self.store, f"jobclock/{step}")
            elif self.comm.store_check(self.store, _LATEST):
                value = self.comm.store_get(self.store, _LATEST)
            else:
                return self.job_s
        self.job_s = max(self.job_s, float(value))
        return self.job_s


__all__ = ["EVERY", "JobClock"]

"""An asynchronous parameter server: the center variable on rank 0, served by a thread over gloo.

Rank 0 holds the center (`Center`) and runs `ServerThread`, which answers the other workers' requests
one at a time, in the order their headers arrive, with point-to-point ops on a process group that
carries only this traffic (on rank 0 only the server thread uses it). Rank 0 is also a worker: it
reads and updates the center in process (`LocalClient`), under the same lock, sending no bytes.

A request is one header, ``[op, based_on, 0, 0]`` (int64), followed by the pushed update (one flat
tensor per dtype) when ``op`` has `PUSH`; with `FETCH` the server replies with a header
``[version, 0, 0, 0]`` and the center. `DONE` tells the server that this worker has finished; the
thread ends once every other worker has said so. Every message goes through a `Communicator`: the
workers' through their own, the server's through one of its own (its meter is the server's traffic).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from commsgd.comm import CommGroup, Communicator

PUSH, FETCH, DONE = 1, 2, 4
HEADER_LEN = 4
SERVER_RANK = 0


def header(*values: int) -> torch.Tensor:
    """A request or reply header: the values, padded with zeros to `HEADER_LEN` int64."""
    out = torch.zeros(HEADER_LEN, dtype=torch.int64)
    out[: len(values)] = torch.tensor(values, dtype=torch.int64)
    return out


@dataclass
class ServerStats:
    """What the server did: per-worker pushes and fetches, staleness of pushes, idle time."""

    pushes: list[int]
    fetches: list[int]
    staleness_sum: int = 0
    staleness_max: int = 0
    idle_s: float = 0.0
    busy_s: float = 0.0
    #: pushes applied per worker since this process started (not restored: compared within one run)
    session_pushes: list[int] = field(default_factory=list)

    def record_push(self, rank: int, staleness: int) -> None:
        self.pushes[rank] += 1
        self.session_pushes[rank] += 1
        self.staleness_sum += staleness
        self.staleness_max = max(self.staleness_max, staleness)

    def summary(self) -> dict[str, Any]:
        total = sum(self.pushes)
        alive = self.idle_s + self.busy_s
        return {
            "pushes_applied": self.pushes,
            "fetches_served": self.fetches,
            "mean_staleness": self.staleness_sum / total if total else 0.0,
            "max_staleness": self.staleness_max,
            "busy_share": self.busy_s / alive if alive > 0 else 0.0,
        }


class Center:
    """The center variable (one flat tensor per dtype) and its version (pushes applied so far)."""

    def __init__(self, tensors: Sequence[torch.Tensor], world_size: int) -> None:
        self.tensors = [t.detach().clone() for t in tensors]
        self.version = 0
        self.stats = ServerStats([0] * world_size, [0] * world_size, session_pushes=[0] * world_size)
        self.changed = threading.Condition()

    def apply(self, rank: int, deltas: Sequence[torch.Tensor], based_on: int) -> None:
        """c += delta; the staleness is the number of pushes applied since the version `based_on`."""
        with self.changed:
            for c, d in zip(self.tensors, deltas):
                c.add_(d)
            self.stats.record_push(rank, self.version - based_on)
            self.version += 1
            self.changed.notify_all()

    def read(self, into: Sequence[torch.Tensor], rank: int | None = None) -> int:
        """Copy the center into `into`; returns its version. A worker's fetch names its `rank`."""
        with self.changed:
            for c, out in zip(self.tensors, into):
                out.copy_(c)
            if rank is not None:
                self.stats.fetches[rank] += 1
            return self.version

    def wait_for(self, session_pushes: Sequence[int], timeout_s: float, failed: Callable[[], bool]) -> bool:
        """Block until the server has applied `session_pushes[r]` pushes of each worker r (or `failed()`)."""

        def ready() -> bool:
            return failed() or all(a >= b for a, b in zip(self.stats.session_pushes, session_pushes))

        with self.changed:
            return self.changed.wait_for(ready, timeout_s)

    def state_dict(self) -> dict[str, Any]:
        with self.changed:
            stats = asdict(self.stats)
            del stats["session_pushes"]
            return {"tensors": [t.clone() for t in self.tensors], "version": self.version, "stats": stats}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self.changed:
            for c, t in zip(self.tensors, state["tensors"], strict=True):
                c.copy_(t)
            self.version = int(state["version"])
            self.stats = ServerStats(**state["stats"], session_pushes=[0] * len(self.stats.pushes))


class ServerThread:
    """Serves the workers of ranks 1..p-1 in arrival order until each has sent `DONE`."""

    def __init__(self, center: Center, comm: Communicator, group: CommGroup) -> None:
        self.center, self.comm, self.group = center, comm, group
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="commsgd-param-server", daemon=True)

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        center, comm, group = self.center, self.comm, self.group
        request = header()
        buffers = [torch.empty_like(t) for t in center.tensors]
        remaining = set(self.group.ranks) - {SERVER_RANK}
        try:
            while remaining:
                start = time.perf_counter()
                src = comm.recv(request, None, group)
                got = time.perf_counter()
                op, based_on = int(request[0]), int(request[1])
                if op & PUSH:
                    for b in buffers:
                        comm.recv(b, src, group)
                    center.apply(src, buffers, based_on)
                if op & FETCH:
                    version = center.read(buffers, src)
                    comm.send(header(version), src, group)
                    for b in buffers:
                        comm.send(b, src, group)
                if op & DONE:
                    remaining.discard(src)
                center.stats.idle_s += got - start
                center.stats.busy_s += time.perf_counter() - got
        except BaseException as exc:  # reported to the main thread by `check` / `join`
            self.error = exc
            with center.changed:
                center.changed.notify_all()

    def check(self) -> None:
        """Raise in the caller's thread if the server thread failed."""
        if self.error is not None:
            raise RuntimeError(f"parameter server failed: {self.error}") from self.error

    def join(self, timeout_s: float) -> None:
        """Wait for the thread to end (every worker done); raise if it failed or is still running."""
        if self.started:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"parameter server: workers still running after {timeout_s:.0f} s")
        self.check()


class LocalClient:
    """Rank 0's access to the center: in process, no bytes."""

    def __init__(self, center: Center, server: ServerThread | None) -> None:
        self.center, self.server = center, server

    def request(
        self, push: Sequence[torch.Tensor] | None, based_on: int, fetch_into: Sequence[torch.Tensor] | None
    ) -> int | None:
        if self.server is not None:
            self.server.check()
        if push is not None:
            self.center.apply(SERVER_RANK, push, based_on)
        return None if fetch_into is None else self.center.read(fetch_into, SERVER_RANK)

    def done(self) -> None:
        """Nothing to tell: rank 0 waits for the server thread itself."""


class RemoteClient:
    """A worker's requests to the server on rank 0; each blocks until the server has taken it."""

    def __init__(self, comm: Communicator, group: CommGroup) -> None:
        self.comm, self.group = comm, group
        self._reply = header()

    def request(
        self, push: Sequence[torch.Tensor] | None, based_on: int, fetch_into: Sequence[torch.Tensor] | None
    ) -> int | None:
        op = (PUSH if push is not None else 0) | (FETCH if fetch_into is not None else 0)
        self.comm.send(header(op, based_on), SERVER_RANK, self.group)
        for t in push or ():
            self.comm.send(t, SERVER_RANK, self.group)
        if fetch_into is None:
            return None
        self.comm.recv(self._reply, SERVER_RANK, self.group)
        for t in fetch_into:
            self.comm.recv(t, SERVER_RANK, self.group)
        return int(self._reply[0])

    def done(self) -> None:
        self.comm.send(header(DONE), SERVER_RANK, self.group)

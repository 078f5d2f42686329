"""A simulated world: N workers in one process, their collectives acting on tensors in memory.

Why. The math problems of `commsgd reproduce` and studies of communication patterns at 64-1,024 workers
need the algorithms' own update code, but not gloo: spawning processes and 80,000 loopback collectives
for a 2-D point cost minutes. Here every worker runs in its own Python thread (or coroutine, see
`SimulatedWorld`) with its own `WorkerContext`, whose `Communicator` is the ordinary one (it counts and
times every byte, and applies the optional network model's delays) with a `SimTransport` in place of
torch.distributed.

Semantics (what is guaranteed):

- Collectives of one group run in the order each member calls them, as with a real process group; a
  member that calls a different op (or the same op on tensors of another dtype or size) than the others
  fails them all with one error naming both calls.
- Reductions are computed once, by the last member to arrive, over the members' tensors in rank order
  (for ``sum``: t_0 + t_1 + ... left to right; ``avg`` divides that sum by the group size), so every
  member gets bitwise the same result. gloo adds in another order, so for floats the two agree to
  rounding, not bitwise (they do bitwise where the sum is exact).
- Asynchronous all-reduces run when waited on, or before the next op of the same member on the same group.
- Sends are buffered (a copy is queued; `send` never waits for the receiver); a receive takes the oldest
  message from its source (from any source for ``src=None``) in that process group.
- The store (`SimStore`) has the torch.distributed store's add/set/get/check/compare_set.
- A worker that raises aborts the world: every other worker's wait ends with `WorldAborted`, and
  `SimulatedWorld.run` raises the first real error (rank, type, message, traceback). A wait longer than
  the world's timeout (a deadlock in the code under test) is an error as well.

What is not simulated: time. Without a network model the workers' communication takes only the copy;
with one, each call sleeps its modelled delay while the other workers run (delays overlap, so the wall
time follows the slowest worker as in a real job). Compute is not parallel (one Python interpreter), so
wall-clock results of the training loop (deadlines, stragglers) do not carry over.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import greenlet
import torch

from commsgd.comm import Communicator, ReduceName
from commsgd.config import ClusterConfig, NetworkConfig
from commsgd.context import WorkerContext, node_layout


class WorldAborted(RuntimeError):
    """This worker's wait ended because another worker of the simulated world failed."""


# ------------------------------------------------------------------------------------------ reductions


def _reduce(tensors: Sequence[torch.Tensor], op: ReduceName) -> torch.Tensor:
    """The reduction of `tensors` in the given (rank) order, into a fresh tensor."""
    acc = tensors[0].clone()
    for t in tensors[1:]:
        if op in ("sum", "avg"):
            acc.add_(t)
        elif op == "max":
            torch.maximum(acc, t, out=acc)
        else:
            torch.minimum(acc, t, out=acc)
    if op == "avg":
        if acc.is_floating_point() or acc.is_complex():
            acc.div_(len(tensors))
        else:
            acc = torch.div(acc, len(tensors), rounding_mode="floor")
    return acc


def _signature(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.dtype, t.numel())


@dataclass
class _Call:
    """One member's part of a collective: what it asks for (`key`, equal on every member) and its data."""

    key: tuple[Any, ...]
    data: Any = None


def _combine(name: str, calls: list[_Call], key: tuple[Any, ...], index: dict[int, int]) -> Any:
    """The result of one collective from every member's call, in rank order."""
    p = len(calls)
    if name in ("all_reduce", "reduce_scatter"):
        return _reduce([c.data for c in calls], key[1])
    if name == "broadcast":
        return calls[index[key[1]]].data.clone()
    if name == "all_gather":
        return torch.cat([c.data for c in calls])
    if name == "all_to_all":
        return torch.stack([c.data.reshape(p, -1) for c in calls])  # [source, destination, chunk]
    if name == "gather":
        return [c.data.clone() for c in calls]
    if name == "scatter":
        parts = calls[index[key[1]]].data
        return [part.clone() for part in parts]
    return None  # barrier


class _Rendezvous:
    """One group's meeting point. The k-th op of every member posts its part in slot set k % 2; the last
    member to arrive computes the result for all and wakes the others; two slot sets let a member post
    op k+1 while others still read op k (none can post op k+2 before all have arrived at op k+1)."""

    def __init__(self, world: SimulatedWorld, ranks: tuple[int, ...], name: str) -> None:
        self.world, self.ranks, self.name = world, ranks, name
        self.index = {r: i for i, r in enumerate(ranks)}
        p = len(ranks)
        self._posted: list[list[_Call | None]] = [[None] * p, [None] * p]
        self._results: list[Any] = [None, None]
        self._turn = [0] * p
        self._arrived = 0
        self._completed = 0  # ops completed so far
        self._waiters: list[_Sleeper] = []

    def meet(self, rank: int, call: _Call) -> Any:
        world = self.world
        with world.lock:
            i = self.index[rank]
            turn = self._turn[i]
            self._turn[i] += 1
            self._posted[turn & 1][i] = call
            self._arrived += 1
            if self._arrived == len(self.ranks):
                self._arrived = 0
                self._complete(turn & 1)
                world.wake_all(self._waiters)
            else:
                world.wait(self._waiters, lambda: self._completed > turn, f"{call.key[0]} on {self.name}")
            result = self._results[turn & 1]
        if isinstance(result, _Mismatch):
            raise RuntimeError(result.message)
        return result

    def _complete(self, parity: int) -> None:
        self._completed += 1
        calls = [c for c in self._posted[parity] if c is not None]  # every member has posted
        key = calls[0].key
        for rank, c in zip(self.ranks, calls):
            if c.key != key:
                self._results[parity] = _Mismatch(
                    f"simulated world: collective #{self._completed} on {self.name}: rank {self.ranks[0]} "
                    f"called {key}, rank {rank} called {c.key}"
                )
                return
        try:
            self._results[parity] = _combine(key[0], calls, key, self.index)
        except Exception as exc:  # every member raises it, not only the one that computed it
            self._results[parity] = _Mismatch(f"simulated world: {key[0]} on {self.name}: {exc}")


@dataclass
class _Mismatch:
    message: str


@dataclass(eq=False)
class SimGroup:
    """A simulated process group: its global ranks and their rendezvous."""

    ranks: tuple[int, ...]
    rendezvous: _Rendezvous
    id: int


# ------------------------------------------------------------------------------------------ transport


class _Done:
    """The handle of an op already complete (buffered sends)."""

    def wait(self) -> None:
        return None

    def is_completed(self) -> bool:
        return True


class _Deferred:
    """An op that runs when waited on (or when its member's next op on the same queue needs it done)."""

    def __init__(self, queue: deque[_Deferred], run: Callable[[], None]) -> None:
        self._queue, self._run, self.done = queue, run, False

    def wait(self) -> None:
        while not self.done:  # everything queued before this one first, in order
            self._queue[0].execute()

    def execute(self) -> None:
        self._queue.popleft()
        self._run()
        self.done = True

    def is_completed(self) -> bool:
        return self.done


class SimTransport:
    """The Communicator's transport for one worker of a `SimulatedWorld` (see the module docstring)."""

    def __init__(self, world: SimulatedWorld, rank: int) -> None:
        self.world, self.rank = world, rank
        self._groups = 0  # new_group calls so far: the i-th call of every rank names the same group
        self._async: deque[_Deferred] = deque()  # asynchronous collectives not yet run, in posting order
        self._recvs: deque[_Deferred] = deque()  # receives posted, not yet matched (in posting order)
        self._running = False  # an asynchronous collective is meeting its peers now

    def _group(self, pg: SimGroup | None) -> SimGroup:
        return self.world.everyone if pg is None else pg

    def _flush(self) -> None:
        """Run the asynchronous collectives posted so far: before this worker waits for anything else,
        as a real process group would have progressed them in the background meanwhile."""
        while self._async:
            self._async[0].execute()

    def _meet(self, pg: SimGroup | None, call: _Call) -> Any:
        if self._async and not self._running:
            self._flush()
        return (self.world.everyone if pg is None else pg).rendezvous.meet(self.rank, call)

    def sleep(self, seconds: float) -> None:
        self.world.sleep(seconds)

    def new_group(self, ranks: list[int], timeout: timedelta | None) -> SimGroup:
        self._groups += 1
        return self.world.group(self._groups, tuple(ranks))

    def all_reduce(self, tensor: torch.Tensor, op: ReduceName, pg: Any, async_op: bool = False) -> Any:
        def run() -> None:
            tensor.copy_(self._meet(pg, _Call(("all_reduce", op, *_signature(tensor)), tensor)))

        return self._post(run) if async_op else run()

    def broadcast(self, tensor: torch.Tensor, src: int, pg: Any) -> None:
        result = self._meet(pg, _Call(("broadcast", src, *_signature(tensor)), tensor))
        if self.rank != src:
            tensor.copy_(result.view_as(tensor))

    def all_gather(self, out: torch.Tensor, flat: torch.Tensor, pg: Any, async_op: bool = False) -> Any:
        def run() -> None:
            out.copy_(self._meet(pg, _Call(("all_gather", *_signature(flat)), flat)))

        return self._post(run) if async_op else run()

    def _post(self, run: Callable[[], None]) -> _Deferred:
        """An asynchronous collective: queued, run in posting order when waited on or flushed (while
        it runs, the ones posted after it wait: its own meeting must not flush them first)."""

        def in_order() -> None:
            self._running = True
            try:
                run()
            finally:
                self._running = False

        work = _Deferred(self._async, in_order)
        self._async.append(work)
        return work

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, op: ReduceName, pg: Any) -> None:
        group = self._group(pg)
        result = self._meet(pg, _Call(("reduce_scatter", op, *_signature(input)), input))
        output.copy_(result.view(len(group.ranks), -1)[group.rendezvous.index[self.rank]].view_as(output))

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, pg: Any) -> None:
        group = self._group(pg)
        result = self._meet(pg, _Call(("all_to_all", *_signature(input)), input))
        output.view(len(group.ranks), -1).copy_(result[:, group.rendezvous.index[self.rank]])

    def gather(self, tensor: torch.Tensor, chunks: list[torch.Tensor] | None, dst: int, pg: Any) -> None:
        result = self._meet(pg, _Call(("gather", dst, *_signature(tensor)), tensor))
        if self.rank == dst and chunks is not None:
            for chunk, part in zip(chunks, result):
                chunk.copy_(part.view_as(chunk))

    def scatter(self, output: torch.Tensor, parts: list[torch.Tensor] | None, src: int, pg: Any) -> None:
        group = self._group(pg)
        result = self._meet(pg, _Call(("scatter", src, *_signature(output)), parts))
        output.copy_(result[group.rendezvous.index[self.rank]].view_as(output))

    def barrier(self, pg: Any) -> None:
        self._meet(pg, _Call(("barrier",)))

    # -- point to point: buffered sends, receives in posting order ---------------------------------

    def send(self, tensor: torch.Tensor, dst: int, pg: Any) -> None:
        self.world.post(self._group(pg).id, self.rank, dst, tensor.detach().clone())

    def isend(self, tensor: torch.Tensor, dst: int, pg: Any) -> _Done:
        self.send(tensor, dst, pg)
        return _Done()

    def recv(self, tensor: torch.Tensor, src: int | None, pg: Any) -> int:
        while self._recvs:  # receives posted earlier match first
            self._recvs[0].execute()
        return self._take(tensor, src, pg)

    def irecv(self, tensor: torch.Tensor, src: int, pg: Any) -> _Deferred:
        def run() -> None:
            self._take(tensor, src, pg)

        work = _Deferred(self._recvs, run)
        self._recvs.append(work)
        return work

    def _take(self, tensor: torch.Tensor, src: int | None, pg: Any) -> int:
        self._flush()
        sender, message = self.world.take(self._group(pg).id, self.rank, src)
        if message.dtype != tensor.dtype or message.numel() != tensor.numel():
            raise RuntimeError(
                f"simulated world: rank {self.rank} received {message.numel()} x {message.dtype} from rank "
                f"{sender} into a buffer of {tensor.numel()} x {tensor.dtype}"
            )
        tensor.copy_(message.view_as(tensor))
        return sender


# ------------------------------------------------------------------------------------------ store


class SimStore:
    """The job's key-value store in memory (the torch.distributed store API the code here uses)."""

    def __init__(self, world: SimulatedWorld) -> None:
        self.world = world
        self._data: dict[str, bytes] = {}
        self._waiters: list[_Sleeper] = []

    @staticmethod
    def _bytes(value: bytes | str) -> bytes:
        return value.encode() if isinstance(value, str) else bytes(value)

    def _put(self, key: str, value: bytes) -> None:
        self._data[key] = value
        self.world.wake_all(self._waiters)

    def set(self, key: str, value: bytes | str) -> None:
        with self.world.lock:
            self._put(key, self._bytes(value))

    def add(self, key: str, amount: int) -> int:
        with self.world.lock:
            value = int(self._data.get(key, b"0")) + int(amount)
            self._put(key, str(value).encode())
            return value

    def get(self, key: str) -> bytes:
        with self.world.lock:
            self.world.wait(self._waiters, lambda: key in self._data, f"store get {key!r}")
            return self._data[key]

    def check(self, keys: Sequence[str]) -> bool:
        with self.world.lock:
            return all(k in self._data for k in keys)

    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        """torch's semantics: set when the value is `expected` (b"": when missing); return the value now."""
        old, new = self._bytes(expected), self._bytes(desired)
        with self.world.lock:
            current = self._data.get(key)
            if (current is None and old == b"") or current == old:
                self._put(key, new)
                return new
            return old if current is None else current

    def delete_key(self, key: str) -> bool:
        with self.world.lock:
            return self._data.pop(key, None) is not None

    def num_keys(self) -> int:
        with self.world.lock:
            return len(self._data)

    def clone(self) -> SimStore:
        return self

    def set_timeout(self, timeout: timedelta) -> None:
        return None


# ------------------------------------------------------------------------------------------ the world


_local = threading.local()  # the "threads" scheduler: (world, sleeper) of a worker thread

#: how a world runs its workers: OS threads, or coroutines switched in user space (see `SimulatedWorld`)
SCHEDULERS = ("threads", "greenlet")


class _Sleeper:
    """A worker's wake-up call: under "threads", a lock it sleeps on, released by whoever hands it the
    baton; under "greenlet", the coroutine to switch to."""

    __slots__ = ("glet", "lock", "rank", "waiting")

    def __init__(self, rank: int, glet: greenlet.greenlet | None = None) -> None:
        self.rank = rank
        self.glet = glet
        self.lock: threading.Lock | None = None
        if glet is None:
            self.lock = threading.Lock()
            self.lock.acquire()
        self.waiting = ""  # what it waits for (for the timeout message); "" while ready or running


class _WorkerGreenlet(greenlet.greenlet):
    """A worker's coroutine; `slot` says whose (read by `_slot`)."""

    slot: tuple[SimulatedWorld, _Sleeper] | None = None


def _slot() -> tuple[SimulatedWorld, _Sleeper] | None:
    """(world, sleeper) of the calling worker, or None in any other thread or coroutine."""
    found: tuple[SimulatedWorld, _Sleeper] | None = getattr(greenlet.getcurrent(), "slot", None)
    return found if found is not None else getattr(_local, "slot", None)


def _switchable() -> None:
    """Raise unless this worker's coroutine may be switched out here. Coroutines share their thread's
    torch state: grad mode is kept per worker (`_switch`), but a wait inside backward, inference mode
    or autocast would leak that state into the other workers."""
    if torch._C._current_graph_task_id() != -1:
        where = "inside backward"
    elif torch.is_inference_mode_enabled():
        where = "inside torch.inference_mode"
    elif torch.is_autocast_enabled("cpu"):
        where = "inside torch.autocast"
    else:
        return
    raise RuntimeError(
        f"simulated world: a worker waits {where}, which the greenlet scheduler cannot switch; "
        'run it with SimulatedWorld(..., scheduler="threads")'
    )


@dataclass
class _Outcome:
    ok: bool = False
    value: Any = None
    error: str = ""


@dataclass
class SimulatedWorld:
    """`world_size` workers in this process; nodes of `local_world_size` consecutive ranks (default: one
    node, as LOCAL_WORLD_SIZE says for one machine). `timeout_s`: how long every worker may be blocked at
    once before the run fails as a deadlock.

    Scheduling. Workers take turns: one runs at a time (it holds the baton) until it must wait (a
    collective whose other members have not arrived, a receive, a store get, a modelled network
    delay), then hands the baton to the next ready worker. `scheduler="threads"` (the default) runs
    every worker in an OS thread of its own, one waking per hand-over (tens of microseconds);
    `"greenlet"` runs every worker as a coroutine of the calling thread, a hand-over being a switch in
    user space (a microsecond or so), for code that never waits inside backward (an all-reduce
    overlapped with backward does, at its end), inference mode or autocast: the coroutines share the
    thread's torch state, so such a wait fails with an error naming the scheduler to use (see
    `_switchable`). It pays where steps are short (microseconds of math between collectives); workers
    that allocate large temporaries may do worse in one thread (its allocator can hand them back to
    the OS and fault them in again every step). Threads the workers start themselves (a parameter
    server) are not scheduled under either: they run alongside, and wake workers as usual.
    """

    world_size: int
    local_world_size: int | None = None
    timeout_s: float = 300.0
    scheduler: str = "threads"

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"simulated world: world_size must be >= 1, got {self.world_size}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(
                f"simulated world: scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}"
            )
        self.lock = threading.Lock()  # guards every shared structure of the world
        self.failed = False
        self._ready: deque[_Sleeper] = deque()
        self._running: _Sleeper | None = None
        self._blocked: dict[_Sleeper, list[_Sleeper]] = {}  # worker -> the waiter list it sits in
        self._outside = threading.Condition(self.lock)  # threads that are not workers wait here
        self._groups: dict[tuple[int, tuple[int, ...]], SimGroup] = {}
        self.everyone = self._new_group((0, tuple(range(self.world_size))), "the world")
        self._mail: dict[tuple[int, int], deque[tuple[int, torch.Tensor]]] = {}
        self._mail_waiters: list[list[_Sleeper]] = [[] for _ in range(self.world_size)]
        self.store = SimStore(self)
        self.progress: dict[str, Any] = {}
        self.handovers = 0
        self._sleeping = 0  # workers in a modelled delay: not blocked, not in the schedule
        # the greenlet scheduler: modelled delays as (wake-up time, serial, worker); its own coroutine
        # (`run`'s), which gets the baton when no worker is ready, and at `_yield_at` for `progress`
        self._timers: list[tuple[float, int, _Sleeper]] = []
        self._serial = itertools.count()  # orders delays that end at the same time
        self._idle: greenlet.greenlet | None = None
        self._yield_at = math.inf
        self._live = 0  # worker coroutines not ended yet

    # -- the baton (every method here is called with `lock` held) ------------------------------

    def _next(self) -> _Sleeper | None:
        """The worker to hand the baton to; None: back to `run`'s coroutine (greenlets: nobody ready,
        or time to report progress)."""
        if self._idle is not None:
            now = time.monotonic()
            if self._timers and self._timers[0][0] <= now:
                self._wake_due(now)
            if now >= self._yield_at:
                return None
        return self._ready.popleft() if self._ready else None

    def _hand_over(self) -> None:
        nxt = self._next()
        self._running = nxt
        self.handovers += 1
        if nxt is not None and nxt.lock is not None:
            nxt.lock.release()

    def _sleep(self, me: _Sleeper) -> None:
        """Give the baton away and sleep until it is handed back."""
        self._hand_over()
        nxt = self._running
        self.lock.release()
        try:
            if me.lock is not None:
                me.lock.acquire()
            else:
                self._switch(nxt)
        finally:
            self.lock.acquire()

    def _switch(self, nxt: _Sleeper | None) -> None:
        """Greenlets: run `nxt` (or `run`'s coroutine) until the baton comes back; this worker's grad
        mode is its own, as in a thread."""
        grad = torch.is_grad_enabled()
        target = self._idle if nxt is None else nxt.glet
        assert target is not None
        target.switch()
        if torch.is_grad_enabled() != grad:
            torch.set_grad_enabled(grad)

    def _wake_due(self, now: float) -> None:
        """Greenlets: the workers whose modelled delay has passed are ready."""
        while self._timers and self._timers[0][0] <= now:
            self._ready.append(heapq.heappop(self._timers)[2])
            self._sleeping -= 1

    def wake_all(self, waiters: list[_Sleeper]) -> None:
        """Make every worker in `waiters` ready (they run when the baton reaches them)."""
        for w in waiters:
            del self._blocked[w]
            w.waiting = ""
            self._ready.append(w)
        waiters.clear()
        self._outside.notify_all()  # also `run`'s coroutine, idle while every worker waited
        if self._idle is None and self._running is None and self._ready:  # by a thread outside the schedule
            self._hand_over()

    def wait(self, waiters: list[_Sleeper], ready: Callable[[], bool], what: str) -> None:
        """Wait until `ready()`, sitting in `waiters` (woken by `wake_all(waiters)`); WorldAborted when
        another worker failed."""
        slot = _slot()
        me = slot[1] if slot is not None and slot[0] is self else None
        while not ready():
            if self.failed:
                raise WorldAborted("simulated world: another worker failed")
            if me is None:  # a thread of the workers' own
                self._outside.wait(0.05)
                continue
            if me.glet is not None:
                _switchable()
            me.waiting = what
            waiters.append(me)
            self._blocked[me] = waiters
            self._sleep(me)

    def enter(self, me: _Sleeper) -> None:
        """Threads: join the schedule (a worker starting, or back from a modelled delay)."""
        with self.lock:
            if self._running is None:
                self._running = me
                return
            self._ready.append(me)
            self.lock.release()
            try:
                assert me.lock is not None
                me.lock.acquire()
            finally:
                self.lock.acquire()

    def leave(self) -> None:
        """Leave the schedule (a worker ending, or a thread sleeping a modelled delay); a worker's
        coroutine ends into `run`'s, which hands the baton on."""
        with self.lock:
            if self._idle is None:
                self._hand_over()
            else:
                self._running = None
                self.handovers += 1
                self._live -= 1

    def sleep(self, seconds: float) -> None:
        """A modelled network delay: other workers run meanwhile (delays overlap, as on a network)."""
        slot = _slot()
        if slot is None or slot[0] is not self:
            time.sleep(seconds)
            return
        me = slot[1]
        if me.glet is not None:  # off the schedule until `_wake_due` finds it due
            _switchable()
            with self.lock:
                self._sleeping += 1
                heapq.heappush(self._timers, (time.monotonic() + seconds, next(self._serial), me))
                self._sleep(me)
            return
        with self.lock:
            self._sleeping += 1
            self._hand_over()
        time.sleep(seconds)
        with self.lock:
            self._sleeping -= 1
        self.enter(me)

    def abort(self) -> None:
        """End every wait of every worker (a worker failed, or all of them are stuck)."""
        with self.lock:
            self.failed = True
            for waiters in {id(w): w for w in self._blocked.values()}.values():
                self.wake_all(list(waiters))
                waiters.clear()
            self._outside.notify_all()

    def stuck(self) -> list[str]:
        """What each blocked worker waits for, when no worker can run (a deadlock); else []."""
        with self.lock:
            return self._stuck()

    def _stuck(self) -> list[str]:
        if self._running is not None or self._ready or self._sleeping or not self._blocked:
            return []
        return [f"rank {w.rank}: {w.waiting}" for w in sorted(self._blocked, key=lambda w: w.rank)]

    # -- groups and mail --------------------------------------------------------------------------

    def _new_group(self, key: tuple[int, tuple[int, ...]], name: str) -> SimGroup:
        group = SimGroup(key[1], _Rendezvous(self, key[1], name), len(self._groups))
        self._groups[key] = group
        return group

    def group(self, serial: int, ranks: tuple[int, ...]) -> SimGroup:
        """The group of the `serial`-th new_group call (the same object for every rank that makes it)."""
        with self.lock:
            key = (serial, ranks)
            found = self._groups.get(key)
            if found is None:
                found = self._new_group(key, f"group #{serial} (ranks {_ranks(ranks)})")
            return found

    def post(self, group_id: int, src: int, dst: int, message: torch.Tensor) -> None:
        with self.lock:
            self._mail.setdefault((group_id, dst), deque()).append((src, message))
            self.wake_all(self._mail_waiters[dst])

    def take(self, group_id: int, dst: int, src: int | None) -> tuple[int, torch.Tensor]:
        """The oldest message to `dst` in the group (from `src`, or anyone for None); waits for one."""
        with self.lock:
            box = self._mail.setdefault((group_id, dst), deque())

            def find() -> int | None:
                return next((i for i, (s, _) in enumerate(box) if src is None or s == src), None)

            self.wait(self._mail_waiters[dst], lambda: find() is not None, f"recv from {src}")
            at = find()
            assert at is not None
            sender, message = box[at]
            del box[at]
            return sender, message

    # -- running workers --------------------------------------------------------------------------

    def context(
        self,
        rank: int,
        cluster: ClusterConfig | None = None,
        network: NetworkConfig | None = None,
        seed: int = 0,
        run_dir: Path | None = None,
    ) -> WorkerContext:
        """Rank `rank`'s context, as `commsgd.context.create_context` builds it (collective: node groups)."""
        cluster = cluster or ClusterConfig()
        node_of = node_layout(self.world_size, cluster.group_size or self.local_world_size or self.world_size)
        transport = SimTransport(self, rank)
        comm = Communicator(rank, self.world_size, node_of, network, cluster.split_wait, transport=transport)
        num_nodes = max(node_of) + 1
        node_group = comm.world
        for node in range(num_nodes):  # every rank creates every node's group in the same order
            group = comm.new_group([r for r in range(self.world_size) if node_of[r] == node])
            if node == node_of[rank]:
                node_group = group
        return WorkerContext(
            rank=rank,
            world_size=self.world_size,
            local_rank=rank - node_group.ranks[0],
            node=node_of[rank],
            num_nodes=num_nodes,
            node_ranks=node_group.ranks,
            device=torch.device("cpu"),
            backend="sim",
            comm=comm,
            node_group=node_group,
            store=self.store,
            seed=seed,
            timeout=timedelta(seconds=self.timeout_s),
            run_dir=run_dir,
        )

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        progress: Callable[[SimulatedWorld], None] | None = None,
        every_s: float = 0.5,
    ) -> list[Any]:
        """Run `fn(*args)` on every worker (one torch thread in all); their results in rank order. `fn`
        gets its context from `commsgd.init()`. The first worker error is raised as a RuntimeError naming
        its rank, after every worker ended; so is a deadlock (every worker blocked for `timeout_s`).
        `progress(world)` is called every `every_s` seconds while they run."""
        outcomes = [_Outcome() for _ in range(self.world_size)]
        interrupted: list[BaseException] = []

        def work(me: _Sleeper) -> None:
            rank = me.rank
            try:
                outcomes[rank].value, outcomes[rank].ok = fn(*args), True
            except (WorldAborted, greenlet.GreenletExit):
                pass
            except BaseException as exc:  # report it; end the others' waits
                if isinstance(exc, KeyboardInterrupt) and me.glet is not None:  # Ctrl-C, in a coroutine
                    interrupted.append(exc)  # raised by `run`, as it would be in the threads' watcher
                else:
                    outcomes[
                        rank
                    ].error = f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
                self.abort()
            finally:
                self.leave()

        threads_before = torch.get_num_threads()
        grad_before = torch.is_grad_enabled()
        torch.set_num_threads(1)
        try:
            if self.scheduler == "threads":
                deadlock = self._run_threads(work, progress, every_s)
            else:
                deadlock = self._run_greenlets(work, progress, every_s)
        finally:
            torch.set_num_threads(threads_before)
            torch.set_grad_enabled(grad_before)
        if interrupted:
            raise interrupted[0]
        errors = [o.error for o in outcomes if o.error]
        if errors:
            raise RuntimeError(errors[0])
        if deadlock:
            raise TimeoutError(
                f"simulated world: every worker blocked for {self.timeout_s:g} s (a deadlock): {deadlock}"
            )
        if not all(o.ok for o in outcomes):
            raise RuntimeError("simulated world: workers were aborted without an error")
        return [o.value for o in outcomes]

    def _run_threads(
        self,
        work: Callable[[_Sleeper], None],
        progress: Callable[[SimulatedWorld], None] | None,
        every_s: float,
    ) -> str:
        """`work` on a thread per worker, watched from this one; what the workers were stuck on, if so."""

        def start(rank: int) -> None:
            me = _Sleeper(rank)
            _local.slot = (self, me)
            self.enter(me)
            work(me)

        threads = [
            threading.Thread(target=start, args=(r,), name=f"commsgd-sim-rank{r}", daemon=True)
            for r in range(self.world_size)
        ]
        deadlock = ""
        for t in threads:
            t.start()
        stuck_since: float | None = None
        handovers = -1
        for t in threads:
            while t.is_alive():
                t.join(min(every_s, self.timeout_s / 4))
                if progress is not None:
                    progress(self)
                blocked = self.stuck()
                now = time.monotonic()
                moved, handovers = handovers != self.handovers, self.handovers
                if not blocked or moved:
                    stuck_since = None
                elif stuck_since is None:
                    stuck_since = now
                elif now - stuck_since >= self.timeout_s and not deadlock:
                    deadlock = "; ".join(blocked)
                    self.abort()
        return deadlock

    def _run_greenlets(
        self,
        work: Callable[[_Sleeper], None],
        progress: Callable[[SimulatedWorld], None] | None,
        every_s: float,
    ) -> str:
        """`work` on a coroutine per worker of this thread. This coroutine holds the baton while no worker
        is ready: it sleeps until a modelled delay ends or a thread outside the schedule wakes a worker,
        reports progress, and tells a deadlock (no worker ready for `timeout_s`) by what each waits for."""

        def start(me: _Sleeper) -> None:
            idle.switch()  # started here, not from deep in another worker's stack (recursion depth)
            torch.set_grad_enabled(True)  # as in a new thread
            work(me)

        self._idle = idle = greenlet.getcurrent()
        sleepers = []
        for rank in range(self.world_size):
            glet = _WorkerGreenlet(parent=idle)
            me = _Sleeper(rank, glet)
            glet.run, glet.slot = functools.partial(start, me), (self, me)
            glet.switch()
            sleepers.append(me)
        self._ready.extend(sleepers)
        self._live = len(sleepers)
        deadlock = ""
        stuck_since: float | None = None
        report_at = time.monotonic() + every_s
        try:
            while self._live:
                now = time.monotonic()
                if now >= report_at:
                    if progress is not None:
                        progress(self)
                    report_at = now + every_s
                with self.lock:
                    self._wake_due(now)
                    self._yield_at = report_at if progress is not None else math.inf
                    nxt = self._ready.popleft() if self._ready else None
                    self._running = nxt
                    found = False  # a deadlock, found now
                    if nxt is None:
                        blocked = self._stuck()
                        if not blocked:
                            stuck_since = None
                        elif stuck_since is None:
                            stuck_since = now
                        elif now - stuck_since >= self.timeout_s and not deadlock:
                            deadlock, found = "; ".join(blocked), True
                        if not found:  # until a delay ends, a thread wakes a worker, or it is time
                            until = min(report_at, self._timers[0][0] if self._timers else math.inf)
                            if stuck_since is not None:
                                until = min(until, stuck_since + self.timeout_s)
                            self._outside.wait(max(0.0, until - now))
                if nxt is not None:
                    stuck_since = None
                    assert nxt.glet is not None
                    nxt.glet.switch()
                elif found:
                    self.abort()
        finally:
            self._idle = None
            self._running = None
        return deadlock


def _ranks(ranks: tuple[int, ...]) -> str:
    if len(ranks) > 2 and ranks == tuple(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def current() -> tuple[SimulatedWorld, int] | None:
    """(world, rank) when the caller is a worker of a simulated world, else None."""
    slot = _slot()
    return None if slot is None else (slot[0], slot[1].rank)


def simulated_context(
    cluster: ClusterConfig | None, network: NetworkConfig | None, seed: int, run_dir: Path | None
) -> WorkerContext | None:
    """`commsgd.init()` inside a simulated worker: a new context for these arguments; else None.

    As `create_context` does in a process, every call builds its own context (a fresh Communicator and
    meter, node groups from this call's `cluster`): a worker that calls `init` again with another
    `group_size` gets that layout, and its byte counts start from zero."""
    slot = current()
    if slot is None:
        return None
    return slot[0].context(slot[1], cluster, network, seed, run_dir)


def report_progress(**values: Any) -> None:
    """Rank 0 of a simulated world tells the caller how far it is (read by `run`'s `progress`); a no-op
    elsewhere."""
    slot = current()
    if slot is not None and slot[1] == 0:
        slot[0].progress.update(values)


def run_simulated(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    local_world_size: int | None = None,
    timeout: float = 180.0,
    scheduler: str = "threads",
) -> list[Any]:
    """`commsgd.testing.run_distributed` in one process: `fn(*args)` on `world_size` simulated workers."""
    return SimulatedWorld(world_size, local_world_size, timeout_s=timeout, scheduler=scheduler).run(fn, *args)


class ProgressLine:
    """A `run(progress=...)` that redraws rank 0's reported values on one line of a terminal (nothing
    when the stream is not a terminal); `clear()` wipes the line at the end."""

    def __init__(self, stream: Any = None) -> None:
        self.out = stream if stream is not None else sys.stderr
        self.start = time.monotonic()
        self.drawn = False

    def __call__(self, world: SimulatedWorld) -> None:
        if not world.progress or not self.out.isatty():
            return
        parts = " ".join(f"{k} {v}" for k, v in world.progress.items())
        self.out.write(
            f"\r\033[K{world.world_size} simulated workers: {parts}  {time.monotonic() - self.start:.0f} s"
        )
        self.out.flush()
        self.drawn = True

    def clear(self) -> None:
        if self.drawn:
            self.out.write("\r\033[K")
            self.out.flush()

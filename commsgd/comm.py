"""The communication layer: the only module that calls torch.distributed collectives and point-to-point ops.

Every call counts the bytes this worker puts on and takes off the wire and times itself, so byte
counts and communication time in every report are measured, not estimated.

Byte model. The sizes come from the real tensors handed to each call; the volume per worker is that
of the standard bandwidth-optimal schedule for the op (the convention NCCL's tests call "bus bytes"),
with n the tensor's bytes and p the group size. `link_bytes` is what the op's busiest link carries in
one direction, the same on every member: the op's transfer time is link_bytes / link rate. It differs
from the bytes sent where one member sends more than the others (a broadcast's root, a gather's root):

=================  ===========================  ==============  =======================================
op                 sent = received per worker   link_bytes      why
=================  ===========================  ==============  =======================================
all_reduce         2 (p-1)/p * n                2 (p-1)/p * n   ring reduce-scatter + all-gather
broadcast          (p-1)/p * n                  n               a pipelined chain: p-1 hops of n,
                                                                shared by p workers; each hop carries n
all_gather         (p-1) * n                    (p-1) * n       every worker receives the other p-1
reduce_scatter     (p-1)/p * n                  (p-1)/p * n     n is the full input vector
all_to_all         (p-1)/p * n                  (p-1)/p * n     n is the full input vector
gather / scatter   exact per rank               (p-1) * n       root receives / sends the others' pieces
send / recv        n                            n / 0           exact; counted once, by the sender
=================  ===========================  ==============  =======================================

(gloo broadcasts along a binomial tree: with p > 2 its root's link carries ceil(log2 p) * n, more
than the chain's n. On gloo, all_gather and all_to_all are direct exchanges with every peer, receives
posted first: `_post_direct_exchange` says why; each worker still sends (p-1) * n and (p-1)/p * n.)

Time. `comm_s` is the time a worker spends blocked in a call (for asynchronous ops: blocked in
`wait()`), so overlapped communication is not counted twice. With `split_wait` on, each collective
is preceded by a barrier whose time goes to `wait_s`, separating waiting for slow peers from transfer.

Network model. When enabled, each call also sleeps for ``hops * latency + link_bytes / bandwidth``
with the bandwidth and latency of the link class (within a node or across nodes) the group spans,
so that inter-node Ethernet can be emulated on one machine.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist

from commsgd.config import NetworkConfig

ReduceName = Literal["sum", "avg", "max", "min"]
# Newer torch renamed the tensor-in/tensor-out collectives; use whichever this version has.
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)

_REDUCE_OPS = {
    "sum": dist.ReduceOp.SUM,
    "avg": dist.ReduceOp.AVG,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
}


class DistTransport:
    """What moves the bytes: torch.distributed itself (the default). The Communicator counts, times and
    delays every call; a transport only carries it out. `commsgd.simworld.SimTransport` is the other one:
    N workers as threads of one process, their tensors exchanged in memory. `pg` is a process group
    (None: the default, all workers); a transport returns work handles with `wait()` for async ops."""

    def sleep(self, seconds: float) -> None:
        """The network model's delay for one call."""
        time.sleep(seconds)

    def new_group(self, ranks: list[int], timeout: timedelta | None) -> Any:
        return dist.new_group(ranks, timeout=timeout)

    def all_reduce(self, tensor: torch.Tensor, op: ReduceName, pg: Any, async_op: bool = False) -> Any:
        return dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=pg, async_op=async_op)

    def broadcast(self, tensor: torch.Tensor, src: int, pg: Any) -> None:
        dist.broadcast(tensor, src=src, group=pg)

    def all_gather(self, out: torch.Tensor, flat: torch.Tensor, pg: Any, async_op: bool = False) -> Any:
        """Every member's `flat`, in group order, into the flat `out` (on gloo: `_post_direct_exchange`);
        `async_op`: return a handle to wait on instead of waiting."""
        if not _on_gloo(pg):
            return _all_gather_single(out, flat, group=pg, async_op=async_op)
        ranks, me = _members(pg)
        rows = out.view(len(ranks), -1)
        rows[me].copy_(flat)
        peers = [(i, r) for i, r in enumerate(ranks) if i != me]
        works = _post_direct_exchange([(rows[i], r) for i, r in peers], [(flat, r) for _, r in peers], pg)
        if async_op:
            return _AllOf(works)
        _AllOf(works).wait()
        return None

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, op: ReduceName, pg: Any) -> None:
        _reduce_scatter_single(output, input, op=_REDUCE_OPS[op], group=pg)

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, pg: Any) -> None:
        """Chunk j of `input` to member j, member j's chunk into chunk j of `output` (on gloo:
        `_post_direct_exchange`)."""
        if not _on_gloo(pg):
            dist.all_to_all_single(output, input, group=pg)
            return
        ranks, me = _members(pg)
        sends, recvs = input.view(len(ranks), -1), output.view(len(ranks), -1)
        recvs[me].copy_(sends[me])
        peers = [(i, r) for i, r in enumerate(ranks) if i != me]
        works = _post_direct_exchange(
            [(recvs[i], r) for i, r in peers], [(sends[i], r) for i, r in peers], pg
        )
        _AllOf(works).wait()

    def gather(self, tensor: torch.Tensor, chunks: list[torch.Tensor] | None, dst: int, pg: Any) -> None:
        dist.gather(tensor, chunks, dst=dst, group=pg)

    def scatter(self, output: torch.Tensor, parts: list[torch.Tensor] | None, src: int, pg: Any) -> None:
        dist.scatter(output, parts, src=src, group=pg)

    def barrier(self, pg: Any) -> None:
        dist.barrier(group=pg)

    def send(self, tensor: torch.Tensor, dst: int, pg: Any) -> None:
        dist.send(tensor, dst=dst, group=pg)

    def recv(self, tensor: torch.Tensor, src: int | None, pg: Any) -> int:
        return int(dist.recv(tensor, src=src, group=pg))

    def isend(self, tensor: torch.Tensor, dst: int, pg: Any) -> Any:
        return dist.isend(tensor, dst=dst, group=pg)

    def irecv(self, tensor: torch.Tensor, src: int, pg: Any) -> Any:
        return dist.irecv(tensor, src=src, group=pg)


# The tag of `_post_direct_exchange`'s messages, apart from the default tag 0 of point-to-point calls.
_EXCHANGE_TAG = 0x636F


def _on_gloo(pg: Any) -> bool:
    return bool(dist.get_backend(pg) == "gloo")


def _members(pg: Any) -> tuple[list[int], int]:
    """The global ranks of `pg` (None: every worker) in group order, and this worker's index."""
    ranks = dist.get_process_group_ranks(pg if pg is not None else dist.group.WORLD)
    return ranks, ranks.index(dist.get_rank())


class _AllOf:
    """One handle for several works (a direct exchange): `wait` waits for each."""

    def __init__(self, works: Sequence[Any]) -> None:
        self._works = list(works)

    def wait(self) -> None:
        for work in self._works:
            if work is not None:  # None only for a worker outside `pg`, which never gets here
                work.wait()


def _post_direct_exchange(
    recvs: Sequence[tuple[torch.Tensor, int]], sends: Sequence[tuple[torch.Tensor, int]], pg: Any
) -> list[Any]:
    """Post a receive from and a send to each peer, every receive before any send; not waited for.

    gloo's all_gather and all_to_all move each piece only once the receiver has said it is ready, and
    that notice travels on the same TCP stream as the receiver's own outgoing data: when a worker starts
    sending first, its notice waits behind its data and the two directions of the link take turns.
    Measured across an emulated 0.1 Gbit/s link, 15 MB per worker between 2 nodes (wire time 1.25 s):
    gloo all_gather 1.8-2.1 s, sends posted first 1.3 or 2.4 s, receives first 1.30-1.43 s.
    Each worker sends (p-1) * n either way; the byte model is unchanged. Messages between two workers
    on one tag arrive in the order they were posted, so exchanges in flight together stay apart."""
    pending = [dist.irecv(t, src=r, group=pg, tag=_EXCHANGE_TAG) for t, r in recvs]
    return pending + [dist.isend(t, dst=r, group=pg, tag=_EXCHANGE_TAG) for t, r in sends]


@dataclass
class Counters:
    """Totals for one phase of a worker's traffic."""

    bytes_sent: float = 0.0
    bytes_recv: float = 0.0
    payload_bytes: int = 0
    link_bytes: float = 0.0  # the busiest link's bytes, summed over ops (the byte model above)
    calls: int = 0
    comm_s: float = 0.0
    wait_s: float = 0.0
    model_delay_s: float = 0.0

    def add(self, other: Counters) -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)


@dataclass
class CommMeter:
    """Per-phase counters: ``train`` is what the algorithm costs; ``eval`` and ``control`` are kept apart."""

    phase: str = "train"
    phases: dict[str, Counters] = field(default_factory=lambda: {"train": Counters()})

    @property
    def current(self) -> Counters:
        found = self.phases.get(self.phase)  # every op asks: no Counters built when the phase has one
        if found is None:
            found = self.phases[self.phase] = Counters()
        return found

    @contextlib.contextmanager
    def in_phase(self, name: str) -> Iterator[None]:
        previous, self.phase = self.phase, name
        try:
            yield
        finally:
            self.phase = previous

    def totals(self, phase: str = "train") -> Counters:
        return self.phases.get(phase, Counters())

    def state_dict(self) -> dict[str, dict[str, float]]:
        return {name: asdict(c) for name, c in self.phases.items()}

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        # a checkpoint from before link_bytes was counted: its bytes sent stand in for it
        self.phases = {
            name: Counters(**{"link_bytes": values.get("bytes_sent", 0.0), **values})  # type: ignore[arg-type]
            for name, values in state.items()
        }


@dataclass(frozen=True)
class CommGroup:
    """A set of global ranks with its process group; `spans_nodes` picks the network model's link class."""

    ranks: tuple[int, ...]
    pg: Any
    spans_nodes: bool

    @property
    def size(self) -> int:
        return len(self.ranks)

    def index(self, rank: int) -> int:
        """This rank's position in the group (a dict lookup: LSGD asks for every member each round)."""
        return self._positions[rank]

    @functools.cached_property
    def _positions(self) -> dict[int, int]:
        return {r: i for i, r in enumerate(self.ranks)}


class Pending:
    """An asynchronous op in flight; `wait()` blocks, and the blocked time is what gets counted."""

    def __init__(self, comm: Communicator, work: Any, counters: Counters, delay_s: float) -> None:
        self._comm, self._work, self._counters, self._delay_s = comm, work, counters, delay_s
        self._done = False

    def wait(self) -> None:
        if self._done:
            return
        start = time.perf_counter()
        if self._work is not None:
            self._work.wait()
        self._comm._sleep_model(self._delay_s, self._counters)
        self._counters.comm_s += time.perf_counter() - start
        self._done = True


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Communicator:
    """Counts, times and (optionally) delays every message a worker sends through torch.distributed."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        node_of: Sequence[int],
        network: NetworkConfig | None = None,
        split_wait: bool = False,
        transport: Any = None,  # a DistTransport (the default) or one with its methods (SimTransport)
    ) -> None:
        self.rank = rank
        self.transport = transport if transport is not None else DistTransport()
        self.world_size = world_size
        self.node_of = tuple(node_of)
        self.network = network if network is not None and network.enabled else None
        self.split_wait = split_wait
        self.meter = CommMeter()
        self.world = CommGroup(tuple(range(world_size)), None, len(set(self.node_of)) > 1)

    # ------------------------------------------------------------------ groups and bookkeeping

    def new_group(
        self, ranks: Sequence[int], *, dedicated: bool = False, timeout: timedelta | None = None
    ) -> CommGroup:
        """Create a process group. Collective: every rank calls it with the same ranks, in the same order.

        `dedicated`: a new process group even for all ranks (traffic served by a thread of its own);
        `timeout`: its ops fail after this long (default: torch's default for new groups).
        """
        ranks = tuple(sorted(ranks))
        if len(ranks) == self.world_size and not dedicated:
            pg = None
        else:
            pg = self.transport.new_group(list(ranks), timeout)
        return CommGroup(ranks, pg, len({self.node_of[r] for r in ranks}) > 1)

    def _group(self, group: CommGroup | None) -> CommGroup:
        return self.world if group is None else group

    def _delay(self, link: float, hops: int, inter: bool) -> float:
        """The network model's seconds for an op whose busiest link carries `link` bytes over `hops`."""
        net = self.network
        if net is None or (link <= 0 and hops <= 0):
            return 0.0
        gbps, lat_us = (
            (net.inter_gbps, net.inter_latency_us) if inter else (net.intra_gbps, net.intra_latency_us)
        )
        return hops * lat_us * 1e-6 + link * 8 / (gbps * 1e9)

    def _sleep_model(self, delay_s: float, counters: Counters) -> None:
        if delay_s > 0:
            self.transport.sleep(delay_s)
            counters.model_delay_s += delay_s

    def _record(self, payload: int, sent: float, recv: float, link: float | None = None) -> Counters:
        """Count one op; `link`: its busiest link's bytes (default: the larger of sent and received, a
        store request and its reply)."""
        c = self.meter.current
        c.calls += 1
        c.payload_bytes += payload
        c.bytes_sent += sent
        c.bytes_recv += recv
        c.link_bytes += max(sent, recv) if link is None else link
        return c

    def _run(
        self,
        fn: Any,
        group: CommGroup,
        payload: int,
        sent: float,
        recv: float,
        link: float,
        hops: int,
        sync_device: torch.Tensor | None = None,
        barrier: bool = True,
    ) -> None:
        """Run one blocking op: optional barrier (wait), the op, the network model delay; count it all."""
        c = self._record(payload, sent, recv, link)
        if barrier and self.split_wait and group.size > 1:
            start = time.perf_counter()
            self.transport.barrier(group.pg)
            c.wait_s += time.perf_counter() - start
        start = time.perf_counter()
        fn()
        if sync_device is not None and sync_device.is_cuda:
            torch.cuda.synchronize(sync_device.device)
        if self.network is not None:
            self._sleep_model(self._delay(link, hops, group.spans_nodes), c)
        c.comm_s += time.perf_counter() - start

    # ------------------------------------------------------------------ collectives

    def all_reduce(
        self,
        tensor: torch.Tensor,
        op: ReduceName = "sum",
        group: CommGroup | None = None,
        async_op: bool = False,
    ) -> Pending | None:
        """Reduce `tensor` in place over the group (``avg`` divides by the group size)."""
        g = self._group(group)
        p, n = g.size, _nbytes(tensor)
        if p == 1:
            return Pending(self, None, self.meter.current, 0.0) if async_op else None
        vol = 2 * (p - 1) / p * n
        if async_op:
            c = self._record(n, vol, vol, vol)
            work = self.transport.all_reduce(tensor, op, g.pg, async_op=True)
            return Pending(self, work, c, self._delay(vol, 2 * (p - 1), g.spans_nodes))
        self._run(
            lambda: self.transport.all_reduce(tensor, op, g.pg),
            g,
            n,
            vol,
            vol,
            vol,
            2 * (p - 1),
            tensor,
        )
        return None

    def broadcast(self, tensor: torch.Tensor, src: int, group: CommGroup | None = None) -> None:
        """Copy the tensor of global rank `src` to every member of the group, in place."""
        g = self._group(group)
        p, n = g.size, _nbytes(tensor)
        if p == 1:
            return
        vol = (p - 1) / p * n
        self._run(lambda: self.transport.broadcast(tensor, src, g.pg), g, n, vol, vol, n, p - 1, tensor)

    def all_gather(self, tensor: torch.Tensor, group: CommGroup | None = None) -> torch.Tensor:
        """Stack every member's `tensor` (same shape everywhere): result has shape (p, *tensor.shape)."""
        g = self._group(group)
        p, n = g.size, _nbytes(tensor)
        out = torch.empty((p, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
        if p == 1:
            out[0].copy_(tensor)
            return out
        vol = (p - 1) * n
        flat = tensor.contiguous().view(-1)
        self._run(
            lambda: self.transport.all_gather(out.view(-1), flat, g.pg), g, n, vol, vol, vol, p - 1, out
        )
        return out

    def post_all_gather(
        self, tensor: torch.Tensor, out: torch.Tensor, group: CommGroup | None = None
    ) -> Pending:
        """`all_gather` into `out` (shape (p, *tensor.shape), kept by the caller), not waited for:
        read `out`, or write `tensor`, only after `wait()`. Counted when posted, like an async all-reduce."""
        g = self._group(group)
        p, n = g.size, _nbytes(tensor)
        if out.shape != (p, *tensor.shape) or out.dtype != tensor.dtype or not out.is_contiguous():
            raise ValueError(
                f"post_all_gather: out must be a contiguous {tensor.dtype} tensor of shape "
                f"{(p, *tensor.shape)}"
            )
        if p == 1:
            out[0].copy_(tensor)
            return Pending(self, None, self.meter.current, 0.0)
        vol = (p - 1) * n
        c = self._record(n, vol, vol, vol)
        work = self.transport.all_gather(out.view(-1), tensor.contiguous().view(-1), g.pg, async_op=True)
        return Pending(self, work, c, self._delay(vol, p - 1, g.spans_nodes))

    def reduce_scatter(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        op: ReduceName = "sum",
        group: CommGroup | None = None,
    ) -> None:
        """Reduce `input` (p equal chunks) over the group; this rank gets its chunk in `output`."""
        g = self._group(group)
        p, n = g.size, _nbytes(input)
        if p == 1:
            output.copy_(input.view_as(output))
            return
        vol = (p - 1) / p * n
        self._run(
            lambda: self.transport.reduce_scatter(output, input, op, g.pg),
            g,
            n,
            vol,
            vol,
            vol,
            p - 1,
            output,
        )

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, group: CommGroup | None = None) -> None:
        """Exchange equal chunks: chunk j of this rank's `input` goes to rank j (in this rank's slot)."""
        g = self._group(group)
        p, n = g.size, _nbytes(input)
        if p == 1:
            output.copy_(input)
            return
        vol = (p - 1) / p * n
        self._run(lambda: self.transport.all_to_all(output, input, g.pg), g, n, vol, vol, vol, 1, output)

    def gather(self, tensor: torch.Tensor, dst: int, group: CommGroup | None = None) -> torch.Tensor | None:
        """Collect every member's tensor on global rank `dst` (shape (p, ...)); None elsewhere."""
        g = self._group(group)
        p, n = g.size, _nbytes(tensor)
        is_root = self.rank == dst
        out = torch.empty((p, *tensor.shape), dtype=tensor.dtype, device=tensor.device) if is_root else None
        if p == 1:
            assert out is not None
            out[0].copy_(tensor)
            return out
        sent, recv = (0.0, float((p - 1) * n)) if is_root else (float(n), 0.0)
        chunks = list(out.unbind(0)) if out is not None else None
        root_link = float((p - 1) * n)
        self._run(
            lambda: self.transport.gather(tensor, chunks, dst, g.pg), g, n, sent, recv, root_link, 1, tensor
        )
        return out

    def scatter(
        self, output: torch.Tensor, chunks: torch.Tensor | None, src: int, group: CommGroup | None = None
    ) -> None:
        """Send chunk i of `chunks` (shape (p, ...), only on `src`) to the i-th member of the group."""
        g = self._group(group)
        p, n = g.size, _nbytes(output)
        if p == 1:
            assert chunks is not None
            output.copy_(chunks[0])
            return
        is_root = self.rank == src
        sent, recv = (float((p - 1) * n), 0.0) if is_root else (0.0, float(n))
        parts = list(chunks.unbind(0)) if (is_root and chunks is not None) else None
        root_link = float((p - 1) * n)
        self._run(
            lambda: self.transport.scatter(output, parts, src, g.pg), g, n, sent, recv, root_link, 1, output
        )

    def barrier(self, group: CommGroup | None = None) -> None:
        """Wait for the group; the time is waiting, not transfer."""
        g = self._group(group)
        if g.size == 1:
            return
        c = self.meter.current
        start = time.perf_counter()
        self.transport.barrier(g.pg)
        c.wait_s += time.perf_counter() - start

    def all_gather_json(self, obj: Any, group: CommGroup | None = None) -> list[Any]:
        """Gather a small JSON-serialisable object from every member (summaries, leader history)."""
        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        length = torch.tensor([data.numel()], dtype=torch.int64)
        lengths = self.all_gather(length, group).view(-1)
        padded = torch.zeros(int(lengths.max()), dtype=torch.uint8)
        padded[: data.numel()] = data
        rows = self.all_gather(padded, group)
        return [json.loads(bytes(rows[i, : int(n)].tolist()).decode()) for i, n in enumerate(lengths)]

    # ------------------------------------------------------------------ point to point

    def _p2p_delay(self, peer: int, n: int) -> float:
        return self._delay(n, 1, self.node_of[peer] != self.node_of[self.rank])

    def send(self, tensor: torch.Tensor, dst: int, group: CommGroup | None = None) -> None:
        """Send to global rank `dst` (over `group`'s process group when given). No split_wait barrier:
        a point-to-point op has no group to wait for."""
        n = _nbytes(tensor)
        pg = None if group is None else group.pg
        g = CommGroup((self.rank, dst), pg, self.node_of[dst] != self.node_of[self.rank])
        self._run(lambda: self.transport.send(tensor, dst, pg), g, n, n, 0, n, 1, tensor, barrier=False)

    def recv(self, tensor: torch.Tensor, src: int | None = None, group: CommGroup | None = None) -> int:
        """Receive into `tensor` from `src` (any rank when None); returns the sender's global rank."""
        n = _nbytes(tensor)
        sender: list[int] = []
        peer = src if src is not None else self.rank
        pg = None if group is None else group.pg
        g = CommGroup((self.rank, peer), pg, self.node_of[peer] != self.node_of[self.rank])
        self._run(
            lambda: sender.append(self.transport.recv(tensor, src, pg)),
            g,
            n,
            0,
            n,
            0,
            0,
            tensor,
            barrier=False,
        )
        return sender[0]

    def isend(self, tensor: torch.Tensor, dst: int, group: CommGroup | None = None) -> Pending:
        n = _nbytes(tensor)
        c = self._record(n, n, 0, n)
        work = self.transport.isend(tensor, dst, None if group is None else group.pg)
        return Pending(self, work, c, self._p2p_delay(dst, n))

    def irecv(self, tensor: torch.Tensor, src: int, group: CommGroup | None = None) -> Pending:
        n = _nbytes(tensor)
        c = self._record(n, 0, n, 0)
        work = self.transport.irecv(tensor, src, None if group is None else group.pg)
        return Pending(self, work, c, 0.0)

    def post_exchange(
        self, sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]]
    ) -> list[Pending]:
        """Post every receive, then every send, without waiting (a neighbour exchange): no order of
        neighbours can deadlock, and each receive's ready notice leaves before this worker's data (see
        `_post_direct_exchange`). Wait on all handles before reading the receive buffers or touching the
        send buffers."""
        return [self.irecv(t, src) for t, src in recvs] + [self.isend(t, dst) for t, dst in sends]

    def exchange(
        self, sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]]
    ) -> None:
        """`post_exchange` and wait for all of it."""
        for pending in self.post_exchange(sends, recvs):
            pending.wait()

    # ------------------------------------------------------------------ the shared store

    def store_add(self, store: Any, key: str, amount: int) -> int:
        """Atomic add on the torch.distributed store (shared counters); counted as a tiny message."""
        c = self._record(8, 8 + len(key), 8)
        start = time.perf_counter()
        value = int(store.add(key, amount))
        c.comm_s += time.perf_counter() - start
        return value

    def store_set(self, store: Any, key: str, value: bytes) -> None:
        c = self._record(len(value), len(key) + len(value), 0)
        start = time.perf_counter()
        store.set(key, value)
        c.comm_s += time.perf_counter() - start

    def store_check(self, store: Any, key: str) -> bool:
        """Whether `key` exists on the store (does not wait); counted as a tiny message."""
        c = self._record(0, len(key), 1)
        start = time.perf_counter()
        found = bool(store.check([key]))
        c.comm_s += time.perf_counter() - start
        return found

    def store_compare_set(self, store: Any, key: str, expected: bytes, desired: bytes) -> bytes:
        """Set `key` to `desired` if it holds `expected` (b"": if it is missing); returns its value."""
        c = self._record(len(desired), len(key) + len(expected) + len(desired), len(desired))
        start = time.perf_counter()
        value = bytes(store.compare_set(key, expected, desired))
        c.comm_s += time.perf_counter() - start
        return value

    def store_get(self, store: Any, key: str) -> bytes:
        """Blocking get (waits until the key exists or the store timeout passes); counted as waiting."""
        c = self.meter.current
        start = time.perf_counter()
        value = bytes(store.get(key))
        c.wait_s += time.perf_counter() - start
        self._record(0, len(key), len(value))
        return value

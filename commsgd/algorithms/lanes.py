"""A compressed gradient vector on its way: compress, send, average (`Lane`), and buckets of them sent while
backward still runs (`Overlap`, ef_sgd's `overlap`).

A lane is one flat gradient vector (a `FlatGradients`) with its compressor, its error-feedback name and its
random generator. `post` compresses the vector (plus its error) and starts its message: an all-reduce of
payloads that add without decoding (`summable`), else an all-gather of the packed bytes; `average` waits
and decodes the workers' mean into the vector itself, which is the gradients' storage (the gradient is
spent once compressed: a payload never aliases its input). A compression that fails on this worker (a
value beyond float16's range, NaN) sends a poisoned payload instead of leaving the others waiting: every
worker's average is then NaN, and `restore` puts this lane's error back as it was before `post`.

`Overlap` splits the parameters into buckets of about `bucket_mb`, whole tensors in reverse order (the
order backward finishes them), one lane each (a `Lane`, or any `Sendable`: powersgd's buckets), and
posts a lane as soon as backward has accumulated every gradient of its bucket. Lanes are posted in
bucket order on every worker, whatever order their last gradients arrive in, so the workers'
collectives pair up. `finish` posts what backward did not complete
(parameters without a gradient, gradients set by hand) and returns the lanes to average. Passes inside
`no_sync()` only accumulate. A second backward pass outside `no_sync()` before the step (accumulation
without it, a stray pass before `zero_grad`) drops what the pass before it sent: its messages are waited
for and thrown away and its errors put back, so that the step sends the sum in `.grad` once, as the
contract asks (the bytes thrown away are still counted). Every worker must run the same passes, as with
DDP.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch import Tensor

from commsgd.algorithms.base import SyncSwitch
from commsgd.comm import Communicator, Pending
from commsgd.compression import Compressor, ErrorFeedback, NonFiniteError, Payload, Wire, poisoned
from commsgd.flat import buckets


class Gradients(Protocol):
    """What a lane needs of `commsgd.algorithms.compressed.FlatGradients`."""

    numel: int
    numels: list[int]
    buffer: Tensor

    def gather(self) -> Tensor: ...


class Lane:
    """One flat gradient vector compressed, sent as one message and averaged over the workers."""

    def __init__(
        self,
        grads: Gradients,
        compressor: Compressor,
        feedback: ErrorFeedback | None,
        name: str,
        generator: torch.Generator,
        comm: Communicator,
        world_size: int,
        prepare: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """`prepare(gradient)`: what is compressed instead of the gradient (signum: its momentum)."""
        self.grads, self.compressor, self.feedback, self.name = grads, compressor, feedback, name
        self._prepare = prepare
        self.generator, self._comm, self._world = generator, comm, world_size
        self.wire = Wire(compressor, grads.numel)
        buffer = grads.buffer
        packed = not compressor.summable
        # where the other workers' rows are decoded (summable payloads are decoded once, into the vector)
        self._decoded = torch.empty_like(buffer) if packed else buffer[:0]
        specs = compressor.buffer_specs(torch.Size([grads.numel])).values()
        # a payload without a floating-point buffer cannot carry NaN (`poisoned`): a status byte after it
        # says that the sender's compression failed (every worker reads the same bytes)
        self._status = packed and not any(dtype.is_floating_point for _, dtype in specs)
        #: bytes of this worker's message per step
        self.nbytes = self.wire.nbytes + int(self._status) if packed else self.wire.nbytes
        self._send = torch.zeros(self.nbytes if packed else 0, dtype=torch.uint8, device=buffer.device)
        self._rows: Tensor | None = None  # where an asynchronous all-gather lands (made at the first one)
        self._received = self._send  # the rows to decode: `_rows`, or what a blocking all-gather returned
        self._payload: Payload | None = None
        self._before: Tensor | None = None
        self._pending: list[Pending] = []
        #: why this worker's compression failed at the last `post` (None: it did not)
        self.failure: NonFiniteError | None = None

    def post(self, blocking: bool = False) -> None:
        """Compress the vector (plus the error kept for this lane) and send it; `blocking`: the
        collective completes here (the Communicator's blocking call), else it is left in flight."""
        g = self.grads.gather()
        if self._prepare is not None:
            g = self._prepare(g)
        self._before = None if self.feedback is None else self.feedback.error(self.name)
        self.failure = None
        try:
            if self.feedback is not None:
                payload = self.feedback.compress(self.name, g, generator=self.generator)
            else:
                payload = self.compressor.compress(g, generator=self.generator)
        except NonFiniteError as exc:
            self.failure = exc
            payload = poisoned(self.compressor.empty_payload(self.grads.numel, device=g.device))
        self._payload = payload
        comm = self._comm
        if self.compressor.summable:
            for buffer in payload.buffers.values():
                if blocking:
                    comm.all_reduce(buffer, op="sum")
                else:
                    pending = comm.all_reduce(buffer, op="sum", async_op=True)
                    assert pending is not None
                    self._pending.append(pending)
            return
        packed = self.wire.pack(payload, self._send[: self.wire.nbytes])
        if self._status:
            self._send[-1] = int(self.failure is not None)
            packed = self._send
        if blocking:
            self._received = comm.all_gather(packed)
        else:
            if self._rows is None:
                self._rows = packed.new_empty((self._world, packed.numel()))
            self._received = self._rows
            self._pending.append(comm.post_all_gather(packed, self._rows))

    def average(self) -> Tensor:
        """Wait for the message and return the mean of the workers' decompressed payloads (NaN where
        some worker's compression failed), written into the vector."""
        for pending in self._pending:
            pending.wait()
        self._pending.clear()
        payload, total = self._payload, self.grads.buffer
        if payload is None:
            raise RuntimeError(f"lane {self.name!r}: average() before post()")
        self._payload = None
        if self.compressor.summable:
            if self.failure is not None:  # the poisoned payload has no shared indices to decode with
                return total.fill_(math.nan)
            return self.compressor.decompress(payload, out=total).div_(self._world)
        rows = self._received
        if self._status:
            if bool(rows[:, -1].any()):  # some worker's compression failed
                return total.fill_(math.nan)
            rows = rows[:, : self.wire.nbytes]
        self.wire.decode(rows[0], payload, out=total)
        for row in rows[1:]:
            total.add_(self.wire.decode(row, payload, out=self._decoded))
        return total.div_(self._world)

    def discard(self) -> None:
        """Wait for the message posted last and forget it, its error put back (`Overlap`: a later
        backward pass of the same step sends the sum instead)."""
        for pending in self._pending:
            pending.wait()
        self._pending.clear()
        self._payload = None
        self.restore()

    def restore(self) -> None:
        """Put this lane's error back as it was before the last `post` (a step the job skips)."""
        if self.feedback is not None:
            self.feedback.restore(self.name, self._before)


class Sendable(Protocol):
    """What `Overlap` needs of a bucket's lane: start its message, or wait for it and forget it."""

    def post(self) -> None: ...

    def discard(self) -> None: ...


SendableT = TypeVar("SendableT", bound=Sendable)


class Overlap(Generic[SendableT]):
    """Buckets of parameters, one lane each, posted while backward runs (see the module docstring)."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        bucket_bytes: int,
        make_lane: Callable[[int, list[torch.Tensor]], SendableT],
        counted: Callable[[], contextlib.AbstractContextManager[None]],
    ) -> None:
        """`params` in the model's order; `make_lane(index, bucket_params)` builds a bucket's lane;
        `counted()` wraps every post made from a hook (the bytes of the step)."""
        ordered = list(reversed(params))
        self.bucket_params: list[list[torch.Tensor]] = []
        start = 0
        for b in buckets([p.detach() for p in ordered], bucket_bytes):
            self.bucket_params.append(ordered[start : start + len(b.tensors)])
            start += len(b.tensors)
        self.lanes = [make_lane(i, ps) for i, ps in enumerate(self.bucket_params)]
        self._counted = counted
        self._ready = [0] * len(self.lanes)  # gradients accumulated in this pass, per bucket
        self._next = 0  # the first bucket not posted yet in this step
        self._pass = -1  # the autograd graph task of the pass whose gradients are being posted
        self._sync = SyncSwitch()  # off inside no_sync()
        for index, ps in enumerate(self.bucket_params):
            for p in ps:
                p.register_post_accumulate_grad_hook(self._hook(index))

    def _hook(self, index: int) -> Callable[[torch.Tensor], None]:
        size = len(self.bucket_params[index])

        def hook(_: torch.Tensor) -> None:
            if not self._sync.on:
                return
            task = torch._C._current_graph_task_id()
            if task != self._pass:
                self._begin_pass(task)
            self._ready[index] += 1
            if index == self._next and self._ready[index] == size:
                with self._counted():
                    self._post_ready()

        return hook

    def _begin_pass(self, task: int) -> None:
        """The first gradient of a backward pass: drop what an earlier pass of this step sent."""
        for lane in self.lanes[: self._next]:
            lane.discard()
        self._next = 0
        self._ready = [0] * len(self.lanes)
        self._pass = task

    def _post_ready(self) -> None:
        """Post the buckets complete in this pass, in bucket order, up to the first incomplete one."""
        while self._next < len(self.lanes) and self._ready[self._next] == len(self.bucket_params[self._next]):
            self.lanes[self._next].post()
            self._next += 1

    def finish(self) -> list[SendableT]:
        """Post every bucket backward did not complete, in order; the lanes, all in flight, to average."""
        for lane in self.lanes[self._next :]:
            lane.post()
        self._next = 0
        self._ready = [0] * len(self.lanes)
        self._pass = -1
        return self.lanes

    def drop(self) -> None:
        """Wait for what this step's backward posted and forget it (the step is sent another way)."""
        self._begin_pass(-1)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate locally; the next pass outside (or the step) sends the sum."""
        with self._sync.paused():
            yield


class OverlapsBackward:
    """For an algorithm with `algo.overlap` (its params have `overlap`): `_overlap` is its `Overlap` once
    bound with overlap on, else None; this gives its `no_sync` and `compresses_in_backward`."""

    params: Any
    _overlap: Overlap[Any] | None = None

    @property
    def compresses_in_backward(self) -> bool:
        return bool(self.params.overlap)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        with contextlib.nullcontext() if self._overlap is None else self._overlap.no_sync():
            yield


def bucket_states(
    name: str, state: dict[str, Any], overlap: object | None, count: int
) -> list[dict[str, Any]]:
    """The per-bucket states of a checkpoint (`{"buckets": [...]}` with overlap, else the state itself
    as the one bucket), refusing one made with the other setting or another number of buckets."""
    saved = state.get("buckets")
    if (saved is None) != (overlap is None):
        made, now = ("with", "without") if saved is not None else ("without", "with")
        raise ValueError(
            f"{name}: the checkpoint was made {made} algo.overlap, this run is {now} it; "
            "resume with the same setting"
        )
    kept = saved if saved is not None else [state]
    if len(kept) != count:
        raise ValueError(
            f"{name}: the checkpoint has {len(kept)} gradient buckets, this run {count}; "
            "resume with the same algo.bucket_mb"
        )
    return kept


def in_model_order(pieces: Sequence[Tensor], lanes: Sequence[Lane]) -> Tensor:
    """One flat tensor per bucket (in the layout of its lane's gradients) as one vector in the model's
    parameter order (the buckets hold the parameters in reverse)."""
    split = [part for t, lane in zip(pieces, lanes) for part in t.split(lane.grads.numels)]
    return torch.cat(split[::-1])


__all__ = ["Lane", "Overlap", "OverlapsBackward", "Sendable", "bucket_states", "in_model_order"]

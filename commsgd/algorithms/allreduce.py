"""Synchronous data-parallel SGD (the DDP baseline) and plain one-worker SGD.

`allreduce` averages gradients over all workers in flat buckets. With `overlap` on, a bucket's
all-reduce starts (asynchronously) as soon as backward has produced all of its gradients, the way
PyTorch DDP overlaps communication with the rest of backward, and the end of every backward pass
waits for all of them and writes the averages into `.grad` (DDP's contract): with several backward
passes before a step (gradient accumulation) each pass averages what `.grad` holds by then, so the
step gets the average of the accumulated sum, and a pass with no step after it leaves nothing behind
once the gradients are zeroed. Passes inside `no_sync()` only accumulate locally.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.autograd import Variable

from commsgd.algorithms.base import Algorithm, SyncSwitch, register
from commsgd.comm import Pending
from commsgd.config import bounded
from commsgd.finite import flag_nonfinite
from commsgd.flat import FlatBuffer, buckets, parameters_of

if TYPE_CHECKING:
    from commsgd.context import WorkerContext


@register
class SGD(Algorithm):
    """One worker, no communication: the reference every distributed method is compared with."""

    name = "sgd"
    summary_line = "plain SGD on one worker (no communication)"
    single_worker = True
    replaces_gradients = False


@dataclass
class AllReduceParams:
    bucket_mb: float = bounded(25.0, gt=0, doc="gradient bucket size in MB (DDP's default is 25)")
    overlap: bool = True


def gradients(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The current gradient of each parameter; a parameter that got none this step gets zeros."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]  # type: ignore[misc]


@register
class AllReduce(Algorithm):
    """Average gradients over all workers each step: synchronous data-parallel SGD."""

    name = "allreduce"
    summary_line = "synchronous SGD, gradients averaged by all-reduce in flat buckets"
    Params = AllReduceParams
    params: AllReduceParams

    def bind(self, ctx: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().bind(ctx, model, optimizer)
        # Gradients become ready roughly in reverse order of the parameters: bucket them that way.
        ordered = list(reversed(parameters_of(model)))
        self._buckets = buckets([p.detach() for p in ordered], int(self.params.bucket_mb * 2**20))
        self._bucket_params: list[list[torch.Tensor]] = []
        start = 0
        for b in self._buckets:
            self._bucket_params.append(ordered[start : start + len(b.tensors)])
            start += len(b.tensors)
        self._pending: dict[int, Pending] = {}
        self._ready = [0] * len(self._buckets)  # gradients that arrived in this backward pass, per bucket
        self._pass = -1  # the autograd graph task whose end is queued (a failed pass never ends)
        self._sync = SyncSwitch()  # off inside no_sync()
        self._synced = False  # the last backward pass left averaged gradients; nothing local since
        self._averaged = False  # a backward pass of this step was averaged
        device = ordered[0].device if ordered else torch.device("cpu")
        # Non-finite flags of this step's traffic (tensors: set without a host sync during backward):
        # what this worker sent, what came back, and whether it sent one before any came back.
        self._sent_bad, self._back_bad, self._own_bad = (torch.zeros((), device=device) for _ in range(3))
        if self.params.overlap and ctx.world_size > 1:
            for index, params in enumerate(self._bucket_params):
                for p in params:
                    p.register_post_accumulate_grad_hook(self._ready_hook(index))

    def _ready_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def hook(_: torch.Tensor) -> None:
            if not self._sync.on:
                self._synced = False
                return
            task = torch._C._current_graph_task_id()
            if task != self._pass:
                self._begin_pass(task)
            self._ready[index] += 1
            if self._ready[index] == len(self._bucket_params[index]):
                self._launch(index)

        return hook

    def _begin_pass(self, task: int) -> None:
        """The first gradient of a backward pass: queue its end. What a pass that failed (raised
        before its end) left in flight is waited for and dropped. After an averaged pass of this
        step, note whether what came back was finite (the buckets still hold it)."""
        if self._averaged:
            flag_nonfinite([b.buffer for b in self._buckets], self._back_bad)
        for pending in self._pending.values():
            pending.wait()
        self._pending.clear()
        self._ready = [0] * len(self._buckets)
        self._sent_bad.zero_()
        self._pass = task
        Variable._execution_engine.queue_callback(self._end_of_pass)

    def _end_of_pass(self) -> None:
        """Autograd runs this after the backward pass: average every bucket into `.grad` now.

        A non-finite gradient sent in this pass is this worker's own fault unless what came back in an
        earlier pass of the step was already non-finite (that reached `.grad` before this pass added to it).
        """
        self._pass = -1
        self._launch_rest(flag=True)
        self._own_bad.add_(self._sent_bad * (self._back_bad == 0))
        self._wait_all()
        self._synced = self._averaged = True

    def _launch(self, index: int, flag: bool = True) -> None:
        flat = self._buckets[index].pack(gradients(self._bucket_params[index]))
        if flag:
            flag_nonfinite([flat], self._sent_bad)
        pending = self.bound_ctx.comm.all_reduce(flat, op="avg", async_op=True)
        assert pending is not None
        self._pending[index] = pending

    def _launch_rest(self, flag: bool) -> None:
        """Launch the buckets not launched yet: all of them, or those not complete in this pass."""
        for index in range(len(self._buckets)):
            if index not in self._pending:
                self._launch(index, flag)

    def _wait_all(self) -> None:
        """Wait for every bucket and write the averages into `.grad`."""
        for index, pending in sorted(self._pending.items()):
            pending.wait()
            bucket: FlatBuffer = self._buckets[index]
            bucket.unpack(into=gradients(self._bucket_params[index]))
        self._pending.clear()
        self._ready = [0] * len(self._buckets)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate locally; the next pass outside (or the step) averages the sum."""
        with self._sync.paused():
            yield

    def local_gradient_finite(self) -> bool | None:
        if not self._synced:  # `.grad` holds local gradient not sent yet
            return None
        return not bool(self._own_bad)

    def after_backward(self, step: int) -> None:
        if self.bound_ctx.world_size == 1:
            return
        if not self._synced:  # no overlap, a last pass inside no_sync(), or `.grad` set by hand
            self._launch_rest(flag=False)
            self._wait_all()
        self._synced = self._averaged = False
        for flag in (self._back_bad, self._own_bad):
            flag.zero_()

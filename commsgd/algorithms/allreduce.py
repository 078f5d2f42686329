"""Synchronous data-parallel SGD (the DDP baseline) and plain one-worker SGD.

`allreduce` averages gradients over all workers in flat buckets. With `overlap` on, a bucket's
all-reduce starts (asynchronously) as soon as backward has produced all of its gradients, the way
PyTorch DDP overlaps communication with the rest of backward; `after_backward` waits for the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from commsgd.algorithms.base import Algorithm, register
from commsgd.comm import Pending
from commsgd.config import bounded
from commsgd.flat import FlatBuffer, buckets, parameters_of

if TYPE_CHECKING:
    from commsgd.context import WorkerContext


@register
class SGD(Algorithm):
    """One worker, no communication: the reference every distributed method is compared with."""

    name = "sgd"
    summary_line = "plain SGD on one worker (no communication)"
    single_worker = True


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
        self._missing = [len(ps) for ps in self._bucket_params]
        if self.params.overlap and ctx.world_size > 1:
            for index, params in enumerate(self._bucket_params):
                for p in params:
                    p.register_post_accumulate_grad_hook(self._ready_hook(index))

    def _ready_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def hook(_: torch.Tensor) -> None:
            self._missing[index] -= 1
            if self._missing[index] == 0:
                self._launch(index)

        return hook

    def _launch(self, index: int) -> None:
        flat = self._buckets[index].pack(gradients(self._bucket_params[index]))
        pending = self.bound_ctx.comm.all_reduce(flat, op="avg", async_op=True)
        assert pending is not None
        self._pending[index] = pending

    def after_backward(self, step: int) -> None:
        if self.bound_ctx.world_size == 1:
            return
        for index in range(len(self._buckets)):
            if index not in self._pending:  # no overlap, or parameters that got no gradient this step
                self._launch(index)
        for index, pending in sorted(self._pending.items()):
            pending.wait()
            bucket: FlatBuffer = self._buckets[index]
            bucket.unpack(into=gradients(self._bucket_params[index]))
        self._pending.clear()
        self._missing = [len(ps) for ps in self._bucket_params]

"""Local SGD: independent local steps, and every `tau` steps all models are replaced by their average.

The same result as PyTorch's `PeriodicModelAverager(period=tau, warmup_steps=tau - 1)` called after
each optimizer step (checked in the tests), but the whole model state, batch-norm statistics
included, travels as one flat all-reduce per dtype through the metered communicator.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from commsgd.algorithms.base import Algorithm, register
from commsgd.algorithms.pull import ModelState, average_of_workers, swapped_in
from commsgd.config import bounded

if TYPE_CHECKING:
    from commsgd.context import WorkerContext


@dataclass
class LocalSGDParams:
    tau: int = bounded(64, ge=1, doc="steps between model averages")


@register
class LocalSGD(Algorithm):
    """Periodic model averaging (one all-reduce of the model every tau steps)."""

    name = "local_sgd"
    summary_line = "local SGD: models averaged by all-reduce every tau steps"
    replaces_gradients = False
    Params = LocalSGDParams
    params: LocalSGDParams

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.rounds = 0

    def bind(self, ctx: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().bind(ctx, model, optimizer)
        self.state = ModelState(model)

    def after_step(self, step: int, loss: float) -> None:
        ctx = self.bound_ctx
        if ctx.world_size > 1 and step % self.params.tau == 0:
            self.state.write(average_of_workers(self.state, ctx.comm))
            self.rounds += 1

    @contextmanager
    def evaluated_parameters(self) -> Iterator[None]:
        ctx = self.bound_ctx
        with ctx.comm.meter.in_phase("eval"):
            average = average_of_workers(self.state, ctx.comm)
        with swapped_in(self.state, average):
            yield

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = int(state["rounds"])

    def summary(self) -> dict[str, Any]:
        return {"rounds": self.rounds}

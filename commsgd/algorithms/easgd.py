"""Elastic averaging SGD (Zhang, Choromanska and LeCun, NeurIPS 2015), synchronous or asynchronous.

Workers run local SGD and every `tau` steps are linked to a center variable c by an elastic force,
with alpha = beta / p for p workers, both from the values before the round:

    x_i <- x_i - alpha (x_i - c)          c <- c + alpha * sum_i (x_i - c)

Every worker keeps a replica of c and the sum comes from one all-reduce of x_i - c per round, so the
replicas stay identical without a parameter server. c starts as the average of the initial models.
`eamsgd: true` gives EAMSGD: the local steps use Nesterov momentum (`momentum`, default the
optimizer's). The center variable is what gets evaluated. `mode: async` schedules the rounds on the
job-wide iteration counter, as LSGD's Algorithm 1 does (`commsgd.algorithms.rounds`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from commsgd.algorithms.base import register
from commsgd.algorithms.pull import RoundAlgorithm, swapped_in
from commsgd.config import OptimConfig, bounded

if TYPE_CHECKING:
    from commsgd.context import WorkerContext


@dataclass
class EASGDParams:
    beta: float = bounded(0.43, gt=0, le=1, doc="moving rate of the center; alpha = beta / workers")
    tau: int = bounded(64, ge=1, doc="steps between elastic rounds")
    mode: Literal["sync", "async"] = "sync"
    eamsgd: bool = False
    momentum: float | None = bounded(None, ge=0, lt=1, doc="EAMSGD Nesterov momentum (default: optim's)")


@register
class EASGD(RoundAlgorithm):
    """Elastic averaging: workers and a replicated center variable pull on each other every tau steps."""

    name = "easgd"
    summary_line = "elastic averaging SGD/EAMSGD with a replicated center variable (sync or async)"
    Params = EASGDParams
    params: EASGDParams

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.rounds = 0
        self._saved_center: list[torch.Tensor] = []

    def optimizer_overrides(self, optim: OptimConfig) -> dict[str, Any]:
        if not self.params.eamsgd:
            return {}
        momentum = self.params.momentum if self.params.momentum is not None else optim.momentum
        return {"momentum": momentum, "nesterov": True}

    def bind(self, ctx: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().bind(ctx, model, optimizer)
        self.alpha = self.params.beta / ctx.world_size
        self.center = self.state.copy()
        with ctx.comm.meter.in_phase("control"):
            for c in self.center:
                ctx.comm.all_reduce(c, op="avg")
        # one message per dtype; in async mode the first carries one more element: the ready flags
        extra = 1 if self.clock is not None else 0
        self.message = [
            torch.empty(c.numel() + (extra if i == 0 else 0), dtype=c.dtype, device=c.device)
            for i, c in enumerate(self.center)
        ]
        self.diffs = [m[: c.numel()] for m, c in zip(self.message, self.center)]
        if self._saved_center:
            self._load_center(self._saved_center)

    def periods(self) -> Sequence[int]:
        return (self.params.tau,)

    def run_round(self, vstep: int, ready: bool) -> bool | None:
        ctx = self.bound_ctx
        for d, x, c in zip(self.diffs, self.source, self.center):
            torch.sub(x, c, out=d)
        self.state.add_(self.diffs, -self.alpha)
        if self.clock is not None:
            self.message[0][-1] = float(ready)
        for m in self.message:
            ctx.comm.all_reduce(m, op="sum")
        for d, c in zip(self.diffs, self.center):
            c.add_(d, alpha=self.alpha)
        self.rounds += 1
        if self.clock is None:
            return None
        return bool(self.message[0][-1].item() == ctx.world_size)

    @contextmanager
    def evaluated_parameters(self) -> Iterator[None]:
        with swapped_in(self.state, self.center):
            yield

    def state_dict(self) -> dict[str, Any]:
        return {
            "center": [c.clone() for c in self.center],
            "rounds": self.rounds,
            "clock": self.clock_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = int(state["rounds"])
        self.load_clock_state(state.get("clock", {}))
        if self.ctx is None:
            self._saved_center = list(state["center"])
        else:
            self._load_center(state["center"])

    def _load_center(self, center: list[torch.Tensor]) -> None:
        for c, saved in zip(self.center, center):
            c.copy_(saved)
        self._saved_center = []

    def summary(self) -> dict[str, Any]:
        result: dict[str, Any] = {"rounds": self.rounds, "alpha": self.alpha}
        if self.clock is not None:
            result["rounds_joined"] = self.clock.rounds
        return result

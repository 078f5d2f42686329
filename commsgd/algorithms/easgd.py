"""Elastic averaging SGD (Zhang, Choromanska and LeCun, NeurIPS 2015): sync, async rounds, or the paper's
asynchronous algorithm on a parameter server.

Workers run local SGD and every `tau` steps are linked to a center variable c by an elastic force,
with alpha = beta / p for p workers, both from the values before the round:

    x_i <- x_i - alpha (x_i - c)          c <- c + alpha * sum_i (x_i - c)

Every worker keeps a replica of c and the sum comes from one all-reduce of x_i - c per round, so the
replicas stay identical without a parameter server. c starts as the average of the initial models.
`eamsgd: true` gives EAMSGD: the local steps use Nesterov momentum (`momentum`, default the
optimizer's). The center variable is what gets evaluated. `mode: async` schedules the rounds on the
job-wide iteration counter, as LSGD's Algorithm 1 does (`commsgd.algorithms.rounds`): still collective
rounds that every worker joins.

`mode: async-server` is EASGD's own asynchronous algorithm (Algorithm 1 of its paper, EAMSGD with
`eamsgd: true`): the center lives on the parameter server of rank 0 (`ServerAlgorithm`, shared with
DOWNPOUR) and each worker exchanges with it on its own clock, never waiting for the others. Every
`tau` local steps worker i fetches the center c, computes e = alpha (x_i - c) from the parameters the
step's gradient was taken at, pushes e (the server does c <- c + e, whatever else it applied since the
fetch) and sets x_i <- x_i - e after the local step. `EASGDServer` implements it; `EASGD.create`
picks it for that mode.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from commsgd.algorithms.base import Algorithm, register
from commsgd.algorithms.downpour import ServerAlgorithm
from commsgd.algorithms.pull import Buffers, RoundAlgorithm, swapped_in
from commsgd.config import OptimConfig, bounded
from commsgd.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from commsgd.context import WorkerContext


@dataclass
class EASGDParams:
    beta: float = bounded(0.43, gt=0, le=1, doc="moving rate of the center; alpha = beta / workers")
    tau: int = bounded(64, ge=1, doc="steps between elastic rounds")
    mode: Literal["sync", "async", "async-server"] = "sync"
    eamsgd: bool = False
    momentum: float | None = bounded(None, ge=0, lt=1, doc="EAMSGD Nesterov momentum (default: optim's)")
    budget: Literal["worker", "job"] = "worker"

    def validate(self) -> None:
        if self.budget != "worker" and self.mode != "async-server":
            raise ConfigError(
                f"algo.budget: {self.budget!r} needs mode 'async-server' (the parameter server); "
                f"mode is {self.mode!r}"
            )


def eamsgd_overrides(params: EASGDParams, optim: OptimConfig) -> dict[str, Any]:
    """EAMSGD: the local steps use Nesterov momentum (`params.momentum`, default the optimizer's)."""
    if not params.eamsgd:
        return {}
    if optim.name != "sgd":
        raise ConfigError(
            f"optim.name: easgd with eamsgd=true runs Nesterov-momentum SGD locally, not {optim.name}; "
            "use optim.name=sgd or eamsgd=false"
        )
    momentum = params.momentum if params.momentum is not None else optim.momentum
    return {"momentum": momentum, "nesterov": True}


@register
class EASGD(RoundAlgorithm):
    """Elastic averaging: workers and a replicated center variable pull on each other every tau steps."""

    name = "easgd"
    summary_line = (
        "elastic averaging SGD/EAMSGD: replicated center (sync, async) or parameter server (async-server)"
    )
    Params = EASGDParams
    params: EASGDParams

    @classmethod
    def create(cls, params: Any) -> Algorithm:
        if params is not None and params.mode == "async-server":
            return EASGDServer(params)
        return cls(params)

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        if self.params.mode == "async-server":
            raise ValueError("easgd: mode 'async-server' is EASGDServer; build it with EASGD.create(params)")
        self.rounds = 0
        self._saved_center: list[torch.Tensor] = []

    def optimizer_overrides(self, optim: OptimConfig) -> dict[str, Any]:
        return eamsgd_overrides(self.params, optim)

    def check_optim(self, optim: OptimConfig) -> None:
        super().check_optim(optim)
        eamsgd_overrides(self.params, optim)  # refuses adamw under eamsgd

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
        self.diffs = Buffers(m[: c.numel()] for m, c in zip(self.message, self.center))
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
        if state.get("mode") == "async-server":
            raise CheckpointError(
                f"easgd: the checkpoint is from mode 'async-server'; this run is mode {self.params.mode!r}"
            )
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


class EASGDServer(ServerAlgorithm):
    """EASGD's asynchronous algorithm (its paper's Algorithm 1): the center on rank 0's parameter server,
    an elastic exchange every `tau` steps on each worker's own clock (`mode: async-server`)."""

    name = "easgd"
    summary_line = EASGD.summary_line
    Params = EASGDParams
    replaces_gradients = False  # the elastic exchange moves the parameters
    params: EASGDParams

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.rounds = 0
        self._moved = False  # this step's elastic difference is still to be taken off the parameters

    def optimizer_overrides(self, optim: OptimConfig) -> dict[str, Any]:
        return eamsgd_overrides(self.params, optim)

    def check_optim(self, optim: OptimConfig) -> None:
        super().check_optim(optim)
        eamsgd_overrides(self.params, optim)  # refuses adamw under eamsgd

    def bind(self, ctx: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().bind(ctx, model, optimizer)
        self.alpha = self.params.beta / ctx.world_size
        self._elastic = [torch.empty_like(f.buffer) for f in self._flats]

    def after_backward(self, step: int) -> None:
        """On this worker's round steps: fetch the center, push e = alpha (x - c) from x before the step."""
        self._prepare()
        if step % self.params.tau != 0:
            return
        version = self.client.request(None, 0, self._fetched)
        assert version is not None
        for e, f, c in zip(self._elastic, self._flats, self._fetched):
            torch.sub(f.pack(), c, out=e).mul_(self.alpha)
        self.client.request(self._elastic, version, None)  # the server: c <- c + e
        self._session_pushes += 1
        self._moved = True

    def after_step(self, step: int, loss: float) -> None:
        """x <- x - e after the local step: x_{t+1} = x_t - eta g(x_t) - alpha (x_t - c)."""
        if self.job is not None:
            self.job.count(step)
        if self._moved:
            for f, e in zip(self._flats, self._elastic):
                torch._foreach_sub_(f.tensors, f.views(e))
            self._moved = False
            self.rounds += 1

    def state_dict(self) -> dict[str, Any]:
        return {"mode": "async-server", "rounds": self.rounds, **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != "async-server":
            raise CheckpointError(
                "easgd: the checkpoint is from mode 'sync' or 'async' (a replicated center); "
                "this run is mode 'async-server'"
            )
        self.rounds = int(state["rounds"])
        super().load_state_dict(state)

    def summary(self) -> dict[str, Any]:
        return {"mode": "async-server", "rounds": self.rounds, "alpha": self.alpha, **super().summary()}

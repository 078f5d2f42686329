"""DOWNPOUR (Dean et al. 2012): asynchronous SGD against a parameter server holding the center variable.

Worker i keeps its own parameters x_i and takes ordinary local optimizer steps (torch SGD with the
configured learning rate, momentum and weight decay: momentum lives on the workers). The change those
steps make is accumulated, v_i = x_i - anchor_i (with plain SGD: v_i = -lr * sum of gradients). Every
`n_push` steps v_i is pushed and the server applies c += v_i; every `n_fetch` steps the worker fetches
the center, x_i = c. This is the DOWNPOUR pseudo-code of Zhang et al. 2015 (EASGD paper) with Dean et
al.'s separate n_push / n_fetch. The server (`param_server`, a thread on rank 0) applies pushes in the
order they arrive, so a push may rest on parameters that are several pushes old (its staleness).

Asynchrony: between evaluations workers wait only for the server, never for each other. The budget:
- ``budget="worker"`` (default): every worker takes `steps` steps; evaluations and checkpoints happen at
  the same local steps on every worker (a fast worker waits at each evaluation), so runs resume.
- ``budget="job"``: `steps * workers` steps in all, counted on the shared store, so faster workers take
  (and push) more. The collective evaluation follows the same count: one each time the job has done
  another `eval_every * workers` steps, joined by every worker after its current step. Ranks then
  checkpoint at different local steps, so `--resume` finds a common checkpoint only by chance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from commsgd.algorithms.base import Algorithm, register
from commsgd.algorithms.param_server import SERVER_RANK, Center, LocalClient, RemoteClient, ServerThread
from commsgd.comm import Communicator
from commsgd.config import bounded
from commsgd.errors import ConfigError
from commsgd.flat import FlatBuffer, by_dtype, parameters_of

if TYPE_CHECKING:
    from commsgd.context import WorkerContext


@dataclass
class DownpourParams:
    n_push: int = bounded(1, ge=1, doc="push the accumulated update to the server every n_push steps")
    n_fetch: int = bounded(1, ge=1, doc="replace the parameters by the server's every n_fetch steps")
    budget: Literal["worker", "job"] = "worker"


class JobBudget:
    """A job-wide step budget and evaluation schedule for asynchronous workers (``budget="job"``).

    `add(n)` adds n steps to the job's shared counter and returns the new total. Evaluation k is due
    once the job has done k * every * workers steps, for the k below the budget (the end has its own);
    a worker stops once the budget is spent and it has taken part in all of them.
    """

    def __init__(self, world_size: int, add: Callable[[int], int]) -> None:
        self.world_size, self._add = world_size, add
        self.job_steps = 0
        self._counted = 0
        self._start: int | None = None
        self._total: int | None = None
        self._every: int | None = None
        self._evals_done: int | None = None

    def count(self, step: int) -> None:
        """Add this worker's steps up to `step`. The first call gives the step every worker restored
        (or 0): the job had done `world_size` times as many before this run's counter started at 0."""
        if self._start is None:
            self._start = self._counted = step
        if step > self._counted or not self.job_steps:
            self.job_steps = self._start * self.world_size + self._add(step - self._counted)
            self._counted = step

    def _intermediate(self) -> int:
        if self._every is None or self._total is None:
            return 0
        return (self._total * self.world_size - 1) // (self._every * self.world_size)

    def should_stop(self, step: int, total: int) -> bool:
        self.count(step)
        self._total = total
        if self._every is None and step < total:
            return False  # take a step first: the evaluation schedule is unknown until then
        spent = self.job_steps >= total * self.world_size
        return spent and (self._evals_done or 0) >= self._intermediate()

    def should_evaluate(self, step: int, every: int) -> bool:
        self._every = every
        last = self._intermediate()
        if self._evals_done is None:  # the same on every worker: all restored the same step
            self._evals_done = min((self._start or 0) // every, last)
        due = min(self.job_steps // (every * self.world_size), last)
        if due > self._evals_done:
            self._evals_done += 1
            return True
        return False


@register
class Downpour(Algorithm):
    """Asynchronous parameter-server SGD; the center variable (what is evaluated) lives on rank 0."""

    name = "downpour"
    summary_line = "asynchronous parameter server on rank 0: push updates every n_push, fetch every n_fetch"
    Params = DownpourParams
    params: DownpourParams

    def bind(self, ctx: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().bind(ctx, model, optimizer)
        if ctx.world_size > 1 and (ctx.backend != "gloo" or ctx.device.type != "cpu"):
            raise ConfigError(
                "algorithm downpour: the parameter server talks gloo on CPU; "
                "set cluster.backend=gloo cluster.device=cpu"
            )
        comm = ctx.comm
        self._flats = by_dtype([p.detach() for p in parameters_of(model)])
        buffers = [b for b in model.buffers() if b.is_floating_point()]
        self._buffer_flats: list[FlatBuffer] = by_dtype(buffers) if buffers else []
        with comm.meter.in_phase("control"):  # every worker starts from rank 0's model: the initial center
            for f in self._flats:
                comm.broadcast(f.pack(), src=SERVER_RANK)
                f.unpack()
        self._anchor = [f.pack().clone() for f in self._flats]
        self._fetched = [torch.empty_like(a) for a in self._anchor]
        self._connect(ctx)
        self._version = 0  # version of the center this worker's parameters derive from
        self._pushes = self._fetches = self._since_push = 0
        self._session_pushes = 0  # pushes sent by this process (the server counts the same per run)
        self._pending_accumulator: list[torch.Tensor] | None = None
        self._finished = False
        self.job: JobBudget | None = None
        if self.params.budget == "job":
            self.job = JobBudget(ctx.world_size, self._add_job_steps)

    def _connect(self, ctx: WorkerContext) -> None:
        """The server's group (collective), and the center plus its thread on rank 0 or a client elsewhere."""
        comm = ctx.comm
        group = None
        if ctx.world_size > 1:
            group = comm.new_group(range(ctx.world_size), dedicated=True, timeout=ctx.timeout)
        self.center: Center | None = None
        self.server: ServerThread | None = None
        self._server_comm: Communicator | None = None
        self.client: LocalClient | RemoteClient
        if ctx.rank == SERVER_RANK:
            self.center = Center(self._anchor, ctx.world_size)
            if group is not None:
                self._server_comm = Communicator(ctx.rank, ctx.world_size, comm.node_of, comm.network)
                self.server = ServerThread(self.center, self._server_comm, group)
            self.client = LocalClient(self.center, self.server)
        else:
            assert group is not None
            self.client = RemoteClient(comm, group)

    def _add_job_steps(self, amount: int) -> int:
        with self.bound_ctx.comm.meter.in_phase("control"):
            return self.bound_ctx.add_global_steps(amount)

    # ------------------------------------------------------------------ the update

    def _prepare(self) -> None:
        """Before the first step: rebuild the anchor from a restored accumulator, start the server."""
        if self._pending_accumulator is not None:
            for a, f, v in zip(self._anchor, self._flats, self._pending_accumulator):
                a.copy_(f.pack() - v)
            self._pending_accumulator = None
        if self.server is not None and not self.server.started:
            self.server.start()

    def after_backward(self, step: int) -> None:
        self._prepare()

    def after_step(self, step: int, loss: float) -> None:
        if self.job is not None:
            self.job.count(step)
        self._since_push += 1
        push, fetch = step % self.params.n_push == 0, step % self.params.n_fetch == 0
        if push or fetch:
            self._exchange(push, fetch)

    def _exchange(self, push: bool, fetch: bool) -> None:
        """Push the accumulated update and/or replace the parameters by the center (one request)."""
        x = [f.pack() for f in self._flats]
        deltas = [xi - a for xi, a in zip(x, self._anchor)] if push else None
        version = self.client.request(deltas, self._version, self._fetched if fetch else None)
        if push:
            for a, xi in zip(self._anchor, x):
                a.copy_(xi)
            self._pushes += 1
            self._session_pushes += 1
            self._since_push = 0
        if fetch:
            assert version is not None
            for a, xi, c, f in zip(self._anchor, x, self._fetched, self._flats):
                a.add_(c - xi)  # keeps x - anchor (the update not pushed yet) across the replacement
                f.unpack(c)
            self._version = version
            self._fetches += 1

    # ------------------------------------------------------------------ budget, end, evaluation

    def should_stop(self, step: int, total_steps: int) -> bool:
        if self.job is None:
            return super().should_stop(step, total_steps)
        return self.job.should_stop(step, total_steps)

    def should_evaluate(self, step: int, every: int) -> bool:
        if self.job is None:
            return super().should_evaluate(step, every)
        return self.job.should_evaluate(step, every)

    def finish(self) -> None:
        """Push what is left, tell the server this worker is done; rank 0 waits for the server to end."""
        if self._finished:
            return
        self._finished = True
        self._prepare()
        if self._since_push > 0:
            self._exchange(push=True, fetch=False)
        self.client.done()
        if self.server is not None:  # its receive fails after `timeout` without requests: it always ends
            self.server.join(self.bound_ctx.timeout.total_seconds() + 10.0)

    @contextlib.contextmanager
    def evaluated_parameters(self) -> Iterator[None]:
        """Every worker loads the server's center (and rank 0's buffers); restored afterwards."""
        ctx = self.bound_ctx
        comm = ctx.comm
        saved = [f.pack().clone() for f in self._flats]
        saved_buffers = [f.pack().clone() for f in self._buffer_flats]
        with comm.meter.in_phase("eval"):
            sent = comm.all_gather(torch.tensor([self._session_pushes], dtype=torch.int64)).view(-1)
            if self.center is not None:
                self._wait_for_pushes(sent.tolist())
                self.center.read(self._fetched)
            for f, c in zip(self._flats, self._fetched):
                comm.broadcast(c, src=SERVER_RANK)
                f.unpack(c)
            for f in self._buffer_flats:
                comm.broadcast(f.pack(), src=SERVER_RANK)
                f.unpack()
        try:
            yield
        finally:
            for f, s in zip([*self._flats, *self._buffer_flats], [*saved, *saved_buffers]):
                f.unpack(s)

    def _wait_for_pushes(self, sent: list[int]) -> None:
        """Rank 0: the center must include every push sent before this evaluation."""
        assert self.center is not None
        server = self.server
        timeout = self.bound_ctx.timeout.total_seconds()
        ready = self.center.wait_for(sent, timeout, lambda: server is not None and server.error is not None)
        if server is not None:
            server.check()
        if not ready:
            raise TimeoutError(f"downpour: pushes {sent} not all applied by the server after {timeout:.0f} s")

    # ------------------------------------------------------------------ resume and reporting

    def state_dict(self) -> dict[str, Any]:
        accumulator = self._pending_accumulator or [f.pack() - a for f, a in zip(self._flats, self._anchor)]
        state: dict[str, Any] = {
            "accumulator": [v.clone() for v in accumulator],
            "version": self._version,
            "pushes": self._pushes,
            "fetches": self._fetches,
            "since_push": self._since_push,
        }
        if self.center is not None:
            state["center"] = self.center.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending_accumulator = [t.clone() for t in state["accumulator"]]
        self._version = int(state["version"])
        self._pushes, self._fetches = int(state["pushes"]), int(state["fetches"])
        self._since_push = int(state["since_push"])
        if self.center is not None:
            if "center" not in state:
                raise ValueError("downpour: rank 0's state has no center variable")
            self.center.load_state_dict(state["center"])

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n_push": self.params.n_push,
            "n_fetch": self.params.n_fetch,
            "budget": self.params.budget,
            "pushes": self._pushes,
            "fetches": self._fetches,
        }
        if self.center is not None:
            server = {**self.center.stats.summary(), "version": self.center.version}
            if self._server_comm is not None:
                c = self._server_comm.meter.totals()
                server.update(bytes_sent=c.bytes_sent, bytes_recv=c.bytes_recv, comm_s=c.comm_s)
            out["server"] = server
        return out

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
  the same local steps on every worker (a fast worker waits at each evaluation).
- ``budget="job"``: `steps * workers` steps in all, counted on the shared store, so faster workers take
  (and push) more. The collective evaluations and checkpoints follow the same count: one each time
  the job has done another `eval_every * workers` (`checkpoint_every * workers`) steps, joined by
  every worker after its current step, each worker at its own local step (`JobBudget`). A checkpoint
  is labelled by the job's virtual step (job steps / workers), the same on every worker.

Checkpoints are collective in both modes (`prepare_checkpoint`): rank 0 waits until the server has
applied every push the workers have sent and copies the center, then everyone saves. So the center
in rank 0's file holds exactly the pushes the workers' files count as pushed: after a restore no
update is applied twice or lost.

The worker side of the server (start from the center, connect, budget, evaluation, checkpoints, end)
is `ServerAlgorithm`, shared with easgd's `mode: async-server`; `Downpour` adds the push/fetch rule.
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
    """A job-wide step budget and the schedule of collective moments for asynchronous workers.

    `add(n)` adds n steps to the job's shared counter and returns the new total. Evaluation k is due
    once the job has done k * every * workers steps and checkpoint j once it has done
    j * checkpoint_every * workers, for the k and j below the budget (the end has its own). Both are
    collective, so every worker takes them in one order: by that count, an evaluation before a
    checkpoint at the same count, at most one of each per step (the evaluation is asked first). A
    worker stops once the budget is spent and it has taken part in all of them.
    """

    def __init__(self, world_size: int, add: Callable[[int], int], checkpoint_every: int = 0) -> None:
        self.world_size, self._add = world_size, add
        self.checkpoint_every = checkpoint_every
        self.job_steps = 0
        self._counted = 0
        self._base: int | None = None
        self._total: int | None = None
        self._every: int | None = None
        self._evaluated: int | None = None  # virtual step of the last evaluation
        self._checkpointed: int | None = None  # virtual step of the last checkpoint

    @property
    def begun(self) -> bool:
        return self._base is not None

    def begin(self, job_steps: int, step: int) -> None:
        """Start from `job_steps` steps done by the job (the sum of the workers' restored steps, 0 on
        a fresh start), this worker at `step`. Without it, the first `count` assumes every worker
        restored the same step."""
        self._base, self._counted = job_steps, step

    def count(self, step: int) -> None:
        """Add this worker's steps up to `step` to the job's counter."""
        if self._base is None:
            self.begin(step * self.world_size, step)
        assert self._base is not None
        if step > self._counted or not self.job_steps:
            self.job_steps = self._base + self._add(step - self._counted)
            self._counted = step

    def _after(self, last: int, every: int) -> int | None:
        """The virtual step of the moment after `last` on period `every`, if it is below the budget."""
        assert self._total is not None
        following = (last // every + 1) * every
        return following if following < self._total else None

    def _next(self) -> tuple[int, int] | None:
        """The next collective moment: (its virtual step, 0 evaluation / 1 checkpoint), or None."""
        if self._every is None or self._total is None:
            return None  # not known before the first evaluation question
        restored = (self._base or 0) // self.world_size  # older checkpoints: the moments up to there
        if self._evaluated is None:
            self._evaluated = restored // self._every * self._every
        moments = [(self._after(self._evaluated, self._every), 0)]
        if self.checkpoint_every:
            if self._checkpointed is None:
                self._checkpointed = restored // self.checkpoint_every * self.checkpoint_every
            moments.append((self._after(self._checkpointed, self.checkpoint_every), 1))
        due = [(vstep, kind) for vstep, kind in moments if vstep is not None]
        return min(due) if due else None

    def _due(self, kind: int) -> int | None:
        """The virtual step of the next moment if it is of `kind` and the job has reached it."""
        moment = self._next()
        if moment is None or moment[1] != kind or moment[0] * self.world_size > self.job_steps:
            return None
        return moment[0]

    def should_stop(self, step: int, total: int) -> bool:
        self.count(step)
        self._total = total
        if self._every is None and step < total:
            return False  # take a step first: the evaluation schedule is unknown until then
        return self.job_steps >= total * self.world_size and self._next() is None

    def should_evaluate(self, step: int, every: int) -> bool:
        self._every = every
        vstep = self._due(0)
        if vstep is None:
            return False
        self._evaluated = vstep
        return True

    def checkpoint_label(self) -> int | None:
        """The virtual step of the checkpoint due now (asked after the evaluation), or None."""
        vstep = self._due(1)
        if vstep is not None:
            self._checkpointed = vstep
        return vstep

    def state_dict(self) -> dict[str, Any]:
        return {"evaluated": self._evaluated, "checkpointed": self._checkpointed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The virtual steps of the last evaluation and checkpoint (older checkpoints lack them: the
        restored steps stand in)."""
        for key in ("evaluated", "checkpointed"):
            value = state.get(key)
            setattr(self, f"_{key}", None if value is None else int(value))


class ServerAlgorithm(Algorithm):
    """A worker of the parameter server on rank 0 (`param_server`): the machinery DOWNPOUR and EASGD's
    `async-server` mode share.

    It starts every worker from rank 0's model (the initial center), connects it to the server (rank 0
    holds the center and serves it from a thread), keeps the budget (`params.budget`), evaluates and
    checkpoints the center, and tells the server that this worker is done in `finish`. A subclass
    talks to the center through `self.client.request(push, based_on, fetch_into)` in its hooks,
    counts each push it sends in `_session_pushes`, and extends `state_dict` / `summary`.
    """

    params: Any  # a dataclass with `budget: "worker" | "job"`

    def bind(self, ctx: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().bind(ctx, model, optimizer)
        if ctx.world_size > 1 and (ctx.backend != "gloo" or ctx.device.type != "cpu"):
            raise ConfigError(
                f"algorithm {self.name}: the parameter server talks gloo on CPU; "
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
        self._fetched = [torch.empty_like(f.buffer) for f in self._flats]
        self._connect(ctx)
        self._session_pushes = 0  # pushes sent by this process (the server counts the same per run)
        self._finished = False
        self.job: JobBudget | None = None
        if self.params.budget == "job":
            self.job = JobBudget(ctx.world_size, self._add_job_steps, self.checkpoint_every)
        self._center_copy: dict[str, Any] | None = None  # rank 0: the center frozen for a checkpoint

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
            self.center = Center([f.buffer for f in self._flats], ctx.world_size)  # copies them
            if group is not None:
                self._server_comm = Communicator(
                    ctx.rank, ctx.world_size, comm.node_of, comm.network, transport=comm.transport
                )
                self.server = ServerThread(self.center, self._server_comm, group)
            self.client = LocalClient(self.center, self.server)
        else:
            assert group is not None
            self.client = RemoteClient(comm, group)

    def _add_job_steps(self, amount: int) -> int:
        with self.bound_ctx.comm.meter.in_phase("control"):
            return self.bound_ctx.add_global_steps(amount)

    def _prepare(self) -> None:
        """Before the first request (call it in `after_backward`): start the server thread."""
        self._start_server()

    def _start_server(self) -> None:
        """Rank 0: start the server thread, this late so that a restored center is in place before any
        request can reach it: at the first step, evaluation or checkpoint, whichever comes first."""
        if self.server is not None and not self.server.started:
            self.server.start()

    def _flush(self) -> None:
        """In `finish`, before this worker says it is done: send what it has not sent yet."""

    # ------------------------------------------------------------------ budget, end, evaluation

    @property
    def step_aligned(self) -> bool:
        return self.params.budget != "job"  # a job-wide budget moves the end and the evaluations

    @property
    def lockstep(self) -> bool:
        return False  # each worker talks to the server at its own pace

    def should_stop(self, step: int, total_steps: int) -> bool:
        if self.job is None:
            return super().should_stop(step, total_steps)
        if not self.job.begun:  # collective, once: the job's steps so far are the sum of everyone's
            with self.bound_ctx.comm.meter.in_phase("control"):
                steps = self.bound_ctx.comm.all_gather_json(step)
            self.job.begin(sum(int(s) for s in steps), step)
        return self.job.should_stop(step, total_steps)

    def should_evaluate(self, step: int, every: int) -> bool:
        if self.job is None:
            return super().should_evaluate(step, every)
        return self.job.should_evaluate(step, every)

    def checkpoint_label(self, step: int) -> int | None:
        if self.job is None:
            return super().checkpoint_label(step)
        return self.job.checkpoint_label()

    def final_checkpoint_label(self, step: int, total_steps: int) -> int:
        return step if self.job is None else total_steps

    def prepare_checkpoint(self) -> None:
        """Collective: rank 0 waits until the server has applied every push sent so far and copies the
        center before anyone goes on, so its file holds exactly the pushes the others' files count."""
        ctx = self.bound_ctx
        if self._finished or ctx.world_size == 1:  # after `finish` the server has applied them all
            return
        comm = ctx.comm
        self._start_server()  # before the collective: a worker may be waiting for a fetch's reply
        with comm.meter.in_phase("control"):
            sent = comm.all_gather(torch.tensor([self._session_pushes], dtype=torch.int64)).view(-1)
            if self.center is not None:
                self._wait_for_pushes(sent.tolist())
                self._center_copy = self.center.state_dict()
            comm.barrier()

    def finish(self) -> None:
        """Send what is left, tell the server this worker is done; rank 0 waits for the server to end."""
        if self._finished:
            return
        self._finished = True
        self._prepare()
        self._flush()
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
        self._start_server()  # before the collective: a worker may be waiting for a fetch's reply
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
        """Rank 0: the center must include every push sent before this evaluation (or checkpoint)."""
        assert self.center is not None
        server = self.server
        timeout = self.bound_ctx.timeout.total_seconds()
        ready = self.center.wait_for(sent, timeout, lambda: server is not None and server.error is not None)
        if server is not None:
            server.check()
        if not ready:
            raise TimeoutError(
                f"{self.name}: pushes {sent} not all applied by the server after {timeout:.0f} s"
            )

    # ------------------------------------------------------------------ resume and reporting

    def state_dict(self) -> dict[str, Any]:
        """The center (rank 0) and the job budget's schedule; subclasses add their own state."""
        state: dict[str, Any] = {}
        if self.center is not None:
            state["center"], self._center_copy = self._center_copy or self.center.state_dict(), None
        if self.job is not None:
            state["job"] = self.job.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.center is not None:
            if "center" not in state:
                raise ValueError(f"{self.name}: rank 0's state has no center variable")
            self.center.load_state_dict(state["center"])
        if self.job is not None:
            self.job.load_state_dict(state.get("job", {}))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"budget": self.params.budget}
        if self.center is not None:
            server = {**self.center.stats.summary(), "version": self.center.version}
            if self._server_comm is not None:
                c = self._server_comm.meter.totals()
                server.update(bytes_sent=c.bytes_sent, bytes_recv=c.bytes_recv, comm_s=c.comm_s)
            out["server"] = server
        return out


@register
class Downpour(ServerAlgorithm):
    """Asynchronous parameter-server SGD; the center variable (what is evaluated) lives on rank 0."""

    name = "downpour"
    summary_line = "asynchronous parameter server on rank 0: push updates every n_push, fetch every n_fetch"
    Params = DownpourParams
    params: DownpourParams

    def bind(self, ctx: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().bind(ctx, model, optimizer)
        self._anchor = [f.pack().clone() for f in self._flats]
        self._version = 0  # version of the center this worker's parameters derive from
        self._pushes = self._fetches = self._since_push = 0
        self._pending_accumulator: list[torch.Tensor] | None = None

    def _prepare(self) -> None:
        """Before the first step: rebuild the anchor from a restored accumulator, start the server."""
        if self._pending_accumulator is not None:
            for a, f, v in zip(self._anchor, self._flats, self._pending_accumulator):
                a.copy_(f.pack() - v)
            self._pending_accumulator = None
        super()._prepare()

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

    def _flush(self) -> None:
        if self._since_push > 0:
            self._exchange(push=True, fetch=False)

    def state_dict(self) -> dict[str, Any]:
        accumulator = self._pending_accumulator or [f.pack() - a for f, a in zip(self._flats, self._anchor)]
        return {
            "accumulator": [v.clone() for v in accumulator],
            "version": self._version,
            "pushes": self._pushes,
            "fetches": self._fetches,
            "since_push": self._since_push,
            **super().state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending_accumulator = [t.clone() for t in state["accumulator"]]
        self._version = int(state["version"])
        self._pushes, self._fetches = int(state["pushes"]), int(state["fetches"])
        self._since_push = int(state["since_push"])
        super().load_state_dict(state)

    def summary(self) -> dict[str, Any]:
        out = {"n_push": self.params.n_push, "n_fetch": self.params.n_fetch}
        return {**out, **super().summary(), "pushes": self._pushes, "fetches": self._fetches}

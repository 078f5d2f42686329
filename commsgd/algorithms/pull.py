"""Shared machinery of the algorithms that move whole models toward a target: LSGD, EASGD, local SGD.

`ModelState` holds a model's state (parameters and float buffers) as flat buffers, one per dtype, so
a model travels as one message. `RoundAlgorithm` runs communication rounds every `tau` steps
(synchronous: every worker at the same step) or on the job-wide iteration counter (asynchronous,
LSGD's Algorithm 1, see `commsgd.algorithms.rounds`).

Where the pull is measured from. In synchronous mode a round at step t uses the parameters *before*
that step's local update (x_t), captured in `after_backward`, and the pull is added to the updated
parameters: x_{t+1} = x_t - eta g_t - lambda (x_t - z_t), eq. 3 of the LSGD paper and the synchronous
EASGD update exactly, with or without momentum. In asynchronous mode a worker joins a round between
two of its steps and the pull is measured from its current parameters, as Algorithm 1 writes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from commsgd.algorithms.base import Algorithm
from commsgd.algorithms.rounds import AsyncRounds
from commsgd.flat import FlatBuffer, by_dtype, model_state_tensors

if TYPE_CHECKING:
    from commsgd.comm import Communicator
    from commsgd.context import WorkerContext


class Buffers(list[torch.Tensor]):
    """A model state's flat buffers (one per dtype) that keep their per-tensor views once made: a round
    reads and writes the same buffers every time, and slicing them anew costs more than the update
    itself on a small model. The views live as long as the list (no cache outlives its buffers); they
    are made again when a buffer in the list is replaced or moved to other memory."""

    _made: list[tuple[FlatBuffer, torch.Tensor, int]]
    _views: list[list[torch.Tensor]]

    def views(self, flats: Sequence[FlatBuffer]) -> list[list[torch.Tensor]]:
        """For each flat, its buffer's slices shaped like the flat's tensors."""
        if len(flats) != len(self):
            raise ValueError(f"Buffers: {len(self)} buffers for a state of {len(flats)} flat buffers")
        if not self._still_made(flats):
            self._views = [f.views(b) for f, b in zip(flats, self)]
            self._made = [(f, b, b.data_ptr()) for f, b in zip(flats, self)]
        return self._views

    def _still_made(self, flats: Sequence[FlatBuffer]) -> bool:
        """Whether the views made last are of these flats and these buffers, at the same memory (a plain
        loop: every round of a small model asks, and a generator costs more than the check)."""
        made = getattr(self, "_made", None)
        if made is None:
            return False
        for f, b, (mf, mb, ptr) in zip(flats, self, made):
            if f is not mf or b is not mb or b.data_ptr() != ptr:
                return False
        return True


class ModelState:
    """A model's parameters and float buffers, read and written as flat buffers (one per dtype)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.flats = by_dtype(model_state_tensors(model))

    @property
    def nbytes(self) -> int:
        return sum(f.numel * f.buffer.element_size() for f in self.flats)

    def empty(self) -> Buffers:
        """Fresh flat buffers shaped like the state (contents undefined)."""
        return Buffers(torch.empty_like(f.buffer) for f in self.flats)

    def views(self, buffers: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Per flat, `buffers`' slices shaped like its tensors (kept on `buffers` if it is a Buffers)."""
        if isinstance(buffers, Buffers):
            return buffers.views(self.flats)
        return [f.views(b) for f, b in zip(self.flats, buffers)]

    def read(self, out: Buffers) -> Buffers:
        """Copy the model's current state into `out` and return it."""
        for f, views in zip(self.flats, self.views(out)):
            torch._foreach_copy_(views, f.tensors)
        return out

    def copy(self) -> Buffers:
        return self.read(self.empty())

    def write(self, buffers: Sequence[torch.Tensor]) -> None:
        """Load `buffers` into the model."""
        for f, views in zip(self.flats, self.views(buffers)):
            torch._foreach_copy_(f.tensors, views)

    def add_(self, buffers: Sequence[torch.Tensor], alpha: float) -> None:
        """model += alpha * buffers, tensor by tensor (no temporary copy of the model)."""
        for f, views in zip(self.flats, self.views(buffers)):
            torch._foreach_add_(f.tensors, views, alpha=alpha)


def average_of_workers(state: ModelState, comm: Communicator) -> Buffers:
    """The average of every worker's state (one all-reduce per dtype): the center variable of LSGD."""
    buffers = state.copy()
    for buffer in buffers:
        comm.all_reduce(buffer, op="avg")
    return buffers


@contextlib.contextmanager
def swapped_in(state: ModelState, buffers: Buffers) -> Iterator[None]:
    """Load `buffers` into the model for the duration of the block, then restore the model."""
    saved = state.copy()
    state.write(buffers)
    try:
        yield
    finally:
        state.write(saved)


class RoundAlgorithm(Algorithm):
    """Local steps plus communication rounds, synchronous or asynchronous (`params.mode`).

    Subclasses give the round periods (`periods`) and the round itself (`run_round`); this class
    captures the point the pull is measured from (`self.source`) and runs the schedule.
    """

    replaces_gradients = False  # rounds move the parameters; the gradient stays backward's

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        #: capture the pre-step parameters on every step (LSGD's every-step pull), not only on rounds
        self.snapshot_every_step = False
        self.clock: AsyncRounds | None = None
        self._pending_clock: dict[str, Any] = {}

    # -- what subclasses provide ------------------------------------------------------------

    def periods(self) -> Sequence[int]:
        """Round periods in steps: a round happens at every multiple of any of them."""
        raise NotImplementedError

    def run_round(self, vstep: int, ready: bool) -> bool | None:
        """One collective round measured from `self.source`.

        `vstep` is the round's step (the job's iterations / workers in async mode). In async mode
        `ready` says whether this worker could evaluate right after the round; return whether every
        worker said so (None when the round's collective does not span all workers).
        """
        raise NotImplementedError

    def observe(self, loss: float) -> None:
        """This step's training loss (LSGD's leader selection keeps a window of them)."""

    def pull_each_step(self) -> None:
        """A pull applied after every local step (LSGD every-step mode); none by default."""

    # -- the schedule -------------------------------------------------------------------------

    @property
    def asynchronous(self) -> bool:
        return bool(getattr(self.params, "mode", "sync") == "async")

    @property
    def step_aligned(self) -> bool:
        return not self.asynchronous

    def bind(self, ctx: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().bind(ctx, model, optimizer)
        self.state = ModelState(model)
        self.source = self.state.empty()
        if self.asynchronous:
            self.clock = AsyncRounds(ctx, self.periods(), self.checkpoint_every)
            self.clock.load_state_dict(self._pending_clock)

    def is_round(self, step: int) -> bool:
        return any(step % period == 0 for period in self.periods())

    def after_backward(self, step: int) -> None:
        if self.snapshot_every_step or (self.clock is None and self.is_round(step)):
            self.state.read(self.source)

    def after_step(self, step: int, loss: float) -> None:
        self.observe(loss)
        if self.clock is None:
            if self.is_round(step):
                self.run_round(step, True)
            if self.snapshot_every_step:
                self.pull_each_step()
            return
        if self.snapshot_every_step:
            self.pull_each_step()
        self.clock.after_step(self._async_round)

    def _async_round(self, vstep: int, ready: bool) -> bool | None:
        self.state.read(self.source)  # Algorithm 1: pull from the current parameters
        return self.run_round(vstep, ready)

    def should_stop(self, step: int, total_steps: int) -> bool:
        if self.clock is None:
            return super().should_stop(step, total_steps)
        return self.clock.should_stop(step, total_steps)

    def should_evaluate(self, step: int, every: int) -> bool:
        if self.clock is None:
            return super().should_evaluate(step, every)
        return self.clock.should_evaluate(every)

    def finish(self) -> None:
        if self.clock is not None:
            self.clock.finish(self._async_round)

    def checkpoint_label(self, step: int) -> int | None:
        if self.clock is None:
            return super().checkpoint_label(step)
        return self.clock.checkpoint_label()

    def final_checkpoint_label(self, step: int, total_steps: int) -> int:
        return step if self.clock is None else total_steps

    # -- resume ---------------------------------------------------------------------------------

    def clock_state(self) -> dict[str, Any]:
        return self.clock.state_dict() if self.clock is not None else {}

    def load_clock_state(self, state: dict[str, Any]) -> None:
        if self.clock is not None:
            self.clock.load_state_dict(state)
        else:
            self._pending_clock = dict(state)

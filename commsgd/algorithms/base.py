"""The algorithm contract and the registry that gives the CLI, configs and Python API their names.

An algorithm is declared by a small parameter dataclass (`Params`) and bound to one worker at run
time with `bind(ctx, model, optimizer)`. The shared training loop (and `commsgd.api.CommOptimizer`
in a user's own loop) calls its hooks around the local optimizer step:

    loss.backward()
    algo.after_backward(step)      # gradient traffic: all-reduce, compressed, parameter server
    optimizer.step()
    algo.after_step(step, loss)    # model traffic: leader pull, elastic averaging, gossip

The training loop produces the gradient through `compute_gradient(step, next_batch)`: by default one
mini-batch (zero, forward, backward); deadline-based methods override it and draw as many mini-batches
as they can finish in time. Everything an algorithm needs to resume lives in `state_dict()`; never a
process group.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from commsgd.config import OptimConfig, from_dict
from commsgd.errors import ConfigError

if TYPE_CHECKING:
    from commsgd.context import WorkerContext


@dataclasses.dataclass
class NoParams:
    """For algorithms without hyperparameters of their own."""


@dataclasses.dataclass(frozen=True)
class MiniBatch:
    """One mini-batch drawn for `Algorithm.compute_gradient`: `loss()` runs the forward pass and returns
    the mean loss over the batch's `size` samples. `head(n)`, when given, is the same batch cut to its
    first n samples: deadline-based methods count samples, so a batch the deadline cuts short still
    gives the samples that fit (without it, such a batch gives none)."""

    loss: Callable[[], torch.Tensor]
    size: int
    head: Callable[[int], MiniBatch] | None = None


NextBatch = Callable[[], MiniBatch]
"""Draws this worker's next mini-batch from its shard (each call moves the data position on)."""


@dataclasses.dataclass(frozen=True)
class Slowdown:
    """An emulated slow worker (`cluster.slow_ranks`): its compute takes `factor` times as long, plus
    `extra_s` per step. The Trainer sleeps the difference after each step; an algorithm that draws its
    own batches (`draws_batches`) spends it inside its computation, where a deadline can cut it short.
    """

    factor: float = 1.0
    extra_s: float = 0.0

    @property
    def active(self) -> bool:
        return self.factor != 1.0 or self.extra_s > 0.0

    def delay(self, compute_s: float, *, per_step: bool = True) -> float:
        """Seconds to sleep for `compute_s` of real compute (`per_step`: include the per-step extra)."""
        return (self.factor - 1.0) * compute_s + (self.extra_s if per_step else 0.0)


class SyncSwitch:
    """Whether backward passes communicate now: off inside `paused()` (DDP's `no_sync`), and back to what
    it was after. Shared by the algorithms that send during backward (`allreduce`, ef_sgd's overlap)."""

    def __init__(self) -> None:
        self.on = True

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        previous, self.on = self.on, False
        try:
            yield
        finally:
            self.on = previous


class Algorithm:
    """Base class: every hook is a no-op, so an algorithm implements only what it changes."""

    name: ClassVar[str] = ""
    summary_line: ClassVar[str] = ""
    Params: ClassVar[type[Any]] = NoParams
    #: runs on one worker only (plain SGD); the launcher refuses more workers
    single_worker: ClassVar[bool] = False
    #: draws its own mini-batches in `compute_gradient`: a step needs `next_batch`, not a ready loss
    draws_batches: ClassVar[bool] = False
    #: the local optimizers (`optim.name`) the update rule allows; `check_optim` refuses the others
    inner_optimizers: ClassVar[tuple[str, ...]] = ("sgd", "adamw")
    #: why only those (said when another is asked for)
    inner_optimizer_reason: ClassVar[str] = ""
    #: `after_backward` may write `.grad` (communicated gradients): the non-finite guard checks them
    #: again after it. False for algorithms that communicate models and leave the gradient as backward
    #: left it (a gradient checked before `after_backward` is then still finite: one check a step).
    replaces_gradients: ClassVar[bool] = True

    def __init__(self, params: Any = None) -> None:
        self.params = params if params is not None else self.Params()
        self.ctx: WorkerContext | None = None
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.slowdown = Slowdown()  # set by the Trainer on slowed ranks
        #: the run's checkpoint period in steps (0: only the final checkpoint), set by the Trainer
        #: before `bind` so that asynchronous algorithms can put checkpoints on their job-wide schedule
        self.checkpoint_every = 0
        #: micro-batches per step (`optim.accumulate`), set by the Trainer: the default
        #: `compute_gradient` runs that many backward passes, all but the last inside `no_sync()`
        self.accumulate = 1

    @classmethod
    def create(cls, params: Any) -> Algorithm:
        """An instance for validated `params` (what `build_algorithm` calls). A family whose modes are
        different classes under one name returns the mode's class here (easgd's `async-server`)."""
        return cls(params)

    # -- binding --------------------------------------------------------------------------

    def optimizer_overrides(self, optim: OptimConfig) -> dict[str, Any]:
        """Changes to the local torch SGD settings (e.g. momentum handled inside the algorithm)."""
        return {}

    def check_optim(self, optim: OptimConfig) -> None:
        """ConfigError (one line) if the local optimizer settings do not fit this algorithm's update."""
        if optim.name not in self.inner_optimizers:
            reason = f": {self.inner_optimizer_reason}" if self.inner_optimizer_reason else ""
            raise ConfigError(
                f"optim.name: {self.name} needs {' or '.join(self.inner_optimizers)}, "
                f"not {optim.name}{reason}"
            )

    def bind(self, ctx: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Attach to this worker's model and optimizer; create groups and buffers here (collective)."""
        self.ctx, self.model, self.optimizer = ctx, model, optimizer

    @property
    def bound_ctx(self) -> WorkerContext:
        if self.ctx is None:
            raise RuntimeError(
                f"algorithm {self.name!r} is not bound: call bind(ctx, model, optimizer) first"
            )
        return self.ctx

    @property
    def bound_model(self) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError(
                f"algorithm {self.name!r} is not bound: call bind(ctx, model, optimizer) first"
            )
        return self.model

    # -- hooks ----------------------------------------------------------------------------

    def compute_gradient(self, step: int, next_batch: NextBatch) -> float:
        """Fill the parameters' `.grad` for `step` from mini-batches of `next_batch()`; return the loss.

        Default: one mini-batch (zero the gradients, forward, backward); with `accumulate` = k > 1, k
        micro-batches, each loss divided by k (the gradient of their mean), the first k-1 backward
        passes inside `no_sync()` so that communication happens once per step; the loss returned is
        their mean. Deadline-based methods override it to draw as many mini-batches as finish in time.
        """
        if self.optimizer is None:
            raise RuntimeError(f"algorithm {self.name!r} is not bound: call bind(ctx, model, optimizer)")
        k = self.accumulate
        total = 0.0
        for i in range(k):
            batch = next_batch()
            if i == 0:
                self.optimizer.zero_grad(set_to_none=False)
            with self.no_sync() if i < k - 1 else contextlib.nullcontext():
                value = batch.loss()
                (value / k if k > 1 else value).backward()
            total += float(value.detach().item())
        return total / k

    def after_backward(self, step: int) -> None:
        """Replace the local gradients by communicated ones (or leave them for local SGD).

        `.grad` holds the sum of every backward pass since the gradients were last zeroed (several
        passes: gradient accumulation); communicate that sum, never one pass's share of it.
        """

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate locally (DDP's `no_sync`); the next pass outside, or
        the step, communicates the sum. The default: nothing is communicated during backward anyway."""
        yield

    @property
    def compresses_in_backward(self) -> bool:
        """Whether `.grad` is read during backward by something that is not linear in it (a compressor
        with error feedback, ef_sgd's `overlap`): fp16's loss scale is still in the gradient then, so
        the loss-scaled fp16 precision is refused."""
        return False

    def local_gradient_finite(self) -> bool | None:
        """Whether the local gradient this worker already sent during backward (since the last step)
        was finite; None when `.grad` still holds the local gradient (the guard checks it there)."""
        return None

    def after_step(self, step: int, loss: float) -> None:
        """Move the parameters after the local optimizer step; `loss` is this step's training loss."""

    def on_lr_change(self, old_lr: float, new_lr: float) -> None:
        """The learning-rate schedule changed the rate (error buffers may need rescaling)."""

    def should_evaluate(self, step: int, every: int) -> bool:
        """Whether the (collective) evaluation runs after `step`; async algorithms may move it."""
        return step % every == 0

    def should_stop(self, step: int, total_steps: int) -> bool:
        """Whether this worker's loop ends after `step` (async algorithms end on a job-wide budget)."""
        return step >= total_steps

    @property
    def step_aligned(self) -> bool:
        """Whether every collective belongs to a step number, the same on every worker.

        Then all workers can stop together after any step (an interrupt saves that step). False for
        asynchronous schedules (rounds on a job-wide counter, job-wide budgets), where a worker's
        collectives depend on what the others did.
        """
        return True

    @property
    def lockstep(self) -> bool:
        """Whether no worker runs far ahead of another (each step's or round's collectives wait for
        all), so that waiting for rank 0 at a step boundary costs next to nothing: the job clock
        (`commsgd.jobclock`) then makes every worker drop the rate at one step. False for workers
        that run at their own pace (a parameter server, asynchronous rounds)."""
        return self.step_aligned

    def finish(self) -> None:
        """End of training: drain rounds or stop servers so every worker exits cleanly."""

    @contextlib.contextmanager
    def evaluated_parameters(self) -> Iterator[None]:
        """Load the parameters to evaluate (the center variable) into the model for the duration."""
        yield

    # -- checkpoints ------------------------------------------------------------------------

    def checkpoint_label(self, step: int) -> int | None:
        """The label of the checkpoint due after `step` (asked after every step, after evaluation), or
        None. Every worker's file of one checkpoint has the same label: here the step, every
        `checkpoint_every` steps; asynchronous algorithms checkpoint on the job-wide schedule and
        label with the job's virtual step (job iterations / workers) instead."""
        every = self.checkpoint_every
        return step if every and step % every == 0 else None

    def final_checkpoint_label(self, step: int, total_steps: int) -> int:
        """The label of the checkpoint written after `finish` (asynchronous: the job's budget)."""
        return step

    def prepare_checkpoint(self) -> None:
        """Called right before this worker's state is saved for a checkpoint: collective where the
        workers' saved states must fit together (DOWNPOUR: the center holds every push they sent)."""

    # -- resume and reporting -------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"algorithm {self.name!r} has no state to load, got keys {sorted(state)}")

    def summary(self) -> dict[str, Any]:
        """Extra fields for this worker's entry in summary.json (e.g. times it led)."""
        return {}


REGISTRY: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make an algorithm available by its `name`."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a non-empty `name`")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise TypeError(f"algorithm name {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


def algorithm_names() -> list[str]:
    _load_all()
    return sorted(REGISTRY)


def get_algorithm_class(name: str) -> type[Algorithm]:
    _load_all()
    if name not in REGISTRY:
        raise ConfigError(f"algorithm: unknown name {name!r}; choose from {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def validate_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Check an algorithm's parameters; return them complete (defaults filled in) as plain data."""
    cls = get_algorithm_class(name)
    return dataclasses.asdict(from_dict(cls.Params, params, "algo"))


def build_algorithm(name: str, params: dict[str, Any] | None = None, **kwargs: Any) -> Algorithm:
    """An unbound algorithm by name, from a params mapping and/or keyword arguments."""
    cls = get_algorithm_class(name)
    merged = {**(params or {}), **kwargs}
    return cls.create(from_dict(cls.Params, merged, "algo"))


def _load_all() -> None:
    # Importing the package registers every algorithm module inside it.
    import commsgd.algorithms  # noqa: F401

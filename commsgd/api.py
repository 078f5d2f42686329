"""The Python API: drop a commsgd algorithm into your own training loop in a few lines.

import commsgd
ctx = commsgd.init()                                   # under torchrun (or any env:// launcher)
opt = commsgd.CommOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                            commsgd.build_algorithm("lsgd", tau=64), model, ctx)
for x, y in loader:
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step(loss)                                     # communication happens here
with opt.evaluated_parameters():                       # the center variable
    test(model)

Deadline-based algorithms (quantimed) draw their own mini-batches: call
`opt.step(next_batch=draw)` where each `draw()` loads the next batch and returns
`commsgd.MiniBatch(lambda: F.cross_entropy(model(x), y), len(y))`; every algorithm accepts this form.

Gradient accumulation over k micro-batches works as with DDP: k `backward()` calls, then one
`opt.step(loss)`; `with opt.no_sync(): loss.backward()` on the first k-1 skips their communication.
`CommOptimizer(..., clip_norm=1.0)` clips the gradient after communication, before the local step; fp16:
`CommOptimizer(..., scaler=commsgd.precision.AgreedScaler())` and `opt.scaler.scaled(loss).backward()`
(the forward under `torch.autocast`): overflowed steps are skipped by every worker alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from commsgd.algorithms.base import Algorithm, MiniBatch, NextBatch
from commsgd.config import ClusterConfig, NetworkConfig
from commsgd.context import WorkerContext, create_context
from commsgd.errors import ConfigError, say
from commsgd.finite import all_finite
from commsgd.optim import FP16_IN_BACKWARD
from commsgd.precision import AgreedScaler


def init(
    cluster: ClusterConfig | None = None,
    network: NetworkConfig | None = None,
    seed: int = 0,
    run_dir: str | Path | None = None,
) -> WorkerContext:
    """Join the job the environment describes (RANK, WORLD_SIZE, MASTER_ADDR, ...); return its context.

    Inside a worker of a `commsgd.simworld.SimulatedWorld` (a thread): that worker's context instead."""
    from commsgd.simworld import simulated_context

    where = Path(run_dir) if run_dir else None
    simulated = simulated_context(cluster, network, seed, where)
    if simulated is not None:
        return simulated
    return create_context(cluster or ClusterConfig(), network, seed, where)


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (policy `stop`, or too many bad steps in a row).

    `job_wide`: the bad values came back from communication, so every worker stops at the same step
    with the same finding (the launcher then says it once)."""

    def __init__(self, message: str, *, job_wide: bool = False) -> None:
        super().__init__(message)
        self.job_wide = job_wide


NONFINITE_POLICIES = ("skip", "stop")

#: a bad step found in the communicated gradient: the same on every worker (all skip or stop together)
AFTER_COMMUNICATION = "gradient after communication"
#: fp16: a loss scale backed off below this means the gradient is non-finite whatever the scale
MIN_LOSS_SCALE = 2.0**-24


class BufferSnapshot:
    """The model's buffers (batch-norm statistics) as they were before a step's first forward pass in
    training mode, so that a skipped step can put them back.

    A forward pass on a bad batch writes NaN into the running statistics before the guard sees the
    loss; without this, LSGD would broadcast them and model-averaging algorithms average them in.
    Costs one fused copy of the buffers per step (small next to the parameters in the usual models).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.due = True  # the next training forward pass takes a snapshot
        # Where each buffer lives (its module's buffer dict and name): walking the module tree costs
        # more than the copy, so it is done once, and a buffer replaced since (`module.to`) is noticed.
        self._slots: list[tuple[dict[str, Any], str]] | None = None
        self._live: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []
        model.register_forward_pre_hook(self._before_forward)

    def _before_forward(self, module: torch.nn.Module, args: Any) -> None:
        if self.due and module.training:
            self.take()

    def take(self) -> None:
        if self._slots is None or any(d.get(k) is not t for (d, k), t in zip(self._slots, self._live)):
            self._slots = [
                (m._buffers, k) for m in self.model.modules() for k, b in m._buffers.items() if b is not None
            ]
            self._live = [d[k] for d, k in self._slots]
            self._saved = [b.detach().clone() for b in self._live]
        elif self._live:
            torch._foreach_copy_(self._saved, self._live)
        self.due = False

    def changed(self) -> list[torch.Tensor]:
        """The buffers the forward passes of this step may have written (none without a snapshot)."""
        return [] if self.due else self._live

    def restore(self) -> None:
        """Put the buffers back as they were before this step's forward passes."""
        if not self.due and self._live:
            with torch.no_grad():
                torch._foreach_copy_(self._live, self._saved)


class CommOptimizer:
    """A torch optimizer wrapped so that each `step` runs the algorithm's hooks around the local update.

    Non-finite values: when this worker's loss, gradient or model buffers (batch-norm statistics) are
    NaN/Inf, its gradient is replaced by zeros and its buffers by their values before the step's
    forward passes, before the algorithm's hooks run, so it still takes part in every collective (the
    others would wait for it) but contributes nothing, and the algorithm gets an infinite loss in
    `after_step` (never the best worker, never the leader). A gradient that comes back non-finite
    from communication (e.g. an all-reduce started during backward) is zeroed the same way, on every
    worker alike. `nonfinite="skip"` goes on and stops after `max_bad_steps` bad steps in a row;
    `"stop"` stops at the first one. Either way a ``nonfinite`` event is logged, and stopping raises
    `NonFiniteError`.

    Gradient accumulation: several backward passes before one `step` communicate the accumulated sum
    (DDP's result); wrap the first passes in `no_sync()` to skip their communication.

    `clip_norm`: the gradient's global norm is clipped right before the optimizer step (after the
    algorithm's communication). `scaler` (fp16): backward ran on the scaled loss; see `_scaler_skips`.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        algorithm: Algorithm,
        model: torch.nn.Module,
        ctx: WorkerContext,
        *,
        nonfinite: str = "skip",
        max_bad_steps: int = 5,
        clip_norm: float | None = None,
        scaler: AgreedScaler | None = None,
    ) -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite: must be one of {', '.join(NONFINITE_POLICIES)}; got {nonfinite!r}")
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps: must be >= 1, got {max_bad_steps}")
        if scaler is not None and algorithm.compresses_in_backward:
            raise ConfigError(FP16_IN_BACKWARD.format(name=algorithm.name))
        self.optimizer, self.algorithm, self.model, self.ctx = optimizer, algorithm, model, ctx
        self.nonfinite, self.max_bad_steps = nonfinite, max_bad_steps
        self.bad_in_a_row = 0
        self.bad_steps = 0
        self.steps = 0
        self.buffers = BufferSnapshot(model)
        self.clip_norm = clip_norm  # of the gradient after communication (what optimizer.step sees)
        self.scaler = scaler  # fp16: backward ran on loss * scale; see `_scaler_skips`
        if algorithm.ctx is None:
            algorithm.bind(ctx, model, optimizer)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(
        self,
        loss: torch.Tensor | float | Callable[[], torch.Tensor] | None = None,
        *,
        step: int | None = None,
        next_batch: NextBatch | None = None,
    ) -> float:
        """One training step. Give the loss after `loss.backward()`, or a closure that computes it, or
        `next_batch` (a callable returning the next `MiniBatch`) and let the algorithm draw its batches.

        With a closure or `next_batch`, gradients are zeroed and backward is run here. Returns the loss.
        Deadline-based algorithms (`draws_batches`) need `next_batch`.
        """
        if next_batch is not None and loss is not None:
            raise ValueError("CommOptimizer.step: give either a loss or next_batch, not both")
        if next_batch is None and self.algorithm.draws_batches:
            raise ValueError(
                f"CommOptimizer.step: algorithm {self.algorithm.name!r} draws its own mini-batches; "
                "call step(next_batch=...) with a callable that returns commsgd.MiniBatch(loss_fn, size)"
            )
        self.steps = step if step is not None else self.steps + 1
        if next_batch is not None:
            loss = self.algorithm.compute_gradient(self.steps, next_batch)
        elif callable(loss):
            self.optimizer.zero_grad(set_to_none=False)
            value = loss()
            value.backward()
            loss = value
        loss_value = float(loss.detach().item()) if isinstance(loss, torch.Tensor) else float(loss or 0.0)
        bad = "loss" if not math.isfinite(loss_value) else self._local_fault()
        if self.scaler is not None and self._scaler_skips(bad, loss_value):
            return loss_value
        if bad is not None:
            self.buffers.restore()
            self._bad_step(bad)
            self._zero_gradients()
        self.algorithm.after_backward(self.steps)
        if self.algorithm.replaces_gradients and not all_finite(self._gradients()):
            if bad is None:
                bad = AFTER_COMMUNICATION
                self._bad_step(bad)
            self._zero_gradients()
        if bad is None:
            self.bad_in_a_row = 0
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._with_gradients(), self.clip_norm)
        self.optimizer.step()
        own_fault = bad is not None and bad != AFTER_COMMUNICATION
        self.algorithm.after_step(self.steps, math.inf if own_fault else loss_value)
        self.buffers.due = True
        return loss_value

    def _scaler_skips(self, bad: str | None, loss_value: float) -> bool:
        """fp16: agree with the other workers whether this step's scaled backward overflowed anywhere.

        No: the gradients are unscaled and the step goes on. Yes: every worker skips it alike (the
        scale backs off): the gradients are zeroed, the algorithm's hooks still run (its collectives
        stay in step on every worker), and the optimizer step is not taken. A local overflow is the
        scaler's business, not a non-finite fault; a non-finite loss or buffer still is.
        """
        scaler = self.scaler
        assert scaler is not None
        overflow = bad == "gradient"
        skip = scaler.agree(self.ctx.comm, overflow, self.ctx.device, self.algorithm.step_aligned)
        scaler.update(skip)
        if not skip:
            scaler.unscale_(self._gradients())
            return False
        if bad is not None and not overflow:
            self.buffers.restore()
            self._bad_step(bad)
        if scaler.scale < MIN_LOSS_SCALE:
            raise NonFiniteError(
                f"rank {self.ctx.rank}: the fp16 gradient overflowed at every loss scale down to "
                f"{scaler.scale:g} (step {self.steps}); training stopped",
                job_wide=self.algorithm.step_aligned,
            )
        self.ctx.log_event({"event": "scaler_skip", "step": self.steps, "scale": scaler.scale})
        self._zero_gradients()
        self.algorithm.after_backward(self.steps)
        self._zero_gradients()
        self.algorithm.after_step(self.steps, math.inf if bad is not None and not overflow else loss_value)
        self.buffers.due = True
        return True

    def _with_gradients(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    def _local_fault(self) -> str | None:
        """What of this worker's own is non-finite ("gradient" or "buffer"), or None.

        One fused check over the gradients and the buffers the step's forward passes wrote. An
        algorithm that sent the gradient during backward (`allreduce` with overlap) says itself
        whether what it sent was finite: `.grad` holds the communicated gradient by then.
        """
        sent = self.algorithm.local_gradient_finite()
        if sent is False:
            return "gradient"
        grads = self._gradients() if sent is None else []
        buffers = self.buffers.changed()
        if all_finite([*grads, *buffers]):
            return None
        return "gradient" if grads and not all_finite(grads) else "buffer"

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate gradients locally (DDP's `no_sync`): the next pass
        outside, or `step`, communicates the sum. Use it on the first k-1 of k micro-batches."""
        with self.algorithm.no_sync():
            yield

    def _gradients(self) -> list[torch.Tensor]:
        return [
            p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None
        ]

    def _zero_gradients(self) -> None:
        for g in self._gradients():
            g.zero_()

    def _bad_step(self, what: str) -> None:
        """Count and log a non-finite step; raise NonFiniteError when the policy says stop."""
        self.bad_in_a_row += 1
        self.bad_steps += 1
        rank = self.ctx.rank
        stop = self.nonfinite == "stop" or self.bad_in_a_row >= self.max_bad_steps
        self.ctx.log_event(
            {
                "event": "nonfinite",
                "step": self.steps,
                "rank": rank,
                "what": what,
                "action": "stop" if stop else "skip",
                "in_a_row": self.bad_in_a_row,
                "policy": self.nonfinite,
            }
        )
        if stop:
            in_a_row = f" ({self.bad_in_a_row} bad steps in a row)" if self.nonfinite == "skip" else ""
            raise NonFiniteError(
                f"rank {rank}: non-finite {what} at step {self.steps}{in_a_row}; training stopped "
                f"(nonfinite={self.nonfinite}, max_bad_steps={self.max_bad_steps})",
                job_wide=what == AFTER_COMMUNICATION,
            )
        say(
            f"commsgd: warning: rank {rank}: non-finite {what} at step {self.steps}; this worker's "
            f"gradient is zeroed for the step ({self.bad_in_a_row} in a row, stop at {self.max_bad_steps})"
        )

    @contextmanager
    def evaluated_parameters(self) -> Iterator[None]:
        """Temporarily load the parameters the algorithm evaluates (e.g. the center variable)."""
        with self.algorithm.evaluated_parameters():
            yield

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "algorithm": self.algorithm.state_dict(),
            "steps": self.steps,
            **self.guard_state(),
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.algorithm.load_state_dict(state["algorithm"])
        self.steps = int(state["steps"])
        self.load_guard_state(state)
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def guard_state(self) -> dict[str, int]:
        """The non-finite guard's counters, so that `max_bad_steps` in a row spans a resume."""
        return {"bad_in_a_row": self.bad_in_a_row, "bad_steps": self.bad_steps}

    def load_guard_state(self, state: dict[str, Any]) -> None:
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))  # absent in older checkpoints
        self.bad_steps = int(state.get("bad_steps", 0))


__all__ = ["CommOptimizer", "MiniBatch", "NextBatch", "NonFiniteError", "all_finite", "init"]

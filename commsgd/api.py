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
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from commsgd.algorithms.base import Algorithm, MiniBatch, NextBatch
from commsgd.config import ClusterConfig, NetworkConfig
from commsgd.context import WorkerContext, create_context


def init(
    cluster: ClusterConfig | None = None,
    network: NetworkConfig | None = None,
    seed: int = 0,
    run_dir: str | Path | None = None,
) -> WorkerContext:
    """Join the job the environment describes (RANK, WORLD_SIZE, MASTER_ADDR, ...); return its context."""
    return create_context(cluster or ClusterConfig(), network, seed, Path(run_dir) if run_dir else None)


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (policy `stop`, or too many bad steps in a row)."""


NONFINITE_POLICIES = ("skip", "stop")


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite (no NaN, no +-Inf), with one sync.

    Runs twice a step in `CommOptimizer.step`, so it must be cheap on models with many small tensors:
    floating tensors on one device go through torch's fused multi-tensor non-finite check (the one
    AMP's grad scaler uses, with a scale of 1, which leaves the values as they are); anything else is
    checked by summing each tensor (a NaN or an Inf anywhere makes the sum non-finite; a sum of finite
    float32 values overflows only near 3.4e38, where a step is useless anyway). Integer tensors are
    always finite.
    """
    floats = [t for t in tensors if t.is_floating_point()]
    if not floats:
        return True
    device = floats[0].device
    if all(t.device == device for t in floats):
        found = torch.zeros((), device=device)
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(floats, found, torch.ones((), device=device))
        except (RuntimeError, NotImplementedError):  # a dtype or device the fused kernel lacks
            pass
        else:
            return not bool(found)
    sums = [t.sum(dtype=torch.float32) if t.dtype in _LOW_PRECISION else t.sum() for t in floats]
    return bool(torch.stack(sums).sum().isfinite())


class CommOptimizer:
    """A torch optimizer wrapped so that each `step` runs the algorithm's hooks around the local update.

    Non-finite values: when this worker's loss or gradient is NaN/Inf, its gradient is replaced by
    zeros before the algorithm's hooks run, so it still takes part in every collective (the others
    would wait for it) but contributes nothing, and the algorithm gets an infinite loss in
    `after_step` (never the best worker, never the leader). A gradient that comes back non-finite
    from communication (e.g. an all-reduce started during backward) is zeroed the same way, on every
    worker alike. `nonfinite="skip"` goes on and stops after `max_bad_steps` bad steps in a row;
    `"stop"` stops at the first one. Either way a ``nonfinite`` event is logged, and stopping raises
    `NonFiniteError`.
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
    ) -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite: must be one of {', '.join(NONFINITE_POLICIES)}; got {nonfinite!r}")
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps: must be >= 1, got {max_bad_steps}")
        self.optimizer, self.algorithm, self.model, self.ctx = optimizer, algorithm, model, ctx
        self.nonfinite, self.max_bad_steps = nonfinite, max_bad_steps
        self.bad_in_a_row = 0
        self.bad_steps = 0
        self.steps = 0
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
        bad = None if math.isfinite(loss_value) else "loss"
        if bad is None and not all_finite(self._gradients()):
            bad = "gradient"
        if bad is not None:
            self._bad_step(bad)
            self._zero_gradients()
        self.algorithm.after_backward(self.steps)
        if not all_finite(self._gradients()):
            if bad is None:
                bad = "gradient after communication"
                self._bad_step(bad)
            self._zero_gradients()
        if bad is None:
            self.bad_in_a_row = 0
        self.optimizer.step()
        own_fault = bad is not None and bad != "gradient after communication"
        self.algorithm.after_step(self.steps, math.inf if own_fault else loss_value)
        return loss_value

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
                f"(nonfinite={self.nonfinite}, max_bad_steps={self.max_bad_steps})"
            )
        print(
            f"commsgd: warning: rank {rank}: non-finite {what} at step {self.steps}; this worker's "
            f"gradient is zeroed for the step ({self.bad_in_a_row} in a row, stop at {self.max_bad_steps})",
            file=sys.stderr,
            flush=True,
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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.algorithm.load_state_dict(state["algorithm"])
        self.steps = int(state["steps"])
        self.load_guard_state(state)

    def guard_state(self) -> dict[str, int]:
        """The non-finite guard's counters, so that `max_bad_steps` in a row spans a resume."""
        return {"bad_in_a_row": self.bad_in_a_row, "bad_steps": self.bad_steps}

    def load_guard_state(self, state: dict[str, Any]) -> None:
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))  # absent in older checkpoints
        self.bad_steps = int(state.get("bad_steps", 0))


__all__ = ["CommOptimizer", "MiniBatch", "NextBatch", "NonFiniteError", "all_finite", "init"]

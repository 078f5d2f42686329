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

from collections.abc import Callable, Iterator
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


class CommOptimizer:
    """A torch optimizer wrapped so that each `step` runs the algorithm's hooks around the local update."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        algorithm: Algorithm,
        model: torch.nn.Module,
        ctx: WorkerContext,
    ) -> None:
        self.optimizer, self.algorithm, self.model, self.ctx = optimizer, algorithm, model, ctx
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
        self.algorithm.after_backward(self.steps)
        self.optimizer.step()
        self.algorithm.after_step(self.steps, loss_value)
        return loss_value

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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.algorithm.load_state_dict(state["algorithm"])
        self.steps = int(state["steps"])


__all__ = ["CommOptimizer", "MiniBatch", "NextBatch", "init"]

"""Shared pieces of the LSGD / EASGD / local SGD tests: a tiny model, per-worker data, the local steps of
several workers simulated in one process (the references), and one 4-worker job whose results the
three algorithms' tests check: in the simulated world (the update rules need no processes), plus one
2-process gloo job for the comparison with PyTorch's own PeriodicModelAverager (its own all_reduce)."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

import commsgd
from commsgd.algorithms import Algorithm
from commsgd.config import ClusterConfig
from commsgd.context import WorkerContext
from commsgd.simworld import run_simulated
from commsgd.testing import run_distributed

LR, MOMENTUM = 0.1, 0.9
WORLD = 4
PMA_WORLD = 2  # gloo processes for the PeriodicModelAverager comparison
PAIRS, ALL = [[0, 1], [2, 3]], [[0, 1, 2, 3]]
Levels = list[tuple[list[list[int]], int, float]]  # (leader groups, period, pull) per level

# LSGD: name -> (algorithm params, group size, steps, the reference's levels)
LSGD_SCENARIOS: dict[str, tuple[dict[str, Any], int | None, int, Levels]] = {
    "single-once": (
        {"leaders": "single", "tau": 2, "window": 3, "pull": 0.3, "evaluate": "leader"},
        None,
        7,
        [(ALL, 2, 0.3)],
    ),
    "single-every-step": (
        {"leaders": "single", "tau": 3, "window": 2, "pull": 0.2, "pull_mode": "every-step"},
        None,
        7,
        [(ALL, 3, 0.2)],
    ),
    "multi-once": (
        {"tau": 2, "tau_global": 4, "window": 2, "pull": 0.3, "pull_global": 0.2},
        2,
        9,
        [(PAIRS, 2, 0.3), (ALL, 4, 0.2)],
    ),
    "multi-every-step": (
        {"tau": 2, "tau_global": 3, "window": 1, "pull": 0.2, "pull_global": 0.1, "pull_mode": "every-step"},
        2,
        7,
        [(PAIRS, 2, 0.2), (ALL, 3, 0.1)],
    ),
}
EASGD = {"tau": 2, "beta": 0.43, "steps": 7}
LOCAL_SGD = {"tau": 3, "steps": 7}


def tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def batch_loss(model: torch.nn.Module, rank: int, step: int) -> torch.Tensor:
    """Worker `rank`'s mini-batch loss at `step`: every worker sees its own data."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    return F.cross_entropy(model(x), y)


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def optimizer(model: torch.nn.Module, momentum: float = MOMENTUM) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)


def train(ctx: WorkerContext, algo: Algorithm, steps: int, momentum: float = MOMENTUM) -> torch.nn.Module:
    """Run `steps` steps of `algo` on this worker (models start differently on every worker)."""
    model = tiny_model(ctx.rank)
    opt = commsgd.CommOptimizer(optimizer(model, momentum), algo, model, ctx)
    for step in range(1, steps + 1):
        opt.step(lambda step=step: batch_loss(model, ctx.rank, step), step=step)  # type: ignore[misc]
    return model


class Workers:
    """Several workers' models and local optimizers in one process: the single-process reference."""

    def __init__(self, world: int, momentum: float = MOMENTUM) -> None:
        self.models = [tiny_model(r) for r in range(world)]
        self.opts = [optimizer(m, momentum) for m in self.models]

    def local_step(self, step: int) -> tuple[list[torch.Tensor], list[float]]:
        """One local SGD step on every worker; returns the parameters before it and the losses."""
        before = [flat(m) for m in self.models]
        losses = []
        for rank, (model, opt) in enumerate(zip(self.models, self.opts)):
            opt.zero_grad()
            loss = batch_loss(model, rank, step)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return before, losses

    def add(self, rank: int, delta: torch.Tensor) -> None:
        """Add a flat vector to worker `rank`'s parameters."""
        offset = 0
        with torch.no_grad():
            for p in self.models[rank].parameters():
                p.add_(delta[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def flats(self) -> list[torch.Tensor]:
        return [flat(m) for m in self.models]


def assert_params_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


# -- the shared 4-worker job -------------------------------------------------------------------------


def _run(name: str, params: dict[str, Any], steps: int, group_size: int | None = None) -> dict[str, Any]:
    ctx = commsgd.init(cluster=ClusterConfig(group_size=group_size))
    algo: Any = commsgd.build_algorithm(name, params)
    model = train(ctx, algo, steps)
    with algo.evaluated_parameters():
        evaluated = flat(model)
    result = {"params": flat(model), "evaluated": evaluated, "summary": algo.summary()}
    return {**result, "leaders": dict(getattr(algo, "leaders", {}))}


def _bytes_per_round(name: str) -> float:
    ctx = commsgd.init()
    train(ctx, commsgd.build_algorithm(name, tau=1), 4, momentum=0.0)
    return ctx.comm.meter.totals().bytes_sent / 4


def _periodic_model_averager() -> torch.Tensor:
    """PyTorch's local SGD: its averager (its own all_reduce on the default group) after each step."""
    rank = commsgd.init().rank
    model = tiny_model(rank)
    opt = optimizer(model)
    averager = PeriodicModelAverager(period=LOCAL_SGD["tau"], warmup_steps=LOCAL_SGD["tau"] - 1)
    for step in range(1, LOCAL_SGD["steps"] + 1):
        opt.zero_grad()
        batch_loss(model, rank, step).backward()
        opt.step()
        averager.average_parameters(model.parameters())
    return flat(model)


def _worker() -> dict[str, Any]:
    results: dict[str, Any] = {
        name: _run("lsgd", p, steps, gs) for name, (p, gs, steps, _) in LSGD_SCENARIOS.items()
    }
    results["easgd"] = _run("easgd", {"tau": EASGD["tau"], "beta": EASGD["beta"]}, int(EASGD["steps"]))
    results["local_sgd"] = _run("local_sgd", {"tau": LOCAL_SGD["tau"]}, LOCAL_SGD["steps"])
    results["bytes"] = {"lsgd": _bytes_per_round("lsgd"), "easgd": _bytes_per_round("easgd")}
    return results


def _local_sgd_and_periodic_model_averager() -> dict[str, Any]:
    return {
        "local_sgd": _run("local_sgd", {"tau": LOCAL_SGD["tau"]}, LOCAL_SGD["steps"]),
        "periodic_model_averager": _periodic_model_averager(),
    }


@functools.cache
def shared_results() -> list[dict[str, Any]]:
    """Every simulated rank's results of the shared job (run once per test session)."""
    return run_simulated(_worker, WORLD)


@functools.cache
def periodic_model_averager_results() -> list[dict[str, Any]]:
    """Every gloo rank's local SGD and PeriodicModelAverager results (run once per test session)."""
    return run_distributed(_local_sgd_and_periodic_model_averager, PMA_WORLD)

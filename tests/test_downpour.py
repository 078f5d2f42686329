"""downpour pieces in one process: the center's bookkeeping, parameters, and the job-wide schedule."""

from __future__ import annotations

import random

import pytest
import torch

from commsgd.algorithms import validate_params
from commsgd.algorithms.downpour import JobBudget
from commsgd.algorithms.param_server import HEADER_LEN, Center, header
from commsgd.errors import ConfigError


def test_center_applies_pushes_and_counts_staleness() -> None:
    center = Center([torch.zeros(3), torch.zeros(2, dtype=torch.float64)], world_size=2)
    center.apply(1, [torch.ones(3), torch.ones(2, dtype=torch.float64)], based_on=0)
    center.apply(0, [torch.ones(3), torch.ones(2, dtype=torch.float64)], based_on=0)  # one push behind
    out = [torch.empty(3), torch.empty(2, dtype=torch.float64)]
    assert center.read(out, rank=1) == 2
    assert out[0].tolist() == [2.0, 2.0, 2.0] and out[1].dtype == torch.float64
    summary = center.stats.summary()
    assert summary["pushes_applied"] == [1, 1] and summary["fetches_served"] == [0, 1]
    assert summary["mean_staleness"] == 0.5 and summary["max_staleness"] == 1
    assert center.wait_for([1, 1], 0.1, lambda: False)
    assert not center.wait_for([2, 1], 0.01, lambda: False)


def test_center_state_round_trip() -> None:
    center = Center([torch.zeros(4)], world_size=3)
    center.apply(2, [torch.full((4,), 0.5)], based_on=0)
    restored = Center([torch.zeros(4)], world_size=3)
    restored.load_state_dict(center.state_dict())
    assert restored.version == 1 and restored.tensors[0].tolist() == [0.5] * 4
    assert restored.stats.pushes == [0, 0, 1]
    assert restored.stats.session_pushes == [0, 0, 0]  # counted per run, not restored


def test_header_layout() -> None:
    h = header(3, 7)
    assert h.dtype == torch.int64 and h.tolist() == [3, 7] + [0] * (HEADER_LEN - 2)


def test_params_are_validated() -> None:
    assert validate_params("downpour", {}) == {"n_push": 1, "n_fetch": 1, "budget": "worker"}
    with pytest.raises(ConfigError, match="n_push"):
        validate_params("downpour", {"n_push": 0})
    with pytest.raises(ConfigError, match="budget"):
        validate_params("downpour", {"budget": "epoch"})


def _simulate(world: int, total: int, every: int, start: int, seed: int) -> tuple[list[int], list[int]]:
    """Run `world` workers of the training loop, interleaved at random with random speeds.

    A worker that evaluates blocks until every worker has entered the same evaluation (it is
    collective); returns each worker's steps and evaluations. Fails on a deadlock.
    """
    rng = random.Random(seed)
    counter = [0]

    def add(n: int) -> int:
        counter[0] += n
        return counter[0]

    budgets = [JobBudget(world, add) for _ in range(world)]
    steps, evals = [start] * world, [0] * world
    blocked, stopped = [False] * world, [False] * world
    speed = [rng.uniform(0.2, 1.0) for _ in range(world)]
    for _ in range(100_000):
        if all(stopped):
            return steps, evals
        runnable = [r for r in range(world) if not (blocked[r] or stopped[r])]
        assert runnable, f"deadlock: blocked={blocked} stopped={stopped} evals={evals}"
        r = rng.choices(runnable, weights=[speed[i] for i in runnable])[0]
        b = budgets[r]
        if b.should_stop(steps[r], total):
            stopped[r] = True
            continue
        steps[r] += 1
        b.count(steps[r])  # after_step
        if b.should_evaluate(steps[r], every):
            evals[r] += 1
            blocked[r] = True
            waiting = [i for i in range(world) if blocked[i]]
            if len(waiting) == world:
                assert len(set(evals)) == 1, f"evaluations do not match: {evals}"
                blocked = [False] * world
    raise AssertionError("did not finish")


@pytest.mark.parametrize(
    ("world", "total", "every", "start", "seed"),
    [
        (3, 30, 5, 0, 0),
        (4, 20, 1, 0, 1),
        (2, 50, 7, 0, 2),
        (3, 30, 5, 10, 3),  # resumed at step 10
        (4, 25, 100, 0, 4),
        (3, 9, 2, 9, 5),  # resumed at the end
    ],
)
def test_job_budget_schedule_is_collective_and_ends(
    world: int, total: int, every: int, start: int, seed: int
) -> None:
    steps, evals = _simulate(world, total, every, start, seed)
    budget = total * world
    last = (budget - 1) // (every * world)
    assert evals == [last - min(start // every, last)] * world  # all join every evaluation still due
    spent = max(budget, start * world)
    assert spent <= sum(steps) <= spent + world - 1  # overshoot: at most one step per other worker

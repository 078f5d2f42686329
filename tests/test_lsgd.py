"""LSGD's pieces in one process: the loss window, leader selection, parameters, the asynchronous schedule."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from commsgd.algorithms import build_algorithm, validate_params
from commsgd.algorithms.lsgd import LossWindow, select_leader
from commsgd.algorithms.rounds import AsyncRounds
from commsgd.config import OptimConfig
from commsgd.errors import ConfigError


def test_loss_window_keeps_the_last_k() -> None:
    window = LossWindow(3)
    assert window.estimate() == math.inf
    for loss in (9.0, 1.0, 2.0, 3.0):
        window.add(loss)
    assert window.estimate() == pytest.approx(2.0)
    window.add(float("nan"))
    assert window.estimate() == math.inf  # not finite: never a leader


def test_select_leader_skips_non_finite_and_breaks_ties_low() -> None:
    assert select_leader([3.0, 1.0, 1.0, 2.0]) == 1
    assert select_leader([math.nan, 5.0, math.inf, 7.0]) == 1
    assert select_leader([math.nan, -math.inf, math.inf]) is None
    assert select_leader([-math.inf, 2.0, math.nan, 2.0]) == 1
    assert select_leader([]) is None
    assert select_leader([-0.5, -0.2]) == 0
    assert select_leader([0.0, -0.0]) == 0  # equal values: the lowest index, as torch.argmin
    assert select_leader([]) is None


def test_defaults_follow_the_paper() -> None:
    lsgd = validate_params("lsgd", {})
    assert (lsgd["pull"], lsgd["tau"], lsgd["window"], lsgd["pull_mode"]) == (0.1, 64, 10, "once")
    algo: Any = build_algorithm("lsgd")
    assert (algo.params.global_pull, algo.params.global_period) == (0.1, 128)
    assert validate_params("easgd", {}) == {
        "beta": 0.43,
        "tau": 64,
        "mode": "sync",
        "eamsgd": False,
        "momentum": None,
        "budget": "worker",
    }
    assert validate_params("local_sgd", {}) == {"tau": 64}


@pytest.mark.parametrize(
    "params",
    [{"tau": 8, "tau_global": 8}, {"pull": 0.0}, {"pull": 1.0}, {"pull_mode": "sometimes"}, {"window": 0}],
)
def test_bad_lsgd_params(params: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"^algo\."):
        validate_params("lsgd", params)


def test_eamsgd_uses_nesterov_momentum() -> None:
    optim = OptimConfig(momentum=0.9)
    assert build_algorithm("easgd").optimizer_overrides(optim) == {}
    assert build_algorithm("easgd", eamsgd=True).optimizer_overrides(optim) == {
        "momentum": 0.9,
        "nesterov": True,
    }
    eamsgd = build_algorithm("easgd", eamsgd=True, momentum=0.99)
    assert eamsgd.optimizer_overrides(optim) == {"momentum": 0.99, "nesterov": True}


# -- the asynchronous schedule, with the workers' steps interleaved in one process ------------------


class _Meter:
    @contextlib.contextmanager
    def in_phase(self, name: str) -> Iterator[None]:
        yield


@dataclass
class _Comm:
    meter: _Meter = field(default_factory=_Meter)

    def all_gather_json(self, obj: Any) -> list[Any]:
        return [obj]  # a fresh start: every worker reports step 0

    def barrier(self) -> None:
        pass


@dataclass
class _Context:
    rank: int
    world_size: int
    counter: itertools.count[int]
    comm: _Comm = field(default_factory=_Comm)

    def add_global_steps(self, amount: int = 1) -> int:
        assert amount == 1
        return next(self.counter)


@pytest.mark.parametrize("speeds", [(1, 1, 1), (3, 1, 2), (5, 1, 1)])
def test_async_schedule_uses_the_budget_and_joins_every_round(speeds: tuple[int, ...]) -> None:
    world, total, periods = len(speeds), 20, (4, 6)
    counter = itertools.count(1)
    clocks = [AsyncRounds(_Context(r, world, counter), periods) for r in range(world)]  # type: ignore[arg-type]
    joined: list[list[int]] = [[] for _ in range(world)]
    steps = [0] * world
    running = set(range(world))
    while running:  # worker r takes speeds[r] steps per turn
        for rank in sorted(running):
            for _ in range(speeds[rank]):
                if clocks[rank].should_stop(steps[rank], total):
                    clocks[rank].finish(lambda s, ready, rank=rank: joined[rank].append(s))  # type: ignore[misc]
                    running.discard(rank)
                    break
                steps[rank] += 1
                clocks[rank].after_step(lambda s, ready, rank=rank: joined[rank].append(s))  # type: ignore[misc]
    assert sum(steps) == world * total  # exactly the job's budget
    if speeds[0] > speeds[1]:
        assert steps[0] > steps[1]
    expected = sorted({s for p in periods for s in range(p, total + 1, p)})
    assert all(j == expected for j in joined)  # every round, in order, once

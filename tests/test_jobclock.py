"""Wall-clock learning-rate drops (`optim.drop_seconds`) are decided by one clock for the whole job.

With each worker's own clock, replicas of a synchronous algorithm drop at different steps and never
agree again. Here the clocks are faked (deterministic, by step): rank 1's runs 7 s ahead of rank 0's,
so by its own clock rank 1 would drop at step 8 and rank 0 at step 15. Both must drop at the same step
(the first decision boundary after rank 0's clock passed the mark) and stay bitwise equal.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from commsgd.algorithms import validate_params
from commsgd.config import load_config
from commsgd.context import create_context
from commsgd.jobclock import EVERY, JobClock
from commsgd.metrics import read_jsonl
from commsgd.testing import run_distributed
from commsgd.train import Trainer

MARK, SKEW, STEPS, LR = 15.0, 7.0, 30, 0.1


def _skewed_run(run_dir: str) -> dict[str, Any]:
    cfg = load_config(
        {},
        [
            "algorithm=allreduce",
            f"steps={STEPS}",
            f"optim.lr={LR}",
            "optim.schedule=step",
            f"optim.drop_seconds=[{MARK}]",
            "log_every=1",
            "eval_every=1000",
            "checkpoint_every=0",
            "progress=false",
        ],
        validate_algorithm=validate_params,
    )
    ctx = create_context(cfg.cluster, cfg.network, cfg.seed, Path(run_dir))
    skew = SKEW if ctx.rank == 1 else 0.0
    Trainer.wall_s = lambda self: self.step * 1.0 + skew  # type: ignore[method-assign]
    try:
        trainer = Trainer(cfg, ctx, Path(run_dir))
        trainer.run()
        return {"state": {k: v.clone() for k, v in trainer.model.state_dict().items()}}
    finally:
        ctx.close()


@pytest.mark.multiprocess
def test_allreduce_replicas_drop_at_one_step_when_clocks_disagree(tmp_path: Path) -> None:
    results = run_distributed(_skewed_run, 2, str(tmp_path))
    rates = [[r["lr"] for r in read_jsonl(tmp_path / "metrics" / f"rank{rank}.jsonl")] for rank in (0, 1)]
    assert rates[0] == rates[1], rates
    dropped = [step for step, lr in enumerate(rates[0], start=1) if lr < LR]
    assert dropped and dropped == list(range(dropped[0], STEPS + 1))  # one drop, never undone
    assert MARK < dropped[0] <= MARK + EVERY + 1  # by rank 0's clock, at its next decision boundary
    for key, value in results[0]["state"].items():
        assert torch.equal(value, results[1]["state"][key]), key


class _Meter:
    @contextlib.contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        yield


class _StoreComm:
    """The store calls of a Communicator over a dict; a get of a missing key fails (it would wait)."""

    def __init__(self, data: dict[str, bytes]) -> None:
        self.meter, self.data = _Meter(), data

    def store_set(self, store: Any, key: str, value: bytes) -> None:
        self.data[key] = value

    def store_get(self, store: Any, key: str) -> bytes:
        if key not in self.data:
            raise TimeoutError(f"would wait for {key}")
        return self.data[key]

    def store_check(self, store: Any, key: str) -> bool:
        return key in self.data


def _clocks(lockstep: bool) -> tuple[JobClock, JobClock, dict[str, bytes]]:
    data: dict[str, bytes] = {}
    comm: Any = _StoreComm(data)
    return (
        JobClock(comm, None, 0, 2, [MARK], lockstep),
        JobClock(comm, None, 1, 2, [MARK], lockstep),
        data,
    )


def test_lockstep_workers_take_rank_zero_time_at_each_boundary_and_stop_asking_after_the_last_mark() -> None:
    zero, one, data = _clocks(lockstep=True)
    assert zero.seconds(0, 0.5) == 0.5 and one.seconds(0, 99.0) == 0.5  # rank 0's clock, not its own
    assert one.seconds(5, 99.0) == 0.5  # between boundaries the job clock stands still
    with pytest.raises(TimeoutError):
        one.seconds(10, 99.0)  # rank 0 has not reached step 10: a lockstep worker waits for it
    assert zero.seconds(10, 20.0) == 20.0 and one.seconds(10, 1.0) == 20.0
    before = dict(data)
    assert zero.seconds(20, 30.0) == 20.0 and one.seconds(20, 1.0) == 20.0  # every mark passed
    assert data == before  # nothing more is written or read


def test_workers_at_their_own_pace_never_wait_for_rank_zero() -> None:
    zero, one, data = _clocks(lockstep=False)
    assert one.seconds(0, 99.0) == 0.0  # nothing published yet: no wait, no drop
    assert zero.seconds(0, 3.0) == 3.0
    assert one.seconds(30, 99.0) == 3.0  # the latest value, whatever step rank 0 is at
    assert zero.seconds(10, 16.0) == 16.0 and one.seconds(40, 0.0) == 16.0
    assert list(data) == ["jobclock/latest"]

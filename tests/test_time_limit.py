"""`max_seconds`: training ends on rank 0's clock at a step every worker agrees on, then finishes as at
its last step (final evaluation, checkpoint, summary); asynchronous schedules are refused up front."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
from worker_threads import run_workers

from commsgd.cli import main
from commsgd.comm import Communicator
from commsgd.interrupt import CHECK_EVERY, TIME_LIMIT, Signals, StopAgreement


@pytest.mark.parametrize("check_every", [CHECK_EVERY, 1])
def test_rank0_time_limit_stops_every_worker_at_one_check_step(check_every: int) -> None:
    world, last, limit_at = 3, 500, 23
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=30))
    agreements = [
        StopAgreement(
            Communicator(r, world, [0] * world),
            store,
            r,
            world,
            last,
            True,
            30.0,
            signals=Signals(),
            check_every=check_every,
        )
        for r in range(world)
    ]
    collective = threading.Barrier(world, timeout=30)
    stops = [0] * world

    def worker(rank: int) -> None:
        step = 0
        while step < last:
            step += 1
            collective.wait()  # the step's collective
            if rank == 0 and step >= limit_at:
                agreements[0].limit_reached = True
            if agreements[rank].should_stop(step):
                break
        stops[rank] = step

    run_workers(worker, world)
    expected = 30 if check_every == CHECK_EVERY else 24  # the first check step after rank 0's limit
    assert stops == [expected] * world
    assert all(a.signum() == TIME_LIMIT for a in agreements)


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "eval.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ["downpour"])  # a server: the trickiest finish; lockstep above
def test_a_run_ends_at_its_time_limit_and_finishes_normally(tmp_path: Path, algorithm: str) -> None:
    out = tmp_path / "run"
    argv = ["train", "--workers", "2", "--algorithm", algorithm, "--steps", "1000000"]
    code = main([*argv, "max_seconds=1", "eval_every=50", "--out", str(out), "progress=false"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    steps = _steps(out)
    assert steps[-1] < 1_000_000
    assert summary["test_error"] < 0.5  # the final evaluation of a trained model
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert all(0 < e["train_s"] < e["wall_s"] for e in evals)  # evaluations are not training time
    assert evals[-1]["train_s"] >= 1.0  # the limit counts training seconds
    assert all(t > 0 for t in summary["eval_time_s"])
    assert evals[-1]["wall_s"] - evals[-1]["train_s"] == pytest.approx(summary["eval_time_s"][0], abs=1e-3)
    # each worker's training time: its wall clock less its evaluations, up to the summary (just after)
    assert 0 <= summary["train_time_s"][0] - evals[-1]["train_s"] < 0.5
    last = [
        json.loads(p.read_text().splitlines()[-1])["step"] for p in sorted((out / "metrics").glob("*.jsonl"))
    ]
    assert last == [steps[-1], steps[-1]]  # both workers ended at the evaluated step
    assert (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())


def test_an_asynchronous_schedule_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["train", "--workers", "2", "--algorithm", "downpour", "algo.budget=job", "max_seconds=5"]
    code = main([*argv, "--out", str(tmp_path / "run"), "progress=false"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("commsgd: error: max_seconds:") and "asynchronous" in err[-1]

"""Stopping a run with SIGINT / SIGTERM, and bad input that workers would find, under `--max-restarts`.

* A signal to a running `commsgd train` (SIGTERM to the launcher only, as a scheduler sends it; SIGINT
  to the whole process group, as Ctrl-C does): exit 130 / 143 with one line, a checkpoint of the
  step every worker stopped at, and `--resume` runs to the end with every step logged exactly once.
* The stop protocol itself (`StopAgreement`) with threads as workers, in lockstep and drifting apart.
* Bad input (batch larger than a shard, group size, CUDA, model vs data set, no loadable checkpoint):
  one `commsgd: error:` line and exit 2, nothing restarted, with `--max-restarts 2`.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
from worker_threads import run_workers

from commsgd.cli import main
from commsgd.comm import Communicator
from commsgd.interrupt import CHECK_EVERY, Signals, StopAgreement

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["progress=false", "eval_every=100000", "cluster.timeout_s=60"]
LINE = re.compile(r"^commsgd: interrupted at step (\d+); resume with `commsgd train --resume (.+)`$")


def _metric_steps(run: Path, rank: int) -> list[int]:
    path = run / "metrics" / f"rank{rank}.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def _wait_for_steps(run: Path, proc: subprocess.Popen[str], steps: int, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    path = run / "metrics" / "rank1.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the run did not reach step {steps}: {proc.communicate()[1][-2000:]}")


@pytest.mark.multiprocess
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_where_the_workers_stop_and_resume_continues(tmp_path: Path, sig: int) -> None:
    run = tmp_path / "run"
    steps = 2000  # far more than the test waits for: the workers are training when the signal comes
    args = ["--workers", "2", "--steps", str(steps), "--out", str(run), *COMMON, "checkpoint_every=0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "commsgd", "train", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, as a terminal gives a foreground job
    )
    _wait_for_steps(run, proc, 15, limit_s=240)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # Ctrl-C: the launcher and every worker get it
    else:
        os.kill(proc.pid, sig)  # a scheduler: the launcher only
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    match = LINE.match(lines[0])
    assert match is not None, err
    stopped = int(match.group(1))
    assert Path(match.group(2)) == run
    assert 15 <= stopped < steps
    for rank in (0, 1):
        assert (run / "checkpoints" / f"step{stopped:08d}" / f"rank{rank}.pt").is_file()
        assert _metric_steps(run, rank) == list(range(1, stopped + 1))
    # --resume goes on from there to the end (a shorter budget keeps the test short)
    total = stopped + 25
    assert main(["train", "--resume", str(run), "--steps", str(total), "progress=false"]) == 0
    for rank in (0, 1):
        assert _metric_steps(run, rank) == list(range(1, total + 1))
    assert json.loads((run / "summary.json").read_text())["steps"] == [total, total]


# ---------------------------------------------------------------- the protocol, threads as workers


def _workers(world: int, last_step: int, aligned: bool) -> tuple[list[StopAgreement], list[Signals]]:
    """`world` agreements on one real TCPStore, each with its own signal flag."""
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=30))
    flags = [Signals() for _ in range(world)]
    agreements = [
        StopAgreement(
            Communicator(r, world, [0] * world), store, r, world, last_step, aligned, 30.0, signals=flags[r]
        )
        for r in range(world)
    ]
    return agreements, flags


def _run_lockstep(
    agreements: list[StopAgreement], flags: list[Signals], signalled: dict[int, int]
) -> list[int]:
    """Each thread steps; a barrier per step stands for the step's collective. Returns the stop steps."""
    world = len(agreements)
    collective = threading.Barrier(world, timeout=30)
    stops = [0] * world

    def worker(rank: int) -> None:
        step = 0
        while step < agreements[rank].last_step:
            step += 1
            time.sleep(random.random() * 0.002)  # ranks reach their boundaries in any order
            collective.wait()
            if signalled.get(rank) == step:
                flags[rank].handle(signal.SIGTERM, None)
            if agreements[rank].should_stop(step):
                break
        stops[rank] = step

    run_workers(worker, world)
    return stops


@pytest.mark.parametrize("seed", range(4))
def test_lockstep_workers_stop_together_after_any_signal(seed: int) -> None:
    rng = random.Random(seed)
    world, last = 3, 80
    signalled = {r: rng.randint(1, 60) for r in rng.sample(range(world), rng.randint(1, world))}
    agreements, flags = _workers(world, last, True)
    stops = _run_lockstep(agreements, flags, signalled)
    first = min(signalled.values())
    assert len(set(stops)) == 1, stops
    assert first < stops[0] <= first + CHECK_EVERY
    assert stops[0] % CHECK_EVERY == 0


def test_a_signal_at_the_last_step_lets_the_run_end() -> None:
    agreements, flags = _workers(2, 25, True)
    assert _run_lockstep(agreements, flags, {0: 25}) == [25, 25]


def test_drifting_workers_meet_at_one_step() -> None:
    """Without a collective per step (local SGD between rounds) a worker may be far ahead: it raises
    the stop step and the others catch up to it."""
    agreements, flags = _workers(2, 1000, True)
    flags[0].handle(signal.SIGINT, None)
    stops: list[int] = [0, 0]

    def worker(rank: int, start: int) -> None:
        step = start
        while True:
            step += 1
            if agreements[rank].should_stop(step):
                break
        stops[rank] = step

    ahead = threading.Thread(target=worker, args=(1, 47))  # rank 1 is at step 47 already
    behind = threading.Thread(target=worker, args=(0, 0))
    behind.start()
    time.sleep(0.2)  # rank 0 proposes step 10 first
    ahead.start()
    for t in (ahead, behind):
        t.join(60)
    assert stops == [60, 60]  # rank 1 sees the key at its check step 50 and moves it to 60
    assert agreements[1].signum() == signal.SIGINT


# ---------------------------------------------------------------- bad input under --max-restarts


@pytest.mark.parametrize(
    "flags",
    [
        ["data.batch_size=100000"],
        ["cluster.group_size=3"],
        ["cluster.device=cuda"],
        ["--model", "lstm"],
    ],
    ids=["batch", "group_size", "cuda", "model"],
)
def test_bad_input_found_before_any_worker_starts(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], flags: list[str]
) -> None:
    if flags == ["cluster.device=cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA device")
    options, overrides = [f for f in flags if "=" not in f], [f for f in flags if "=" in f]
    code = main(
        [
            "train",
            "--workers",
            "2",
            "--steps",
            "5",
            "--max-restarts",
            "2",
            "--out",
            str(tmp_path / "run"),
            *options,
            *COMMON,
            *overrides,
        ]
    )
    err = capfd.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("commsgd: error: "), err
    assert not (tmp_path / "run" / "workers").exists()  # no worker ever started


@pytest.mark.multiprocess
def test_bad_input_found_in_the_workers_is_said_once_and_not_retried(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert (
        main(["train", "--workers", "2", "--steps", "4", "--out", str(run), *COMMON, "checkpoint_every=2"])
        == 0
    )
    for path in (run / "checkpoints").glob("*/rank*.pt"):
        path.write_bytes(b"not a checkpoint")  # every worker finds no checkpoint it can load
    capfd.readouterr()
    code = main(["train", "--resume", str(run), "--steps", "8", "--max-restarts", "2", "progress=false"])
    err = capfd.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if not line.startswith("commsgd: warning: ")]
    assert len(errors) == 1 and errors[0].startswith("commsgd: error: resume "), err
    records = [json.loads(p.read_text()) for p in (run / "workers").glob("rank*.json")]
    assert {r["attempt"] for r in records} == {0}  # the group was not restarted

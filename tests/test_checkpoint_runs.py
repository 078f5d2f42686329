"""Whole `commsgd train` runs with checkpoint faults injected from outside: a worker SIGKILLed under
--max-restarts in asynchronous runs with a slowed worker (LSGD and EASGD async rounds, DOWNPOUR with a
job-wide budget) and with keep_checkpoints=1; a restart or --resume that finds checkpoints but none
common to every worker; bit-flipped, crafted and metadata-less checkpoints; a full disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fs_faults import small_tmpfs

from commsgd.checkpoint import checkpoint_path, save_checkpoint, saved_steps
from commsgd.cli import main
from commsgd.metrics import read_jsonl

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["progress=false", "eval_every=1000", "cluster.timeout_s=60"]


def _train(out: Path, workers: int, steps: int, *overrides: str, flags: tuple[str, ...] = ()) -> int:
    run = ["--workers", str(workers), "--steps", str(steps), "--seed", "5", "--out", str(out), *flags]
    return main(["train", *run, *QUIET, *overrides])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`commsgd` in a process of its own: its stderr is exactly what a user sees (launcher logs too)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "commsgd", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def _events(run: Path, rank: int, kind: str) -> list[dict[str, Any]]:
    path = run / "events" / f"rank{rank}.jsonl"
    return [e for e in read_jsonl(path) if e.get("event") == kind] if path.is_file() else []


def _metric_steps(run: Path, rank: int) -> list[int]:
    return [r["step"] for r in read_jsonl(run / "metrics" / f"rank{rank}.jsonl")]


def _summary(run: Path) -> dict[str, Any]:
    return dict(json.loads((run / "summary.json").read_text()))


def _complete(run: Path, workers: int) -> list[int]:
    """Labels for which every worker's checkpoint file exists."""
    sets = [set(saved_steps(run, r)) for r in range(workers)]
    return sorted(set.intersection(*sets))


class _Killer(threading.Thread):
    """Fault injection from outside: once `ready(run)` holds, SIGKILL worker `rank` of attempt 0
    (after running `before_kill(run)`, e.g. to damage files the way an old defect did)."""

    def __init__(
        self,
        run: Path,
        rank: int,
        ready: Callable[[Path], bool],
        before_kill: Callable[[Path], None] | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.rank, self.ready, self.before_kill = run, rank, ready, before_kill
        self.timeout_s = timeout_s
        self.killed_pid: int | None = None

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        record = self.run_dir / "workers" / f"rank{self.rank}.json"
        while time.monotonic() < deadline:
            try:
                info = json.loads(record.read_text()) if record.is_file() else None
                ready = info is not None and info["attempt"] == 0 and self.ready(self.run_dir)
            except (OSError, ValueError):
                ready = False
            if ready:
                assert info is not None
                if self.before_kill is not None:
                    self.before_kill(self.run_dir)
                os.kill(info["pid"], signal.SIGKILL)
                self.killed_pid = info["pid"]
                return
            time.sleep(0.01)


# -- asynchronous algorithms resume after a kill ---------------------------------------------------------

ASYNC = {
    "lsgd": ["algorithm=lsgd", "algo.mode=async", "algo.tau=4"],
    "easgd": ["algorithm=easgd", "algo.mode=async", "algo.tau=4"],
    "downpour": ["algorithm=downpour", "algo.budget=job"],
}


@pytest.mark.parametrize(("algorithm", "victim"), [("lsgd", 1), ("easgd", 0), ("downpour", 0)])
def test_an_asynchronous_run_with_a_straggler_resumes_after_a_kill(
    tmp_path: Path, algorithm: str, victim: int, capfd: pytest.CaptureFixture[str]
) -> None:
    workers, steps, every = 2, 30, 10
    out = tmp_path / "run"
    # once every worker has written a checkpoint (before the fix: each at its own local step)
    killer = _Killer(out, victim, lambda run: all(saved_steps(run, r) for r in range(workers)))
    killer.start()
    slow = ["cluster.slow_ranks=[1]", "cluster.slow_sleep_s=0.04", "cluster.slow_factor=2"]
    code = _train(
        out,
        workers,
        steps,
        f"checkpoint_every={every}",
        *ASYNC[algorithm],
        *slow,
        flags=("--max-restarts", "1"),
    )
    killer.join(timeout=5)
    err = capfd.readouterr().err
    assert killer.killed_pid is not None, "the worker was never killed"
    assert code == 0, err[-3000:]
    assert "restarting from step 0" not in err
    summary = _summary(out)
    labels = set()
    for rank in range(workers):
        restored = _events(out, rank, "restored")
        assert [e["attempt"] for e in restored] == [1], err[-3000:]
        labels.add(restored[0]["step"])
        assert restored[0]["step"] % every == 0 and restored[0]["step"] >= every
        # each worker went on from its own step: every one of its steps is in its metrics exactly once
        assert _metric_steps(out, rank) == list(range(1, summary["steps"][rank] + 1))
    assert len(labels) == 1  # one checkpoint for the whole job
    if algorithm == "downpour":
        assert world_steps_ok(summary["steps"], workers * steps)
        server = summary["algorithm_summary"][0]["server"]
        # no push applied twice or lost across the restart: the center counts what the workers sent
        assert (
            server["version"]
            == sum(server["pushes_applied"])
            == sum(w["pushes"] for w in summary["algorithm_summary"])
        )
    else:
        assert sum(summary["steps"]) == workers * steps  # the job's budget, exactly, across the restart
        final = [torch.load(checkpoint_path(out, steps, r), weights_only=True) for r in range(workers)]
        assert len({f["algorithm"]["clock"]["done"] for f in final}) == 1
        if algorithm == "easgd":  # the replicated center is the same on every worker
            for other in final[1:]:
                for a, b in zip(final[0]["algorithm"]["center"], other["algorithm"]["center"]):
                    assert torch.equal(a, b)


def world_steps_ok(steps: list[int], budget: int) -> bool:
    """A job-wide budget: all of it used; a worker may take a step more while the others finish."""
    return budget <= sum(steps) <= budget + 2 * len(steps)


# -- keep_checkpoints=1 -------------------------------------------------------------------------------------


def test_keep_one_checkpoint_survives_a_kill_between_the_workers_saves(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"

    def rank0_ahead(run: Path) -> bool:  # rank 0 has written 10, slowed rank 1 not yet
        return checkpoint_path(run, 10, 0).is_file() and not checkpoint_path(run, 10, 1).is_file()

    killer = _Killer(out, 1, rank0_ahead)
    killer.start()
    slow = ["cluster.slow_ranks=[1]", "cluster.slow_sleep_s=0.25"]
    code = _train(
        out, 2, 15, "checkpoint_every=5", "keep_checkpoints=1", *slow, flags=("--max-restarts", "1")
    )
    killer.join(timeout=5)
    err = capfd.readouterr().err
    assert killer.killed_pid is not None
    assert code == 0, err[-3000:]
    for rank in range(2):
        assert [e["step"] for e in _events(out, rank, "restored")] == [5], err[-3000:]
        assert _metric_steps(out, rank) == list(range(1, 16))
        assert saved_steps(out, rank) == [15]  # and only the newest one is kept in the end


# -- no checkpoint common to all workers ------------------------------------------------------------------


def _unfinished_checkpoints(run: Path) -> None:
    """What the old pruning left behind: rank 0 deleted 5 before slowed rank 1 wrote 10."""
    checkpoint_path(run, 5, 0).unlink()


def test_a_restart_without_a_common_checkpoint_is_refused_and_keeps_the_metrics(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"

    def rank0_ahead(run: Path) -> bool:
        return checkpoint_path(run, 10, 0).is_file() and not checkpoint_path(run, 10, 1).is_file()

    killer = _Killer(out, 1, rank0_ahead, before_kill=_unfinished_checkpoints)
    killer.start()
    slow = ["cluster.slow_ranks=[1]", "cluster.slow_sleep_s=0.25"]
    code = _train(out, 2, 15, "checkpoint_every=5", *slow, flags=("--max-restarts", "1"))
    killer.join(timeout=5)
    err = capfd.readouterr().err
    assert killer.killed_pid is not None
    assert code == 2, err[-3000:]
    refusals = [line for line in err.splitlines() if "no checkpoint is common" in line]
    assert refusals == [
        f"commsgd: error: resume {out}: no checkpoint is common to all workers, so the run cannot "
        "continue from one (rank 0: steps 10; rank 1: steps 5); nothing in the run directory was changed"
    ]
    assert "Traceback" not in err
    assert max(_metric_steps(out, 0)) >= 10  # the metrics of the killed attempt are all still there
    assert saved_steps(out, 0) == [10] and saved_steps(out, 1) == [5]


# -- damaged, crafted and foreign checkpoints on --resume --------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-worker allreduce run with checkpoints at 10 and 20."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert _train(out, 2, 20, "checkpoint_every=10") == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    return copy


def test_resume_past_a_bit_flipped_checkpoint_falls_back_and_keeps_the_replicas_equal(
    finished: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    run = _copy(finished, tmp_path)
    newest = checkpoint_path(run, 20, 1)
    state = torch.load(newest, weights_only=True)
    weights = next(iter(state["model"].values()))
    data = bytearray(newest.read_bytes())
    offset = data.find(weights.numpy().tobytes()[:32])
    assert offset > 0
    data[offset + 2] ^= 0x40  # one bit of one weight: the file still unzips and unpickles
    newest.write_bytes(bytes(data))
    capfd.readouterr()
    code = main(["train", "--resume", str(run), "--steps", "25"])
    err = capfd.readouterr().err
    assert code == 0, err[-3000:]
    assert f"commsgd: warning: rank 1: checkpoint {newest}: checksum mismatch" in err
    for rank in range(2):
        assert [e["step"] for e in _events(run, rank, "restored")] == [10]
        assert _metric_steps(run, rank) == list(range(1, 26))
    a, b = (torch.load(checkpoint_path(run, 25, r), weights_only=True)["model"] for r in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)  # allreduce replicas are still identical


class Payload:
    """Unpickling this runs `open(marker, "w")`: a stand-in for code hidden in a crafted checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_crafted_checkpoints_are_refused_in_one_line_without_torchs_advice(
    finished: Path, tmp_path: Path
) -> None:
    run = _copy(finished, tmp_path)
    marker = tmp_path / "code-ran"
    for step in (10, 20):
        for rank in range(2):  # with a valid checksum: a checksum is no signature
            save_checkpoint(run, step, rank, {"step": step, "model": Payload(marker)})
    metrics = (run / "metrics" / "rank0.jsonl").read_bytes()
    done = _cli("train", "--resume", str(run), "--steps", "25")
    err = done.stderr
    assert done.returncode == 2, err[-3000:]
    assert not marker.exists()
    warnings = [line for line in err.splitlines() if line.startswith("commsgd: warning:")]
    assert len(warnings) == 4 and all("refused: loading it would call io.open" in w for w in warnings)
    errors = [line for line in err.splitlines() if line.startswith("commsgd: error:")]
    assert len(errors) == 1 and "no checkpoint is common" in errors[0]
    for unsafe in ("weights_only", "Weights only", "add_safe_globals", "Traceback"):
        assert unsafe not in err
    assert (run / "metrics" / "rank0.jsonl").read_bytes() == metrics


def test_checkpoints_without_their_metadata_fall_back_with_a_warning(
    finished: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    run = _copy(finished, tmp_path)
    for rank in range(2):
        state = torch.load(checkpoint_path(run, 20, rank), weights_only=True)
        del state["meta"]
        save_checkpoint(run, 20, rank, state)
    capfd.readouterr()
    code = main(["train", "--resume", str(run), "--steps", "25"])
    err = capfd.readouterr().err
    assert code == 0, err[-3000:]
    assert err.count("its metadata (algorithm, world size, config) is missing") == 2
    assert "Traceback" not in err
    assert [e["step"] for e in _events(run, 0, "restored")] == [10]


# -- a full disk ---------------------------------------------------------------------------------------------


def _fill(disk: Path, leave: int) -> Path:
    """Fill the file system of `disk` up to `leave` free bytes."""
    filler = disk / "filler"
    stat = os.statvfs(disk)
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return filler


def test_a_full_disk_while_saving_is_one_line_and_the_run_resumes_afterwards(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with small_tmpfs(tmp_path / "disk", "16m") as disk:
        out = disk / "run"
        fills: list[Path] = []

        def first_checkpoint_done(run: Path) -> bool:
            if len(_complete(run, 2)) == 1 and not fills:
                fills.append(_fill(disk, 64 * 1024))  # room for the metrics, not for a checkpoint
            return False

        watcher = _Killer(out, 0, first_checkpoint_done, timeout_s=120)
        watcher.start()
        slow = ["cluster.slow_ranks=[0,1]", "cluster.slow_sleep_s=0.05", "checkpoint_every=10"]
        done = _cli("train", "--workers", "2", "--steps", "30", "--out", str(out), *QUIET, *slow)
        err = done.stderr
        assert fills, "the disk was never filled"
        assert done.returncode == 1, err[-3000:]
        lines = [line for line in err.splitlines() if "disk full while saving checkpoint" in line]
        assert lines and all(
            line.startswith("commsgd: error: rank ") and "earlier checkpoints are intact" in line
            for line in lines
        )
        assert "Traceback" not in err
        assert len(err.strip().splitlines()) == len(lines) + 1  # and the launcher's line naming a rank
        assert _complete(out, 2) == [10]
        assert not list((out / "checkpoints").glob("*/.*.tmp"))  # no half-written file
        fills[0].unlink()
        capfd.readouterr()
        code = main(["train", "--resume", str(out)])
        err = capfd.readouterr().err
        assert code == 0, err[-3000:]
        assert [e["step"] for e in _events(out, 0, "restored")] == [10]
        assert _metric_steps(out, 0) == list(range(1, 31))

"""Whole runs that must survive failures: a worker SIGKILLed mid-run under --max-restarts, a resume past
truncated and malicious checkpoint files, and bitwise determinism of a synchronous algorithm.

One uninterrupted reference run (allreduce, 2 workers, 30 steps, a checkpoint every 10) is shared by
every test here; each other run uses the same seed and must reproduce its parameters exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from commsgd.checkpoint import checkpoint_path
from commsgd.cli import main
from commsgd.launch import free_port
from commsgd.metrics import read_jsonl

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[1]

STEPS, EVERY, WORKERS = 30, 10, 2
FLAGS = ["--workers", str(WORKERS), "--steps", str(STEPS), "--seed", "3"]
#: cluster.timeout_s=60: after the kill, the survivor's failed collective looks for lost peers for three
#: heartbeat intervals (timeout / 30 each) before it exits and the group restarts: 6 s, not 15 s
OVERRIDES = [
    "progress=false",
    f"checkpoint_every={EVERY}",
    "keep_checkpoints=3",
    "eval_every=1000",
    "cluster.timeout_s=60",
]


def _train(out: Path, *flags: str, overrides: tuple[str, ...] = ()) -> int:
    return main(["train", *FLAGS, "--out", str(out), *flags, *OVERRIDES, *overrides])


def _model(run: Path, step: int, rank: int) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint_path(run, step, rank), weights_only=True)
    assert state["step"] == step
    return state["model"]


def _assert_same_parameters(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _metric_steps(run: Path, rank: int) -> list[int]:
    return [r["step"] for r in read_jsonl(run / "metrics" / f"rank{rank}.jsonl")]


def _events(run: Path, rank: int, kind: str) -> list[dict[str, Any]]:
    return [e for e in read_jsonl(run / "events" / f"rank{rank}.jsonl") if e.get("event") == kind]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert _train(out) == 0
    return out


def test_same_seed_same_world_gives_bitwise_identical_parameters(reference: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    assert _train(again) == 0
    for rank in range(WORKERS):
        _assert_same_parameters(_model(reference, STEPS, rank), _model(again, STEPS, rank))
        losses = [r["loss"] for r in read_jsonl(reference / "metrics" / f"rank{rank}.jsonl")]
        assert losses == [r["loss"] for r in read_jsonl(again / "metrics" / f"rank{rank}.jsonl")]
    # allreduce keeps the replicas identical, so both workers end with the same parameters
    _assert_same_parameters(_model(again, STEPS, 0), _model(again, STEPS, 1))
    # a checkpoint carries all a worker needs to continue: data position, optimizer, algorithm, RNGs
    state = torch.load(checkpoint_path(again, STEPS, 0), weights_only=True)
    assert {"step", "batches", "model", "optimizer", "algorithm", "meter", "rng", "meta"} <= state.keys()
    assert {"torch", "python", "numpy", "data"} <= state["rng"].keys()
    assert state["meta"]["algorithm"] == "allreduce" and state["meta"]["world_size"] == WORKERS


class _KillAfterCheckpoint(threading.Thread):
    """Fault injection from outside: once checkpoint `step` is complete, SIGKILL worker `rank` (attempt 0)."""

    def __init__(self, run: Path, step: int, rank: int, timeout_s: float = 240.0) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.step, self.rank, self.timeout_s = run, step, rank, timeout_s
        self.killed_pid: int | None = None
        self.newest_complete_at_kill = 0

    def _complete_steps(self) -> list[int]:
        root = self.run_dir / "checkpoints"
        steps = []
        for entry in root.iterdir() if root.is_dir() else []:
            if all((entry / f"rank{r}.pt").is_file() for r in range(WORKERS)):
                steps.append(int(entry.name.removeprefix("step")))
        return steps

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        record = self.run_dir / "workers" / f"rank{self.rank}.json"
        while time.monotonic() < deadline:
            try:
                done = self._complete_steps()
                info = json.loads(record.read_text()) if record.is_file() else None
            except (OSError, ValueError):
                done, info = [], None
            if info is not None and info["attempt"] == 0 and self.step in done:
                self.newest_complete_at_kill = max(done)
                os.kill(info["pid"], signal.SIGKILL)
                self.killed_pid = info["pid"]
                return
            time.sleep(0.02)


#: every step sleeps a little so that the kill lands mid-run (the 20 steps after checkpoint 10 leave the
#: killer, which looks every 20 ms, about a second); sleeping changes no number
SLOW = ("cluster.slow_ranks=[0,1]", "cluster.slow_sleep_s=0.05")


def _torchrun(out: Path) -> int:
    """The same run under `torchrun --max-restarts 1` (one node, c10d rendezvous on 127.0.0.1)."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for name in ("TORCHELASTIC_RESTART_COUNT", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"):
        env.pop(name, None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(WORKERS),
        "--max-restarts",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "--monitor-interval",
        "0.1",
        "-m",
        "commsgd",
        "train",
        *FLAGS[2:],
        "--out",
        str(out),
        *OVERRIDES,
        *SLOW,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.returncode


@pytest.mark.parametrize("launcher", ["embedded", "torchrun"])
def test_sigkilled_worker_restarts_from_last_checkpoint_and_matches_uninterrupted_run(
    reference: Path, tmp_path: Path, launcher: str
) -> None:
    out = tmp_path / "killed"
    killer = _KillAfterCheckpoint(out, step=EVERY, rank=1)
    killer.start()
    code = _train(out, "--max-restarts", "1", overrides=SLOW) if launcher == "embedded" else _torchrun(out)
    killer.join(timeout=5)
    assert killer.killed_pid is not None, "the worker was never killed"
    assert code == 0
    # the group was restarted (attempt 1) and resumed from the newest checkpoint complete at the kill
    assert json.loads((out / "workers" / "rank1.json").read_text())["attempt"] == 1
    for rank in range(WORKERS):
        restored = _events(out, rank, "restored")
        assert [e["attempt"] for e in restored] == [1]
        # (a) nothing before that checkpoint is computed again
        assert restored[0]["step"] >= killer.newest_complete_at_kill >= EVERY
        assert restored[0]["step"] % EVERY == 0
        # (c) each step is in the metrics exactly once
        assert _metric_steps(out, rank) == list(range(1, STEPS + 1))
        # (b) the same parameters as without the failure
        _assert_same_parameters(_model(out, STEPS, rank), _model(reference, STEPS, rank))
    assert [e["step"] for e in read_jsonl(out / "eval.jsonl")] == [STEPS]


class Payload:
    """Unpickling this runs `open(path, "w")`: a stand-in for arbitrary code in a crafted checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_resume_skips_truncated_and_malicious_checkpoints_with_a_warning(
    reference: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "copy"
    shutil.copytree(reference, run)
    marker = tmp_path / "code-ran"
    newest = checkpoint_path(run, STEPS, 1)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    torch.save({"step": STEPS, "model": Payload(marker)}, checkpoint_path(run, STEPS, 0))  # crafted
    capfd.readouterr()
    code = main(["train", "--resume", str(run), "--steps", str(STEPS + 5)])
    err = capfd.readouterr().err
    assert code == 0, err
    assert not marker.exists(), "a pickled callable in a checkpoint was executed"
    for rank in range(WORKERS):
        assert f"commsgd: warning: rank {rank}: checkpoint" in err
        assert [e["step"] for e in _events(run, rank, "restored")] == [2 * EVERY]
        assert len(_events(run, rank, "checkpoint_skipped")) == 1
        assert _metric_steps(run, rank) == list(range(1, STEPS + 6))
        # recomputed from step 20: step 30 is exactly what the uninterrupted run had
        _assert_same_parameters(_model(run, STEPS, rank), _model(reference, STEPS, rank))
    assert json.loads((run / "summary.json").read_text())["steps"] == [STEPS + 5] * WORKERS

"""The same entry point runs under torchrun: a 2-node job (two torchrun calls) and the README example."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from commsgd.launch import free_port

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    return env


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def test_two_node_job_with_two_torchrun_invocations(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "run"
    nodes = [
        subprocess.Popen(
            _torchrun(
                "--nnodes",
                "2",
                "--nproc-per-node",
                "2",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                "-m",
                "commsgd",
                "train",
                "--steps",
                "30",
                "--out",
                str(out),
                "progress=false",
                "eval_every=10",
            ),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 4
    assert summary["num_nodes"] == 2  # nodes come from LOCAL_WORLD_SIZE
    assert summary["steps"] == [30, 30, 30, 30]
    assert all(sent > 0 for sent in summary["bytes_sent"])
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert evals[-1]["test_error"] < evals[0]["test_error"]  # it trains
    assert "test error" in outputs[0]


def test_readme_custom_loop_example() -> None:
    port = free_port()
    result = subprocess.run(
        _torchrun(
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            str(ROOT / "examples" / "custom_loop.py"),
            "--steps",
            "150",
        ),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("rank ")]
    assert len(lines) == 2
    errors = {float(line.split("test error ")[1].split(" %")[0]) for line in lines}
    assert len(errors) == 1  # allreduce keeps the workers identical
    assert errors.pop() < 20.0

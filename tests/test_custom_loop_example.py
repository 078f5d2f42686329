"""examples/custom_loop.py runs every registered algorithm: in-process on a simulated world of two
workers (`commsgd.simworld`); the parameter-server ones, whose rank 0 blocks on its server thread
(which the simulated world does not schedule), run under torchrun in tests/test_torchrun.py."""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from commsgd.algorithms import REGISTRY
from commsgd.algorithms.downpour import ServerAlgorithm
from commsgd.launch import free_port
from commsgd.simworld import run_simulated

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_loop.py"
#: every algorithm but those with a parameter server on rank 0
IN_PROCESS = sorted(name for name, cls in REGISTRY.items() if not issubclass(cls, ServerAlgorithm))


@functools.cache
def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("custom_loop_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parameter_server_algorithms_are_left_to_torchrun() -> None:
    assert "downpour" in REGISTRY and "downpour" not in IN_PROCESS
    assert "quantimed" in IN_PROCESS and "ef_sgd" in IN_PROCESS


@pytest.mark.parametrize("name", IN_PROCESS)
def test_example_runs_every_algorithm(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    main = _example().main
    run_simulated(main, 2, ["--algorithm", name, "--steps", "30"], timeout=120)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("rank ")]
    assert sorted(line.split(":")[0] for line in lines) == ["rank 0", "rank 1"], lines
    for line in lines:
        assert f": {name} test error " in line
        error = float(line.split("test error ")[1].split(" %")[0])
        assert math.isfinite(error) and 0.0 <= error <= 100.0


@pytest.mark.multiprocess
def test_example_under_torchrun_says_what_the_server_rank_did() -> None:
    """downpour in two gloo processes: rank 0's line names its server's traffic, not just "sent 0.00 MB"."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONPATH=str(EXAMPLE.parents[1]))
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    result = subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"),
            *("--master-addr", "127.0.0.1", "--master-port", str(free_port())),
            *(str(EXAMPLE), "--algorithm", "downpour", "--steps", "30"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split(":")[0]: line for line in result.stdout.splitlines() if line.startswith("rank ")}
    assert sorted(lines) == ["rank 0", "rank 1"], result.stdout
    server = lines["rank 0"].split("its parameter server sent ")[1]
    assert float(server.split(" MB")[0]) > 0
    assert "applied 60 pushes" in server  # n_push=1: every step of both workers

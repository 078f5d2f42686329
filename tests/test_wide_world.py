"""benchmarks/wide_world.py: the algorithms on many simulated workers, and what a widening job shows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "wide_world.py"


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], dict[str, float]]:
    out = tmp_path_factory.mktemp("wide")
    cmd = [sys.executable, str(SCRIPT), "--workers", "4", "16", "--steps", "60", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| dpsgd ring | 16 |" in done.stdout
    assert (out / "wide_world.png").stat().st_size > 0
    data = json.loads((out / "wide_world.json").read_text())
    return {(r["method"], r["workers"]): r for r in data["rows"]}


def test_every_method_runs_at_every_width(rows: dict[tuple[str, int], dict[str, float]]) -> None:
    methods = {method for method, _ in rows}
    assert len(methods) == 7 and len(rows) == 14
    assert all(r["bytes_per_step"] > 0 for r in rows.values())


def test_the_all_reduce_keeps_every_worker_on_one_model(
    rows: dict[tuple[str, int], dict[str, float]],
) -> None:
    for workers in (4, 16):
        assert rows["allreduce", workers]["consensus"] < 1e-20


def test_gossip_averages_follow_gradient_descent_while_the_ring_drifts_apart_as_it_widens(
    rows: dict[tuple[str, int], dict[str, float]],
) -> None:
    # a doubly stochastic mixing matrix keeps the workers' mean on the exact gradient path of the mean
    # quadratic: D-PSGD's average model is all-reduce SGD's model
    for workers in (4, 16):
        assert rows["dpsgd ring", workers]["gap"] == pytest.approx(
            rows["allreduce", workers]["gap"], rel=1e-9
        )
    # the ring's spectral gap shrinks with its size: its workers agree less at 16 than at 4
    assert rows["dpsgd ring", 16]["consensus"] > 2 * rows["dpsgd ring", 4]["consensus"]
    # and each worker still talks to its two neighbours only
    ring = [rows["dpsgd ring", workers]["bytes_per_step"] for workers in (4, 16)]
    assert ring[1] == pytest.approx(ring[0], rel=0.1)


def test_bad_flags_are_one_line_and_exit_2() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--workers", "1"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("--workers between 2 and 1024")

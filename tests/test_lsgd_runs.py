"""`commsgd train --algorithm lsgd` end to end: exact resume in sync mode, and asynchronous rounds with
a slowed worker (no lost round, the budget used up exactly, faster workers taking more steps)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from commsgd.cli import main
from commsgd.metrics import read_jsonl

pytestmark = pytest.mark.multiprocess


def assert_close_nested(got: Any, want: Any, rel: float, where: str) -> None:
    """`got` equals `want` in structure, numbers within `rel` (pytest.approx takes flat data only)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_close_nested(got[key], want[key], rel, f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), where
        for index, (g, w) in enumerate(zip(got, want)):
            assert_close_nested(g, w, rel, f"{where}[{index}]")
    elif isinstance(want, (int, float)) and not isinstance(want, bool):
        assert got == pytest.approx(want, rel=rel), where
    else:
        assert got == want, where


def _train(out: Path, *args: str) -> dict[str, Any]:
    """A run; `args` are flags first, then key=value overrides."""
    assert main(["train", "--algorithm", "lsgd", "--out", str(out), *args, "progress=false"]) == 0
    return dict(json.loads((out / "summary.json").read_text()))


def test_resume_continues_where_it_stopped(tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    common = ["algo.tau=4", "algo.window=3", "algo.pull_mode=every-step", "checkpoint_every=14"]
    expected = _train(whole, "--workers", "2", "--steps", "24", *common)
    # the same run stopped after step 14: its directory as it was then, resumed to step 24
    part = tmp_path / "part"
    shutil.copytree(whole, part)
    shutil.rmtree(part / "checkpoints" / "step00000024")
    (part / "summary.json").unlink()
    assert main(["train", "--resume", str(part), "--steps", "24", "progress=false"]) == 0
    resumed = json.loads((part / "summary.json").read_text())
    assert resumed["steps"] == expected["steps"] == [24, 24]
    for key in ("test_loss", "test_error", "bytes_sent", "algorithm_summary"):
        assert_close_nested(resumed[key], expected[key], rel=1e-6, where=key)
    for rank in (0, 1):
        losses = [r["loss"] for r in read_jsonl(part / "metrics" / f"rank{rank}.jsonl")]
        assert losses == pytest.approx(
            [r["loss"] for r in read_jsonl(whole / "metrics" / f"rank{rank}.jsonl")]
        )
        assert len(losses) == 24


def test_async_rounds_with_a_slow_worker(tmp_path: Path) -> None:
    out = tmp_path / "async"
    steps, tau, tau_global, world = 60, 4, 8, 4
    summary = _train(
        out,
        "--workers",
        str(world),
        "--steps",
        str(steps),
        "eval_every=20",
        "cluster.group_size=2",
        "cluster.slow_ranks=[3]",
        "cluster.slow_sleep_s=0.03",
        "algo.mode=async",
        f"algo.tau={tau}",
        f"algo.tau_global={tau_global}",
    )
    done = summary["steps"]
    assert sum(done) == world * steps  # the job's budget, exactly
    assert done[3] < min(done[:3])  # the slowed worker took fewer steps
    for s in summary["algorithm_summary"]:  # every round of the job, on every worker
        assert s["local_rounds"] == steps // tau
        assert s["rounds"] == steps // tau_global
        assert s["rounds_joined"] == steps // tau
    led = summary["algorithm_summary"]
    assert sum(s["times_led"] for s in led) == steps // tau_global
    assert sum(s["times_led_local"] for s in led) == 2 * (steps // tau)
    # evaluations after the global rounds past 20 and 40 (24 and 40), then the final one
    assert len(read_jsonl(out / "eval.jsonl")) == 3
    events = read_jsonl(out / "events" / "rank0.jsonl")
    assert [e["step"] for e in events if e["kind"] == "global"] == list(
        range(tau_global, steps + 1, tau_global)
    )
    assert len(read_jsonl(out / "events" / "rank2.jsonl")) == steps // tau  # node 1's local leaders

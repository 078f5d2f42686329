"""`commsgd train --algorithm easgd` end to end, asynchronous, with a slowed worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from commsgd.cli import main

pytestmark = pytest.mark.multiprocess


def test_async_easgd_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--algorithm", "easgd", "--workers", "2", "--steps", "40", "--out", str(out), "progress=false"]
    args += ["algo.mode=async", "algo.tau=4", "cluster.slow_ranks=[1]", "cluster.slow_sleep_s=0.03"]
    assert main(["train", *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sum(summary["steps"]) == 80 and summary["steps"][1] < summary["steps"][0]
    assert [s["rounds"] for s in summary["algorithm_summary"]] == [10, 10]
    assert summary["test_error"] < 0.5

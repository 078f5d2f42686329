"""`commsgd train --algorithm local_sgd` end to end on digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from commsgd.cli import main

pytestmark = pytest.mark.multiprocess


def test_local_sgd_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        "--algorithm",
        "local_sgd",
        "--workers",
        "2",
        "--steps",
        "40",
        "--out",
        str(out),
        "progress=false",
    ]
    assert main(["train", *args, "algo.tau=8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == [40, 40]
    assert [s["rounds"] for s in summary["algorithm_summary"]] == [5, 5]
    assert summary["test_error"] < 0.5

"""`commsgd train` end to end: the run directory, the summary fields, the network model record, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from commsgd.cli import main
from commsgd.metrics import read_jsonl

pytestmark = pytest.mark.multiprocess


def test_train_writes_a_complete_run_directory(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--workers",
            "2",
            "--steps",
            "24",
            "--out",
            str(out),
            "eval_every=8",
            "progress=false",
            "network.enabled=true",
            "network.inter_gbps=10",
            "cluster.group_size=1",
        ]
    )
    assert code == 0
    printed = capfd.readouterr().out
    assert "test error" in printed and "communication share" in printed
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["algorithm"] == "allreduce" and config["algo"] == {"bucket_mb": 25.0, "overlap": True}
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "test_error",
        "test_loss",
        "wall_time_s",
        "steps",
        "bytes_sent",
        "comm_time_s",
        "peak_memory_mb",
        "algorithm",
        "world_size",
    ):
        assert key in summary, key
    assert summary["steps"] == [24, 24]
    assert summary["network_model"]["inter_gbps"] == 10
    assert summary["num_nodes"] == 2
    for rank in (0, 1):
        records = read_jsonl(out / "metrics" / f"rank{rank}.jsonl")
        assert [r["step"] for r in records] == list(range(1, 25))
        assert records[-1]["bytes_sent"] == pytest.approx(summary["bytes_sent"][rank])
        assert all(r["compute_s"] >= 0 for r in records)
    evals = read_jsonl(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [8, 16, 24, 24]  # every 8 steps and the final evaluation
    assert (out / "checkpoints" / "step00000024" / "rank1.pt").is_file()


def test_resume_continues_to_a_larger_budget(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--workers", "2", "--steps", "10", "--out", str(out), "progress=false"]) == 0
    assert main(["train", "--resume", str(out), "--steps", "16", "progress=false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == [16, 16]
    steps = [r["step"] for r in read_jsonl(out / "metrics" / "rank0.jsonl")]
    assert steps == list(range(1, 17))  # no step lost or repeated across the resume

"""`commsgd train` end to end: the run directory, the summary fields, the network model record, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

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
    # every 8 steps; the final evaluation, the same as step 24's, is not written a second time
    assert [e["step"] for e in evals] == [8, 16, 24]
    assert (out / "checkpoints" / "step00000024" / "rank1.pt").is_file()


def test_resume_continues_to_a_larger_budget(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--workers", "2", "--steps", "10", "--out", str(out), "progress=false"]) == 0
    assert main(["train", "--resume", str(out), "--steps", "16", "progress=false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == [16, 16]
    steps = [r["step"] for r in read_jsonl(out / "metrics" / "rank0.jsonl")]
    assert steps == list(range(1, 17))  # no step lost or repeated across the resume


KINDS = ("current", "older")  # a checkpoint as saved now, and one without "lr" (saved before it was kept)


def _lr_changes_after_resume(run_dir: str) -> dict[str, tuple[list[tuple[int, float, float]], float]]:
    """Worker: 6 steps with rate drops after steps 3 and 7, then a resume to 9 steps, from a checkpoint
    as saved and from one without its "lr" (an older checkpoint); the `on_lr_change` calls after each
    resume and the rate at the end."""
    from commsgd.algorithms import validate_params
    from commsgd.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
    from commsgd.config import load_config
    from commsgd.context import create_context
    from commsgd.train import Trainer

    overrides = ["steps=6", "optim.schedule=step", "optim.drop_steps=[3, 7]", "progress=false"]
    cfg = load_config(
        {}, [*overrides, "data.dataset=synthetic", "cluster.threads=1"], validate_algorithm=validate_params
    )
    ctx = create_context(cfg.cluster, cfg.network, cfg.seed)
    try:
        Trainer(cfg, ctx, Path(run_dir, "current")).run()
        shutil.copytree(Path(run_dir, "current"), Path(run_dir, "older"))
        state = load_checkpoint(checkpoint_path(Path(run_dir, "older"), 6, 0))
        del state["lr"]
        save_checkpoint(Path(run_dir, "older"), 6, 0, state)
        cfg.steps = 9
        results = {
            kind: _resume_recording_lr_changes(Trainer(cfg, ctx, Path(run_dir, kind))) for kind in KINDS
        }
    finally:
        ctx.close()
    return results


def _resume_recording_lr_changes(trainer: Any) -> tuple[list[tuple[int, float, float]], float]:
    changes: list[tuple[int, float, float]] = []
    trainer.algo.on_lr_change = lambda old, new: changes.append((trainer.step, old, new))
    assert trainer.restore()
    trainer.run()
    return changes, trainer.lr


def test_resume_past_a_rate_drop_keeps_the_dropped_rate(tmp_path: Path) -> None:
    from commsgd.testing import run_distributed

    (results,) = run_distributed(_lr_changes_after_resume, 1, str(tmp_path))
    for kind in KINDS:
        changes, final = results[kind]
        # Only the drop after step 7 is a change; the one after step 3 was in force at the checkpoint.
        assert changes == [(7, pytest.approx(0.05 * 0.1), pytest.approx(0.05 * 0.01))], kind
        assert final == pytest.approx(0.05 * 0.01), kind

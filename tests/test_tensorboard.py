"""`tensorboard: true`: rank 0's scalars in RUN_DIR/tensorboard/, and one line when the package is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from commsgd import cli, launch, tensorboard_log
from commsgd.tensorboard_log import MISSING, TensorBoardLog

needs_tensorboard = pytest.mark.skipif(
    not tensorboard_log.tensorboard_installed(),
    reason="the tensorboard package is not installed (pip install tensorboard)",
)


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar written under `folder`, by tag: (step, value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_missing_package_is_one_line_before_any_worker_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    started: list[Any] = []
    monkeypatch.setattr(launch, "launch_local", lambda *args: started.append(args) or 0)
    monkeypatch.setattr(tensorboard_log, "tensorboard_installed", lambda: False)
    out = tmp_path / "run"
    code = cli.main(["train", "--workers", "2", "--steps", "5", "--out", str(out), "tensorboard=true"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"commsgd: error: {MISSING}"
    assert not started and not out.exists()
    assert cli.main(["train", "--workers", "2", "--steps", "5", "--out", str(out)]) == 0  # off: no check
    assert len(started) == 1


@needs_tensorboard
def test_per_step_values_from_cumulative_counters(tmp_path: Path) -> None:
    log = TensorBoardLog(tmp_path)
    log.log_step(1, loss=2.0, lr=0.1, bytes_sent=100.0, comm_s=0.5)
    log.log_step(2, loss=1.5, lr=0.1, bytes_sent=300.0, comm_s=0.7)
    log.log_step(4, loss=1.0, lr=0.05, bytes_sent=700.0, comm_s=1.1)  # log_every=2 from here
    log.log_eval(4, {"test_error": 0.25, "test_loss": 0.9})
    log.close()
    found = scalars(tmp_path / "tensorboard")
    assert found["comm/bytes_per_step"] == [(1, 100.0), (2, 200.0), (4, 200.0)]
    assert [v for _, v in found["comm/seconds_per_step"]] == pytest.approx([0.5, 0.2, 0.2])
    assert found["comm/bytes_sent"][-1] == (4, 700.0)
    assert [v for _, v in found["train/lr"]] == pytest.approx([0.1, 0.1, 0.05])
    assert [v for _, v in found["train/loss"]] == [2.0, 1.5, 1.0]
    assert found["eval/test_error"] == [(4, 0.25)]
    assert found["eval/test_loss"][0][1] == pytest.approx(0.9)


@needs_tensorboard
@pytest.mark.multiprocess
def test_a_real_run_writes_every_scalar(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["train", "--workers", "2", "--steps", "6", "--out", str(out), "eval_every=3", "progress=false"]
    assert cli.main([*argv, "tensorboard=true"]) == 0
    found = scalars(out / "tensorboard")
    for tag in ("train/loss", "train/lr", "comm/bytes_per_step", "comm/seconds_per_step"):
        assert [step for step, _ in found[tag]] == [1, 2, 3, 4, 5, 6], tag
    assert [step for step, _ in found["eval/test_error"]] == [3, 6]
    assert all(v > 0 for _, v in found["comm/bytes_per_step"])  # all-reduce sends every step
    assert all(0 <= v <= 1 for _, v in found["eval/test_error"])

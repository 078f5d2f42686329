"""What `commsgd train` prints on rank 0: plain progress lines (no carriage return) when not on a
terminal, and a final table naming the algorithm's parameters, the node layout and the start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import commsgd
from commsgd.algorithms import validate_params
from commsgd.config import load_config
from commsgd.metrics import node_layout_text, parameters_text, summary_table
from commsgd.simworld import run_simulated
from commsgd.startup import ENV, command_start, mark_command_start, startup_s


def _train(run_dir: str, *overrides: str) -> dict[str, Any] | None:
    from commsgd.train import Trainer

    ctx = commsgd.init()
    flags = ["data.dataset=synthetic", "cluster.threads=1", "checkpoint_every=0", "steps=20", *overrides]
    cfg = load_config({}, [*flags, f"out={run_dir}"], validate_algorithm=validate_params)
    return Trainer(cfg, ctx, Path(run_dir)).run()


def test_batch_job_output_has_lines_and_a_table_with_parameters_layout_and_start_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, "1000.0")  # a command that started long ago: the start-up is huge
    overrides = ("algorithm=lsgd", "algo.tau=4", "progress_every=5", "eval_every=10")
    summary = run_simulated(_train, 4, str(tmp_path), *overrides, local_world_size=2, timeout=120)[0]
    out, err = capsys.readouterr()
    assert "\r" not in out and "\r" not in err  # stdout and stderr are no terminals here
    lines = [line for line in out.splitlines() if line.startswith("lsgd step ")]
    assert [line.split(" ")[2] for line in lines] == ["5/20", "10/20", "15/20", "20/20"]
    assert "test error" not in lines[0] and "test error" in lines[2]  # after the step-10 evaluation
    assert summary["workers_per_node"] == [2, 2] and summary["algorithm_params_set"] == ["tau"]
    assert summary["startup_s"] > 1e9
    table = out[out.index("-----") :]
    assert "node layout" in table and "2 nodes x 2 workers" in table
    assert "tau=4" in table and "commsgd list lsgd" in table
    assert "start-up" in table and "s with start-up" in table


def _summary(**extra: Any) -> dict[str, Any]:
    base = {
        "algorithm": "allreduce",
        "world_size": 4,
        "model": "mlp",
        "dataset": "digits",
        "steps": [10, 10],
        "test_error": 0.1,
        "test_loss": 0.3,
        "wall_time_s": 12.0,
        "bytes_sent": [1e6],
        "bytes_per_step": [1e5],
        "comm_share": [0.2],
    }
    return {**base, **extra}


def test_short_parameters_are_all_shown_and_the_wall_clock_includes_start_up() -> None:
    table = summary_table(
        _summary(
            algorithm_params={"bucket_mb": 25.0, "overlap": True},
            algorithm_params_set=[],
            workers_per_node=[4],
            startup_s=6.5,
            eval_time_s=[2.5, 2.25],
        )
    )
    assert "bucket_mb=25 overlap=True" in table
    assert "1 node x 4 workers" in table
    assert "6.5 s from the command to the first step" in table
    assert "12.0 s (evaluations 2.5 s), 18.5 s with start-up" in table


def test_old_summaries_still_make_a_table() -> None:
    table = summary_table(_summary())
    assert "wall-clock time" in table and "12.0 s" in table and "start-up" not in table


def test_long_parameter_lists_show_the_ones_set() -> None:
    params = {f"p{i}": i for i in range(20)}
    summary = {"algorithm": "quantimed", "algorithm_params": params, "algorithm_params_set": ["p3"]}
    assert parameters_text(summary) == "p3=3 (others default; `commsgd list quantimed` for all)"
    summary["algorithm_params_set"] = []
    assert parameters_text(summary) == "defaults (`commsgd list quantimed` for all)"
    assert node_layout_text([4, 4, 2]) == "3 nodes: 4+4+2 workers"


def test_start_up_counts_from_the_marked_command_start() -> None:
    env: dict[str, str] = {}
    mark_command_start(env)
    start = command_start(env)
    assert startup_s(start + 2.5, env) == pytest.approx(2.5)
    assert startup_s(start - 1.0, env) == 0.0
    assert command_start({ENV: "not a number"}) > 0  # a bad mark: this process's start

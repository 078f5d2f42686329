"""Benchmarks' --reuse: finished runs are read back only when they were made with the same arguments."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from commsgd.bench.common import RUN_DEFAULTS, BenchEnv, Job, reuse_runs
from commsgd.bench.paper import _execute
from commsgd.config import load_config, save_config
from commsgd.errors import ConfigError


def finished(env: BenchEnv, bench: str, job: Job, overrides: list[str] | None = None) -> Path:
    """A run directory as `job` leaves it (config from its arguments, or from `overrides`)."""
    folder = env.runs_dir(bench) / job.name
    folder.mkdir(parents=True)
    args = [f"algorithm={job.algorithm}", f"workers={job.workers}", f"steps={job.steps}"]
    save_config(
        load_config(None, [*args, *RUN_DEFAULTS, *(overrides or job.overrides)]), folder / "config.yaml"
    )
    summary = {"algorithm": job.algorithm, "steps": [job.steps], "test_error": 0.5, "wall_time_s": 1.0}
    (folder / "summary.json").write_text(json.dumps({**summary, "bytes_sent": [0], "bytes_per_step": [0]}))
    (folder / "eval.jsonl").write_text('{"step": 1, "wall_s": 1.0, "train_s": 0.5, "test_error": 0.5}\n')
    return folder


def test_reuse_reads_finished_runs_and_notes_the_missing(tmp_path: Path) -> None:
    env = BenchEnv(out=tmp_path)
    jobs = [Job(n, "sgd", 1, 3, ["optim.lr=0.5", "cluster.group_size=1"]) for n in "abcd"]
    finished(env, "paper", jobs[0])
    broken = env.runs_dir("paper") / "c"  # a summary but no config.yaml: not a run directory
    broken.mkdir()
    (broken / "summary.json").write_text("{}")
    finished(env, "paper", jobs[3], ["optim.lr=0.1"])  # another learning rate: not this job's run
    found = _execute(env, argparse.Namespace(reuse=True), None, jobs)
    assert found["b"] is None and any("b holds no finished run" in n for n in env.notes)
    assert found["c"] is None and any("c holds no finished run" in n for n in env.notes)
    assert found["d"] is None and any("d was made with other arguments" in n for n in env.notes)
    run = found["a"]
    assert run is not None and run.curve("test_error") == ([0.5], [0.5])  # training time, not wall
    assert not math.isnan(run.curve("test_error")[1][0])


def test_reuse_checks_algorithm_and_steps_and_ignores_cluster_placement(tmp_path: Path) -> None:
    env = BenchEnv(out=tmp_path)
    job = Job("a", "allreduce", 2, 5, ["cluster.threads=2"])
    finished(env, "lowcomm", job, ["cluster.threads=1"])  # the emulated cluster sets threads per node
    assert reuse_runs(env, "lowcomm", [job])["a"] is not None
    assert reuse_runs(env, "lowcomm", [Job("a", "allreduce", 2, 6)])["a"] is None
    assert reuse_runs(env, "lowcomm", [Job("a", "local_sgd", 2, 5)])["a"] is None


def test_reuse_with_no_earlier_run_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="holds no finished run; run the command once without --reuse"):
        reuse_runs(BenchEnv(out=tmp_path), "lowcomm", [Job("a", "sgd", 1, 1)])

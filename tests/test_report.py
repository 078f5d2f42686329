"""`commsgd report`: reading run directories, the numbers in its table, its figures and its errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from commsgd.cli import main
from commsgd.errors import UserError
from commsgd.report import (
    ReportError,
    all_stats,
    auto_target,
    leader_records,
    load_run,
    load_runs,
    parse_target,
    samples_trained,
    time_to_target,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(
    root: Path,
    name: str,
    algorithm: str = "allreduce",
    workers: int = 2,
    errors: tuple[float, ...] = (0.5, 0.2, 0.08, 0.04),
    step_s: float = 0.01,
    events: list[dict[str, Any]] | None = None,
) -> Path:
    """A run directory in the layout `commsgd train` writes, with made-up numbers."""
    run = root / name
    (run / "metrics").mkdir(parents=True)
    steps = 40
    (run / "config.yaml").write_text(
        yaml.safe_dump({"algorithm": algorithm, "workers": workers, "algo": {}, "data": {"batch_size": 32}})
    )
    every = steps // len(errors)
    evals = [
        {"step": (i + 1) * every, "wall_s": (i + 1) * every * step_s, "test_loss": 2 * e, "test_error": e}
        for i, e in enumerate(errors)
    ]
    (run / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals) + "{not json\n")
    for r in range(workers):
        lines = [json.dumps({"step": s, "loss": 2.0 / s, "wall_s": s * step_s}) for s in range(1, steps + 1)]
        (run / "metrics" / f"rank{r}.jsonl").write_text("\n".join(lines) + "\n")
    if events is not None:
        (run / "events").mkdir()
        for r in range(workers):
            body = "".join(json.dumps(e) + "\n" for e in events) + "garbage line\n"
            (run / "events" / f"rank{r}.jsonl").write_text(body)
    summary = {
        "algorithm": algorithm,
        "world_size": workers,
        "num_nodes": 1,
        "model": "mlp",
        "dataset": "digits",
        "test_error": errors[-1],
        "test_loss": 2 * errors[-1],
        "wall_time_s": steps * step_s,
        "steps": [steps] * workers,
        "bytes_sent": [1000.0 * steps] * workers,
        "bytes_per_step": [1000.0] * workers,
        "comm_share": [0.25] * workers,
        "network_model": None,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


LEADERS = [
    {
        "event": "leader",
        "kind": "global",
        "round": i + 1,
        "step": 8 * (i + 1),
        "group": None,
        "leader": lead,
        "loss": 0.1,
    }
    for i, lead in enumerate([0, 0, 1, 1, 1])
] + [{"event": "something else", "step": 3}]


def test_report_writes_markdown_table_and_figures(tmp_path: Path) -> None:
    base = make_run(tmp_path, "sgd-1", "sgd", 1, step_s=0.04)
    fast = make_run(tmp_path, "allreduce-2", step_s=0.01)
    lsgd = make_run(tmp_path, "lsgd-2", "lsgd", events=LEADERS)
    out = tmp_path / "rep"
    assert main(["report", str(base), str(fast), str(lsgd), "--out", str(out), "--target-error", "5%"]) == 0
    text = (out / "report.md").read_text()
    for needle in ("sgd-1", "allreduce-2", "lsgd-2", "time to 5.00 %", "speedup to target", "4.00 %"):
        assert needle in text
    table = [ln for ln in text.splitlines() if ln.startswith("| allreduce-2 |")]
    assert len(table) == 2  # setup and results rows
    assert "4.00×" in table[1]  # the one-worker run reaches 5 % at 1.6 s, this one at 0.4 s
    for png in ("error_vs_time.png", "train_loss.png", "leaders.png"):
        assert (out / png).read_bytes().startswith(PNG_MAGIC)
        assert f"]({png})" in text
    import matplotlib.image

    assert matplotlib.image.imread(str(out / "error_vs_time.png")).ndim == 3


def test_numbers_time_to_target_and_speedups(tmp_path: Path) -> None:
    runs = load_runs(
        [make_run(tmp_path, "one", "sgd", 1, step_s=0.02), make_run(tmp_path, "two", step_s=0.01)]
    )
    assert time_to_target(runs[0], 0.1) == pytest.approx(0.6)
    assert time_to_target(runs[1], 0.01) is None
    stats = all_stats(runs, 0.1)
    assert stats[1].speedup_target == pytest.approx(2.0)
    assert stats[1].speedup_throughput == pytest.approx(4.0)  # twice the workers, twice the step rate
    assert stats[1].bytes_per_step == 1000.0
    assert auto_target(runs) == pytest.approx(0.04)


def test_throughput_counts_the_samples_the_algorithm_used(tmp_path: Path) -> None:
    """Deadline-based runs use a varying number of samples per step: their own count wins when every
    rank reports one; otherwise steps x batch size."""
    path = make_run(tmp_path, "timed", "quantimed", workers=2, step_s=0.01)
    summary = json.loads((path / "summary.json").read_text())
    summary["algorithm_summary"] = [{"samples": 100}, {"samples": 300}]
    (path / "summary.json").write_text(json.dumps(summary))
    assert samples_trained(load_runs([path])[0]) == 400
    assert all_stats(load_runs([path]), 0.1)[0].samples_per_s == pytest.approx(400 / 0.4)
    summary["algorithm_summary"] = [{"samples": 100}, {"leader": 1}]  # one rank without a count
    (path / "summary.json").write_text(json.dumps(summary))
    assert samples_trained(load_runs([path])[0]) == 2 * 40 * 32


def test_leader_records_are_deduplicated_and_defensive(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path, "lsgd", "lsgd", workers=3, events=LEADERS))
    records = leader_records(run)
    assert [r["leader"] for r in records] == [0, 0, 1, 1, 1]  # logged by every rank, counted once


def test_no_leader_events_says_so(tmp_path: Path) -> None:
    out = tmp_path / "rep"
    write_report(load_runs([make_run(tmp_path, "a")]), out)
    assert "No leader events" in (out / "report.md").read_text()
    assert not (out / "leaders.png").exists()


def test_duplicate_directory_names_get_their_parent(tmp_path: Path) -> None:
    runs = load_runs([make_run(tmp_path / "x", "run"), make_run(tmp_path / "y", "run")])
    assert [r.label for r in runs] == ["x/run", "y/run"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "summary.json").unlink(), "no summary.json"),
        (lambda p: (p / "config.yaml").unlink(), "not a commsgd run directory"),
        (lambda p: (p / "eval.jsonl").unlink(), "no eval.jsonl"),
        (lambda p: (p / "summary.json").write_text("{broken"), "not readable JSON"),
        (lambda p: (p / "summary.json").write_text('{"algorithm": "x"}'), "missing field"),
        (
            lambda p: (p / "summary.json").write_text(
                json.dumps({**json.loads((p / "summary.json").read_text()), "steps": "many"})
            ),
            "wrong type",
        ),
    ],
)
def test_bad_run_directories_are_one_line_user_errors(tmp_path: Path, damage: Any, message: str) -> None:
    run = make_run(tmp_path, "r")
    damage(run)
    with pytest.raises(ReportError, match=message) as info:
        load_run(run)
    assert isinstance(info.value, UserError)
    assert "\n" not in str(info.value)


def test_cli_exit_code_2_on_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("commsgd: error:") and "not a directory" in err and "\n" not in err
    with pytest.raises(SystemExit) as exc:
        main(["report", str(make_run(tmp_path, "r")), "--target-error", "5"])
    assert exc.value.code == 2


def test_parse_target() -> None:
    assert parse_target("5%") == pytest.approx(0.05)
    assert parse_target("0.2") == pytest.approx(0.2)


@pytest.mark.multiprocess
def test_report_from_a_real_run(tmp_path: Path) -> None:
    run = tmp_path / "allreduce"
    argv = ["train", "--workers", "2", "--steps", "10", "--out", str(run), "progress=false", "eval_every=5"]
    assert main(argv) == 0
    out = tmp_path / "rep"
    assert main(["report", str(run), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| allreduce |" in text and "(error_vs_time.png)" in text
    assert (out / "train_loss.png").read_bytes().startswith(PNG_MAGIC)

"""`commsgd report`: reading run directories, the numbers in its table, its figures and its errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from commsgd.cli import main
from commsgd.errors import UserError
from commsgd.plots import Panel, Series
from commsgd.report import (
    ReportError,
    all_stats,
    auto_target,
    bytes_at_evaluations,
    bytes_per_step_curve,
    comm_share_curve,
    leader_records,
    load_run,
    load_runs,
    load_warning,
    machine_load,
    on_log_axis,
    parse_target,
    samples_trained,
    time_to_target,
    write_report,
    zoom_window,
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
    load: tuple[float, float] | None = None,
) -> Path:
    """A run directory in the layout `commsgd train` writes, with made-up numbers: 1000 bytes a step,
    a quarter of the wall time communicating, `load` the 1-minute load average at start and end."""
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
        lines = [
            json.dumps(
                {
                    "step": s,
                    "loss": 2.0 / s,
                    "wall_s": s * step_s,
                    "bytes_sent": 1000.0 * s,
                    "comm_s": 0.2 * s * step_s,
                    "wait_s": 0.05 * s * step_s,
                }
            )
            for s in range(1, steps + 1)
        ]
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
    if load is not None:
        summary["load_average"] = {"start": [load[0], 1.0, 1.0], "end": [load[1], 1.0, 1.0]}
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


FIGURES = ("error_vs_time.png", "error_vs_bytes.png", "communication.png", "train_loss.png")


def test_figures_are_slide_quality_pngs(tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "rep"
    write_report(load_runs([make_run(tmp_path, "a"), make_run(tmp_path, "b", "powersgd")]), out)
    text = (out / "report.md").read_text()
    for name in FIGURES:
        with Image.open(out / name) as image:
            dpi = image.info["dpi"]
            assert min(dpi) >= 149.9, (name, dpi)
            assert image.size[0] >= 900, (name, image.size)  # 6 inches or more at 150 dpi
        assert f"]({name})" in text


def test_error_axes_are_in_percent() -> None:
    from matplotlib.figure import Figure

    from commsgd.plots import _draw

    ax = Figure().add_subplot()
    _draw(ax, Panel("e", "s", "error", [Series("a", [1.0, 2.0], [0.5, 0.04])], percent_y=True))
    labels = [ax.yaxis.get_major_formatter()(v) for v in (0.05, 0.5)]
    assert labels == ["5%", "50%"]
    zoomed = Figure().add_subplot()
    _draw(zoomed, Panel("e", "s", "error", [Series("a", [1.0], [0.04])], ylim=(0.04, 0.045), percent_y=True))
    assert zoomed.yaxis.get_major_formatter()(0.0425) == "4.25%"  # a narrow axis gets decimals


def test_zoom_covers_the_last_stretch_of_every_curve() -> None:
    early = Series("fast", [1.0, 2.0, 3.0, 4.0, 5.0], [0.9, 0.5, 0.2, 0.10, 0.08])
    late = Series("slow", [10.0, 12.0, 14.0, 16.0, 20.0], [0.9, 0.7, 0.3, 0.06, 0.05])
    zoom = zoom_window([early, late], fraction=0.3)
    assert zoom is not None
    (x_low, x_high), (y_low, y_high) = zoom
    # x: from the start of fast's last 30 % (5 - 0.3 * 4 = 3.8) to slow's end, plus 3 % each side
    assert x_low == pytest.approx(3.8 - 0.03 * 16.2)
    assert x_high == pytest.approx(20 + 0.03 * 16.2)
    # y: only the points in each curve's own stretch (fast: 0.10, 0.08; slow, from 17: 0.05)
    assert y_low == pytest.approx(0.05 - 0.005)
    assert y_high == pytest.approx(0.10 + 0.005)
    assert zoom_window([Series("none", [], [])]) is None
    flat = zoom_window([Series("one", [3.0], [0.2])])
    assert flat is not None and flat[1][0] < 0.2 < flat[1][1]


def test_bytes_and_communication_curves(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path, "a", errors=(0.5, 0.2), step_s=0.01))
    sent, errors = bytes_at_evaluations(run)
    assert sent == [20_000.0, 40_000.0]  # evaluations at steps 20 and 40, 1000 bytes a step
    assert errors == [0.5, 0.2]
    per_step = bytes_per_step_curve(run)
    assert per_step.x[:3] == [1.0, 2.0, 3.0] and set(per_step.y) == {1000.0}
    assert comm_share_curve(run).y == pytest.approx([0.25] * 40)


def test_zero_bytes_are_named_not_silently_dropped_from_log_axes() -> None:
    silent = on_log_axis(Series("lsgd", [0.0, 0.0], [0.5, 0.2]), "x")
    assert silent.legend_label == "lsgd (sent 0 B)" and not silent.x
    late = on_log_axis(Series("local", [1.0, 2.0, 3.0], [0.0, 50.0, 50.0]), "y")
    assert late.legend_label == "local (points at 0 B left out)" and late.x == [2.0, 3.0]
    every = Series("allreduce", [1.0, 2.0], [1.0, 2.0])
    assert on_log_axis(every, "y") is every


def test_throughput_columns_say_what_they_count(tmp_path: Path) -> None:
    out = tmp_path / "rep"
    write_report(load_runs([make_run(tmp_path, "one", "sgd", 1), make_run(tmp_path, "two")]), out)
    text = (out / "report.md").read_text()
    assert "throughput: samples/s, all workers" in text and "throughput vs 1 worker's samples/s" in text
    assert "summed over all workers" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| two |") and "%" in ln)
    assert "| 6,400 |" in row  # 2 workers x 40 steps x 32 samples in 0.4 s


def test_load_warning(tmp_path: Path) -> None:
    def runs(*loads: tuple[float, float] | None) -> list[Any]:
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        return load_runs([make_run(root, f"r{i}", load=load) for i, load in enumerate(loads)])

    warning = load_warning(runs((0.5, 0.8), (3.0, 4.5)))
    assert warning is not None
    assert "very different machine load" in warning and "`r0` 0.80" in warning and "`r1` 4.50" in warning
    assert load_warning(runs((12.0, 13.0), (15.0, 15.5))) is None  # busy both times: 1.2x
    assert load_warning(runs((0.1, 0.2), (0.6, 0.7))) is None  # idle both times: 0.5 apart
    assert load_warning(runs((0.5, 0.5), None)) is None  # one run did not record it
    out = tmp_path / "rep"
    write_report(runs((0.2, 0.3), (5.0, 5.0)), out)
    text = (out / "report.md").read_text()
    assert "**Warning:** these runs were made under very different machine load" in text
    assert "| 0.20 → 0.30 |" in text


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


def test_throughput_is_per_second_of_training_not_of_evaluation(tmp_path: Path) -> None:
    """The evaluations' time is left out (the last evaluation's `train_s`): a wider run shares the test
    set among more workers, so counting evaluations would flatter its throughput."""
    path = make_run(tmp_path, "evaluated", workers=2, step_s=0.01)
    lines = (path / "eval.jsonl").read_text().splitlines()
    evals = [json.loads(line) for line in lines if line.startswith("{") and line.endswith("}")]
    for e in evals:
        e["train_s"] = e["wall_s"] / 2  # half of every run's wall clock went to evaluating
    (path / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    run = load_runs([path])[0]  # an older run: rank 0's last evaluation says how long it trained
    assert run.train_s == pytest.approx(max(e["wall_s"] for e in evals) / 2)
    assert all_stats([run], 0.1)[0].samples_per_s == pytest.approx(samples_trained(run) / run.train_s)
    summary = json.loads((path / "summary.json").read_text())
    summary["train_time_s"] = [0.1, 0.25]  # every worker's own: the slowest sets the pace
    (path / "summary.json").write_text(json.dumps(summary))
    assert load_runs([path])[0].train_s == 0.25
    (path / "eval.jsonl").write_text("")
    del summary["train_time_s"]
    (path / "summary.json").write_text(json.dumps(summary))
    assert load_runs([path])[0].train_s == summary["wall_time_s"]  # nothing logged it: the wall clock


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
    load = machine_load(load_run(run))  # recorded by rank 0 at the start and end of training
    assert load is not None and min(load) >= 0


def test_many_runs_share_one_legend_under_the_figure() -> None:
    from commsgd.plots import SHARED_LEGEND_FROM, draw_figure, series_style

    labels = [f"run-{i}" for i in range(12)]
    lines = [Series(name, [1.0, 2.0], [float(i), float(i + 1)]) for i, name in enumerate(labels)]
    lines[3] = Series("run-3", [], [], note="sent 0 B")
    shares = Series("", labels, [0.1 * i / 12 for i in range(12)])
    fig = draw_figure(
        [
            Panel("lines", "step", "bytes", lines),
            Panel("share", "", "share", [shares], kind="bar", percent_y=True, color_bars=True),
        ]
    )
    line_axes, bar_axes = fig.axes
    assert line_axes.get_legend() is None and bar_axes.get_legend() is None
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == labels
    assert any("sent 0 B: run-3" in t.get_text() for t in line_axes.texts)  # the note, in the panel
    assert [t.get_text() for t in bar_axes.get_yticklabels()] == labels  # bars lie horizontally
    drawn = line_axes.get_lines()
    assert drawn[0].get_color() == drawn[10].get_color() == series_style(10)[0]
    assert drawn[0].get_linestyle() != drawn[10].get_linestyle()  # same colour, another line style
    few = draw_figure([Panel("lines", "step", "bytes", lines[: SHARED_LEGEND_FROM - 1])])
    assert not few.legends and few.axes[0].get_legend() is not None

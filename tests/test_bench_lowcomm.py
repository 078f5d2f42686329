"""`commsgd bench lowcomm`: the quick run's one table, two figures and byte counts; the training clock;
bad options. Nothing here asserts a timing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from commsgd.bench.lowcomm import curve, eval_period
from commsgd.cli import main
from commsgd.report import Run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def table_rows(text: str) -> list[list[str]]:
    """The cells of the Markdown table in `text` (header first, separator left out)."""
    rows = [
        [c.strip() for c in ln.strip().strip("|").split("|")]
        for ln in text.splitlines()
        if ln.startswith("|")
    ]
    return [rows[0], *rows[2:]]


def percent(cell: str) -> float | None:
    return None if cell == "—" else float(cell.rstrip(" %")) / 100


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_run_writes_one_table_two_figures_and_bytes_in_order(tmp_path: Path) -> None:
    out = tmp_path / "results"
    assert main(["bench", "lowcomm", "--quick", "--out", str(out)]) == 0
    text = (out / "lowcomm.md").read_text()
    rows = table_rows(text)
    header, body = rows[0], rows[1:]
    assert len(rows) == len([ln for ln in text.splitlines() if ln.startswith("|")]) - 1  # one table
    methods = [
        "allreduce", "local_sgd-tau8", "easgd-tau8", "lsgd-tau8", "diloco-H8", "diloco-H16",
        "streaming-H8-P4", "diloco-H8-topk2%", "powersgd", "dist_ef_sgd",
    ]  # fmt: skip
    assert [(r[0], r[1]) for r in body] == [(link, m) for link in ("1 Gbit/s", "0.1 Gbit/s") for m in methods]
    assert all(len(r) == len(header) for r in body)
    assert "**Short runs**: 32 steps per worker" in text
    for png in ("lowcomm_vs_time.png", "lowcomm_vs_bytes.png"):
        assert (out / png).read_bytes().startswith(PNG_MAGIC), png
        assert f"]({png})" in text

    data = json.loads((out / "lowcomm.json").read_text())
    for link in ("1", "0.1"):
        per_step = {m: e["bytes_per_step"] for m, e in data["links"][link]["methods"].items()}
        dense = per_step["allreduce"]
        assert per_step["diloco-H8"] == pytest.approx(dense / 8, rel=0.05)
        assert per_step["diloco-H16"] == pytest.approx(dense / 16, rel=0.05)
        assert per_step["local_sgd-tau8"] == pytest.approx(per_step["diloco-H8"], rel=0.05)
        assert per_step["streaming-H8-P4"] == pytest.approx(per_step["diloco-H8"], rel=0.05)
        assert per_step["diloco-H8-topk2%"] < per_step["diloco-H8"] / 4
        assert per_step["powersgd"] < dense / 4
        assert per_step["dist_ef_sgd"] < dense / 8  # one bit per coordinate each way, and a scale
        assert per_step["lsgd-tau8"] < per_step["local_sgd-tau8"]

    # the verdict names the method whose error at T is lowest in the table, for each link rate
    at_t = header.index("test error at T")
    for link in ("1", "0.1"):
        scored = {r[1]: percent(r[at_t]) for r in body if r[0] == f"{link} Gbit/s" and r[at_t] != "—"}
        verdict = re.search(
            rf"- \*\*{re.escape(link)} Gbit/s\*\*: lowest test error at T = [^:]+: \*\*(\S+)\*\*", text
        )
        assert verdict is not None
        assert scored[verdict.group(1)] == min(v for v in scored.values() if v is not None)

    # --reuse remakes the same table from the runs left in --out, training nothing
    (out / "lowcomm.md").unlink()
    assert main(["bench", "lowcomm", "--quick", "--reuse", "--out", str(out)]) == 0
    assert table_rows((out / "lowcomm.md").read_text()) == rows
    assert main(["bench", "lowcomm", "--quick", "--reuse", "--out", str(tmp_path / "empty")]) == 2


def fake_run(evals: list[dict[str, float]], steps: list[tuple[int, float, float]]) -> Run:
    """A run of one rank whose step records are (step, wall_s, bytes_sent)."""
    metrics = {0: [{"step": s, "wall_s": w, "bytes_sent": b} for s, w, b in steps]}
    return Run(Path("."), "r", {}, {}, evals, metrics, {})


def test_the_training_clock_leaves_out_evaluations() -> None:
    steps = [(1, 1.0, 10.0), (2, 2.0, 20.0), (3, 8.0, 30.0), (4, 9.0, 40.0)]
    # evaluations after step 2 (5 s) and step 4 (3 s) in wall time
    evals = [{"step": 2, "wall_s": 7.0, "test_error": 0.5}, {"step": 4, "wall_s": 12.0, "test_error": 0.3}]
    points = curve(fake_run(evals, steps), "test_error")
    assert [(p.train_s, p.bytes_sent, p.value) for p in points] == [(2.0, 20.0, 0.5), (4.0, 40.0, 0.3)]
    recorded = [{**e, "train_s": t} for e, t in zip(evals, (1.5, 3.5))]  # the trainer's own clock wins
    assert [p.train_s for p in curve(fake_run(recorded, steps), "test_error")] == [1.5, 3.5]


@pytest.mark.parametrize(("steps", "evals"), [(192, 3), (32, 4), (512, 8)])
def test_evaluations_stop_short_of_the_last_step(steps: int, evals: int) -> None:
    every = eval_period(steps, evals)
    periodic = [s for s in range(1, steps + 1) if s % every == 0]
    assert steps not in periodic and len(periodic) + 1 == evals


@pytest.mark.parametrize(
    "argv",
    [
        ["--task", "shakespeare"],  # a full run needs data
        ["--quick", "--inner-steps", "3", "16"],
        ["--quick", "--gbps", "0"],
    ],
)
def test_bad_options_are_one_line_and_exit_2(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "lowcomm", *argv, "--out", str(tmp_path / "out")]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(errors) == 1 and errors[0].startswith("commsgd: error: bench lowcomm: ")
    assert not (tmp_path / "out" / "runs").exists()

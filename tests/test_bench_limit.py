"""`commsgd bench limit`: per-step pace from the metrics, the physical bound, the table and the goals, the
link probes, bad options; one quick run on the emulated cluster where this machine can host it. Nothing
here asserts a timing."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from commsgd.bench import cluster as cl
from commsgd.bench import limit
from commsgd.bench.common import BenchEnv
from commsgd.bench.latency import main as latency_main
from commsgd.bench.linktest import echo, ping
from commsgd.cli import main
from commsgd.report import Run
from commsgd.testing import run_distributed


def _run(per_rank: dict[int, list[tuple[int, float, float, int]]]) -> Run:
    """A Run whose metrics hold (step, wall_s, bytes_sent, collectives) per rank."""
    metrics = {
        rank: [{"step": s, "wall_s": w, "bytes_sent": b, "collectives": c} for s, w, b, c in rows]
        for rank, rows in per_rank.items()
    }
    return Run(Path("."), "r", {}, {}, [], metrics, {})


def test_pace_is_the_slower_worker_after_the_warm_up() -> None:
    run = _run(
        {
            0: [(1, 5.0, 100, 1), (2, 6.0, 200, 2), (6, 10.0, 600, 10)],
            1: [(1, 5.0, 100, 1), (2, 6.5, 200, 2), (6, 12.5, 1000, 6)],
        }
    )
    p = limit.pace(run, warmup=2)
    # metrics without link_bytes (written before commsgd counted it): the bytes sent stand in for it
    assert p == limit.Pace(step_s=1.5, bytes_sent=200.0, link_bytes=200.0, collectives=2.0, lockstep_s=1.5)


def test_pace_and_bound_take_the_busiest_links_bytes() -> None:
    # a broadcast from worker 0: each worker is counted half the tensor, the root's link carries all of it
    per_rank = {
        rank: [
            {"step": 1, "wall_s": 0.0, "bytes_sent": 0.0, "link_bytes": 0.0, "collectives": 0},
            {"step": 3, "wall_s": 1.0, "bytes_sent": 1e6, "link_bytes": 2e6, "collectives": 2},
        ]
        for rank in (0, 1)
    }
    p = limit.pace(Run(Path("."), "r", {}, {}, [], per_rank, {}), warmup=1)
    assert p is not None and p.bytes_sent == 5e5 and p.link_bytes == 1e6
    link = limit.Link(gbps=0.08, latency_s=0.0)  # 1 MB: 0.1 s
    assert limit.bound_s(0.2, p, link) == pytest.approx(0.3)
    row = limit.Row("m", 0.1, "lsgd", p, p, link, None)
    assert row.cells()[5:7] == ["500.00 KB", "1.00 MB"] and row.data()["link_bytes_per_step"] == 1e6


def test_lockstep_takes_the_slower_worker_of_every_step() -> None:
    # each worker averages 1 s a step, but they are slow on different steps: a job that waits for
    # both at every step takes 1.5 s a step with no communication at all
    run = _run(
        {
            0: [(1, 0.0, 0, 0), (2, 0.5, 0, 0), (3, 2.0, 0, 0), (4, 2.5, 0, 0), (5, 4.0, 0, 0)],
            1: [(1, 0.0, 0, 0), (2, 1.5, 0, 0), (3, 2.0, 0, 0), (4, 3.5, 0, 0), (5, 4.0, 0, 0)],
        }
    )
    p = limit.pace(run, warmup=1)
    assert p is not None and p.step_s == pytest.approx(1.0) and p.lockstep_s == pytest.approx(1.5)
    periodic = limit.Row("m", 1.0, "local_sgd", limit.Pace(1.2, 0, 0, 0.25, 1.2), p, limit.Link(1, 0), None)
    every_step = limit.Row("m", 1.0, "topk", limit.Pace(1.6, 0, 0, 1.0, 1.6), p, limit.Link(1, 0), None)
    assert periodic.compute_s == pytest.approx(1.0) and every_step.compute_s == pytest.approx(1.5)
    assert every_step.to_bound == pytest.approx(1.6 / 1.5)


def test_pace_needs_steps_after_the_warm_up() -> None:
    assert limit.pace(_run({0: [(1, 1.0, 0, 0), (2, 2.0, 0, 0)]}), warmup=2) is None
    assert limit.pace(_run({0: [(3, 1.0, 0, 0), (4, 2.0, 0, 0)]}), warmup=2) is None


def test_bound_adds_compute_transfer_and_latencies_and_the_overlap_bound_takes_the_larger() -> None:
    link = limit.Link(gbps=0.1, latency_s=1e-4)
    p = limit.Pace(step_s=0.25, bytes_sent=1.25e6, link_bytes=1.25e6, collectives=3, lockstep_s=0.25)
    assert limit.bound_s(0.1, p, link) == pytest.approx(0.1 + 0.1 + 3e-4)
    assert limit.overlap_bound_s(0.1, p, link) == pytest.approx(0.1)
    assert limit.overlap_bound_s(0.3, p, link) == pytest.approx(0.3)
    reference = limit.Pace(step_s=0.09, bytes_sent=0, link_bytes=0, collectives=0, lockstep_s=0.1)
    row = limit.Row("m", 0.1, "powersgd", p, reference, link, allreduce_s=0.5)
    assert row.to_bound == pytest.approx(0.25 / 0.2003)
    assert row.to_overlap_bound == pytest.approx(2.5)
    assert row.x_allreduce == pytest.approx(0.5)
    assert row.cells()[:5] == ["0.1 Gbit/s", "powersgd", "250", "90", "100"]


def test_rows_compare_with_all_reduce_and_the_goals_name_what_misses_them(tmp_path: Path) -> None:
    env = BenchEnv(tmp_path, quick=True)
    model = limit.Model("m", 32, 1, 2)
    link = limit.Link(0.1, 0.0)
    runs = {  # in the order they ran, as in jobs_for
        limit.COMPUTE: _run({0: [(1, 0.0, 0, 0), (3, 0.3, 0, 0)]}),
        "allreduce": _run({0: [(1, 0.0, 0, 0), (3, 1.0, 2.5e6, 2)]}),
        limit.reference_after("allreduce", False): _run({0: [(1, 0.0, 0, 0), (3, 0.2, 0, 0)]}),
        "powersgd": _run({0: [(1, 0.0, 0, 0), (3, 0.4, 1e5, 6)]}),
        limit.reference_after("powersgd", False): None,  # a reference that did not finish is skipped
        "topk": _run({0: [(1, 0.0, 0, 0), (3, 0.6, 1e5, 2)]}),
        limit.reference_after("topk", False): _run({0: [(1, 0.0, 0, 0), (3, 0.4, 0, 0)]}),
        "lsgd": None,
        limit.COMPUTE_AFTER: _run({0: [(1, 0.0, 0, 0), (3, 0.5, 0, 0)]}),
    }
    rows = limit.rows_for(env, model, 0.1, runs, link)
    assert [r.algorithm for r in rows] == ["allreduce", "powersgd", "topk"]
    assert {r.algorithm: r.x_allreduce for r in rows} == pytest.approx(
        {"allreduce": 1, "powersgd": 0.4, "topk": 0.6}
    )
    # each algorithm is held to the faster of the references before and after its own run
    assert {r.algorithm: r.compute_s for r in rows} == pytest.approx(
        {"allreduce": 0.1, "powersgd": 0.1, "topk": 0.1}
    )
    assert [r.reference.step_s for r in rows] == pytest.approx([0.1, 0.1, 0.1])
    assert "compute-only step 100-250 ms over 4 run(s)" in env.notes[0]
    drift = [n for n in env.notes if "changed by" in n]
    assert len(drift) == 3 and "50 % across allreduce's run" in drift[0]
    assert "100 % across powersgd's" in drift[1]  # its own reference missing: the next one after it counts
    # runs of the older layout (one reference at each end) still give rows
    old = {k: runs[k] for k in (limit.COMPUTE, "allreduce", "powersgd", limit.COMPUTE_AFTER)}
    older = limit.rows_for(BenchEnv(tmp_path, quick=True), model, 0.1, old, link)
    assert [r.reference.step_s for r in older] == pytest.approx([0.15, 0.15])
    lines = limit.verdicts(rows)
    assert lines[0] == "- m, 0.1 Gbit/s: compressed steps <= 0.5x all-reduce SGD's: not met by topk 0.60x"
    assert "goal <= 1.1" in lines[1]


def test_repeats_keep_each_algorithms_median_run_and_the_range_of_all(tmp_path: Path) -> None:
    env = BenchEnv(tmp_path, quick=True)
    model, link = limit.Model("m", 32, 1, 2), limit.Link(1.0, 0.0)

    def series(allreduce_s: float, topk_s: float) -> dict[str, Run | None]:
        """One repeat: references of 0.1 s a step, all-reduce SGD and topk at the given seconds a step."""
        reference = _run({0: [(1, 0.0, 0, 0), (3, 0.2, 0, 0)]})
        return {
            limit.COMPUTE: reference,
            "allreduce": _run({0: [(1, 0.0, 0, 0), (3, 2 * allreduce_s, 0, 2)]}),
            limit.reference_after("allreduce", False): reference,
            "topk": _run({0: [(1, 0.0, 0, 0), (3, 2 * topk_s, 0, 2)]}),
            limit.COMPUTE_AFTER: reference,
        }

    repeats = [(0.3, 0.12), (0.2, 0.15), (0.4, 0.11)]  # the medians come from different repeats
    per_repeat = [limit.rows_for(env, model, 1.0, series(*r), link, k) for k, r in enumerate(repeats, 1)]
    rows = {r.algorithm: r for r in limit.median_rows(per_repeat)}
    assert rows["allreduce"].pace.step_s == pytest.approx(0.3)  # its middle of 0.2, 0.3, 0.4
    assert rows["topk"].pace.step_s == pytest.approx(0.12)  # its middle of 0.11, 0.12, 0.15
    assert rows["topk"].x_allreduce == pytest.approx(0.4)  # against the all-reduce of its own repeat
    cells = rows["topk"].cells()
    assert cells[2] == "120 (110-150)" and cells[9] == "1.20 (1.10-1.50)"
    data = rows["allreduce"].data()
    assert data["repeat_step_s"] == pytest.approx([0.3, 0.2, 0.4])  # in repeat order
    assert data["repeat_step_to_bound"] == pytest.approx([3.0, 2.0, 4.0])
    # one repeat: its rows, no ranges
    single = limit.median_rows(per_repeat[:1])
    assert single == per_repeat[0] and single[0].cells()[2] == "300"


def test_a_repeats_runs_carry_its_number(tmp_path: Path) -> None:
    env = BenchEnv(tmp_path, quick=False, data_dir="/data/cifar")
    model = limit.FULL_MODELS["resnet20"]
    first = [job.name for _, job in limit.jobs_for(env, model, 0.1, ["allreduce"], tau=4)]
    second = [job.name for _, job in limit.jobs_for(env, model, 0.1, ["allreduce"], tau=4, repeat=2)]
    assert first == [
        "resnet20-0.1gbps-compute-only",
        "resnet20-0.1gbps-allreduce",
        "resnet20-0.1gbps-compute-only-after",
    ]
    assert second == [f"{name}-r2" for name in first]


def test_without_the_compute_only_run_there_are_no_rows_and_a_note(tmp_path: Path) -> None:
    env = BenchEnv(tmp_path, quick=True)
    rows = limit.rows_for(env, limit.Model("m", 32, 1, 2), 1.0, {limit.COMPUTE: None}, limit.Link(1, 0))
    assert rows == [] and "no compute-only run finished" in env.notes[0]


def test_jobs_give_the_periodic_methods_tau_and_the_reference_no_round(tmp_path: Path) -> None:
    env = BenchEnv(tmp_path, quick=False, data_dir="/data/cifar")
    jobs = dict(limit.jobs_for(env, limit.FULL_MODELS["resnet20"], 0.1, ["allreduce", "lsgd"], tau=4))
    assert list(jobs) == [
        limit.COMPUTE,
        "allreduce",
        f"{limit.COMPUTE}-after-allreduce",
        "lsgd",
        limit.COMPUTE_AFTER,
    ]
    reference = jobs[limit.COMPUTE]
    assert reference.algorithm == "local_sgd" and f"algo.tau={limit.NO_ROUND}" in reference.overrides
    assert jobs[limit.COMPUTE_AFTER].overrides == reference.overrides
    assert "algo.tau=4" in jobs["lsgd"].overrides
    # all-reduce SGD's buckets split ResNet-20's gradient (DDP's 25 MB would hold all of it in one)
    assert [o for o in jobs["allreduce"].overrides if o.startswith("algo.")] == ["algo.bucket_mb=0.25"]
    steps = reference.steps
    assert steps == 20 and f"eval_every={steps + 1}" in reference.overrides
    assert {"model=resnet20", "data.dataset=imagefolder", "data.data_dir=/data/cifar"} <= set(
        reference.overrides
    )


def test_reuse_reads_older_runs_without_the_references_between_algorithms(tmp_path: Path) -> None:
    env = BenchEnv(tmp_path, quick=False, data_dir="/data/cifar")
    jobs = limit.jobs_for(env, limit.FULL_MODELS["vgg16"], 1.0, ["allreduce", "topk", "lsgd"], tau=4)
    (env.runs_dir("limit") / jobs[4][1].name).mkdir(parents=True)  # the reference after topk was made
    kept = [label for label, _ in limit.reusable(env, jobs)]
    assert kept == [
        limit.COMPUTE,
        "allreduce",
        "topk",
        f"{limit.COMPUTE}-after-topk",
        "lsgd",
        limit.COMPUTE_AFTER,
    ]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([], "needs --data-dir"),
        (["--quick", "--algorithms", "nope"], "nope not compared here"),
        (["--quick", "--tau", "0"], "--tau must be at least 1"),
        (["--quick", "--repeats", "0"], "--repeats must be at least 1, got 0"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    assert main(["bench", "limit", "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([ln for ln in err if ln.startswith("commsgd: error:")]) == 1 and says in err[-1]


def test_without_root_it_is_one_line_alone_and_a_note_in_the_suite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cl.os, "geteuid", lambda: 1000)
    assert main(["bench", "limit", "--quick", "--out", str(tmp_path / "a")]) == 2
    assert "needs root" in capsys.readouterr().err
    env = BenchEnv(tmp_path / "b", quick=True)
    args = argparse.Namespace(
        models=["resnet20"], gbps=[1.0], algorithms=None, tau=4, reuse=False, in_suite=True
    )
    assert limit.run(env, args).startswith("not available")
    assert "Not available" in (tmp_path / "b" / "limit.md").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ping_measures_round_trips_against_the_echo_server() -> None:
    port = _free_port()
    server = threading.Thread(target=echo, args=("127.0.0.1", port), daemon=True)
    server.start()
    found = ping("127.0.0.1", port, 50)
    server.join(timeout=10)
    assert found["count"] == 50 and 0 < found["rtt_s"] < 1.0
    assert not server.is_alive()  # the echo server ends when the client closes


def _latency(out: str) -> int:
    return latency_main([out, "30"])


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_collective_latency_probe_writes_the_median_all_reduce(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    assert run_distributed(_latency, 2, str(out)) == [0, 0]
    found = json.loads(out.read_text())
    assert found["count"] == 30 and found["world_size"] == 2 and 0 < found["all_reduce_s"] < 1.0


@pytest.fixture
def cluster_host() -> None:
    """Skip (saying why) where this machine cannot host the emulated cluster."""
    try:
        cl.check_support()
    except cl.ClusterUnavailable as exc:
        pytest.skip(f"no emulated cluster here: {exc}")


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_run_on_the_cluster_writes_the_table_with_measured_links(
    tmp_path: Path, cluster_host: None
) -> None:
    out = tmp_path / "out"
    assert main(["bench", "limit", "--quick", "--algorithms", "allreduce", "--out", str(out)]) == 0
    data: dict[str, Any] = json.loads((out / "limit.json").read_text())
    (row,) = data["rows"]
    assert row["algorithm"] == "allreduce" and row["gbps"] == 0.1
    assert row["collectives_per_step"] >= 1 and row["bytes_per_step"] > 0
    assert 0.05 < row["link_gbps"] < 0.15 and row["link_latency_s"] > 0
    assert row["step_s"] > row["compute_only_s"] > 0
    text = (out / "limit.md").read_text()
    assert "| 0.1 Gbit/s | allreduce |" in text and "step / bound" in text
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "commsgd",
            "bench",
            "limit",
            "--quick",
            "--algorithms",
            "allreduce",
            "--reuse",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "limit.json").read_text())["rows"] == data["rows"]


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_powersgd_against_the_torch_hook_runs_on_the_cluster(tmp_path: Path, cluster_host: None) -> None:
    out = tmp_path / "out"
    assert main(["bench", "powersgd", "--quick", "--cluster", "0.1", "--out", str(out)]) == 0
    (result,) = json.loads((out / "powersgd.json").read_text())["results"]
    assert result["commsgd_s"] > 0 and result["torch_s"] > 0 and len(result["chunk_ratios"]) == 2
    assert (
        "on the emulated cluster, one node per worker, links of 0.1 Gbit/s"
        in (out / "powersgd.md").read_text()
    )

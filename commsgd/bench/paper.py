"""paper: SGD, DOWNPOUR, EASGD and LSGD on the same task at equal wall-clock budgets (the LSGD paper's
comparison): 4 workers behind 1 Gbit/s links (network model, one worker per node), and 2 nodes of 2
workers with multi-leader LSGD (cluster.group_size=2). CNN7 on CIFAR-10 with --data-dir, else the
bundled digits task. With --cluster the 2-node setting runs on the emulated cluster (real shaped links).

Every algorithm gets the same steps per worker; the comparison is at the budget T = the shortest
distributed run's wall time (every run has reached T), plus the full curves in paper/report.md.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

from commsgd.bench.common import BenchEnv, Job, available, run_jobs, write_result
from commsgd.report import Run, auto_target, md_table, pct, run_stats, secs, write_report

TITLE = "SGD, DOWNPOUR, EASGD, LSGD at equal wall-clock budgets (1 Gbit/s network model or emulated cluster)"

ALGORITHMS = ("allreduce", "downpour", "easgd", "lsgd")
#: time-to-target on digits: the mlp gets below 6 % test error in a few hundred steps
DIGITS_TARGET = 0.06


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--steps", type=int, help="steps per worker (default: digits 600, cifar10 300; quick 20)"
    )
    parser.add_argument("--gbps", type=float, default=1.0, help="inter-node bandwidth in Gbit/s (default 1)")
    parser.add_argument("--target-error", type=float, help="default: 0.06 on digits, auto on CIFAR-10")
    parser.add_argument(
        "--cluster", action="store_true", help="run the 2-node setting on the emulated cluster"
    )


def task_overrides(env: BenchEnv) -> list[str]:
    if env.data_dir:
        return ["model=cnn7", "data.dataset=cifar10", f"data.data_dir={env.data_dir}"]
    return ["model=mlp", "data.dataset=digits"]


def error_at(run: Run, budget: float) -> float | None:
    """Test error of the last evaluation at or before `budget` seconds."""
    times, errors = run.curve("test_error")
    before = [e for t, e in zip(times, errors) if t <= budget + 1e-9]
    return before[-1] if before else None


@dataclass
class Setting:
    """One layout: its jobs share a tag; `nodes` x `procs` is its shape on the emulated cluster."""

    name: str
    tag: str
    workers: int
    algorithms: list[str]
    overrides: list[str]
    nodes: int
    procs: int
    on_cluster: bool = False


def settings(env: BenchEnv, args: argparse.Namespace) -> list[Setting]:
    """The layouts to compare; with --cluster the multi-node one runs on the emulated cluster."""
    network = ["network.enabled=true", f"network.inter_gbps={args.gbps}"]
    algos = available(env, ALGORITHMS, "paper")
    if env.quick:
        name = "2 workers, 1 node each"
        return [Setting(name, "2w", 2, algos, [*network, "cluster.group_size=1"], 2, 1, args.cluster)]
    return [
        Setting("4 workers, 1 node each", "4w", 4, algos, [*network, "cluster.group_size=1"], 4, 1),
        Setting(
            "2 nodes x 2 workers", "2x2", 4, algos, [*network, "cluster.group_size=2"], 2, 2, args.cluster
        ),
    ]


def run(env: BenchEnv, args: argparse.Namespace) -> str:
    start = time.perf_counter()
    steps = args.steps or (20 if env.quick else (300 if env.data_dir else 600))
    every = max(steps // 30, 1)
    base = [*task_overrides(env), f"eval_every={every}"]
    local = [Job("sgd-1worker", "sgd", 1, steps, base)]
    remote: list[tuple[Job, Setting]] = []
    groups: list[tuple[str, list[str]]] = []
    for setting in settings(env, args):
        names = []
        for algo in setting.algorithms:
            job = Job(f"{algo}-{setting.tag}", algo, setting.workers, steps, [*base, *setting.overrides])
            if setting.on_cluster:  # real shaped links instead of the model
                job.overrides = [
                    o for o in job.overrides if not o.startswith(("network.", "cluster.group_size"))
                ]
                remote.append((job, setting))
            else:
                local.append(job)
            names.append(job.name)
        groups.append((setting.name, names))
    runs = run_jobs(env, "paper", local)
    if remote:
        from commsgd.bench.cluster import run_on_cluster

        for job, setting in remote:
            runs[job.name] = run_on_cluster(env, "paper", job, setting.nodes, setting.procs, args.gbps)
    ok = [r for r in runs.values() if r is not None]
    if not ok:
        write_result(env, "paper", "Paper comparison", "No run finished; see the notes.", {})
        return "no run finished"
    if args.target_error is None and not env.data_dir:
        args.target_error = DIGITS_TARGET
    target = args.target_error if args.target_error is not None else auto_target(ok)
    write_report(ok, env.out / "paper", args.target_error, "paper comparison: all runs")
    body, data = _tables(runs, groups, target)
    task = "CNN7 on CIFAR-10" if env.data_dir else "mlp on digits"
    where = (
        "the emulated cluster (network namespaces, tbf-shaped veth links) for the multi-node setting"
        if remote
        else "the in-process network model"
    )
    intro = (
        f"{task}, {steps} steps per worker, batch 32 per worker, evaluation every {every} steps; "
        f"{args.gbps} Gbit/s between nodes on {where}; default parameters of each algorithm. "
        f"Target error {pct(target)}. Full report with curves: [paper/report.md](paper/report.md)."
    )
    seconds = time.perf_counter() - start
    write_result(env, "paper", "Paper comparison at equal wall-clock", intro + "\n\n" + body, data, seconds)
    return str(data.get("headline") or f"{len(ok)} runs")


def _tables(
    runs: dict[str, Run | None], groups: list[tuple[str, list[str]]], target: float
) -> tuple[str, dict[str, Any]]:
    sections: list[str] = []
    per_setting: dict[str, Any] = {}
    headline = ""
    base = runs.get("sgd-1worker")
    for setting, names in groups:
        present = [runs[n] for n in names if runs.get(n) is not None]
        finished = [r for r in present if r is not None]
        if not finished:
            continue
        budget = min(r.curve("test_error")[0][-1] for r in finished if r.evals)
        rows, entries = [], {}
        for r in ([base] if base else []) + finished:
            st = run_stats(r, target)
            err = error_at(r, budget)
            rows.append(
                [
                    r.label,
                    pct(err),
                    secs(st.time_to_target),
                    pct(st.comm_share, 1),
                    f"{st.steps_min}" if st.steps_min == st.steps_max else f"{st.steps_min}-{st.steps_max}",
                    f"{st.bytes_per_step / 1e3:.1f} KB",
                    pct(st.final_error),
                    secs(st.wall_s),
                ]
            )
            entries[r.label] = {
                "error_at_budget": err,
                "time_to_target": st.time_to_target,
                "comm_share": st.comm_share,
                "final_error": st.final_error,
                "wall_s": st.wall_s,
            }
        headers = [
            "run",
            f"test error at T={budget:.1f} s",
            f"time to {pct(target)}",
            "comm share",
            "steps/worker",
            "bytes/worker-step",
            "final test error",
            "wall time",
        ]
        sections += [f"## {setting}", "", md_table(headers, rows), ""]
        per_setting[setting] = {"budget_s": budget, "runs": entries}
        if not headline:
            best = min(finished, key=lambda r: error_at(r, budget) or 1.0)
            headline = f"{setting}: best at T={budget:.1f} s is {best.label} ({pct(error_at(best, budget))})"
    sections += ["![test error vs wall-clock](paper/error_vs_time.png)", ""]
    return "\n".join(sections), {"settings": per_setting, "headline": headline, "target": target}

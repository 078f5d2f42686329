"""stragglers: one worker 3x slower (cluster.slow_ranks=[1] cluster.slow_factor=3): synchronous vs
asynchronous LSGD (algo.mode=async), and QuanTimed-DSGD vs D-PSGD, with all-reduce SGD as reference.
"""

from __future__ import annotations

import argparse
import time

from commsgd.bench.common import BenchEnv, Job, accepts, available, run_jobs, write_result
from commsgd.report import md_table, pct, run_stats, secs, write_report

TITLE = "one worker 3x slower: sync vs async LSGD, QuanTimed-DSGD vs D-PSGD (and all-reduce SGD)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, help="default 4; quick 2")
    parser.add_argument("--steps", type=int, help="steps per worker (default 300; quick 10)")
    parser.add_argument("--slow-factor", type=float, default=3.0)
    parser.add_argument("--target-error", type=float, default=0.06)


def variants(env: BenchEnv) -> list[tuple[str, str, list[str]]]:
    """(run name, algorithm, algo overrides) of what is registered now."""
    result: list[tuple[str, str, list[str]]] = []
    for algo in available(env, ("allreduce", "lsgd", "dpsgd", "quantimed"), "stragglers"):
        if algo == "lsgd":
            result.append(("lsgd-sync", algo, []))
            if accepts("lsgd", {"mode": "async"}):
                result.append(("lsgd-async", algo, ["algo.mode=async"]))
            else:
                env.note("stragglers: lsgd has no algo.mode=async yet; asynchronous LSGD skipped")
        else:
            result.append((algo, algo, []))
    return result


def run(env: BenchEnv, args: argparse.Namespace) -> str:
    start = time.perf_counter()
    workers = args.workers or (2 if env.quick else 4)
    steps = args.steps or (10 if env.quick else 300)
    slow = ["cluster.slow_ranks=[1]", f"cluster.slow_factor={args.slow_factor}"]
    base = ["model=mlp", f"eval_every={max(steps // 20, 1)}", *slow]
    jobs = [Job(name, algo, workers, steps, base + extra) for name, algo, extra in variants(env)]
    runs = run_jobs(env, "stragglers", jobs)
    ok = [r for r in runs.values() if r is not None]
    rows, data = [], {}
    for r in ok:
        st = run_stats(r, args.target_error)
        steps_text = f"{st.steps_min}" if st.steps_min == st.steps_max else f"{st.steps_min}-{st.steps_max}"
        rows.append(
            [
                r.label,
                steps_text,
                secs(st.wall_s),
                f"{st.samples_per_s:.0f}",
                pct(st.comm_share, 1),
                secs(st.time_to_target),
                pct(st.final_error),
            ]
        )
        data[r.label] = {
            "wall_s": st.wall_s,
            "steps": [st.steps_min, st.steps_max],
            "time_to_target_s": st.time_to_target,
            "final_error": st.final_error,
            "comm_share": st.comm_share,
        }
    if ok:
        write_report(ok, env.out / "stragglers", args.target_error, "stragglers: all runs")
    headers = [
        "run",
        "steps/worker",
        "wall time",
        "samples / s",
        "comm + wait share",
        f"time to {pct(args.target_error)}",
        "final test error",
    ]
    body = "\n".join(
        [
            f"mlp on digits, {workers} workers on one node, {steps} steps per worker, rank 1 slowed "
            f"{args.slow_factor:g}x (it sleeps (factor-1) x its compute time each step). Default parameters "
            "otherwise. Curves: [stragglers/report.md](stragglers/report.md).",
            "",
            md_table(headers, rows),
        ]
    )
    write_result(env, "stragglers", "Stragglers", body, {"runs": data}, time.perf_counter() - start)
    if not data:
        return "no run finished"
    return ", ".join(f"{k} {v['wall_s']:.1f} s" for k, v in data.items())

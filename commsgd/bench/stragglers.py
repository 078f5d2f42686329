"""stragglers: one worker 3x slower (cluster.slow_ranks=[1] cluster.slow_factor=3): synchronous vs
asynchronous LSGD (algo.mode=async), and QuanTimed-DSGD vs D-PSGD, with all-reduce SGD as reference.

QuanTimed-DSGD's deadline is set, as in its paper, to about the time a fast worker needs for one
D-PSGD mini-batch: measured from the D-PSGD run (median compute time per step of the ranks that are
not slowed), with mini-batches a quarter of the size so that a deadline holds several of them and the
slow worker finishes some. `--deadline` sets it by hand.
"""

from __future__ import annotations

import argparse
import statistics
import time

from commsgd.bench.common import BenchEnv, Job, accepts, available, run_jobs, write_result
from commsgd.report import Run, md_table, pct, run_stats, secs, write_report

TITLE = "one worker 3x slower: sync vs async LSGD, QuanTimed-DSGD vs D-PSGD (and all-reduce SGD)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, help="default 4; quick 2")
    parser.add_argument("--steps", type=int, help="steps per worker (default 300; quick 10)")
    parser.add_argument("--slow-factor", type=float, default=3.0)
    parser.add_argument("--target-error", type=float, default=0.06)
    parser.add_argument(
        "--deadline",
        type=seconds,
        help="QuanTimed-DSGD deadline in seconds (default: from the D-PSGD run)",
    )


def seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be > 0 seconds")
    return value


BATCH = 32
#: QuanTimed-DSGD's mini-batches: a quarter of BATCH, so that a deadline holds several
TIMED_BATCH = BATCH // 4


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


def timed_text(deadline: float | None, ran: bool) -> str:
    """The sentence on QuanTimed-DSGD's deadline for the result file."""
    if not ran or deadline is None:
        return ""
    return (
        f"QuanTimed-DSGD: deadline {deadline * 1e3:.2f} ms (a fast worker's compute per D-PSGD step), "
        f"mini-batches of {TIMED_BATCH}. "
    )


def fast_step_compute_s(run: Run | None, slowed: list[int]) -> float | None:
    """Median compute seconds per step of the ranks of `run` that were not slowed."""
    if run is None:
        return None
    compute, steps = run.summary.get("compute_time_s") or [], run.summary.get("steps") or []
    per_step = [c / n for rank, (c, n) in enumerate(zip(compute, steps)) if rank not in slowed and n]
    return statistics.median(per_step) if per_step else None


def run(env: BenchEnv, args: argparse.Namespace) -> str:
    start = time.perf_counter()
    workers = args.workers or (2 if env.quick else 4)
    steps = args.steps or (10 if env.quick else 300)
    slow = ["cluster.slow_ranks=[1]", f"cluster.slow_factor={args.slow_factor}"]
    base = ["model=mlp", f"data.batch_size={BATCH}", f"eval_every={max(steps // 20, 1)}", *slow]
    jobs = [Job(name, algo, workers, steps, base + extra) for name, algo, extra in variants(env)]
    timed = [job for job in jobs if job.algorithm == "quantimed"]
    runs = run_jobs(env, "stragglers", [job for job in jobs if job not in timed])
    deadline = args.deadline or fast_step_compute_s(runs.get("dpsgd"), slowed=[1])
    for job in timed:
        if deadline is None:
            env.note("stragglers: no D-PSGD run to time; QuanTimed-DSGD runs with its default deadline")
        else:
            job.overrides += [f"algo.deadline_s={deadline:.6f}", f"data.batch_size={TIMED_BATCH}"]
            env.log(f"quantimed: deadline {deadline * 1e3:.2f} ms, mini-batches of {TIMED_BATCH}")
    runs.update(run_jobs(env, "stragglers", timed))
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
            f"mlp on digits, {workers} workers on one node, {steps} steps per worker, batch {BATCH}, rank 1 "
            f"slowed {args.slow_factor:g}x: its compute takes {args.slow_factor:g} times as long (it sleeps "
            "the difference after each step; QuanTimed-DSGD spends it inside its deadline, which cuts it "
            f"short). {timed_text(deadline, bool(timed))}Default parameters otherwise. Samples/s counts the "
            "samples whose gradients were used. Curves: [stragglers/report.md](stragglers/report.md).",
            "",
            md_table(headers, rows),
        ]
    )
    extra = {"runs": data, "quantimed_deadline_s": deadline}
    write_result(env, "stragglers", "Stragglers", body, extra, time.perf_counter() - start)
    if not data:
        return "no run finished"
    return ", ".join(f"{k} {v['wall_s']:.1f} s" for k, v in data.items())

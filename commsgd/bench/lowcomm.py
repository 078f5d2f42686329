"""lowcomm: the methods picked today for slow links, on one task, 4 workers, one worker per node:
all-reduce SGD, local SGD, EASGD, LSGD, DiLoCo (H = 64 and 256), Streaming DiLoCo (fragments with
overlapped all-reduces), DiLoCo with top-k pseudo-gradients (2 %, error feedback), PowerSGD and dist-EF-SGD
(scaled sign, two-way error feedback), behind 1 and 0.1 Gbit/s links (the in-process network model;
--cluster: the emulated cluster's shaped links).

    commsgd bench lowcomm --task cifar --data-dir ../shared/data/cifar10-jpeg        CNN7, test error
    commsgd bench lowcomm --task shakespeare --data-dir ../shared/data/tinyshakespeare/input.txt
                                                                            the LSTM, test bits per character

Time is training time: the wall clock with the evaluations taken out (they are the same for every method
and would otherwise dominate short runs). Every method runs the same steps per worker and is compared at
the budget T of each link rate (the shortest run's training time: every run has reached T), by time and
bytes to a target (default: what all-reduce SGD reaches), bytes per step and communication share.
local SGD, EASGD and LSGD communicate every H steps (the first --inner-steps), like DiLoCo H = 64.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from commsgd.bench.common import (
    BenchEnv,
    Job,
    add_reuse_argument,
    available,
    reuse_runs,
    run_jobs,
    write_result,
)
from commsgd.errors import ConfigError
from commsgd.metrics import human_bytes, mean
from commsgd.report import Run, md_table, pct, run_stats, secs, write_report

TITLE = (
    "DiLoCo (H 64, 256, streaming, top-k), local SGD, EASGD, LSGD, PowerSGD, dist-EF-SGD vs all-reduce over "
    "slow links"
)

WORKERS = 4
#: steps per worker of a full run, chosen so that the cifar entry (2 link rates x 10 methods) fits in about
#: 40 minutes on 2 cores (docs/diloco.md, "Measured", says how the step time was measured)
FULL_STEPS = {"cifar": 192, "shakespeare": 512}
QUICK_STEPS = 32
FULL_INNER_STEPS = (64, 256)
QUICK_INNER_STEPS = (8, 16)
#: evaluations per run, the last at the end: CNN7's pass over the 10,000 test images costs as much as
#: about 30 training steps of the 4 workers on 2 cores, so a cifar run evaluates once per 64 steps
FULL_EVALS = {"cifar": 3, "shakespeare": 8}
QUICK_EVALS = 4
TOPK_RATIO = 0.02
STREAMING_FRAGMENTS = 4


@dataclass(frozen=True)
class Task:
    """What the workers train and which evaluation number the comparison reads."""

    name: str
    overrides: list[str]
    metric: str  # key in eval.jsonl
    metric_name: str  # for headers and text
    fmt: Callable[[float | None], str]
    axis: str = ""  # the figures' y label, when it differs from metric_name
    scale: float = 1.0  # the figures plot metric x scale (a fraction as percent)


@dataclass(frozen=True)
class Method:
    """One compared method: a label (its run names start with it), an algorithm and its parameters."""

    label: str
    algorithm: str
    params: tuple[str, ...] = ()


def bits(x: float | None) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.3f} bits/char"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task",
        choices=("cifar", "shakespeare"),
        default="cifar",
        help="cifar: CNN7 on an image folder or CIFAR-10 pickles (--data-dir; --quick without it: the mlp on "
        "digits); shakespeare: the character LSTM on a text file (--data-dir; --quick without it: a small "
        "generated corpus)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help=f"steps per worker (default: cifar {FULL_STEPS['cifar']}, shakespeare "
        f"{FULL_STEPS['shakespeare']}; quick {QUICK_STEPS})",
    )
    parser.add_argument(
        "--gbps", type=float, nargs="+", default=[1.0, 0.1], help="link rates in Gbit/s (default: 1 0.1)"
    )
    parser.add_argument(
        "--inner-steps",
        type=int,
        nargs=2,
        metavar=("H_SHORT", "H_LONG"),
        help="the two DiLoCo periods (default 64 256; quick 8 16); H_SHORT is also the period of local SGD, "
        "EASGD, LSGD, streaming and top-k DiLoCo",
    )
    parser.add_argument(
        "--evals",
        type=int,
        help=f"evaluations per run, the last at the end (default: cifar {FULL_EVALS['cifar']}, shakespeare "
        f"{FULL_EVALS['shakespeare']}; quick {QUICK_EVALS})",
    )
    parser.add_argument(
        "--target",
        type=float,
        help="test error (cifar) or bits per character (shakespeare) for time to target (default: the "
        "worst, over link rates, of all-reduce SGD's best)",
    )
    parser.add_argument(
        "--cluster", action="store_true", help="run on the emulated cluster, one node per worker (root)"
    )
    add_reuse_argument(parser)
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for every run, e.g. optim.lr=0.5 (the same for every method)",
    )


# --------------------------------------------------------------------------------------- setup


def task_of(env: BenchEnv, name: str) -> Task:
    """The task's model, data and metric; ConfigError (exit 2) when a full run has no data to read."""
    data = env.data_dir
    if not data and not env.quick:
        example = (
            "../shared/data/cifar10-jpeg" if name == "cifar" else "../shared/data/tinyshakespeare/input.txt"
        )
        raise ConfigError(
            f"bench lowcomm: --task {name} needs --data-dir (e.g. {example}); --quick runs without"
        )
    if name == "shakespeare":
        source = [f"data.data_dir={data}"] if data else []
        return Task(
            "character LSTM on text",
            ["model=lstm", "data.dataset=text", *source],
            "test_bits_per_char",
            "test bits/char",
            bits,
        )
    if not data:
        return Task(
            "mlp on digits",
            ["model=mlp", "data.dataset=digits"],
            "test_error",
            "test error",
            pct,
            "test error (%)",
            100.0,
        )
    dataset = "cifar10" if (Path(data) / "cifar-10-batches-py").is_dir() else "imagefolder"
    return Task(
        f"CNN7 on {dataset} ({data})",
        ["model=cnn7", f"data.dataset={dataset}", f"data.data_dir={data}"],
        "test_error",
        "test error",
        pct,
        "test error (%)",
        100.0,
    )


def methods(h_short: int, h_long: int) -> list[Method]:
    """The ten compared methods; every periodic one but DiLoCo H_LONG communicates every `h_short` steps."""
    tau = f"algo.tau={h_short}"
    overlap = max(1, h_short // (4 * STREAMING_FRAGMENTS))  # tau * P < H, as the algorithm requires
    return [
        Method("allreduce", "allreduce"),
        Method(f"local_sgd-tau{h_short}", "local_sgd", (tau,)),
        Method(f"easgd-tau{h_short}", "easgd", (tau,)),
        Method(f"lsgd-tau{h_short}", "lsgd", (tau,)),
        Method(f"diloco-H{h_short}", "diloco", (f"algo.inner_steps={h_short}",)),
        Method(f"diloco-H{h_long}", "diloco", (f"algo.inner_steps={h_long}",)),
        Method(
            f"streaming-H{h_short}-P{STREAMING_FRAGMENTS}",
            "diloco",
            (
                f"algo.inner_steps={h_short}",
                f"algo.fragments={STREAMING_FRAGMENTS}",
                f"algo.overlap_steps={overlap}",
            ),
        ),
        Method(
            f"diloco-H{h_short}-topk{TOPK_RATIO * 100:g}%",
            "diloco",
            (f"algo.inner_steps={h_short}", "algo.compressor=topk", f"algo.ratio={TOPK_RATIO}"),
        ),
        Method("powersgd", "powersgd"),
        Method("dist_ef_sgd", "dist_ef_sgd"),
    ]


def run_name(method: Method, gbps: float) -> str:
    return f"{method.label.replace('%', 'pct')}-{gbps:g}gbps"


def eval_period(steps: int, evals: int) -> int:
    """`eval_every` giving `evals` evaluations, the end-of-run one included: the periodic ones stop short
    of the last step, since an evaluation there would be computed twice (periodic and final)."""
    return steps // evals + 1


def check_args(steps: int, evals: int, inner: Sequence[int], gbps: Sequence[float]) -> None:
    """Bad options: one ConfigError line before anything runs."""
    if steps < 1 or evals < 1:
        raise ConfigError("bench lowcomm: --steps and --evals must be at least 1")
    if min(inner) < STREAMING_FRAGMENTS + 1:
        raise ConfigError(
            f"bench lowcomm: --inner-steps must be more than {STREAMING_FRAGMENTS} (the fragments)"
        )
    if not gbps or min(gbps) <= 0:
        raise ConfigError("bench lowcomm: --gbps needs positive link rates")


# --------------------------------------------------------------------------------------- numbers


@dataclass
class Point:
    """One evaluation: training seconds (evaluations excluded), bytes sent per worker so far, the metric."""

    train_s: float
    bytes_sent: float
    value: float


def curve(run: Run, metric: str) -> list[Point]:
    """The run's evaluations on the training clock, with the mean training bytes per worker at each.

    The training clock is eval.jsonl's `train_s` where the trainer records it; for runs without it, an
    evaluation at step k took (its wall_s) - (step k's wall_s on rank 0), taken off every later point.
    """
    at_step: dict[int, dict[str, Any]] = {}
    sent: dict[int, list[float]] = {}
    for rank, records in run.metrics.items():
        for rec in records:
            if isinstance(rec.get("step"), int):
                sent.setdefault(rec["step"], []).append(float(rec.get("bytes_sent", 0.0)))
                if rank == 0:
                    at_step[rec["step"]] = rec
    points, eval_s = [], 0.0
    for e in run.evals:
        value, step, wall = e.get(metric), e.get("step"), float(e["wall_s"])
        if not isinstance(value, int | float) or not isinstance(step, int):
            continue
        stepped = float(at_step[step]["wall_s"]) if step in at_step else wall
        train_s = float(e["train_s"]) if isinstance(e.get("train_s"), int | float) else stepped - eval_s
        points.append(Point(train_s, mean(sent.get(step, [0.0])), float(value)))
        eval_s += wall - stepped
    return points


def first_reaching(points: Sequence[Point], target: float) -> Point | None:
    return next((p for p in points if p.value <= target), None)


def value_at(points: Sequence[Point], budget: float) -> float | None:
    before = [p.value for p in points if p.train_s <= budget + 1e-9]
    return before[-1] if before else None


@dataclass
class Row:
    """One (link rate, method) of the table."""

    gbps: float
    method: Method
    run: Run
    points: list[Point]


def default_target(rows: Sequence[Row]) -> float:
    """What all-reduce SGD reaches at every link rate (its worst best); without it, what every run reaches."""
    reference = [r for r in rows if r.method.algorithm == "allreduce"] or list(rows)
    return max(min(p.value for p in r.points) for r in reference)


# --------------------------------------------------------------------------------------- the benchmark


def run(env: BenchEnv, args: argparse.Namespace) -> str:
    start = time.perf_counter()
    if getattr(args, "in_suite", False) and not env.quick:  # `bench all`: it would double the suite's time
        env.note("lowcomm: not part of the full suite (about 40 minutes); run `commsgd bench lowcomm`")
        return "not run in the suite: `commsgd bench lowcomm --data-dir DIR` on its own (about 40 minutes)"
    task = task_of(env, args.task)
    steps = args.steps or (QUICK_STEPS if env.quick else FULL_STEPS[args.task])
    inner = args.inner_steps or (QUICK_INNER_STEPS if env.quick else FULL_INNER_STEPS)
    evals = args.evals or (QUICK_EVALS if env.quick else FULL_EVALS[args.task])
    check_args(steps, evals, inner, args.gbps)
    every = eval_period(steps, evals)
    every_method = methods(*inner)
    known = set(available(env, sorted({m.algorithm for m in every_method}), "lowcomm"))
    compared = [m for m in every_method if m.algorithm in known]
    base = [*task.overrides, f"eval_every={every}", "checkpoint_every=0", *args.set]
    jobs: dict[str, tuple[Job, float, Method]] = {}
    for gbps in args.gbps:
        links = (
            []
            if args.cluster
            else ["network.enabled=true", f"network.inter_gbps={gbps}", "cluster.group_size=1"]
        )
        for m in compared:
            job = Job(run_name(m, gbps), m.algorithm, WORKERS, steps, [*base, *links, *m.params])
            jobs[job.name] = (job, gbps, m)
    if args.reuse:
        runs = reuse_runs(env, "lowcomm", [job for job, _, _ in jobs.values()])
    elif args.cluster:
        from commsgd.bench.cluster import run_on_cluster

        runs = {
            name: run_on_cluster(env, "lowcomm", job, WORKERS, 1, gbps)
            for name, (job, gbps, _) in jobs.items()
        }
    else:
        runs = run_jobs(env, "lowcomm", [job for job, _, _ in jobs.values()])
    rows = []
    for name, (_, gbps, m) in jobs.items():
        r = runs.get(name)
        points = curve(r, task.metric) if r is not None else []
        if r is not None and points:
            r.label = name
            rows.append(Row(gbps, m, r, points))
    if not rows:
        write_result(env, "lowcomm", "Low-communication methods", "No run finished; see the notes.", {})
        return "no run finished"
    target = args.target if args.target is not None else default_target(rows)
    write_report(
        [r.run for r in rows],
        env.out / "lowcomm",
        target if task.metric == "test_error" else None,
        "lowcomm: all runs",
    )
    table, data = summarise(rows, target, task)
    figures = plot(env, rows, task)
    link = "the emulated cluster (tbf-shaped veth links)" if args.cluster else "the in-process network model"
    rates = ", ".join(f"{g:g}" for g in args.gbps)
    rounds = ", ".join(f"DiLoCo H = {h}: {steps // h} outer round(s)" for h in inner)
    shared = f" (for every run: `{' '.join(args.set)}`)" if args.set else ""
    chosen = "given" if args.target is not None else "the worst, over link rates, of all-reduce SGD's best"
    setup = [
        f"{task.name}, {WORKERS} workers, one per node, links of {rates} Gbit/s on {link}.",
        f"**Short runs**: {steps} steps per worker ({rounds}), batch 32 per worker, evaluation after every",
        f"{every} steps and at the end; default parameters of each algorithm otherwise{shared}.",
        "Time is training time (evaluations taken out); — at T: no evaluation yet by then.",
        f"Target {task.fmt(target)} ({chosen}).",
    ]
    intro = [
        " ".join(setup),
        "",
        *verdicts(data, task),
        "",
        table,
        "",
        f"![{task.metric_name} vs training time]({figures[0].name})",
        "",
        f"![{task.metric_name} vs bytes sent]({figures[1].name})",
        "",
        "Bytes on a log scale: evaluations before a method's first message are not drawn there.",
        "",
        "Full curves and per-run tables: [lowcomm/report.md](lowcomm/report.md).",
    ]
    seconds = time.perf_counter() - start
    payload = {"task": args.task, "steps": steps, "inner_steps": list(inner), "target": target, **data}
    write_result(
        env, "lowcomm", "Low-communication methods over slow links", "\n".join(intro), payload, seconds
    )
    return str(data["headline"])


def summarise(rows: Sequence[Row], target: float, task: Task) -> tuple[str, dict[str, Any]]:
    """The one table (link rate, method) and its numbers, with each link rate's budget T."""
    table: list[list[str]] = []
    links: dict[str, dict[str, Any]] = {}
    for gbps in dict.fromkeys(r.gbps for r in rows):
        here = [r for r in rows if r.gbps == gbps]
        budget = min(r.points[-1].train_s for r in here)
        entries = {}
        for r in here:
            st = run_stats(r.run, target)  # its own time to target is on the wall clock: not used
            reached = first_reaching(r.points, target)
            at_budget = value_at(r.points, budget)
            steps = f"{st.steps_min}" if st.steps_min == st.steps_max else f"{st.steps_min}-{st.steps_max}"
            table.append(
                [
                    f"{gbps:g} Gbit/s",
                    r.method.label,
                    f"{budget:.1f} s",
                    task.fmt(at_budget),
                    secs(reached.train_s if reached else None),
                    human_bytes(st.bytes_per_step),
                    human_bytes(st.bytes_per_worker),
                    pct(st.comm_share, 1),
                    steps,
                    task.fmt(r.points[-1].value),
                ]
            )
            entries[r.method.label] = {
                "value_at_budget": at_budget,
                "time_to_target_s": reached.train_s if reached else None,
                "bytes_to_target": reached.bytes_sent if reached else None,
                "bytes_per_step": st.bytes_per_step,
                "bytes_per_worker": st.bytes_per_worker,
                "comm_share": st.comm_share,
                "steps": st.steps_max,
                "final_value": r.points[-1].value,
                "train_s": r.points[-1].train_s,
            }
        links[f"{gbps:g}"] = {"budget_s": budget, "methods": entries}
    headers = [
        "link",
        "method",
        "budget T",
        f"{task.metric_name} at T",
        f"time to {task.fmt(target)}",
        "bytes/worker-step",
        "bytes/worker",
        "comm share",
        "steps/worker",
        f"final {task.metric_name}",
    ]
    data: dict[str, Any] = {"metric": task.metric, "links": links}
    data["headline"] = "; ".join(
        f"{g} Gbit/s: best at T={secs(v['budget_s'])} is {best_at_budget(v['methods'])}"
        for g, v in links.items()
    )
    return md_table(headers, table), data


def best_at_budget(entries: dict[str, dict[str, Any]]) -> str:
    scored = {k: e["value_at_budget"] for k, e in entries.items() if e["value_at_budget"] is not None}
    return min(scored, key=lambda k: scored[k]) if scored else "none (no evaluation before T)"


def verdicts(data: dict[str, Any], task: Task) -> list[str]:
    """Which method wins where, read off the numbers: at the budget, to the target in time and in bytes."""
    lines = []
    for gbps, link in data["links"].items():
        entries = link["methods"]
        best = best_at_budget(entries)
        value = entries[best]["value_at_budget"] if best in entries else None
        reached = {k: e for k, e in entries.items() if e["time_to_target_s"] is not None}
        fastest = min(reached, key=lambda k: reached[k]["time_to_target_s"]) if reached else None
        thrift = min(reached, key=lambda k: reached[k]["bytes_to_target"]) if reached else None
        text = (
            f"- **{gbps} Gbit/s**: lowest {task.metric_name} at T = {link['budget_s']:.1f} s: "
            f"**{best}** ({task.fmt(value)})"
        )
        if fastest and thrift:
            soonest, fewest = reached[fastest]["time_to_target_s"], reached[thrift]["bytes_to_target"]
            text += (
                f"; first to the target: **{fastest}** ({secs(soonest)}); "
                f"fewest bytes to it: **{thrift}** ({human_bytes(fewest)} per worker); "
                f"{len(reached)} of {len(entries)} methods reached it."
            )
        else:
            text += "; no method reached the target."
        lines.append(text)
    return lines


def plot(env: BenchEnv, rows: Sequence[Row], task: Task) -> tuple[Path, Path]:
    """Metric vs training time and vs bytes sent (log10 scale), one panel per link rate."""
    from commsgd.plots import Panel, Series, save_figure

    axes: dict[str, tuple[str, Callable[[Point], float | None]]] = {
        "time": ("training time (s)", lambda p: p.train_s),
        # log scale: evaluations before a method's first message are left out
        "bytes": (
            "log10(bytes sent per worker)",
            lambda p: math.log10(p.bytes_sent) if p.bytes_sent > 0 else None,
        ),
    }
    figures = []
    for name, (xlabel, x_of) in axes.items():
        panels = []
        for gbps in dict.fromkeys(r.gbps for r in rows):
            series = []
            for r in (r for r in rows if r.gbps == gbps):
                drawn = [(x, p.value * task.scale) for p in r.points if (x := x_of(p)) is not None]
                series.append(Series(r.method.label, [x for x, _ in drawn], [y for _, y in drawn]))
            panels.append(
                Panel(f"{gbps:g} Gbit/s", xlabel, task.axis or task.metric_name, series, markers=True)
            )
        title = f"{task.metric_name} vs {'training time' if name == 'time' else 'bytes sent'}"
        figures.append(
            save_figure(env.out / f"lowcomm_vs_{name}.png", panels, title, len(panels), size=(6.0, 4.2))
        )
    return figures[0], figures[1]

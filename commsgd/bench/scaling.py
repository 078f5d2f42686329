"""scaling: throughput and time-to-target vs number of workers (1, 2, 4, 8) for allreduce, LSGD and
PowerSGD, every worker its own node behind a 1 Gbit/s link: the in-process network model, or with
--cluster the emulated cluster (one network namespace per worker, tbf-shaped veth links).

On a 2-core machine more than 2 workers share cores, so throughput cannot grow with the worker count
there: these runs show what communication and synchronisation cost as the job widens, not parallel
speedup. The one-worker point is plain `sgd` (no communication), shared by every algorithm.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from commsgd.bench.common import BenchEnv, Job, available, run_jobs, write_result
from commsgd.errors import ConfigError
from commsgd.report import Run, md_table, pct, run_stats, secs

TITLE = "throughput and time-to-target vs workers (1, 2, 4, 8) for allreduce, LSGD, PowerSGD at 1 Gbit/s"

ALGORITHMS = ("allreduce", "lsgd", "powersgd")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, nargs="+", help="worker counts (default 1 2 4 8; quick 1 2)")
    parser.add_argument("--steps", type=int, help="steps per worker (default 300; quick 10)")
    parser.add_argument("--gbps", type=float, default=1.0)
    parser.add_argument("--target-error", type=float, default=0.06, help="default 0.06 (6 %% on digits)")
    parser.add_argument(
        "--cluster", action="store_true", help="run on the emulated cluster, one node per worker (root)"
    )
    parser.add_argument(
        "--model",
        default="mlp",
        help="mlp on digits (default), or an image model (resnet20, cnn7) on --data-dir's images",
    )


def task_overrides(env: BenchEnv, model: str) -> list[str]:
    """The mlp on digits, or an image model on the images of --data-dir (500 test images: the many
    evaluations of a scaling run would cost more than its training); ConfigError without the data."""
    from commsgd.tasks.models import MODELS

    if model not in MODELS:
        raise ConfigError(f"bench scaling --model: unknown model {model!r}; choose from {', '.join(MODELS)}")
    if model == "mlp":
        return ["model=mlp"]
    if not env.data_dir:
        raise ConfigError(
            f"bench scaling --model {model}: needs --data-dir (e.g. ../shared/data/cifar10-jpeg)"
        )
    dataset = "cifar10" if (Path(env.data_dir) / "cifar-10-batches-py").is_dir() else "imagefolder"
    return [
        f"model={model}",
        f"data.dataset={dataset}",
        f"data.data_dir={env.data_dir}",
        "data.test_samples=500",
    ]


def describe(env: BenchEnv, model: str) -> str:
    return "mlp on digits" if model == "mlp" else f"{model} on {env.data_dir} (500 test images)"


def run(env: BenchEnv, args: argparse.Namespace) -> str:
    start = time.perf_counter()
    counts = args.workers or ([1, 2] if env.quick else [1, 2, 4, 8])
    steps = args.steps or (10 if env.quick else 300)
    algos = available(env, ALGORITHMS, "scaling")
    model = getattr(args, "model", "mlp")
    base = [*task_overrides(env, model), f"eval_every={max(steps // 20, 1)}"]
    network = ["network.enabled=true", f"network.inter_gbps={args.gbps}", "cluster.group_size=1"]
    jobs = [Job("sgd-1", "sgd", 1, steps, base)] if 1 in counts else []
    links = [] if args.cluster else network  # on the cluster the links are real: no network model
    wide = [Job(f"{a}-{w}", a, w, steps, base + links) for a in algos for w in counts if w > 1]
    if args.cluster:
        from commsgd.bench.cluster import run_on_cluster

        runs = run_jobs(env, "scaling", jobs)
        for job in wide:  # one node per worker
            runs[job.name] = run_on_cluster(env, "scaling", job, job.workers, 1, args.gbps)
    else:
        runs = run_jobs(env, "scaling", jobs + wide)
    target = args.target_error
    rows, series, data = [], {}, {}
    for algo in algos:
        points = []
        for w in counts:
            run: Run | None = runs.get("sgd-1") if w == 1 else runs.get(f"{algo}-{w}")
            if run is None:
                continue
            st = run_stats(run, target)
            points.append((w, st.samples_per_s, st.time_to_target))
            rows.append(
                [
                    algo if w > 1 else f"{algo} (sgd, 1 worker)",
                    w,
                    f"{st.samples_per_s:.0f}",
                    secs(st.time_to_target),
                    pct(st.comm_share, 1),
                    pct(st.final_error),
                    secs(st.wall_s),
                ]
            )
        series[algo] = points
        data[algo] = [{"workers": w, "samples_per_s": s, "time_to_target_s": t} for w, s, t in points]
    headers = [
        "algorithm",
        "workers",
        "samples / s (all workers)",
        f"time to {pct(target)}",
        "comm share",
        "final test error",
        "wall time",
    ]
    _plot(env, series, target)
    link_kind = "emulated cluster: tbf-shaped veth links" if args.cluster else "network model"
    body = "\n".join(
        [
            f"{describe(env, model)}, {steps} steps per worker, batch 32 per worker, every worker its own "
            "node at "
            f"{args.gbps} Gbit/s ({link_kind}), default parameters. Samples/s = all workers' samples / "
            "training time (wall time less evaluations).",
            "",
            md_table(headers, rows),
            "",
            "![scaling](scaling.png)",
        ]
    )
    write_result(
        env,
        "scaling",
        "Scaling with the number of workers",
        body,
        {"target": target, "series": data},
        time.perf_counter() - start,
    )
    widest = max(counts)
    tops = [f"{a} {p[1]:.0f}" for a, pts in series.items() for p in pts if p[0] == widest]
    return f"samples/s at {widest} workers: " + ", ".join(tops) if tops else "no run finished"


def _plot(env: BenchEnv, series: dict[str, list[tuple[int, float, float | None]]], target: float) -> None:
    from commsgd.plots import Panel, Series, save_figure

    through = [Series(a, [float(p[0]) for p in pts], [p[1] for p in pts]) for a, pts in series.items()]
    reach = [
        Series(a, [float(p[0]) for p in pts if p[2] is not None], [p[2] for p in pts if p[2] is not None])
        for a, pts in series.items()
    ]
    save_figure(
        env.out / "scaling.png",
        [
            Panel("throughput", "workers", "samples / s", through, logx=True, markers=True),
            Panel(f"time to {pct(target)} test error", "workers", "seconds", reach, logx=True, markers=True),
        ],
        columns=2,
    )

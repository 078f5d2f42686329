"""bytes: bytes each worker sends per step, for every registered algorithm (and compressor where the
algorithm takes one), and the ratio to all-reduce SGD. Read from short real runs' summary.json
(training traffic only: evaluation and control messages are counted apart).
"""

from __future__ import annotations

import argparse
import time

from commsgd.bench.common import BenchEnv, Job, accepts, param_fields, registered, run_batch, write_result
from commsgd.metrics import human_bytes, mean
from commsgd.report import Run, md_table, pct

TITLE = "bytes per worker-step of every registered algorithm (and compressor), ratio to all-reduce SGD"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, help="workers per run (default 4; quick: 2)")
    parser.add_argument("--steps", type=int, help="steps per worker (default 128; quick: 8)")
    parser.add_argument("--model", default="mlp")


def compressor_field(algorithm: str) -> str | None:
    """The parameter that names a compressor, if the algorithm has one."""
    for name in param_fields(algorithm):
        if "compressor" in name or name == "compression":
            return name
    return None


def variants(algorithm: str) -> list[tuple[str, dict[str, str]]]:
    """(compressor, algo params) for each compressor the algorithm accepts; one plain entry otherwise."""
    field = compressor_field(algorithm)
    if field is None:
        return [("", {})]
    from commsgd.compression import COMPRESSORS

    default = str(param_fields(algorithm).get(field))
    names = [default] + [c for c in COMPRESSORS if c != default]
    return [(c, {field: c}) for c in names if accepts(algorithm, {field: c})] or [("", {})]


def jobs_for(
    algorithms: list[str], workers: int, steps: int, model: str, every_compressor: bool
) -> list[Job]:
    """One job per algorithm, and per accepted compressor when `every_compressor`."""
    from commsgd.algorithms import get_algorithm_class

    jobs = []
    for algo in algorithms:
        one = get_algorithm_class(algo).single_worker
        for label, params in variants(algo)[: None if every_compressor else 1]:
            overrides = [f"model={model}", "eval_every=1000000"] + [
                f"algo.{k}={v}" for k, v in params.items()
            ]
            name = f"{algo}-{label}" if label else algo
            jobs.append(Job(name, algo, 1 if one else workers, steps, overrides))
    return jobs


def _row(job: Job, run: Run | None, reference: float | None) -> list[str]:
    label = job.name.split("-", 1)[1] if "-" in job.name else "—"
    if run is None:
        return [job.algorithm, label, str(job.workers), "failed", "", "", "", ""]
    per_step = [float(x) for x in run.summary["bytes_per_step"]]
    avg = mean(per_step)
    ratio = f"{avg / reference:.4f}" if reference else "—"
    return [
        job.algorithm,
        label,
        str(job.workers),
        human_bytes(avg),
        human_bytes(max(per_step)),
        ratio,
        f"{min(run.summary['steps'])}",
        pct(float(run.summary["test_error"])),
    ]


def run(env: BenchEnv, args: argparse.Namespace) -> str:
    start = time.perf_counter()
    workers = args.workers or (2 if env.quick else 4)
    steps = args.steps or (8 if env.quick else 128)
    algorithms = registered()
    jobs = jobs_for(algorithms, workers, steps, args.model, every_compressor=not env.quick)
    env.log(f"bytes: {len(jobs)} runs of {steps} steps: {', '.join(j.name for j in jobs)}")
    runs = run_batch(env, "bytes", jobs)
    ref_run = runs.get("allreduce")
    reference = mean([float(x) for x in ref_run.summary["bytes_per_step"]]) if ref_run else None
    rows = [_row(job, runs[job.name], reference) for job in jobs]
    headers = [
        "algorithm",
        "compressor",
        "workers",
        "bytes / worker-step (mean)",
        "max over workers",
        "ratio to allreduce",
        "steps",
        "test error after the run",
    ]
    body = "\n".join(
        [
            f"{args.model} on digits, {workers} workers (one node), {steps} steps per worker, default "
            "parameters of each algorithm. Bytes sent per worker per step = the run's training bytes / its "
            "steps, with the bandwidth-optimal volume of each collective (commsgd.comm's byte model) and "
            "exact compressed sizes. Periodic algorithms are averaged over the run, so their figure depends "
            "on the period vs the steps.",
            "",
            f"Registered when this ran: {', '.join(algorithms)}.",
            "",
            md_table(headers, rows),
        ]
    )
    data = {
        "workers": workers,
        "steps": steps,
        "registered": algorithms,
        "rows": [dict(zip(headers, r)) for r in rows],
        "bytes_per_step": {
            j.name: (mean([float(x) for x in r.summary["bytes_per_step"]]) if (r := runs[j.name]) else None)
            for j in jobs
        },
    }
    _plot(env, jobs, runs, reference)
    write_result(
        env,
        "bytes",
        "Bytes per worker-step",
        body + "\n\n![bytes](bytes.png)",
        data,
        time.perf_counter() - start,
    )
    done = sum(r is not None for r in runs.values())
    per_step = human_bytes(reference or 0)
    return f"{done}/{len(jobs)} runs over {len(algorithms)} algorithms; allreduce {per_step}/step"


def _plot(env: BenchEnv, jobs: list[Job], runs: dict[str, Run | None], reference: float | None) -> None:
    from commsgd.plots import Panel, Series, save_figure

    names, values = [], []
    for job in jobs:
        run = runs[job.name]
        if run is not None:
            names.append(job.name)
            values.append(max(mean([float(x) for x in run.summary["bytes_per_step"]]), 1.0))
    panel = Panel(
        "bytes sent per worker-step (log scale)",
        "",
        "bytes",
        [Series("", names, values)],
        kind="bar",
        logy=True,
        rotate_xticks=45 if len(names) > 4 else 0,
    )
    save_figure(env.out / "bytes.png", [panel], columns=1, size=(max(5.0, 0.45 * len(names) + 2), 3.8))

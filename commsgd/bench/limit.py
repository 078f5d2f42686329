"""limit: every algorithm that compresses gradients or averages models, against the physical limit of its
link, on the emulated cluster (2 nodes x 1 worker, tbf-shaped veth links, each node on its own core).

    commsgd bench limit --data-dir ../shared/data/cifar10-jpeg        ResNet-20 and VGG16, 0.1 and 1 Gbit/s

For each model, link rate and algorithm, from the steps after the warm-up (the slower worker's clock):

- step: seconds per training step;
- compute-only: the step of local SGD with no averaging round in the run (same model, batch, node,
  threads, data; no communication) - what the step would cost over an infinitely fast link; run first
  and again after every algorithm, and each algorithm is held to the faster of the two runs next to it
  (this machine's speed drifts by 10-30 % within minutes: one reference at each end of the whole
  series measured that drift, not the algorithms);
- lockstep: the same run's mean over steps of the slower worker's step: what an algorithm that waits for
  both workers at every step pays for compute alone (a node's step varies by 10-15 % from step to step
  here, so the slower of two is above either's mean);
- link bytes: what the busiest link carries per step by commsgd's byte model (`commsgd.comm`): the
  bytes sent, except where one worker sends more than the others (LSGD's leader broadcasts the whole
  model: its link carries n where each worker is counted (p - 1) / p * n);
- bound: compute + link bytes per step / link rate + latency x collectives per step, with the rate
  of one TCP stream across the shaped link and the latency of a one-float all-reduce of the two workers
  (`commsgd.bench.latency`, through commsgd's communication layer), both measured on the cluster;
  compute is the lockstep figure for algorithms with a collective every step, compute-only otherwise;
- step / bound: 1.0 is the physical limit of a step that does not overlap communication with compute;
- step / max: step / max(compute, link bytes / rate), the limit of a step whose communication hides
  behind the backward pass;
- x allreduce: step / all-reduce SGD's step at the same rate.

`powersgd+overlap`, `signum+overlap`, `ef_sgd+overlap`, `qsgd+overlap`, `randomk+overlap` and
`fp16+overlap` are those algorithms with `algo.overlap` on, in all-reduce SGD's buckets: each bucket
compressed and sent once backward has it (powersgd: its P, and its Q once the next bucket's P is on its
way).
All-reduce SGD overlaps its buckets with the backward pass; on ResNet-20 it uses 0.25 MB buckets (about
a quarter of the gradient: DDP's 25 MB puts the whole 1.08 MB model in one bucket, which can start only
after backward), on VGG16 DDP's 25 MB (60 MB in 3 buckets; smaller ones measured no faster).

Periodic methods (local SGD, EASGD, LSGD) average every `--tau` steps, so their step is the mean over
rounds and the steps between them.

`--repeats R` runs the whole series (references and algorithms) R times in turn on the same emulated
cluster; each row is then the repeat with the median step / bound, with the range of the R steps and
of the R ratios beside it (this machine's speed drifts by more between minutes than one run can tell).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from commsgd.bench.cluster import ClusterUnavailable, bench_cluster, train_on
from commsgd.bench.common import BenchEnv, Job, add_reuse_argument, available, reuse_runs, write_result
from commsgd.errors import ConfigError
from commsgd.metrics import human_bytes, write_json_atomic
from commsgd.report import Run, md_table

TITLE = "Compressed and low-communication algorithms against the physical limit of the link"

#: the reference run: local SGD whose period is longer than any run, so it never communicates
COMPUTE = "compute-only"
#: the same reference again after the last algorithm (after each other one: `reference_after`); an
#: algorithm's bound takes the faster of the references next to it (drift shows in the notes)
COMPUTE_AFTER = "compute-only-after"
#: a change of the compute-only step across one algorithm's run beyond this is said in the notes
DRIFT = 0.1


def reference_after(algorithm: str, last: bool) -> str:
    """The label of the compute-only run that follows `algorithm`'s."""
    return COMPUTE_AFTER if last else f"{COMPUTE}-after-{algorithm}"


def is_reference(label: str) -> bool:
    """Whether `label` names a compute-only run (the first, one after an algorithm, or the last)."""
    return label == COMPUTE or label.startswith(f"{COMPUTE}-after")


NO_ROUND = 10**6
NODES = 2

#: (algorithm, its parameters) in the order of the table; the first is the reference of "x allreduce"
ALGORITHMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("allreduce", ()),
    ("powersgd", ()),
    ("dist_ef_sgd", ()),
    ("signum", ()),
    ("ef_sgd", ()),
    ("qsgd", ()),
    ("topk", ()),
    ("randomk", ()),
    ("fp16", ()),
    ("powersgd+overlap", ("overlap",)),
    ("signum+overlap", ("overlap",)),
    ("ef_sgd+overlap", ("overlap",)),
    ("qsgd+overlap", ("overlap",)),
    ("randomk+overlap", ("overlap",)),
    ("fp16+overlap", ("overlap",)),
    ("local_sgd", ("tau",)),
    ("easgd", ("tau",)),
    ("lsgd", ("tau",)),
    ("dpsgd", ()),
)
QUICK_ALGORITHMS = ("allreduce", "powersgd", "local_sgd")
#: the gradient compressors among them (the goal "<= 0.5x all-reduce SGD at 0.1 Gbit/s" is theirs)
COMPRESSED = frozenset(
    {"powersgd", "dist_ef_sgd", "signum", "ef_sgd", "qsgd", "topk", "randomk", "fp16"}
    | {"powersgd+overlap", "signum+overlap", "ef_sgd+overlap", "qsgd+overlap", "randomk+overlap"}
    | {"fp16+overlap"}
)


def algorithm_of(label: str) -> str:
    """The algorithm a row label runs: `fp16+overlap` is fp16 with `algo.overlap` on."""
    return label.partition("+")[0]


@dataclass(frozen=True)
class Model:
    """A compared model with its per-worker batch and its warm-up and timed steps."""

    name: str
    batch: int
    warmup: int
    timed: int
    bucket_mb: float = 25.0  # all-reduce SGD's bucket (see the module's docstring)


FULL_MODELS = {"resnet20": Model("resnet20", 32, 4, 16, 0.25), "vgg16": Model("vgg16", 32, 4, 8)}
QUICK_MODEL = Model("mlp", 32, 2, 4)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models", nargs="+", choices=sorted(FULL_MODELS), default=list(FULL_MODELS), help="default both"
    )
    parser.add_argument("--gbps", type=float, nargs="+", default=[0.1, 1.0], help="link rates (0.1 1)")
    parser.add_argument(
        "--algorithms", nargs="+", metavar="ALGO", help="a subset of the compared algorithms (default all)"
    )
    parser.add_argument("--tau", type=int, default=4, help="period of local SGD, EASGD and LSGD (4)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="run the whole series R times: median and range per cell (1)"
    )
    add_reuse_argument(parser)


def run_name(model: str, gbps: float, label: str, repeat: int = 1) -> str:
    """A run's folder name; repeats after the first carry their number (the first keeps the plain name,
    so a series made before `--repeats` is still its first repeat)."""
    return f"{model}-{gbps:g}gbps-{label}" + (f"-r{repeat}" if repeat > 1 else "")


def jobs_for(
    env: BenchEnv, model: Model, gbps: float, algorithms: Sequence[str], tau: int, repeat: int = 1
) -> list[tuple[str, Job]]:
    """(label, job) of every compared algorithm at one link rate, in the order they run, with a
    compute-only reference before the first and after each one (`repeat`: which pass of the series)."""
    steps = model.warmup + model.timed
    if env.quick:
        task = ["model=mlp", "data.dataset=digits"]
    else:
        data = env.data_dir or ""
        dataset = "cifar10" if (Path(data) / "cifar-10-batches-py").is_dir() else "imagefolder"
        task = [f"model={model.name}", f"data.dataset={dataset}", f"data.data_dir={data}"]
    base = [
        *task,
        f"data.batch_size={model.batch}",
        "data.test_samples=256",
        f"eval_every={steps + 1}",  # one evaluation, after the last step
        "checkpoint_every=0",
    ]
    params = dict(ALGORITHMS)

    def reference(label: str) -> tuple[str, Job]:
        return label, Job(
            run_name(model.name, gbps, label, repeat),
            "local_sgd",
            NODES,
            steps,
            [*base, f"algo.tau={NO_ROUND}"],
        )

    out = [reference(COMPUTE)]
    for k, algo in enumerate(algorithms):
        extra = [f"algo.tau={tau}"] if "tau" in params.get(algo, ()) else []
        overlap = "overlap" in params.get(algo, ())
        if overlap:
            extra.append("algo.overlap=true")
        if algo == "allreduce" or overlap:
            extra.append(f"algo.bucket_mb={model.bucket_mb:g}")
        name = run_name(model.name, gbps, algo, repeat)
        out.append((algo, Job(name, algorithm_of(algo), NODES, steps, [*base, *extra])))
        out.append(reference(reference_after(algo, last=k == len(algorithms) - 1)))
    return out


# --------------------------------------------------------------------------------------- numbers


@dataclass(frozen=True)
class Pace:
    """One run's cost per step after the warm-up: the slower worker's seconds and its traffic."""

    step_s: float
    bytes_sent: float
    link_bytes: float  # the busiest link's bytes (commsgd.comm's byte model)
    collectives: float
    lockstep_s: float  # mean over steps of the slower worker's seconds for that step


def pace(run: Run, warmup: int) -> Pace | None:
    """Per-step seconds, bytes sent and collectives between step `warmup` and the last step every worker
    logged, the maximum over workers (the job moves at its slowest worker's pace), and the lockstep
    seconds (between consecutive logged steps, the slower worker's time); None without steps after the
    warm-up in every worker's metrics."""
    per_rank = [
        {r["step"]: r for r in records if isinstance(r.get("step"), int)} for records in run.metrics.values()
    ]
    if not per_rank:
        return None
    logged = sorted(set.intersection(*(set(rows) for rows in per_rank)))
    if warmup not in logged or logged[-1] <= warmup:
        return None
    span = [step for step in logged if step >= warmup]
    steps = span[-1] - warmup

    def between(a: int, b: int, field: str) -> float:
        """The larger of the workers' change in `field` from step a to step b."""
        return max(float(r[b].get(field, 0)) - float(r[a].get(field, 0)) for r in per_rank)

    def per_step(field: str) -> float:
        return between(warmup, span[-1], field) / steps

    slower = [between(a, b, "wall_s") for a, b in itertools.pairwise(span)]
    counted = all("link_bytes" in r[warmup] for r in per_rank)  # metrics of older runs lack it
    return Pace(
        per_step("wall_s"),
        per_step("bytes_sent"),
        per_step("link_bytes" if counted else "bytes_sent"),
        per_step("collectives"),
        sum(slower) / steps,
    )


@dataclass(frozen=True)
class Link:
    """What the shaped link does, as measured: one TCP stream's rate, and the latency of a collective (a
    one-float all-reduce through commsgd; where it was not measured, a 64-byte TCP round trip)."""

    gbps: float
    latency_s: float

    def transfer_s(self, nbytes: float) -> float:
        return nbytes * 8 / (self.gbps * 1e9)


def bound_s(compute_s: float, p: Pace, link: Link) -> float:
    """The physical limit of a step that does not overlap: compute, then the bytes, then the latencies."""
    return compute_s + link.transfer_s(p.link_bytes) + link.latency_s * p.collectives


def overlap_bound_s(compute_s: float, p: Pace, link: Link) -> float:
    """The limit of a step whose communication hides behind its compute."""
    return max(compute_s, link.transfer_s(p.link_bytes))


@dataclass
class Row:
    model: str
    gbps: float
    algorithm: str
    pace: Pace
    reference: Pace  # the faster of the compute-only runs next to this one
    link: Link
    allreduce_s: float | None
    #: with `--repeats`: every repeat's step seconds and step / bound (this row is the median one)
    repeat_steps: tuple[float, ...] = ()
    repeat_bounds: tuple[float, ...] = ()

    @property
    def compute_s(self) -> float:
        """The compute the step cannot avoid: the lockstep compute-only step for an algorithm that meets
        the other worker at every step, the plain one for a periodic method."""
        return self.reference.lockstep_s if self.pace.collectives >= 1 else self.reference.step_s

    @property
    def bound_s(self) -> float:
        return bound_s(self.compute_s, self.pace, self.link)

    @property
    def to_bound(self) -> float:
        """step / bound: 1.0 is the physical limit."""
        return self.pace.step_s / self.bound_s

    @property
    def to_overlap_bound(self) -> float:
        return self.pace.step_s / overlap_bound_s(self.compute_s, self.pace, self.link)

    @property
    def x_allreduce(self) -> float | None:
        return self.pace.step_s / self.allreduce_s if self.allreduce_s else None

    def cells(self) -> list[str]:
        x = self.x_allreduce
        step, to_bound = f"{self.pace.step_s * 1e3:.0f}", f"{self.to_bound:.2f}"
        if len(self.repeat_steps) > 1:
            step += f" ({min(self.repeat_steps) * 1e3:.0f}-{max(self.repeat_steps) * 1e3:.0f})"
            to_bound += f" ({min(self.repeat_bounds):.2f}-{max(self.repeat_bounds):.2f})"
        return [
            f"{self.gbps:g} Gbit/s",
            self.algorithm,
            step,
            f"{self.reference.step_s * 1e3:.0f}",
            f"{self.reference.lockstep_s * 1e3:.0f}",
            human_bytes(self.pace.bytes_sent),
            human_bytes(self.pace.link_bytes),
            f"{self.pace.collectives:.1f}",
            f"{self.bound_s * 1e3:.0f}",
            to_bound,
            f"{self.to_overlap_bound:.2f}",
            "—" if x is None else f"{x:.2f}",
        ]

    def data(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "gbps": self.gbps,
            "algorithm": self.algorithm,
            "step_s": self.pace.step_s,
            "compute_only_s": self.reference.step_s,
            "lockstep_compute_s": self.reference.lockstep_s,
            "bound_compute_s": self.compute_s,
            "bytes_per_step": self.pace.bytes_sent,
            "link_bytes_per_step": self.pace.link_bytes,
            "collectives_per_step": self.pace.collectives,
            "bound_s": self.bound_s,
            "step_to_bound": self.to_bound,
            "step_to_overlap_bound": self.to_overlap_bound,
            "x_allreduce": self.x_allreduce,
            "link_gbps": self.link.gbps,
            "link_latency_s": self.link.latency_s,
            "repeat_step_s": list(self.repeat_steps),
            "repeat_step_to_bound": list(self.repeat_bounds),
        }


def median_rows(repeats: Sequence[Sequence[Row]]) -> list[Row]:
    """One row per algorithm from the rows of every repeat: the repeat whose step / bound is the median
    (the lower middle for an even count; every cell of a row stays from one run), with every repeat's
    step and step / bound kept for the ranges, in repeat order. One repeat: its rows as they are."""
    if len(repeats) == 1:
        return list(repeats[0])
    out = []
    for algorithm in dict.fromkeys(r.algorithm for rows in repeats for r in rows):
        these = [r for rows in repeats for r in rows if r.algorithm == algorithm]  # in repeat order
        middle = sorted(these, key=lambda r: r.to_bound)[(len(these) - 1) // 2]
        steps, bounds = tuple(r.pace.step_s for r in these), tuple(r.to_bound for r in these)
        out.append(dataclasses.replace(middle, repeat_steps=steps, repeat_bounds=bounds))
    return out


HEADERS = [
    "link",
    "algorithm",
    "step (ms)",
    "compute-only (ms)",
    "lockstep (ms)",
    "bytes / step",
    "link bytes / step",
    "collectives / step",
    "bound (ms)",
    "step / bound",
    "step / max",
    "x allreduce",
]


# --------------------------------------------------------------------------------------- running


def _link_file(env: BenchEnv, model: str, gbps: float) -> Path:
    return env.runs_dir("limit") / f"link-{model}-{gbps:g}gbps.json"


def _train(env: BenchEnv, model: Model, gbps: float, jobs: Sequence[Job]) -> dict[str, Run | None]:
    """Every job of one rate on one emulated cluster, by run name; the link's measurement saved next to
    the runs."""
    runs: dict[str, Run | None] = {}
    with bench_cluster(env, "limit", NODES, 1, gbps) as c:
        measured: dict[str, Any] = {**c.measure_link(), "all_reduce_s": c.collective_latency()}
        env.runs_dir("limit").mkdir(parents=True, exist_ok=True)
        write_json_atomic(_link_file(env, model.name, gbps), {"nominal_gbps": gbps, **measured})
        for job in jobs:
            runs[job.name] = train_on(c, env, "limit", job).run
    return runs


def _link(env: BenchEnv, model: str, gbps: float) -> Link:
    """The measured link of a rate (the nominal rate and no latency where it was not measured)."""
    path = _link_file(env, model, gbps)
    found = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if "link_gbps" not in found:
        env.note(f"limit: the {gbps:g} Gbit/s link of {model} was not measured; the nominal rate is used")
    latency = found.get("all_reduce_s") or found.get("link_rtt_s")
    if latency is None:
        env.note(f"limit: the latency of the {gbps:g} Gbit/s link of {model} was not measured; 0 is used")
    return Link(float(found.get("link_gbps", gbps)), float(latency or 0.0))


def reusable(env: BenchEnv, jobs: Sequence[tuple[str, Job]]) -> list[tuple[str, Job]]:
    """`--reuse`: the jobs to read back, without the references between algorithms that an earlier run
    of the older layout (one reference at each end only) never made; a missing algorithm or end
    reference stays, so that its absence is noted."""
    return [
        (label, job)
        for label, job in jobs
        if label in (COMPUTE, COMPUTE_AFTER)
        or not is_reference(label)
        or (env.runs_dir("limit") / job.name).is_dir()
    ]


def neighbours(labels: Sequence[str], index: int, paces: dict[str, Pace | None]) -> list[Pace]:
    """The compute-only paces nearest before and after position `index` of the run order (a reference
    that did not finish is skipped; runs of an older layout have one at each end only)."""
    before = [p for x in reversed(labels[:index]) if is_reference(x) and (p := paces.get(x)) is not None]
    after = [p for x in labels[index + 1 :] if is_reference(x) and (p := paces.get(x)) is not None]
    return before[:1] + after[:1]


def rows_for(
    env: BenchEnv, model: Model, gbps: float, runs: dict[str, Run | None], link: Link, repeat: int = 1
) -> list[Row]:
    """One row per finished algorithm run; `runs` in the order they ran (`jobs_for`)."""
    where = f"{model.name} at {gbps:g} Gbit/s" + (f", repeat {repeat}" if repeat > 1 else "")
    labels = list(runs)
    paces = {label: pace(r, model.warmup) if r is not None else None for label, r in runs.items()}
    references = [p for label, p in paces.items() if is_reference(label) and p is not None]
    if not references:
        env.note(f"limit: {where}: no compute-only run finished; no rows")
        return []
    steps = sorted(1e3 * p.step_s for p in references)
    env.note(
        f"limit: {where}: compute-only step {steps[0]:.0f}"
        + (f"-{steps[-1]:.0f}" if len(steps) > 1 else "")
        + f" ms over {len(steps)} run(s) between the algorithms; each algorithm's bound uses the faster "
        "of the two next to it"
    )
    allreduce = paces.get("allreduce")
    rows = []
    for index, label in enumerate(labels):
        if is_reference(label) or runs[label] is None:
            continue
        p = paces[label]
        if p is None:
            env.note(f"limit: {run_name(model.name, gbps, label, repeat)}: too few steps in its metrics")
            continue
        near = neighbours(labels, index, paces) or references
        reference = min(near, key=lambda q: q.step_s)
        drift = max(q.step_s for q in near) / reference.step_s - 1
        if drift > DRIFT:
            env.note(
                f"limit: {where}: the compute-only step changed by "
                f"{100 * drift:.0f} % across {label}'s run, so its ratios carry about that much uncertainty"
            )
        rows.append(Row(model.name, gbps, label, p, reference, link, allreduce.step_s if allreduce else None))
    return rows


def verdicts(rows: Sequence[Row]) -> list[str]:
    """The goals, each with what was measured."""
    lines = []
    for model in sorted({r.model for r in rows}):
        for gbps, goal in ((0.1, 0.5), (1.0, 1.0)):
            these = [r for r in rows if r.model == model and r.gbps == gbps and r.algorithm in COMPRESSED]
            if not these or these[0].x_allreduce is None:
                continue
            over = [f"{r.algorithm} {r.x_allreduce:.2f}x" for r in these if (r.x_allreduce or 0) > goal]
            lines.append(
                f"- {model}, {gbps:g} Gbit/s: compressed steps <= {goal:g}x all-reduce SGD's: "
                + ("all" if not over else f"not met by {', '.join(over)}")
            )
        mine = [r for r in rows if r.model == model]
        worst = max(mine, key=lambda r: r.to_bound)
        lines.append(
            f"- {model}: step / bound from {min(r.to_bound for r in mine):.2f} to {worst.to_bound:.2f} "
            f"({worst.algorithm} at {worst.gbps:g} Gbit/s); goal <= 1.1"
        )
    return lines


def run(env: BenchEnv, args: argparse.Namespace) -> str:
    start = time.perf_counter()
    if getattr(args, "in_suite", False) and not env.quick:
        env.note("limit: not part of the full suite (about 40 minutes); run `commsgd bench limit`")
        return "not run in the suite: `commsgd bench limit --data-dir DIR` on its own (about 40 minutes)"
    if not env.quick and not env.data_dir:
        raise ConfigError(
            "bench limit: needs --data-dir (e.g. ../shared/data/cifar10-jpeg); --quick runs without"
        )
    if args.tau < 1 or not args.gbps or min(args.gbps) <= 0:
        raise ConfigError("bench limit: --tau must be at least 1 and --gbps positive")
    repeats = getattr(args, "repeats", 1)
    if repeats < 1:
        raise ConfigError(f"bench limit: --repeats must be at least 1, got {repeats}")
    names = [a for a, _ in ALGORITHMS]
    unknown = sorted(set(args.algorithms or []) - set(names))
    if unknown:
        raise ConfigError(
            f"bench limit: --algorithms: {', '.join(unknown)} not compared here (one of {', '.join(names)})"
        )
    chosen = args.algorithms or (list(QUICK_ALGORITHMS) if env.quick else names)
    runnable = set(available(env, sorted({algorithm_of(a) for a in chosen}), "limit"))
    algorithms = [a for a in names if a in chosen and algorithm_of(a) in runnable]
    models = [QUICK_MODEL] if env.quick else [FULL_MODELS[m] for m in args.models]
    rates = args.gbps[:1] if env.quick else args.gbps
    rows: list[Row] = []
    for model in models:
        for gbps in rates:
            series = [jobs_for(env, model, gbps, algorithms, args.tau, k) for k in range(1, repeats + 1)]
            if args.reuse:
                series = [reusable(env, jobs) for jobs in series]
                found = reuse_runs(env, "limit", [j for jobs in series for _, j in jobs])
            else:
                try:
                    found = _train(env, model, gbps, [j for jobs in series for _, j in jobs])
                except ClusterUnavailable as exc:  # in `bench all`, a note; alone, the one-line error
                    if not getattr(args, "in_suite", False):
                        raise
                    write_result(env, "limit", TITLE, f"Not available on this machine: {exc}", {"rows": []})
                    return f"not available: {exc}"
            link = _link(env, model.name, gbps)
            per_repeat = [
                rows_for(env, model, gbps, {label: found.get(job.name) for label, job in jobs}, link, k)
                for k, jobs in enumerate(series, start=1)
            ]
            rows.extend(median_rows([r for r in per_repeat if r]) if any(per_repeat) else [])
    if not rows:
        write_result(env, "limit", TITLE, "No run finished; see the notes.", {"rows": []})
        return "no run finished"
    body = [
        f"{NODES} nodes x 1 worker, one emulated node per core, tbf-shaped links. Steps after the warm-up "
        "(the slower worker): "
        + "; ".join(f"{m.name} batch {m.batch}, {m.warmup} warm-up + {m.timed} timed steps" for m in models)
        + f". Local SGD, EASGD and LSGD average every {args.tau} steps. "
        + (
            f"The series ran {repeats} times in turn: each row is the repeat with the median step / bound, "
            "the range of the repeats' steps and ratios in brackets. "
            if repeats > 1
            else ""
        )
        + "Links as measured (rate: one TCP "
        "stream; latency: the median one-float all-reduce through commsgd): "
        + "; ".join(
            sorted(
                {
                    f"{r.gbps:g} Gbit/s: {r.link.gbps:.3f} Gbit/s, {r.link.latency_s * 1e6:.0f} us"
                    for r in rows
                }
            )
        )
        + ".",
        "",
        *verdicts(rows),
    ]
    for model in models:
        these = [r for r in rows if r.model == model.name]
        if these:
            body += ["", f"## {model.name}", "", md_table(HEADERS, [r.cells() for r in these])]
    seconds = time.perf_counter() - start
    write_result(env, "limit", TITLE, "\n".join(body), {"rows": [r.data() for r in rows]}, seconds)
    worst = max(rows, key=lambda r: r.to_bound)
    where = f"{worst.algorithm}, {worst.model}, {worst.gbps:g} Gbit/s"
    count = f"{len(rows)} runs" if repeats == 1 else f"{len(rows)} rows of {repeats} repeats each"
    return f"{count}; step / bound up to {worst.to_bound:.2f} ({where})"

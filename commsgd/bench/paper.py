"""paper: the LSGD paper's CIFAR-10 comparison (its Figs. 2, 4, 5 and the rebuttal's communication
table): SGD on one worker, all-reduce SGD, DOWNPOUR, EASGD and LSGD, each trained for the same seconds.

Settings, with `--data-dir` (an image folder such as ``cifar10-jpeg`` or a CIFAR-10 python folder):

* 4 workers on one node (loopback, as the paper's 4 GPUs of one machine);
* 2 nodes x 2 workers at the *matched* link rate: the rate at which all-reduce SGD spends the share of its
  step communicating that it spends on a GPU cluster joined by 1 Gbit/s Ethernet (`matched_link`);
* 2 nodes x 2 workers at 1 Gbit/s, as it is.

The multi-node settings use the emulated cluster with `--cluster` (network namespaces, tbf-shaped
links, each node its share of the cores), else the in-process network model. Every run trains for
`--seconds` (`max_seconds`: evaluations do not count) with the paper's hyperparameters (supplement
sec. 9, Tables 2-3, one point of each grid) and its preprocessing. Without `--data-dir` the bundled digits
task stands in (mlp), for a quick look at the pipeline.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from commsgd.bench.common import (
    BenchEnv,
    Job,
    add_reuse_argument,
    available,
    reuse_runs,
    run_jobs,
    write_result,
)
from commsgd.report import (
    Run,
    auto_target,
    md_table,
    pct,
    run_stats,
    secs,
    write_report,
)

TITLE = "the LSGD paper's comparison: SGD, all-reduce SGD, DOWNPOUR, EASGD, LSGD at equal wall-clock"

ALGORITHMS = ("allreduce", "downpour", "easgd", "lsgd")
#: time-to-target on digits: the mlp gets below 6 % test error in a few hundred steps
DIGITS_TARGET = 0.06
#: on CIFAR-10 in these minutes-long runs: one-worker SGD gets there in about a minute of training
CIFAR_TARGET = 0.75
#: the rebuttal's communication share of total time, (4 workers, 16 workers), CNN7 and ResNet-20
REBUTTAL_SHARE = {
    "cnn7": {"lsgd": (0.01, 0.02), "easgd": (0.02, 0.04), "downpour": (0.20, 0.57)},
    "resnet20": {"lsgd": (0.01, 0.02), "easgd": (0.02, 0.04), "downpour": (0.21, 0.50)},
}
#: one learning rate per method from the paper's grids (Table 2: CNN7, Table 3: ResNet-20); all-reduce
#: SGD is not in the paper and takes SGD's. The middle of each grid: `commsgd sweep --grid
#: lsgd-paper-cnn7` searches all of it.
PAPER_LR = {
    "cnn7": {"sgd": 0.05, "allreduce": 0.05, "downpour": 0.01, "easgd": 0.05, "lsgd": 0.05},
    "resnet20": {"sgd": 0.1, "allreduce": 0.1, "downpour": 0.05, "easgd": 0.1, "lsgd": 0.1},
}
#: the paper's own settings of each method (sec. 4 and 9.3): tau 64, tau_G 128, beta 0.43, period 1
ALGO_OVERRIDES = {
    "downpour": ["algo.n_push=1", "algo.n_fetch=1"],
    "easgd": ["algo.tau=64", "algo.beta=0.43"],
    "lsgd": ["algo.tau=64", "algo.tau_global=128", "algo.pull=0.1"],
}
#: the paper's GPU (GTX 1080: 8.9 TFLOPS fp32 peak) at half its peak, what cuDNN convolutions of
#: these small models reach; the matched link rate scales with it
GPU_TFLOPS = 4.4
EVALS_PER_RUN = 6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=("cnn7", "resnet20"), default="cnn7", help="with --data-dir")
    parser.add_argument(
        "--seconds", type=float, help="training seconds per run (default 120 with --data-dir, quick 2)"
    )
    parser.add_argument("--batch", type=int, default=32, help="mini-batch per worker (the paper: 128)")
    parser.add_argument("--steps", type=int, help="digits only: steps per worker (default 600; quick 20)")
    parser.add_argument(
        "--test-samples",
        type=int,
        default=2000,
        help="evaluate on this many test images, drawn once (default 2000; 0: all)",
    )
    parser.add_argument("--gbps", type=float, default=1.0, help="the as-is inter-node rate (default 1)")
    parser.add_argument(
        "--matched-gbps", type=float, help="the matched inter-node rate (default: computed, see the result)"
    )
    parser.add_argument(
        "--gpu-tflops",
        type=float,
        default=GPU_TFLOPS,
        help=f"effective GPU rate the matched link is computed for (default {GPU_TFLOPS})",
    )
    parser.add_argument("--target-error", type=float, help="default: 0.06 on digits, 0.75 on CIFAR-10")
    parser.add_argument(
        "--cluster", action="store_true", help="run the 2-node settings on the emulated cluster"
    )
    add_reuse_argument(parser)


# --------------------------------------------------------------------------------------- the link


def forward_flops(model: torch.nn.Module, input_shape: tuple[int, ...]) -> float:
    """Floating-point operations of one sample's forward pass through the convolutions and linear
    layers (2 per multiply-add; activations, pooling and norms are comparatively free)."""
    total = 0.0

    def count(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += 2.0 * out[0].numel() * per_output
        elif isinstance(module, torch.nn.Linear):
            total += 2.0 * module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    try:
        with torch.no_grad():
            model.eval()
            model(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    return total


@dataclass
class MatchedLink:
    """The inter-node rate at which a CPU step sees the communication share a GPU step sees on 1 Gbit/s.

    Communication time scales with 1 / rate, so equal shares need rate = 1 Gbit/s x gpu_step / cpu_step.
    """

    flops_per_sample: float
    batch: int
    gpu_tflops: float
    cpu_step_s: float  # measured: compute seconds of one worker's step in the 4-worker all-reduce run
    allreduce_bytes: float  # measured: bytes one worker sends per all-reduce step

    @property
    def gpu_step_s(self) -> float:
        return 3.0 * self.flops_per_sample * self.batch / (self.gpu_tflops * 1e12)  # forward + backward

    @property
    def gpu_share(self) -> float:
        """All-reduce SGD's communication share on the GPU cluster at 1 Gbit/s (no overlap)."""
        comm = self.allreduce_bytes * 8 / 1e9
        return comm / (comm + self.gpu_step_s)

    @property
    def gbps(self) -> float:
        return self.gpu_step_s / self.cpu_step_s

    def reasoning(self, model: str) -> str:
        return (
            f"{model}: {self.flops_per_sample / 1e6:.0f} MFLOP per sample forward, so a step of "
            f"{self.batch} samples (forward and backward, 3x) is "
            f"{3 * self.flops_per_sample * self.batch / 1e9:.1f} GFLOP: {1e3 * self.gpu_step_s:.1f} ms "
            f"on the paper's GTX 1080 at {self.gpu_tflops:g} TFLOPS (half its fp32 peak). All-reduce SGD "
            f"sends {self.allreduce_bytes / 1e6:.2f} MB per worker-step (measured), "
            f"{self.allreduce_bytes * 8 / 1e6:.1f} ms at 1 Gbit/s: a communication share of "
            f"{pct(self.gpu_share, 0)} on the GPU cluster. Here a worker's step computes in "
            f"{self.cpu_step_s:.3f} s (measured, 4 workers on these cores), "
            f"{self.cpu_step_s / self.gpu_step_s:.0f}x the GPU's; communication takes the same share "
            f"when the link is that much slower: 1 Gbit/s x {1e3 * self.gpu_step_s:.1f} ms / "
            f"{self.cpu_step_s:.3f} s = {1e3 * self.gbps:.2f} Mbit/s."
        )


# --------------------------------------------------------------------------------------- the jobs


@dataclass
class Setting:
    """One layout: its jobs share a tag; `nodes` x `procs` is its shape on the emulated cluster."""

    name: str
    tag: str
    workers: int
    nodes: int
    procs: int
    gbps: float | None = None  # None: one node, loopback
    on_cluster: bool = False
    jobs: list[Job] = field(default_factory=list)

    def overrides(self) -> list[str]:
        if self.gbps is None or self.on_cluster:  # the cluster places nodes itself
            return [f"cluster.group_size={self.procs}"]
        return [
            "network.enabled=true",
            f"network.inter_gbps={self.gbps:.6g}",
            f"cluster.group_size={self.procs}",
        ]


def task_overrides(env: BenchEnv, model: str, batch: int) -> list[str]:
    if not env.data_dir:
        return ["model=mlp", "data.dataset=digits"]
    layout = "imagefolder" if (Path(env.data_dir) / "train").is_dir() else "cifar10"
    return [
        f"model={model}",
        f"data.dataset={layout}",
        f"data.data_dir={env.data_dir}",
        f"data.batch_size={batch}",
        "optim.weight_decay=1e-4",
    ]


def method_overrides(model: str, algorithm: str, seconds: float | None) -> list[str]:
    """The paper's learning rate and parameters of one method; ResNet-20's drop by 0.1, at 60 % of a
    shortened run (the paper drops at 1500 s)."""
    if model not in PAPER_LR:  # digits: commsgd's defaults
        return []
    out = [f"optim.lr={PAPER_LR[model][algorithm]}", *ALGO_OVERRIDES.get(algorithm, [])]
    if model == "resnet20" and seconds is not None:
        out += ["optim.schedule=step", f"optim.drop_seconds=[{0.6 * seconds:.6g}]", "optim.drop_factor=0.1"]
    return out


def eval_every(seconds: float | None, step_s: float, steps: int) -> int:
    """Steps between evaluations for about `EVALS_PER_RUN` of them in the run's budget."""
    expected = steps if seconds is None else max(1, int(seconds / max(step_s, 1e-6)))
    return max(1, min(steps, expected) // EVALS_PER_RUN)


def task_model(env: BenchEnv, model: str, batch: int) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """The model the runs train, built here for measuring (its input shape from the data set)."""
    from commsgd.tasks.data import load_dataset
    from commsgd.tasks.models import build_model

    dataset = task_overrides(env, model, batch)[1].split("=", 1)[1]
    spec = load_dataset(dataset, env.data_dir, model=model, seed=0).spec
    return build_model(model, spec), spec.input_shape


def probe_step_s(net: torch.nn.Module, input_shape: tuple[int, ...], batch: int) -> float:
    """Seconds of one forward-backward step at `batch` on one thread here (best of three): spaces the
    first runs' evaluations until a run measured the real step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net.train()
        x = torch.randn(batch, *input_shape)
        timings = []
        for _ in range(4):
            start = time.perf_counter()
            net(x).sum().backward()
            timings.append(time.perf_counter() - start)
        return min(timings[1:])
    finally:
        torch.set_num_threads(threads)


def per_step(run: Run) -> tuple[float, float]:
    """(compute seconds, bytes sent) per worker-step of a finished run, averaged over its workers."""
    s = run.summary
    steps = [max(int(n), 1) for n in s["steps"]]
    compute = sum(c / n for c, n in zip(s["compute_time_s"], steps)) / len(steps)
    return compute, sum(s["bytes_per_step"]) / len(s["bytes_per_step"])


# --------------------------------------------------------------------------------------- the run


def run(env: BenchEnv, args: argparse.Namespace) -> str:
    start = time.perf_counter()
    real = bool(env.data_dir)
    model = args.model if real else "mlp"
    seconds = args.seconds if args.seconds is not None else (2.0 if env.quick else 120.0 if real else None)
    steps = args.steps or (20 if env.quick else 10**6 if seconds is not None else 600)
    base = task_overrides(env, model, args.batch)
    if seconds is not None:
        base.append(f"max_seconds={seconds:g}")
    if real and args.test_samples:
        base.append(f"data.test_samples={args.test_samples}")
    algos = available(env, ALGORITHMS, "paper")
    net, input_shape = task_model(env, model, args.batch)
    one_core = probe_step_s(net, input_shape, args.batch)
    env.log(f"paper: one step of {model} at batch {args.batch} takes {one_core:.3f} s on one thread")

    def job(name: str, algo: str, workers: int, setting: Setting | None, step_s: float) -> Job:
        overrides = [*base, *method_overrides(model, "sgd" if workers == 1 else algo, seconds)]
        overrides += setting.overrides() if setting else []
        return Job(
            name, algo, workers, steps, [*overrides, f"eval_every={eval_every(seconds, step_s, steps)}"]
        )

    runs: dict[str, Run | None] = {}
    single = job("sgd-1worker", "sgd", 1, None, one_core)
    runs.update(_execute(env, args, None, [single]))
    if env.quick:
        local = Setting("2 workers, 1 node each", "2w", 2, 2, 1, args.gbps, args.cluster)
        layouts = [local]
    else:
        local = Setting("4 workers, 1 node", "4w", 4, 1, 4)
        layouts = [local]
    # two workers share each core: twice the one-thread step, until a run measured it
    local.jobs = [job(f"{a}-{local.tag}", a, local.workers, local, 2 * one_core) for a in algos]
    runs.update(_execute(env, args, local, local.jobs))
    link: MatchedLink | None = None
    if not env.quick:
        measured = runs.get(f"allreduce-{local.tag}")
        cpu_step, ar_bytes = per_step(measured) if measured else (2 * one_core, 0.0)
        if real:
            flops = forward_flops(net, input_shape)
            link = MatchedLink(flops, args.batch, args.gpu_tflops, cpu_step, ar_bytes)
        matched = args.matched_gbps or (link.gbps if link else 0.1)
        bytes_by = {a: per_step(r)[1] for a in algos if (r := runs.get(f"{a}-{local.tag}")) is not None}
        for tag, rate in (
            ("2x2-matched", matched),
            ("2x2-1g" if args.gbps == 1 else f"2x2-{args.gbps:g}g", args.gbps),
        ):
            setting = Setting(f"2 nodes x 2 workers, {_rate(rate)}", tag, 4, 2, 2, rate, args.cluster)
            for a in algos:
                step_s = cpu_step + 8 * bytes_by.get(a, 0.0) / (rate * 1e9)
                setting.jobs.append(job(f"{a}-{tag}", a, 4, setting, step_s))
            runs.update(_execute(env, args, setting, setting.jobs))
            layouts.append(setting)
    return _write(env, args, runs, layouts, link, model, seconds, steps, time.perf_counter() - start)


def _rate(gbps: float) -> str:
    return f"{gbps:g} Gbit/s" if gbps >= 0.1 else f"{gbps * 1e3:.3g} Mbit/s"


def _execute(
    env: BenchEnv, args: argparse.Namespace, setting: Setting | None, jobs: list[Job]
) -> dict[str, Run | None]:
    """Run `jobs` (on the emulated cluster for a cluster setting), or with --reuse read their run
    directories from an earlier run (None, with a note, where one did not finish)."""
    if args.reuse:
        return reuse_runs(env, "paper", jobs)
    if setting is None or not setting.on_cluster:
        return run_jobs(env, "paper", jobs)
    from commsgd.bench.cluster import run_on_cluster

    assert setting.gbps is not None
    return {j.name: run_on_cluster(env, "paper", j, setting.nodes, setting.procs, setting.gbps) for j in jobs}


# --------------------------------------------------------------------------------------- results


def error_at(run: Run, budget: float, key: str = "test_error") -> float | None:
    """`key` of the last evaluation at or before `budget` seconds of training."""
    times, values = run.curve(key)
    before = [v for t, v in zip(times, values) if t <= budget + 1e-9]
    return before[-1] if before else None


def _write(
    env: BenchEnv,
    args: argparse.Namespace,
    runs: dict[str, Run | None],
    layouts: list[Setting],
    link: MatchedLink | None,
    model: str,
    seconds: float | None,
    steps: int,
    took: float,
) -> str:
    ok = [r for r in runs.values() if r is not None]
    if not ok:
        write_result(env, "paper", "Paper comparison", "No run finished; see the notes.", {})
        return "no run finished"
    if args.target_error is None and not env.quick:
        args.target_error = CIFAR_TARGET if env.data_dir else DIGITS_TARGET
    target = args.target_error if args.target_error is not None else auto_target(ok)
    base = runs.get("sgd-1worker")
    sections: list[str] = []
    data: dict[str, Any] = {"target": target, "settings": {}, "seconds": seconds}
    headline = ""
    for setting in layouts:
        finished = [r for j in setting.jobs if (r := runs.get(j.name)) is not None]
        if not finished:
            continue
        group = ([base] if base else []) + finished
        folder = env.out / "paper" / setting.tag
        write_report(group, folder, target, f"paper comparison: {setting.name}")
        # time-limited runs all trained >= `seconds` (a step or two more): compare where each ended
        budget = math.inf if seconds is not None else min(r.curve("test_error")[0][-1] for r in finished)
        body, entries = _setting_table(group, budget, target, model, seconds)
        sections += [f"## {setting.name}", "", body, ""]
        sections += [f"![test error vs training time](paper/{setting.tag}/error_vs_time.png)", ""]
        sections += [
            f"Full report (bytes, communication share, leaders): [paper/{setting.tag}/report.md]"
            f"(paper/{setting.tag}/report.md)",
            "",
        ]
        data["settings"][setting.name] = {
            "budget_s": seconds if seconds is not None else budget,
            "gbps": setting.gbps,
            "runs": entries,
        }
        best = min(finished, key=lambda r: error_at(r, budget) or 1.0)
        at = f"after {seconds:g} s" if seconds is not None else f"at T={budget:.3g} s"
        headline = headline or f"{setting.name}: best {at} is {best.label} ({pct(error_at(best, budget))})"
    data["headline"] = headline
    if link is not None:
        data["matched_link"] = {
            "gbps": link.gbps,
            "gpu_step_s": link.gpu_step_s,
            "cpu_step_s": link.cpu_step_s,
            "gpu_share": link.gpu_share,
        }
    task = (
        f"{model.upper() if model == 'cnn7' else 'ResNet-20'} on CIFAR-10 ({env.data_dir})"
        if env.data_dir
        else "mlp on digits"
    )
    where = (
        "the emulated cluster (network namespaces, tbf-shaped veth links, each node its share of the cores)"
        if args.cluster
        else "the in-process network model"
    )
    length = (
        f"{seconds:g} s of training per run (evaluations excluded)"
        if seconds is not None
        else f"{steps} steps per worker"
    )
    if model in PAPER_LR:
        recipe = (
            f"batch {args.batch} per worker (the paper: 128), weight decay 1e-4, the paper's preprocessing; "
            f"learning rates {PAPER_LR[model]} (one point of each grid of the supplement's Tables 2-3), "
            "EASGD tau 64 beta 0.43, LSGD tau 64 tau_G 128 lambda = lambda_G = 0.1, DOWNPOUR "
            "communication period 1"
        )
    else:
        recipe = f"batch {args.batch} per worker, commsgd's default parameters of each method"
    intro = [
        f"{task}: {length}, {recipe}. The multi-node settings ran on {where}. Target error "
        f"{pct(target)}. The test error is the center variable's (the workers' average for LSGD, the "
        "center for EASGD and DOWNPOUR)"
        + (
            f", on {args.test_samples} test images drawn once (`data.test_samples`: every evaluation "
            "and run uses the same ones)."
            if env.data_dir and args.test_samples
            else "."
        ),
        "",
        "Shorter than the paper (its runs take hours on GPUs; these take minutes on CPU cores), so the "
        "errors are far from the paper's final ones: what compares is the order of the methods at equal "
        "time and their communication shares. SGD on one worker trains on a whole core, twice the "
        "compute each worker of the 4-worker runs gets.",
        "",
    ]
    if link is not None:
        intro += ["**The matched link rate.** " + link.reasoning(model), ""]
    write_result(
        env,
        "paper",
        "The LSGD paper's CIFAR-10 comparison at equal wall-clock",
        "\n".join(intro + sections),
        data,
        took,
    )
    return headline or f"{len(ok)} runs"


def _setting_table(
    group: list[Run], budget: float, target: float, model: str, seconds: float | None
) -> tuple[str, dict[str, Any]]:
    rebuttal = REBUTTAL_SHARE.get(model, {})
    rows, entries = [], {}
    for r in group:
        st = run_stats(r, target)
        err, loss = error_at(r, budget), error_at(r, budget, "test_loss")
        paper = rebuttal.get(r.algorithm)
        rows.append(
            [
                r.label,
                pct(err),
                "—" if loss is None else f"{loss:.3f}",
                secs(r.curve("test_error")[0][-1] if r.evals else None),
                secs(st.time_to_target),
                pct(st.comm_share, 1),
                f"{pct(paper[0], 0)} / {pct(paper[1], 0)}" if paper else "—",
                f"{st.steps_min}" if st.steps_min == st.steps_max else f"{st.steps_min}-{st.steps_max}",
                f"{st.bytes_per_step / 1e3:.1f} KB",
            ]
        )
        entries[r.label] = {
            "error_at_budget": err,
            "loss_at_budget": loss,
            "time_to_target": st.time_to_target,
            "comm_share": st.comm_share,
            "steps": st.steps_max,
        }
    headers = [
        "run",
        f"test error after {seconds:g} s" if seconds is not None else f"test error at T={budget:.3g} s",
        "test loss",
        "trained (final evaluation)",
        f"time to {pct(target)}",
        "comm share",
        "rebuttal's share (4 / 16 workers)",
        "steps/worker",
        "bytes/worker-step",
    ]
    return md_table(headers, rows), entries

"""commsgd's powersgd reducer against PyTorch's powerSGD_hook on DDP: time per training step.

    python benchmarks/powersgd_vs_hook.py [--workers 2] [--steps 20] [--rank 2] [--batch 16]

Both run on the same gloo workers with the same ResNet20, rank, warm-up (2 all-reduce steps, the least the
hook allows) and rule for which tensors to compress (min_compression_rate=2). Two workloads:

- `resnet20`: full steps (forward, backward, reduction, SGD) on a fixed random CIFAR-sized batch;
- `reduce`: ResNet20-shaped parameters whose backward is one multiply, so the step is almost only the
  gradient reduction (compression, collectives, decompression, error feedback).

commsgd's plain `allreduce` and DDP without a hook are timed alongside for reference. DDP gets one
gradient bucket, like commsgd's reducer (see `_make_step` for why the hook needs it on gloo).
Variants take turns in chunks of steps so that a busy machine slows all of them alike; a step's time is
the median chunk mean, of the slowest worker. `run(workers, steps, rank)` returns the numbers; `main`
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import commsgd
from commsgd.tasks import build_model
from commsgd.tasks.dataset import DatasetSpec
from commsgd.testing import run_distributed

CIFAR = DatasetSpec("cifar10", "image", (3, 32, 32), 10)
WARMUP = 2  # all-reduce steps before compression; the hook needs start_powerSGD_iter >= 2
CHUNK = 5
BUCKET_MB = 25
VARIANTS = ("commsgd powersgd", "torch powerSGD_hook", "commsgd allreduce", "torch DDP")


class GradientSource(nn.Module):
    """ResNet20's parameter shapes; the loss is sum(p * c) with fixed c, so backward costs one multiply."""

    def __init__(self, shapes: Sequence[torch.Size]) -> None:
        super().__init__()
        self.tensors = nn.ParameterList(nn.Parameter(torch.zeros(s)) for s in shapes)

    def forward(self, coefficients: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([(p * c).sum() for p, c in zip(self.tensors, coefficients)]).sum()


Step = Callable[[], None]


def _make_step(
    ctx: Any, which: str, model: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor], rank: int
) -> Step:
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if which.startswith("commsgd"):
        algo = (
            commsgd.build_algorithm("powersgd", rank=rank, warmup_steps=WARMUP, min_compression_rate=2.0)
            if which == "commsgd powersgd"
            else commsgd.build_algorithm("allreduce")
        )
        opt = commsgd.CommOptimizer(optimizer, algo, model, ctx)

        def ours() -> None:
            opt.zero_grad()
            loss = loss_of(model)
            loss.backward()
            opt.step(loss)

        return ours
    # One bucket (explicit cap: DDP's default puts the first 1 MB in a bucket of its own). With several
    # buckets the hook's future callbacks issue collectives from gloo's thread while backward issues the
    # next bucket's, and on gloo the ranks' orders can differ: a size mismatch abort or a hang.
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=BUCKET_MB)
    if which == "torch powerSGD_hook":
        state = PowerSGDState(
            process_group=None,
            matrix_approximation_rank=rank,
            start_powerSGD_iter=WARMUP,
            min_compression_rate=2,
            use_error_feedback=True,
            warm_start=True,
            orthogonalization_epsilon=1e-8,
            random_seed=0,
        )
        ddp.register_comm_hook(state, powerSGD_hook)

    def theirs() -> None:
        optimizer.zero_grad()
        loss_of(ddp).backward()
        optimizer.step()

    return theirs


def _time_workload(ctx: Any, workload: str, steps: int, rank: int, batch: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(ctx.rank)
    shapes = [p.shape for p in build_model("resnet20", CIFAR).parameters()]
    if workload == "resnet20":
        x, y = torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen)

        def build() -> nn.Module:
            torch.manual_seed(0)
            return build_model("resnet20", CIFAR)

        def loss_of(net: nn.Module) -> torch.Tensor:
            return F.cross_entropy(net(x), y)
    else:
        coefficients = [torch.randn(s, generator=gen) for s in shapes]

        def build() -> nn.Module:
            return GradientSource(shapes)

        def loss_of(net: nn.Module) -> torch.Tensor:
            return net(coefficients)

    runners = {which: _make_step(ctx, which, build(), loss_of, rank) for which in VARIANTS}
    for run_step in runners.values():
        for _ in range(WARMUP + 1):  # past the warm-up: every timed step compresses
            run_step()
    chunks: dict[str, list[float]] = {which: [] for which in VARIANTS}
    for _ in range(max(1, steps // CHUNK)):
        for which, run_step in runners.items():
            ctx.comm.barrier()
            start = time.perf_counter()
            for _ in range(CHUNK):
                run_step()
            chunks[which].append((time.perf_counter() - start) / CHUNK * 1e3)
    return {which: statistics.median(values) for which, values in chunks.items()}


def _worker(steps: int, rank: int, batch: int) -> dict[str, dict[str, float]]:
    ctx = commsgd.init()
    mine = {w: _time_workload(ctx, w, steps, rank, batch) for w in ("reduce", "resnet20")}
    with ctx.comm.meter.in_phase("control"):
        everyone = ctx.comm.all_gather_json(mine)
    return {w: {v: max(r[w][v] for r in everyone) for v in VARIANTS} for w in mine}


def run(workers: int = 2, steps: int = 20, rank: int = 2, batch: int = 16) -> dict[str, Any]:
    """Milliseconds per step per workload and variant (slowest worker), and ours / hook ratios."""
    times = run_distributed(_worker, workers, steps, rank, batch, timeout=1200)[0]
    ratios = {w: t["commsgd powersgd"] / t["torch powerSGD_hook"] for w, t in times.items()}
    return {
        "workers": workers,
        "steps": steps,
        "rank": rank,
        "batch": batch,
        "ms_per_step": times,
        "ours_over_hook": ratios,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"PowerSGD rank {result['rank']}, {result['workers']} gloo workers, ResNet20 "
        f"(batch {result['batch']} per worker), ms per step (median of chunk means, slowest worker):",
        "",
        "| workload | " + " | ".join(VARIANTS) + " | powersgd / hook |",
        "| --- |" + " ---: |" * (len(VARIANTS) + 1),
    ]
    for workload, times in result["ms_per_step"].items():
        cells = " | ".join(f"{times[v]:.2f}" for v in VARIANTS)
        lines.append(f"| {workload} | {cells} | {result['ours_over_hook'][workload]:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    print(table(run(args.workers, args.steps, args.rank, args.batch)))


if __name__ == "__main__":
    main()

"""overhead: commsgd `allreduce` vs PyTorch DDP (time per step), and the communication layer's own cost.

Two workers (gloo, one thread each) train the same model from the same weights on the same batch,
alternating timed blocks of commsgd and DDP steps so that drift in the machine's load hits both.
The layer's bookkeeping (byte counting, timing, Pending objects) is timed with torch.distributed's
all_reduce replaced by a no-op inside `commsgd.comm`, so only the layer itself is measured; as a
cross-check, `comm.all_reduce` is also timed against a bare `dist.all_reduce` on the real backend.
"""

from __future__ import annotations

import argparse
import statistics
import time
import types
from collections.abc import Callable
from typing import Any

from commsgd.bench.common import BenchEnv, write_result
from commsgd.report import md_table

TITLE = "allreduce vs PyTorch DDP time per step; the communication layer's own overhead"

#: (model, input shape): mlp on digits-shaped input, resnet20 on CIFAR-shaped input
MODELS = {"mlp": (1, 8, 8), "resnet20": (3, 32, 32)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="default: both (quick: mlp)")
    parser.add_argument("--workers", type=int, default=2)


def interleaved(fns: dict[str, Callable[[], object]], count: int) -> dict[str, list[float]]:
    """Seconds of each call, the functions taking turns call by call (the order flipping every round),
    so that load from other processes, which drifts, hits every function alike."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(count):
        for name in names if i % 2 == 0 else reversed(names):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def guard_seconds(opt: Any, calls: int = 400) -> float | None:
    """Seconds per step of CommOptimizer's non-finite guard: `all_finite` over the gradients, twice a step
    (before and after communication); None if this version of the API has no such guard."""
    import commsgd.api as api

    check = getattr(api, "all_finite", None)
    if check is None:
        return None
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    start = time.perf_counter()
    for _ in range(calls):
        check(grads)
    return 2 * (time.perf_counter() - start) / calls


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _DoneWork:
    def wait(self) -> bool:
        return True


def bookkeeping_seconds(comm: Any, numel: int, calls: int) -> dict[str, float]:
    """Seconds per call that `comm.all_reduce` adds around a no-op op (sync and async forms)."""
    import torch

    import commsgd.comm as comm_module

    tensor = torch.zeros(numel)
    stub = types.SimpleNamespace(all_reduce=lambda *a, **k: _DoneWork(), barrier=lambda *a, **k: None)
    real = comm_module.dist
    comm_module.dist = stub  # type: ignore[assignment]
    try:
        result = {}
        with comm.meter.in_phase("bench"):
            for name, call, bare in (
                ("sync", lambda: comm.all_reduce(tensor, op="avg"), lambda: stub.all_reduce(tensor)),
                (
                    "async",
                    lambda: comm.all_reduce(tensor, op="avg", async_op=True).wait(),
                    lambda: stub.all_reduce(tensor, async_op=True).wait(),
                ),
            ):
                samples = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        call()
                    t1 = time.perf_counter()
                    for _ in range(calls):
                        bare()
                    t2 = time.perf_counter()
                    samples.append(((t1 - t0) - (t2 - t1)) / calls)
                result[name] = statistics.median(samples)
    finally:
        comm_module.dist = real
    return result


def _worker(model_name: str, steps: int, calls: int) -> dict[str, Any]:
    """On every worker: time commsgd allreduce and DDP steps, then the layer's bookkeeping."""
    import copy

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    import commsgd
    from commsgd.tasks import DatasetSpec, build_model

    ctx = commsgd.init()
    torch.manual_seed(0)
    shape = MODELS[model_name]
    model = build_model(model_name, DatasetSpec("bench", "image", shape, 10))
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1 + ctx.rank)
    x, y = torch.randn((32, *shape), generator=gen), torch.randint(0, 10, (32,), generator=gen)

    opt = commsgd.CommOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
        commsgd.build_algorithm("allreduce"),
        model,
        ctx,
    )
    ddp = DistributedDataParallel(reference, bucket_cap_mb=25)
    ddp_opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)

    def commsgd_step() -> None:
        opt.step(lambda: F.cross_entropy(model(x), y))

    def ddp_step() -> None:
        ddp_opt.zero_grad(set_to_none=False)
        F.cross_entropy(ddp(x), y).backward()
        ddp_opt.step()

    for _ in range(3):
        commsgd_step()
        ddp_step()
    dist.barrier()  # raw torch.distributed here: this benchmark compares against it
    calls_before = ctx.comm.meter.totals().calls
    times = interleaved({"commsgd": commsgd_step, "ddp": ddp_step}, steps)
    calls_per_step = (ctx.comm.meter.totals().calls - calls_before) / steps
    numel = sum(p.numel() for p in model.parameters())
    keeping = bookkeeping_seconds(ctx.comm, numel, calls)
    # Cross-check on the real backend: comm.all_reduce vs a bare dist.all_reduce of the same buffer.
    flat = torch.zeros(numel)
    real = interleaved(
        {"comm": lambda: ctx.comm.all_reduce(flat), "dist": lambda: dist.all_reduce(flat)}, calls // 4
    )
    guard = guard_seconds(opt)
    return {
        "model": model_name,
        "parameters": numel,
        "commsgd_s": statistics.median(times["commsgd"]),
        "ddp_s": statistics.median(times["ddp"]),
        "ratio": statistics.median(times["commsgd"]) / statistics.median(times["ddp"]),
        "ratio_p25": quantile(times["commsgd"], 0.25) / quantile(times["ddp"], 0.25),
        "calls_per_step": calls_per_step,
        "bookkeeping_s": keeping,
        "real_comm_call_s": statistics.median(real["comm"]),
        "real_dist_call_s": statistics.median(real["dist"]),
        "guard_s": guard,
    }


def run(env: BenchEnv, args: argparse.Namespace) -> str:
    from commsgd.testing import run_distributed

    start = time.perf_counter()
    models = args.models or (["mlp"] if env.quick else list(MODELS))
    results = []
    for name in models:
        heavy = name == "resnet20"
        steps, calls = (6, 200) if env.quick else ((40, 2000) if heavy else (600, 2000))
        env.log(f"overhead: {name}: {steps} steps per method, taking turns, on {args.workers} workers")
        per_rank = run_distributed(_worker, args.workers, name, steps, calls, timeout=900)
        results.append(max(per_rank, key=lambda r: r["commsgd_s"]))  # the slower rank sets the pace
    rows, shares = [], []
    for r in results:
        share = r["bookkeeping_s"]["async"] * max(r["calls_per_step"], 1) / r["commsgd_s"]
        shares.append(share)
        rows.append(
            [
                r["model"],
                f"{r['parameters']:,}",
                f"{1e3 * r['commsgd_s']:.2f} ms",
                f"{1e3 * r['ddp_s']:.2f} ms",
                f"{r['ratio']:.3f} ({r['ratio_p25']:.3f})",
                f"{r['calls_per_step']:.1f}",
                f"{1e6 * r['bookkeeping_s']['sync']:.1f} / {1e6 * r['bookkeeping_s']['async']:.1f} µs",
                f"{100 * share:.3f} %",
                f"{1e6 * r['real_comm_call_s']:.0f} / {1e6 * r['real_dist_call_s']:.0f} µs",
                "—" if r.get("guard_s") is None else f"{1e3 * r['guard_s']:.3f} ms",
                "—" if r.get("guard_s") is None else f"{(r['commsgd_s'] - r['guard_s']) / r['ddp_s']:.3f}",
            ]
        )
    headers = [
        "model",
        "parameters",
        "commsgd allreduce / step",
        "DDP / step",
        "ratio (target ≤ 1.05): of medians (of 25th percentiles)",
        "all-reduce calls / step",
        "layer bookkeeping per call (sync / async)",
        "bookkeeping share of a step (target < 1 %)",
        "comm.all_reduce / bare dist.all_reduce (real, one call)",
        "of a commsgd step: CommOptimizer's non-finite guard",
        "ratio without the guard (derived)",
    ]
    body = "\n".join(
        [
            f"{args.workers} workers, gloo, batch 32 per worker, SGD with momentum. commsgd and DDP steps "
            "take turns step by step (so load from other processes, which drifts, hits both alike); time "
            "per step is the median of each, the ratio that of the medians (in parentheses: of the 25th "
            "percentiles). mlp: digits-shaped input (1x8x8); resnet20: CIFAR-shaped input (3x32x32), "
            "random data.",
            "",
            md_table(headers, rows),
            "",
            "Bookkeeping: the time `comm.all_reduce` adds around torch.distributed's op, measured with the "
            "op replaced by a no-op (byte counting, timing, the network-model check, the Pending object); "
            "share = bookkeeping per call x calls per step / commsgd step time. The last column times the "
            "real op of one bucket of the model's size through the layer and bare (medians, calls taking "
            "turns): a cross-check whose difference is within the noise of one call. The last column times "
            "`commsgd.api.all_finite` over the gradients twice (what `CommOptimizer.step` does each step "
            "to catch NaN/Inf before and after communication): part of commsgd's step that DDP does not do.",
        ]
    )
    data = {"results": results}
    write_result(
        env, "overhead", "Overhead: commsgd allreduce vs PyTorch DDP", body, data, time.perf_counter() - start
    )
    ratios = ", ".join(f"{r['model']} {r['ratio']:.3f}" for r in results)
    return f"time/step vs DDP: {ratios}; bookkeeping ≤ {100 * max(shares):.3f} % of a step"

"""powersgd: commsgd's `powersgd` vs PyTorch DDP with its PowerSGD communication hook.

Both train the same initial model on the same per-worker batches with the same torch SGD settings,
the same rank, warm-up and minimum compression rate, with error feedback and warm start. The dense
warm-up steps run first and untimed; then the compressed steps run in alternating timed chunks
(`schedule`). Reported: time per compressed step, the spread of the per-chunk time ratio (how stable
it is), bytes per compressed step and per warm-up step apart, and test error after the same steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from commsgd.bench.common import BenchEnv, param_fields, registered, write_result
from commsgd.errors import ConfigError, WorkerError
from commsgd.report import md_table, pct

TITLE = "commsgd PowerSGD vs PyTorch's PowerSGD DDP hook: time per step, accuracy after equal steps"

#: dense all-reduce steps before compression starts, on both sides (untimed; their bytes kept apart)
WARMUP_STEPS = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rank", type=int, default=2, help="approximation rank (default 2)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--steps", type=int, help="timed compressed mlp/digits steps after warm-up (default 300; quick: 10)"
    )
    parser.add_argument(
        "--cluster",
        type=float,
        metavar="GBPS",
        help="run on the emulated cluster, one node per worker, links shaped to GBPS Gbit/s (root)",
    )


def schedule(warmup: int, steps: int, chunk: int) -> tuple[range, list[tuple[range, bool]]]:
    """The untimed warm-up steps, then the timed compressed steps in chunks of `chunk`, each with
    whether commsgd runs the chunk first (alternating, so neither side always goes first)."""
    end = warmup + steps
    timed = [range(first, min(first + chunk, end)) for first in range(warmup, end, chunk)]
    return range(warmup), [(part, i % 2 == 0) for i, part in enumerate(timed)]


def chunk_ratios(per_rank: list[dict[str, Any]]) -> list[float]:
    """commsgd / torch time of each timed chunk, from the slowest rank's time of each."""
    ours = [max(times) for times in zip(*(r["commsgd_chunks_s"] for r in per_rank))]
    theirs = [max(times) for times in zip(*(r["torch_chunks_s"] for r in per_rank))]
    return [a / b for a, b in zip(ours, theirs) if b > 0]


def _evaluate(model: Any, dataset: Any) -> float:
    import torch

    from commsgd.tasks import loss_and_errors

    model.eval()
    errors = count = 0
    with torch.no_grad():
        for x, y in dataset.test_batches(256):
            errors += int(loss_and_errors(model(x), y)[1])
            count += y.numel()
    model.train()
    return errors / max(count, 1)


def _worker(
    model_name: str, steps: int, chunk: int, params: dict[str, Any], torch_opts: dict[str, Any]
) -> dict:
    """On every worker: train commsgd powersgd and DDP+powerSGD_hook side by side, timing chunks."""
    import copy

    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as hook
    from torch.nn.parallel import DistributedDataParallel

    import commsgd
    from commsgd.config import OptimConfig
    from commsgd.tasks import DatasetSpec, build_model, load_dataset, loss_and_errors
    from commsgd.train import ShardedBatches

    ctx = commsgd.init()
    real_data = model_name == "mlp"
    dataset = load_dataset("digits", None, model=model_name, seed=0) if real_data else None
    spec = dataset.spec if dataset is not None else DatasetSpec("cifar-shaped", "image", (3, 32, 32), 10)
    torch.manual_seed(0)
    model = build_model(model_name, spec)
    reference = copy.deepcopy(model)
    algo = commsgd.build_algorithm("powersgd", params)
    optim = OptimConfig()
    settings: dict[str, Any] = {
        "lr": optim.lr,
        "momentum": optim.momentum,
        "weight_decay": optim.weight_decay,
    }
    opt = commsgd.CommOptimizer(
        torch.optim.SGD(model.parameters(), **{**settings, **algo.optimizer_overrides(optim)}),
        algo,
        model,
        ctx,
    )
    ddp = DistributedDataParallel(reference, bucket_cap_mb=25)
    state = hook.PowerSGDState(process_group=None, **torch_opts)
    ddp.register_comm_hook(state, hook.powerSGD_hook)
    ddp_opt = torch.optim.SGD(ddp.parameters(), **settings)

    if dataset is not None:
        batches = ShardedBatches(len(dataset.train_y), 32, ctx.rank, ctx.world_size, seed=0)
        gen = torch.Generator().manual_seed(ctx.rank)

        def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            epoch, index = divmod(i, batches.per_epoch)
            return dataset.train_batch(batches.batch(epoch, index), gen)
    else:
        gen = torch.Generator().manual_seed(ctx.rank)
        fixed = (torch.randn(32, 3, 32, 32, generator=gen), torch.randint(0, 10, (32,), generator=gen))

        def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return fixed

    def commsgd_step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.step(lambda: loss_and_errors(model(x), y)[0])

    def ddp_step(x: torch.Tensor, y: torch.Tensor) -> None:
        ddp_opt.zero_grad(set_to_none=False)
        loss_and_errors(ddp(x), y)[0].backward()
        ddp_opt.step()

    warmup, chunks = schedule(WARMUP_STEPS, steps, chunk)
    for i in warmup:  # dense all-reduce steps on both sides: untimed, their bytes counted apart
        commsgd_step(*batch(i))
        ddp_step(*batch(i))
    warmup_bytes = ctx.comm.meter.totals().bytes_sent
    spent: dict[str, list[float]] = {"commsgd": [], "torch": []}
    for part, commsgd_first in chunks:
        data = [batch(i) for i in part]
        order = [("commsgd", commsgd_step), ("torch", ddp_step)]
        for name, fn in order if commsgd_first else reversed(order):
            dist.barrier()  # raw torch.distributed: outside the timed region, for both methods alike
            start = time.perf_counter()
            for x, y in data:
                fn(x, y)
            spent[name].append(time.perf_counter() - start)
    result: dict[str, Any] = {
        "model": model_name,
        "steps": steps,
        "warmup_steps": len(warmup),
        "commsgd_s": sum(spent["commsgd"]) / steps,
        "torch_s": sum(spent["torch"]) / steps,
        "commsgd_chunks_s": spent["commsgd"],
        "torch_chunks_s": spent["torch"],
        "commsgd_bytes_per_step": (ctx.comm.meter.totals().bytes_sent - warmup_bytes) / steps,
        "commsgd_bytes_per_warmup_step": warmup_bytes / max(len(warmup), 1),
    }
    if dataset is not None and ctx.rank == 0:
        with opt.evaluated_parameters():
            result["commsgd_error"] = _evaluate(model, dataset)
        result["torch_error"] = _evaluate(reference, dataset)
    return result


def _on_cluster(env: BenchEnv, workers: int, gbps: float, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """`_worker` on the emulated cluster, one node per worker (`python -m commsgd.bench.powersgd` under
    each node's torchrun); every rank's result, read from the files the ranks write."""
    from commsgd.bench.cluster import bench_cluster

    out = env.runs_dir("powersgd") / f"{spec['model_name']}-cluster-{gbps:g}gbps"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with bench_cluster(env, "powersgd", workers, 1, gbps, log_dir=out) as c:
        code, _ = c.run_train(out / "job", [str(out), json.dumps(spec)], 900, module="commsgd.bench.powersgd")
    found = [out / f"rank{r}.json" for r in range(workers)]
    if code != 0 or not all(f.is_file() for f in found):
        raise WorkerError(f"bench powersgd: the cluster job failed (exit {code}); see {out}/job.node*.log")
    return [json.loads(f.read_text(encoding="utf-8")) for f in found]


def cluster_worker(argv: list[str]) -> int:
    """`python -m commsgd.bench.powersgd OUT SPEC_JSON` in a torchrun worker: `_worker(**spec)` on one
    torch thread (the node's one core), its result written to OUT/rank<r>.json."""
    import torch

    from commsgd.metrics import write_json_atomic

    torch.set_num_threads(1)
    result = _worker(**json.loads(argv[1]))
    write_json_atomic(Path(argv[0]) / f"rank{os.environ['RANK']}.json", result)
    return 0


def spread(ratios: list[float]) -> str:
    """'min-max' of the per-chunk ratios ('—' without any)."""
    return f"{min(ratios):.3f}-{max(ratios):.3f}" if ratios else "—"


def run(env: BenchEnv, args: argparse.Namespace) -> str:
    from commsgd.testing import run_distributed

    start = time.perf_counter()
    if "powersgd" not in registered():
        body = "Not available yet: the `powersgd` algorithm is not registered in this checkout."
        env.note("powersgd: algorithm not registered yet; skipped")
        write_result(env, "powersgd", "PowerSGD: commsgd vs PyTorch hook", body, {"available": False})
        return "not available yet (powersgd not registered)"
    defaults = param_fields("powersgd")
    params: dict[str, Any] = {}
    if "rank" in defaults:
        params["rank"] = args.rank
    if "warmup_steps" in defaults:
        params["warmup_steps"] = WARMUP_STEPS
    if "min_compression_rate" in defaults:
        params["min_compression_rate"] = 2.0
    torch_opts = {
        "matrix_approximation_rank": args.rank,
        "start_powerSGD_iter": WARMUP_STEPS,
        "min_compression_rate": 2,
        "use_error_feedback": True,
        "warm_start": True,
        "random_seed": 0,
    }
    plan = [("mlp", args.steps or (10 if env.quick else 300), 5 if env.quick else 25)]
    if not env.quick:
        plan.append(("resnet20", 40, 5))
    gbps = getattr(args, "cluster", None)  # link rate of the emulated cluster; None: this machine
    if gbps is not None and gbps <= 0:
        raise ConfigError(f"bench powersgd --cluster: the link rate must be positive, got {gbps:g}")
    results = []
    for model_name, steps, chunk in plan:
        env.log(f"powersgd: {model_name}: {steps} steps each on {args.workers} workers")
        spec = {
            "model_name": model_name,
            "steps": steps,
            "chunk": chunk,
            "params": params,
            "torch_opts": torch_opts,
        }
        if gbps is not None:
            per_rank = _on_cluster(env, args.workers, gbps, spec)
        else:
            per_rank = run_distributed(_worker, args.workers, *spec.values(), timeout=900)
        merged = dict(per_rank[0])
        merged["commsgd_s"] = max(r["commsgd_s"] for r in per_rank)
        merged["torch_s"] = max(r["torch_s"] for r in per_rank)
        merged["chunk_ratios"] = chunk_ratios(per_rank)
        results.append(merged)
    rows = [
        [
            f"{r['model']} ({'digits' if r['model'] == 'mlp' else 'random CIFAR-shaped data: time only'})",
            r["steps"],
            f"{1e3 * r['commsgd_s']:.2f} ms",
            f"{1e3 * r['torch_s']:.2f} ms",
            f"{r['commsgd_s'] / r['torch_s']:.3f}",
            spread(r["chunk_ratios"]),
            pct(r.get("commsgd_error")),
            pct(r.get("torch_error")),
            f"{r['commsgd_bytes_per_step'] / 1e3:.1f} KB",
            f"{r['commsgd_bytes_per_warmup_step'] / 1e3:.1f} KB",
        ]
        for r in results
    ]
    headers = [
        "model",
        "steps",
        "commsgd powersgd / step",
        "torch DDP + powerSGD_hook / step",
        "time ratio",
        "ratio per chunk (min-max)",
        "commsgd test error",
        "torch test error",
        "commsgd bytes / compressed step",
        "commsgd bytes / warm-up step",
    ]
    where = (
        f"on the emulated cluster, one node per worker, links of {gbps:g} Gbit/s"
        if gbps is not None
        else "on this machine, loopback"
    )
    body = "\n".join(
        [
            f"{args.workers} workers ({where}), gloo, batch 32 per worker, rank {args.rank}, "
            f"{WARMUP_STEPS} warm-up "
            "all-reduce steps (untimed, run first; their bytes in the last column), minimum compression "
            "rate 2, error feedback and warm start on both; 'steps' are the timed compressed steps "
            "after warm-up, in alternating chunks; torch SGD lr 0.05, momentum 0.9, weight decay 1e-4 on "
            "both. Bytes are per worker. commsgd params: " + ", ".join(f"{k}={v}" for k, v in params.items()),
            "",
            md_table(headers, rows),
        ]
    )
    write_result(
        env,
        "powersgd",
        "PowerSGD: commsgd vs PyTorch hook",
        body,
        {"results": results},
        time.perf_counter() - start,
    )
    r = results[0]
    return (
        f"{r['model']}: {1e3 * r['commsgd_s']:.2f} vs {1e3 * r['torch_s']:.2f} ms/step, error "
        f"{pct(r.get('commsgd_error'))} vs {pct(r.get('torch_error'))}"
    )


if __name__ == "__main__":
    sys.exit(cluster_worker(sys.argv[1:]))

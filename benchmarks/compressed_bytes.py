"""Gradient bytes per step and worker of each compressed algorithm against all-reduce, measured.

    python benchmarks/compressed_bytes.py [--workers 2] [--models mlp resnet20] [--out FILE.md]

Each algorithm is bound to the model on real gloo workers and reduces random gradients for a few steps;
the bytes are what the communicator counted (its bandwidth-optimal byte model), not an estimate.
Prints a Markdown table: the busiest worker's bytes per step (the larger of what it sent and what it
received: the server of `dist_ef_sgd server=single` receives every message), and all-reduce's bytes
divided by the algorithm's.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import commsgd
from commsgd.tasks import build_model
from commsgd.tasks.dataset import DatasetSpec
from commsgd.testing import run_distributed

SPECS = {
    "mlp": DatasetSpec("digits", "image", (1, 8, 8), 10),
    "resnet20": DatasetSpec("cifar10", "image", (3, 32, 32), 10),
}
ALGORITHMS: list[tuple[str, str, dict[str, Any]]] = [
    ("allreduce", "allreduce", {"overlap": False}),
    ("powersgd r=1", "powersgd", {"rank": 1}),
    ("powersgd r=2", "powersgd", {"rank": 2}),
    ("powersgd r=4", "powersgd", {"rank": 4}),
    ("ef_sgd block_sign", "ef_sgd", {"compressor": "block_sign"}),
    ("dist_ef_sgd block_sign", "dist_ef_sgd", {"compressor": "block_sign"}),
    ("dist_ef_sgd block_sign single", "dist_ef_sgd", {"compressor": "block_sign", "server": "single"}),
    ("ef_sgd scaled_sign", "ef_sgd", {}),
    ("signum", "signum", {}),
    ("topk (1%)", "topk", {}),
    ("randomk (10%)", "randomk", {}),
    ("qsgd (int8)", "qsgd", {}),
    ("fp16", "fp16", {}),
]
STEPS = 3


def _measure(models: Sequence[str]) -> dict[str, dict[str, tuple[float, float]]]:
    ctx = commsgd.init()
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for model_name in models:
        out[model_name] = {}
        for label, name, params in ALGORITHMS:
            torch.manual_seed(0)
            model = build_model(model_name, SPECS[model_name])
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            algo = commsgd.build_algorithm(name, params)
            algo.bind(ctx, model, optimizer)
            gen = torch.Generator().manual_seed(ctx.rank)
            before = ctx.comm.meter.totals()
            sent, recv = before.bytes_sent, before.bytes_recv
            for step in range(1, STEPS + 1):
                for p in model.parameters():
                    p.grad = torch.randn(p.shape, generator=gen)
                algo.after_backward(step)
            after = ctx.comm.meter.totals()
            out[model_name][label] = ((after.bytes_sent - sent) / STEPS, (after.bytes_recv - recv) / STEPS)
    return out


def table(results: dict[str, dict[str, float]], workers: int) -> str:
    lines = [
        f"Gradient bytes per step of the busiest worker (max of sent and received), {workers} workers,",
        "measured by the communicator.",
        "",
        "| model | algorithm | bytes/step | all-reduce / algorithm |",
        "| --- | --- | ---: | ---: |",
    ]
    for model_name, rows in results.items():
        dense = rows["allreduce"]
        for label, sent in rows.items():
            lines.append(f"| {model_name} | {label} | {sent:,.0f} | {dense / sent:.1f}x |")
    return "\n".join(lines)


def run(workers: int = 2, models: Sequence[str] = ("mlp", "resnet20")) -> dict[str, dict[str, float]]:
    """The busiest worker's bytes per step, per model and algorithm, on `workers` gloo workers."""
    ranks = run_distributed(_measure, workers, list(models), timeout=600)
    return {
        model: {label: max(max(r[model][label]) for r in ranks) for label in ranks[0][model]}
        for model in ranks[0]
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["mlp", "resnet20"], choices=sorted(SPECS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    text = table(run(args.workers, args.models), args.workers)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

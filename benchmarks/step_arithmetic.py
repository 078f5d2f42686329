"""The compressing algorithms' own arithmetic per step, on one worker with nothing on the wire.

    python benchmarks/step_arithmetic.py [--numel N] [--steps S] [--threads 1]

Binds each algorithm to a one-worker context (its collectives are local copies) on one linear layer of
about `--numel` parameters (default 15M, VGG16 on CIFAR), fills the gradient and times `after_backward`,
which is what the algorithm adds to a training step besides the bytes on the wire: compression, error
feedback, decoding, momentum. Freed host memory is kept as the workers keep it (`cluster.reuse_memory`).
Medians over the steps after the first four (the buffers that alternate exist by then). Prints a Markdown
table.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn

from commsgd.algorithms import build_algorithm
from commsgd.hostmemory import keep_freed_memory
from commsgd.testing import SoloContext

ALGORITHMS: list[tuple[str, dict[str, object]]] = [
    ("ef_sgd", {}),
    ("qsgd", {}),
    ("topk", {}),
    ("signum", {}),
    ("dist_ef_sgd", {}),
]
WARMUP = 4


def step_times(name: str, params: dict[str, object], model: nn.Module, steps: int) -> list[float]:
    """Seconds of each `after_backward` after the warm-up, with the same gradient every step."""
    algo = build_algorithm(name, params)
    algo.bind(SoloContext(), model, torch.optim.SGD(model.parameters(), lr=0.1))  # type: ignore[arg-type]
    gradient = [torch.randn(p.shape) for p in model.parameters()]
    times = []
    for step in range(1, steps + 1):
        for p, g in zip(model.parameters(), gradient):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(g)
        start = time.perf_counter()
        algo.after_backward(step)
        times.append(time.perf_counter() - start)
    for p in model.parameters():
        p.grad = None
    return times[WARMUP:]


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--numel", type=int, default=15_000_000, help="parameters (15M)")
    parser.add_argument("--steps", type=int, default=12, help="steps per algorithm, 4 of them warm-up (12)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    args = parser.parse_args()
    if args.numel < 1 or args.steps <= WARMUP or args.threads < 1:
        parser.error(f"--numel and --threads must be >= 1 and --steps > {WARMUP}")
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    side = math.isqrt(args.numel)
    model = nn.Linear(side, side)
    numel = sum(p.numel() for p in model.parameters())
    print(f"{numel:,} parameters, {args.threads} thread(s), {args.steps - WARMUP} timed steps each\n")
    print("| algorithm | ms per step (median) | fastest |\n|---|---|---|")
    for name, params in ALGORITHMS:
        times = step_times(name, params, model, args.steps)
        print(f"| {name} | {1e3 * statistics.median(times):.1f} | {1e3 * min(times):.1f} |")


if __name__ == "__main__":
    main()

"""A compressing algorithm's step allocates no tensor the size of the model once it is warm: every
vector-sized temporary (the corrected gradient, the decoded messages, the next momentum and errors)
lives in buffers kept from step to step. A fresh 60 MB tensor costs page faults worth about five
passes over it (VGG16 on CIFAR), so this is where a step's time goes when it is not kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from commsgd.algorithms import build_algorithm
from commsgd.testing import SoloContext


def _largest_allocation(run: object) -> int:
    """Bytes of the largest single allocation any torch op makes while `run()` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()  # type: ignore[operator]
    return max((e.self_cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("ef_sgd", {}),  # scaled sign with error feedback
        ("ef_sgd", {"compressor": "block_sign", "block_size": 64}),
        ("qsgd", {}),
        ("qsgd", {"error_feedback": True}),
        ("randomk", {}),
        ("fp16", {}),
        ("signum", {}),
        ("dist_ef_sgd", {}),
        ("dist_ef_sgd", {"server": "single"}),
        ("dist_ef_sgd", {"compressor": "qsgd", "nesterov": False}),
        ("dist_ef_sgd", {"error_feedback": False}),
    ],
)
def test_a_warm_step_allocates_nothing_the_size_of_the_model(name: str, params: dict[str, object]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1000, 600), nn.Tanh(), nn.Linear(600, 10))  # > 2 chunks of 2^18
    numel = sum(p.numel() for p in model.parameters())
    algo = build_algorithm(name, params)
    algo.bind(SoloContext(), model, torch.optim.SGD(model.parameters(), lr=0.1))  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(1)

    gradients = [[torch.randn(p.shape, generator=generator) for p in model.parameters()] for _ in range(4)]

    def step(number: int) -> None:
        for p, g in zip(model.parameters(), gradients[number - 1]):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(g)
        algo.after_backward(number)

    for number in (1, 2, 3):  # the buffers that alternate are both made by now
        step(number)
    largest = _largest_allocation(lambda: step(4))
    assert largest < 4 * numel, f"{name}: a warm step allocated {largest} bytes (the model is {4 * numel})"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())  # type: ignore[arg-type]

"""`bench paper`'s arithmetic: the FLOP count, the matched link rate, evaluation spacing."""

from __future__ import annotations

import pytest
import torch

from commsgd.bench.paper import MatchedLink, eval_every, forward_flops, method_overrides


def test_forward_flops_counts_convolutions_and_linear_layers() -> None:
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),  # 8x8 outputs of 8 channels, 3*3*3 multiply-adds each
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 10),
    )
    assert forward_flops(net, (3, 8, 8)) == 2 * (8 * 8 * 8 * 27 + 512 * 10)


def test_the_matched_link_gives_the_cpu_step_the_gpu_steps_communication_share() -> None:
    link = MatchedLink(flops_per_sample=1e8, batch=32, gpu_tflops=4.8, cpu_step_s=0.2, allreduce_bytes=4e6)
    assert link.gpu_step_s == pytest.approx(3 * 1e8 * 32 / 4.8e12)
    gpu_comm = 4e6 * 8 / 1e9
    cpu_comm = 4e6 * 8 / (link.gbps * 1e9)
    assert cpu_comm / (cpu_comm + 0.2) == pytest.approx(gpu_comm / (gpu_comm + link.gpu_step_s))
    assert link.gpu_share == pytest.approx(gpu_comm / (gpu_comm + link.gpu_step_s))
    assert "Mbit/s" in link.reasoning("cnn7")


def test_evaluations_are_spaced_over_the_budget() -> None:
    assert eval_every(120.0, 0.25, 10**6) == 480 // 6
    assert eval_every(None, 0.25, 600) == 100
    assert eval_every(1.0, 10.0, 10**6) == 1  # slower steps than the budget: still at least one


def test_method_overrides_are_the_papers() -> None:
    assert method_overrides("cnn7", "lsgd", 120.0) == [
        "optim.lr=0.05",
        "algo.tau=64",
        "algo.tau_global=128",
        "algo.pull=0.1",
    ]
    resnet = method_overrides("resnet20", "easgd", 100.0)
    assert "optim.drop_seconds=[60]" in resnet and "algo.beta=0.43" in resnet
    assert method_overrides("mlp", "lsgd", None) == []

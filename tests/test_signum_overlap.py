"""signum with `overlap`: each bucket's momentum updated and its signs sent while backward runs.

On simulated workers with real backward passes: the signs leave during backward, the buckets give
bitwise the model and momentum of the one-vector path (a sign and a momentum are per element), a NaN
gradient on one worker makes every worker skip the step with its momentum as it was, and a checkpoint
resumes only into the same layout. (Gradient accumulation on gloo: tests/test_accumulation.py; resume:
tests/test_compressed_dist.py.)
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import commsgd
from commsgd.simworld import run_simulated
from commsgd.testing import load_refusals

STEPS = 5
BUCKETS = {"overlap": True, "bucket_mb": 0.0003}  # the model's 908 bytes in several buckets


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def _train(ctx: Any, params: dict[str, Any], nan_at: int | None = None) -> dict[str, Any]:
    """STEPS steps; `nan_at`: rank 1's gradient (not its loss) is NaN at that step."""
    model = _model()
    algo = commsgd.build_algorithm("signum", params)
    opt = commsgd.CommOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), algo, model, ctx)
    out: dict[str, Any] = {"params": [_flat(model)], "momentum": [algo.momentum().clone()], "backward": []}
    for step in range(1, STEPS + 1):
        g = torch.Generator().manual_seed(100 * step + ctx.rank)
        x, y = torch.randn(8, 10, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        hidden = model[1](model[0](x))
        if nan_at == step and ctx.rank == 1:
            hidden.register_hook(lambda grad: grad * math.nan)
        loss = F.cross_entropy(model[2](hidden), y)
        before = ctx.comm.meter.totals().bytes_sent
        loss.backward()
        out["backward"].append(ctx.comm.meter.totals().bytes_sent - before)
        opt.step(loss)
        out["params"].append(_flat(model))
        out["momentum"].append(algo.momentum().clone())
    out["bad_steps"] = opt.bad_steps
    out["buckets"] = len(algo._lanes)  # type: ignore[attr-defined]
    return out


def _everything() -> dict[str, Any]:
    ctx = commsgd.init()
    out = {
        "flat": _train(ctx, {}),
        "buckets": _train(ctx, BUCKETS),
        "buckets_nan": _train(ctx, BUCKETS, nan_at=3),
    }
    made = []
    for params in ({}, BUCKETS):
        model = _model()
        algo = commsgd.build_algorithm("signum", params)
        commsgd.CommOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), algo, model, ctx)
        made.append(algo)
    out["refused"] = load_refusals([(made[0], made[1]), (made[1], made[0])])
    return out


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return run_simulated(_everything, 2)


def test_buckets_give_bitwise_the_one_vector_model_and_leave_during_backward(
    results: list[dict[str, Any]],
) -> None:
    for rank in results:
        flat, bucketed = rank["flat"], rank["buckets"]
        assert bucketed["buckets"] >= 2 and flat["buckets"] == 1
        assert flat["backward"] == [0] * STEPS and all(sent > 0 for sent in bucketed["backward"])
        assert not torch.equal(flat["params"][-1], flat["params"][0])  # it trained
        for step in range(STEPS + 1):
            assert torch.equal(bucketed["params"][step], flat["params"][step]), step
            assert torch.equal(bucketed["momentum"][step], flat["momentum"][step]), step


def test_a_nan_gradient_sent_in_backward_skips_the_step_everywhere(results: list[dict[str, Any]]) -> None:
    for rank in results:
        run = rank["buckets_nan"]
        assert run["bad_steps"] == 1
        assert torch.equal(run["params"][3], run["params"][2])  # step 3 skipped: the model did not move
        assert torch.equal(run["momentum"][3], run["momentum"][2])  # nor the momentum
        assert not torch.equal(run["params"][4], run["params"][3])  # the steps after it go on
        assert torch.isfinite(run["momentum"][-1]).all()
    assert torch.equal(results[0]["buckets_nan"]["params"][-1], results[1]["buckets_nan"]["params"][-1])


def test_a_checkpoint_resumes_only_into_the_same_layout(results: list[dict[str, Any]]) -> None:
    into_buckets, into_flat = results[0]["refused"]
    assert "signum: the checkpoint was made without algo.overlap, this run is with it" in into_buckets
    assert "signum: the checkpoint was made with algo.overlap, this run is without it" in into_flat

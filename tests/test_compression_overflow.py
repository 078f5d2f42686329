"""A compression that fails on one worker only (a finite gradient beyond float16's 65504, a rounding
range beyond float32) fails the step on every worker alike: with `nonfinite=skip` all workers skip it
together and go on with identical, finite replicas and unchanged error buffers; with `nonfinite=stop`
all of them stop at that step with the same error. Before the fix that worker raised alone while the
others waited in the collective, and the whole job died."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import commsgd
from commsgd.api import NonFiniteError, all_finite
from commsgd.testing import run_distributed

pytestmark = pytest.mark.multiprocess

WORLD, STEPS, BAD_RANK, BAD_STEP = 3, 5, 1, 3
#: case -> (algorithm, params, value written into one gradient entry of BAD_RANK at BAD_STEP)
CASES: dict[str, tuple[str, dict[str, Any], list[float]]] = {
    "ef_fp16": ("fp16", {}, [1e5]),
    "ef_fp16_feedback": ("ef_sgd", {"compressor": "fp16"}, [1e5]),
    "ef_rounding": ("ef_sgd", {"compressor": "rounding", "bits": 4}, [3e38, -3e38]),
    "dist_fp16_sharded": ("dist_ef_sgd", {"compressor": "fp16", "server": "sharded"}, [1e5]),
    "dist_fp16_single": ("dist_ef_sgd", {"compressor": "fp16", "server": "single"}, [1e5]),
    "dist_rounding": ("dist_ef_sgd", {"compressor": "rounding", "bits": 4}, [3e38, -3e38]),
}


def _state_tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj.clone()] if obj.is_floating_point() else []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _state_tensors(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _state_tensors(v)]
    return []


def _run(ctx: Any, name: str, params: dict[str, Any], values: list[float], policy: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    algo = commsgd.build_algorithm(name, params)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    opt = commsgd.CommOptimizer(optimizer, algo, model, ctx, nonfinite=policy)
    gen = torch.Generator().manual_seed(10 + ctx.rank)
    states, message, printed = {}, None, io.StringIO()
    with contextlib.redirect_stderr(printed):
        try:
            for step in range(1, STEPS + 1):
                x, y = torch.randn(8, 10, generator=gen), torch.randint(0, 3, (8,), generator=gen)
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                if ctx.rank == BAD_RANK and step == BAD_STEP:
                    first = model[0]
                    assert isinstance(first, nn.Linear) and first.weight.grad is not None
                    weight = first.weight.grad
                    for i, value in enumerate(values):
                        weight[0, i] = value  # finite, but beyond what the compressor represents
                states[step] = _state_tensors(algo.state_dict())
                opt.step(loss)
        except NonFiniteError as exc:
            message = (str(exc), exc.job_wide)
    return {
        "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
        "states": states,
        "after": _state_tensors(algo.state_dict()),
        "bad_steps": opt.bad_steps,
        "message": message,
        "stderr": printed.getvalue(),
    }


def _everything(policy: str) -> dict[str, Any]:
    ctx = commsgd.init()
    return {case: _run(ctx, name, params, values, policy) for case, (name, params, values) in CASES.items()}


@pytest.fixture(scope="module")
def skipped() -> list[dict[str, Any]]:
    return run_distributed(_everything, WORLD, "skip")


@pytest.fixture(scope="module")
def stopped() -> list[dict[str, Any]]:
    return run_distributed(_everything, WORLD, "stop")


@pytest.mark.parametrize("case", list(CASES))
def test_skip_every_worker_skips_the_step_together(skipped: list[dict[str, Any]], case: str) -> None:
    for rank, results in enumerate(skipped):
        mine = results[case]
        assert mine["message"] is None, (case, rank)
        assert mine["bad_steps"] == 1, (case, rank)  # the same step, counted on every worker
        assert torch.isfinite(mine["params"]).all(), (case, rank)
        assert all_finite(mine["after"]), (case, rank)
        # the skipped step kept the algorithm's state (error buffers, momentum) as it was
        for before, after in zip(mine["states"][BAD_STEP], mine["states"][BAD_STEP + 1]):
            if before.shape == after.shape and before.numel() > 1:
                torch.testing.assert_close(after, before, rtol=0, atol=0, msg=case)
        torch.testing.assert_close(mine["params"], skipped[0][case]["params"], rtol=0, atol=0, msg=case)
    warning = f"commsgd: warning: rank {BAD_RANK}: "
    assert (
        warning in skipped[BAD_RANK][case]["stderr"]
        and "fails on every worker" in skipped[BAD_RANK][case]["stderr"]
    )


@pytest.mark.parametrize("case", list(CASES))
def test_stop_every_worker_stops_at_that_step(stopped: list[dict[str, Any]], case: str) -> None:
    for rank, results in enumerate(stopped):
        text, job_wide = results[case]["message"]
        assert text == (
            f"rank {rank}: non-finite gradient after communication at step {BAD_STEP}; training stopped "
            "(nonfinite=stop, max_bad_steps=5)"
        )
        assert job_wide

"""ef_sgd with `overlap`: buckets compressed and sent while backward runs (`commsgd.algorithms.lanes`).

On simulated workers with real backward passes: the messages leave during backward (bytes counted
before `step`), fp16 (which treats each element alone) gives bitwise the model of the one-vector path,
a NaN gradient on one worker makes every worker skip the step with its errors put back, and a
checkpoint resumes only into the same layout. Refused in one line: overlap with `k`, with loss-scaled
fp16, inside a DDP hook. (Gradient accumulation and gloo: tests/test_accumulation.py; the error-feedback
invariant, bytes and resume: tests/test_compressed_dist.py.)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import commsgd
from commsgd import cli, launch
from commsgd.errors import ConfigError
from commsgd.simworld import run_simulated
from commsgd.testing import load_refusals

BUCKETS = {"overlap": True, "bucket_mb": 0.0003}  # the model's 908 bytes in two buckets


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(8, 10, generator=g), torch.randint(0, 3, (8,), generator=g)


def _train(ctx: Any, name: str, params: dict[str, Any], nan_at: int | None = None) -> dict[str, Any]:
    """Five steps; `nan_at`: rank 1's gradient (not its loss) is NaN at that step (and no momentum, so
    that a skipped step leaves the model where it was)."""
    model = _model()
    algo = commsgd.build_algorithm(name, params)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9 if nan_at is None else 0.0)
    opt = commsgd.CommOptimizer(sgd, algo, model, ctx)
    during_backward: list[float] = []
    params_at: dict[int, torch.Tensor] = {}  # after k steps
    errors_at: dict[int, torch.Tensor | None] = {}
    for step in range(1, 7):
        params_at[step - 1] = _flat(model)
        error = algo.error()  # type: ignore[attr-defined]
        errors_at[step - 1] = None if error is None else error.clone()
        if step == 6:
            break
        x, y = _batch(ctx.rank, step)
        opt.zero_grad()
        hidden = model[1](model[0](x))
        if nan_at == step and ctx.rank == 1:
            hidden.register_hook(lambda g: g * math.nan)
        loss = F.cross_entropy(model[2](hidden), y)
        before = ctx.comm.meter.totals().bytes_sent
        loss.backward()
        during_backward.append(ctx.comm.meter.totals().bytes_sent - before)
        opt.step(loss)
    return {
        "params": params_at,
        "errors": errors_at,
        "during_backward": during_backward,
        "bad_steps": opt.bad_steps,
        "buckets": len(algo._lanes),  # type: ignore[attr-defined]
    }


CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "fp16": ("fp16", {}),
    "fp16_overlap": ("fp16", BUCKETS),
    "topk_overlap": ("topk", {"ratio": 0.1, **BUCKETS}),
    "sign_overlap_nan": ("ef_sgd", BUCKETS),
}


def _everything() -> dict[str, Any]:
    ctx = commsgd.init()
    out = {
        key: _train(ctx, name, params, 3 if key.endswith("nan") else None)
        for key, (name, params) in CASES.items()
    }
    model = _model()
    flat = commsgd.build_algorithm("topk", {"ratio": 0.1})
    commsgd.CommOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), flat, model, ctx)
    bucketed = commsgd.build_algorithm("topk", {"ratio": 0.1, **BUCKETS})
    commsgd.CommOptimizer(torch.optim.SGD(_model().parameters(), lr=0.1), bucketed, _model(), ctx)
    out["refused"] = load_refusals([(flat, bucketed), (bucketed, flat)])
    return out


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return run_simulated(_everything, 2)


def test_buckets_leave_during_backward(results: list[dict[str, Any]]) -> None:
    for rank in results:
        assert rank["fp16_overlap"]["buckets"] == 2 and rank["fp16"]["buckets"] == 1
        assert all(sent > 0 for sent in rank["fp16_overlap"]["during_backward"])
        assert all(sent > 0 for sent in rank["topk_overlap"]["during_backward"])
        assert rank["fp16"]["during_backward"] == [0] * 5  # the one-vector path sends in step()


def test_fp16_buckets_give_bitwise_the_one_vector_model(results: list[dict[str, Any]]) -> None:
    for rank in results:
        assert not torch.equal(rank["fp16"]["params"][5], rank["fp16"]["params"][0])  # it trained
        for step in range(6):
            assert torch.equal(rank["fp16_overlap"]["params"][step], rank["fp16"]["params"][step]), step
    assert torch.equal(results[0]["topk_overlap"]["params"][5], results[1]["topk_overlap"]["params"][5])


def test_a_nan_gradient_sent_in_backward_skips_the_step_everywhere(
    results: list[dict[str, Any]],
) -> None:
    for rank in results:
        run = rank["sign_overlap_nan"]
        assert run["bad_steps"] == 1
        assert torch.equal(run["params"][3], run["params"][2])  # step 3 skipped: the model did not move
        assert torch.equal(run["errors"][3], run["errors"][2])  # and the errors were put back
        assert not torch.equal(run["params"][4], run["params"][3])  # the steps after it go on
        assert torch.isfinite(run["params"][5]).all() and torch.isfinite(run["errors"][5]).all()
    assert torch.equal(
        results[0]["sign_overlap_nan"]["params"][5], results[1]["sign_overlap_nan"]["params"][5]
    )


def test_a_checkpoint_resumes_only_into_the_same_layout(results: list[dict[str, Any]]) -> None:
    made_with, made_without = results[0]["refused"][1], results[0]["refused"][0]
    assert "made with algo.overlap, this run is without it" in made_with
    assert "made without algo.overlap, this run is with it" in made_without


def test_overlap_refuses_k_fp16_scaling_and_ddp_hooks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match=r"algo\.k: with overlap each bucket is compressed alone"):
        commsgd.build_algorithm("topk", {"k": 5, "overlap": True})
    with pytest.raises(ConfigError, match="overlap is DDP's own here"):
        commsgd.ddp_hook("fp16", ctx=object(), overlap=True)  # type: ignore[arg-type]
    monkeypatch.setattr(launch, "launch_local", lambda *a: pytest.fail("workers started"))
    argv = ["train", "--algorithm", "fp16", "--workers", "2", "--out", str(tmp_path / "run")]
    code = cli.main([*argv, "algo.overlap=true", "precision=fp16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("commsgd: error: precision: fp16 scales the loss, and fp16 with algo.overlap"), (
        err
    )

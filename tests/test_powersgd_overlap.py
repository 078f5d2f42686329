"""powersgd with `overlap`: each bucket's P and Q sent while backward runs (`PowerBucket`, `lanes.Overlap`).

On simulated workers with real backward passes, two warm-up steps then compressed ones: one bucket gives
bitwise the run without overlap (the same layout, the same initial Q), several buckets the same run to
rounding; the messages leave during backward; a NaN gradient on one worker makes every worker skip the
step with its error and warm start as they were; a checkpoint resumes only into the same layout.
Refused in one line: overlap with loss-scaled fp16, inside a DDP hook. (Gradient accumulation on gloo:
tests/test_accumulation.py; resume across the warm-up: tests/test_compressed_dist.py.)
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

STEPS, WARMUP = 6, 2
ONE_BUCKET = {"overlap": True, "bucket_mb": 100.0}
BUCKETS = {"overlap": True, "bucket_mb": 0.004}  # about 4 KB: the model's 21 KB in several buckets


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.Tanh(), nn.Linear(16, 16),
        nn.Tanh(), nn.Linear(16, 3),
    )  # fmt: skip


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def _state(algo: Any) -> list[torch.Tensor]:
    """Every kept tensor (errors and warm starts), bucket by bucket."""
    state = algo.state_dict()
    buckets = state.get("buckets", [state])
    return [b[key].clone() for b in buckets for key in ("error", "q")]


def _train(ctx: Any, params: dict[str, Any], nan_at: int | None = None) -> dict[str, Any]:
    """STEPS steps; `nan_at`: rank 1's gradient (not its loss) is NaN at that step (and no momentum, so
    that a skipped step leaves the model where it was)."""
    model = _model()
    algo = commsgd.build_algorithm("powersgd", {"rank": 2, "warmup_steps": WARMUP, **params})
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9 if nan_at is None else 0.0)
    opt = commsgd.CommOptimizer(sgd, algo, model, ctx)
    out: dict[str, Any] = {"params": [_flat(model)], "state": [_state(algo)], "backward": [], "step": []}
    for step in range(1, STEPS + 1):
        g = torch.Generator().manual_seed(100 * step + ctx.rank)
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        hidden = model[:5](x)
        if nan_at == step and ctx.rank == 1:
            hidden.register_hook(lambda grad: grad * math.nan)
        loss = F.cross_entropy(model[5:](hidden), y)
        before = ctx.comm.meter.totals().bytes_sent
        loss.backward()
        during = ctx.comm.meter.totals().bytes_sent
        opt.step(loss)
        out["backward"].append(during - before)
        out["step"].append(ctx.comm.meter.totals().bytes_sent - before)
        out["params"].append(_flat(model))
        out["state"].append(_state(algo))
    out["bad_steps"] = opt.bad_steps
    out["buckets"] = len(algo._buckets)  # type: ignore[attr-defined]
    out["last_q_bytes"] = algo._buckets[-1].q.nbytes  # type: ignore[attr-defined]
    out["summary"] = algo.summary()
    return out


CASES: dict[str, tuple[dict[str, Any], int | None]] = {
    "flat": ({}, None),
    "one_bucket": (ONE_BUCKET, None),
    "buckets": (BUCKETS, None),
    "buckets_nan": (BUCKETS, 4),
}


def _everything() -> dict[str, Any]:
    ctx = commsgd.init()
    out: dict[str, Any] = {key: _train(ctx, params, nan_at) for key, (params, nan_at) in CASES.items()}
    made = {}
    for key, params in (("flat", {}), ("buckets", BUCKETS), ("one_bucket", ONE_BUCKET)):
        model = _model()
        algo = commsgd.build_algorithm("powersgd", params)
        commsgd.CommOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), algo, model, ctx)
        made[key] = algo
    pairs = [("flat", "buckets"), ("buckets", "flat"), ("buckets", "one_bucket")]
    out["refused"] = load_refusals([(made[source], made[target]) for source, target in pairs])
    return out


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return run_simulated(_everything, 2)


def test_one_bucket_is_bitwise_the_run_without_overlap(results: list[dict[str, Any]]) -> None:
    for rank in results:
        flat, one = rank["flat"], rank["one_bucket"]
        assert one["buckets"] == 1 and not torch.equal(flat["params"][-1], flat["params"][0])
        for step in range(STEPS + 1):
            assert torch.equal(one["params"][step], flat["params"][step]), step
            assert all(torch.equal(a, b) for a, b in zip(one["state"][step], flat["state"][step])), step


def test_buckets_follow_the_run_without_overlap_to_rounding(results: list[dict[str, Any]]) -> None:
    for rank in results:
        flat, bucketed = rank["flat"], rank["buckets"]
        assert bucketed["buckets"] >= 3
        assert bucketed["summary"]["compressed_tensors"] == flat["summary"]["compressed_tensors"] == 4
        for step in range(STEPS + 1):
            torch.testing.assert_close(bucketed["params"][step], flat["params"][step], rtol=0, atol=1e-6)
    assert torch.equal(results[0]["buckets"]["params"][-1], results[1]["buckets"]["params"][-1])


def test_p_and_q_leave_during_backward(results: list[dict[str, Any]]) -> None:
    for rank in results:
        flat, bucketed = rank["flat"], rank["buckets"]
        assert flat["backward"] == [0] * STEPS  # without overlap everything is sent in step()
        assert bucketed["step"] == flat["step"]  # the same bytes, sent in other messages
        for run in (flat, bucketed):  # the summary counts the compressed steps only
            assert run["summary"]["bytes_per_step"] == run["step"][-1] < run["step"][0]
        warmup, compressed = bucketed["backward"][:WARMUP], bucketed["backward"][WARMUP:]
        assert warmup == bucketed["step"][:WARMUP]  # a warm-up step: every bucket leaves in backward
        for during, total in zip(compressed, bucketed["step"][WARMUP:]):
            # every P and every Q but the last bucket's in backward (2 workers: an all-reduce sends its size)
            assert total - during == bucketed["last_q_bytes"] > 0


def test_a_nan_gradient_sent_in_backward_skips_the_step_everywhere(results: list[dict[str, Any]]) -> None:
    for rank in results:
        run = rank["buckets_nan"]
        assert run["bad_steps"] == 1
        assert torch.equal(run["params"][4], run["params"][3])  # step 4 skipped: the model did not move
        assert all(torch.equal(a, b) for a, b in zip(run["state"][4], run["state"][3]))  # nor error and Q
        assert not torch.equal(run["params"][5], run["params"][4])  # the steps after it go on
        assert torch.isfinite(run["params"][-1]).all()
        assert all(torch.isfinite(t).all() for t in run["state"][-1])
    assert torch.equal(results[0]["buckets_nan"]["params"][-1], results[1]["buckets_nan"]["params"][-1])


def test_a_checkpoint_resumes_only_into_the_same_layout(results: list[dict[str, Any]]) -> None:
    into_buckets, into_flat, into_one = results[0]["refused"]
    assert "made without algo.overlap, this run is with it" in into_buckets
    assert "made with algo.overlap, this run is without it" in into_flat
    assert "gradient buckets, this run 1; resume with the same algo.bucket_mb" in into_one


def test_overlap_refuses_fp16_scaling_and_ddp_hooks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="overlap is DDP's own here"):
        commsgd.ddp_hook("powersgd", ctx=object(), overlap=True)  # type: ignore[arg-type]
    monkeypatch.setattr(launch, "launch_local", lambda *a: pytest.fail("workers started"))
    argv = ["train", "--algorithm", "powersgd", "--workers", "2", "--out", str(tmp_path / "run")]
    code = cli.main([*argv, "algo.overlap=true", "precision=fp16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    expected = "commsgd: error: precision: fp16 scales the loss, and powersgd with algo.overlap"
    assert err[0].startswith(expected), err

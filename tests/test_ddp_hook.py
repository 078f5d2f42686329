"""commsgd.ddp_hook inside torch DDP: allreduce equals DDP without a hook, powersgd and ef_sgd(topk) equal
commsgd's own algorithms on the same batches, bytes are counted, the state resumes exactly."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import commsgd
from commsgd.ddp_hooks import ddp_hook
from commsgd.errors import ConfigError
from commsgd.testing import run_distributed

STEPS, BATCH, WORLD = 4, 8, 2


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(STEPS, WORLD * BATCH, 10, generator=g)
    ys = torch.randint(0, 3, (STEPS, WORLD * BATCH), generator=g)
    part = slice(rank * BATCH, (rank + 1) * BATCH)
    return [(xs[s, part], ys[s, part]) for s in range(STEPS)]


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _sgd(model: torch.nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _ddp(model: torch.nn.Module, hook: tuple[Any, Any] | None, cap_mb: float = 100) -> DDP:
    ddp = DDP(model, bucket_cap_mb=cap_mb)  # 100: one bucket, the hook sees every gradient at once
    if hook is not None:
        ddp.register_comm_hook(*hook)
    return ddp


def _train_ddp(ddp: DDP, opt: torch.optim.Optimizer, batches: list[Any]) -> None:
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()


def _train_commsgd(ctx: Any, algorithm: str, params: dict[str, Any], batches: list[Any]) -> torch.Tensor:
    model = _model()
    opt = commsgd.CommOptimizer(_sgd(model), commsgd.build_algorithm(algorithm, **params), model, ctx)
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss)
    return _flat(model)


def _with_hook(
    ctx: Any, name: str, params: dict[str, Any], batches: list[Any], cap_mb: float = 100
) -> tuple[torch.Tensor, float, int]:
    """Train with the hook; return the parameters and the bytes and messages the hook sent."""
    before = ctx.comm.meter.totals()
    sent, calls = before.bytes_sent, before.calls
    ddp = _ddp(_model(), ddp_hook(name, ctx, **params), cap_mb)
    _train_ddp(ddp, _sgd(ddp), batches)
    after = ctx.comm.meter.totals()
    return _flat(ddp.module), after.bytes_sent - sent, after.calls - calls


def _resumed(
    ctx: Any, name: str, params: dict[str, Any], batches: list[Any], cap_mb: float = 100
) -> torch.Tensor:
    """Half the steps, a checkpoint through torch.save, a fresh model, hook and optimizer, the rest."""
    state, hook = ddp_hook(name, ctx, **params)
    ddp = _ddp(_model(), (state, hook), cap_mb)
    opt = _sgd(ddp)
    _train_ddp(ddp, opt, batches[: STEPS // 2])
    buffer = io.BytesIO()
    torch.save(
        {"model": ddp.module.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()}, buffer
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    state, hook = ddp_hook(name, ctx, **params)
    state.load_state_dict(saved["hook"])
    model = _model()
    model.load_state_dict(saved["model"])
    ddp = _ddp(model, (state, hook), cap_mb)
    opt = _sgd(ddp)
    opt.load_state_dict(saved["opt"])
    _train_ddp(ddp, opt, batches[STEPS // 2 :])
    return _flat(ddp.module)


POWERSGD = {"rank": 2, "min_compression_rate": 2.0}  # compresses the one 16 x 10 matrix
TOPK = {"compressor": "topk", "ratio": 0.1}


def _worker() -> dict[str, Any]:
    ctx = commsgd.init()
    batches = _batches(ctx.rank)
    out: dict[str, Any] = {}
    plain = _ddp(_model(), None)
    _train_ddp(plain, _sgd(plain), batches)
    out["ddp"] = _flat(plain.module)
    out["allreduce"] = _with_hook(ctx, "allreduce", {}, batches)
    out["powersgd"] = _with_hook(ctx, "powersgd", POWERSGD, batches)
    out["powersgd_algo"] = _train_commsgd(ctx, "powersgd", POWERSGD, batches)
    out["topk"] = _with_hook(ctx, "ef_sgd", TOPK, batches)
    out["topk_algo"] = _train_commsgd(ctx, "ef_sgd", TOPK, batches)
    out["topk_resumed"] = _resumed(ctx, "ef_sgd", TOPK, batches)
    out["powersgd_resumed"] = _resumed(ctx, "powersgd", POWERSGD, batches)
    for name in ("fp16", "bf16", "signum", "qsgd"):
        out[name] = _with_hook(ctx, name, {}, batches)
    small = 100 / 2**20  # a bucket closes at 100 bytes or more: two buckets here
    out["allreduce_buckets"] = _with_hook(ctx, "allreduce", {}, batches, small)
    warm = {**POWERSGD, "warmup_steps": 1}  # DDP regroups its buckets after the first step
    out["powersgd_buckets"] = _with_hook(ctx, "powersgd", warm, batches, small)
    out["powersgd_warm"] = _with_hook(ctx, "powersgd", warm, batches)
    out["topk_buckets"] = _with_hook(ctx, "ef_sgd", TOPK, batches, small)
    # the checkpoint has two buckets, the fresh DDP's first iteration one: split along the checkpoint's
    out["topk_buckets_resumed"] = _resumed(ctx, "ef_sgd", TOPK, batches, small)
    return out


@pytest.mark.multiprocess
def test_ddp_hooks_on_two_workers() -> None:
    results = run_distributed(_worker, WORLD)
    numel = sum(p.numel() for p in _model().parameters())
    dense = STEPS * 2 * (WORLD - 1) / WORLD * 4 * numel  # ring all-reduce of the float32 bucket
    for r in results:
        params, sent, calls = r["allreduce"]
        torch.testing.assert_close(params, r["ddp"], atol=1e-7, rtol=0)
        assert sent == pytest.approx(dense) and calls == STEPS  # one message per step and bucket
        torch.testing.assert_close(r["powersgd"][0], r["powersgd_algo"], atol=1e-6, rtol=1e-6)
        assert 0 < r["powersgd"][1] < dense
        torch.testing.assert_close(r["topk"][0], r["topk_algo"], atol=1e-6, rtol=1e-6)
        assert 0 < r["topk"][1] < dense
        torch.testing.assert_close(r["topk_resumed"], r["topk"][0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r["powersgd_resumed"], r["powersgd"][0], atol=1e-6, rtol=1e-6)
        for name in ("fp16", "bf16"):  # half the bytes, close to the exact average
            assert r[name][1] == pytest.approx(dense / 2)
            torch.testing.assert_close(r[name][0], r["ddp"], atol=1e-2, rtol=1e-2)
        for name in ("signum", "qsgd"):
            assert bool(torch.isfinite(r[name][0]).all()) and 0 < r[name][1] < dense
        torch.testing.assert_close(r["allreduce_buckets"][0], r["ddp"], atol=1e-7, rtol=0)
        assert r["allreduce_buckets"][1] == pytest.approx(dense) and r["allreduce_buckets"][2] > STEPS
        # PowerSGD compresses per matrix, so the buckets do not change what it computes
        torch.testing.assert_close(r["powersgd_buckets"][0], r["powersgd_warm"][0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r["topk_buckets_resumed"], r["topk_buckets"][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(results[0]["topk"][0], results[1]["topk"][0], atol=0, rtol=0)


@pytest.mark.parametrize("name", ["lsgd", "easgd", "local_sgd", "diloco", "nonsense"])
def test_names_that_cannot_be_hooks_fail_in_one_line(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        ddp_hook(name, ctx=None)
    message = str(info.value)
    assert "\n" not in message and name in message and "powersgd" in message and "allreduce" in message


def test_hook_parameters_are_validated() -> None:
    with pytest.raises(ConfigError):
        ddp_hook("allreduce", ctx=None, bucket_mb=5)
    with pytest.raises(ConfigError):
        commsgd.ddp_hook("powersgd", ctx=object(), rank=0)  # type: ignore[arg-type]

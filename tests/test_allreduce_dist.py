"""allreduce on N workers equals single-process SGD with N times the batch, and equals PyTorch DDP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import commsgd
from commsgd.simworld import run_simulated
from commsgd.testing import run_distributed

pytestmark = pytest.mark.multiprocess

STEPS, BATCH, WORLD = 5, 8, 4


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, WORLD * BATCH, 10, generator=g), torch.randint(
        0, 3, (STEPS, WORLD * BATCH), generator=g
    )


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _optimizer(model: torch.nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def _train_commsgd(overlap: bool) -> tuple[torch.Tensor, float, int]:
    ctx = commsgd.init()
    model = _model()
    opt = commsgd.CommOptimizer(
        _optimizer(model), commsgd.build_algorithm("allreduce", overlap=overlap), model, ctx
    )
    xs, ys = _data()
    part = slice(ctx.rank * BATCH, (ctx.rank + 1) * BATCH)
    for step in range(STEPS):
        opt.zero_grad()
        loss = F.cross_entropy(model(xs[step, part]), ys[step, part])
        loss.backward()
        opt.step(loss)
    return _flat(model), ctx.comm.meter.totals().bytes_sent, ctx.comm.meter.totals().calls


def _train_ddp() -> torch.Tensor:
    ctx = commsgd.init()
    model = torch.nn.parallel.DistributedDataParallel(_model())
    opt = _optimizer(model)
    xs, ys = _data()
    part = slice(ctx.rank * BATCH, (ctx.rank + 1) * BATCH)
    for step in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(model(xs[step, part]), ys[step, part]).backward()
        opt.step()
    return _flat(model.module)


def _train_single() -> torch.Tensor:
    model = _model()
    opt = _optimizer(model)
    xs, ys = _data()
    for step in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(model(xs[step]), ys[step]).backward()
        opt.step()
    return _flat(model)


@pytest.mark.parametrize("overlap", [True, False])
def test_allreduce_matches_single_process_large_batch(overlap: bool) -> None:
    results = run_simulated(_train_commsgd, WORLD, overlap)  # the DDP comparison below uses gloo
    reference = _train_single()
    for params, _, _ in results:
        torch.testing.assert_close(params, reference, atol=1e-5, rtol=1e-5)
    # bytes: ring all-reduce of every gradient each step, 2 (p-1)/p of the gradient's bytes
    nbytes = reference.numel() * 4
    for _, sent, calls in results:
        assert sent == pytest.approx(STEPS * 2 * (WORLD - 1) / WORLD * nbytes)
        assert calls == STEPS  # one bucket: the whole model is far below 25 MB


def test_allreduce_matches_ddp() -> None:
    ours = run_distributed(_train_commsgd, 2, True)
    ddp = run_distributed(_train_ddp, 2)
    torch.testing.assert_close(ours[0][0], ddp[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours[1][0], ddp[1], atol=1e-6, rtol=1e-6)

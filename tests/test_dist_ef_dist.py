"""dist_ef_sgd: with `none` it is all-reduce SGD with Nesterov momentum; sharded and one-server layouts
agree; bytes per step follow the payload sizes; the lr convention matches the paper's lr-scaled errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import commsgd
from commsgd.compression import get
from commsgd.simworld import run_simulated
from commsgd.testing import SoloContext

WORLD, BATCH, STEPS = 3, 8, 5


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))  # 227 parameters


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(WORLD * BATCH, 10, generator=gen), torch.randint(0, 3, (WORLD * BATCH,), generator=gen)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _train(ctx: Any, params: dict[str, Any]) -> tuple[torch.Tensor, list[float]]:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-3)
    opt = commsgd.CommOptimizer(optimizer, commsgd.build_algorithm("dist_ef_sgd", params), model, ctx)
    part = slice(ctx.rank * BATCH, (ctx.rank + 1) * BATCH)
    sent = []
    for step in range(1, STEPS + 1):
        x, y = _batch(step)
        for group in opt.param_groups:
            group["lr"] = 0.1 if step <= 3 else 0.02
        opt.zero_grad()
        loss = F.cross_entropy(model(x[part]), y[part])
        loss.backward()
        before = ctx.comm.meter.totals().bytes_sent
        opt.step(loss)
        sent.append(ctx.comm.meter.totals().bytes_sent - before)
    return _flat(model), sent


CASES = {
    "none_sharded": {"compressor": "none", "server": "sharded"},
    "none_single": {"compressor": "none", "server": "single"},
    "block_sharded": {"compressor": "block_sign", "block_size": 8, "server": "sharded"},
    "block_single": {"compressor": "block_sign", "block_size": 8, "server": "single"},
}


def _all_cases() -> dict[str, tuple[torch.Tensor, list[float]]]:
    ctx = commsgd.init()
    return {key: _train(ctx, params) for key, params in CASES.items()}


@pytest.fixture(scope="module")
def runs() -> list[dict[str, tuple[torch.Tensor, list[float]]]]:
    return run_simulated(_all_cases, WORLD)


def _nesterov_reference() -> torch.Tensor:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    for step in range(1, STEPS + 1):
        for group in optimizer.param_groups:
            group["lr"] = 0.1 if step <= 3 else 0.02
        x, y = _batch(step)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return _flat(model)


def test_none_compression_is_allreduce_sgd_with_nesterov_momentum(runs: list[Any]) -> None:
    reference = _nesterov_reference()
    for rank_runs in runs:
        for key in ("none_sharded", "none_single"):
            torch.testing.assert_close(rank_runs[key][0], reference, rtol=1e-5, atol=1e-6, msg=key)


def test_sharded_and_single_server_agree(runs: list[Any]) -> None:
    for rank_runs in runs:
        sharded, single = rank_runs["block_sharded"][0], rank_runs["block_single"][0]
        assert not torch.equal(sharded, _flat(_model()))
        torch.testing.assert_close(sharded, single, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(sharded, runs[0]["block_sharded"][0], rtol=0, atol=0)


def test_bytes_per_step_follow_payload_sizes(runs: list[Any]) -> None:
    numel = 227
    compressor = get("block_sign", block_size=8)
    # sharded: slices of ceil(227 / 3) = 76 -> 80 (a multiple of 8) elements: 80, 80, 67; every row
    # ends in a status byte (a compression that failed on its sender)
    row = max(compressor.payload_nbytes(n) for n in (80, 80, 67)) + 1
    sharded = (WORLD - 1) * row + (WORLD - 1) * row  # all-to-all of p rows + all-gather of one row
    whole = compressor.payload_nbytes(numel) + 1
    for rank, rank_runs in enumerate(runs):
        assert rank_runs["block_sharded"][1] == [pytest.approx(sharded)] * STEPS
        single = (WORLD - 1) / WORLD * whole + (0 if rank == 0 else whole)  # broadcast + gather
        assert rank_runs["block_single"][1] == [pytest.approx(single)] * STEPS


def test_unscaled_errors_with_rescaling_equal_the_papers_lr_scaled_errors() -> None:
    """One worker, block_sign (C(a x) = a C(x) for a > 0), an lr drop: x -= lr * C(q) with errors in
    gradient units rescaled by eta_{t-1}/eta_t equals the paper's p = eta d + E, x -= C(p)."""
    mu, lrs = 0.9, [0.1, 0.1, 0.1, 0.025, 0.025, 0.05]
    compressor = get("block_sign", block_size=8)
    model = _model()
    opt = commsgd.CommOptimizer(
        torch.optim.SGD(model.parameters(), lr=lrs[0]),
        commsgd.build_algorithm("dist_ef_sgd", compressor="block_sign", block_size=8),
        model,
        SoloContext(),  # type: ignore[arg-type]
    )
    x_ref = _flat(model)
    m, e_worker, e_server = (torch.zeros_like(x_ref) for _ in range(3))
    for step, lr in enumerate(lrs, start=1):
        x, y = _batch(step)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]
        opt.step(loss)
        # the paper's form, lr inside the compressed quantity
        m = mu * m + g
        p = lr * (g + mu * m) + e_worker
        sent = compressor.decompress(compressor.compress(p))
        e_worker = p - sent
        q = sent + e_server
        delta = compressor.decompress(compressor.compress(q))
        e_server = q - delta
        x_ref = x_ref - delta
        torch.testing.assert_close(_flat(model), x_ref, rtol=1e-5, atol=1e-6)


def test_on_lr_change_rescales_only_the_errors() -> None:
    model = _model()
    algo = commsgd.build_algorithm("dist_ef_sgd")
    algo.bind(SoloContext(), model, torch.optim.SGD(model.parameters(), lr=0.1))  # type: ignore[arg-type]
    x, y = _batch(1)
    F.cross_entropy(model(x), y).backward()
    algo.after_backward(1)
    state = algo.state_dict()
    algo.on_lr_change(0.1, 0.05)
    after = algo.state_dict()
    torch.testing.assert_close(after["error"], 2 * state["error"])
    torch.testing.assert_close(after["server_error"], 2 * state["server_error"])
    torch.testing.assert_close(after["momentum"], state["momentum"])
    assert state["error"].abs().sum() > 0

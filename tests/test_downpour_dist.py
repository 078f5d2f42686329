"""downpour on worker processes: one worker is SGD, several converge, exact bytes, resume, clean ends.

Starting worker processes dominates the cost, so one run of workers may serve several scenarios; each
scenario builds its own algorithm (its own server, center and process group).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import commsgd
from commsgd.algorithms.downpour import Downpour
from commsgd.algorithms.param_server import HEADER_LEN
from commsgd.config import ClusterConfig
from commsgd.testing import run_distributed

pytestmark = pytest.mark.multiprocess

HEADER = HEADER_LEN * 8  # int64 request / reply header
STEPS = 60


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _batches(steps: int, rank: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(steps)]


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _sgd(model: torch.nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def _init(timeout_s: float = 30) -> Any:
    return commsgd.init(ClusterConfig(timeout_s=timeout_s))


def _setup(ctx: Any, **params: Any) -> tuple[torch.nn.Module, commsgd.CommOptimizer, Downpour]:
    model = _model()
    algo = commsgd.build_algorithm("downpour", **params)
    assert isinstance(algo, Downpour)
    return model, commsgd.CommOptimizer(_sgd(model), algo, model, ctx), algo


def _train(opt: commsgd.CommOptimizer, model: torch.nn.Module, batches: list[Any]) -> None:
    for x, y in batches:
        opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))


# ---------------------------------------------------------------------------- one worker is SGD


def _one_worker(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ctx, results = _init(), []
    for n in (1, 3):  # push and fetch every step, and every 3 steps
        model, opt, algo = _setup(ctx, n_push=n, n_fetch=n)
        _train(opt, model, _batches(steps))
        local = _flat(model)
        with opt.evaluated_parameters():
            results.append((local, _flat(model)))
        algo.finish()
    ctx.close()
    return results


def test_one_worker_equals_sgd() -> None:
    steps = 6
    results = run_distributed(_one_worker, 1, steps)[0]
    model = _model()
    opt = _sgd(model)  # momentum and weight decay: DOWNPOUR's workers run the configured optimizer
    for x, y in _batches(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for local, center in results:
        torch.testing.assert_close(local, _flat(model), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(center, _flat(model), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------- three workers


def _traffic(ctx: Any, steps: int) -> dict[str, Any]:
    before = dataclasses.replace(ctx.comm.meter.totals())
    model, opt, algo = _setup(ctx, n_push=2, n_fetch=3)
    _train(opt, model, _batches(steps, ctx.rank))
    algo.finish()
    after = ctx.comm.meter.totals()
    return {
        "sent": after.bytes_sent - before.bytes_sent,
        "recv": after.bytes_recv - before.bytes_recv,
        "calls": after.calls - before.calls,
        "params": _flat(model).numel(),
        "summary": algo.summary(),
    }


def _regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(240, 5, generator=g)
    w = torch.tensor([[1.0], [-2.0], [0.5], [3.0], [-1.0]])
    return x, x @ w + 0.5 + 0.01 * torch.randn(240, 1, generator=g)


def _least_squares(ctx: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    algo = commsgd.build_algorithm("downpour")
    opt = commsgd.CommOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), algo, model, ctx)
    x, y = _regression_data()
    shard = slice(ctx.rank * 80, (ctx.rank + 1) * 80)
    xs, ys = x[shard], y[shard]
    with torch.no_grad(), opt.evaluated_parameters():
        before = F.mse_loss(model(x), y).item()
    g = torch.Generator().manual_seed(ctx.rank)
    for _ in range(STEPS):
        idx = torch.randint(0, 80, (16,), generator=g)
        opt.step(lambda idx=idx: F.mse_loss(model(xs[idx]), ys[idx]))
    algo.finish()
    with torch.no_grad(), opt.evaluated_parameters():
        after = F.mse_loss(model(x), y).item()
    return {"before": before, "after": after, "summary": algo.summary()}


def _three_workers(steps: int) -> dict[str, Any]:
    ctx = _init()
    result = {"traffic": _traffic(ctx, steps), "least_squares": _least_squares(ctx)}
    ctx.close()
    return result


@pytest.fixture(scope="module")
def three_workers() -> list[dict[str, Any]]:
    return run_distributed(_three_workers, 3, 7)


def test_three_workers_converge_on_least_squares(three_workers: list[dict[str, Any]]) -> None:
    runs = [r["least_squares"] for r in three_workers]
    assert runs[0]["before"] > 5.0
    assert runs[0]["after"] < 0.01  # the noise floor is 1e-4
    assert all(r["after"] == runs[0]["after"] for r in runs)  # every worker evaluates the same center
    server = runs[0]["summary"]["server"]
    assert sum(server["pushes_applied"]) == server["version"] == 3 * STEPS
    assert server["fetches_served"] == [STEPS] * 3
    assert server["mean_staleness"] >= 0.0


def test_bytes_are_headers_plus_parameters(three_workers: list[dict[str, Any]]) -> None:
    # 7 steps, n_push=2, n_fetch=3: pushes at 2, 4, 6 and a flush in finish; fetches at 3 and 6
    # (6 in one request with its push)
    runs = [r["traffic"] for r in three_workers]
    payload = runs[0]["params"] * 4
    pushes, fetch_only, fetches = 4, 1, 2
    for r in runs[1:]:
        assert r["summary"]["pushes"] == pushes and r["summary"]["fetches"] == fetches
        # requests: header (+ the update on a push), and DONE, one more header; replies: header + center
        assert r["sent"] == pushes * (HEADER + payload) + fetch_only * HEADER + HEADER
        assert r["recv"] == fetches * (HEADER + payload)
        assert r["calls"] == pushes * 2 + fetch_only + 1 + fetches * 2
    # rank 0 hosts the server: its own pushes and fetches stay in process, nothing in "train"
    assert runs[0]["sent"] == 0 and runs[0]["recv"] == 0
    server = runs[0]["summary"]["server"]
    assert server["bytes_recv"] == sum(r["sent"] for r in runs[1:])
    assert server["bytes_sent"] == sum(r["recv"] for r in runs[1:])


# ---------------------------------------------------------------------------- resume


def _save_then_resume(steps: int) -> dict[str, Any]:
    ctx = _init()
    model, opt, algo = _setup(ctx, n_push=2, n_fetch=2)
    _train(opt, model, _batches(steps, ctx.rank))  # the last step's update is not pushed yet
    with opt.evaluated_parameters():
        center = _flat(model)
    saved, saved_model = opt.state_dict(), model.state_dict()
    ctx.comm.barrier()  # rank 0 saves the center before any worker's flush in finish reaches it
    algo.finish()

    model, opt, algo = _setup(ctx, n_push=2, n_fetch=2)  # a fresh server, as after a restart
    model.load_state_dict(saved_model)
    opt.load_state_dict(saved)
    restored = opt.state_dict()["algorithm"]
    with opt.evaluated_parameters():
        center_after = _flat(model)
    _train(opt, model, _batches(2, ctx.rank))
    algo.finish()
    ctx.close()
    return {
        "saved": saved["algorithm"],
        "restored": restored,
        "center": center,
        "center_after": center_after,
        "summary": algo.summary(),
    }


def test_state_dict_resumes_center_and_accumulator() -> None:
    results = run_distributed(_save_then_resume, 2, 3)
    assert "center" in results[0]["saved"] and "center" not in results[1]["saved"]
    for r in results:
        assert r["saved"]["accumulator"][0].abs().sum() > 0
        torch.testing.assert_close(r["restored"]["accumulator"], r["saved"]["accumulator"])
        torch.testing.assert_close(r["center_after"], r["center"])  # the server's center came back
    summary = results[0]["summary"]
    assert summary["pushes"] == 3  # 1 before saving (step 2); step 4 and the flush in finish after it
    assert summary["server"]["version"] == results[0]["saved"]["center"]["version"] + 2 * 2


# ---------------------------------------------------------------------------- failures end


def _peer_dies() -> str:
    ctx = _init(timeout_s=8)  # short, so the lost peer is noticed soon; not so short that load trips it
    model, opt, algo = _setup(ctx)
    _train(opt, model, _batches(2, ctx.rank))
    outcome = "finished"
    if ctx.rank == 1:
        outcome = "left without finishing"  # no DONE, no more requests
    else:
        try:
            algo.finish()
        except (RuntimeError, TimeoutError) as exc:
            outcome = type(exc).__name__
    ctx.close()
    return outcome


def test_dead_worker_does_not_hang_the_server() -> None:
    results = run_distributed(_peer_dies, 2, timeout=60)
    assert results[0] in ("RuntimeError", "TimeoutError")

"""ef_sgd and signum on several workers: error-feedback invariant, bytes on the wire, majority vote, and
resume from a checkpoint (all compressed algorithms) equal to an uninterrupted run."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import commsgd
from commsgd.simworld import run_simulated

EF_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "topk": ("ef_sgd", {"compressor": "topk", "ratio": 0.05}),
    "block_sign": ("ef_sgd", {"compressor": "block_sign", "block_size": 16}),
    "qsgd_ef": ("qsgd", {"error_feedback": True, "bucket_size": 32}),
    "fp16": ("fp16", {}),
    "randomk": ("randomk", {"ratio": 0.2}),
    "randomk_ef": ("ef_sgd", {"compressor": "randomk", "ratio": 0.2}),  # repeated draws, all-reduced
    "randomk_scaled": ("randomk", {"ratio": 0.2, "scaled": True}),
    # sent bucket by bucket (the model's 908 bytes in buckets of about 300): each bucket's own error
    "topk_overlap": ("ef_sgd", {"compressor": "topk", "ratio": 0.05, "overlap": True, "bucket_mb": 0.0003}),
    "scaled_sign_overlap": ("ef_sgd", {"overlap": True, "bucket_mb": 0.0003}),
    "randomk_overlap": ("randomk", {"ratio": 0.2, "overlap": True, "bucket_mb": 0.0003}),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))


def _flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().reshape(-1).clone() for p in model.parameters()])  # type: ignore[union-attr]


WORLD = 3


def _ef_steps(ctx: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (name, params) in EF_CASES.items():
        model = _model()
        algo = commsgd.build_algorithm(name, params)
        algo.bind(ctx, model, torch.optim.SGD(model.parameters(), lr=0.1))
        records = []
        for step in (1, 2, 3):
            gen = torch.Generator().manual_seed(100 * step + ctx.rank)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            grad = _flat_grads(model)
            old = algo.error()  # type: ignore[attr-defined]
            old = torch.zeros_like(grad) if old is None else old.clone()
            before = ctx.comm.meter.totals().bytes_sent
            algo.after_backward(step)
            new = algo.error()  # type: ignore[attr-defined]
            records.append(
                {
                    "grad": grad,
                    "old": old,
                    "new": None if new is None else new.clone(),
                    "result": _flat_grads(model),
                    "sent": ctx.comm.meter.totals().bytes_sent - before,
                }
            )
        out[key] = {
            "records": records,
            "payload": algo.payload_nbytes(),  # type: ignore[attr-defined]
            "summable": algo.compressor.summable,  # type: ignore[attr-defined]
        }
    return out


def _everything() -> dict[str, Any]:
    """All checks of this module in one spawn of WORLD workers (starting workers is the slow part)."""
    ctx = commsgd.init()
    return {"ef": _ef_steps(ctx), "vote": _vote(ctx), "resume": _resume(ctx)}


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return run_simulated(_everything, WORLD)


def test_error_feedback_invariant_and_bytes_per_step(results: list[dict[str, Any]]) -> None:
    world = WORLD
    for key in EF_CASES:
        ranks = [r["ef"][key] for r in results]
        payload, summable = ranks[0]["payload"], ranks[0]["summable"]
        expected = 2 * (world - 1) / world * payload if summable else (world - 1) * payload
        for step in range(3):
            recs = [r["records"][step] for r in ranks]
            for rec in recs[1:]:
                torch.testing.assert_close(rec["result"], recs[0]["result"], rtol=0, atol=0)
            assert all(rec["sent"] == pytest.approx(expected) for rec in recs), key
            if recs[0]["new"] is None:
                continue
            # sum over workers of (decompressed message + new error) = sum of (gradient + old error),
            # and the mean of the decompressed messages is the result every worker applies
            lhs = sum(rec["new"] for rec in recs) + world * recs[0]["result"]
            rhs = sum(rec["grad"] + rec["old"] for rec in recs)
            torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-5)
            if step > 0:
                assert any(rec["old"].abs().sum() > 0 for rec in recs), key


SIGNS = torch.tensor(
    [
        [1.0, 1.0, -1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0],
        [1.0, -1.0, -1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0],
        [-1.0, 1.0, -1.0, 1.0, -1.0, -1.0, -1.0, 1.0, 1.0],
    ]
)


def _vote(ctx: Any) -> tuple[torch.Tensor, torch.Tensor, float]:
    model = nn.Linear(9, 1, bias=False)
    nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0)
    algo = commsgd.build_algorithm("signum", beta=0.0, lr_scale=0.5)
    algo.bind(ctx, model, optimizer)
    model.weight.grad = (SIGNS[ctx.rank] * (ctx.rank + 0.5)).view(1, 9)  # magnitudes do not matter
    before = ctx.comm.meter.totals().bytes_sent
    algo.after_backward(1)
    vote = model.weight.grad.detach().clone().view(-1)
    optimizer.step()
    return vote, model.weight.detach().view(-1).clone(), ctx.comm.meter.totals().bytes_sent - before


def test_signum_majority_vote_of_three_workers(results: list[dict[str, Any]]) -> None:
    expected = torch.sign(SIGNS.sum(0))
    assert expected.abs().min() == 1  # no ties with 3 voters
    for vote, weight, sent in (r["vote"] for r in results):
        torch.testing.assert_close(vote, 0.5 * expected)  # the step is lr_scale * lr per coordinate
        torch.testing.assert_close(weight, -0.1 * 0.5 * expected)
        assert sent == 2 * 3  # all-gather of ceil(9 / 8) = 2 bytes and a status byte from each of 2 others


def test_signum_refuses_torch_momentum() -> None:
    model = nn.Linear(2, 1)
    algo = commsgd.build_algorithm("signum")
    with pytest.raises(commsgd.errors.ConfigError, match="momentum=0"):
        algo.bind(None, model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))  # type: ignore[arg-type]


RESUME_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "ef_sgd": ("ef_sgd", {"compressor": "topk", "ratio": 0.1}),
    "qsgd": ("qsgd", {"bucket_size": 16}),
    "signum": ("signum", {}),
    "powersgd": ("powersgd", {"rank": 2, "warmup_steps": 1}),
    "dist_ef_sgd": ("dist_ef_sgd", {"compressor": "block_sign", "block_size": 8}),
    "ef_sgd_overlap": ("ef_sgd", {"compressor": "topk", "ratio": 0.1, "overlap": True, "bucket_mb": 0.0003}),
    "randomk_overlap": ("randomk", {"overlap": True, "bucket_mb": 0.0003}),
    "signum_overlap": ("signum", {"overlap": True, "bucket_mb": 0.0003}),
    # resumed after the warm-up: the first step's backward takes it for a warm-up step, the step sends again
    "powersgd_overlap": ("powersgd", {"rank": 2, "warmup_steps": 1, "overlap": True, "bucket_mb": 0.0003}),
}
STEPS, SPLIT = 6, 3


def _fresh(ctx: Any, name: str, params: dict[str, Any]) -> tuple[nn.Module, commsgd.CommOptimizer]:
    model = _model()
    momentum = 0.0 if name in ("signum", "dist_ef_sgd") else 0.9
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, weight_decay=1e-3)
    return model, commsgd.CommOptimizer(optimizer, commsgd.build_algorithm(name, params), model, ctx)


def _run_steps(model: nn.Module, opt: commsgd.CommOptimizer, rank: int, steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(8, 10, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        for group in opt.param_groups:
            group["lr"] = 0.1 if step <= SPLIT else 0.05  # a schedule drop right after the resume
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss)


def _resume(ctx: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for key, (name, params) in RESUME_CASES.items():
        model, opt = _fresh(ctx, name, params)
        _run_steps(model, opt, ctx.rank, range(1, STEPS + 1))
        straight = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        model, opt = _fresh(ctx, name, params)
        _run_steps(model, opt, ctx.rank, range(1, SPLIT + 1))
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)  # what the trainer's checkpoint loader accepts
        model, opt = _fresh(ctx, name, params)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        _run_steps(model, opt, ctx.rank, range(SPLIT + 1, STEPS + 1))
        out[key] = (straight, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return out


def test_resume_from_state_dict_equals_uninterrupted_run(results: list[dict[str, Any]]) -> None:
    for rank_result in results:
        for key, (straight, resumed) in rank_result["resume"].items():
            assert not torch.equal(straight, _model_flat()), key  # it trained
            torch.testing.assert_close(resumed, straight, rtol=0, atol=0, msg=key)


def _model_flat() -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in _model().parameters()])

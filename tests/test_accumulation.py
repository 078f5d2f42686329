"""Gradient accumulation in a user's own loop: several backward passes before one `step()`.

The contract (docs/DEVELOPING.md): the gradient a step communicates is the one accumulated in `.grad`
by every backward pass since the gradients were last zeroed, the way PyTorch DDP does it. Checked on 2
gloo workers, 3 steps of 3 micro-batches each:

* `allreduce` (overlap on and off) against torch DDP, in three loops: k backward passes then a step;
  the same with `no_sync()` on the first k-1 passes; and a stray backward pass followed by `zero_grad`
  before each step's passes (nothing of it may reach the step). Parameters match DDP to float rounding.
* every gradient-communicating algorithm (ef_sgd, topk, signum and powersgd also with `overlap`, which
  compresses and sends buckets during backward): the k-pass loop (with and without `no_sync`, with a stray
  pass) gives bitwise the parameters of a loop that sets `.grad` to the same local sum by hand.
* the non-finite guard still blames a NaN gradient that `allreduce` sent during backward on its
  sender, with one and with two passes per step.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import commsgd
from commsgd.testing import run_distributed

pytestmark = pytest.mark.multiprocess

WORLD, STEPS, MICRO, BATCH = 2, 3, 3, 4
LOOPS = ("plain", "no_sync", "stray")
#: gradient-communicating algorithms and settings that communicate (and compress) every step
ALGORITHMS: dict[str, dict[str, Any]] = {
    "allreduce": {"bucket_mb": 0.0005},  # several buckets: the overlap path launches during backward
    "allreduce-no-overlap": {"overlap": False},
    "ef_sgd": {},
    "ef_sgd-overlap": {"overlap": True, "bucket_mb": 0.0005},  # buckets compressed during backward
    "topk-overlap": {"overlap": True, "bucket_mb": 0.0005},  # all-gathered during backward
    "signum": {},
    "signum-overlap": {"overlap": True, "bucket_mb": 0.0005},  # momentum signs all-gathered during backward
    "powersgd": {},
    "powersgd-overlap": {"overlap": True, "bucket_mb": 0.0005},  # P and Q of two buckets during backward
    "dist_ef_sgd": {},
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _batches(rank: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per step: the stray micro-batch, then MICRO micro-batches of this rank."""
    g = torch.Generator().manual_seed(10 + rank)
    return [
        [
            (torch.randn(BATCH, 10, generator=g), torch.randint(0, 3, (BATCH,), generator=g))
            for _ in range(MICRO + 1)
        ]
        for _ in range(STEPS)
    ]


def _loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y) / MICRO


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def _run_loop(
    loop: str,
    model: torch.nn.Module,
    zero_grad: Any,
    step: Any,
    no_sync: Any,
    batches: list[list[tuple[torch.Tensor, torch.Tensor]]],
) -> None:
    for per_step in batches:
        stray, micro = per_step[0], per_step[1:]
        zero_grad()
        if loop == "stray":  # e.g. a probe of the gradient norm: a backward with no step after it
            _loss(model, stray).backward()
            zero_grad()
        for i, batch in enumerate(micro):
            if loop == "no_sync" and i < MICRO - 1:
                with no_sync():
                    _loss(model, batch).backward()
            else:
                _loss(model, batch).backward()
        step()


def _ddp_and_commsgd(ctx: commsgd.WorkerContext) -> dict[str, dict[str, torch.Tensor]]:
    batches = _batches(ctx.rank)
    results: dict[str, dict[str, torch.Tensor]] = {}
    for loop in LOOPS:
        ddp = torch.nn.parallel.DistributedDataParallel(_model())
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        _run_loop(loop, ddp, opt.zero_grad, opt.step, ddp.no_sync, batches)
        results.setdefault("ddp", {})[loop] = _flat(ddp.module)
        for overlap in (True, False):
            model = _model()
            algo = commsgd.build_algorithm("allreduce", overlap=overlap, bucket_mb=0.0005)
            copt = commsgd.CommOptimizer(
                torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), algo, model, ctx
            )
            _run_loop(loop, model, copt.zero_grad, copt.step, copt.no_sync, batches)
            results.setdefault(f"overlap={overlap}", {})[loop] = _flat(model)
    return results


def _blame(ctx: commsgd.WorkerContext) -> dict[str, Any]:
    """allreduce with overlap sends during backward; rank 1's gradient (not its loss) turns NaN in one
    step's first micro-batch (2 per step): rank 1 blames itself, rank 0 the communicated gradient."""
    out: dict[str, Any] = {}
    for passes in (1, 2):
        model = _model()
        algo = commsgd.build_algorithm("allreduce", bucket_mb=0.0005)
        opt = commsgd.CommOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), algo, model, ctx)
        printed = io.StringIO()
        with contextlib.redirect_stderr(printed):
            for step, per_step in enumerate(_batches(ctx.rank), start=1):
                opt.zero_grad()
                for i, (x, y) in enumerate(per_step[:passes]):
                    hidden = model[1](model[0](x))
                    if ctx.rank == 1 and step == 2 and i == 0:
                        hidden.register_hook(lambda g: g * math.nan)  # a NaN gradient, a finite loss
                    loss = F.cross_entropy(model[2](hidden), y)
                    loss.backward()
                opt.step(loss)
        out[f"passes={passes}"] = {"stderr": printed.getvalue(), "params": _flat(model)}
    return out


def _worker(names: list[str]) -> dict[str, Any]:
    ctx = commsgd.init()
    results = {"ddp": _ddp_and_commsgd(ctx), "contract": _contract(ctx, names), "blame": _blame(ctx)}
    ctx.close()
    return results


NAMES = [n for n in ALGORITHMS if n.partition("-")[0] in commsgd.algorithm_names()]


@pytest.fixture(scope="module")
def runs() -> list[dict[str, dict[str, dict[str, torch.Tensor]]]]:
    return run_distributed(_worker, WORLD, NAMES)


def test_allreduce_accumulation_matches_ddp(runs: list[Any]) -> None:
    for rank_results in (r["ddp"] for r in runs):
        for loop in LOOPS:
            expected = rank_results["ddp"][loop]
            for variant in ("overlap=True", "overlap=False"):
                got = rank_results[variant][loop]
                assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (
                    variant,
                    loop,
                    (got - expected).abs().max().item(),
                )


def _by_hand(
    model: torch.nn.Module, opt: commsgd.CommOptimizer, batches: list[list[tuple[torch.Tensor, torch.Tensor]]]
) -> None:
    """The reference: each micro-batch's gradient by `autograd.grad` (no backward hooks run), summed
    in the order autograd accumulates them, put into `.grad`, then one step."""
    params = [p for p in model.parameters()]
    for per_step in batches:
        opt.zero_grad()
        total: list[torch.Tensor] | None = None
        for batch in per_step[1:]:
            grads = torch.autograd.grad(_loss(model, batch), params)
            total = [g.clone() for g in grads] if total is None else [t.add_(g) for t, g in zip(total, grads)]
        assert total is not None
        for p, g in zip(params, total):
            p.grad = g
        opt.step()


def _contract(ctx: commsgd.WorkerContext, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    batches = _batches(ctx.rank)
    results: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        for loop in ("by_hand", *LOOPS):
            model = _model()
            params = dict(ALGORITHMS[name])
            if name == "allreduce-no-overlap":
                params["overlap"] = False
            algo = commsgd.build_algorithm(name.partition("-")[0], **params)
            opt = commsgd.CommOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), algo, model, ctx)
            if loop == "by_hand":
                _by_hand(model, opt, batches)
            else:
                _run_loop(loop, model, opt.zero_grad, opt.step, opt.no_sync, batches)
            results.setdefault(name, {})[loop] = _flat(model)
    return results


def test_every_gradient_algorithm_communicates_the_accumulated_gradient(runs: list[Any]) -> None:
    for rank, rank_results in enumerate(r["contract"] for r in runs):
        for name in NAMES:
            expected = rank_results[name]["by_hand"]
            for loop in LOOPS:
                if name == "allreduce" and loop != "no_sync":
                    continue  # overlap averages each pass (as DDP does): equal only to rounding, tested above
                assert torch.equal(rank_results[name][loop], expected), (name, loop, rank)
        # overlap, a stray pass then zero_grad: bitwise the plain loop (nothing of the stray pass is left)
        assert torch.equal(rank_results["allreduce"]["stray"], rank_results["allreduce"]["plain"])


def test_a_nan_sent_during_backward_is_blamed_on_its_sender(runs: list[Any]) -> None:
    for passes in ("passes=1", "passes=2"):
        mine, other = runs[1]["blame"][passes], runs[0]["blame"][passes]
        assert "rank 1: non-finite gradient at step 2;" in mine["stderr"], passes
        assert "rank 0: non-finite gradient after communication at step 2;" in other["stderr"], passes
        assert "step 1;" not in mine["stderr"] + other["stderr"] and "step 3;" not in mine["stderr"]
        assert torch.isfinite(mine["params"]).all() and torch.equal(mine["params"], other["params"])

"""easgd `mode=async-server` on worker processes against one-process references of EASGD's Algorithm 1.

One worker: the exchange every tau steps, with plain SGD and with EAMSGD's Nesterov steps. Three
workers (rank 0 is a worker and hosts the server): a fixed schedule says which worker takes the next
step, and after each step every worker joins an evaluation of the center, which waits until the
server has applied every push sent so far. So the center each fetch sees is the reference's and the
run is deterministic. The same run checks the bytes of each exchange, NaN losses on one worker (one
at a round step), and a resume through `state_dict` with a fresh server.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import commsgd
from commsgd.algorithms.easgd import EASGDServer
from commsgd.algorithms.param_server import HEADER_LEN
from commsgd.api import all_finite
from commsgd.config import ClusterConfig
from commsgd.testing import run_distributed

pytestmark = pytest.mark.multiprocess

HEADER = HEADER_LEN * 8  # int64 request / reply header
TAU, BETA, LR = 3, 0.6, 0.1
WORLD = 3
#: rank 1's local steps 3 (a round step) and 4 get a NaN loss in the three-worker runs
BAD = frozenset({(1, 3), (1, 4)})
SPLIT = 20  # the resumed run saves after this many steps of the schedule


def _schedule(n: int) -> list[int]:
    """Which rank takes each step: uneven speeds, rank 0 fastest. Rank 1 starts with a whole period,
    so it fetches before rank 0 has taken a step: the server thread must start at the evaluation."""
    rng = random.Random(5)
    return [1] * TAU + [rng.choices(range(WORLD), weights=[1.0, 0.6, 0.8])[0] for _ in range(n - TAU)]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _batches(steps: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(steps)]


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _sgd(model: torch.nn.Module, eamsgd: bool) -> torch.optim.SGD:
    momentum = 0.9 if eamsgd else 0.0  # EAMSGD: Nesterov momentum in the local steps
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum, nesterov=eamsgd, weight_decay=1e-3)


def _reference(
    schedule: list[int], world: int, eamsgd: bool, bad: frozenset[tuple[int, int]]
) -> tuple[list[torch.Tensor], torch.Tensor, list[int]]:
    """Algorithm 1 of the EASGD paper, one worker at a time in `schedule` order, in one process."""
    models = [_model() for _ in range(world)]
    opts = [_sgd(m, eamsgd) for m in models]
    batches = [_batches(len(schedule), r) for r in range(world)]
    center, alpha = _flat(models[0]), BETA / world
    steps, rounds = [0] * world, [0] * world
    for r in schedule:
        steps[r] += 1
        model, opt = models[r], opts[r]
        x, y = batches[r][steps[r] - 1]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if (r, steps[r]) in bad:  # the non-finite policy: this worker's gradient is zeroed
            for p in model.parameters():
                assert p.grad is not None
                p.grad.zero_()
        elastic = None
        if steps[r] % TAU == 0:  # fetch c, e = alpha (x - c) at the x the gradient was taken at
            elastic = (_flat(model) - center) * alpha
            center = center + elastic  # the server: c <- c + e
        opt.step()
        if elastic is not None:  # the worker: x <- x - e, after its local step
            with torch.no_grad():
                offset = 0
                for p in model.parameters():
                    p.sub_(elastic[offset : offset + p.numel()].view_as(p))
                    offset += p.numel()
            rounds[r] += 1
    return [_flat(m) for m in models], center, rounds


# ---------------------------------------------------------------------------- worker side


def _setup(ctx: Any, eamsgd: bool) -> tuple[torch.nn.Module, commsgd.CommOptimizer, EASGDServer]:
    model = _model()
    algo = commsgd.build_algorithm("easgd", mode="async-server", tau=TAU, beta=BETA, eamsgd=eamsgd)
    assert isinstance(algo, EASGDServer)
    return model, commsgd.CommOptimizer(_sgd(model, eamsgd), algo, model, ctx), algo


def _run(
    ctx: Any,
    opt: commsgd.CommOptimizer,
    model: torch.nn.Module,
    ticks: list[int],
    bad: frozenset[tuple[int, int]],
) -> None:
    """The schedule's steps: the named rank steps, then everyone waits for the center to hold its push."""
    batches = _batches(200, ctx.rank)
    for rank in ticks:
        if ctx.rank == rank:
            x, y = batches[opt.steps]
            nan = (rank, opt.steps + 1) in bad
            opt.step(lambda x=x, y=y, nan=nan: F.cross_entropy(model(x), y) * (float("nan") if nan else 1.0))
        with opt.evaluated_parameters():
            pass


def _result(opt: commsgd.CommOptimizer, model: torch.nn.Module, algo: EASGDServer) -> dict[str, Any]:
    with opt.evaluated_parameters():
        center = _flat(model)
    algo.finish()
    state = algo.state_dict()
    tensors = [t for t in state.get("center", {}).get("tensors", [])]
    return {
        "params": _flat(model),
        "center": center,
        "summary": algo.summary(),
        "finite": all_finite([*model.parameters(), *tensors, center]),
    }


def _one_worker(steps: int) -> list[dict[str, Any]]:
    ctx, results = commsgd.init(ClusterConfig(timeout_s=30)), []
    for eamsgd in (False, True):
        model, opt, algo = _setup(ctx, eamsgd)
        _run(ctx, opt, model, [0] * steps, frozenset())
        results.append(_result(opt, model, algo))
    ctx.close()
    return results


def _three_workers(schedule: list[int]) -> dict[str, Any]:
    ctx = commsgd.init(ClusterConfig(timeout_s=30))
    out: dict[str, Any] = {}

    model, opt, algo = _setup(ctx, eamsgd=True)
    before = dataclasses.replace(ctx.comm.meter.totals())
    _run(ctx, opt, model, schedule, BAD)
    out["straight"] = _result(opt, model, algo)
    after = ctx.comm.meter.totals()
    out["straight"].update(
        sent=after.bytes_sent - before.bytes_sent, recv=after.bytes_recv - before.bytes_recv
    )
    out["params_bytes"] = _flat(model).numel() * 4

    model, opt, algo = _setup(ctx, eamsgd=True)
    _run(ctx, opt, model, schedule[:SPLIT], BAD)
    saved, saved_model = opt.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
    algo.finish()
    model, opt, algo = _setup(ctx, eamsgd=True)  # a fresh server and center, as after a restart
    model.load_state_dict(saved_model)
    opt.load_state_dict(saved)
    _run(ctx, opt, model, schedule[SPLIT:], BAD)
    out["resumed"] = {**_result(opt, model, algo), "saved": saved["algorithm"]}
    ctx.close()
    return out


# ---------------------------------------------------------------------------- tests


def test_one_worker_matches_algorithm_1() -> None:
    steps = 10
    results = run_distributed(_one_worker, 1, steps)[0]
    for eamsgd, r in zip((False, True), results):
        params, center, rounds = _reference([0] * steps, 1, eamsgd, frozenset())
        torch.testing.assert_close(r["params"], params[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(r["center"], center, rtol=1e-6, atol=1e-7)
        assert not torch.equal(r["params"], r["center"])  # the worker and the center differ
        assert r["summary"]["rounds"] == rounds[0] == steps // TAU
        assert r["summary"]["alpha"] == pytest.approx(BETA)
        server = r["summary"]["server"]
        assert server["version"] == server["fetches_served"][0] == rounds[0]


@pytest.fixture(scope="module")
def three_workers() -> tuple[list[int], list[dict[str, Any]]]:
    schedule = _schedule(45)
    return schedule, run_distributed(_three_workers, WORLD, schedule)


def test_three_workers_on_a_schedule_match_algorithm_1(
    three_workers: tuple[list[int], list[dict[str, Any]]],
) -> None:
    schedule, results = three_workers
    params, center, rounds = _reference(schedule, WORLD, True, BAD)
    assert len(set(rounds)) > 1  # the workers' clocks differ: they did not exchange in lockstep
    for rank, r in enumerate(results):
        for run in (r["straight"], r["resumed"]):
            torch.testing.assert_close(run["params"], params[rank], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(run["center"], center, rtol=1e-6, atol=1e-7)
            assert run["finite"]  # the NaN worker's gradient was zeroed, nothing was poisoned
            assert run["summary"]["rounds"] == rounds[rank]
    server = results[0]["straight"]["summary"]["server"]
    assert server["pushes_applied"] == server["fetches_served"] == rounds
    assert server["version"] == sum(rounds) and server["max_staleness"] == 0  # one worker at a time


def test_every_exchange_is_a_fetch_and_a_push(three_workers: tuple[list[int], list[dict[str, Any]]]) -> None:
    schedule, results = three_workers
    _, _, rounds = _reference(schedule, WORLD, True, BAD)
    payload = results[0]["params_bytes"]
    for rank, r in enumerate(results[1:], start=1):
        run = r["straight"]
        # per round: a fetch header, the reply header and the center; a push header and e. DONE at the end
        assert run["sent"] == rounds[rank] * (2 * HEADER + payload) + HEADER
        assert run["recv"] == rounds[rank] * (HEADER + payload)
    straight = results[0]["straight"]
    assert straight["sent"] == 0 and straight["recv"] == 0  # rank 0 reaches the center in process
    server = straight["summary"]["server"]
    assert server["bytes_recv"] == sum(r["straight"]["sent"] for r in results[1:])
    assert server["bytes_sent"] == sum(r["straight"]["recv"] for r in results[1:])


def test_state_dict_holds_the_center_on_rank_0(three_workers: tuple[list[int], list[dict[str, Any]]]) -> None:
    schedule, results = three_workers
    _, _, rounds = _reference(schedule[:SPLIT], WORLD, True, BAD)
    saved = [r["resumed"]["saved"] for r in results]
    assert "center" in saved[0] and all("center" not in s for s in saved[1:])
    assert [s["rounds"] for s in saved] == rounds and all(s["mode"] == "async-server" for s in saved)
    assert saved[0]["center"]["version"] == sum(rounds)
    server = results[0]["resumed"]["summary"]["server"]
    _, _, total = _reference(schedule, WORLD, True, BAD)
    assert server["version"] == sum(total)  # restored pushes plus this run's

"""The simulated world (`commsgd.simworld`): the same results and byte counts as gloo processes, every
collective type the algorithms use, and a failing or stuck worker ends the run with its error."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import pytest
import torch

import commsgd
from commsgd.algorithms import build_algorithm
from commsgd.api import CommOptimizer
from commsgd.comm import CommMeter
from commsgd.simworld import SCHEDULERS, SimulatedWorld, run_simulated
from commsgd.testing import run_distributed

#: (name, params): the model-averaging, leader, decentralized and gradient families; lsgd with node leaders
#: (2 nodes of 2 workers) uses the node groups
ALGORITHMS: list[tuple[str, dict[str, Any]]] = [
    ("allreduce", {"bucket_mb": 0.0001}),  # several buckets, all-reduced asynchronously during backward
    ("local_sgd", {"tau": 2}),
    ("lsgd", {"tau": 2, "tau_global": 4, "window": 2, "leaders": "node"}),
    ("dpsgd", {"topology": "ring"}),
    ("easgd", {"tau": 2, "beta": 0.5}),
    # streaming with a fragment in flight (an asynchronous all-reduce) and a compressed pseudo-gradient
    ("diloco", {"inner_steps": 4, "fragments": 2, "overlap_steps": 1, "mix": 0.5}),
    ("diloco", {"inner_steps": 2, "compressor": "topk", "ratio": 0.5}),
]
STEPS = 6


def _traffic(meter: CommMeter) -> dict[str, tuple[float, float, int, int]]:
    """Per phase: what the meter counted (not its times)."""
    return {name: (c.bytes_sent, c.bytes_recv, c.payload_bytes, c.calls) for name, c in meter.phases.items()}


def _train_each(algorithms: list[tuple[str, dict[str, Any]]] = ALGORITHMS) -> dict[str, Any]:
    """A few steps of every algorithm in `algorithms` on a small float64 model; parameters and traffic."""
    ctx = commsgd.init()
    out: dict[str, Any] = {}
    for case, (name, params) in enumerate(algorithms):
        ctx.comm.meter = CommMeter()
        torch.manual_seed(ctx.rank)  # a different start on every worker
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        opt = CommOptimizer(sgd, build_algorithm(name, **params), model, ctx)
        data = torch.Generator().manual_seed(100 + ctx.rank)
        for step in range(1, STEPS + 1):
            x = torch.randn(8, 3, generator=data, dtype=torch.float64)
            y = torch.randn(8, 2, generator=data, dtype=torch.float64)

            def loss(x: torch.Tensor = x, y: torch.Tensor = y, m: torch.nn.Module = model) -> torch.Tensor:
                return ((m(x) - y) ** 2).mean()

            opt.step(loss, step=step)
        with torch.no_grad(), opt.evaluated_parameters():
            evaluated = [p.detach().clone() for p in model.parameters()]
        params_now = [p.detach().clone() for p in model.parameters()]
        out[f"{case} {name}"] = {
            "params": params_now,
            "evaluated": evaluated,
            "traffic": _traffic(ctx.comm.meter),
        }
    return out


def _every_collective() -> dict[str, Any]:
    """Every op of the Communicator (and the store operations) once, on values that depend on the rank."""
    ctx = commsgd.init()
    comm, r, p = ctx.comm, ctx.rank, ctx.world_size
    ctx.comm.meter = CommMeter()
    out: dict[str, Any] = {}
    base = torch.arange(4, dtype=torch.float64) * (r + 1) + r / 3
    for op in ("sum", "avg", "max", "min"):
        t = base.clone()
        comm.all_reduce(t, op=op)
        out[f"all_reduce_{op}"] = t
    first, second = base.clone(), base.clone() * 2
    pending = [comm.all_reduce(first, async_op=True), comm.all_reduce(second, op="max", async_op=True)]
    for handle in reversed(pending):  # waited in the other order
        assert handle is not None
        handle.wait()
    out["async"] = (first, second)
    t = base.clone()
    comm.broadcast(t, src=2)
    out["broadcast"] = t
    out["all_gather"] = comm.all_gather(base)
    rs = torch.empty(2, dtype=torch.float64)
    comm.reduce_scatter(rs, torch.arange(2.0 * p, dtype=torch.float64) + r)
    out["reduce_scatter"] = rs
    a2a = torch.empty(2 * p, dtype=torch.float64)
    comm.all_to_all(a2a, torch.arange(2.0 * p, dtype=torch.float64) + 10 * r)
    out["all_to_all"] = a2a
    out["gather"] = comm.gather(base, dst=1)
    sc = torch.empty(3, dtype=torch.float64)
    chunks = torch.arange(3.0 * p, dtype=torch.float64).view(p, 3) if r == 3 else None
    comm.scatter(sc, chunks, src=3)
    out["scatter"] = sc
    # point to point: a ring by blocking send/recv (even ranks send first), then a neighbour exchange
    right, left = (r + 1) % p, (r - 1) % p
    got = torch.empty(4, dtype=torch.float64)
    if r % 2 == 0:
        comm.send(base, right)
        comm.recv(got, left)
    else:
        comm.recv(got, left)
        comm.send(base, right)
    out["ring"] = got
    from_left, from_right = torch.empty(4, dtype=torch.float64), torch.empty(4, dtype=torch.float64)
    comm.exchange([(base, left), (base * 2, right)], [(from_left, left), (from_right, right)])
    out["exchange"] = (from_left, from_right)
    if r == 0:  # receives from any source, in whatever order they come
        senders = sorted(comm.recv(torch.empty(1), None) for _ in range(p - 1))
        out["any_source"] = senders
    else:
        comm.send(torch.tensor([float(r)]), 0)
    node_sum = base.clone()
    comm.all_reduce(node_sum, group=ctx.node_group)
    out["node_group"] = node_sum
    pair = comm.new_group([0, 2])
    if r in (0, 2):
        t = base.clone()
        comm.broadcast(t, src=2, group=pair)
        out["pair"] = t
    comm.barrier()
    out["json"] = comm.all_gather_json({"rank": r, "name": "x" * r})
    store = ctx.store
    total = comm.store_add(store, "counter", r + 1)
    comm.barrier()
    out["store_add"] = (total <= sum(range(1, p + 1)), comm.store_add(store, "counter", 0))
    if r == 1:
        comm.store_set(store, "key", b"value")
    out["store_get"] = comm.store_get(store, "key")
    out["store_check"] = (comm.store_check(store, "key"), comm.store_check(store, "missing"))
    won = comm.store_compare_set(store, "race", b"", f"rank{r}".encode())
    comm.barrier()
    now = comm.store_compare_set(store, "race", b"nope", b"x")  # not set: the winner's value comes back
    # the first compare_set of every rank returns the winner's value (set by it, or found by the others)
    out["compare_set"] = (now in {f"rank{i}".encode() for i in range(p)}, won == now)
    out["traffic"] = _traffic(comm.meter)
    return out


def _everything() -> dict[str, Any]:
    return {"collectives": _every_collective(), "training": _train_each()}


@pytest.fixture(scope="module")
def both() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """`_everything` on 4 gloo processes (spawned once) and on 4 simulated workers, 2 nodes of 2 in both:
    per rank (gloo, sim)."""
    gloo = run_distributed(_everything, 4, local_world_size=2)
    sim = run_simulated(_everything, 4, local_world_size=2, timeout=60)
    return list(zip(gloo, sim))


def _assert_same(gloo: Any, sim: Any, where: str, exact: bool = False) -> None:
    """Equal structures; tensors equal to rounding (gloo adds in another order), or bitwise if `exact`."""
    if isinstance(gloo, torch.Tensor):
        if exact:
            assert torch.equal(sim, gloo), where
        else:
            torch.testing.assert_close(sim, gloo, rtol=1e-12, atol=1e-12, msg=lambda m: f"{where}: {m}")
    elif isinstance(gloo, dict):
        assert sim.keys() == gloo.keys(), where
        for key in gloo:
            _assert_same(gloo[key], sim[key], f"{where}.{key}", exact)
    elif isinstance(gloo, list | tuple):
        assert len(sim) == len(gloo), where
        for i, (g, s) in enumerate(zip(gloo, sim)):
            _assert_same(g, s, f"{where}[{i}]", exact)
    else:
        assert sim == gloo, where


@pytest.mark.multiprocess
def test_algorithms_match_gloo_processes(both: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    for rank, (gloo, sim) in enumerate(both):
        for case, (name, _) in enumerate(ALGORITHMS):
            key = f"{case} {name}"
            assert gloo["training"][key]["traffic"]["train"][3] > 0, key  # it communicated at all
            _assert_same(gloo["training"][key], sim["training"][key], f"rank {rank} {key}")


@pytest.mark.multiprocess
def test_every_collective_matches_gloo_processes(both: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    for rank, (gloo, sim) in enumerate(both):
        _assert_same(gloo["collectives"], sim["collectives"], f"rank {rank}")
    sim0 = both[0][1]["collectives"]
    assert sim0["any_source"] == [1, 2, 3]
    assert sim0["all_reduce_sum"].tolist() == [2.0, 12.0, 22.0, 32.0]  # sum of (r + 1) * i + r / 3


def test_every_init_builds_its_own_context_as_in_a_process() -> None:
    """A second `commsgd.init` with another node layout gets that layout and a meter of its own (before
    the fix it got the first context back: LSGD's two-level runs used one node, bytes added up)."""
    from commsgd.config import ClusterConfig

    def fn() -> tuple[int, int, int, int]:
        first = commsgd.init()
        first.comm.all_reduce(torch.ones(4))
        second = commsgd.init(cluster=ClusterConfig(group_size=2))
        return first.num_nodes, second.num_nodes, len(second.node_ranks), second.comm.meter.totals().calls

    assert run_simulated(fn, 4) == [(1, 2, 2, 0)] * 4


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_results_are_bitwise_equal_on_every_worker(scheduler: str) -> None:
    def fn() -> torch.Tensor:
        ctx = commsgd.init()
        t = torch.randn(1000, dtype=torch.float32, generator=torch.Generator().manual_seed(ctx.rank)) / 3
        ctx.comm.all_reduce(t, op="avg")
        return t

    results = run_simulated(fn, 7, scheduler=scheduler)
    assert all(torch.equal(results[0], t) for t in results)
    expected = sum(
        (torch.randn(1000, generator=torch.Generator().manual_seed(r)) / 3 for r in range(1, 7)),
        torch.randn(1000, generator=torch.Generator().manual_seed(0)) / 3,
    )
    assert torch.equal(results[0], expected / 7)  # rank order, then the division


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_failing_worker_ends_the_run_with_its_error(scheduler: str) -> None:
    def fn() -> int:
        ctx = commsgd.init()
        for step in range(100):
            if ctx.rank == 2 and step == 3:  # ranks 0 and 3 wait for it in the all-reduce
                raise ValueError("rank two broke")
            t = torch.ones(3)
            ctx.comm.all_reduce(t)
            if ctx.rank == 1 and step == 2:  # and rank 1 in a receive that will never come
                ctx.comm.recv(torch.empty(1), 0)
        return ctx.rank

    with pytest.raises(RuntimeError, match=r"rank 2: ValueError: rank two broke"):
        SimulatedWorld(4, timeout_s=60, scheduler=scheduler).run(fn)
    assert not [t for t in threading.enumerate() if t.name.startswith("commsgd-sim-rank")]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_deadlock_is_an_error_naming_the_waits(scheduler: str) -> None:
    def fn() -> None:
        ctx = commsgd.init()
        if ctx.rank == 0:
            ctx.comm.barrier()
        else:
            ctx.comm.recv(torch.empty(1), 0)

    with pytest.raises(TimeoutError, match=r"deadlock.*rank 0: barrier.*rank 1: recv from 0"):
        SimulatedWorld(3, timeout_s=1, scheduler=scheduler).run(fn)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_mismatched_collectives_fail_every_worker(scheduler: str) -> None:
    def fn() -> None:
        ctx = commsgd.init()
        t = torch.ones(2)
        if ctx.rank == 0:
            ctx.comm.broadcast(t, src=0)
        else:
            ctx.comm.all_reduce(t)

    with pytest.raises(RuntimeError, match=r"rank 0 called \('broadcast'.*called \('all_reduce'"):
        run_simulated(fn, 3, timeout=10, scheduler=scheduler)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_network_model_delays_are_counted(scheduler: str) -> None:
    from commsgd.config import NetworkConfig

    def fn() -> float:
        net = NetworkConfig(enabled=True, intra_gbps=1.0, intra_latency_us=20_000.0)
        ctx = commsgd.init(network=net)
        t = torch.ones(10)
        for _ in range(3):
            ctx.comm.all_reduce(t)
        return ctx.comm.meter.totals().model_delay_s

    started = time.monotonic()
    delays = run_simulated(fn, 4, scheduler=scheduler)
    # the workers' delays overlap: about 0.36 s in all, not 4 x 0.36 s one after the other
    assert time.monotonic() - started < 1.2
    # per all-reduce 2 (p - 1) hops of 20 ms and 2 (p - 1) / p of its 40 bytes at 1 Gbit/s; three of them
    assert delays == pytest.approx([3 * (6 * 0.02 + 1.5 * 40 * 8 / 1e9)] * 4)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_many_workers_lsgd_on_toy2d(scheduler: str) -> None:
    from commsgd import reproduce

    s = dict(reproduce.DEFAULTS["toy2d"], steps=20)
    s["points"] = reproduce.more_points([], 64)
    workers = SimulatedWorld(64, scheduler=scheduler).run(reproduce._toy2d_worker, s)
    # LGD: after one step every worker has moved a tenth of the way toward the same leader
    best = min(w["lgd"]["final"] for w in workers)
    assert best <= min(w["lgd"]["losses"][0][1] for w in workers)
    assert len({tuple(w["lgd"]["center_x"]) for w in workers}) == 1  # the average, the same everywhere


# -- the greenlet scheduler: what threads give, each worker's grad mode, its limit

#: ALGORITHMS but the all-reduce overlapped with backward, which waits inside backward (threads only)
NO_BACKWARD_WAITS = [(name, params) for name, params in ALGORITHMS if name != "allreduce"]


def _greenlet_safe() -> dict[str, Any]:
    return {"collectives": _every_collective(), "training": _train_each(NO_BACKWARD_WAITS)}


def test_greenlets_give_bitwise_what_threads_give() -> None:
    threads = run_simulated(_greenlet_safe, 4, local_world_size=2, timeout=60)
    greenlets = run_simulated(_greenlet_safe, 4, local_world_size=2, timeout=60, scheduler="greenlet")
    for rank, (t, g) in enumerate(zip(threads, greenlets)):
        _assert_same(t, g, f"rank {rank}", exact=True)
    assert greenlets[0]["collectives"]["any_source"] == [1, 2, 3]


def test_greenlets_keep_each_workers_grad_mode() -> None:
    """A worker that waits inside `no_grad` leaves the others' grad mode alone, and gets its own back;
    every worker starts with grad enabled (as a new thread), and the caller's mode is its own."""

    def fn() -> list[bool]:
        ctx = commsgd.init()
        seen = [torch.is_grad_enabled()]
        t = torch.ones(1)
        if ctx.rank == 0:
            with torch.no_grad():
                ctx.comm.all_reduce(t)  # the others run while rank 0 waits here
                seen.append(torch.is_grad_enabled())
        else:
            ctx.comm.all_reduce(t)
            seen.append(torch.is_grad_enabled())
        ctx.comm.barrier()
        return [*seen, torch.is_grad_enabled()]

    with torch.no_grad():
        got = run_simulated(fn, 3, scheduler="greenlet")
        assert not torch.is_grad_enabled()
    assert got == [[True, False, True], [True, True, True], [True, True, True]]


def test_greenlets_refuse_a_wait_inside_backward() -> None:
    """The all-reduce overlapped with backward waits at the end of the pass: coroutines would share the
    autograd engine's per-thread state, so the run fails naming the scheduler that can."""

    def fn() -> None:
        ctx = commsgd.init()
        model = torch.nn.Linear(3, 1)
        algo = build_algorithm("allreduce", bucket_mb=0.0001)
        opt = CommOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), algo, model, ctx)
        opt.step(lambda: model(torch.ones(2, 3)).sum())

    with pytest.raises(RuntimeError, match=r'waits inside backward.*scheduler="threads"'):
        run_simulated(fn, 2, timeout=30, scheduler="greenlet")
    run_simulated(fn, 2, timeout=30)  # threads: fine


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_thread_of_the_workers_own_talks_to_them(scheduler: str) -> None:
    """A thread a worker starts (as a parameter server does) receives and sends while every worker
    waits: its send wakes the receiver though no worker holds the baton."""

    def fn() -> float:
        ctx = commsgd.init()
        if ctx.rank == 0:

            def serve() -> None:
                got = torch.empty(1)
                ctx.comm.recv(got, 1)
                ctx.comm.send(got * 2, 1)

            server = threading.Thread(target=serve, daemon=True)
            server.start()
            ctx.comm.barrier()  # rank 1 reaches it after the server's answer
            server.join(10)
            return -1.0 if server.is_alive() else 0.0
        answer = torch.empty(1)
        ctx.comm.send(torch.tensor([21.0]), 0)
        ctx.comm.recv(answer, 0)
        ctx.comm.barrier()
        return float(answer)

    assert run_simulated(fn, 2, timeout=30, scheduler=scheduler) == [0.0, 42.0]


def test_greenlets_report_progress_while_every_worker_is_busy() -> None:
    """Some worker is always ready, yet `progress` is called on time (the coroutines yield to it)."""
    from commsgd.simworld import report_progress

    def fn() -> None:
        ctx = commsgd.init()
        t = torch.ones(1)
        for step in range(3000):
            ctx.comm.all_reduce(t)
            if step % 100 == 0:
                report_progress(step=step)

    calls: list[dict[str, Any]] = []
    SimulatedWorld(2, scheduler="greenlet").run(
        fn, progress=lambda w: calls.append(dict(w.progress)), every_s=0.01
    )
    steps = [c["step"] for c in calls if "step" in c]  # (none before rank 0's first report)
    assert len(steps) >= 2 and steps[-1] > steps[0]


def test_greenlets_pass_on_a_keyboard_interrupt() -> None:
    """Ctrl-C lands in whichever coroutine runs: the run stops with it, as a thread's watcher would."""

    def fn() -> None:
        ctx = commsgd.init()
        if ctx.rank == 1:
            raise KeyboardInterrupt
        ctx.comm.barrier()

    with pytest.raises(KeyboardInterrupt):
        run_simulated(fn, 3, timeout=30, scheduler="greenlet")


def test_an_unknown_scheduler_is_refused() -> None:
    with pytest.raises(ValueError, match="scheduler must be one of"):
        SimulatedWorld(2, scheduler="fibers")


def test_closed_form_gradients_equal_autograd() -> None:
    """`commsgd reproduce` steps with the problems' closed-form gradients; they are autograd's."""
    from commsgd.problems import matrix_objective, matrix_value_and_grad, toy2d_loss, toy2d_value_and_grad

    points = torch.tensor(
        [[-6.0, -4.0], [0.3, 0.4], [1.4303, 0.0], [0.0, 0.0], [1e-20, 0.0]], dtype=torch.float64
    )
    for point in points:
        x = point.clone().requires_grad_(True)
        toy2d_loss(x).backward()
        value, grad = toy2d_value_and_grad(point)
        assert value == pytest.approx(float(toy2d_loss(point)), rel=1e-14, abs=1e-15)
        assert x.grad is not None
        torch.testing.assert_close(grad, x.grad, rtol=1e-12, atol=1e-15)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.randn(6, 2, generator=g, dtype=torch.float64)
    m = u @ u.T
    matrix_objective(x, m).backward()
    value, grad = matrix_value_and_grad(x.detach(), m)
    torch.testing.assert_close(value, matrix_objective(x.detach(), m))
    assert x.grad is not None
    torch.testing.assert_close(grad, x.grad)
    work = torch.full((6, 6), math.nan, dtype=torch.float64)  # a kept buffer: the same bits
    for _ in range(2):
        again, kept = matrix_value_and_grad(x.detach(), m, work)
        assert torch.equal(again, value) and torch.equal(kept, grad)


@pytest.mark.parametrize(
    "args",
    [
        ["toy2d", "--workers", "2000"],
        ["toy2d", "--processes", "--workers", "32"],
        ["toy2d", "--workers", "3", "--points", "1,2"],
        ["toy2d", "--workers", "0"],
        ["matrix-completion", "--workers", "65"],
    ],
)
def test_reproduce_worker_counts_checked(args: list[str], capfd: pytest.CaptureFixture[str]) -> None:
    from commsgd.cli import main

    assert main(["reproduce", *args]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("commsgd: error: reproduce --workers: ")


def test_more_points_keeps_the_given_ones_first() -> None:
    from commsgd.problems import PAPER_POINTS
    from commsgd.reproduce import more_points

    points = more_points(list(PAPER_POINTS), 10)
    assert points[:4] == list(PAPER_POINTS) and len(set(points)) == 10
    assert all(-20 <= c <= 20 for p in points[4:] for c in p)
    assert points == more_points(list(PAPER_POINTS), 10)  # the same every run

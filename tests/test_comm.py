"""The communication layer counts bytes by its documented model and applies the network model."""

from __future__ import annotations

import pytest
import torch

import commsgd
from commsgd.comm import Communicator
from commsgd.config import ClusterConfig, NetworkConfig
from commsgd.simworld import run_simulated
from commsgd.testing import run_distributed

WORLD = 3


def _ops() -> dict[str, tuple[float, float]]:
    """Run each op once on 3 workers (2 emulated nodes of sizes 1..); return (sent, recv) per op."""
    ctx = commsgd.init()
    comm, r = ctx.comm, ctx.rank
    result: dict[str, tuple[float, float]] = {}
    link: dict[str, float] = {}

    def measure(name: str, fn) -> None:  # type: ignore[no-untyped-def]
        before = comm.meter.totals()
        sent0, recv0, link0 = before.bytes_sent, before.bytes_recv, before.link_bytes
        fn()
        after = comm.meter.totals()
        result[name] = (after.bytes_sent - sent0, after.bytes_recv - recv0)
        link[name] = after.link_bytes - link0

    x = torch.full((100,), float(r))  # 400 bytes
    measure("all_reduce", lambda: comm.all_reduce(x, op="sum"))
    assert torch.equal(x, torch.full((100,), 3.0))  # 0 + 1 + 2
    y = torch.full((10,), float(r))
    measure("broadcast", lambda: comm.broadcast(y, src=2))
    assert torch.equal(y, torch.full((10,), 2.0))
    gathered: list[torch.Tensor] = []
    measure("all_gather", lambda: gathered.append(comm.all_gather(torch.tensor([r, r], dtype=torch.int64))))
    assert gathered[0].tolist() == [[0, 0], [1, 1], [2, 2]]
    out = torch.empty(2)
    measure("reduce_scatter", lambda: comm.reduce_scatter(out, torch.ones(6) * (r + 1), op="avg"))
    assert torch.equal(out, torch.full((2,), 2.0))
    a2a = torch.empty(3)
    measure("all_to_all", lambda: comm.all_to_all(a2a, torch.arange(3.0) + 10 * r))
    assert a2a.tolist() == [float(r), 10.0 + r, 20.0 + r]
    if r == 0:
        measure("p2p", lambda: comm.send(torch.ones(25), dst=1))
    elif r == 1:
        measure("p2p", lambda: comm.recv(torch.empty(25), src=0))
    else:
        measure("p2p", lambda: None)
    on_root: list[torch.Tensor | None] = []
    measure("gather", lambda: on_root.append(comm.gather(torch.full((5,), float(r)), dst=1)))  # 20 bytes
    assert (on_root[0] is not None) == (r == 1)
    part = torch.empty(4)  # 16 bytes each
    measure("scatter", lambda: comm.scatter(part, torch.arange(12.0).view(3, 4) if r == 0 else None, src=0))
    assert part.tolist() == [4.0 * r + i for i in range(4)]
    pending = []
    measure("async_all_reduce", lambda: pending.append(comm.all_reduce(torch.ones(25), async_op=True)))
    pending[0].wait()
    ring = [(torch.full((3,), float(r)), (r + 1) % WORLD)], [(torch.empty(3), (r - 1) % WORLD)]
    measure("exchange", lambda: comm.exchange(*ring))  # 12 bytes to the next rank, 12 from the last
    assert ring[1][0][0].tolist() == [float((r - 1) % WORLD)] * 3
    objs = comm.all_gather_json({"rank": r})
    assert objs == [{"rank": 0}, {"rank": 1}, {"rank": 2}]
    with comm.meter.in_phase("eval"):
        comm.all_reduce(torch.ones(50))
    result["eval_phase"] = (comm.meter.totals("eval").bytes_sent, comm.meter.totals("eval").calls)
    result["calls"] = (comm.meter.totals().calls, 0)
    result["link"] = link  # type: ignore[assignment]
    ctx.close()
    return result


@pytest.mark.multiprocess
def test_byte_model_of_every_op() -> None:
    results = run_distributed(_ops, WORLD)
    p = WORLD
    for rank, res in enumerate(results):
        assert res["all_reduce"] == pytest.approx((2 * (p - 1) / p * 400,) * 2)
        assert res["broadcast"] == pytest.approx(((p - 1) / p * 40,) * 2)
        assert res["all_gather"] == pytest.approx(((p - 1) * 16,) * 2)
        assert res["reduce_scatter"] == pytest.approx(((p - 1) / p * 24,) * 2)
        assert res["all_to_all"] == pytest.approx(((p - 1) / p * 12,) * 2)
        assert res["p2p"] == {0: (100, 0), 1: (0, 100), 2: (0, 0)}[rank]
        assert res["eval_phase"] == pytest.approx((2 * (p - 1) / p * 200, 1))
        # the busiest link: the same on every member, except point to point (counted by the sender);
        # a broadcast's hops each carry the whole tensor, a gather's root link every other piece
        link = res["link"]
        assert link["broadcast"] == pytest.approx(40)
        assert link["gather"] == pytest.approx((p - 1) * 20)
        for op in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all"):
            assert link[op] == pytest.approx(res[op][0])
        assert link["p2p"] == {0: 100, 1: 0, 2: 0}[rank]
        assert link["scatter"] == pytest.approx((p - 1) * 16)
        assert link["async_all_reduce"] == pytest.approx(2 * (p - 1) / p * 100)
        assert res["exchange"] == (12, 12) and link["exchange"] == 12  # the send counts, the receive not


def _subgroup_gather_and_all_to_all() -> list[list[float]] | None:
    """On 4 workers, the group of global ranks 1 and 3 (given as 3, 1): all_gather of a 2x2 block and
    all_to_all, whose pieces move by direct exchange on gloo; a point-to-point message with the default
    tag is in flight across the same peers meanwhile and must not be taken for one of its pieces."""
    ctx = commsgd.init()
    comm, r = ctx.comm, ctx.rank
    group = comm.new_group([3, 1])
    side = torch.full((5,), -1.0)
    if r in (1, 3):
        pending = comm.irecv(side, src=4 - r)
        rows = comm.all_gather(torch.full((2, 2), float(r)), group)
        a2a = torch.empty(4)
        comm.all_to_all(a2a, torch.arange(4.0) + 10 * r, group)
        comm.send(torch.full((5,), float(r)), dst=4 - r)
        pending.wait()
        result = [rows.view(-1).tolist(), a2a.tolist(), side.tolist()]
    ctx.close()
    return result if r in (1, 3) else None


@pytest.mark.multiprocess
def test_all_gather_and_all_to_all_of_a_subgroup_follow_its_sorted_ranks() -> None:
    results = run_distributed(_subgroup_gather_and_all_to_all, 4)
    assert results[0] is None and results[2] is None
    for r in (1, 3):
        rows, a2a, side = results[r]
        assert rows == [1.0] * 4 + [3.0] * 4  # group order: sorted global ranks
        me = 0 if r == 1 else 1
        assert a2a == [10.0 * 1 + 2 * me, 10.0 * 1 + 2 * me + 1, 10.0 * 3 + 2 * me, 10.0 * 3 + 2 * me + 1]
        assert side == [float(4 - r)] * 5


def _delayed_all_reduce(group_size: int) -> tuple[float, float, bool]:
    net = NetworkConfig(
        enabled=True, inter_gbps=0.01, inter_latency_us=0.0, intra_gbps=1e6, intra_latency_us=0.0
    )
    ctx = commsgd.init(cluster=ClusterConfig(group_size=group_size), network=net)
    ctx.comm.all_reduce(torch.ones(25_000))  # 100 kB
    c = ctx.comm.meter.totals()
    spans = ctx.world.spans_nodes
    ctx.close()
    return c.model_delay_s, c.bytes_sent, spans


@pytest.mark.multiprocess
def test_network_model_delay_follows_bytes_and_link_class() -> None:
    across = run_distributed(_delayed_all_reduce, 2, 1)  # two nodes of one worker: the inter-node link
    within = run_distributed(_delayed_all_reduce, 2, 2)  # one node of two workers: the intra-node link
    delay, sent, spans = across[0]
    assert spans
    assert delay == pytest.approx(sent * 8 / 0.01e9)  # bytes / bandwidth, no latency configured
    assert within[0][2] is False
    assert within[0][0] == pytest.approx(within[0][1] * 8 / 1e15)


def test_an_older_meter_state_without_link_bytes_takes_its_bytes_sent() -> None:
    comm = Communicator(rank=0, world_size=1, node_of=[0])
    comm.meter.load_state_dict({"train": {"bytes_sent": 40.0, "bytes_recv": 40.0, "calls": 2}})
    assert comm.meter.totals().link_bytes == 40.0


def test_store_ops_count_their_larger_direction_on_the_link() -> None:
    comm = Communicator(rank=0, world_size=1, node_of=[0])
    store = torch.distributed.HashStore()
    comm.store_set(store, "k", b"12345")  # 1 + 5 bytes up, nothing back
    assert comm.store_get(store, "k") == b"12345"  # 1 up, 5 back
    assert comm.meter.totals().link_bytes == 6 + 5


def _delayed_broadcast() -> tuple[float, float]:
    net = NetworkConfig(enabled=True, inter_gbps=0.01, inter_latency_us=0.0)
    ctx = commsgd.init(cluster=ClusterConfig(group_size=1), network=net)
    ctx.comm.broadcast(torch.ones(25_000), src=0)  # 100 kB
    c = ctx.comm.meter.totals()
    ctx.close()
    return c.model_delay_s, c.bytes_sent


def test_network_model_times_a_broadcast_by_the_whole_tensor() -> None:
    # each of 2 workers is counted half the tensor, but the link from the root carries all of it
    for delay, sent in run_simulated(_delayed_broadcast, 2):
        assert sent == pytest.approx(50_000)
        assert delay == pytest.approx(100_000 * 8 / 0.01e9)


def test_single_worker_groups_send_nothing() -> None:
    comm = Communicator(rank=0, world_size=1, node_of=[0])
    t = torch.ones(4)
    comm.all_reduce(t)
    comm.broadcast(t, src=0)
    assert comm.all_gather(t).shape == (1, 4)
    assert comm.meter.totals().bytes_sent == 0
    assert torch.equal(t, torch.ones(4))


def test_meter_state_round_trip() -> None:
    comm = Communicator(rank=0, world_size=1, node_of=[0])
    comm.meter.current.bytes_sent = 12.5
    with comm.meter.in_phase("eval"):
        comm.meter.current.calls = 3
    other = Communicator(rank=0, world_size=1, node_of=[0])
    other.meter.load_state_dict(comm.meter.state_dict())
    assert other.meter.totals().bytes_sent == 12.5
    assert other.meter.totals("eval").calls == 3

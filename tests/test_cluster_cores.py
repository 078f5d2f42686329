"""The emulated cluster's core plan: which cores each node runs on and how many threads its workers take."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from commsgd.bench import cluster as cl
from commsgd.bench.common import BenchEnv, Job
from commsgd.config import ClusterConfig, Config
from commsgd.train import worker_threads


@pytest.mark.parametrize("cores", range(1, 17))
@pytest.mark.parametrize("nodes", range(1, 5))
@pytest.mark.parametrize("procs", [1, 2, 3])
def test_every_node_gets_an_equal_share_and_disjoint_cores_when_there_are_enough(
    nodes: int, cores: int, procs: int
) -> None:
    machine = tuple(range(10, 10 + cores))  # not starting at 0: the plan uses the cores it is given
    shares = cl.share_cores(nodes, procs, machine)
    assert len(shares) == nodes
    if cores >= nodes:
        per = cores // nodes
        assert [len(s.cores) for s in shares] == [per] * nodes
        seen = [c for s in shares for c in s.cores]
        assert len(seen) == len(set(seen)) and set(seen) <= set(machine)  # disjoint, and real cores
        assert len(set(machine) - set(seen)) == cores % nodes  # only the remainder idles
        assert all(s.threads == max(1, per // procs) and not s.shared for s in shares)
    else:  # more nodes than cores: all share all, one thread each
        assert all(s.cores == machine and s.threads == 1 and s.shared for s in shares)
    assert all(s.threads * procs <= max(len(s.cores), procs) for s in shares)  # never oversubscribed


def test_small_layouts_exactly() -> None:
    def plan(nodes: int, procs: int, cores: int) -> list[tuple[tuple[int, ...], int]]:
        return [(s.cores, s.threads) for s in cl.share_cores(nodes, procs, range(cores))]

    assert plan(2, 1, 2) == [((0,), 1), ((1,), 1)]
    assert plan(1, 1, 2) == [((0, 1), 2)]
    assert plan(2, 2, 8) == [((0, 1, 2, 3), 2), ((4, 5, 6, 7), 2)]
    assert plan(3, 1, 4) == [((0,), 1), ((1,), 1), ((2,), 1)]
    assert plan(4, 1, 2) == [((0, 1), 1)] * 4
    assert plan(2, 4, 2) == [((0,), 1), ((1,), 1)]


def test_the_plan_is_said_in_one_line() -> None:
    assert cl.ClusterPlan("t", 2, 0.1, 1, cores=(0, 1)).sharing == (
        "node 0: cores {0}, 1 thread per worker; node 1: cores {1}, 1 thread per worker"
    )
    assert cl.ClusterPlan("t", 1, 0.1, 1, cores=(0, 1)).sharing == "node 0: cores {0,1}, 2 threads per worker"
    crowded = cl.ClusterPlan("t", 3, 0.1, 1, cores=(0, 1)).sharing
    assert "node 2: cores {0,1} (shared with the other nodes)" in crowded
    assert "3 nodes share 2 cores: each gets 0.67 of a core on average" in crowded
    assert "cores {2} idle" in cl.ClusterPlan("t", 2, 0.1, 1, cores=(0, 1, 2)).sharing
    assert "2 workers per node share 1 core(s)" in cl.ClusterPlan("t", 2, 0.1, 2, cores=(0, 1)).sharing


def test_each_torchrun_is_pinned_to_its_node_and_told_its_threads() -> None:
    plan = cl.ClusterPlan("t", 2, 1.0, 2, cores=(0, 1, 2, 3, 4, 5, 6, 7))
    node1 = plan.torchrun(1, ["train", "--out", "/tmp/x"])
    assert node1[:3] == ["taskset", "-c", "4,5,6,7"]
    assert node1[-1] == "cluster.threads=2" and node1.count("cluster.threads=2") == 1
    assert plan.torchrun(0, ["train"])[:3] == ["taskset", "-c", "0,1,2,3"]
    mine = plan.torchrun(0, ["train", "cluster.threads=3"])
    assert [a for a in mine if a.startswith("cluster.threads")] == ["cluster.threads=3"]
    assert cl.given_threads(["train", "cluster.threads=1", "cluster.threads=4"]) == "4"
    assert cl.given_threads(["train", "cluster.timeout_s=3"]) is None


def test_share_cores_refuses_empty_layouts() -> None:
    for nodes, procs, cores in ((0, 1, (0,)), (1, 0, (0,)), (1, 1, ())):
        with pytest.raises(ValueError):
            cl.share_cores(nodes, procs, cores)


def test_worker_threads_follow_the_affinity_mask_not_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("commsgd.train.os.sched_getaffinity", lambda pid: {3, 5, 7, 9})
    monkeypatch.setattr("commsgd.train.os.cpu_count", lambda: 64)
    assert worker_threads(Config(), 1) == 4
    assert worker_threads(Config(), 2) == 2
    assert worker_threads(Config(), 8) == 1
    assert worker_threads(Config(cluster=ClusterConfig(threads=3)), 8) == 3


def test_bench_jobs_get_the_nodes_threads_and_record_the_placement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = cl.Cluster(cl.ClusterPlan("t", 2, 0.1, 1, cores=(0, 1)), tmp_path)  # never entered: no namespaces
    started: list[list[str]] = []

    def run_train(run_dir: Path, argv: list[str], timeout_s: float) -> tuple[int, float]:
        started.extend(c.plan.torchrun(k, argv) for k in range(c.plan.nodes))
        run_dir.mkdir(parents=True)
        c.seen_affinity = {0: ["0"], 1: ["1"]}
        return 1, 0.5  # failed: train_on notes it and reads no summary

    monkeypatch.setattr(c, "run_train", run_train)
    monkeypatch.setattr(c, "link_bytes", lambda: [{"tx": 0, "rx": 0}] * 2)
    env = BenchEnv(tmp_path)
    result = cl.train_on(c, env, "x", Job("j", "allreduce", 2, 3, ["cluster.threads=7"]))
    for node, argv in enumerate(started):  # a job's own cluster.threads gives way to the node's
        assert argv[:3] == ["taskset", "-c", str(node)]
        assert [a for a in argv if a.startswith("cluster.threads")] == ["cluster.threads=1"]
        assert argv[-1] == "cluster.threads=1"
    saved = json.loads((env.runs_dir("x") / "j" / "cluster.json").read_text())
    assert saved == result.placement
    assert [n["workers_cpus_allowed"] for n in saved["nodes"]] == [["0"], ["1"]]
    assert saved["sharing"].startswith("node 0: cores {0}, 1 thread per worker")

"""cluster: an emulated multi-node cluster on this machine, with real shaped links between nodes.

    node k    network namespace commsgd-<tag>-n<k>: lo up, veth0 = 198.18.0.<k+1>/24, no default route
    switch    namespace commsgd-<tag>-sw: bridge br0 with one veth port n<k> per node
    shaping   tc tbf at the chosen rate on both ends of every node's link (upload and download)
    jobs      one torchrun per node (--nnodes N --node-rank k, c10d rendezvous on 198.18.0.1), gloo on
              veth0 (GLOO_SOCKET_IFNAME): traffic between nodes crosses the shaped link, traffic within a
              node goes over loopback (a node's own address is routed through lo)
    cores     each node's torchrun runs under `taskset -c` on its own share of this process's cores (its
              workers inherit it) and passes cluster.threads = the node's cores / its workers, so N nodes
              do not each take the whole machine (`share_cores`; with more nodes than cores they share
              all cores, and the output says so)

Addresses come from 198.18.0.0/15 (reserved for benchmarking). Nothing is added to the host's own
namespace and the node namespaces have no route beyond their /24, so traffic only flows between the
namespaces. Needs root and iproute2 (`apt-get install -y iproute2`); every namespace (and with it every
link and qdisc) is deleted on exit, on error and on Ctrl-C. Without root or namespace support, use the
in-process network model instead: `commsgd train ... network.enabled=true network.inter_gbps=1
cluster.group_size=2`.

    commsgd bench cluster                                  link test + allreduce vs lsgd at 1 and 0.1 Gbit/s
    commsgd bench cluster --nodes 2 --procs 2 --gbps 1 --train --out runs/x --algorithm lsgd --steps 300
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from commsgd.bench.common import BenchEnv, Job, available, run_subprocess, write_result
from commsgd.errors import UserError
from commsgd.metrics import write_json_atomic
from commsgd.report import Run, load_run, md_table, pct

TITLE = "emulated multi-node cluster (network namespaces, veth, tc tbf, one torchrun per node)"

SUBNET = ipaddress.ip_network("198.18.0.0/15")
FIRST = ipaddress.ip_address("198.18.0.1")
IFACE = "veth0"
FALLBACK = (
    "fall back to the in-process network model: commsgd train ... network.enabled=true "
    "network.inter_gbps=1 cluster.group_size=<workers per node>"
)


class ClusterUnavailable(UserError):
    """This machine cannot host the emulated cluster (not root, no iproute2, no namespaces or tbf)."""


# --------------------------------------------------------------------------------------- cores


def available_cores() -> tuple[int, ...]:
    """The cores this process may run on (its affinity mask), sorted."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


@dataclass(frozen=True)
class NodeShare:
    """The cores one emulated node runs on and the torch threads each of its workers takes."""

    cores: tuple[int, ...]
    threads: int
    shared: bool  # other nodes run on these cores too (more nodes than cores)

    def describe(self, node: int) -> str:
        threads = f"{self.threads} thread{'s' if self.threads > 1 else ''} per worker"
        shared = " (shared with the other nodes)" if self.shared else ""
        return f"node {node}: cores {{{','.join(map(str, self.cores))}}}{shared}, {threads}"


def share_cores(nodes: int, procs: int, cores: Sequence[int]) -> list[NodeShare]:
    """Each node's share of `cores` for `procs` workers per node (pure: nothing is pinned here).

    With at least as many cores as nodes, node k gets its own block of len(cores) // nodes cores (equal
    shares: a remainder stays idle) and each worker len(block) // procs threads, at least 1. With more
    nodes than cores no disjoint split exists: every node runs on all cores, one thread per worker, and
    the kernel's scheduler shares the cores among them (each node gets len(cores) / nodes on average).
    """
    if nodes < 1 or procs < 1 or not cores:
        raise ValueError(f"share_cores: need nodes, procs and cores >= 1, got {nodes}, {procs}, {cores}")
    ordered = tuple(sorted(set(cores)))
    if nodes > len(ordered):
        return [NodeShare(ordered, 1, True) for _ in range(nodes)]
    per = len(ordered) // nodes
    return [NodeShare(ordered[k * per : (k + 1) * per], max(1, per // procs), False) for k in range(nodes)]


def sharing_note(shares: Sequence[NodeShare], cores: Sequence[int], procs: int) -> str:
    """One line on how the nodes share the cores: every node's share, and what is idle or crowded."""
    parts = [share.describe(k) for k, share in enumerate(shares)]
    used = {c for share in shares for c in share.cores}
    idle = sorted(set(cores) - used)
    if shares and shares[0].shared:
        parts.append(
            f"{len(shares)} nodes share {len(set(cores))} cores: each gets "
            f"{len(set(cores)) / len(shares):.2g} of a core on average"
        )
    elif shares and procs > len(shares[0].cores):
        parts.append(f"{procs} workers per node share {len(shares[0].cores)} core(s)")
    if idle:
        parts.append(f"cores {{{','.join(map(str, idle))}}} idle so that every node gets an equal share")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class ClusterPlan:
    """Names, addresses and commands of one emulated cluster (pure data: nothing runs here)."""

    tag: str
    nodes: int
    gbps: float
    procs: int = 1
    port: int = 29400
    cores: tuple[int, ...] = field(default_factory=available_cores)  # the machine the nodes share

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= 250:
            raise ValueError(f"nodes: {self.nodes} is outside 1..250")
        if self.gbps <= 0:
            raise ValueError(f"gbps: must be > 0, got {self.gbps}")

    @property
    def shares(self) -> list[NodeShare]:
        """Each node's cores and threads per worker (`share_cores`)."""
        return share_cores(self.nodes, self.procs, self.cores)

    @property
    def sharing(self) -> str:
        """How the nodes share the cores, in one line for the output."""
        return sharing_note(self.shares, self.cores, self.procs)

    @property
    def switch(self) -> str:
        return f"commsgd-{self.tag}-sw"

    def namespace(self, node: int) -> str:
        return f"commsgd-{self.tag}-n{node}"

    @property
    def namespaces(self) -> list[str]:
        return [self.namespace(k) for k in range(self.nodes)] + [self.switch]

    def address(self, node: int) -> str:
        addr = FIRST + node
        assert addr in SUBNET
        return str(addr)

    @property
    def rate(self) -> str:
        return f"{round(self.gbps * 1e9)}bit"

    @property
    def burst(self) -> int:
        """Token bucket depth in bytes: 1 ms at the rate, at least 32 KiB (what a full bucket lets pass at
        once after an idle link: 2.6 ms of wire at 0.1 Gbit/s, 0.26 ms at 1 Gbit/s)."""
        return max(32 * 1024, round(self.gbps * 1e9 / 8 / 1000))

    @property
    def gso_bytes(self) -> int:
        """Largest packet the veth ends hand to tbf: half the bucket, at most 64 KiB.

        tbf cuts a GSO packet larger than its bucket into wire-size segments in software, so with the
        kernel's 64 KiB default every 1,500-byte frame crossed the bridge and both qdiscs on its own and a
        1 MB transfer cost the node's core 10-20 ms of softirq time, which a NIC with segmentation
        offload does not cost; packets that fit the bucket pass whole (2-5 ms per MB)."""
        return min(64 * 1024, self.burst // 2)

    def _tbf(self, namespace: str, device: str) -> list[str]:
        return [
            "tc",
            "-n",
            namespace,
            "qdisc",
            "add",
            "dev",
            device,
            "root",
            "tbf",
            "rate",
            self.rate,
            "burst",
            str(self.burst),
            "latency",
            "50ms",
        ]

    def setup_commands(self) -> list[list[str]]:
        sw = self.switch
        cmds = [
            ["ip", "netns", "add", sw],
            ["ip", "-n", sw, "link", "set", "lo", "up"],
            ["ip", "-n", sw, "link", "add", "br0", "type", "bridge"],
            ["ip", "-n", sw, "link", "set", "br0", "up"],
        ]
        for k in range(self.nodes):
            ns, port = self.namespace(k), f"n{k}"
            cmds += [
                ["ip", "netns", "add", ns],
                ["ip", "-n", ns, "link", "set", "lo", "up"],
                ["ip", "-n", sw, "link", "add", port, "type", "veth", "peer", "name", IFACE, "netns", ns],
                ["ip", "-n", sw, "link", "set", port, "master", "br0"],
                ["ip", "-n", sw, "link", "set", port, "up"],
                ["ip", "-n", ns, "addr", "add", f"{self.address(k)}/24", "dev", IFACE],
                ["ip", "-n", ns, "link", "set", IFACE, "up"],
                ["ip", "-n", ns, "link", "set", IFACE, "gso_max_size", str(self.gso_bytes)],
                ["ip", "-n", sw, "link", "set", port, "gso_max_size", str(self.gso_bytes)],
                self._tbf(ns, IFACE),
                self._tbf(sw, port),
            ]
        return cmds

    def teardown_commands(self) -> list[list[str]]:
        return [["ip", "netns", "del", ns] for ns in self.namespaces]

    def torchrun(self, node: int, train_argv: Sequence[str], module: str = "commsgd") -> list[str]:
        """torchrun (as `python -m torch.distributed.run`) for one node, pinned to the node's cores with
        `taskset -c` (its workers inherit the mask), running `python -m module train_argv`; for commsgd,
        `train_argv` starts with "train" and gets the node's `cluster.threads` unless it sets
        cluster.threads itself."""
        share = self.shares[node]
        threads = (
            [] if module != "commsgd" or given_threads(train_argv) else [f"cluster.threads={share.threads}"]
        )
        return [
            "taskset",
            "-c",
            ",".join(map(str, share.cores)),
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            str(self.nodes),
            "--nproc-per-node",
            str(self.procs),
            "--node-rank",
            str(node),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"{self.address(0)}:{self.port}",
            "--rdzv-id",
            f"commsgd-{self.tag}",
            "--rdzv-conf",
            f"is_host={int(node == 0)}",  # torch guesses the host by hostname, which all namespaces share
            "--local-addr",
            self.address(node),
            "--max-restarts",
            "0",
            "-m",
            module,
            *train_argv,
            *threads,
        ]

    def node_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a node's torchrun: gloo on the veth, no inherited rendezvous variables."""
        env = dict(os.environ if base is None else base)
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        env.update(GLOO_SOCKET_IFNAME=IFACE, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        return env


def given_threads(train_argv: Sequence[str]) -> str | None:
    """The value of a `cluster.threads=...` override among `train_argv`, if any (the last one wins)."""
    given = [a.split("=", 1)[1] for a in train_argv if a.startswith("cluster.threads=")]
    return given[-1] if given else None


# --------------------------------------------------------------------------------------- checks


def _sh(cmd: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)


def check_support() -> None:
    """ClusterUnavailable (one line, with the fallback) unless namespaces, veth and tbf work here."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise ClusterUnavailable(f"the emulated cluster needs root (namespaces, tc); {FALLBACK}")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise ClusterUnavailable(
            f"{' and '.join(missing)} not found: install iproute2 (apt-get install -y iproute2); or "
            f"{FALLBACK}"
        )
    if shutil.which("taskset") is None:
        raise ClusterUnavailable(
            f"taskset not found (it pins each node to its cores): install util-linux; or {FALLBACK}"
        )
    probe = ClusterPlan(f"probe{os.getpid()}", 1, 1.0)
    try:
        for cmd in probe.setup_commands():
            result = _sh(cmd)
            if result.returncode != 0:
                reason = (result.stderr.strip().splitlines() or ["failed"])[0]
                raise ClusterUnavailable(f"`{' '.join(cmd[:6])} ...`: {reason}; {FALLBACK}")
    finally:
        for cmd in probe.teardown_commands():
            _sh(cmd)


# --------------------------------------------------------------------------------------- the cluster


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@dataclass
class Cluster:
    """A running emulated cluster: a context manager that always deletes its namespaces."""

    plan: ClusterPlan
    log_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    seen_affinity: dict[int, list[str]] = field(default_factory=dict)  # of the last run_train's workers
    _handlers: dict[int, Any] = field(default_factory=dict)

    def __enter__(self) -> Cluster:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._handlers[sig] = signal.signal(sig, _interrupt)
        try:
            for ns in self.plan.namespaces:  # leftovers of a killed run with the same tag
                if Path("/var/run/netns", ns).exists() or Path("/run/netns", ns).exists():
                    _sh(["ip", "netns", "del", ns])
            for cmd in self.plan.setup_commands():
                result = _sh(cmd)
                if result.returncode != 0:
                    raise ClusterUnavailable(f"`{' '.join(cmd)}` failed: {result.stderr.strip()[:200]}")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop what this cluster started, delete its namespaces, restore signal handlers."""
        for proc in self.procs:
            _stop(proc)
        self.procs.clear()
        for ns in self.plan.namespaces:
            pids = _sh(["ip", "netns", "pids", ns]).stdout.split()
            for pid in pids:  # processes started inside our own namespaces
                with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                    os.kill(int(pid), signal.SIGKILL)
        for cmd in self.plan.teardown_commands():
            _sh(cmd)
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        self._handlers.clear()

    def start(self, node: int, argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        """Start `argv` inside node `node`'s namespace, in its own process group, output to `log`."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as handle:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.plan.namespace(node), *argv],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=self.plan.node_env(),
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def link_bytes(self) -> list[dict[str, int]]:
        """tx/rx byte counters of every node's veth (what crossed the shaped links)."""
        counters = []
        for k in range(self.plan.nodes):
            out = _sh(["ip", "-n", self.plan.namespace(k), "-j", "-s", "link", "show", IFACE]).stdout
            stats = (json.loads(out or "[{}]")[0]).get("stats64", {})
            counters.append(
                {
                    "tx": int(stats.get("tx", {}).get("bytes", 0)),
                    "rx": int(stats.get("rx", {}).get("bytes", 0)),
                }
            )
        return counters

    def worker_affinity(self) -> dict[int, list[str]]:
        """Cpus_allowed_list (from /proc) of each node's running `commsgd train` workers: what the
        kernel really lets them use, to check the pinning."""
        seen: dict[int, list[str]] = {}
        for k in range(self.plan.nodes):
            for pid in _sh(["ip", "netns", "pids", self.plan.namespace(k)]).stdout.split():
                with contextlib.suppress(OSError):
                    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if b"commsgd" not in args or b"train" not in args or b"torch.distributed.run" in args:
                        continue  # the node's torchrun agent, or not ours
                    status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
                    allowed = next(
                        ln.split(":", 1)[1].strip()
                        for ln in status.splitlines()
                        if ln.startswith("Cpus_allowed_list:")
                    )
                    seen.setdefault(k, []).append(allowed)
        return seen

    def _all_workers_seen(self) -> bool:
        return all(len(self.seen_affinity.get(k, [])) >= self.plan.procs for k in range(self.plan.nodes))

    def placement(self) -> dict[str, Any]:
        """The planned cores and threads of every node and the affinity its workers were seen with."""
        return {
            "cores": list(self.plan.cores),
            "sharing": self.plan.sharing,
            "nodes": [
                {
                    "node": k,
                    "cores": list(share.cores),
                    "threads_per_worker": share.threads,
                    "shared": share.shared,
                    "workers_cpus_allowed": self.seen_affinity.get(k, []),
                }
                for k, share in enumerate(self.plan.shares)
            ],
        }

    def measure_link(self, seconds: float = 1.5) -> dict[str, float]:
        """Gbit/s of one TCP stream node 1 -> node 0 (shaped), and within node 0 over loopback; the
        median round trip of 64 bytes node 1 -> node 0 (`link_rtt_s`)."""
        result: dict[str, float] = {}
        pairs = [("loopback", 0, "127.0.0.1", 2 * 10**9)]
        if self.plan.nodes > 1:
            pairs.insert(
                0, ("link", 1, self.plan.address(0), max(int(self.plan.gbps * 1e9 / 8 * seconds), 10**6))
            )
        for name, client_node, host, count in pairs:
            stats = self._linktest(
                name,
                ["server", host, "5201"],
                client_node,
                ["client", host, "5201", str(count)],
                reply="server",
            )
            with contextlib.suppress(KeyError, TypeError, ZeroDivisionError):
                result[f"{name}_gbps"] = stats["bytes"] * 8 / stats["seconds"] / 1e9
        if self.plan.nodes > 1:
            host = self.plan.address(0)
            rtt = self._linktest(
                "ping", ["echo", host, "5202"], 1, ["ping", host, "5202", "200"], reply="client"
            )
            if "rtt_s" in rtt:
                result["link_rtt_s"] = float(rtt["rtt_s"])
        return result

    def _linktest(
        self, name: str, server_args: list[str], client_node: int, client_args: list[str], reply: str
    ) -> dict[str, Any]:
        """linktest.py with `server_args` on node 0 and `client_args` on `client_node`: the JSON line the
        `reply` side ("server" or "client") printed; {} when it timed out or printed none."""
        script = str(Path(__file__).with_name("linktest.py"))
        logs = {side: self.log_dir / f"linktest-{name}-{side}.log" for side in ("server", "client")}
        server = self.start(0, [sys.executable, script, *server_args], logs["server"])
        client = self.start(client_node, [sys.executable, script, *client_args], logs["client"])
        try:
            server.wait(timeout=120)
            client.wait(timeout=30)
        except subprocess.TimeoutExpired:
            return {}
        lines = logs[reply].read_text(encoding="utf-8").strip().splitlines()
        try:
            found = json.loads(lines[-1])
        except (IndexError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def collective_latency(self, count: int = 200) -> float | None:
        """Median seconds of a one-float all-reduce of all nodes' workers (`commsgd.bench.latency`)."""
        out = self.log_dir / f"latency-{self.plan.tag}-{self.plan.gbps:g}gbps.json"
        out.unlink(missing_ok=True)
        code, _ = self.run_train(
            out.with_suffix(""), [str(out), str(count)], 120, module="commsgd.bench.latency"
        )
        with contextlib.suppress(OSError, ValueError, KeyError):
            return float(json.loads(out.read_text(encoding="utf-8"))["all_reduce_s"]) if code == 0 else None
        return None

    def run_train(
        self, run_dir: Path, train_argv: Sequence[str], timeout_s: float, module: str = "commsgd"
    ) -> tuple[int, float]:
        """One torchrun per node running `python -m module train_argv` (`commsgd train`); (exit code,
        seconds). Kills all on failure."""
        start = time.perf_counter()
        procs = [
            self.start(
                k, self.plan.torchrun(k, train_argv, module), run_dir.parent / f"{run_dir.name}.node{k}.log"
            )
            for k in range(self.plan.nodes)
        ]
        code, deadline, look_at = 0, time.monotonic() + timeout_s, 0.0
        self.seen_affinity = {}
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                code = failed[0] if failed else 124
                break
            if time.monotonic() >= look_at and not self._all_workers_seen():
                self.seen_affinity = self.worker_affinity() or self.seen_affinity
                look_at = time.monotonic() + 1.0
            time.sleep(0.2)
        for p in procs:
            _stop(p)
        code = code or next((p.returncode for p in procs if p.returncode), 0)
        return code, time.perf_counter() - start


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End a process this module started, with its process group (it was started as a session leader)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
            return


@contextlib.contextmanager
def cluster(plan: ClusterPlan, log_dir: Path) -> Iterator[Cluster]:
    """Check support, build the cluster, and always tear it down."""
    check_support()
    with Cluster(plan, log_dir) as c:
        yield c


# --------------------------------------------------------------------------------------- runs


@dataclass
class ClusterRun:
    """A training run on the emulated cluster, with the bytes that crossed the shaped links."""

    run: Run | None
    seconds: float
    wire_bytes: int
    placement: dict[str, Any] = field(default_factory=dict)


def write_placement(c: Cluster, run_dir: Path) -> dict[str, Any]:
    """`Cluster.placement` into the run directory as cluster.json (next to summary.json)."""
    placement = c.placement()
    if run_dir.is_dir():
        write_json_atomic(run_dir / "cluster.json", placement)
    return placement


def train_on(c: Cluster, env: BenchEnv, bench: str, job: Job) -> ClusterRun:
    run_dir = env.runs_dir(bench) / job.name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    # the node's share of the cores decides the threads (ClusterPlan.torchrun), not RUN_DEFAULTS' 1
    placed = ("network.", "cluster.group_size", "cluster.threads")
    argv = [a for a in job.argv(run_dir) if not a.startswith(placed)]
    env.log(f"{bench}: {job.name} on {c.plan.nodes} nodes x {c.plan.procs} at {c.plan.gbps} Gbit/s")
    before = c.link_bytes()
    code, seconds = c.run_train(run_dir, argv, timeout_s=900)
    after = c.link_bytes()
    wire = sum(a["tx"] - b["tx"] for a, b in zip(after, before))
    placement = write_placement(c, run_dir)
    run = None
    if code == 0 and (run_dir / "summary.json").is_file():
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        run = load_run(run_dir, label=job.name)
    else:
        env.note(
            f"{bench}: `{job.name}` on the emulated cluster failed (exit {code}); "
            f"see {run_dir.name}.node*.log"
        )
    return ClusterRun(run, seconds, wire, placement)


@contextlib.contextmanager
def bench_cluster(
    env: BenchEnv, bench: str, nodes: int, procs: int, gbps: float, log_dir: Path | None = None
) -> Iterator[Cluster]:
    """A fresh emulated cluster for a benchmark (logs in its runs folder, or `log_dir`); how the nodes
    share the cores goes into the result's notes, once per layout."""
    with cluster(ClusterPlan(f"{os.getpid()}", nodes, gbps, procs), log_dir or env.runs_dir(bench)) as c:
        note = f"{bench}: emulated cluster of {nodes} nodes x {procs}: {c.plan.sharing}"
        if note not in env.notes:
            env.note(note)
        yield c


def run_on_cluster(env: BenchEnv, bench: str, job: Job, nodes: int, procs: int, gbps: float) -> Run | None:
    """One job on a fresh emulated cluster; None (with a note) if the cluster cannot run here. How the
    nodes share the cores goes into the result's notes (once per layout)."""
    try:
        with bench_cluster(env, bench, nodes, procs, gbps) as c:
            return train_on(c, env, bench, job).run
    except ClusterUnavailable as exc:
        env.note(f"{bench}: {job.name}: {exc}")
        return None


# --------------------------------------------------------------------------------------- the benchmark


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--procs", type=int, default=2, help="worker processes per node")
    parser.add_argument("--gbps", type=float, nargs="+", help="link rates in Gbit/s (default: 1 0.1)")
    parser.add_argument("--algorithms", nargs="+", default=["allreduce", "lsgd"])
    parser.add_argument("--model", default="mlp", help="model (digits task); e.g. resnet20 for a heavier one")
    parser.add_argument("--steps", type=int, help="steps per worker (default 300; quick 10)")
    parser.add_argument(
        "--no-model-compare",
        action="store_true",
        help="skip the same runs under the in-process network model",
    )
    parser.add_argument("--tag", default=None, help="namespace tag (default: the process id)")
    parser.add_argument(
        "--train",
        nargs=argparse.REMAINDER,
        help="run one `commsgd train` job with these arguments (give --out) instead",
    )


def _unavailable(env: BenchEnv, args: argparse.Namespace, exc: ClusterUnavailable) -> str:
    body = f"Not available on this machine: {exc}"
    write_result(
        env, "cluster", "Emulated multi-node cluster", body, {"available": False, "reason": str(exc)}
    )
    if getattr(args, "in_suite", False):
        env.note(f"cluster: {exc}")
        return f"not available: {exc}"
    raise exc


def _train_only(env: BenchEnv, args: argparse.Namespace, tag: str) -> str:
    train = list(args.train)
    if "--out" not in train:
        raise UserError(
            "cluster --train: give --out RUN_DIR among the train arguments (every node writes there)"
        )
    run_dir = Path(train[train.index("--out") + 1])
    plan = ClusterPlan(tag, args.nodes, (args.gbps or [1.0])[0], args.procs)
    given = given_threads(train)
    kept = f" (cluster.threads={given} given: kept)" if given else ""
    print(f"cluster: {plan.sharing}{kept}", file=sys.stderr, flush=True)
    with cluster(plan, run_dir.parent) as c:
        link = c.measure_link()
        before = c.link_bytes()
        code, seconds = c.run_train(run_dir, ["train", *train], timeout_s=24 * 3600)
        wire = sum(a["tx"] - b["tx"] for a, b in zip(c.link_bytes(), before))
        placement = write_placement(c, run_dir)
    seen = "; ".join(
        f"node {n['node']} workers on cores {','.join(n['workers_cpus_allowed']) or '(not seen)'}"
        for n in placement["nodes"]
    )
    print(
        f"cluster: {seen}; link {link.get('link_gbps', 0):.3f} Gbit/s measured; "
        f"job exit {code} after {seconds:.1f} s; "
        f"{wire / 1e6:.1f} MB crossed the links; logs {run_dir.parent}/{run_dir.name}.node*.log",
        file=sys.stderr,
    )
    if code != 0:
        raise SystemExit(code)  # the namespaces are gone already; the job's own exit code
    return f"exit {code}"


def run(env: BenchEnv, args: argparse.Namespace) -> str:
    tag = args.tag or str(os.getpid())
    try:
        if args.train:
            return _train_only(env, args, tag)
        check_support()
    except ClusterUnavailable as exc:
        return _unavailable(env, args, exc)
    start = time.perf_counter()
    rates = args.gbps or ([1.0] if env.quick else [1.0, 0.1])
    steps = args.steps or (10 if env.quick else 300)
    algos = available(env, args.algorithms, "cluster")
    world = args.nodes * args.procs
    base = [f"model={args.model}", f"eval_every={max(steps // 10, 1)}"]
    rows, data = [], []
    layout = ClusterPlan(tag, args.nodes, rates[0], args.procs)
    for gbps in rates:
        plan = ClusterPlan(tag, args.nodes, gbps, args.procs)
        results: dict[str, ClusterRun] = {}
        with cluster(plan, env.runs_dir("cluster")) as c:
            link = c.measure_link()
            env.log(f"cluster: {gbps} Gbit/s shaped; measured {link}; {plan.sharing}")
            for algo in algos:
                job = Job(f"{algo}-{gbps:g}gbit", algo, world, steps, base)
                results[algo] = train_on(c, env, "cluster", job)
        for algo in algos:
            model_run = None
            if not args.no_model_compare and not env.quick:
                net = [
                    "network.enabled=true",
                    f"network.inter_gbps={gbps}",
                    f"cluster.group_size={args.procs}",
                ]
                model_run = run_subprocess(
                    env, "cluster", Job(f"{algo}-{gbps:g}gbit-model", algo, world, steps, base + net)
                )
            row, entry = _row(gbps, link, algo, results[algo], model_run, world, steps)
            rows.append(row)
            data.append(entry)
    headers = [
        "shaped rate",
        "measured link (1 TCP stream)",
        "algorithm",
        "wall time",
        "ms / step",
        "comm share",
        "commsgd bytes / worker-step",
        "bytes across nodes / step (veth)",
        "final test error",
        "network model: wall, comm share",
    ]
    body = "\n".join(
        [
            f"{args.nodes} nodes x {args.procs} worker processes ({world} workers), {args.model} on "
            f"digits, {steps} steps per worker, batch 32. Each node is a network namespace; its veth link "
            "to a bridge is shaped by tc tbf on both ends; one torchrun per node with c10d rendezvous on "
            "198.18.0.1; gloo on veth0. 'bytes across nodes' are the veth tx counters of all nodes "
            "(TCP/IP headers, rendezvous and evaluation included) per step. The last column runs the same "
            "job with the in-process network model at the same rate (one local launcher, "
            "cluster.group_size = procs) for comparison.",
            "",
            f"Cores: each node's torchrun is pinned with taskset to its share of the {len(layout.cores)} "
            f"cores this benchmark may use, and its workers take that share's threads: {layout.sharing}.",
            "",
            md_table(headers, rows),
        ]
    )
    write_result(
        env, "cluster", "Emulated multi-node cluster", body, {"runs": data}, time.perf_counter() - start
    )
    first = data[0] if data else {}
    return f"link {first.get('link_gbps', 0):.3f} Gbit/s at {rates[0]:g} Gbit/s shaping; {len(data)} runs"


def _row(
    gbps: float,
    link: dict[str, float],
    algo: str,
    result: ClusterRun,
    model_run: Run | None,
    world: int,
    steps: int,
) -> tuple[list[str], dict[str, Any]]:
    run = result.run
    measured = f"{link.get('link_gbps', 0):.3f} Gbit/s (loopback {link.get('loopback_gbps', 0):.1f})"
    entry: dict[str, Any] = {
        "gbps": gbps,
        "algorithm": algo,
        **link,
        "wire_bytes": result.wire_bytes,
        "placement": result.placement,
    }
    if run is None:
        return [f"{gbps:g} Gbit/s", measured, algo, "failed", "", "", "", "", "", ""], entry
    s = run.summary
    wall = float(s["wall_time_s"])
    steps_done = max(int(x) for x in s["steps"]) or steps
    share = sum(s["comm_share"]) / len(s["comm_share"])
    per_step = sum(s["bytes_per_step"]) / len(s["bytes_per_step"])
    model = "—"
    if model_run is not None:
        m = model_run.summary
        model = f"{float(m['wall_time_s']):.1f} s, {pct(sum(m['comm_share']) / len(m['comm_share']), 1)}"
    entry.update(
        wall_s=wall,
        comm_share=share,
        bytes_per_step=per_step,
        test_error=s["test_error"],
        model_wall_s=model_run.summary["wall_time_s"] if model_run else None,
    )
    row = [
        f"{gbps:g} Gbit/s",
        measured,
        algo,
        f"{wall:.1f} s",
        f"{1e3 * wall / steps_done:.1f}",
        pct(share, 1),
        f"{per_step / 1e3:.1f} KB",
        f"{result.wire_bytes / steps_done / 1e3:.1f} KB",
        pct(float(s["test_error"])),
        model,
    ]
    return row, entry

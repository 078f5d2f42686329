"""WorkerContext: who this worker is, which node it sits on, and the handles it communicates through.

Created once per worker process from the torch.distributed environment (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT), the same whether the embedded launcher or
`torchrun` started it. Nodes are real (LOCAL_WORLD_SIZE) or emulated (a configured group size).
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist

from commsgd.comm import CommGroup, Communicator
from commsgd.config import ClusterConfig, NetworkConfig
from commsgd.errors import ConfigError, say


class PeerFailure(RuntimeError):
    """A collective failed because peers died or hang; the one-line message names them.

    `lost`: the ranks without a heartbeat (empty when the job's store itself is gone).
    """

    def __init__(self, message: str, lost: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.lost = lost


def heartbeat_interval(timeout_s: float) -> float:
    """Seconds between two heartbeats: a thirtieth of the timeout, kept between 0.1 and 5 s."""
    return min(5.0, max(0.1, timeout_s / 30))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


class Heartbeat:
    """Tells the survivors of a failure which peers are gone.

    A daemon thread adds 1 to ``heartbeat/rank{r}`` on the job's store every `interval_s` seconds
    (over its own store connection). After a collective fails, `silent_peers` samples every counter,
    waits `wait_s` (three intervals, at least a second) and samples again: a peer whose counter did
    not move and that did not report a status (``failed`` after its own error, ``exited`` after a
    normal end) died or hangs. The store lives in the launcher (commsgd's, or torch elastic's agent
    under torchrun) or in rank 0, so this works whenever the store outlives the lost worker; when
    the store itself is gone, that is reported instead.
    """

    def __init__(self, store: Any, rank: int, world_size: int, interval_s: float) -> None:
        self.store, self.rank, self.world_size, self.interval_s = store, rank, world_size, interval_s
        self.wait_s = max(1.0, 3 * interval_s)
        try:
            beat_store = store.clone()  # the training thread keeps using `store`
            # A beat blocked in the store for longer than `halt` waits would leave the thread inside
            # C++ when the interpreter exits, and that aborts the process: bound each call.
            beat_store.set_timeout(timedelta(seconds=max(1.0, interval_s)))
        except (AttributeError, RuntimeError, NotImplementedError):
            beat_store = store
        self._beat_store = beat_store
        self._stop = threading.Event()
        self._status: str | None = None
        self._thread = threading.Thread(target=self._run, name="commsgd-heartbeat", daemon=True)
        self._thread.start()
        _RUNNING.add(self)

    def _run(self) -> None:
        key = f"heartbeat/rank{self.rank}"
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # a slow or vanished store: try again next beat
                self._beat_store.add(key, 1)
            self._stop.wait(self.interval_s)

    def report(self, status: str) -> None:
        """Record this worker's status (``failed`` or ``exited``) for peers diagnosing a failure."""
        if self._status == status:
            return
        self._status = status
        with contextlib.suppress(Exception):  # the store is gone: nobody is left to read it
            self.store.set(f"status/rank{self.rank}", status)

    def stop(self) -> None:
        if self._status is None:
            self.report("exited")
        self.halt()

    def halt(self) -> bool:
        """End the beat thread (no status is reported) and wait for it, a few intervals at most.

        False when the thread is still inside a store call: the store's timeout does not bound a
        call to a server that stopped answering (a stopped or overloaded launcher), and a daemon
        thread that returns from C++ while the interpreter finalizes aborts the process."""
        self._stop.set()
        self._thread.join(timeout=2 * self.interval_s + 1)
        _RUNNING.discard(self)
        if not self._thread.is_alive():
            return True
        say(  # said, so that an abort at exit that may follow is explained
            f"commsgd: warning: rank {self.rank}: the heartbeat thread is still inside a store call "
            f"after {2 * self.interval_s + 1:.0f} s (the job's store does not answer); the process "
            "may abort as it exits"
        )
        return False

    def silent_peers(self) -> tuple[list[int], list[int]] | None:
        """(peers without a heartbeat, peers that reported a failure); None when the store is unreachable."""
        keys = [f"heartbeat/rank{r}" for r in range(self.world_size)]
        try:
            before = [int(self.store.add(k, 0)) for k in keys]
            time.sleep(self.wait_s)
            after = [int(self.store.add(k, 0)) for k in keys]
            status = {
                r: bytes(self.store.get(f"status/rank{r}")).decode()
                for r in range(self.world_size)
                if r != self.rank and self.store.check([f"status/rank{r}"])
            }
        except Exception:
            return None
        silent = [
            r for r in range(self.world_size) if r != self.rank and r not in status and after[r] == before[r]
        ]
        failed = [r for r, s in sorted(status.items()) if s == "failed"]
        return silent, failed


#: heartbeats whose thread may still run: halted at exit when their context was never closed
_RUNNING: weakref.WeakSet[Heartbeat] = weakref.WeakSet()


@atexit.register
def _halt_heartbeats_at_exit() -> None:
    """A daemon thread caught inside a store call while the interpreter finalizes aborts the process
    ("terminate called without an active exception", exit code 134); `commsgd.init()` users often
    never close their context, so the beat threads are ended before finalization starts."""
    for heartbeat in list(_RUNNING):
        heartbeat.halt()


@dataclass
class WorkerContext:
    """Everything an algorithm needs to know about its place in the job."""

    rank: int
    world_size: int
    local_rank: int
    node: int
    num_nodes: int
    node_ranks: tuple[int, ...]
    device: torch.device
    backend: str
    comm: Communicator
    node_group: CommGroup
    store: Any
    seed: int
    timeout: timedelta
    run_dir: Path | None = None
    restart_count: int = 0
    heartbeat: Heartbeat | None = field(default=None, repr=False)
    _event_file: IO[str] | None = field(default=None, repr=False)

    @property
    def world(self) -> CommGroup:
        return self.comm.world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def add_global_steps(self, amount: int = 1) -> int:
        """Add to the job-wide step counter (an atomic add on the store); returns the new total."""
        return self.comm.store_add(self.store, "global_steps", amount)

    def log_event(self, record: dict[str, Any]) -> None:
        """Append one JSON record (e.g. a leader change) to this worker's ``events/rank{r}.jsonl``."""
        if self.run_dir is None:
            return
        if self._event_file is None:
            path = self.run_dir / "events" / f"rank{self.rank}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._event_file = path.open("a", encoding="utf-8")
        self._event_file.write(json.dumps(record) + "\n")
        self._event_file.flush()

    def diagnose_failure(self, exc: BaseException) -> PeerFailure | None:
        """After `exc` (e.g. a failed collective): a PeerFailure naming the peers that are gone.

        None when every peer is still alive (the failure is not a lost peer: re-raise `exc`). Takes
        about three heartbeat intervals; the survivors of a lost peer each report it this way.
        """
        hb = self.heartbeat
        if hb is None or self.world_size == 1:
            return None
        hb.report("failed")
        found = hb.silent_peers()
        first = _first_line(exc)
        if found is None:
            return PeerFailure(
                f"rank {self.rank}: lost the job's store (hosted by the launcher of node 0 or by rank 0), "
                f"so that host or process is gone; the error was: {first}"
            )
        silent, failed = found
        if not silent:
            return None
        names = ", ".join(map(str, silent))
        also = f"; rank(s) {', '.join(map(str, failed))} failed as well" if failed else ""
        return PeerFailure(
            f"rank {self.rank}: lost rank {names}: no heartbeat for {hb.wait_s:.1f} s "
            f"(the process died or hangs){also}; the error was: {first}",
            tuple(silent),
        )

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        if self._event_file is not None:
            self._event_file.close()
            self._event_file = None
        if dist.is_initialized():
            dist.destroy_process_group()


def env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ConfigError(
                f"environment variable {name} is not set: start workers with torchrun or commsgd"
            )
        return default
    return int(value)


def choose_device(cluster: ClusterConfig, local_rank: int) -> tuple[torch.device, str]:
    """CUDA + NCCL where asked for (or `auto` and available), CPU + gloo otherwise."""
    want_cuda = cluster.device == "cuda" or (cluster.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError("cluster.device: cuda was asked for but no CUDA device is available")
    device = (
        torch.device("cuda", local_rank % torch.cuda.device_count()) if want_cuda else torch.device("cpu")
    )
    backend = cluster.backend
    if backend == "auto":
        backend = "nccl" if want_cuda else "gloo"
    if backend == "nccl" and not want_cuda:
        raise ConfigError("cluster.backend: nccl needs cluster.device=cuda")
    return device, backend


def node_layout(world_size: int, group_size: int) -> list[int]:
    """Node id of every rank when nodes hold `group_size` consecutive ranks."""
    if world_size % group_size:
        raise ConfigError(
            f"cluster.group_size: {group_size} does not divide the {world_size} workers into equal nodes"
        )
    return [r // group_size for r in range(world_size)]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _job_store(rank: int, world_size: int, timeout: timedelta, restart_count: int) -> Any | None:
    """The store to build the process group on where torch's env:// default falls short; else None.

    * Under commsgd's own launcher: the store it hosts on 127.0.0.1 (`commsgd.launch.STORE_ENV`),
      with a key prefix per restart attempt (one agent: every worker has the same restart count).
    * Under torchrun, torch elastic's agent hosts one store for every attempt, so the workers of a
      restarted attempt can read the gloo addresses of the dead attempt and fail to connect
      (pytorch/pytorch#135712). On one node (one agent, one restart count for every worker) each
      attempt gets its own key prefix. Across nodes the agents' restart counts can differ, so there
      run torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/reliability.md).
    * torch's own env:// store server (rank 0) listens on every interface whatever MASTER_ADDR says.
      When MASTER_ADDR is a loopback address, rank 0 hosts it on a socket bound to that address.
    """
    launcher_store = os.environ.get("COMMSGD_STORE", "")
    run_id, _, address = launcher_store.partition("@")
    if address and run_id == os.environ.get("TORCHELASTIC_RUN_ID"):
        store_host, _, store_port = address.rpartition(":")
        client = dist.TCPStore(store_host, int(store_port), world_size, is_master=False, timeout=timeout)
        return dist.PrefixStore(f"default_pg/attempt{restart_count}", client)
    host, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT")
    if not port:
        return None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        if restart_count == 0 or env_int("GROUP_WORLD_SIZE", 1) != 1:
            return None
        client = dist.TCPStore(host, int(port), world_size, is_master=False, timeout=timeout)
        return dist.PrefixStore(f"default_pg/attempt{restart_count}", client)
    if not _is_loopback(host):
        return None
    bind_host = "127.0.0.1" if host == "localhost" else host
    if rank == 0:
        family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((bind_host, int(port)))
            sock.listen(max(128, world_size))
        except OSError:
            sock.close()
            raise
        store = dist.TCPStore(
            bind_host,
            int(port),
            world_size,
            is_master=True,
            timeout=timeout,
            master_listen_fd=sock.detach(),
            use_libuv=True,
        )
    else:
        store = dist.TCPStore(bind_host, int(port), world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore("default_pg", store)  # the prefix torch's env:// path adds


def _default_store() -> Any:
    # The store torch.distributed rendezvoused through, shared by all ranks: hosted by the launcher
    # (commsgd's or torch elastic's agent under torchrun; it outlives every worker), or by rank 0 in
    # plain env:// starts. There is no public accessor.
    return dist.distributed_c10d._get_default_store()


def create_context(
    cluster: ClusterConfig,
    network: NetworkConfig | None,
    seed: int,
    run_dir: Path | None = None,
) -> WorkerContext:
    """Join the process group named by the environment and build this worker's context."""
    rank, world_size = env_int("RANK"), env_int("WORLD_SIZE")
    local_rank = env_int("LOCAL_RANK", 0)
    local_world = env_int("LOCAL_WORLD_SIZE", world_size)
    restart_count = env_int("TORCHELASTIC_RESTART_COUNT", 0)
    device, backend = choose_device(cluster, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=cluster.timeout_s)
    if not dist.is_initialized():
        job_store = _job_store(rank, world_size, timeout, restart_count)
        if job_store is not None:
            dist.init_process_group(
                backend, store=job_store, rank=rank, world_size=world_size, timeout=timeout
            )
        else:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    if (
        rank == 0
        and restart_count == 0
        and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        and env_int("GROUP_WORLD_SIZE", 1) > 1
        and env_int("TORCHELASTIC_MAX_RESTARTS", 0) > 0
    ):
        say(
            "commsgd: warning: torchrun restarts across nodes need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in "
            "the environment of every torchrun (pytorch/pytorch#135712); see docs/reliability.md"
        )
    node_of = node_layout(world_size, cluster.group_size or local_world)
    comm = Communicator(rank, world_size, node_of, network, cluster.split_wait)
    num_nodes = max(node_of) + 1
    node_group = comm.world
    for node in range(num_nodes):  # collective: every rank creates every node's group in the same order
        ranks = [r for r in range(world_size) if node_of[r] == node]
        group = comm.new_group(ranks)
        if node == node_of[rank]:
            node_group = group
    # Keys of an earlier attempt stay in the launcher's store after a restart: give each attempt its own.
    store = dist.PrefixStore(f"commsgd/attempt{restart_count}/", _default_store())
    heartbeat = (
        Heartbeat(store, rank, world_size, heartbeat_interval(cluster.timeout_s)) if world_size > 1 else None
    )
    return WorkerContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        node=node_of[rank],
        num_nodes=num_nodes,
        node_ranks=node_group.ranks,
        device=device,
        backend=backend,
        comm=comm,
        node_group=node_group,
        store=store,
        seed=seed,
        timeout=timeout,
        run_dir=run_dir,
        restart_count=restart_count,
        heartbeat=heartbeat,
    )

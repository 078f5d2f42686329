"""WorkerContext: who this worker is, which node it sits on, and the handles it communicates through.

Created once per worker process from the torch.distributed environment (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT), the same whether the embedded launcher or
`torchrun` started it. Nodes are real (LOCAL_WORLD_SIZE) or emulated (a configured group size).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist

from commsgd.comm import CommGroup, Communicator
from commsgd.config import ClusterConfig, NetworkConfig
from commsgd.errors import ConfigError


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

    def close(self) -> None:
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


def launched_by_torchrun() -> bool:
    """True inside a worker started by torchrun/torch elastic (or any env:// launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


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


def _default_store() -> Any:
    # The store torch.distributed rendezvoused through; shared by all ranks and hosted by the launcher
    # (torch elastic's agent store), so counters survive no worker. There is no public accessor.
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
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
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
    )

"""Start workers: N local processes through torch elastic (the machinery behind torchrun), or run in place
when torchrun already started this process.

Local runs rendezvous on 127.0.0.1 on a free port, so nothing listens beyond loopback by our choice;
gloo is pinned to the loopback interface unless GLOO_SOCKET_IFNAME says otherwise.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

from commsgd.config import Config, from_dict, to_dict
from commsgd.errors import UserError

#: exit code of a worker that stopped on bad user input (the worker printed the one-line reason)
USER_ERROR_EXIT = 2


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_entry(cfg_data: dict[str, Any], run_dir: str | None, resume: bool) -> dict[str, Any] | None:
    """What every worker process runs (picklable: a module-level function)."""
    from commsgd.train import run_worker

    cfg = from_dict(Config, cfg_data)
    try:
        return run_worker(cfg, Path(run_dir) if run_dir else None, resume)
    except UserError as exc:
        if int(os.environ.get("RANK", "0")) == 0 or not isinstance(exc, UserError):
            print(f"commsgd: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)


def launch_local(cfg: Config, run_dir: Path, resume: bool) -> int:
    """Run `cfg.workers` workers on this machine; returns the process exit code (0, 1 or 2)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    port = free_port()
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=cfg.workers,
        run_id=f"commsgd-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{port}",
        rdzv_configs={"timeout": int(cfg.cluster.timeout_s)},
        max_restarts=cfg.cluster.max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
        local_addr="127.0.0.1",
    )
    try:
        elastic_launch(config, worker_entry)(to_dict(cfg), str(run_dir), resume)
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}
        if codes == {USER_ERROR_EXIT}:
            return USER_ERROR_EXIT
        rank, first = exc.get_first_failure()
        print(
            f"commsgd: worker rank {rank} failed (exit code {first.exitcode}); "
            f"see the messages above. {first.message if isinstance(first.message, str) else ''}".rstrip(),
            file=sys.stderr,
        )
        return 1
    return 0

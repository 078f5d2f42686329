"""Start workers: N local processes through torch elastic (the machinery behind torchrun), or run in place
when torchrun already started this process.

Local runs listen on 127.0.0.1 only: the launcher hosts both the rendezvous store and the workers'
store on sockets it binds to 127.0.0.1 (torch's own store servers listen on every interface), and
gloo is pinned to the loopback interface unless GLOO_SOCKET_IFNAME says otherwise. The workers'
store outlives every worker, and each restart attempt uses its own keys in it (see
`commsgd.context`). See docs/reliability.md for what listens where.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from commsgd.config import Config, from_dict, to_dict
from commsgd.errors import UserError

#: exit code of a worker that stopped on bad user input (the worker printed the one-line reason)
USER_ERROR_EXIT = 2
#: exit code of a worker (and of `commsgd train`) that stopped on non-finite values
NONFINITE_EXIT = 3
#: exit code of a worker that lost a peer (it printed which one)
PEER_FAILURE_EXIT = 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_entry(cfg_data: dict[str, Any], run_dir: str | None, resume: bool) -> dict[str, Any] | None:
    """What every worker process runs (picklable: a module-level function)."""
    from commsgd.api import NonFiniteError
    from commsgd.context import PeerFailure
    from commsgd.train import run_worker

    cfg = from_dict(Config, cfg_data)
    try:
        return run_worker(cfg, Path(run_dir) if run_dir else None, resume)
    except UserError as exc:
        if int(os.environ.get("RANK", "0")) == 0:  # every worker finds the same bad input: say it once
            print(f"commsgd: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)
    except NonFiniteError as exc:
        print(f"commsgd: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(NONFINITE_EXIT)
    except PeerFailure as exc:
        print(f"commsgd: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(PEER_FAILURE_EXIT)


def _bound_store_server(host: str, port: int, timeout: timedelta) -> Any:
    """A TCPStore server listening on `host` only (torch's own server listens on every interface)."""
    import torch.distributed as dist

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        bound_port = int(sock.getsockname()[1])
    except OSError:
        sock.close()
        raise
    return dist.TCPStore(
        host,
        bound_port,
        is_master=True,
        multi_tenant=True,
        timeout=timeout,
        wait_for_workers=False,
        master_listen_fd=sock.detach(),
        use_libuv=True,
    )


#: "RUN_ID@HOST:PORT" of the workers' store this launcher hosts (read by `commsgd.context`)
STORE_ENV = "COMMSGD_STORE"
#: keeps torch elastic from hosting its own workers' store, which would listen on every interface
_NO_SHARED_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


@contextlib.contextmanager
def loopback_stores(host: str, run_id: str, timeout: timedelta) -> Iterator[int]:
    """Host the rendezvous store and the workers' store on `host` only; yields the rendezvous port.

    The launcher joins the rendezvous as a client (``is_host: False``); the workers of run `run_id`
    find their store through the environment they inherit (`STORE_ENV`).
    """
    rendezvous_store = _bound_store_server(host, 0, timeout)
    workers_store = _bound_store_server(host, 0, timeout)
    saved = {name: os.environ.get(name) for name in (STORE_ENV, _NO_SHARED_STORE)}
    os.environ[STORE_ENV] = f"{run_id}@{host}:{workers_store.port}"
    os.environ[_NO_SHARED_STORE] = "1"
    try:
        yield int(rendezvous_store.port)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        del rendezvous_store, workers_store


def _loopback_interface() -> str | None:
    """The loopback interface's name (``lo`` on Linux, ``lo0`` on macOS), None if there is neither."""
    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def describe_failure(exc: Any, max_restarts: int) -> str:
    """One line for a ChildFailedError: which worker failed first and how (exit code or signal)."""
    rank, first = exc.get_first_failure()
    if first.exitcode is not None and first.exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-first.exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-first.exitcode}"
    else:
        how = f"failed (exit code {first.exitcode})"
    restarts = f" after {max_restarts} restart(s)" if max_restarts else ""
    return f"commsgd: error: worker rank {rank} (pid {first.pid}) {how}{restarts}; see the messages above"


def launch_local(cfg: Config, run_dir: Path, resume: bool) -> int:
    """Run `cfg.workers` workers on this machine; returns the process exit code.

    0: done; 2: bad input (a worker printed the one line); 3: stopped on non-finite values; 1: any
    other failure (a worker died or crashed, once the restarts, `cluster.max_restarts`, are spent).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    loopback = _loopback_interface()
    if loopback is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
    host = "127.0.0.1"
    timeout_s = max(1, math.ceil(cfg.cluster.timeout_s))
    run_id = f"commsgd-{uuid.uuid4().hex[:12]}"
    try:
        with loopback_stores(host, run_id, timedelta(seconds=timeout_s)) as port:
            config = LaunchConfig(
                min_nodes=1,
                max_nodes=1,
                nproc_per_node=cfg.workers,
                run_id=run_id,
                rdzv_backend="c10d",
                rdzv_endpoint=f"{host}:{port}",
                rdzv_configs={"timeout": timeout_s, "is_host": False},
                max_restarts=cfg.cluster.max_restarts,
                monitor_interval=0.1,
                start_method="spawn",
                local_addr=host,
            )
            elastic_launch(config, worker_entry)(to_dict(cfg), str(run_dir), resume)
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}
        if codes == {USER_ERROR_EXIT}:
            return USER_ERROR_EXIT
        if NONFINITE_EXIT in codes:
            print(
                "commsgd: error: training stopped on non-finite values (see the messages above)",
                file=sys.stderr,
            )
            return NONFINITE_EXIT
        print(describe_failure(exc, cfg.cluster.max_restarts), file=sys.stderr)
        return 1
    return 0

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
import json
import logging
import math
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from commsgd import startup
from commsgd.config import Config, from_dict, to_dict
from commsgd.errors import UserError, WorkerError, say
from commsgd.interrupt import STOP_SIGNALS

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


def launched_by_torchrun() -> bool:
    """True inside a worker started by torchrun/torch elastic (or any env:// launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def _embedded() -> bool:
    """True in a worker of `launch_local`, which takes a worker's outcome as its return value.

    A worker that exits non-zero makes torch elastic log a traceback and restart the group; a
    return value ends the job quietly, and the launcher says why once.
    """
    run_id, _, address = os.environ.get(STORE_ENV, "").partition("@")
    return bool(address) and run_id == os.environ.get("TORCHELASTIC_RUN_ID")


def _outcome_file(run_dir: Path) -> Path:
    return run_dir / "workers" / "outcome.json"


def recorded_outcome(run_dir: Path | None) -> dict[str, Any] | None:
    """How a worker of this launch ended the job: ``{"user_error": line}`` or ``{"interrupted":
    signum}``; None if none did. Rank 0 removes an earlier launch's record when it starts."""
    if run_dir is None:
        return None
    try:
        outcome = json.loads(_outcome_file(run_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return outcome if isinstance(outcome, dict) else None


def _record_outcome(run_dir: Path | None, outcome: dict[str, Any]) -> None:
    """Kept in the run directory, so that peers that failed because of it and a group restarted by
    `--max-restarts` end the same way instead of trying again."""
    from commsgd.metrics import write_json_atomic

    if run_dir is not None and recorded_outcome(run_dir) is None:
        with contextlib.suppress(OSError):
            write_json_atomic(_outcome_file(run_dir), outcome)


def _end_on_user_error(run_dir: Path | None, message: str) -> dict[str, Any]:
    _record_outcome(run_dir, {"user_error": message})
    if _embedded():
        return {"user_error": message}
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun: rank 0 says it once
        say(f"commsgd: error: {message}")
    sys.exit(USER_ERROR_EXIT)


def _end_on_interrupt(run_dir: Path | None, signum: int, step: int | None, own: bool) -> dict[str, Any]:
    """Stopped by a signal after saving `step` (None: nothing saved). `own`: this process got it.

    A worker that got the signal itself exits 128 + signal: the agent got it too (Ctrl-C, or the
    agent forwarded it) and is shutting the workers down, and a worker that returned a value would
    wait for the agent to read it until the agent kills it. A worker that only learned of the stop
    from its peers returns ``{"interrupted": signum}`` to `launch_local`.
    """
    from commsgd.interrupt import common_checkpoint, exit_code, interrupted_line

    if step is not None:  # every worker stopped together: a restarted group must not go on
        _record_outcome(run_dir, {"interrupted": signum})
    if _embedded() and not own:
        return {"interrupted": signum}
    if not _embedded() and int(os.environ.get("RANK", "0")) == 0 and run_dir is not None:
        if step is None:
            step = common_checkpoint(run_dir, int(os.environ.get("WORLD_SIZE", "1")))
        say(interrupted_line(run_dir, step))
    sys.exit(exit_code(signum))


def _end_as_recorded(run_dir: Path | None, outcome: dict[str, Any]) -> dict[str, Any]:
    if "user_error" in outcome:
        return _end_on_user_error(run_dir, str(outcome["user_error"]))
    return _end_on_interrupt(run_dir, int(outcome["interrupted"]), None, own=False)


def worker_entry(
    cfg_data: dict[str, Any], run_dir: str | None, resume: bool, launched: dict[str, str] | None = None
) -> dict[str, Any] | None:
    """What every worker process runs (picklable: a module-level function): one worker's run, its
    failures turned into outcomes for the launcher. `launched`: the environment variables the
    launcher set after its forkserver started (`worker_server`), which the worker did not inherit.

    SIGINT / SIGTERM stop the run at a step boundary (`commsgd.interrupt`); the worker then exits
    128 + signal or returns ``{"interrupted": signum}`` (see `_end_on_interrupt`). Bad input ends the
    job without restarts: ``{"user_error": line}`` to `launch_local`, exit code 2 under torchrun.
    """
    import faulthandler

    from commsgd import interrupt
    from commsgd.api import NonFiniteError
    from commsgd.context import PeerFailure
    from commsgd.train import run_worker

    os.environ.update(launched or {})
    if _embedded():  # forked with SIGINT blocked (`worker_server`): Ctrl-C stops it as any program
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    # A crash in C++ (SIGSEGV, SIGABRT at exit) prints every thread's Python stack: it names the cause.
    faulthandler.enable(all_threads=True)

    signals = interrupt.RECEIVED  # installed once the worker has joined its group (run_worker)
    cfg = from_dict(Config, cfg_data)
    path = Path(run_dir) if run_dir else None
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if path is not None and attempt == 0 and int(os.environ.get("RANK", "0")) == 0:
        _outcome_file(path).unlink(missing_ok=True)  # an earlier launch's
    earlier = recorded_outcome(path) if attempt > 0 else None
    if earlier is not None:  # restarted after bad input or a stop: the job ends the same way
        return _end_as_recorded(path, earlier)
    try:
        return run_worker(cfg, path, resume)
    except UserError as exc:
        return _end_on_user_error(path, str(exc))
    except interrupt.Interrupted as exc:
        return _end_on_interrupt(path, exc.signum, exc.step, own=signals.signum is not None)
    except NonFiniteError as exc:
        if not exc.job_wide or int(os.environ.get("RANK", "0")) == 0:  # every worker found the same
            say(f"commsgd: error: {exc}")
        sys.exit(NONFINITE_EXIT)
    except Exception as exc:
        # A peer's bad input or a stop signal made this worker's collective fail: say that instead.
        found = recorded_outcome(path)
        if found is not None and "user_error" in found:
            return _end_as_recorded(path, found)
        if signals.signum is not None:
            return _end_on_interrupt(path, signals.signum, None, own=True)
        if isinstance(exc, (PeerFailure, WorkerError)):  # said in one line by this worker
            say(f"commsgd: error: {exc}")
            sys.exit(PEER_FAILURE_EXIT)
        raise


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
#: the environment variables `launch_local` sets for its workers, passed to them (`worker_entry`)
_LAUNCH_ENV = (STORE_ENV, startup.ENV, "GLOO_SOCKET_IFNAME")
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


#: what a worker imports, imported once by the forkserver its process is forked from; torch._dynamo
#: is imported by torch.optim when the first optimizer is built (about as long as torch itself)
WORKER_MODULES = ("torch", "commsgd.launch", "commsgd.train", "torch._dynamo")


@contextlib.contextmanager
def worker_server() -> Iterator[None]:
    """Run multiprocessing's forkserver, with `WORKER_MODULES` imported in it, until the block ends.

    Spawned workers each imported torch, four at once on two cores; forked from the forkserver they
    start with it imported, and started before this process's own checks (`commsgd train`) it
    imports beside them. The forkserver is a fresh interpreter that imports modules and runs
    nothing else (no thread pools, no process group) before it forks; each worker sets its own
    thread count (`commsgd.train.worker_threads`). Its workers inherit the environment and working
    directory of the block's start (`launch_local` passes what it sets later), and each block gets
    its own forkserver, so that a later launch of this process does not run on an older one's.
    """
    import multiprocessing
    from multiprocessing import forkserver, resource_tracker

    server = forkserver._forkserver
    _stop_worker_server(server)  # one started earlier (by other code) holds another environment
    multiprocessing.set_forkserver_preload(list(WORKER_MODULES))
    # Started with SIGINT blocked, Ctrl-C during its imports prints no traceback of its own (it
    # stays pending there, and the forkserver ignores SIGINT once it serves); its workers inherit the
    # mask and unblock it (`worker_entry`). Here it is blocked, not ignored: a Ctrl-C while the
    # forkserver starts is delivered when the mask is restored, never lost. multiprocessing's
    # resource tracker starts first: starting, it unblocks SIGINT itself.
    resource_tracker.ensure_running()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        forkserver.ensure_running()
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a Ctrl-C held meanwhile is raised here
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        _stop_worker_server(server)


def _stop_worker_server(server: Any) -> None:
    """Stop the forkserver at once: killed, it neither finishes its imports (a run refused by the
    checks) nor tears torch down (1-2 s after the final table); its workers have ended."""
    if server._forkserver_pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server._forkserver_pid, signal.SIGKILL)
    server._stop()


def _loopback_interface() -> str | None:
    """The loopback interface's name (``lo`` on Linux, ``lo0`` on macOS), None if there is neither."""
    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


class _SelfExplainedExit(logging.Filter):
    """Drops torch elastic's traceback of its own poll loop for a worker that exited by itself: that
    worker has said why (commsgd's one line, or its own traceback); a worker killed by a signal is
    still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        code = getattr(exc, "exit_code", None)
        return not (type(exc).__name__ == "ProcessExitedException" and isinstance(code, int) and code >= 0)


def quiet_self_explained_exits(logger: logging.Logger) -> None:
    if not any(isinstance(f, _SelfExplainedExit) for f in logger.filters):
        logger.addFilter(_SelfExplainedExit())


def _lost_peers(run_dir: Path, rank: int, pid: int) -> str | None:
    """The peers that worker `rank` (process `pid`) found without a heartbeat, from its record.

    A worker whose collective failed on a hung or dead peer exits first, so torch elastic names it;
    its record (`commsgd.train.write_worker_record`) names the peer. Records of the peers are used
    only when they are of the same attempt (their pid is then current).
    """
    from commsgd.train import read_worker_record

    mine = read_worker_record(run_dir, rank)
    if mine is None or mine.get("pid") != pid or not mine.get("lost"):
        return None
    names = []
    for peer in mine["lost"]:
        record = read_worker_record(run_dir, int(peer))
        if record is not None and record.get("attempt") == mine.get("attempt"):
            names.append(f"{peer} (pid {record.get('pid')})")
        else:
            names.append(str(peer))
    return ("rank " if len(names) == 1 else "ranks ") + ", ".join(names)


def describe_failure(exc: Any, max_restarts: int, run_dir: Path | None = None) -> str:
    """One line for a ChildFailedError: which worker failed first and how (exit code or signal).

    When that worker failed because peers stopped beating (a hung or dead peer, see
    `commsgd.context.Heartbeat`), the line names those peers instead: they are the cause.
    """
    rank, first = exc.get_first_failure()
    restarts = f" after {max_restarts} restart(s)" if max_restarts else ""
    lost = _lost_peers(run_dir, rank, first.pid) if run_dir is not None else None
    if lost is not None:
        return (
            f"commsgd: error: worker {lost} stopped responding: no heartbeat (the process hangs or "
            f"died; rank {rank} found it when a collective failed){restarts}; see the messages above"
        )
    if first.exitcode is not None and first.exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-first.exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-first.exitcode}"
    else:
        how = f"failed (exit code {first.exitcode})"
    return f"commsgd: error: worker rank {rank} (pid {first.pid}) {how}{restarts}; see the messages above"


def launch_local(cfg: Config, run_dir: Path, resume: bool) -> int:
    """Run `cfg.workers` workers on this machine; returns the process exit code.

    0: done; 2: bad input (one line, said once, never retried); 3: stopped on non-finite values;
    130 / 143: stopped by SIGINT / SIGTERM (the workers saved where they stopped); 1: any other
    failure (a worker died or crashed, once the restarts, `cluster.max_restarts`, are spent).

    Signals: torch elastic's agent turns SIGINT / SIGTERM of this process into a `SignalException`
    after sending the same signal to every worker and waiting for them (30 s, then SIGKILL;
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT changes it). Ctrl-C also reaches the workers directly.

    The workers are forked by multiprocessing's forkserver: the one `worker_server` runs, with
    torch imported (`commsgd train`), else the default one, started on the first worker.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    print(f"starting {cfg.workers} workers", flush=True)  # stdout: stderr is for the one error line
    _quiet_torch_logs()
    handlers = {sig: signal.getsignal(sig) for sig in _AGENT_SIGNALS}  # the agent replaces them
    started = time.time()
    startup.mark_command_start()  # passed to the workers (_LAUNCH_ENV): rank 0 reports the start-up
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
                start_method="forkserver",
                local_addr=host,
            )
            launched = {name: os.environ[name] for name in _LAUNCH_ENV if name in os.environ}
            results = elastic_launch(config, worker_entry)(to_dict(cfg), str(run_dir), resume, launched)
    except SignalException as exc:
        if _finished_since(run_dir, started):  # the signal came during the last step's wrap-up
            return 0
        return _report_interrupt(run_dir, cfg.workers, int(exc.sigval))
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}
        recorded = recorded_outcome(run_dir) or {}
        if "user_error" in recorded:  # e.g. a peer of the worker with bad input crashed first
            raise UserError(str(recorded["user_error"])) from None
        if codes == {USER_ERROR_EXIT}:
            return USER_ERROR_EXIT
        signals = {code - 128 for code in codes if code is not None} & {int(s) for s in STOP_SIGNALS}
        if signals:
            return _report_interrupt(run_dir, cfg.workers, min(signals))
        if NONFINITE_EXIT in codes:
            say("commsgd: error: training stopped on non-finite values (see the messages above)")
            return NONFINITE_EXIT
        say(describe_failure(exc, cfg.cluster.max_restarts, run_dir))
        return 1
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    outcomes = [r for r in (results or {}).values() if isinstance(r, dict)]
    errors = [str(r["user_error"]) for r in outcomes if "user_error" in r]
    if errors:  # the CLI prints the one line and exits 2
        raise UserError(errors[0])
    stops = [int(r["interrupted"]) for r in outcomes if "interrupted" in r]
    if stops:  # a worker got the signal, the launcher did not (e.g. `kill -TERM <worker pid>`)
        return _report_interrupt(run_dir, cfg.workers, stops[0])
    return 0


#: the signals torch elastic's agent takes over while it runs (restored afterwards)
_AGENT_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, name)
)


def _quiet_torch_logs() -> None:
    """Errors only from torch elastic and torch.multiprocessing: their warnings ("Received 15 death
    signal", "Terminating process ...") repeat what commsgd says in its own line. torch sets a level
    on each of its loggers, so every one is raised, not only the parent."""
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    logging.getLogger("torch.multiprocessing").setLevel(logging.ERROR)
    quiet_self_explained_exits(logging.getLogger("torch.distributed.elastic.multiprocessing.api"))
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith(("torch.distributed.elastic.", "torch.multiprocessing.")) and isinstance(
            logger, logging.Logger
        ):
            logger.setLevel(max(logger.level, logging.ERROR))


def _finished_since(run_dir: Path, started: float) -> bool:
    """Whether this launch wrote the run's summary (the run ended although a signal came)."""
    try:
        return (run_dir / "summary.json").stat().st_mtime >= started
    except OSError:
        return False


def _report_interrupt(run_dir: Path, workers: int, signum: int) -> int:
    """The one line for a run stopped by `signum`, and its exit code (130 SIGINT, 143 SIGTERM)."""
    from commsgd.interrupt import common_checkpoint, exit_code, interrupted_line

    say(interrupted_line(run_dir, common_checkpoint(run_dir, workers)))
    return exit_code(signum)

"""Helpers for tests and examples: run a function on N local worker processes over gloo, or bind an
algorithm to one worker in this process (`SoloContext`).

Each worker gets the torchrun-style environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR=127.0.0.1, a free MASTER_PORT), so code under test takes the same path as in a real job.
A worker ends as the launcher's workers do, without the interpreter's teardown (`commsgd.fastexit`).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from commsgd.comm import Communicator
from commsgd.launch import free_port


class SoloContext:
    """What an algorithm reads from a WorkerContext, for one worker in this process (no process group:
    its collectives are local copies)."""

    rank, world_size, seed, device = 0, 1, 0, torch.device("cpu")

    def __init__(self) -> None:
        self.comm = Communicator(0, 1, [0])

    def log_event(self, event: dict[str, object]) -> None:
        pass


def load_refusals(pairs: Sequence[tuple[Any, Any]]) -> list[str]:
    """For each (source, target) algorithm pair: the ValueError's message when `target` refuses
    `source`'s state_dict (nothing for a pair it accepts)."""
    refused = []
    for source, target in pairs:
        try:
            target.load_state_dict(source.state_dict())
        except ValueError as exc:
            refused.append(str(exc))
    return refused


def _child(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    local_world: int,
    port: int,
    out_dir: str,
    args: tuple[Any, ...],
    env: dict[str, str],
) -> None:
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank % local_world),
        LOCAL_WORLD_SIZE=str(local_world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
        OMP_NUM_THREADS="1",
    )
    import faulthandler

    import torch

    faulthandler.enable(all_threads=True)  # a crash or an abort at exit names the thread it was in
    torch.set_num_threads(1)
    try:
        result: Any = ("ok", fn(*args))
    except BaseException as exc:  # report to the parent instead of a bare non-zero exit
        result = ("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    from commsgd.fastexit import exit_program

    exit_program(0)  # the result is written: skip torch's teardown (1-2 s a process on a loaded machine)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    local_world_size: int | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 180.0,
) -> list[Any]:
    """Run `fn(*args)` on `world_size` spawned processes; return each rank's result (re-raise failures).

    `fn` must be importable (a module-level function) and its result picklable. It typically calls
    `commsgd.init()` first. Results come back through files, so large tensors are fine.
    """
    with tempfile.TemporaryDirectory(prefix="commsgd-test-") as out_dir:
        ctx = mp.start_processes(
            _child,
            args=(fn, world_size, local_world_size or world_size, free_port(), out_dir, args, env or {}),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        import time

        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"distributed test did not finish within {timeout} s")
        results = []
        for rank in range(world_size):
            status, value = pickle.loads(Path(out_dir, f"rank{rank}.pkl").read_bytes())
            if status != "ok":
                raise RuntimeError(value)
            results.append(value)
        return results

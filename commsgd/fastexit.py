"""End a process that imported torch without the interpreter's teardown, once its work is done.

Tearing torch down (module objects, C++ static destructors, thread pools) takes 1-2 s per process
on a loaded machine, and four workers doing it at once on two cores kept the prompt away for
about 8 s after the final table. Nothing of a run is left to it: the trainer closes its logs
and the worker's context its heartbeat and process group before this point, checkpoints are
written atomically, and the exit handlers still run (logging flushes) before the process ends.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import sys
import threading
from typing import NoReturn


def exit_now(code: int) -> NoReturn:
    """Flush logging and the standard streams and end the process with `code`, skipping teardown."""
    with contextlib.suppress(Exception):
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def exit_program(code: int) -> NoReturn:
    """The end of the `commsgd` program: as `sys.exit(code)` would, but without torch's teardown.

    Waits for non-daemon threads and runs the exit handlers, as the interpreter does first; only
    the teardown after them is skipped, and only when torch was imported (otherwise it is quick).
    """
    if "torch" not in sys.modules:
        sys.exit(code)
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    exit_now(code)


def skip_teardown_of_worker() -> None:
    """In a worker process spawned by the embedded launcher, whose entry function returned: exit
    0 as soon as the interpreter starts finalizing, i.e. after torch elastic has handed the return
    value to the launcher and released the worker (the launcher waits for the process to end).

    Registered last, the handler runs first; handlers registered earlier (torch's caches for
    compilers and data loader workers, unused here) are skipped. Does nothing in a main process:
    under torchrun, or a test calling the entry function in place, the program's own exit decides.
    """
    if multiprocessing.parent_process() is not None:
        atexit.register(exit_now, 0)

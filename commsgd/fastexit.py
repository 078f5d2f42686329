"""End a process that imported torch without the interpreter's teardown, once its work is done.

Tearing torch down (module objects, C++ static destructors, thread pools) takes 1-2 s per process
on a loaded machine. Nothing of a run is left to it: the trainer closes its logs and the worker's
context its heartbeat and process group before this point, checkpoints are written atomically,
and the exit handlers still run (logging flushes) before the process ends. The launcher's
workers, forked by multiprocessing's forkserver, end by os._exit already (`commsgd.launch`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
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

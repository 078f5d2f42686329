"""The launcher's forkserver (`commsgd.launch.worker_server`): one per launch, ended with it, and
quiet when Ctrl-C comes while it still imports torch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from multiprocessing import forkserver
from pathlib import Path

import pytest

from commsgd.launch import worker_server


def _forkserver_pid() -> int | None:
    return forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]


def test_each_launch_gets_its_own_forkserver_that_ends_with_it() -> None:
    with worker_server():
        first = _forkserver_pid()
        assert first is not None
        os.kill(first, 0)  # running
    assert _forkserver_pid() is None
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left to tear torch down
        os.kill(first, 0)
    with worker_server():
        second = _forkserver_pid()
        assert second is not None and second != first
    assert _forkserver_pid() is None


def test_ctrl_c_while_the_forkserver_starts_is_held_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    start = forkserver.ensure_running

    def start_and_interrupt() -> None:
        start()
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while this process waits for the forkserver

    monkeypatch.setattr(forkserver, "ensure_running", start_and_interrupt)
    with pytest.raises(KeyboardInterrupt), worker_server():
        time.sleep(5)  # a lost Ctrl-C would sleep here and end the block without KeyboardInterrupt
    assert _forkserver_pid() is None  # the forkserver is stopped all the same
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())


def _forkserver_child(pid: int) -> int | None:
    """The forkserver among the children of process `pid`, once it has started."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    for child in children:
        try:
            if b"forkserver" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
        except OSError:
            continue
    return None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the forkserver through /proc")
def test_ctrl_c_while_the_forkserver_imports_is_said_once(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "commsgd.cli", "train", "--workers", "2", "--steps", "100000"]
    proc = subprocess.Popen(
        [*command, "--out", str(tmp_path / "run")],
        start_new_session=True,  # its own process group: Ctrl-C reaches every process of it
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while _forkserver_child(proc.pid) is None and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(0.2)  # past the launcher's few instructions around the start; torch takes longer
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert "commsgd: interrupted" in err


def test_an_error_that_ctrl_c_caused_is_said_as_an_interrupt() -> None:
    """Ctrl-C inside a C extension's import can surface as an ImportError: the program says
    'interrupted' and exits 130, without a traceback."""
    code = (
        "import os, signal\n"
        "from commsgd import cli\n"
        "def main():\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    except KeyboardInterrupt:\n"
        "        raise ImportError('cannot load module more than once per process') from None\n"
        "cli.main = main\n"
        "cli.run()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == "commsgd: interrupted"
    plain = subprocess.run(
        [
            sys.executable,
            "-c",
            code.replace("os.kill(os.getpid(), signal.SIGINT)", "raise KeyboardInterrupt"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert plain.returncode == 1 and "ImportError" in plain.stderr  # no Ctrl-C: a real error stays one

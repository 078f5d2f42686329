"""`commsgd.errors.say`: a worker's line reaches stderr in one write, so workers never interleave."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from commsgd.errors import say


class _Recorder:
    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        self.writes.append("<flush>")


def test_one_line_is_one_write_then_a_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = _Recorder()
    monkeypatch.setattr(sys, "stderr", recorder)
    say("commsgd: warning: rank 1: something")
    assert recorder.writes == ["commsgd: warning: rank 1: something\n", "<flush>"]


def test_lines_of_processes_sharing_an_unbuffered_pipe_stay_whole() -> None:
    """Four processes each say 200 long lines into one pipe under PYTHONUNBUFFERED=1."""
    code = (
        "import sys\n"
        "from commsgd.errors import say\n"
        "r = sys.argv[1]\n"
        "for i in range(200):\n"
        "    say(f'rank {r} line {i} ' + 'x' * 300)\n"
    )
    env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with tempfile.TemporaryFile() as shared:  # one open file description: writes append in order
        procs = [
            subprocess.Popen([sys.executable, "-c", code, str(r)], env=env, stderr=shared) for r in range(4)
        ]
        assert all(proc.wait(timeout=120) == 0 for proc in procs)
        shared.seek(0)
        lines = shared.read().decode().splitlines()
    assert len(lines) == 800
    assert all(line.startswith("rank ") and line.endswith("x" * 300) for line in lines)

"""A worker that hangs (SIGSTOP): `commsgd train`'s last line names the hung rank, not the survivor.

The survivor's collective times out after `cluster.timeout_s`, its heartbeat check finds the silent
peer and it exits first; torch elastic then reports the survivor as the first failure. The launcher
reads the survivor's worker record, which names the peer, and says that instead.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from commsgd.cli import main

pytestmark = pytest.mark.multiprocess

TIMEOUT_S = 10
HUNG = 1
SURVIVOR = 0
# Slowed steps: the workers are still training when one of them is stopped.
OVERRIDES = [
    "progress=false",
    f"cluster.timeout_s={TIMEOUT_S}",
    "cluster.slow_ranks=[0,1]",
    "cluster.slow_sleep_s=0.1",
]


def _record(run: Path, rank: int) -> dict[str, object] | None:
    try:
        found = json.loads((run / "workers" / f"rank{rank}.json").read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _training(run: Path) -> bool:
    files = [run / "metrics" / f"rank{r}.jsonl" for r in (0, 1)]
    return all(f.is_file() and f.stat().st_size for f in files)


def _gone(pid: int) -> bool:
    """Exited (a zombie waiting for its parent counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc (Linux)")
def test_the_last_line_names_the_hung_rank(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    state: dict[str, int] = {}

    def stop_then_release() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "stopped" not in state:
            records = [_record(run, r) for r in (0, 1)]
            if all(records) and _training(run):
                state["stopped"] = int(records[HUNG]["pid"])  # type: ignore[index, call-overload]
                state["survivor"] = int(records[SURVIVOR]["pid"])  # type: ignore[index, call-overload]
                os.kill(state["stopped"], signal.SIGSTOP)
            time.sleep(0.05)
        # Once the survivor has exited (and the launcher has seen it), end the stopped worker, so
        # the launcher need not wait out torch elastic's 30 s before it sends SIGKILL itself.
        while time.monotonic() < deadline and "stopped" in state and not _gone(state["survivor"]):
            time.sleep(0.1)
        time.sleep(2)
        if "stopped" in state and not _gone(state["stopped"]):
            os.kill(state["stopped"], signal.SIGKILL)

    helper = threading.Thread(target=stop_then_release, daemon=True)
    helper.start()
    try:
        code = main(["train", "--workers", "2", "--steps", "400", "--out", str(run), *OVERRIDES])
    finally:
        helper.join(timeout=60)
        if "stopped" in state and not _gone(state["stopped"]):
            os.kill(state["stopped"], signal.SIGKILL)
    err = capfd.readouterr().err
    assert "stopped" in state, "the worker was never stopped"
    assert code == 1, err
    lines = [x for x in err.splitlines() if x.startswith("commsgd: error:")]
    assert f"rank {SURVIVOR}: lost rank {HUNG}: no heartbeat" in err, err  # the survivor's own line
    assert lines[-1].startswith(f"commsgd: error: worker rank {HUNG} (pid {state['stopped']}) "), err
    assert "no heartbeat" in lines[-1] and f"rank {SURVIVOR} found it" in lines[-1], err
    assert _record(run, SURVIVOR) is not None and _record(run, SURVIVOR).get("lost") == [HUNG]  # type: ignore[union-attr]

"""A peer dies and restarts are off: nothing hangs, the failure names the lost rank, and local runs only
ever listen on the loopback interface.

Two ways a job is started: the embedded launcher (`commsgd train --workers 3`, torch elastic's agent
watches the workers) and a plain env:// start of three processes without any agent, as on a cluster
where the dead worker's node is gone and only the surviving workers can notice.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from commsgd.cli import main
from commsgd.launch import free_port

pytestmark = pytest.mark.multiprocess

TIMEOUT_S = 20
#: generous bound on top of the timeout: start-up, the heartbeat check, process teardown on a busy machine
MARGIN_S = 120
ROOT = Path(__file__).resolve().parents[1]
# 300 slowed steps take far longer than the test: workers are still training when one is killed.
OVERRIDES = [
    "progress=false",
    f"cluster.timeout_s={TIMEOUT_S}",
    "cluster.slow_ranks=[0,1,2]",
    "cluster.slow_sleep_s=0.1",
]


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def _address(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    address = ipaddress.IPv6Address(words)
    return str(address.ipv4_mapped or address)


def listening_addresses(pids: list[int]) -> set[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket in LISTEN state owned by one of `pids` (Linux /proc)."""
    owner = {inode: pid for pid in pids for inode in _socket_inodes(pid)}
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as handle:
            next(handle)
            for line in handle:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and inode in owner:  # 0A: LISTEN
                    host, port = local.split(":")
                    found.add((owner[inode], _address(host), int(port, 16)))
    return found


def _worker_pids(run: Path, ranks: range) -> dict[int, int] | None:
    pids = {}
    for rank in ranks:
        path = run / "workers" / f"rank{rank}.json"
        try:
            pids[rank] = json.loads(path.read_text())["pid"]
        except (OSError, ValueError):
            return None
    return pids


def _training(run: Path, ranks: range) -> bool:
    return all(
        (run / "metrics" / f"rank{r}.jsonl").is_file() and (run / "metrics" / f"rank{r}.jsonl").stat().st_size
        for r in ranks
    )


def _assert_loopback_only(listeners: set[tuple[int, str, int]]) -> None:
    assert listeners, "nothing listened: the check saw no sockets"
    for pid, host, port in listeners:
        assert ipaddress.ip_address(host).is_loopback, f"pid {pid} listens on {host}:{port}"


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc (Linux)")
def test_embedded_launcher_exits_nonzero_naming_the_killed_rank_and_listens_on_loopback(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    state: dict[str, object] = {}
    before = {(host, port) for _, host, port in listening_addresses([os.getpid()])}

    def kill_rank_1() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            pids = _worker_pids(run, range(3))
            if pids is not None and _training(run, range(3)):
                found = listening_addresses([os.getpid(), *pids.values()])
                state["listeners"] = {
                    item for item in found if item[0] != os.getpid() or item[1:] not in before
                }
                os.kill(pids[1], signal.SIGKILL)
                state["killed_at"] = time.monotonic()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_rank_1, daemon=True)
    killer.start()
    code = main(["train", "--workers", "3", "--steps", "300", "--out", str(run), *OVERRIDES])
    ended = time.monotonic()
    killer.join(timeout=5)
    err = capfd.readouterr().err
    assert "killed_at" in state, "the worker was never killed"
    assert code == 1, err
    assert ended - float(state["killed_at"]) < TIMEOUT_S + MARGIN_S  # type: ignore[arg-type]
    assert "commsgd: error: worker rank 1 " in err and "SIGKILL" in err, err
    _assert_loopback_only(state["listeners"])  # type: ignore[arg-type]


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc (Linux)")
def test_without_an_agent_every_survivor_exits_within_the_timeout_naming_the_lost_rank(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    port = free_port()
    procs = []
    for rank in range(3):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE="3",
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE="3",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            GLOO_SOCKET_IFNAME="lo",
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(ROOT),
        )
        for name in ("TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE"):
            env.pop(name, None)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "commsgd",
                    "train",
                    "--workers",
                    "3",
                    "--steps",
                    "300",
                    "--out",
                    str(run),
                    *OVERRIDES,
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        deadline = time.monotonic() + 240
        while not _training(run, range(3)):
            assert time.monotonic() < deadline, "training never started"
            assert all(p.poll() is None for p in procs), [p.stderr.read() for p in procs if p.stderr]
            time.sleep(0.05)
        listeners = listening_addresses([p.pid for p in procs])
        procs[2].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        errors = []
        for proc in procs[:2]:
            _, err = proc.communicate(timeout=TIMEOUT_S + MARGIN_S)
            errors.append(err)
            assert proc.returncode not in (0, None), err
        assert time.monotonic() - killed_at < TIMEOUT_S + MARGIN_S
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for rank, err in enumerate(errors):
        line = [x for x in err.splitlines() if x.startswith("commsgd: error:")]
        assert line, err
        assert f"rank {rank}: lost rank 2:" in line[-1], err
    _assert_loopback_only(listeners)  # rank 0 hosts the store: on 127.0.0.1 only

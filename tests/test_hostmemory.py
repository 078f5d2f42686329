"""`commsgd.hostmemory.keep_freed_memory`: model-sized temporaries stop costing page faults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import resource, sys, torch
from commsgd.hostmemory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
a = torch.ones(15_000_000)
for _ in range(20):  # the heap settles first (where the blocks land depends on the address layout)
    a + a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    a + a
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _faults(mode: str) -> tuple[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    applied, faults = done.stdout.split()
    return applied, float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_a_kept_60_mb_block_is_reused_without_page_faults() -> None:
    applied, kept = _faults("keep")
    _, fresh = _faults("system")
    assert applied == "True"
    assert fresh > 10_000  # 60 MB of 4 KiB pages, faulted again each time
    assert kept < fresh / 10


def test_the_worker_applies_it_unless_the_config_says_not(monkeypatch: pytest.MonkeyPatch) -> None:
    from commsgd.config import ClusterConfig, Config, from_dict

    assert Config().cluster.reuse_memory is True
    assert from_dict(Config, {"cluster": {"reuse_memory": False}}).cluster == ClusterConfig(
        reuse_memory=False
    )

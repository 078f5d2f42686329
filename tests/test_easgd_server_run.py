"""`commsgd train --algorithm easgd algo.mode=async-server` on digits: 3 workers (rank 0 hosts the server)
converge, checkpoint, resume with a job budget and a slowed worker; a checkpoint of the other mode is
refused with one line."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from commsgd.algorithms.param_server import HEADER_LEN
from commsgd.cli import main

pytestmark = pytest.mark.multiprocess

HEADER = HEADER_LEN * 8
TAU = 4


def _summary(run: Path) -> dict[str, Any]:
    return dict(json.loads((run / "summary.json").read_text()))


def test_async_server_converges_and_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["progress=false", "cluster.timeout_s=60", "algo.mode=async-server", f"algo.tau={TAU}"]
    args = ["train", "--algorithm", "easgd", "--workers", "3", "--steps", "60", "--out", str(run)]
    assert main([*args, "algo.eamsgd=true", "eval_every=20", "checkpoint_every=20", *common]) == 0
    first = _summary(run)
    assert first["steps"] == [60, 60, 60] and first["test_error"] < 0.15  # chance is 0.9
    workers = first["algorithm_summary"]
    assert [w["rounds"] for w in workers] == [60 // TAU] * 3 and workers[0]["mode"] == "async-server"
    server = workers[0]["server"]
    assert server["pushes_applied"] == server["fetches_served"] == [60 // TAU] * 3
    # rank 0 reaches the center in process; per round the others send a fetch header, a push header
    # and e, and receive a reply header and the center (plus one DONE header at the end)
    sent, recv = first["bytes_sent"], first["bytes_recv"]
    assert sent[0] == recv[0] == 0 and sent[1] == sent[2] and recv[1] == recv[2]
    assert sent[1] - recv[1] == (60 // TAU + 1) * HEADER
    assert server["bytes_recv"] == sent[1] + sent[2] and server["bytes_sent"] == recv[1] + recv[2]
    saved = torch.load(run / "checkpoints" / "step00000040" / "rank0.pt", weights_only=True)
    assert saved["algorithm"]["center"]["version"] == 3 * 40 // TAU  # rank 0's checkpoint holds the center

    # 20 more steps per worker on average, now on a job budget with rank 1 three times slower: the
    # others take more of the remaining 3 * 80 - 180 steps and exchange more often.
    slow = ["cluster.slow_ranks=[1]", "cluster.slow_factor=3", "algo.budget=job", "eval_every=10"]
    assert main(["train", "--resume", str(run), "--steps", "80", "algo.eamsgd=true", *slow, *common]) == 0
    second = _summary(run)
    steps = second["steps"]
    assert sum(steps) >= 240 and min(steps) >= 60
    workers = second["algorithm_summary"]
    assert [w["rounds"] for w in workers] == [s // TAU for s in steps]  # each on its own clock
    server = workers[0]["server"]
    assert server["version"] == sum(server["pushes_applied"]) == sum(w["rounds"] for w in workers)
    assert second["test_error"] < first["test_error"] + 0.1  # an unrestored center would be near 0.9

    for mode, says in (("sync", "needs mode 'async-server'"), ("sync algo.budget=worker", "from mode")):
        err = io.StringIO()  # the budget is refused before workers start; the other center when restoring
        with contextlib.redirect_stderr(err):
            code = main(["train", "--resume", str(run), "--steps", "90", *f"algo.mode={mode}".split()])
        assert code == 2
        assert "commsgd: error:" in err.getvalue() and says in err.getvalue(), err.getvalue()

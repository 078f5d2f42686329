"""EASGD on 4 simulated workers against the synchronous elastic-averaging update computed in one process."""

from __future__ import annotations

import pytest
import torch
from test_lsgd_helpers import EASGD, WORLD, Workers, assert_params_equal, shared_results


def test_easgd_matches_elastic_averaging_reference() -> None:
    results = [r["easgd"] for r in shared_results()]
    tau, beta, steps = int(EASGD["tau"]), EASGD["beta"], int(EASGD["steps"])
    workers = Workers(WORLD)
    center = torch.stack(workers.flats()).mean(0)  # the center starts at the average model
    alpha = beta / WORLD
    for step in range(1, steps + 1):
        before, _ = workers.local_step(step)
        if step % tau == 0:  # both updates from the values before the round
            diffs = [x - center for x in before]
            for rank, diff in enumerate(diffs):
                workers.add(rank, -alpha * diff)
            center = center + alpha * torch.stack(diffs).sum(0)
    assert_params_equal([r["params"] for r in results], workers.flats())
    for r in results:
        torch.testing.assert_close(r["evaluated"], center, atol=1e-5, rtol=1e-5)  # the center is evaluated
        assert r["summary"]["rounds"] == steps // tau
        assert r["summary"]["alpha"] == pytest.approx(alpha)

"""Local SGD on 4 simulated workers equals model averaging in one process, and on 2 gloo processes
equals PyTorch's PeriodicModelAverager (which calls torch.distributed itself)."""

from __future__ import annotations

import pytest
import torch
from test_lsgd_helpers import (
    LOCAL_SGD,
    WORLD,
    Workers,
    assert_params_equal,
    periodic_model_averager_results,
    shared_results,
)


def test_local_sgd_matches_model_averaging_reference() -> None:
    results = shared_results()
    workers = Workers(WORLD)
    for step in range(1, LOCAL_SGD["steps"] + 1):
        workers.local_step(step)
        if step % LOCAL_SGD["tau"] == 0:
            flats = workers.flats()
            mean = torch.stack(flats).mean(0)
            for rank, x in enumerate(flats):
                workers.add(rank, mean - x)
    assert_params_equal([r["local_sgd"]["params"] for r in results], workers.flats())
    for r in results:
        assert r["local_sgd"]["summary"]["rounds"] == LOCAL_SGD["steps"] // LOCAL_SGD["tau"]


@pytest.mark.multiprocess
def test_local_sgd_matches_periodic_model_averager_on_gloo() -> None:
    results = periodic_model_averager_results()
    for r in results:
        torch.testing.assert_close(
            r["local_sgd"]["params"], r["periodic_model_averager"], atol=1e-6, rtol=1e-6
        )
        assert r["local_sgd"]["summary"]["rounds"] == LOCAL_SGD["steps"] // LOCAL_SGD["tau"]

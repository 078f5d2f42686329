"""Local SGD on 4 real workers equals model averaging in one process and PyTorch's PeriodicModelAverager."""

from __future__ import annotations

import pytest
import torch
from test_lsgd_helpers import LOCAL_SGD, WORLD, Workers, assert_params_equal, shared_results

pytestmark = pytest.mark.multiprocess


def test_local_sgd_matches_reference_and_periodic_model_averager() -> None:
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
        torch.testing.assert_close(
            r["local_sgd"]["params"], r["periodic_model_averager"], atol=1e-6, rtol=1e-6
        )
        assert r["local_sgd"]["summary"]["rounds"] == LOCAL_SGD["steps"] // LOCAL_SGD["tau"]

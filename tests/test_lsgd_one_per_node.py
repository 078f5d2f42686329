"""LSGD `leaders: node` when every node holds one worker (torchrun with one GPU per machine,
`cluster.group_size=1`): the node level is empty, so the one leader level is the leader of all
workers every `tau` steps with `pull`, exactly `leaders: single`. Before the fix it ran every
`tau_global` (2 tau) steps with `pull_global`: half the rounds asked for."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import commsgd
from commsgd.config import ClusterConfig
from commsgd.simworld import run_simulated

WORLD, STEPS, TAU = 3, 8, 2
CASES: dict[str, dict[str, Any]] = {
    "node": {"leaders": "node"},
    "node_with_global_settings": {"leaders": "node", "tau_global": 6, "pull_global": 0.9},
    "single": {"leaders": "single"},
}


def _run(ctx: Any, params: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    algo = commsgd.build_algorithm("lsgd", tau=TAU, window=1, pull=0.3, **params)
    gen = torch.Generator().manual_seed(7 + ctx.rank)
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        opt = commsgd.CommOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), algo, model, ctx)
        for step in range(1, STEPS + 1):
            x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 2, (8,), generator=gen)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step(loss, step=step)
        algo.finish()
    return {
        "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
        "levels": [(lv.kind, lv.period, lv.pull) for lv in algo.levels],  # type: ignore[attr-defined]
        "summary": algo.summary(),
        "stderr": printed.getvalue(),
    }


def _everything() -> dict[str, Any]:
    ctx = commsgd.init(ClusterConfig(group_size=1))
    assert ctx.num_nodes == WORLD
    return {name: _run(ctx, params) for name, params in CASES.items()}


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return run_simulated(_everything, WORLD)


@pytest.mark.parametrize("name", ["node", "node_with_global_settings"])
def test_one_worker_per_node_runs_the_leader_every_tau_with_pull(results: list[Any], name: str) -> None:
    for rank_results in results:
        mine = rank_results[name]
        assert mine["levels"] == [("global", TAU, 0.3)]
        assert mine["summary"]["rounds"] == STEPS // TAU
        # the same algorithm as leaders=single: bit for bit
        torch.testing.assert_close(mine["params"], rank_results["single"]["params"], rtol=0, atol=0)


def test_unused_global_settings_are_reported_once(results: list[Any]) -> None:
    line = "commsgd: warning: lsgd: every node has one worker, so leaders=node has one level"
    assert line in results[0]["node_with_global_settings"]["stderr"]
    assert "tau_global=6, pull_global=0.9 not used" in results[0]["node_with_global_settings"]["stderr"]
    assert all(line not in r["node_with_global_settings"]["stderr"] for r in results[1:])
    assert all(line not in r["node"]["stderr"] for r in results)

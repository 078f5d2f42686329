"""dist_ef_sgd's sharded server runs the same algorithm as one server: for every compressor it accepts
and 2, 3 and 4 workers, the parameters after several steps equal those of `server: single` (float
rounding aside), also when slices are empty (a model smaller than the slices) and when per-tensor
blocks cross slice edges. Before the fix every slice had its own scale (0.3 off after 6 steps) and
block_per_tensor crashed on an empty slice."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import commsgd
from commsgd.simworld import run_simulated

STEPS, BATCH = 6, 8

#: every compressor dist_ef_sgd accepts (powersgd is refused: it needs matrices)
COMPRESSORS: dict[str, dict[str, Any]] = {
    "none": {"compressor": "none"},
    "fp16": {"compressor": "fp16"},
    "bf16": {"compressor": "bf16"},
    "sign": {"compressor": "sign"},
    "scaled_sign": {"compressor": "scaled_sign"},
    "block_sign": {"compressor": "block_sign", "block_size": 12},
    "block_per_tensor": {"compressor": "block_sign", "block_per_tensor": True},
    "topk": {"compressor": "topk", "ratio": 0.1},
    "randomk": {"compressor": "randomk", "ratio": 0.2, "shared_indices": False},
    "qsgd": {"compressor": "qsgd", "levels": 8, "bucket_size": 20},
    "rounding": {"compressor": "rounding", "bits": 4},
}
MODELS = {"mlp": (10, 16, 3), "tiny": (3, 2, 2)}  # 227 and 14 parameters: the tiny one leaves slices empty


def _model(sizes: tuple[int, int, int]) -> nn.Module:
    torch.manual_seed(0)
    a, b, c = sizes
    return nn.Sequential(nn.Linear(a, b), nn.Tanh(), nn.Linear(b, c))


def _train(ctx: Any, sizes: tuple[int, int, int], params: dict[str, Any]) -> dict[str, Any]:
    model = _model(sizes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-3)
    algo = commsgd.build_algorithm("dist_ef_sgd", params)
    opt = commsgd.CommOptimizer(optimizer, algo, model, ctx)
    gen = torch.Generator().manual_seed(1000 + ctx.rank)
    for _ in range(STEPS):
        x = torch.randn(BATCH, sizes[0], generator=gen)
        y = torch.randint(0, sizes[2], (BATCH,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"params": flat, "layout": algo.summary()["layout"]}


def _all_runs() -> dict[tuple[str, str, str], dict[str, Any]]:
    ctx = commsgd.init()
    return {
        (model, name, server): _train(ctx, sizes, {**params, "server": server})
        for model, sizes in MODELS.items()
        for name, params in COMPRESSORS.items()
        for server in ("sharded", "single")
    }


@pytest.fixture(scope="module", params=[2, 3, 4])
def runs(request: pytest.FixtureRequest) -> list[dict[tuple[str, str, str], dict[str, Any]]]:
    return run_simulated(_all_runs, request.param)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_sharded_server_equals_one_server(runs: list[Any], model: str, name: str) -> None:
    start = torch.cat([p.detach().reshape(-1) for p in _model(MODELS[model]).parameters()])
    for rank_runs in runs:
        sharded, single = rank_runs[model, name, "sharded"], rank_runs[model, name, "single"]
        assert not torch.equal(single["params"], start)  # it trained
        torch.testing.assert_close(sharded["params"], single["params"], rtol=1e-5, atol=1e-6)
        # the replicas are identical: every rank applied the same compressed result
        torch.testing.assert_close(
            sharded["params"], runs[0][model, name, "sharded"]["params"], rtol=0, atol=0
        )
        expected = "replicated" if name in ("topk", "randomk") else "sharded"
        assert sharded["layout"] == expected and single["layout"] == "single"

"""dpsgd, qdsgd and quantimed on 4 workers (simulated in one process, `commsgd.simworld`), checked
against update rules computed in the test.

Starting workers dominates the cost, so one 4-worker job (`_scenarios`, a module fixture) runs every
Python-API scenario on one context and each test checks its part; the CLI test starts its own job.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import commsgd
from commsgd.cli import main
from commsgd.compression import get as get_compressor
from commsgd.context import WorkerContext
from commsgd.simworld import run_simulated
from commsgd.topology import build_topology

pytestmark = pytest.mark.multiprocess

WORLD, SEED, LR, BATCH = 4, 3, 0.1, 8


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _batch(rank: int, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(BATCH, 10, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _draw(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, delay_s: float = 0.0
) -> commsgd.MiniBatch:
    def loss() -> torch.Tensor:
        time.sleep(delay_s)
        return F.cross_entropy(model(x), y)

    return commsgd.MiniBatch(loss, len(y))


# -------------------------------------------------------------------------- scenarios on one job

A, B, HORIZON, STEPS = 2.0, 2.0, 16, 3  # quantimed's paper schedule: alpha = A/T^(1/6), eps = B/sqrt(T)
SLOW_RANK, DEADLINE_S, QDSGD_STEPS = 1, 0.5, 60


def _sent(ctx: WorkerContext) -> float:
    return ctx.comm.meter.totals().bytes_sent


def _dpsgd_round(ctx: WorkerContext, topology: str) -> dict[str, Any]:
    model = _model(100 + ctx.rank)  # different models, so the mixing shows
    opt = commsgd.CommOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR),
        commsgd.build_algorithm("dpsgd", topology=topology, p=0.6),
        model,
        ctx,
    )
    x0, sent = _flat(model), _sent(ctx)
    x, y = _batch(ctx.rank)
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()  # type: ignore[union-attr]
    opt.step(loss)
    x1, sent = _flat(model), _sent(ctx) - sent
    with ctx.comm.meter.in_phase("eval"), opt.evaluated_parameters():
        average = _flat(model)
    return {"x0": x0, "grad": grad, "x1": x1, "average": average, "restored": _flat(model), "sent": sent}


def _quantimed_vs_dpsgd(ctx: WorkerContext, weights_file: str) -> dict[str, Any]:
    plain, timed = _model(100 + ctx.rank), _model(100 + ctx.rank)
    alpha, eps = A / HORIZON ** (1 / 6), B / math.sqrt(HORIZON)
    dpsgd = commsgd.CommOptimizer(
        torch.optim.SGD(plain.parameters(), lr=alpha * eps, weight_decay=0.01),
        commsgd.build_algorithm("dpsgd", topology="custom", weights_file=weights_file),
        plain,
        ctx,
    )
    quantimed = commsgd.CommOptimizer(
        # momentum must not matter (the Q-DSGD update has none); weight decay is part of g, as in dpsgd
        torch.optim.SGD(timed.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01),
        commsgd.build_algorithm(
            "quantimed",
            topology="ring",
            rule="laplacian",
            compressor="none",
            deadline_s=60.0,
            max_batches=1,
            step_rule="paper",
            alpha=A,
            eps=B,
            horizon=HORIZON,
        ),
        timed,
        ctx,
    )
    x0 = _flat(plain)
    for step in range(STEPS):
        x, y = _batch(ctx.rank, step)
        dpsgd.step(next_batch=lambda x=x, y=y: _draw(plain, x, y))
        quantimed.step(next_batch=lambda x=x, y=y: _draw(timed, x, y))
    return {"x0": x0, "dpsgd": _flat(plain), "quantimed": _flat(timed)}


def _deadline_round(ctx: WorkerContext) -> dict[str, Any]:
    model = _model(0)  # the same model everywhere: mixing alone leaves it unchanged
    algo = commsgd.build_algorithm(
        "quantimed", compressor="none", deadline_s=DEADLINE_S, max_batches=2, alpha=1.0, eps=0.5
    )
    opt = commsgd.CommOptimizer(torch.optim.SGD(model.parameters(), lr=LR), algo, model, ctx)
    x0 = _flat(model)
    try:
        opt.step(torch.tensor(1.0))  # a ready loss: quantimed must draw its own batches
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    delay = 2 * DEADLINE_S if ctx.rank == SLOW_RANK else 0.0
    counter = iter(range(100))
    loss = opt.step(next_batch=lambda: _draw(model, *_batch(ctx.rank, next(counter)), delay_s=delay))
    return {"x0": x0, "x1": _flat(model), "loss": loss, "summary": algo.summary(), "refused": refused}


def _qdsgd_logreg(ctx: WorkerContext) -> dict[str, Any]:
    from commsgd.tasks import build_model, load_dataset

    data = load_dataset("synthetic", None, model="logreg", seed=0)
    torch.manual_seed(0)
    model = build_model("logreg", data.spec)
    opt = commsgd.CommOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR), commsgd.build_algorithm("qdsgd"), model, ctx
    )
    shard = torch.arange(ctx.rank, data.num_train, WORLD)
    g = torch.Generator().manual_seed(ctx.rank)

    def train_loss() -> float:
        with ctx.comm.meter.in_phase("eval"), opt.evaluated_parameters(), torch.no_grad():
            return float(F.cross_entropy(model(data.train_x), data.train_y))

    before = train_loss()
    start = ctx.comm.meter.totals()
    sent, recv = start.bytes_sent, start.bytes_recv
    for _ in range(QDSGD_STEPS):
        idx = shard[torch.randint(0, len(shard), (32,), generator=g)]
        opt.step(next_batch=lambda idx=idx: _draw(model, data.train_x[idx], data.train_y[idx]))
    end = ctx.comm.meter.totals()
    return {
        "before": before,
        "after": train_loss(),
        "sent": end.bytes_sent - sent,
        "recv": end.bytes_recv - recv,
        "numel": sum(p.numel() for p in model.parameters()),
        "summary": opt.algorithm.summary(),
    }


def _scenarios(weights_file: str) -> dict[str, Any]:
    ctx = commsgd.init(seed=SEED)
    return {
        "dpsgd_ring": _dpsgd_round(ctx, "ring"),
        "dpsgd_erdos_renyi": _dpsgd_round(ctx, "erdos_renyi"),
        "quantimed_vs_dpsgd": _quantimed_vs_dpsgd(ctx, weights_file),
        "deadline": _deadline_round(ctx),
        "qdsgd": _qdsgd_logreg(ctx),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    eps = B / math.sqrt(HORIZON)
    mixing = (1 - eps) * np.eye(WORLD) + eps * build_topology("ring", WORLD, rule="laplacian").weights
    path = tmp_path_factory.mktemp("weights") / "w.txt"
    np.savetxt(path, mixing)  # dpsgd with the (1 - eps) I + eps W mixing
    return run_simulated(_scenarios, WORLD, str(path))


# ------------------------------------------------------------------------------------ the checks


@pytest.mark.parametrize("topology", ["ring", "erdos_renyi"])
def test_dpsgd_round_is_the_matrix_update(results: list[dict[str, Any]], topology: str) -> None:
    runs = [r[f"dpsgd_{topology}"] for r in results]
    x0 = torch.stack([r["x0"] for r in runs]).double()
    grads = torch.stack([r["grad"] for r in runs]).double()
    w = torch.tensor(build_topology(topology, WORLD, rule="metropolis", p=0.6, seed=SEED).weights)
    expected = w @ x0 - LR * grads  # row i: sum_j w_ij x_j - lr g_i
    x1 = torch.stack([r["x1"] for r in runs])
    torch.testing.assert_close(x1.double(), expected, atol=1e-6, rtol=1e-6)
    degrees = (w > 0).sum(dim=1) - 1
    for rank, r in enumerate(runs):
        torch.testing.assert_close(r["average"], x1.mean(dim=0), atol=1e-6, rtol=1e-6)  # the evaluated model
        torch.testing.assert_close(r["restored"], r["x1"])
        assert r["sent"] == degrees[rank] * x0.shape[1] * 4  # one float32 model per edge


def test_quantimed_with_exact_quantizer_equals_dpsgd(results: list[dict[str, Any]]) -> None:
    for r in results:
        run = r["quantimed_vs_dpsgd"]
        assert not torch.allclose(run["dpsgd"], run["x0"], atol=1e-3)
        torch.testing.assert_close(run["quantimed"], run["dpsgd"], atol=1e-6, rtol=1e-5)


def test_worker_slower_than_the_deadline_contributes_zero_gradient(results: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(results):
        run = r["deadline"]
        summary = run["summary"]
        assert math.isfinite(run["loss"]) and summary["iterations"] == 1
        assert "next_batch" in run["refused"]
        if rank == SLOW_RANK:
            assert summary["samples"] == 0 and summary["zero_gradient_iterations"] == 1
            torch.testing.assert_close(run["x1"], run["x0"], atol=1e-6, rtol=0)
        else:
            assert summary["samples"] == 2 * BATCH and summary["zero_gradient_iterations"] == 0
            assert not torch.allclose(run["x1"], run["x0"], atol=1e-4)


def test_qdsgd_rounding_sends_the_payload_per_edge_and_converges(results: list[dict[str, Any]]) -> None:
    payload = get_compressor("rounding").payload_nbytes(results[0]["qdsgd"]["numel"])
    assert payload < results[0]["qdsgd"]["numel"] * 4 / 3  # int8 levels plus origin and step
    for r in results:
        run = r["qdsgd"]
        assert run["summary"]["payload_bytes"] == payload
        assert run["sent"] == run["recv"] == QDSGD_STEPS * 2 * payload  # ring: two neighbours
        assert run["after"] < 0.6 * run["before"]


# ------------------------------------------------------------------------------------ the CLI


def test_quantimed_cli_run_with_stragglers(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["train", "--algorithm", "quantimed", "--workers", "4", "--steps", "8", "--model", "logreg"]
    argv += ["--dataset", "synthetic", "--out", str(out), "progress=false", "eval_every=4"]
    argv += ["algo.deadline_s=0.02", "algo.straggler=per_worker", "algo.sample_time_max_s=0.0005"]
    assert main(argv) == 0
    assert "quantimed" in capfd.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == [8] * 4
    for worker in summary["algorithm_summary"]:
        assert worker["straggler"] == "per_worker" and worker["iterations"] == 8
        assert 0 <= worker["mean_sample_time_s"] <= 0.0005
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["algo"]["straggler"] == "per_worker" and config["algo"]["compressor"] == "rounding"
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [4, 8] and all("wall_s" in e for e in evals)

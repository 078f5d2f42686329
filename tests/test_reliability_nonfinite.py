"""A worker whose loss turns NaN: it keeps taking part in every collective with a zero contribution, is
never chosen as leader, poisons no center variable or error buffer, and the policy is logged;
`nonfinite=stop` ends the run with one clear line and a non-zero exit code.

The NaN is injected on rank 1 of 3 at steps 3 and 4, for every algorithm of the list below that is
registered (the list grows with `commsgd/algorithms`). Rank 1 is otherwise the best worker (its
reported loss is the smallest), so a leader rule that did not exclude it would pick it.
"""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import commsgd
from commsgd.api import NonFiniteError, all_finite
from commsgd.cli import main
from commsgd.metrics import read_jsonl
from commsgd.testing import run_distributed

pytestmark = pytest.mark.multiprocess

WORLD, STEPS, BAD_RANK, BAD_STEPS = 3, 8, 1, (3, 4)
#: algorithm -> parameters that make it communicate within 8 steps; only registered ones are tested
CANDIDATES: dict[str, dict[str, Any]] = {
    "allreduce": {},
    "lsgd": {"tau": 2, "window": 2, "leaders": "single"},
    "easgd": {"tau": 2},
    "ef_sgd": {},
    "local_sgd": {"tau": 2},
}
ALGORITHMS = [name for name in CANDIDATES if name in commsgd.algorithm_names()]


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _tensors(v)]
    return []


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def _train_with_a_nan(run_dir: str, algorithms: list[str]) -> dict[str, dict[str, Any]]:
    ctx = commsgd.init(run_dir=run_dir)
    results = {}
    for name in algorithms:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        algo = commsgd.build_algorithm(name, **CANDIDATES[name])
        opt = commsgd.CommOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), algo, model, ctx, max_bad_steps=3
        )
        g = torch.Generator().manual_seed(100 + ctx.rank)
        printed = io.StringIO()
        with contextlib.redirect_stderr(printed):
            for step in range(1, STEPS + 1):
                x, y = torch.randn(16, 10, generator=g), torch.randint(0, 3, (16,), generator=g)
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y) * (1.0 if ctx.rank == BAD_RANK else 10.0)
                if ctx.rank == BAD_RANK and step in BAD_STEPS:
                    loss = loss * float("nan")
                loss.backward()
                opt.step(loss)
        algo.finish()
        with opt.evaluated_parameters():
            evaluated = _flat(model)
        results[name] = {
            "params": _flat(model),
            "evaluated": evaluated,
            "state_finite": all_finite(_tensors(algo.state_dict())),
            "bad_steps": opt.bad_steps,
            "stderr": printed.getvalue(),
        }
    results["stop"] = {"message": _stop_at_step_two(ctx)}
    ctx.close()
    return results


def _stop_at_step_two(ctx: commsgd.WorkerContext) -> str:
    """Policy `stop`: every worker's loss is NaN at step 2, so every worker raises (none is left waiting)."""
    model = torch.nn.Linear(4, 2)
    opt = commsgd.CommOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        commsgd.build_algorithm("allreduce"),
        model,
        ctx,
        nonfinite="stop",
    )
    try:
        for step in range(1, 4):
            opt.zero_grad()
            loss = model(torch.ones(3, 4)).sum() * (math.nan if step == 2 else 1.0)
            loss.backward()
            opt.step(loss)
    except NonFiniteError as exc:
        return str(exc)
    return "no error"


@pytest.fixture(scope="module")
def nan_run() -> Any:
    with tempfile.TemporaryDirectory(prefix="commsgd-nan-") as run_dir:
        results = run_distributed(_train_with_a_nan, WORLD, run_dir, ALGORITHMS)
        events = {r: read_jsonl(Path(run_dir, "events", f"rank{r}.jsonl")) for r in range(WORLD)}
        yield results, events


@pytest.mark.parametrize("name", ALGORITHMS)
def test_a_nan_on_one_worker_poisons_nothing_and_is_logged(name: str, nan_run: Any) -> None:
    results, events = nan_run
    for rank in range(WORLD):
        mine = results[rank][name]
        assert torch.isfinite(mine["params"]).all(), (name, rank)
        assert torch.isfinite(mine["evaluated"]).all(), (name, rank)  # center variable / average
        assert mine["state_finite"], (name, rank)  # error buffers, center, momentum kept by the algorithm
    assert results[BAD_RANK][name]["bad_steps"] == len(BAD_STEPS)
    warning = (
        f"commsgd: warning: rank {BAD_RANK}: non-finite loss at step {BAD_STEPS[0]}; this worker's gradient"
    )
    assert warning in results[BAD_RANK][name]["stderr"]
    skipped = [e for e in events[BAD_RANK] if e["event"] == "nonfinite" and e["what"] == "loss"]
    per_algorithm = len(BAD_STEPS)
    index = ALGORITHMS.index(name)
    mine = skipped[index * per_algorithm : (index + 1) * per_algorithm]
    assert [e["step"] for e in mine] == list(BAD_STEPS)
    assert all(e["action"] == "skip" and e["policy"] == "skip" and e["rank"] == BAD_RANK for e in mine)
    if name == "allreduce":  # the bad worker still took part: the replicas are identical
        for rank in range(1, WORLD):
            assert torch.equal(results[rank][name]["params"], results[0][name]["params"])


@pytest.mark.skipif("lsgd" not in ALGORITHMS, reason="lsgd is not registered")
def test_a_worker_with_a_nan_loss_is_never_the_leader(nan_run: Any) -> None:
    _, events = nan_run
    rounds = {e["step"]: e["leader"] for e in events[0] if e["event"] == "leader"}
    assert rounds[2] == BAD_RANK  # the best worker leads while its losses are finite...
    assert rounds[4] != BAD_RANK  # ...not while its loss window holds the NaN steps
    assert rounds[6] == BAD_RANK


def test_stop_policy_raises_a_clear_error(nan_run: Any) -> None:
    results, events = nan_run
    for rank in range(WORLD):
        message = results[rank]["stop"]["message"]
        assert message.startswith(f"rank {rank}: non-finite loss at step 2; training stopped (nonfinite=stop")
        last = events[rank][-1]
        assert last["event"] == "nonfinite" and last["action"] == "stop" and last["policy"] == "stop"


def test_diverging_run_with_stop_policy_exits_nonzero_with_one_clear_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--workers",
            "2",
            "--steps",
            "60",
            "--out",
            str(out),
            "progress=false",
            "nonfinite=stop",
            "optim.lr=1e12",
            "optim.momentum=0.99",
        ]
    )
    err = capfd.readouterr().err
    assert code == 3, err
    assert "training stopped (nonfinite=stop, max_bad_steps=5)" in err
    assert "commsgd: error: training stopped on non-finite values" in err
    logged = [
        e
        for r in range(2)
        for e in read_jsonl(out / "events" / f"rank{r}.jsonl")
        if e["event"] == "nonfinite"
    ]
    assert logged and all(e["action"] == "stop" for e in logged)

"""Training features of issue 15: AdamW, warm-up and cosine schedules, clipping, accumulation, bf16/fp16.

In-process: the schedule against an independent formula, the optimizer the config builds, and the
config-time refusals. One spawn of 2 gloo workers checks the rest against references computed in
the test: AdamW and clipping through `allreduce` against torch's AdamW / `clip_grad_norm_` on the
averaged gradient; `optim.accumulate=2` at batch b against one step at batch 2b (one gradient message
per step, data position in micro-batches); bf16 and fp16 runs of the Trainer; and an fp16 overflow on
one rank that every rank skips.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from commsgd.algorithms import build_algorithm, validate_params
from commsgd.config import Config, load_config
from commsgd.errors import ConfigError
from commsgd.optim import build_optimizer, check_training_options, learning_rate
from commsgd.testing import run_distributed

WORLD, STEPS = 2, 3


def _cfg(*overrides: str) -> Config:
    return load_config({}, list(overrides), validate_algorithm=validate_params)


def _reference_rate(step: int, total: int, lr: float, warm: int, floor: float, kind: str) -> float:
    """Written out separately from commsgd.optim: the rate of 1-based step `step`."""
    if step <= warm:
        return lr * step / warm
    if kind == "constant":
        return lr
    progress = (step - 1 - warm) / (total - warm)
    return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("kind", ["constant", "cosine"])
def test_warmup_and_cosine_rates_match_the_formula(kind: str) -> None:
    total, lr, warm, floor = 50, 0.4, 5, 0.01
    cfg = _cfg(
        f"optim.schedule={kind}", f"optim.lr={lr}", f"optim.warmup_steps={warm}", f"optim.min_lr={floor}"
    )
    for step in (1, 2, 5, 6, 7, 25, 49, 50):
        want = _reference_rate(step, total, lr, warm, floor, kind)
        assert learning_rate(cfg.optim, step - 1, 0.0, total) == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert learning_rate(cfg.optim, 5, 0.0, total) == pytest.approx(lr)  # the first step after warm-up
    if kind == "cosine":  # just above min_lr at the last step, min_lr when the run is over
        assert floor < learning_rate(cfg.optim, total - 1, 0.0, total) < floor + 1e-3
        assert learning_rate(cfg.optim, total, 0.0, total) == pytest.approx(floor)


def test_warmup_then_step_drops() -> None:
    cfg = _cfg("optim.schedule=step", "optim.lr=1.0", "optim.warmup_steps=4", "optim.drop_steps=[6]")
    rates = [learning_rate(cfg.optim, done, 0.0, 10) for done in range(8)]
    assert rates == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.1, 0.1])


def test_adamw_is_built_from_the_config() -> None:
    cfg = _cfg("optim.name=adamw", "optim.lr=0.003", "optim.betas=[0.8, 0.95]", "optim.eps=1e-6")
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(cfg, model, build_algorithm("allreduce"))
    assert type(opt) is torch.optim.AdamW
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
        0.003,
        (0.8, 0.95),
        1e-6,
        1e-4,
    )
    assert type(build_optimizer(_cfg(), model, build_algorithm("allreduce"))) is torch.optim.SGD


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["algorithm=signum", "optim.name=adamw"],
            "signum needs sgd, not adamw: it applies its own momentum",
        ),
        (["algorithm=dist_ef_sgd", "optim.name=adamw"], "dist_ef_sgd needs sgd, not adamw"),
        (["algorithm=qdsgd", "optim.name=adamw"], "qdsgd needs sgd, not adamw: it applies its own step"),
        (["algorithm=quantimed", "optim.name=adamw"], "quantimed needs sgd"),
        (
            ["algorithm=easgd", "algo.eamsgd=true", "optim.name=adamw"],
            "eamsgd=true runs Nesterov-momentum SGD",
        ),
        (["algorithm=quantimed", "optim.accumulate=2"], "optim.accumulate: quantimed draws its own"),
        (["algorithm=qdsgd", "optim.clip_norm=1.0"], "optim.clip_norm: qdsgd applies its own step"),
    ],
)
def test_combinations_that_cannot_work_are_refused(overrides: list[str], message: str) -> None:
    cfg = _cfg(*overrides)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        check_training_options(cfg, build_algorithm(cfg.algorithm, cfg.algo))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.schedule=cosine", "optim.drop_steps=[3]"], "drops are for schedule=step"),
        (["optim.name=adamw", "optim.nesterov=true"], "optim.nesterov: is SGD's"),
        (["optim.betas=[0.9]"], "optim.betas: two numbers"),
        (["optim.betas=[0.9, 1.0]"], r"optim.betas: must be < 1"),
        (["optim.clip_norm=0"], "optim.clip_norm: must be > 0"),
        (["optim.accumulate=0"], "optim.accumulate: must be >= 1"),
        (["precision=fp8"], "precision: must be one of fp32, bf16, fp16"),
    ],
)
def test_bad_values_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(*overrides)


def test_every_other_algorithm_takes_adamw() -> None:
    from commsgd.algorithms import algorithm_names

    sgd_only = {"signum", "dist_ef_sgd", "qdsgd", "quantimed"}
    for name in algorithm_names():
        cfg = _cfg(f"algorithm={name}", "optim.name=adamw")
        algo = build_algorithm(name, cfg.algo)
        if name in sgd_only:
            assert algo.inner_optimizers == ("sgd",), name
            with pytest.raises(ConfigError):
                check_training_options(cfg, algo)
        else:
            check_training_options(cfg, algo)


# ------------------------------------------------------------------------------------ 2 workers


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)


def _api_against_torch(ctx: Any, optim_overrides: list[str], clip: float | None) -> float:
    """Largest difference between commsgd (allreduce + the config's optimizer) and torch on the
    averaged gradient (both ranks' batches, computed here), over STEPS steps."""
    from commsgd.api import CommOptimizer

    cfg = _cfg(*optim_overrides)
    model, ref = _model(), _model()
    algo = build_algorithm("allreduce", {"overlap": False})  # `.grad` is local until after_backward
    opt = CommOptimizer(build_optimizer(cfg, model, algo), algo, model, ctx, clip_norm=clip)
    if cfg.optim.name == "adamw":
        ref_opt: torch.optim.Optimizer = torch.optim.AdamW(
            ref.parameters(),
            lr=cfg.optim.lr,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=cfg.optim.weight_decay,
        )
    else:
        ref_opt = torch.optim.SGD(
            ref.parameters(),
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
        )
    worst = 0.0
    for step in range(1, STEPS + 1):
        opt.zero_grad()
        x, y = _batch(ctx.rank, step)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss)
        grads = []
        for rank in range(WORLD):
            ref.zero_grad()
            xr, yr = _batch(rank, step)
            F.cross_entropy(ref(xr), yr).backward()
            grads.append([p.grad.clone() for p in ref.parameters()])  # type: ignore[union-attr]
        for i, p in enumerate(ref.parameters()):
            p.grad = (grads[0][i] + grads[1][i]) / 2
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), clip)
            assert norm > clip  # the clip binds: the test would see a missing one
        ref_opt.step()
        worst = max(
            worst, max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters()))
        )
    return worst


def _fp16_skip(ctx: Any) -> dict[str, Any]:
    """fp16 through the API: rank 1's scaled backward overflows at step 2; every rank must skip it."""
    from commsgd.api import CommOptimizer
    from commsgd.precision import AgreedScaler

    model = _model()
    algo = build_algorithm("allreduce", {"bucket_mb": 0.0001})  # sent during backward (overlap)
    scaler = AgreedScaler()
    opt = CommOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), algo, model, ctx, scaler=scaler)
    params, scales = [], []
    for step in range(1, 4):
        opt.zero_grad()
        x, y = _batch(ctx.rank, step)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        if ctx.rank == 1 and step == 2:
            loss = loss * 1e36  # finite, but times the loss scale 65536 the backward overflows
        scaler.scaled(loss).backward()
        opt.step(loss)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        scales.append(scaler.scale)
    return {"params": params, "scales": scales, "skipped": scaler.skipped, "bad": opt.bad_steps}


def _trainer_run(ctx: Any, run_dir: Path, *overrides: str) -> dict[str, Any]:
    from commsgd.checkpoint import checkpoint_path, load_checkpoint
    from commsgd.train import Trainer

    cfg = _cfg(
        "data.dataset=synthetic",
        "cluster.threads=1",
        "progress=false",
        "eval_every=1000",
        "checkpoint_every=0",
        "steps=4",
        *overrides,
    )
    trainer = Trainer(cfg, ctx, run_dir)
    summary = trainer.run()
    state = load_checkpoint(checkpoint_path(run_dir, 4, ctx.rank))
    return {
        "params": torch.cat([p.detach().flatten() for p in trainer.model.parameters()]),
        "batches": trainer.batches_drawn,
        "saved_batches": state["batches"],
        "has_scaler": "scaler" in state,
        "test_loss": summary["test_loss"] if summary else None,
    }


def _workers(run_dir: str) -> dict[str, Any]:
    from commsgd.comm import Communicator
    from commsgd.context import create_context

    cfg = _cfg()
    ctx = create_context(cfg.cluster, cfg.network, cfg.seed, Path(run_dir))
    calls: list[int] = []
    original = Communicator.all_reduce

    def counted(self: Communicator, t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.meter.phase == "train":
            calls.append(t.numel())
        return original(self, t, *args, **kwargs)

    Communicator.all_reduce = counted  # type: ignore[method-assign]
    out: dict[str, Any] = {}
    try:
        out["adamw"] = _api_against_torch(ctx, ["optim.name=adamw", "optim.lr=0.01"], None)
        out["adamw_clip"] = _api_against_torch(ctx, ["optim.name=adamw", "optim.lr=0.01"], 0.05)
        out["sgd_clip"] = _api_against_torch(ctx, ["optim.lr=0.1"], 0.05)
        out["fp16_skip"] = _fp16_skip(ctx)
        runs: dict[str, Any] = {}
        for name, overrides in {
            "big": ["data.batch_size=16", "algo.overlap=false"],
            "micro": ["data.batch_size=8", "optim.accumulate=2", "algo.overlap=false"],
            "micro_overlap": ["data.batch_size=8", "optim.accumulate=2", "algo.bucket_mb=0.0001"],
            "bf16": ["precision=bf16"],
            "fp16": ["precision=fp16", "optim.name=adamw", "optim.lr=0.01"],
        }.items():
            calls.clear()
            runs[name] = _trainer_run(ctx, Path(run_dir, name), *overrides)
            runs[name]["all_reduces"] = list(calls)
        out["runs"] = runs
    finally:
        Communicator.all_reduce = original  # type: ignore[method-assign]
        ctx.close()
    return out


@pytest.mark.multiprocess
def test_features_on_two_workers(tmp_path: Path) -> None:
    results = run_distributed(_workers, WORLD, str(tmp_path))
    for r in results:
        assert r["adamw"] <= 1e-7  # commsgd's AdamW step is torch's on the averaged gradient
        assert r["adamw_clip"] <= 1e-7
        assert r["sgd_clip"] <= 1e-7  # clipped after communication, like DDP + clip_grad_norm_

    # fp16: the overflow on rank 1 at step 2 is skipped on both ranks, the scale halves on both
    skips = [r["fp16_skip"] for r in results]
    for s in skips:
        assert s["skipped"] == 1 and s["bad"] == 0
        assert s["scales"] == [2.0**16, 2.0**15, 2.0**15]
        assert torch.equal(s["params"][1], s["params"][0])  # step 2 did not move the model
        assert not torch.equal(s["params"][2], s["params"][1])  # step 3 did
    for a, b in zip(skips[0]["params"], skips[1]["params"]):
        assert torch.equal(a, b)  # the replicas never parted

    for r in results:
        runs = r["runs"]
        # accumulate 2 x batch 8 is one step of batch 16, to float rounding, with or without overlap
        for micro in ("micro", "micro_overlap"):
            assert torch.allclose(runs[micro]["params"], runs["big"]["params"], rtol=0, atol=1e-6), micro
            assert runs[micro]["batches"] == runs[micro]["saved_batches"] == 8  # micro-batches drawn
        assert runs["big"]["batches"] == 4
        # communication once per step: as many gradient all-reduces, of the same sizes, as batch 16
        assert runs["micro"]["all_reduces"] == runs["big"]["all_reduces"]
        assert sum(runs["micro_overlap"]["all_reduces"]) == sum(runs["big"]["all_reduces"])
        assert runs["fp16"]["has_scaler"] and not runs["bf16"]["has_scaler"]
    for name in ("bf16", "fp16"):
        assert math.isfinite(results[0]["runs"][name]["test_loss"])
    for name in ("bf16", "fp16"):
        assert torch.equal(results[0]["runs"][name]["params"], results[1]["runs"][name]["params"])

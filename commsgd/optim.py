"""The local optimizer and its learning rate: `optim.name` (sgd | adamw) and `optim.schedule`.

One path for the rate: `learning_rate(optim, done, elapsed_s, total)` gives the rate of the step after
`done` finished steps, from the linear warm-up, then the schedule (constant; step drops by steps or by
the job's clock, `commsgd.jobclock`; cosine down to `optim.min_lr` at the end of the run). The Trainer
sets it before every step and tells the algorithm (`on_lr_change`) whenever it changed.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from commsgd.algorithms.base import Algorithm
from commsgd.config import Config, OptimConfig
from commsgd.errors import ConfigError


def learning_rate(optim: OptimConfig, done: int, elapsed_s: float, total: int) -> float:
    """The rate for step `done + 1` of a run of `total` steps (`elapsed_s`: the job's clock).

    Warm-up (`warmup_steps` = w > 0): step s <= w runs at lr * s / w. After it: constant; `step`
    multiplies by `drop_factor` at each passed drop (`done >= drop_step`, `elapsed_s >= drop_second`);
    `cosine` runs min_lr + (lr - min_lr) (1 + cos(pi t)) / 2 with t = (done - w) / (total - w), which
    is 1 after the last step.
    """
    step, warm = done + 1, optim.warmup_steps
    if warm and step <= warm:
        return optim.lr * step / warm
    if optim.schedule == "cosine":
        t = min(1.0, (done - warm) / max(1, total - warm))
        return optim.min_lr + (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * t)) / 2.0
    if optim.schedule == "constant":
        return optim.lr
    drops = sum(done >= s for s in optim.drop_steps) + sum(elapsed_s >= s for s in optim.drop_seconds)
    return optim.lr * optim.drop_factor**drops


def uses_job_clock(optim: OptimConfig) -> bool:
    """Whether the schedule reads the job's clock (wall-clock drops)."""
    return optim.schedule == "step" and bool(optim.drop_seconds)


#: why fp16 precision and compression during backward do not go together
FP16_IN_BACKWARD = (
    "precision: fp16 scales the loss, and {name} with algo.overlap compresses gradients during backward, "
    "before the scale is taken out; use precision bf16 or fp32, or algo.overlap=false"
)


def check_training_options(cfg: Config, algo: Algorithm) -> None:
    """Refuse, in one line, optimizer, clipping, accumulation and precision settings `algo` cannot run.

    The algorithm's own rules come from `Algorithm.check_optim` (its `inner_optimizers`)."""
    algo.check_optim(cfg.optim)
    if cfg.max_seconds is not None and not algo.step_aligned:
        raise ConfigError(
            f"max_seconds: this {algo.name} schedule is asynchronous (its workers are at different "
            "steps), so there is no step for all of them to end at; use steps"
        )
    if cfg.optim.accumulate > 1 and algo.draws_batches:
        raise ConfigError(
            f"optim.accumulate: {algo.name} draws its own mini-batches (as many as its deadline allows); "
            "use accumulate=1"
        )
    if cfg.precision == "fp16" and algo.compresses_in_backward:
        raise ConfigError(FP16_IN_BACKWARD.format(name=algo.name))
    if cfg.precision == "fp16" and (cfg.cluster.device == "cpu" or not torch.cuda.is_available()):
        _check_fp16_on_cpu()


def _check_fp16_on_cpu() -> None:
    """fp16 autocast on the CPU needs a torch that has it (2.x does); say so in one line if not."""
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.functional.linear(torch.ones(1, 2), torch.ones(2, 2))
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"precision: fp16 autocast is not supported on the CPU by this torch ({exc})"
        ) from None


def build_optimizer(cfg: Config, model: torch.nn.Module, algo: Algorithm) -> torch.optim.Optimizer:
    """torch SGD or AdamW over the model's trainable parameters, with the algorithm's overrides."""
    algo.check_optim(cfg.optim)
    optim = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    settings: dict[str, Any]
    if optim.name == "adamw":
        settings = {
            "lr": optim.lr,
            "betas": (optim.betas[0], optim.betas[1]),
            "eps": optim.eps,
            "weight_decay": optim.weight_decay,
        }
        # `optimizer_overrides` are SGD settings: an algorithm that has any lists only "sgd"
        return torch.optim.AdamW(params, **settings)
    settings = {
        "lr": optim.lr,
        "momentum": optim.momentum,
        "nesterov": optim.nesterov and optim.momentum > 0,
        "weight_decay": optim.weight_decay,
    }
    settings.update(algo.optimizer_overrides(optim))
    if settings["momentum"] == 0:
        settings["nesterov"] = False
    return torch.optim.SGD(params, **settings)


__all__ = ["build_optimizer", "check_training_options", "learning_rate", "uses_job_clock"]

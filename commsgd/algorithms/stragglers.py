"""Emulated compute speeds (stragglers) and deadline-based gradient computation.

A worker's speed is its time per sample, drawn uniformly from a configured range either once (a
fixed speed per worker) or at every iteration. The emulated time is spent for real (`time.sleep`), so
wall-clock results are measured on this machine, on top of the real compute time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from commsgd.algorithms.base import MiniBatch, NextBatch, Slowdown

StragglerMode = Literal["off", "per_iteration", "per_worker"]
NO_SLOWDOWN = Slowdown()


class Stragglers:
    """Seconds per sample ~ U[low, high]: redrawn every iteration or fixed per worker; off adds nothing."""

    def __init__(self, mode: StragglerMode, low: float, high: float, seed: int) -> None:
        self.mode, self.low, self.high = mode, low, high
        self.generator = torch.Generator().manual_seed(seed)
        self.fixed = self._draw() if mode == "per_worker" else 0.0
        self.current = 0.0
        self.slept_s = 0.0
        self.draws = 0
        self.drawn_sum = 0.0

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def _draw(self) -> float:
        u = float(torch.rand((), generator=self.generator, dtype=torch.float64))
        return self.low + (self.high - self.low) * u

    def begin_iteration(self) -> float:
        """This iteration's seconds per sample (0 when off)."""
        if self.mode == "off":
            self.current = 0.0
        else:
            self.current = self._draw() if self.mode == "per_iteration" else self.fixed
            self.draws += 1
            self.drawn_sum += self.current
        return self.current

    def sleep(self, seconds: float) -> None:
        """Spend emulated compute time for real."""
        if seconds > 0:
            time.sleep(seconds)
            self.slept_s += seconds

    def summary(self) -> dict[str, Any]:
        if not self.enabled:
            return {"straggler": "off"}
        return {
            "straggler": self.mode,
            "sample_time_range_s": [self.low, self.high],
            "mean_sample_time_s": self.drawn_sum / max(self.draws, 1),
            "straggler_sleep_s": self.slept_s,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "fixed": self.fixed,
            "slept_s": self.slept_s,
            "draws": self.draws,
            "drawn_sum": self.drawn_sum,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.fixed, self.slept_s = float(state["fixed"]), float(state["slept_s"])
        self.draws, self.drawn_sum = int(state["draws"]), float(state["drawn_sum"])


@dataclass(frozen=True)
class DeadlineResult:
    """What one deadline-bounded computation produced."""

    loss: float  # mean over the finished samples; the unfinished batch's loss when none finished
    samples: int  # every sample finished by the deadline, those of a batch it cut short included
    batches: int  # whole batches finished
    cut_samples: int = 0  # samples of the batch the deadline cut short that were finished in time


def gradient_by_deadline(
    params: Sequence[torch.Tensor],
    next_batch: NextBatch,
    deadline_s: float,
    seconds_per_sample: float,
    sleep: Callable[[float], None],
    max_batches: int = 0,
    slowdown: Slowdown = NO_SLOWDOWN,
) -> DeadlineResult:
    """Compute gradients on mini-batches until `deadline_s` seconds have passed; leave the mean
    gradient over every sample finished by then in each parameter's `.grad` (zeros when none).

    A batch costs its real compute time plus `seconds_per_sample` per sample, plus what `slowdown`
    adds on a slowed worker (both slept). Samples are counted, as in QuanTimed-DSGD: of a batch that
    would end after the deadline, the first n samples that fit at that batch's cost per sample count
    (their gradient is computed again on `batch.head(n)`; that real compute runs past the deadline),
    and the worker idles until the deadline, as a worker cut off there would. A batch without `head`
    gives no samples when cut. `max_batches` > 0 stops early after that many finished batches.
    """
    deadline = time.perf_counter() + deadline_s
    totals = [torch.zeros_like(p) for p in params]
    samples = batches = cut = 0
    loss_sum, last = 0.0, math.nan

    def add(batch_size: int, loss: float) -> None:
        nonlocal samples, loss_sum
        for total, p in zip(totals, params):
            if p.grad is not None:
                total.add_(p.grad, alpha=float(batch_size))
        samples += batch_size
        loss_sum += loss * batch_size

    while max_batches == 0 or batches < max_batches:
        batch = next_batch()
        began = time.perf_counter()
        last = _backward(params, batch)
        real_s = time.perf_counter() - began
        delay = seconds_per_sample * batch.size + slowdown.delay(real_s, per_step=batches == 0)
        left = deadline - time.perf_counter()
        if delay > left:  # not finished by the deadline: only the samples that fit count
            per_sample = (real_s + delay) / max(batch.size, 1)
            fit = min(int((deadline - began) / per_sample), batch.size - 1) if per_sample > 0 else 0
            if fit > 0 and batch.head is not None:
                add(fit, _backward(params, batch.head(fit)))
                cut = fit
            sleep(max(deadline - time.perf_counter(), 0.0))
            break
        sleep(delay)
        add(batch.size, last)
        batches += 1
        if time.perf_counter() >= deadline:
            break
    scale = 1.0 / samples if samples else 0.0
    for total, p in zip(totals, params):
        p.grad = total.mul_(scale)
    return DeadlineResult(loss_sum / samples if samples else last, samples, batches, cut)


def _backward(params: Sequence[torch.Tensor], batch: MiniBatch) -> float:
    """Fresh gradients of `batch`'s mean loss in `params`' `.grad`; returns the loss."""
    for p in params:
        p.grad = None
    value = batch.loss()
    value.backward()
    return float(value.detach().item())

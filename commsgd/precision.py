"""Mixed precision (`precision: fp32 | bf16 | fp16`): autocast for forward passes, and for fp16 a loss
scale whose skipped steps every worker agrees on.

Parameters, gradients and optimizer state stay float32; only the forward pass (and so the backward
pass through it) runs in the lower precision. fp16's narrow range makes small gradients vanish, so the
loss is multiplied by a scale before backward and the gradients divided by it after (torch's
GradScaler rule: halve the scale on an overflow and skip the step, double it after `growth_interval`
clean steps). torch's `GradScaler` decides per process, in private state: a worker whose backward
overflowed would skip a step the others take, and the replicas of a synchronous algorithm would part
for good. `AgreedScaler` takes the decision from one all-reduce (max) of the overflow flags through
the Communicator, so every worker skips the same steps and keeps the same scale.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from commsgd.comm import Communicator

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """The forward pass in `precision` (no-op for fp32)."""
    if precision not in DTYPES:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=DTYPES[precision]):
        yield


class AgreedScaler:
    """A dynamic loss scale with GradScaler's defaults and update rule, decided job-wide."""

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        self.scale = init_scale
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self.growth_tracker = 0  # clean steps since the scale last changed
        self.skipped = 0  # steps skipped on an overflow, in this run

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss` itself (its value unchanged, for logging and the non-finite guard), with backward
        multiplying the gradient flowing from it by the scale."""
        scale = self.scale
        if loss.requires_grad:
            loss.register_hook(lambda grad: grad * scale)
        return loss

    def agree(self, comm: Communicator, overflow: bool, device: torch.device, job_wide: bool) -> bool:
        """Whether this step overflowed on any worker (`job_wide`), or here only (workers at their own
        pace, which share no step numbers). One 4-byte all-reduce per step when job-wide."""
        if not job_wide:
            return overflow
        flag = torch.tensor(1.0 if overflow else 0.0, device=device)
        comm.all_reduce(flag, op="max")
        return bool(flag.item() > 0)

    def unscale_(self, grads: list[torch.Tensor]) -> None:
        """Divide the gradients by the scale they were taken at."""
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, overflow: bool) -> None:
        """GradScaler's rule: back off on an overflow, grow after `growth_interval` clean steps."""
        if overflow:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
            self.skipped += 1
            return
        self.growth_tracker += 1
        if self.growth_tracker >= self.growth_interval:
            self.scale *= self.growth_factor
            self.growth_tracker = 0

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs (GradScaler's keys, plus the skip count)."""
        return {
            "scale": self.scale,
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "_growth_tracker": self.growth_tracker,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["_growth_tracker"])
        self.skipped = int(state.get("skipped", 0))


__all__ = ["DTYPES", "AgreedScaler", "autocast"]

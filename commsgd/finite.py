"""Cheap non-finite checks (NaN, +-Inf) over many tensors: the non-finite guard's building block.

`flag_nonfinite` leaves its answer in a tensor (no host sync: it can run inside backward, between
launches of asynchronous all-reduces); `all_finite` reads it once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_CPU_ONE = torch.ones(())  # see `_unit`


def flag_nonfinite(tensors: Iterable[torch.Tensor], found: torch.Tensor) -> None:
    """Make `found` (a 0-d float tensor) non-zero if any element of `tensors` is NaN or +-Inf.

    Floating tensors on `found`'s device go through torch's fused multi-tensor non-finite check (the
    one AMP's grad scaler uses, with a scale of 1, which leaves the values as they are); anything else
    is checked by summing each tensor (a NaN or an Inf anywhere makes the sum non-finite; a sum of
    finite float32 values overflows only near 3.4e38, where a step is useless anyway). Integer tensors
    are always finite. Never synchronises with the device.
    """
    floats = [t for t in tensors if t.is_floating_point()]
    if floats:
        _flag_floats(floats, found)


def _unit(device: torch.device) -> torch.Tensor:
    """A 0-d 1.0 on `device`: the fused check's (unscale) factor. It is only read, so the CPU's is
    made once (saves a microsecond or two a check); an accelerator's is made each time, on the
    caller's stream (a cached one could be read on another stream before its fill ran)."""
    return _CPU_ONE if device.type == "cpu" else torch.ones((), device=device)


def _flag_floats(floats: list[torch.Tensor], found: torch.Tensor) -> None:
    """`flag_nonfinite` of floating tensors (at least one)."""
    device = found.device
    if all(t.device == device for t in floats):
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(floats, found, _unit(device))
        except (RuntimeError, NotImplementedError):  # a dtype or device the fused kernel lacks
            pass
        else:
            return
    sums = [(t.sum(dtype=torch.float32) if t.dtype in _LOW_PRECISION else t.sum()).to(device) for t in floats]
    found.add_(torch.stack(sums).sum().isfinite().logical_not().to(found.dtype))


#: at most this many elements in all, on the CPU, are checked one by one in Python (a math problem's
#: point: a few hundred nanoseconds, against a few microseconds for the fused kernel and its flag)
SMALL_CHECK = 64


def _small_on_cpu(tensors: list[torch.Tensor]) -> bool:
    """At most `SMALL_CHECK` elements, all on the CPU; stops at the first tensor past it (a model's
    first weight, usually), so a training step's check pays one or two lookups for it."""
    count = 0
    for t in tensors:
        count += t.numel()
        if count > SMALL_CHECK or not t.is_cpu:
            return False
    return True


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite, with one sync (see `flag_nonfinite`)."""
    floats = [t for t in tensors if t.is_floating_point()]
    if not floats:
        return True
    if _small_on_cpu(floats):
        for t in floats:  # map over host floats: cheaper than a generator, and 1-D needs no reshape
            if not all(map(math.isfinite, t.tolist() if t.dim() == 1 else t.reshape(-1).tolist())):
                return False
        return True
    found = torch.zeros((), device=floats[0].device)
    _flag_floats(floats, found)
    return not bool(found)


__all__ = ["all_finite", "flag_nonfinite"]

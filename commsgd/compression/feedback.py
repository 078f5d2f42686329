"""Error feedback (EF-SGD, Karimireddy et al. 2019; dist-EF-SGD, Zheng et al. 2019).

What a compressor drops at one step is added back before compressing at the next one:

    p = g + e;   payload = C(p);   e = p - decompress(payload)

so decompress(payload) + e_new == g + e_old, and nothing is lost, only delayed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from commsgd.compression.base import Compressor, Payload


class ErrorFeedback:
    """One error buffer per tensor name, in the dtype of the tensors given for that name."""

    def __init__(self, compressor: Compressor) -> None:
        self.compressor = compressor
        self._errors: dict[str, Tensor] = {}

    def compress(self, name: str, g: Tensor, *, generator: torch.Generator | None = None) -> Payload:
        """Compress g plus the error kept under `name`, and keep the new error. `name` is also the
        compressor's state key (powersgd's warm start)."""
        error = self._errors.get(name)
        if error is None:
            corrected = g.detach().clone()
        elif error.shape != g.shape:
            raise ValueError(f"error feedback: {name!r} had shape {tuple(error.shape)}, got {tuple(g.shape)}")
        else:
            corrected = g.detach() + error
        payload = self.compressor.compress(corrected, generator=generator, key=name)
        self._errors[name] = corrected.sub_(self.compressor.decompress(payload))
        return payload

    def error(self, name: str) -> Tensor | None:
        """The error kept under `name` (None before its first compression). `compress` never changes a
        kept error in place, so the tensor returned here stays as it is: a snapshot for `restore`."""
        return self._errors.get(name)

    def restore(self, name: str, error: Tensor | None) -> None:
        """Put back an error returned by `error(name)` before a step that the job skipped."""
        if error is None:
            self._errors.pop(name, None)
        else:
            self._errors[name] = error

    def rescale(self, factor: float) -> None:
        """Multiply every error by `factor`; dist-EF-SGD uses eta_{t-1} / eta_t when the step size changes."""
        if not math.isfinite(factor) or factor < 0:
            raise ValueError(f"error feedback: rescale factor must be finite and >= 0, got {factor}")
        for error in self._errors.values():
            error.mul_(factor)

    def reset(self) -> None:
        """Forget all errors."""
        self._errors.clear()

    def state_dict(self) -> dict[str, Any]:
        """Errors and the compressor's own state, for a checkpoint."""
        return {
            "errors": {name: e.clone() for name, e in self._errors.items()},
            "compressor": self.compressor.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._errors = {name: e.clone() for name, e in state["errors"].items()}
        self.compressor.load_state_dict(state["compressor"])

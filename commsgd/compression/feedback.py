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
    """One error buffer per tensor name, in the dtype of the tensors given for that name.

    Each name has two buffers used in turn: a step writes g + e into the one not holding e, so the
    error of the step before stays intact (for `restore`) and no vector-sized tensor is allocated
    after the first two steps; decompressing into a third buffer, kept too, also allocates nothing.
    """

    def __init__(self, compressor: Compressor) -> None:
        self.compressor = compressor
        self._errors: dict[str, Tensor] = {}
        self._spare: dict[str, Tensor] = {}
        self._decoded: dict[str, Tensor] = {}

    def compress(self, name: str, g: Tensor, *, generator: torch.Generator | None = None) -> Payload:
        """Compress g plus the error kept under `name`, and keep the new error. `name` is also the
        compressor's state key (powersgd's warm start)."""
        error = self._errors.get(name)
        if error is not None and error.shape != g.shape:
            raise ValueError(f"error feedback: {name!r} had shape {tuple(error.shape)}, got {tuple(g.shape)}")
        corrected = _reuse(self._spare.pop(name, None), g)
        if error is None:
            corrected.copy_(g.detach())
        else:
            torch.add(g.detach(), error, out=corrected)
        payload = self.compressor.compress(corrected, generator=generator, key=name)
        self._decode_and_subtract(name, payload, corrected)
        self._errors[name] = corrected
        if error is not None:
            self._spare[name] = error
        return payload

    def _decode_and_subtract(self, name: str, payload: Payload, corrected: Tensor) -> None:
        """corrected -= decompress(payload), decoding into this name's kept buffer where it fits."""
        if corrected.dtype != torch.float32 or not corrected.is_contiguous():
            corrected.sub_(self.compressor.decompress(payload))
            return
        decoded = _reuse(self._decoded.get(name), corrected)
        self._decoded[name] = decoded
        corrected.sub_(self.compressor.decompress(payload, out=decoded))

    def error(self, name: str) -> Tensor | None:
        """The error kept under `name` (None before its first compression). `compress` never changes a
        kept error in place: the tensor returned here stays as it is through the next compression of
        `name` (its buffer is reused by the one after), a snapshot for `restore`."""
        return self._errors.get(name)

    def restore(self, name: str, error: Tensor | None) -> None:
        """Put back an error returned by `error(name)` before a step that the job skipped."""
        current = self._errors.pop(name, None)
        if error is not None:
            self._errors[name] = error
        if current is not None and current is not error:
            self._spare[name] = current

    def rescale(self, factor: float) -> None:
        """Multiply every error by `factor`; dist-EF-SGD uses eta_{t-1} / eta_t when the step size changes."""
        if not math.isfinite(factor) or factor < 0:
            raise ValueError(f"error feedback: rescale factor must be finite and >= 0, got {factor}")
        for error in self._errors.values():
            error.mul_(factor)

    def reset(self) -> None:
        """Forget all errors."""
        self._errors.clear()
        self._spare.clear()

    def state_dict(self) -> dict[str, Any]:
        """Errors and the compressor's own state, for a checkpoint."""
        return {
            "errors": {name: e.clone() for name, e in self._errors.items()},
            "compressor": self.compressor.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._errors = {name: e.clone() for name, e in state["errors"].items()}
        self._spare.clear()
        self.compressor.load_state_dict(state["compressor"])


def _reuse(buffer: Tensor | None, like: Tensor) -> Tensor:
    """`buffer` if it has `like`'s shape, dtype and device, else a new tensor like it."""
    if buffer is not None and _layout(buffer) == _layout(like):
        return buffer
    return torch.empty_like(like, memory_format=torch.contiguous_format)


def _layout(t: Tensor) -> tuple[torch.Size, torch.dtype, torch.device]:
    return t.shape, t.dtype, t.device

"""Dense baselines: send every value, in float32 (`none`) or cast to a 16-bit float."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from commsgd.compression.base import BufferSpec, Compressor, Payload, check_finite


class Cast(Compressor):
    """All values in the `wire` dtype. Summable: adding cast payloads adds the values (in that dtype).

    The finiteness check runs on the cast result, so a value beyond the wire dtype's range (|x| > 65504
    for float16) raises NonFiniteError instead of arriving as Inf.
    """

    wire: ClassVar[torch.dtype]
    summable = True

    def buffer_specs(self, shape: torch.Size) -> dict[str, BufferSpec]:
        return {"values": (shape.numel(), self.wire)}

    def _encode(
        self, flat: Tensor, payload: Payload, *, generator: torch.Generator | None, key: str | None
    ) -> None:
        values = flat.to(self.wire, copy=True)
        check_finite(self.name, *torch.aminmax(values))
        payload.buffers["values"] = values

    def _decode(self, payload: Payload, out: Tensor | None) -> Tensor:
        values = payload.buffers["values"]
        return values.to(torch.float32) if out is None else out.copy_(values)


class Identity(Cast):
    """No compression: float32 values, exact."""

    name = "none"
    unbiased = True
    wire = torch.float32

    def delta(self, numel: int) -> float | None:
        return 1.0


class Float16(Cast):
    """IEEE half precision: 2 bytes per value, round to nearest (biased, no delta promised)."""

    name = "fp16"
    wire = torch.float16


class BFloat16(Cast):
    """bfloat16: float32's range with 8 mantissa bits, 2 bytes per value."""

    name = "bf16"
    wire = torch.bfloat16

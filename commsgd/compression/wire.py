"""One compressor payload as one byte message: its buffers end to end, in `buffer_specs` order.

A payload of several buffers (values + indices, bits + scales) then travels as one uint8 tensor, in one
collective or point-to-point message, and sender and receiver agree on the layout without talking: it
comes from the compressor and the vector's length alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from commsgd.compression.base import Compressor, Payload


class Wire:
    """Byte layout of `compressor`'s payload for a vector of `numel` elements of `dtype`."""

    def __init__(self, compressor: Compressor, numel: int, dtype: torch.dtype = torch.float32) -> None:
        self.compressor, self.numel, self.dtype = compressor, numel, dtype
        self.specs = compressor.buffer_specs(torch.Size([numel]))
        self.nbytes = compressor.payload_nbytes(numel)

    def pack(self, payload: Payload, out: Tensor) -> Tensor:
        """Write the payload's buffers into the first `nbytes` of uint8 `out` (the rest is left as is)."""
        offset = 0
        for name, (count, dtype) in self.specs.items():
            size = count * dtype.itemsize
            out[offset : offset + size].copy_(payload.buffers[name].reshape(-1).view(torch.uint8))
            offset += size
        return out

    def encode(self, payload: Payload) -> Tensor:
        """The payload as a new message of `nbytes`, for a point-to-point send: a payload with shared
        tensors (which the receiver must derive itself) is refused."""
        if payload.shared:
            raise ValueError(
                f"{self.compressor.name}: payloads with shared tensors cannot be sent point to point"
            )
        first = next(iter(payload.buffers.values()), None)
        return self.pack(payload, self.empty(None if first is None else first.device))

    def empty(self, device: torch.device | str | None = None) -> Tensor:
        """A receive buffer for one message."""
        return torch.empty(self.nbytes, dtype=torch.uint8, device=device)

    def unpack(self, data: Tensor, template: Payload | None = None) -> Payload:
        """The payload packed in `data` (uint8, at least `nbytes`); `template` supplies shared tensors.
        Its buffers are views of `data` where their bytes lie on their type's alignment (copies where a
        received row starts at an odd byte): read them, do not write them."""
        buffers: dict[str, Tensor] = {}
        offset = 0
        for name, (count, dtype) in self.specs.items():
            size = count * dtype.itemsize
            part = data[offset : offset + size]
            aligned = part.is_contiguous() and part.storage_offset() % dtype.itemsize == 0
            buffers[name] = (part if aligned else part.clone()).view(dtype)
            offset += size
        if template is not None:
            return template.with_buffers(buffers)
        return Payload(buffers, torch.Size([self.numel]), self.dtype)

    def decode(self, data: Tensor, template: Payload | None = None, out: Tensor | None = None) -> Tensor:
        """Decompressed vector of the payload packed in `data`, written into `out` when given (see
        `Compressor.decompress`)."""
        if self.numel == 0:
            return torch.zeros(0, dtype=self.dtype, device=data.device) if out is None else out
        return self.compressor.decompress(self.unpack(data, template), out=out)

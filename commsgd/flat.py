"""Flat buffers: many tensors travel as one contiguous buffer per dtype, never one message per tensor."""

from __future__ import annotations

from collections.abc import Sequence

import numpy
import torch


class FlatBuffer:
    """A fixed list of same-dtype tensors and one contiguous buffer that mirrors them.

    `pack` copies the tensors into the buffer, `unpack` copies the buffer back; `views` gives the
    buffer's slices shaped like the tensors (to read a received buffer without unpacking).
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        if not tensors:
            raise ValueError("FlatBuffer needs at least one tensor")
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) != 1:
            raise ValueError(f"FlatBuffer tensors must share one dtype, got {sorted(map(str, dtypes))}")
        self.tensors = list(tensors)
        self.numels = [t.numel() for t in self.tensors]
        self.buffer = torch.empty(
            sum(self.numels), dtype=self.tensors[0].dtype, device=self.tensors[0].device
        )
        self._own_views = self._slice(self.buffer)  # made once: unpack runs every step

    @property
    def numel(self) -> int:
        return self.buffer.numel()

    def _slice(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [chunk.view_as(t) for chunk, t in zip(flat.split(self.numels), self.tensors)]

    def views(self, buffer: torch.Tensor | None = None) -> list[torch.Tensor]:
        return list(self._own_views) if buffer is None else self._slice(buffer)

    def pack(self, tensors: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Copy `tensors` (default: the mirrored ones) into the buffer and return it."""
        source = self.tensors if tensors is None else tensors
        torch.cat([t.reshape(-1) for t in source], out=self.buffer)
        return self.buffer

    def unpack(self, buffer: torch.Tensor | None = None, into: Sequence[torch.Tensor] | None = None) -> None:
        """Copy `buffer` (default: the own buffer) back into `into` (default: the mirrored tensors)."""
        targets = self.tensors if into is None else list(into)
        if len(targets) != len(self.tensors):
            raise ValueError(f"FlatBuffer.unpack: {len(targets)} tensors given, {len(self.tensors)} expected")
        sources = self._own_views if buffer is None else self._slice(buffer)
        torch._foreach_copy_(targets, sources)  # one call instead of a copy_ per tensor


def by_dtype(tensors: Sequence[torch.Tensor]) -> list[FlatBuffer]:
    """One FlatBuffer per dtype, in first-seen order (models are usually all float32: one buffer)."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return [FlatBuffer(ts) for ts in groups.values()]


def buckets(tensors: Sequence[torch.Tensor], bucket_bytes: int) -> list[FlatBuffer]:
    """Split tensors (kept in the given order) into same-dtype FlatBuffers of about `bucket_bytes` each."""
    result: list[FlatBuffer] = []
    current: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if current and (t.dtype != current[0].dtype or size + t.numel() * t.element_size() > bucket_bytes):
            result.append(FlatBuffer(current))
            current, size = [], 0
        current.append(t)
        size += t.numel() * t.element_size()
    if current:
        result.append(FlatBuffer(current))
    return result


def parameters_of(model: torch.nn.Module) -> list[torch.Tensor]:
    """The trainable parameters, in a stable order shared by every worker."""
    return [p for p in model.parameters() if p.requires_grad]


def model_state_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters plus floating-point buffers (batch-norm statistics): what 'the model' is for averaging."""
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    return [p.data for p in model.parameters()] + buffers


def host_floats(values: Sequence[float]) -> torch.Tensor:
    """A float64 CPU tensor of `values`, made through numpy: a third of the time `torch.tensor` takes for
    a few floats (a math problem's gradient and LSGD's scores, once per step and worker)."""
    return torch.from_numpy(numpy.array(values, dtype=numpy.float64))

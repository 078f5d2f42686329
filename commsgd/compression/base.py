"""The compressor interface: what travels (`Payload`) and the `Compressor` contract every scheme follows."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from commsgd.errors import ConfigError

BufferSpec = tuple[int, torch.dtype]
"""(numel, dtype) of one wire buffer."""

ShapeLike = int | Sequence[int]
"""A shape, or an element count meaning a flat vector of that many elements."""


class NonFiniteError(ValueError):
    """The tensor to compress holds NaN or Inf, its statistics overflow float32, or it lies outside
    what the compressor represents (float16 beyond 65504, a fixed rounding grid).

    Raised instead of letting NaN spread silently into every worker's model through an all-reduce. A
    worker that gets it while the others wait in a collective sends `poisoned(...)` instead of dropping
    out, so that every worker sees the step fail (see `commsgd.algorithms.compressed`).
    """


@dataclass
class Payload:
    """What travels: named flat buffers (already packed) plus what the receiver knows in advance.

    `buffers` are exactly the bytes sent and never alias the compressed input, so they may be all-reduced
    in place. `shared` holds tensors both sides derive on their own (randomk's indices drawn from a
    shared seed): they are not sent and not counted in `nbytes`.
    """

    buffers: dict[str, Tensor]
    shape: torch.Size
    dtype: torch.dtype
    shared: dict[str, Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Exact size on the wire: the sum of numel * element_size over `buffers`."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    @property
    def numel(self) -> int:
        """Element count of the tensor this payload encodes."""
        return math.prod(self.shape)

    def with_buffers(self, buffers: Mapping[str, Tensor]) -> Payload:
        """The same tensor metadata (and `shared`) with other wire buffers, e.g. an all-reduce result."""
        return replace(self, buffers=dict(buffers))


def as_shape(shape: ShapeLike) -> torch.Size:
    """`torch.Size` of `shape`; a bare int n means the flat shape (n,)."""
    return torch.Size((shape,) if isinstance(shape, int) else tuple(shape))


class Compressor(ABC):
    """A gradient/model compressor. Subclasses fill `_encode`, `_decode` and `buffer_specs`.

    All arithmetic is in float32 on the input's device; `decompress` returns the input's dtype and shape.
    `unbiased`: E[decompress(compress(x))] = x over the randomness drawn from `generator`.
    `summable`: payloads of several workers added buffer by buffer (an all-reduce) decompress to the sum
    of their decompressions. Both are instance attributes because for randomk they depend on parameters.
    """

    name: ClassVar[str]
    unbiased: bool = False
    summable: bool = False

    def compress(
        self, x: Tensor, *, generator: torch.Generator | None = None, key: str | None = None
    ) -> Payload:
        """Encode `x`. `generator` feeds stochastic schemes (it must live on x's device); `key` names the
        tensor across steps for stateful schemes (powersgd's warm start) and is ignored by the others."""
        if not x.is_floating_point():
            raise TypeError(f"{self.name}: expected a floating-point tensor, got {x.dtype}")
        if x.numel() == 0:
            return self.empty_payload(x.shape, x.dtype, device=x.device)
        payload = Payload({}, x.shape, x.dtype)
        self._encode(x.detach().reshape(-1).to(torch.float32), payload, generator=generator, key=key)
        return payload

    def decompress(self, payload: Payload, *, out: Tensor | None = None) -> Tensor:
        """The tensor `payload` stands for, in its original shape and dtype (for `none` and uncompressed
        powersgd tensors, a view of the payload's buffer).

        `out`: a contiguous float32 tensor of `payload.numel` elements (any shape) to decode into and
        return, allocating nothing the size of the vector: a step that decodes every step into the same
        buffers touches no fresh pages (a new 60 MB tensor costs about five times its fill in page faults).
        """
        if out is not None:
            if out.dtype != torch.float32 or out.numel() != payload.numel or not out.is_contiguous():
                raise ValueError(
                    f"{self.name}: decompress needs a contiguous float32 `out` of {payload.numel} elements, "
                    f"got {out.dtype} of {out.numel()}"
                )
            if payload.numel:
                self._decode(payload, out.view(-1))
            return out
        if payload.numel == 0:
            device = next(iter(payload.buffers.values())).device if payload.buffers else None
            return torch.zeros(payload.shape, dtype=payload.dtype, device=device)
        return self._decode(payload, None).view(payload.shape).to(payload.dtype)

    def delta(self, numel: int) -> float | None:
        """The delta it guarantees: ||x - C(x)||^2 <= (1 - delta) ||x||^2 for every x of `numel`
        elements; None when it promises no such bound (unbiased or unscaled schemes)."""
        return None

    @abstractmethod
    def buffer_specs(self, shape: torch.Size) -> dict[str, BufferSpec]:
        """(numel, dtype) of every wire buffer for a tensor of `shape`; the single source of sizes."""

    def payload_nbytes(self, shape: ShapeLike) -> int:
        """Wire size for a tensor of `shape` (or of that many elements), without compressing anything."""
        return sum(n * d.itemsize for n, d in self.buffer_specs(as_shape(shape)).values())

    def empty_payload(
        self, shape: ShapeLike, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> Payload:
        """Zeroed receive buffers of the right sizes and dtypes (for an all-gather)."""
        size = as_shape(shape)
        specs = self.buffer_specs(size)
        return Payload(
            {k: torch.zeros(n, dtype=d, device=device) for k, (n, d) in specs.items()}, size, dtype
        )

    def state_dict(self) -> dict[str, Any]:
        """State carried between calls (empty for stateless schemes)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned (nothing, for a stateless scheme)."""
        if state:
            raise ValueError(f"{self.name}: stateless, got state entries {sorted(state)}")

    @abstractmethod
    def _encode(
        self, flat: Tensor, payload: Payload, *, generator: torch.Generator | None, key: str | None
    ) -> None:
        """Fill `payload.buffers` (and `payload.shared`) from `flat`: float32, 1-D, non-empty, possibly a
        view of the caller's tensor, so never modify it in place."""

    @abstractmethod
    def _decode(self, payload: Payload, out: Tensor | None) -> Tensor:
        """Flat float32 tensor of `payload.numel` elements (non-empty): written into `out` (flat, float32,
        that many elements) when given, else a new tensor or a view of the payload's buffer."""


def output(numel: int, out: Tensor | None, like: Tensor) -> Tensor:
    """`out`, or a new float32 vector of `numel` elements on `like`'s device: where `_decode` writes."""
    return torch.empty(numel, dtype=torch.float32, device=like.device) if out is None else out


def poisoned(payload: Payload) -> Payload:
    """`payload` with every floating-point buffer NaN: whatever it is added to or decoded into is not
    finite, so a failed compression reaches every receiver as a failed step (the integer buffers, e.g.
    indices, keep their valid values)."""
    buffers = {
        name: torch.full_like(b, math.nan) if b.is_floating_point() else b
        for name, b in payload.buffers.items()
    }
    return payload.with_buffers(buffers)


def check_finite(owner: str, *stats: Tensor) -> None:
    """Raise NonFiniteError unless all of `stats` is finite. Callers pass small reductions of the input
    (norms, block scales, min/max) that they need anyway or get from one allocation-free pass such as
    torch.aminmax, which is about 10x cheaper than torch.isfinite over the whole tensor."""
    for t in stats:
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{owner}: input contains NaN or Inf, or its statistics overflow float32")


def int_param(owner: str, name: str, value: object, lo: int, hi: int | None = None) -> int:
    """`value` as an int in [lo, hi] (hi None: unbounded), else ConfigError naming the parameter."""
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        allowed = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
        raise ConfigError(f"{owner}: {name} must be {allowed}, got {value!r}")
    return value


def float_param(owner: str, name: str, value: object, lo: float, hi: float) -> float:
    """`value` as a float in (lo, hi] (so lo itself is excluded), else ConfigError naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo < value <= hi:
        raise ConfigError(f"{owner}: {name} must be a number in ({lo}, {hi}], got {value!r}")
    return float(value)

"""A compressor's result over a whole vector, computed one consecutive slice at a time.

A sharded server (dist_ef_sgd) holds one slice of the vector per rank. Compressing each slice on its
own would give another compressor: a per-slice scale in place of scaled sign's ||x||_1 / d, a rounding
grid per slice, a layer's block cut in two. A `SliceCodec` instead gives, for slice j, exactly slice j
of C(x) for the whole x:

- `stats(part, j)`: slice j's share of the statistics that span slices (a small fixed-size vector);
  the shares of all slices combine with `op` (`combine` locally, or one all-reduce across owners);
- `encode(part, j, shared, generator)`: slice j's payload from its part and the combined statistics;
- `encode_alone(...)`: the same for one owner of one slice, drawing from `generator` exactly what
  compressing the whole vector would (the random words for the other slices are drawn and dropped),
  so a stochastic compressor gives the same bits as one server with that generator;
- `compressor(j)`: decodes slice j's payloads.

Slice bounds fall on multiples of `alignment` (whole bytes of sign bits, whole QSGD buckets, whole
fixed-size sign blocks, whole groups of four rounding-noise lanes); trailing slices may be empty.
Compressors that select coordinates over the whole vector (topk, randomk) have no codec: `codec_for`
returns None for them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from commsgd.compression.base import Compressor, Payload, check_finite
from commsgd.compression.bits import pack_signs
from commsgd.compression.blocks import Blocks, abs_sums
from commsgd.compression.cast import Cast
from commsgd.compression.quantize import QSGD, Rounding, noise_words, skip_noise
from commsgd.compression.sign import BlockSign, ScaledSign, Sign

BYTE = 8  # sign bits are packed 8 to a byte, so slices start on whole bytes


def slice_bounds(numel: int, parts: int, align: int) -> list[tuple[int, int]]:
    """`parts` consecutive ranges covering [0, numel), each starting on a multiple of `align` (trailing
    ranges may be empty when the vector is small)."""
    size = math.ceil(math.ceil(numel / parts) / align) * align
    return [(min(j * size, numel), min((j + 1) * size, numel)) for j in range(parts)]


class SliceCodec:
    """Slices whose payloads need no shared statistics: elementwise compressors (none, fp16, bf16,
    sign), QSGD (slices hold whole buckets) and fixed-size sign blocks (slices hold whole blocks)."""

    op: Literal["sum", "max"] = "sum"

    def __init__(self, compressor: Compressor, numel: int, parts: int, align: int) -> None:
        self.whole = compressor
        self.numel = numel
        self.bounds = slice_bounds(numel, parts, align)
        self.stochastic = isinstance(compressor, QSGD | Rounding)

    @property
    def num_stats(self) -> int:
        return 0

    def compressor(self, j: int) -> Compressor:
        """The compressor that decodes slice j's payloads (and gives their wire sizes)."""
        return self.whole

    def stats(self, part: Tensor, j: int) -> Tensor:
        return torch.zeros(self.num_stats, dtype=torch.float32, device=part.device)

    def combine(self, shares: Sequence[Tensor]) -> Tensor:
        """The shares of every slice of one vector, combined as an all-reduce with `op` would."""
        stacked = torch.stack(list(shares))
        return stacked.sum(0) if self.op == "sum" else stacked.amax(0)

    def encode(self, part: Tensor, j: int, shared: Tensor, generator: torch.Generator | None) -> Payload:
        return self.whole.compress(part, generator=generator)

    def encode_alone(
        self, part: Tensor, j: int, shared: Tensor, generator: torch.Generator | None
    ) -> Payload:
        """Slice j of C(x), drawing from `generator` what compressing all of x would."""
        start, stop = self.bounds[j]
        if self.stochastic and generator is not None:
            skip_noise(noise_words(start), generator)
        payload = self.encode(part, j, shared, generator)
        if self.stochastic and generator is not None:
            after = noise_words(self.numel) - noise_words(start) - noise_words(stop - start)
            skip_noise(after, generator)
        return payload


class SignSlices(SliceCodec):
    """Scaled sign and per-tensor sign blocks, whose blocks may cross slice edges. A slice's payload is
    block_sign over the pieces of blocks in it, each with its whole block's scale ||x_b||_1 / d_b; the
    partial L1 sums of the blocks cut by slice edges are the shared statistics (at most parts - 1 for
    per-tensor blocks, one for scaled sign)."""

    def __init__(self, compressor: ScaledSign, numel: int, parts: int) -> None:
        super().__init__(compressor, numel, parts, BYTE)
        blocks = compressor.blocks(numel)
        sizes = [size for count, size in blocks.runs for _ in range(count)]
        edges = [0]
        for size in sizes:
            edges.append(edges[-1] + size)
        # per slice: (block index, piece size) of every block it overlaps
        self._pieces: list[list[tuple[int, int]]] = []
        owners: dict[int, int] = {}
        first = 0
        for start, stop in self.bounds:
            pieces = []
            while first < len(sizes) and edges[first + 1] <= start:
                first += 1
            b = first
            while b < len(sizes) and edges[b] < stop:
                pieces.append((b, min(edges[b + 1], stop) - max(edges[b], start)))
                owners[b] = owners.get(b, 0) + 1
                b += 1
            self._pieces.append(pieces)
        split = sorted(b for b, n in owners.items() if n > 1)
        self._split = {b: i for i, b in enumerate(split)}
        self._sizes = sizes
        self._compressors = [
            BlockSign(sizes=[n for _, n in pieces]) if pieces else ScaledSign() for pieces in self._pieces
        ]

    @property
    def num_stats(self) -> int:
        return len(self._split)

    def compressor(self, j: int) -> Compressor:
        return self._compressors[j]

    def _sums(self, part: Tensor, j: int) -> Tensor:
        """L1 norm of every piece of slice j."""
        layout = Blocks.of_sizes([n for _, n in self._pieces[j]])
        return layout.reduce(part, abs_sums)

    def stats(self, part: Tensor, j: int) -> Tensor:
        shares = torch.zeros(self.num_stats, dtype=torch.float32, device=part.device)
        if part.numel():
            sums = self._sums(part.detach().reshape(-1).float(), j)
            for i, (b, _) in enumerate(self._pieces[j]):
                if b in self._split:
                    shares[self._split[b]] = sums[i]
        return shares

    def encode(self, part: Tensor, j: int, shared: Tensor, generator: torch.Generator | None) -> Payload:
        flat = part.detach().reshape(-1).float()
        payload = Payload({}, torch.Size([flat.numel()]), torch.float32)
        if flat.numel() == 0:
            return self.compressor(j).empty_payload(0, device=flat.device)
        sums = self._sums(flat, j)
        for i, (b, _) in enumerate(self._pieces[j]):
            if b in self._split:
                sums[i] = shared[self._split[b]]
        whole = torch.tensor([self._sizes[b] for b, _ in self._pieces[j]], dtype=torch.float32)
        scales = sums.div_(whole.to(sums.device))
        check_finite(self.whole.name, scales)
        payload.buffers["bits"] = pack_signs(flat)
        payload.buffers["scales"] = scales
        return payload


class RoundingSlices(SliceCodec):
    """Low-precision rounding on the whole vector's grid: its min and max are the shared statistics
    (as max of (-min, max)); slices start on multiples of four, the elements of one word of noise."""

    op: Literal["sum", "max"] = "max"

    def __init__(self, compressor: Rounding, numel: int, parts: int) -> None:
        super().__init__(compressor, numel, parts, BYTE)
        self.rounding = compressor

    @property
    def num_stats(self) -> int:
        return 2

    def stats(self, part: Tensor, j: int) -> Tensor:
        if part.numel() == 0:
            return torch.full((2,), -math.inf, device=part.device)
        lo, hi = torch.aminmax(part.detach().reshape(-1).float())
        return torch.stack([lo.neg(), hi])

    def encode(self, part: Tensor, j: int, shared: Tensor, generator: torch.Generator | None) -> Payload:
        flat = part.detach().reshape(-1).float()
        if flat.numel() == 0:
            return self.whole.empty_payload(0, device=flat.device)
        payload = Payload({}, torch.Size([flat.numel()]), torch.float32)
        self.rounding.encode_on_grid(flat, payload, shared[0].neg(), shared[1], generator)
        return payload


def codec_for(compressor: Compressor, numel: int, parts: int) -> SliceCodec | None:
    """How to cut `compressor`'s result over a vector of `numel` elements into `parts` slices; None
    when it picks coordinates over the whole vector (topk, randomk)."""
    if isinstance(compressor, BlockSign) and compressor.sizes is None:
        return SliceCodec(compressor, numel, parts, math.lcm(BYTE, compressor.block_size))
    if isinstance(compressor, ScaledSign):
        return SignSlices(compressor, numel, parts)
    if isinstance(compressor, QSGD):
        return SliceCodec(compressor, numel, parts, math.lcm(BYTE, compressor.bucket_size))
    if isinstance(compressor, Rounding):
        return RoundingSlices(compressor, numel, parts)
    if isinstance(compressor, Cast | Sign):
        return SliceCodec(compressor, numel, parts, BYTE)
    return None

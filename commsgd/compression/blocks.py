"""Cutting a flat vector into consecutive blocks (scaled-sign blocks, QSGD buckets).

A layout is kept as runs of equal-size blocks, so a per-block reduction or scaling is one 2-D view per run:
fixed-size blocks are at most two runs (the full blocks and a shorter last one), and per-tensor blocks are
one run per distinct consecutive size. No loop ever visits single elements.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Blocks:
    """Consecutive blocks of a flat vector, as runs of (count, size) with size >= 1."""

    runs: tuple[tuple[int, int], ...]

    @classmethod
    def uniform(cls, numel: int, size: int) -> Blocks:
        """Blocks of `size` elements; the last one holds the remainder when `size` does not divide `numel`."""
        full, rest = divmod(numel, size)
        return cls(tuple(run for run in ((full, size), (1, rest)) if run[0] and run[1]))

    @classmethod
    def of_sizes(cls, sizes: Sequence[int]) -> Blocks:
        """One block per entry of `sizes` (all >= 1), e.g. the element counts of a model's tensors."""
        runs: list[tuple[int, int]] = []
        for size in sizes:
            if runs and runs[-1][1] == size:
                runs[-1] = (runs[-1][0] + 1, size)
            else:
                runs.append((1, size))
        return cls(tuple(runs))

    @property
    def numel(self) -> int:
        return sum(count * size for count, size in self.runs)

    @property
    def count(self) -> int:
        return sum(count for count, _ in self.runs)

    @property
    def max_size(self) -> int:
        return max((size for _, size in self.runs), default=0)

    def views(self, flat: Tensor) -> Iterator[Tensor]:
        """A (count, size) view of `flat` per run."""
        start = 0
        for count, size in self.runs:
            yield flat[start : start + count * size].view(count, size)
            start += count * size

    def reduce(self, flat: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """One value per block: `fn` maps a (count, size) view to `count` values."""
        return torch.cat([fn(view) for view in self.views(flat)])

    def scale(self, flat: Tensor, factors: Tensor, *, out: Tensor) -> Tensor:
        """out = flat with block i multiplied by factors[i]; `out` may be `flat` itself."""
        first = 0
        for src, dst in zip(self.views(flat), self.views(out)):
            torch.mul(src, factors[first : first + src.shape[0]].unsqueeze(1), out=dst)
            first += src.shape[0]
        return out


#: elements whose |x| `abs_sums` holds at a time: small enough to stay in cache, so that the sum of a
#: vector's magnitudes makes no copy of the vector (a 60 MB temporary costs more than the sum itself)
ABS_CHUNK = 1 << 16


def abs_sums(view: Tensor) -> Tensor:
    """sum |x| of each row of a 2-D float32 `view`, through one cache-sized buffer. Rows of up to
    `ABS_CHUNK` elements are summed as torch sums them; a longer row is the sum of its chunks' sums."""
    rows, size = view.shape
    sums = torch.zeros(rows, dtype=view.dtype, device=view.device)
    scratch = torch.empty(min(rows * size, ABS_CHUNK), dtype=view.dtype, device=view.device)
    if size <= ABS_CHUNK:
        per = max(1, ABS_CHUNK // max(size, 1))
        for first in range(0, rows, per):
            part = view[first : first + per]
            magnitudes = torch.abs(part, out=scratch[: part.numel()].view(part.shape))
            torch.sum(magnitudes, dim=1, out=sums[first : first + per])
        return sums
    for row in range(rows):
        total = sums[row : row + 1]
        for start in range(0, size, ABS_CHUNK):
            part = view[row, start : start + ABS_CHUNK]
            total.add_(torch.abs(part, out=scratch[: part.numel()]).sum())
    return sums

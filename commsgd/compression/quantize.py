"""Unbiased quantisers built on stochastic rounding: QSGD and low-precision grid rounding."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from commsgd.compression.base import (
    BufferSpec,
    Compressor,
    NonFiniteError,
    Payload,
    check_finite,
    float_param,
    int_param,
    output,
)
from commsgd.compression.blocks import Blocks

_FLOAT32_MAX = torch.finfo(torch.float32).max
_FLOAT32_TINY = torch.finfo(torch.float32).tiny


#: elements rounded per pass of `round_to_levels` (a multiple of 4: whole noise words per chunk), so its
#: scratch buffers stay in cache; noise is drawn chunk after chunk, the same stream as in one draw
ROUND_CHUNK = 1 << 18


def stochastic_round_(t: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Round each entry in place to floor(t) or floor(t) + 1 at random, so that E[result] = t.

    The dither u in floor(t + u) has 16-bit resolution, four values per 64-bit draw, which makes it about
    three times cheaper than torch.rand on a CPU; the price is a bias of at most 2^-17 of one step.
    """
    flat = t.view(-1)
    words = torch.empty(noise_words(min(flat.numel(), ROUND_CHUNK)), dtype=torch.int64, device=t.device)
    for start in range(0, flat.numel(), ROUND_CHUNK):
        _dither_floor_(flat[start : start + ROUND_CHUNK], words, generator)
    return t


def _dither_floor_(t: Tensor, words: Tensor, generator: torch.Generator | None) -> Tensor:
    """`stochastic_round_` of a flat `t`, drawing its noise into the front of `words` (scratch)."""
    drawn = words[: noise_words(t.numel())]
    drawn.random_(-(2**63), None, generator=generator)
    noise = drawn.view(torch.int16)[: t.numel()]  # added as int16: exact in float32, no float copy
    # noise is uniform on {-2^15, ..., 2^15 - 1}; u = (noise + 2^15 + 1/2) / 2^16 lies in (0, 1).
    return t.add_(noise, alpha=2.0**-16).add_(0.5 + 2.0**-17).floor_()


def round_to_levels(
    numel: int,
    to_grid: Callable[[int, int, Tensor], Tensor],
    bound: tuple[int, int],
    dtype: torch.dtype,
    generator: torch.Generator | None,
    *,
    device: torch.device,
    align: int = 1,
) -> Tensor:
    """Integer levels clamp(stochastic_round(v), *bound) as `dtype`, where v = to_grid(start, stop, out)
    writes elements [start, stop) of the values to put on the grid into `out` and returns it.

    Works chunks of `chunk_size(align)` elements (`align`: e.g. a bucket size whose scale to_grid applies
    per chunk) through one scratch buffer: a few in-cache passes per chunk instead of several passes
    over vector-sized temporaries. The noise is drawn in order, so the levels equal those of one
    `stochastic_round_` over the whole vector.
    """
    chunk = chunk_size(align)
    levels = torch.empty(numel, dtype=dtype, device=device)
    scratch = torch.empty(min(chunk, numel), dtype=torch.float32, device=device)
    words = torch.empty(noise_words(scratch.numel()), dtype=torch.int64, device=device)
    for start in range(0, numel, chunk):
        stop = min(start + chunk, numel)
        values = to_grid(start, stop, scratch[: stop - start])
        _dither_floor_(values, words, generator).clamp_(*bound)
        levels[start:stop].copy_(values)
    return levels


def from_levels(
    levels: Tensor,
    to_values: Callable[[int, int, Tensor], Tensor],
    *,
    align: int = 1,
    out: Tensor | None = None,
) -> Tensor:
    """float32 values of integer `levels` (written into `out` when given), where to_values(start, stop,
    part) turns `part`, holding levels [start, stop) as floats, into their values in place. Chunks of
    `chunk_size(align)` elements are converted and mapped while in cache, one pass over the result
    instead of three."""
    values = output(levels.numel(), out, levels)
    chunk = chunk_size(align)
    for start in range(0, levels.numel(), chunk):
        stop = min(start + chunk, levels.numel())
        to_values(start, stop, values[start:stop].copy_(levels[start:stop]))
    return values


def chunk_size(align: int) -> int:
    """Elements per chunk of `round_to_levels` and `from_levels`: `ROUND_CHUNK` rounded down to a
    multiple of 4 (whole noise words) and of `align`, at least one such multiple."""
    unit = align * 4 // math.gcd(align, 4)
    return max(unit, ROUND_CHUNK // unit * unit)


def noise_words(numel: int) -> int:
    """Random 64-bit words `stochastic_round_` draws for `numel` entries (four 16-bit dithers a word)."""
    return (numel + 3) // 4


def skip_noise(words: int, generator: torch.Generator, chunk: int = 1 << 20) -> None:
    """Advance `generator` as drawing `words` words of rounding noise would, keeping none of them (a
    sharded server steps past the other slices' noise; drawn in chunks to bound memory)."""
    buffer = torch.empty(min(words, chunk), dtype=torch.int64, device=generator.device)
    while words > 0:
        part = buffer[: min(words, chunk)]
        part.random_(-(2**63), None, generator=generator)
        words -= part.numel()


class QSGD(Compressor):
    """QSGD (Alistarh et al., 2017): per bucket of `bucket_size` elements with norm N, coordinate v goes
    to N/s times an integer l in [-s, s], rounded stochastically so that E[l] = s v / N. Levels travel as
    int8 (so s <= 127), plus one float32 N per bucket.

    N is the bucket's 2-norm, rescaled by the bucket's max |x| when float32 squares would overflow or
    underflow, so that 1e30 and 1e-30 inputs quantise as well as unit ones.
    """

    name = "qsgd"
    unbiased = True

    def __init__(self, levels: int = 127, bucket_size: int = 512) -> None:
        self.levels = int_param(self.name, "levels", levels, 1, 127)
        self.bucket_size = int_param(self.name, "bucket_size", bucket_size, 1)

    def buffer_specs(self, shape: torch.Size) -> dict[str, BufferSpec]:
        numel = shape.numel()
        buckets = Blocks.uniform(numel, self.bucket_size).count
        return {"levels": (numel, torch.int8), "norms": (buckets, torch.float32)}

    def _encode(
        self, flat: Tensor, payload: Payload, *, generator: torch.Generator | None, key: str | None
    ) -> None:
        buckets = Blocks.uniform(flat.numel(), self.bucket_size)
        norms = buckets.reduce(flat, self._bucket_norms)
        # N >= s / float32 max keeps s / N finite: a zero bucket gets levels 0, and buckets below
        # ~4e-37 (subnormal territory) are quantised on that coarser scale, still without bias.
        norms.clamp_(min=self.levels / _FLOAT32_MAX)
        factors = self.levels / norms

        def scaled(start: int, stop: int, out: Tensor) -> Tensor:
            return self._scale_buckets(flat[start:stop], start, factors, out)

        bound = (-self.levels, self.levels)
        payload.buffers["levels"] = round_to_levels(
            flat.numel(), scaled, bound, torch.int8, generator, device=flat.device, align=self.bucket_size
        )
        payload.buffers["norms"] = norms

    def _decode(self, payload: Payload, out: Tensor | None) -> Tensor:
        steps = payload.buffers["norms"] / self.levels

        def scaled(start: int, stop: int, out: Tensor) -> Tensor:
            return self._scale_buckets(out, start, steps, out)

        return from_levels(payload.buffers["levels"], scaled, align=self.bucket_size, out=out)

    def _scale_buckets(self, part: Tensor, start: int, factors: Tensor, out: Tensor) -> Tensor:
        """out = `part`, elements [start, start + len(part)) of a vector with `start` on a bucket edge,
        with each bucket multiplied by its entry of `factors` (one per bucket of the whole vector)."""
        first = start // self.bucket_size
        return Blocks.uniform(part.numel(), self.bucket_size).scale(part, factors[first:], out=out)

    def _bucket_norms(self, view: Tensor) -> Tensor:
        largest = torch.maximum(view.amax(dim=1), view.amin(dim=1).neg_())
        check_finite(self.name, largest)
        norms = torch.linalg.vector_norm(view, dim=1)
        if not bool((torch.isfinite(norms) & (norms >= largest * (1 - 2**-10))).all()):
            # float32 squares overflowed (|x| > ~1e19) or underflowed (|x| < ~1e-19): rescale by the max.
            unit = view / largest.clamp(min=_FLOAT32_TINY).unsqueeze(1)
            norms = (largest * torch.linalg.vector_norm(unit, dim=1)).clamp_(max=_FLOAT32_MAX)
        return torch.maximum(norms, largest)


class Rounding(Compressor):
    """Low-precision stochastic rounding onto a grid (the quantiser of QuanTimed-DSGD): x goes to
    center + l * step with an integer level l of `bits` bits, E = x, variance <= step^2 / 4 per coordinate.

    With `step` unset the grid spans [min x, max x] in 2^bits - 1 steps; with `step` set the grid is
    step * Z (a fixed variance bound) and a tensor spanning more than 2^bits - 1 steps raises
    NonFiniteError (out of range, like a float16 overflow).
    Levels travel as int8 (bits <= 8) or int16, in [-2^(bits-1), 2^(bits-1)), plus float32 center and
    step (8 bytes).
    """

    name = "rounding"
    unbiased = True

    def __init__(self, bits: int = 8, step: float | None = None) -> None:
        self.bits = int_param(self.name, "bits", bits, 1, 16)
        self.step = None if step is None else float_param(self.name, "step", step, 0.0, _FLOAT32_MAX)
        self.wire = torch.int8 if self.bits <= 8 else torch.int16

    def buffer_specs(self, shape: torch.Size) -> dict[str, BufferSpec]:
        return {
            "levels": (shape.numel(), self.wire),
            "center": (1, torch.float32),
            "step": (1, torch.float32),
        }

    def _encode(
        self, flat: Tensor, payload: Payload, *, generator: torch.Generator | None, key: str | None
    ) -> None:
        lo, hi = torch.aminmax(flat)
        self.encode_on_grid(flat, payload, lo, hi, generator)

    def encode_on_grid(
        self, flat: Tensor, payload: Payload, lo: Tensor, hi: Tensor, generator: torch.Generator | None
    ) -> None:
        """Fill `payload` for `flat` on the grid of a tensor spanning [lo, hi] (which holds `flat`): its
        own range, or a whole vector's when `flat` is one slice of it (`commsgd.compression.slices`)."""
        check_finite(self.name, lo, hi)
        steps, half = 2**self.bits - 1, 2 ** (self.bits - 1)
        if self.step is None:
            # Any step >= (hi - lo) / steps covers the range; the floor keeps 1/step finite.
            step = ((hi - lo) / steps).clamp_(min=_FLOAT32_TINY)
            check_finite(self.name, step)
            origin = lo
        else:
            step = torch.tensor(self.step, device=flat.device)
            origin = torch.floor(lo / step) * step
            span = float((hi - origin) / step)
            if not span <= steps:  # out of range, as a float16 overflow is: the guard's business
                raise NonFiniteError(
                    f"{self.name}: values span {span:.0f} steps of {self.step:g}, more than the {steps} that "
                    f"bits={self.bits} holds; raise step or bits"
                )
        center = origin + half * step

        def on_grid(start: int, stop: int, out: Tensor) -> Tensor:
            return torch.sub(flat[start:stop], center, out=out).div_(step)

        payload.buffers["levels"] = round_to_levels(
            flat.numel(), on_grid, (-half, half - 1), self.wire, generator, device=flat.device
        )
        payload.buffers["center"] = center.reshape(1)
        payload.buffers["step"] = step.reshape(1)

    def _decode(self, payload: Payload, out: Tensor | None) -> Tensor:
        step, center = payload.buffers["step"], payload.buffers["center"]
        return from_levels(
            payload.buffers["levels"], lambda start, stop, part: part.mul_(step).add_(center), out=out
        )

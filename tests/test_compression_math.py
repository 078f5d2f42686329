"""Pins what the chunked compressor kernels compute: on vectors spanning several chunks (with a short last
chunk, bucket and byte), payloads and decompressed tensors equal, bit for bit, the formulas written
out over the whole vector with plain tensor ops, and the generator ends in the same state."""

from __future__ import annotations

import math

import pytest
import torch

from commsgd.compression import get, pack_signs, unpack_signs
from commsgd.compression.bits import PACK_CHUNK
from commsgd.compression.blocks import abs_sums
from commsgd.compression.quantize import ROUND_CHUNK, noise_words

NUMEL = 3 * max(PACK_CHUNK, ROUND_CHUNK) + 1005  # several chunks, a short last one, not a multiple of 8


def vector(seed: int, numel: int = NUMEL) -> torch.Tensor:
    """Gaussian entries with exact zeros and negative zeros mixed in."""
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    x[::97] = 0.0
    x[1::97] = -0.0
    return x


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (so -0.0 differs from 0.0 and NaNs compare by payload)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def dithered_floor(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """floor(t + u) with u = (noise + 2^15 + 1/2) / 2^16, noise the int16 lanes of full-range int64 draws,
    added in this order: the documented stochastic rounding, written over the whole vector at once."""
    words = torch.empty(noise_words(t.numel()), dtype=torch.int64)
    words.random_(-(2**63), None, generator=generator)
    noise = words.view(torch.int16)[: t.numel()].to(torch.float32)
    return ((t + noise * 2.0**-16) + (0.5 + 2.0**-17)).floor()


def reference_bits(x: torch.Tensor) -> torch.Tensor:
    """Byte j: bit i set when x[8j + i] >= 0, padding bits set."""
    flags = torch.ones(8 * math.ceil(x.numel() / 8), dtype=torch.int64)
    flags[: x.numel()] = (x >= 0).to(torch.int64)
    return (flags.view(-1, 8) << torch.arange(8)).sum(dim=1).to(torch.uint8)


@pytest.mark.parametrize("numel", [1, 8, 9, PACK_CHUNK, PACK_CHUNK + 1, NUMEL])
def test_pack_signs_matches_the_bit_formula_across_chunks(numel: int) -> None:
    x = vector(1, numel)
    packed = pack_signs(x)
    assert same_bits(packed, reference_bits(x))
    assert same_bits(unpack_signs(packed, numel), torch.where(x >= 0, 1.0, -1.0))


@pytest.mark.parametrize("scale", [0.25, -3.0, 0.0, -0.0, math.inf, math.nan], ids=str)
def test_unpack_signs_with_a_scale_is_signs_times_scale(scale: float) -> None:
    packed = pack_signs(vector(2, 1001))
    s = torch.tensor([scale])
    assert same_bits(unpack_signs(packed, 1001, scale=s), unpack_signs(packed, 1001) * s)


def test_scaled_sign_is_mean_abs_times_sign() -> None:
    x = vector(3)
    c = get("scaled_sign")
    payload = c.compress(x)
    scale = payload.buffers["scales"]
    # the sum of magnitudes runs chunk by chunk (no copy of the vector): float32 rounding, nothing more
    exact = x.double().abs().sum() / x.numel()
    torch.testing.assert_close(scale.double(), exact.reshape(1), rtol=1e-6, atol=0)
    assert same_bits(payload.buffers["bits"], reference_bits(x))
    assert same_bits(c.decompress(payload), torch.where(x >= 0, 1.0, -1.0) * scale)


@pytest.mark.parametrize("shape", [(1, 5), (3, 1000), (700, 64), (2, (1 << 16) + 3), (1, 3 * (1 << 16))])
def test_abs_sums_match_the_sum_of_magnitudes_per_row(shape: tuple[int, int]) -> None:
    view = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    expected = view.double().abs().sum(dim=1)
    torch.testing.assert_close(abs_sums(view).double(), expected, rtol=1e-6, atol=0)
    if shape[1] <= 1 << 16:  # a row that fits one chunk is summed as torch sums it
        assert same_bits(abs_sums(view), view.abs().sum(dim=1))


@pytest.mark.parametrize("bucket_size", [512, 1000, 2 * ROUND_CHUNK + 3])
def test_qsgd_matches_the_formula_over_the_whole_vector(bucket_size: int) -> None:
    levels, x = 127, vector(4)
    c = get("qsgd", levels=levels, bucket_size=bucket_size)
    g, g_ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    payload = c.compress(x, generator=g)
    norms = payload.buffers["norms"]
    buckets = torch.arange(x.numel()) // bucket_size
    squares = torch.zeros(norms.numel(), dtype=torch.float64).index_add_(0, buckets, x.double() ** 2)
    # the norms, up to summation order
    assert torch.allclose(norms.double(), squares.sqrt(), rtol=1e-5, atol=0)
    q = dithered_floor(x * (levels / norms)[buckets], g_ref).clamp(-levels, levels)
    assert same_bits(payload.buffers["levels"], q.to(torch.int8))
    assert torch.equal(g.get_state(), g_ref.get_state())
    assert same_bits(c.decompress(payload), q * (norms / levels)[buckets])


@pytest.mark.parametrize("bits", [3, 8, 12])
def test_rounding_matches_the_formula_over_the_whole_vector(bits: int) -> None:
    x = vector(6)
    c = get("rounding", bits=bits)
    g, g_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    payload = c.compress(x, generator=g)
    lo, hi = torch.aminmax(x)
    half = 2 ** (bits - 1)
    step = (hi - lo) / (2**bits - 1)
    center = lo + half * step
    q = dithered_floor((x - center) / step, g_ref).clamp(-half, half - 1)
    assert same_bits(payload.buffers["levels"], q.to(torch.int8 if bits <= 8 else torch.int16))
    assert same_bits(payload.buffers["step"], step.reshape(1))
    assert same_bits(payload.buffers["center"], center.reshape(1))
    assert torch.equal(g.get_state(), g_ref.get_state())
    assert same_bits(c.decompress(payload), q * step + center)

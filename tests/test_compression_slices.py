"""Slice codecs: compressing a vector one slice at a time gives the whole vector's compression, both
as a worker does it (all slices, shared statistics combined locally, one generator) and as the owner
of one slice does it (its share all-reduced, the other slices' random words skipped)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from commsgd.compression import get
from commsgd.compression.slices import codec_for, slice_bounds

NUMEL = 227
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    "fp16": ("fp16", {}),
    "bf16": ("bf16", {}),
    "sign": ("sign", {}),
    "scaled_sign": ("scaled_sign", {}),
    "block_sign": ("block_sign", {"block_size": 12}),
    "block_per_tensor": ("block_sign", {"sizes": [100, 27, 64, 36]}),
    "qsgd": ("qsgd", {"levels": 8, "bucket_size": 20}),
    "rounding": ("rounding", {"bits": 4}),
    "rounding_fixed_step": ("rounding", {"bits": 8, "step": 0.05}),
}


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(5)


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 7, 40])
@pytest.mark.parametrize("case", list(CASES))
def test_slices_give_the_whole_vectors_compression(case: str, parts: int) -> None:
    name, kwargs = CASES[case]
    compressor = get(name, **kwargs)
    x = torch.randn(NUMEL, generator=torch.Generator().manual_seed(0))
    whole = compressor.decompress(compressor.compress(x, generator=_gen()))
    codec = codec_for(compressor, NUMEL, parts)
    assert codec is not None
    pieces = [x[a:b] for a, b in codec.bounds]
    assert sum(p.numel() for p in pieces) == NUMEL
    shared = codec.combine([codec.stats(p, j) for j, p in enumerate(pieces)])
    # a worker: every slice in order with one generator
    gen = _gen()
    worker = [codec.compressor(j).decompress(codec.encode(p, j, shared, gen)) for j, p in enumerate(pieces)]
    torch.testing.assert_close(torch.cat(worker), whole, rtol=1e-6, atol=1e-6)
    # the owners: each its own slice, from the same stream
    owners = [
        codec.compressor(j).decompress(codec.encode_alone(p, j, shared, _gen())) for j, p in enumerate(pieces)
    ]
    torch.testing.assert_close(torch.cat(owners), whole, rtol=1e-6, atol=1e-6)


def test_every_owner_draws_what_one_server_draws() -> None:
    """After encode_alone every owner's generator is where one server's is after the whole vector, so
    the next step's noise lines up too."""
    compressor = get("qsgd", bucket_size=8)
    x = torch.randn(NUMEL)
    one = _gen()
    compressor.compress(x, generator=one)
    codec = codec_for(compressor, NUMEL, 3)
    assert codec is not None
    for j, (a, b) in enumerate(codec.bounds):
        gen = _gen()
        codec.encode_alone(x[a:b], j, codec.stats(x[a:b], j), gen)
        assert torch.equal(gen.get_state(), one.get_state())


def test_coordinate_pickers_have_no_codec_and_empty_slices_are_fine() -> None:
    assert codec_for(get("topk"), NUMEL, 3) is None
    assert codec_for(get("randomk", shared_indices=False), NUMEL, 3) is None
    codec = codec_for(get("block_sign", sizes=[8, 6]), 14, 4)  # the crash case: slices 3 and 4 empty
    assert codec is not None and codec.bounds == [(0, 8), (8, 14), (14, 14), (14, 14)]
    assert codec.compressor(3).payload_nbytes(0) == 0
    assert slice_bounds(10, 4, 8) == [(0, 8), (8, 10), (10, 10), (10, 10)]

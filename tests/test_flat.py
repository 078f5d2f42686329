"""FlatBuffer: many tensors as one contiguous buffer (pack, unpack, views) and how tensors are grouped."""

from __future__ import annotations

import pytest
import torch

from commsgd.flat import FlatBuffer, buckets, by_dtype


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 4, generator=g), torch.randn(5, generator=g), torch.randn(2, 1, 2, generator=g)]


def test_pack_then_unpack_into_other_tensors_round_trips() -> None:
    source = _tensors()
    flat = FlatBuffer(source)
    packed = flat.pack()
    assert packed.numel() == 21 and torch.equal(packed[:12], source[0].reshape(-1))
    targets = [torch.zeros_like(t) for t in source]
    flat.unpack(into=targets)
    assert all(torch.equal(a, b) for a, b in zip(targets, source))


def test_unpack_of_a_received_buffer_and_its_views() -> None:
    mirrored = _tensors()
    flat = FlatBuffer(mirrored)
    received = torch.arange(21, dtype=torch.float32)
    views = flat.views(received)
    assert [v.shape for v in views] == [t.shape for t in mirrored]
    flat.unpack(received)
    assert torch.equal(mirrored[1], torch.arange(12, 17, dtype=torch.float32))
    assert torch.equal(torch.cat([t.reshape(-1) for t in mirrored]), received)


def test_own_views_follow_the_buffer() -> None:
    flat = FlatBuffer(_tensors())
    flat.buffer.fill_(7.0)
    assert all(bool((v == 7.0).all()) for v in flat.views())
    flat.views()[0].zero_()  # the list is a copy, the views are the buffer's
    assert float(flat.buffer[:12].sum()) == 0.0


def test_wrong_sizes_and_mixed_dtypes_are_refused() -> None:
    flat = FlatBuffer(_tensors())
    with pytest.raises(ValueError, match="2 tensors given, 3 expected"):
        flat.unpack(into=_tensors()[:2])
    with pytest.raises(ValueError, match="share one dtype"):
        FlatBuffer([torch.zeros(2), torch.zeros(2, dtype=torch.float64)])
    with pytest.raises(ValueError, match="at least one tensor"):
        FlatBuffer([])


def test_grouping_by_dtype_and_into_buckets_keeps_order() -> None:
    a, b, c = torch.zeros(10), torch.zeros(10, dtype=torch.float64), torch.zeros(300)
    assert [f.tensors[0].dtype for f in by_dtype([a, b, c])] == [torch.float32, torch.float64]
    parts = buckets([a, c, b], bucket_bytes=400)  # a fits, c would overflow, b changes dtype
    assert [[t.numel() for t in f.tensors] for f in parts] == [[10], [300], [10]]

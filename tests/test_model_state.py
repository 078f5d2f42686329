"""ModelState: a model's state as flat buffers, read, written and added to; Buffers keep their views."""

from __future__ import annotations

import pytest
import torch

from commsgd.algorithms.pull import Buffers, ModelState


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def test_read_write_and_add_match_the_tensors_one_by_one() -> None:
    model = _model()
    state = ModelState(model)
    tensors = [t for f in state.flats for t in f.tensors]
    assert all(t.dtype == torch.float32 for t in tensors)  # parameters and float buffers: one flat
    before = [t.detach().clone() for t in tensors]
    kept = state.copy()
    assert isinstance(kept, Buffers)
    assert torch.equal(torch.cat([t.reshape(-1) for t in before]), kept[0])
    step = [torch.randn_like(t) for t in tensors]
    with torch.no_grad():
        state.add_(Buffers([torch.cat([s.reshape(-1) for s in step])]), 0.25)  # kept views
        expected = [b.clone().add_(s, alpha=0.25) for b, s in zip(before, step)]
        assert all(torch.equal(t, e) for t, e in zip(tensors, expected))
        state.add_([torch.cat([s.reshape(-1) for s in step])], -0.25)  # a plain list: views made anew
        assert all(torch.equal(t, e.add_(s, alpha=-0.25)) for t, e, s in zip(tensors, expected, step))
        for t in tensors:
            t.zero_()
    state.write(kept)
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))


def test_buffers_remake_their_views_when_a_buffer_is_replaced() -> None:
    state = ModelState(_model())
    kept = state.empty()
    kept[0].fill_(1.0)
    state.write(kept)  # views made and kept
    kept[0] = torch.full_like(kept[0], 2.0)  # a new tensor in the list: the old views must not be used
    state.write(kept)
    assert all(bool((t == 2.0).all()) for t in state.flats[0].tensors)
    with torch.no_grad():
        for t in state.flats[0].tensors:
            t.fill_(3.0)
    state.read(kept)
    assert bool((kept[0] == 3.0).all())
    kept[0].set_(torch.full_like(kept[0], 4.0))  # the same tensor moved to other memory
    state.write(kept)
    assert all(bool((t == 4.0).all()) for t in state.flats[0].tensors)
    kept.append(torch.zeros(1))
    with pytest.raises(ValueError, match="2 buffers for a state of 1 flat buffers"):
        state.write(kept)

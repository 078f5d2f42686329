"""`FlatGradients`: the gradients become views of the one vector after a scatter, so that a step of a
compressing algorithm copies no gradient; replaced gradients are copied in; DDP's bucket views are
written in place."""

from __future__ import annotations

import torch
from torch import nn

from commsgd.algorithms.compressed import FlatGradients


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


X = torch.linspace(-1, 1, 20).view(5, 4)


def _backward(model: nn.Module) -> None:
    model(X).square().sum().backward()


def _in(buffer: torch.Tensor, t: torch.Tensor) -> bool:
    start = buffer.data_ptr()
    return start <= t.data_ptr() < start + buffer.numel() * buffer.element_size()


def test_after_a_scatter_backward_accumulates_into_the_vector_and_gather_copies_nothing() -> None:
    model = _model()
    params = list(model.parameters())
    flat = FlatGradients(params)
    _backward(model)
    expected = torch.cat([p.grad.reshape(-1) for p in params]).clone()
    assert not flat.viewed()
    assert torch.equal(flat.gather(), expected)
    flat.buffer.mul_(0.5)
    flat.scatter(flat.buffer)
    assert flat.viewed() and all(_in(flat.buffer, p.grad) for p in params)
    assert torch.equal(torch.cat([p.grad.reshape(-1) for p in params]), expected * 0.5)
    for p in params:
        p.grad.zero_()  # what zero_grad(set_to_none=False) does
    _backward(model)
    assert flat.viewed() and torch.equal(flat.gather(), expected)  # the same batch again: the same gradient


def test_replaced_gradients_are_copied_in_and_viewed_again_at_the_next_scatter() -> None:
    model = _model()
    params = list(model.parameters())
    flat = FlatGradients(params)
    _backward(model)
    flat.scatter(flat.gather())
    model.zero_grad(set_to_none=True)
    _backward(model)
    assert not flat.viewed()
    fresh = torch.cat([p.grad.reshape(-1) for p in params]).clone()
    assert torch.equal(flat.gather(), fresh)
    flat.scatter(torch.ones(flat.numel))  # another tensor: copied into the gradients
    assert not flat.viewed() and all(torch.equal(p.grad, torch.ones_like(p)) for p in params)


def test_gradients_that_view_another_buffer_are_written_in_place() -> None:
    params = [torch.zeros(2, 3, requires_grad=True), torch.zeros(4, requires_grad=True)]
    bucket = torch.arange(10, dtype=torch.float32)
    params[0].grad, params[1].grad = bucket[:6].view(2, 3), bucket[6:]
    flat = FlatGradients(params)
    assert torch.equal(flat.gather(), torch.arange(10, dtype=torch.float32))
    flat.buffer.neg_()
    flat.scatter(flat.buffer)
    assert torch.equal(bucket, -torch.arange(10, dtype=torch.float32))  # DDP reads its bucket
    assert params[0].grad.data_ptr() == bucket.data_ptr() and not flat.viewed()


def test_a_missing_gradient_counts_as_zero() -> None:
    params = [torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)]
    params[0].grad = torch.full((3,), 2.0)
    flat = FlatGradients(params)
    assert torch.equal(flat.gather(), torch.tensor([2.0, 2.0, 2.0, 0.0, 0.0]))
    flat.scatter(flat.buffer)
    assert flat.viewed() and torch.equal(params[1].grad, torch.zeros(2))

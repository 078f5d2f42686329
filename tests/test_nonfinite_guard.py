"""The non-finite guard of CommOptimizer: what `all_finite` flags, and that its counters survive resume."""

from __future__ import annotations

import math

import pytest
import torch

import commsgd
from commsgd.api import all_finite
from commsgd.finite import SMALL_CHECK

#: element counts on either side of `SMALL_CHECK`: checked in Python, and by the fused kernel
SCALES = [1, 10]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [0, 1, 3], ids=["2-d", "1-d", "0-d"])
def test_one_bad_element_anywhere_is_caught(bad: float, scale: int, where: int) -> None:
    tensors = [torch.randn(5 * scale, 3), torch.randn(7 * scale), torch.randn(2, 2 * scale), torch.randn(())]
    assert (sum(t.numel() for t in tensors) <= SMALL_CHECK) == (scale == 1)
    assert all_finite(tensors)
    tensors[where].view(-1)[-1] = bad
    assert not all_finite(tensors)


@pytest.mark.parametrize("scale", SCALES)
def test_opposite_infinities_do_not_cancel(scale: int) -> None:
    ones = torch.ones(SMALL_CHECK * (scale - 1))
    assert not all_finite([torch.tensor([math.inf, 1.0]), torch.tensor([-math.inf]), ones])


@pytest.mark.parametrize("scale", SCALES)
def test_low_precision_sums_do_not_overflow_on_finite_values(scale: int) -> None:
    big = torch.full((4 * scale * scale,), 60000.0, dtype=torch.float16)  # sums past the float16 maximum
    assert all_finite([big, torch.ones(3, dtype=torch.bfloat16)])
    big[2] = math.nan
    assert not all_finite([big])


def test_no_tensors_is_finite() -> None:
    assert all_finite([])


def test_bad_step_counters_are_saved_and_restored() -> None:
    class _Algo:
        ctx = object()
        name = "fake"

        def state_dict(self) -> dict[str, int]:
            return {}

        def load_state_dict(self, state: dict[str, int]) -> None:
            pass

    model = torch.nn.Linear(2, 1)
    opt = commsgd.CommOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), _Algo(), model, None)  # type: ignore[arg-type]
    opt.bad_in_a_row, opt.bad_steps, opt.steps = 2, 7, 11
    state = opt.state_dict()
    fresh = commsgd.CommOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), _Algo(), model, None)  # type: ignore[arg-type]
    fresh.load_state_dict(state)
    assert (fresh.bad_in_a_row, fresh.bad_steps, fresh.steps) == (2, 7, 11)
    del state["bad_in_a_row"], state["bad_steps"]  # a checkpoint from before the counters were saved
    fresh.load_state_dict(state)
    assert (fresh.bad_in_a_row, fresh.bad_steps) == (0, 0)


def test_the_check_leaves_values_untouched_and_ignores_integers() -> None:
    tensors = [torch.randn(4, 3), torch.randn(5, dtype=torch.float64), torch.arange(3)]
    before = [t.clone() for t in tensors]
    assert all_finite(tensors)
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))
    assert all_finite([torch.arange(5), torch.zeros(2, dtype=torch.uint8)])


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_the_summing_fallback_catches_the_same(monkeypatch: pytest.MonkeyPatch, bad: float) -> None:
    """Where torch's fused check is missing (a dtype or device it lacks), the sums decide alike."""

    def missing(*_: object) -> None:
        raise NotImplementedError("no kernel")

    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", missing)
    tensors = [torch.randn(3), torch.randn(2, 2)]
    assert all_finite(tensors)
    tensors[1][1, 0] = bad
    assert not all_finite(tensors)


#: algorithms whose `after_backward` must leave `.grad` as backward left it (`replaces_gradients`)
GRADIENT_KEEPING = [
    ("local_sgd", {"tau": 2}),
    ("easgd", {"tau": 2}),  # a RoundAlgorithm, as lsgd (whose node layout this one-worker context lacks)
    ("diloco", {"inner_steps": 2}),
    ("sgd", {}),
]


@pytest.mark.parametrize(("name", "params"), GRADIENT_KEEPING)
def test_model_averaging_algorithms_leave_the_gradient_and_the_guard_checks_it_once(
    name: str, params: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    from commsgd import api
    from commsgd.algorithms import build_algorithm
    from commsgd.testing import SoloContext

    algo = build_algorithm(name, params)
    assert not algo.replaces_gradients
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    opt = commsgd.CommOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), algo, model, SoloContext())  # type: ignore[arg-type]
    checks: list[int] = []
    monkeypatch.setattr(api, "all_finite", lambda tensors: checks.append(1) or all_finite(tensors))
    seen: list[list[torch.Tensor]] = []
    original = algo.after_backward

    def after_backward(step: int) -> None:
        before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        original(step)
        seen.append(before)
        after = [p.grad for p in model.parameters() if p.grad is not None]
        assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))

    algo.after_backward = after_backward  # type: ignore[method-assign]
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    for _ in range(4):  # two rounds each
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step(loss)
    assert len(seen) == 4 and len(checks) == 4  # one check a step: before the algorithm, not after


def test_an_algorithm_that_writes_gradients_gets_them_checked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from commsgd import api
    from commsgd.algorithms import build_algorithm
    from commsgd.testing import SoloContext

    algo = build_algorithm("ef_sgd")
    assert algo.replaces_gradients
    model = torch.nn.Linear(4, 1)
    opt = commsgd.CommOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), algo, model, SoloContext())  # type: ignore[arg-type]
    checks: list[int] = []
    monkeypatch.setattr(api, "all_finite", lambda tensors: checks.append(1) or all_finite(tensors))
    for _ in range(3):
        opt.zero_grad()
        loss = model(torch.ones(2, 4)).sum()
        loss.backward()
        opt.step(loss)
    assert len(checks) == 6  # the local gradient, then what came back

"""qdsgd/quantimed and the torch optimizer settings, and QuanTimed's deadline counted in samples.

- Weight decay is applied (g_i + wd x_i), where it used to be dropped silently; momentum is not part
  of the Q-DSGD update, and rank 0 says so at start-up.
- The deadline counts samples, as the paper does: of a batch it cuts short, the samples that fit count
  (before, the whole unfinished batch was dropped).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import commsgd
from commsgd.algorithms.stragglers import gradient_by_deadline
from commsgd.testing import run_distributed

ALPHA, EPS, LR, WD = 0.4, 0.5, 0.05, 0.1


def _flat(values: Any) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1) for v in values])


def _one_step(momentum: float) -> dict[str, Any]:
    ctx = commsgd.init()
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(ctx.rank)  # the workers' models differ, so mixing moves them
    algo = commsgd.build_algorithm("qdsgd", compressor="none", alpha=ALPHA, eps=EPS)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum, weight_decay=WD)
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        opt = commsgd.CommOptimizer(optimizer, algo, model, ctx)
    gen = torch.Generator().manual_seed(ctx.rank)
    x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)
    before = _flat(model.parameters()).clone()
    opt.zero_grad()
    loss = F.mse_loss(model(x), y)
    loss.backward()
    grad = _flat(p.grad for p in model.parameters()).clone()
    opt.step(loss)
    result = {
        "before": before,
        "grad": grad,
        "after": _flat(model.parameters()),
        "self_weight": algo.hood.self_weight,  # type: ignore[attr-defined]
        "weights": dict(zip(algo.hood.peers, algo.hood.weights)),  # type: ignore[attr-defined]
        "stderr": printed.getvalue(),
    }
    ctx.close()
    return result


@pytest.mark.multiprocess
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_qdsgd_applies_weight_decay_and_says_momentum_is_not_used(momentum: float) -> None:
    results = run_distributed(_one_step, 2, momentum)
    for mine in results:
        mixed = (1 - EPS + EPS * mine["self_weight"]) * mine["before"]
        for peer, w in mine["weights"].items():
            mixed += EPS * w * results[peer]["before"]
        want = mixed - ALPHA * EPS * (mine["grad"] + WD * mine["before"])
        torch.testing.assert_close(mine["after"], want, rtol=1e-6, atol=1e-7)
    line = "commsgd: warning: qdsgd: momentum 0.9 is not used"
    assert (line in results[0]["stderr"]) == (momentum > 0)
    assert line not in results[1]["stderr"]  # said once, by rank 0


# ------------------------------------------------------------------------------- samples by the deadline


def _fake_clock(monkeypatch: pytest.MonkeyPatch) -> tuple[list[float], Any]:
    clock = [0.0]
    monkeypatch.setattr("commsgd.algorithms.stragglers.time.perf_counter", lambda: clock[0])

    def advance(seconds: float) -> None:
        clock[0] += seconds

    return clock, advance


def _data(count: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(size, 3, generator=g), torch.randn(size, 1, generator=g)) for _ in range(count)]


def _draws(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]], with_head: bool) -> Any:
    it = iter(data)

    def batch_of(x: torch.Tensor, y: torch.Tensor) -> commsgd.MiniBatch:
        head = (lambda n: batch_of(x[:n], y[:n])) if with_head else None
        return commsgd.MiniBatch(lambda: F.mse_loss(model(x), y), len(y), head=head)

    return lambda: batch_of(*next(it))


def test_a_batch_cut_by_the_deadline_gives_the_samples_that_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """1 s per sample, batches of 10, deadline 25 s: two whole batches and 5 samples of the third."""
    _, advance = _fake_clock(monkeypatch)
    model = nn.Linear(3, 1)
    data = _data(4, 10)
    result = gradient_by_deadline(list(model.parameters()), _draws(model, data, True), 25.0, 1.0, advance)
    assert (result.samples, result.batches, result.cut_samples) == (25, 2, 5)
    x = torch.cat([data[0][0], data[1][0], data[2][0][:5]])
    y = torch.cat([data[0][1], data[1][1], data[2][1][:5]])
    reference = nn.Linear(3, 1)
    reference.load_state_dict(model.state_dict())
    want = F.mse_loss(reference(x), y)
    want.backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert result.loss == pytest.approx(want.item(), rel=1e-5)


def test_without_head_a_cut_batch_gives_no_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    _, advance = _fake_clock(monkeypatch)
    model = nn.Linear(3, 1)
    result = gradient_by_deadline(
        list(model.parameters()), _draws(model, _data(4, 10), False), 25.0, 1.0, advance
    )
    assert (result.samples, result.batches, result.cut_samples) == (20, 2, 0)


def test_a_first_batch_cut_short_still_counts_its_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """The paper's worker that finishes some samples, not a whole batch, contributes them (zero only
    when no sample at all is finished)."""
    _, advance = _fake_clock(monkeypatch)
    model = nn.Linear(3, 1)
    result = gradient_by_deadline(
        list(model.parameters()), _draws(model, _data(1, 10), True), 3.5, 1.0, advance
    )
    assert (result.samples, result.cut_samples) == (3, 3)
    assert any(torch.count_nonzero(p.grad) for p in model.parameters())  # type: ignore[arg-type]
    none = gradient_by_deadline(
        list(model.parameters()), _draws(model, _data(1, 10), True), 0.5, 1.0, advance
    )
    assert none.samples == 0
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())  # type: ignore[arg-type]

"""`commsgd reproduce`: Table 1 of the LSGD supplement, the curse of symmetry, matrix completion (Fig. 1)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from commsgd.cli import main
from commsgd.problems import (
    PAPER_POINTS,
    PlainSGD,
    matrix_instance,
    matrix_objective,
    matrix_reference,
    matrix_start,
    parse_points,
    toy2d_loss,
    toy2d_reference,
)

multiprocess = pytest.mark.multiprocess


def _reproduce(capfd: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["reproduce", *args, "--json"]) == 0
    return dict(json.loads(capfd.readouterr().out.strip().splitlines()[-1]))


@multiprocess
def test_toy2d_reproduces_table1(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # 200 steps on 4 processes: the values are settled by then; the one-process reference shows that
    # 200 and the default 20000 steps give the same numbers
    got = _reproduce(capfd, "toy2d", "--steps", "200", "--out", str(tmp_path))
    short, default = toy2d_reference(list(PAPER_POINTS), 200), toy2d_reference(list(PAPER_POINTS), 20000)
    for method in ("lgd", "eagd"):
        for key in ("best", "center"):
            assert got[method][key] == pytest.approx(short[method][key], abs=1e-9)
            assert default[method][key] == pytest.approx(short[method][key], abs=1e-6)
    assert round(default["lgd"]["best"], 3) == round(-0.2172, 3)
    assert round(default["eagd"]["best"], 3) == round(-0.0912, 3)
    assert (tmp_path / "toy2d.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["steps"] == 200


@multiprocess
def test_toy2d_curse_of_symmetry(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    got = _reproduce(capfd, "toy2d", "--points", "3,0;-3,0", "--steps", "100", "--out", str(tmp_path))
    # LGD: the tie goes to worker 0, the other follows; both reach the global minimum
    assert round(got["lgd"]["best"], 4) == round(got["lgd"]["center"], 4) == -0.2172
    # EAGD: the center is held at the origin between the minima (the maximum, L = 1)
    assert got["eagd"]["center"] == pytest.approx(1.0)
    assert got["eagd"]["best"] > 0


@multiprocess
def test_matrix_completion_small(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    args = ["--dim", "30", "--rank", "2", "--workers", "2", "--trials", "2", "--steps", "60", "--lr", "0.01"]
    got = _reproduce(capfd, "matrix-completion", *args, "--out", str(tmp_path))
    for method in ("lgd", "eagd"):
        assert len(got[method]["curve"]) == len(got[method]["final"]) == 2
        for curve, final in zip(got[method]["curve"], got[method]["final"]):
            assert len(curve) == 61 and curve[-1] == final
    for lgd, eagd in zip(got["lgd"]["final"], got["eagd"]["final"]):
        assert lgd < eagd / 100  # EAGD stalls near the minimizers, LGD does not
    assert (tmp_path / "matrix-completion.png").stat().st_size > 0


def test_matrix_completion_follows_a_numpy_loop_of_the_same_math() -> None:
    """Both methods' best objective at every step, as `lsgd` and `easgd` compute it in the simulated
    world, against the same updates written in numpy apart from the algorithms."""
    from commsgd import reproduce

    s = dict(reproduce.DEFAULTS["matrix-completion"], dim=20, rank=2, workers=3, trials=2, steps=40)
    s.update(lr=0.01, pull=0.05)
    got = reproduce.matrix_completion(s)
    instances = [matrix_instance(20, 2, 0, trial).numpy() for trial in range(2)]
    starts = [[matrix_start(20, 2, 0, trial, w).numpy() for w in range(3)] for trial in range(2)]
    want = matrix_reference(instances, starts, 40, lr=0.01, pull=0.05)
    for method in ("lgd", "eagd"):
        for ours, theirs in zip(got[method]["curve"], want[method], strict=True):
            assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)
    assert want["lgd"][0][-1] < want["eagd"][0][-1] / 10  # and the two differ: LGD goes further


@pytest.mark.parametrize(
    "args",
    [
        ["toy2d", "--points", "1;2"],
        ["toy2d", "--points", "nan,1"],
        ["toy2d", "--lr", "-1"],
        ["toy2d", "--pull", "1.5"],
        ["toy2d", "--rank", "3"],
        ["matrix-completion", "--points", "1,2"],
        ["matrix-completion", "--dim", "5", "--rank", "6"],
        ["matrix-completion", "--steps", "0"],
        ["matrix-completion", "--pull", "0.5", "--workers", "4"],
    ],
)
def test_bad_flags_exit_2(args: list[str], capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", *args]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("commsgd: error: reproduce --")


def test_problems() -> None:
    origin = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    toy2d_loss(origin).backward()
    assert origin.grad is not None and torch.equal(origin.grad, torch.zeros(2, dtype=torch.float64))
    ring = torch.tensor([1.4303, 0.0], dtype=torch.float64)
    assert float(toy2d_loss(ring)) == pytest.approx(-0.2172, abs=1e-4)
    assert float(toy2d_loss(torch.tensor([0.3, 0.4], dtype=torch.float64))) == pytest.approx(2 / math.pi)
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    m = torch.randn(5, 5, dtype=torch.float64)
    m = m @ m.T
    matrix_objective(x, m).backward()
    torch.testing.assert_close(x.grad, (x @ x.T - m).detach() @ x.detach())
    assert parse_points("1,2; -3.5,4") == [(1.0, 2.0), (-3.5, 4.0)]
    with pytest.raises(ValueError):
        parse_points("1,2,3")


def test_simulated_workers_give_what_threads_give() -> None:
    """The simulated world runs these workers as coroutines (`scheduler="greenlet"`); a thread per
    worker gives the very same traces, float for float."""
    from commsgd import reproduce
    from commsgd.simworld import SimulatedWorld

    toy = dict(reproduce.DEFAULTS["toy2d"], steps=300, points=list(PAPER_POINTS))
    summary, workers = reproduce.toy2d(toy)
    assert workers == SimulatedWorld(4).run(reproduce._toy2d_worker, toy)
    assert summary["lgd"]["best"] == min(w["lgd"]["final"] for w in workers)
    matrix = dict(reproduce.DEFAULTS["matrix-completion"], dim=20, rank=2, workers=3, trials=2, steps=30)
    curves = SimulatedWorld(3).run(reproduce._matrix_worker, matrix)
    assert SimulatedWorld(3, scheduler="greenlet").run(reproduce._matrix_worker, matrix) == curves


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plain_sgd_steps_as_torch_sgd_does_bit_for_bit(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    start = [torch.randn(shape, generator=generator, dtype=dtype) for shape in ((5, 3), (4,))]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    plain, reference = PlainSGD(ours, lr=0.3), torch.optim.SGD(theirs, lr=0.3)
    for step in range(6):
        if step == 3:  # a rate change, as a schedule or a resume makes it
            plain.load_state_dict({"lr": [0.05]})
            reference.param_groups[0]["lr"] = 0.05
        grads = [torch.randn(t.shape, generator=generator, dtype=dtype) for t in start]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        plain.step()
        reference.step()
        plain.zero_grad(set_to_none=False)
        assert all(p.grad is not None and not p.grad.any() for p in ours)
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
    assert plain.state_dict() == {"lr": [0.05]}

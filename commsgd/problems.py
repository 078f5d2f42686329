"""The deterministic problems of the LSGD paper, as tiny torch models with exact (full-batch) losses.

- toy2d (supplement sec. 6): L(x, y) = sin(pi r) / (pi r), r = sqrt(x^2 + y^2), L = 1 at r = 0. Rings of
  local minima around the origin; the global minimum -0.2172 lies on the ring r = 1.43.
- matrix completion (sec. 2.1 and 8): F(X) = 1/4 ||M - X X^T||_F^2 with M = U U^T, U and the starting
  points drawn from N(0, 1). All local minimizers are global, but they differ by rotations, so the
  average of several good solutions is a poor one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy
import torch

from commsgd.flat import host_floats

#: the four starting points of the supplement's Table 1
PAPER_POINTS: tuple[tuple[float, float], ...] = ((-6.0, -4.0), (-15.0, -18.0), (20.0, 11.0), (17.0, 8.0))


class Point(torch.nn.Module):
    """A model that is just one parameter tensor (a point of the problem's domain)."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.x = torch.nn.Parameter(value.detach().clone())


class PlainSGD:
    """x -= lr * grad: what `torch.optim.SGD(params, lr)` computes with no momentum or weight decay, bit for
    bit, for the math problems' 160,000 tiny steps. torch's optimizer wraps every step in a profiling
    hook and its constructor imports torch._dynamo (together about a quarter of `reproduce toy2d`'s time);
    this one is duck-typed to what `CommOptimizer` and the algorithms read: `param_groups` (one group
    with its `lr`), `step`, `zero_grad` and the state dict."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float) -> None:
        self.param_groups: list[dict[str, Any]] = [
            {"params": list(params), "lr": lr, "momentum": 0.0, "weight_decay": 0.0, "nesterov": False}
        ]

    def step(self) -> None:
        if torch.is_grad_enabled():  # the caller's loop is usually in no_grad already: no second context
            with torch.no_grad():
                self._update()
        else:
            self._update()

    def _update(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"lr": [group["lr"] for group in self.param_groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for group, lr in zip(self.param_groups, state["lr"]):
            group["lr"] = lr


def toy2d_loss(xy: torch.Tensor) -> torch.Tensor:
    """sin(pi r) / (pi r) for the last dimension of size 2 (1 at the origin, gradient 0 there)."""
    r = torch.sqrt(torch.clamp((xy * xy).sum(-1), min=1e-30))
    return torch.special.sinc(r)


def toy2d_value_and_grad(xy: torch.Tensor) -> tuple[float, torch.Tensor]:
    """L and its exact gradient at one point `xy` (2 values), in closed form on Python floats: dL/dr x / r
    with dL/dr = (cos(pi r) pi r - sin(pi r)) / (pi r^2); L = 1 and gradient 0 at the origin (as autograd
    gives through `toy2d_loss`). A few microseconds, against ~100 for autograd or a dozen tiny tensor
    ops: `commsgd reproduce` takes 160,000 such steps."""
    x, y = xy.tolist()
    r2 = x * x + y * y
    if r2 <= 1e-30:
        return 1.0, torch.zeros(2, dtype=xy.dtype)
    r = math.sqrt(r2)
    pr = math.pi * r
    slope = (math.cos(pr) * pr - math.sin(pr)) / (pr * r) / r
    grad = [slope * x, slope * y]
    if xy.dtype == torch.float64:
        return math.sin(pr) / pr, host_floats(grad)
    return math.sin(pr) / pr, torch.tensor(grad, dtype=xy.dtype)


def toy2d_reference(
    points: Sequence[tuple[float, float]], steps: int, lr: float = 0.1, pull: float = 0.1, beta: float = 0.43
) -> dict[str, dict[str, float]]:
    """LGD (eq. 3, period 1) and EAGD from `points` on numpy arrays, every worker at once: the two
    methods' math alone, written apart from the algorithms (the tests' check of `reproduce toy2d`, and
    the plain loop that benchmarks/reproduce_numpy.py times it against). Best and center objective each."""

    def loss(x: numpy.ndarray) -> numpy.ndarray:
        return numpy.sinc(numpy.hypot(x[..., 0], x[..., 1]))  # numpy's sinc is sin(pi r) / (pi r) too

    def grad(x: numpy.ndarray) -> numpy.ndarray:
        r = numpy.hypot(x[:, 0], x[:, 1])[:, None]
        dr = (numpy.cos(numpy.pi * r) * numpy.pi * r - numpy.sin(numpy.pi * r)) / (numpy.pi * r * r)
        return dr * x / r

    lgd = numpy.array(points, dtype=numpy.float64)
    eagd, center, alpha = lgd.copy(), lgd.mean(0), beta / len(points)
    for _ in range(steps):
        leader = lgd[int(numpy.argmin(loss(lgd)))]
        lgd = lgd - lr * grad(lgd) - pull * (lgd - leader)
        diff = eagd - center
        eagd, center = eagd - lr * grad(eagd) - alpha * diff, center + alpha * diff.sum(0)
    return {
        "lgd": {"best": float(loss(lgd).min()), "center": float(loss(lgd.mean(0)))},
        "eagd": {"best": float(loss(eagd).min()), "center": float(loss(center))},
    }


def matrix_instance(dim: int, rank: int, seed: int, trial: int) -> torch.Tensor:
    """M = U U^T with U (dim x rank) from N(0, 1); the same on every worker for a (seed, trial)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + trial)
    u = torch.randn(dim, rank, generator=g, dtype=torch.float64)
    return u @ u.T


def matrix_start(dim: int, rank: int, seed: int, trial: int, worker: int) -> torch.Tensor:
    """Worker `worker`'s starting point X_0 from N(0, 1) (the same for every method)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + trial) * 1009 + worker + 1)
    return torch.randn(dim, rank, generator=g, dtype=torch.float64)


def matrix_objective(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """F(X) = 1/4 ||M - X X^T||_F^2 (its gradient is (X X^T - M) X)."""
    residual = m - x @ x.T
    return 0.25 * (residual * residual).sum()


def matrix_value_and_grad(
    x: torch.Tensor, m: torch.Tensor, work: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """F(X) and its exact gradient (X X^T - M) X, in closed form (one residual, two products).

    `work`: a d x d buffer for the residual, kept by the caller: the same arithmetic, bit for bit,
    without two fresh d x d temporaries a step (8 MB each at d = 1000: the allocator hands them back
    to the OS and the next step faults them in again)."""
    residual = x @ x.T - m if work is None else torch.mm(x, x.T, out=work).sub_(m)
    flat = residual.reshape(-1)
    return 0.25 * torch.dot(flat, flat), residual @ x


def matrix_reference(
    instances: Sequence[numpy.ndarray],
    starts: Sequence[Sequence[numpy.ndarray]],
    steps: int,
    lr: float,
    pull: float,
) -> dict[str, list[list[float]]]:
    """LGD (eq. 3, period 1) and EAGD (alpha = `pull`, beta = workers x pull) on matrix completion in numpy,
    worker by worker: the two methods' math alone, written apart from the algorithms (the tests' check of
    `reproduce matrix-completion`, and the plain loop benchmarks/reproduce_numpy.py times it against). Per
    method and instance (`starts[i]`: every worker's X_0 for `instances[i]`), the best objective over the
    workers at steps 0..steps, as the command's `curve`."""

    def value_and_grad(x: numpy.ndarray, m: numpy.ndarray) -> tuple[float, numpy.ndarray]:
        residual = x @ x.T - m
        return 0.25 * float(numpy.vdot(residual, residual)), residual @ x

    curves: dict[str, list[list[float]]] = {"lgd": [], "eagd": []}
    for m, start in zip(instances, starts):
        for method in curves:
            x = [s.copy() for s in start]
            center = sum(x) / len(x)
            best: list[float] = []
            for step in range(steps + 1):
                values, grads = zip(*(value_and_grad(xi, m) for xi in x))
                best.append(min(values))
                if step == steps:
                    break
                if method == "lgd":
                    leader = x[int(numpy.argmin(values))]
                    x = [xi - lr * g - pull * (xi - leader) for xi, g in zip(x, grads)]
                else:
                    diffs = [xi - center for xi in x]
                    x = [xi - lr * g - pull * d for xi, g, d in zip(x, grads, diffs)]
                    center = center + pull * sum(diffs)
            curves[method].append(best)
    return curves


def parse_points(text: str) -> list[tuple[float, float]]:
    """'x,y;x,y;...' -> [(x, y), ...]; ValueError with the offending part."""
    points = []
    for part in text.split(";"):
        coords = part.split(",")
        if len(coords) != 2:
            raise ValueError(f"{part.strip()!r} is not 'x,y'")
        points.append((float(coords[0]), float(coords[1])))
    return points


def format_points(points: Sequence[tuple[float, float]]) -> str:
    return ";".join(f"{x:g},{y:g}" for x, y in points)

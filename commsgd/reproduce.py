"""`commsgd reproduce toy2d | matrix-completion`: LGD against EAGD on the LSGD paper's deterministic problems.

LGD and EAGD are the `lsgd` and `easgd` algorithms themselves, with exact gradients: every worker's model
is one parameter tensor, stepped by `CommOptimizer` with plain SGD. The workers run in a simulated world
(`commsgd.simworld`: coroutines or threads of this process, the same Communicator and byte counts), or
with `--processes` as real processes over gloo. LGD selects its leader by the current objective (window
1); its center is the workers' average.

- toy2d reproduces the supplement's Table 1 (best L: LGD -0.2172, EAGD -0.0912) and Figure 7.
- matrix-completion reproduces Figure 1: the best objective over the workers at each step.
"""

from __future__ import annotations

import argparse
import json
import math
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from commsgd.errors import ConfigError

PROBLEMS = ("toy2d", "matrix-completion")
METHODS = ("lgd", "eagd")
#: the supplement's Table 1: L(x, y) reached by each method from the four default points
PAPER_TABLE1 = {"lgd": -0.2172, "eagd": -0.0912}

DEFAULTS: dict[str, dict[str, Any]] = {
    "toy2d": {"lr": 0.1, "pull": 0.1, "beta": 0.43, "steps": 20000, "period": 1},
    "matrix-completion": {
        "lr": 5e-4,
        "pull": 1e-4,
        "steps": 200,
        "period": 1,
        "dim": 1000,
        "rank": 10,
        "workers": 8,
        "trials": 10,
        "seed": 0,
    },
}
#: most workers: spawned processes (toy2d, matrix completion), and simulated (matrix completion keeps a
#: d x d matrix per worker, so it stays at the process limit)
MAX_PROCESSES = {"toy2d": 16, "matrix-completion": 64}
MAX_SIMULATED = {"toy2d": 1024, "matrix-completion": 64}
ONLY_FOR = {
    "points": "toy2d",
    "beta": "toy2d",
    "dim": "matrix-completion",
    "rank": "matrix-completion",
    "trials": "matrix-completion",
    "seed": "matrix-completion",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.add_argument("problem", choices=PROBLEMS)
    parser.add_argument("--points", help='toy2d: starting points "x,y;x,y;..." (one worker each)')
    parser.add_argument("--lr", type=float, help="learning rate (toy2d 0.1, matrix-completion 5e-4)")
    parser.add_argument(
        "--pull",
        type=float,
        help="LGD's lambda (toy2d 0.1); matrix-completion: the effective pull eta*lambda = 1e-4, "
        "also EAGD's alpha",
    )
    parser.add_argument("--beta", type=float, help="toy2d: EAGD's beta, alpha = beta / workers (0.43)")
    parser.add_argument("--steps", type=int, help="steps per worker (toy2d 20000, matrix-completion 200)")
    parser.add_argument("--period", type=int, help="communication period tau (1)")
    parser.add_argument("--dim", type=int, help="matrix-completion: d (1000)")
    parser.add_argument("--rank", type=int, help="matrix-completion: r, the paper uses 1, 10, 50, 100 (10)")
    parser.add_argument(
        "--workers",
        type=int,
        help="workers: matrix-completion 8; toy2d one per point (the paper's 4; more: the paper's points, "
        "then random points in [-20, 20]^2)",
    )
    parser.add_argument("--trials", type=int, help="matrix-completion: random instances (10)")
    parser.add_argument("--seed", type=int, help="matrix-completion: seed of the instances (0)")
    parser.add_argument("--out", help="directory for the plot and results.json (runs/reproduce-PROBLEM)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--processes",
        action="store_true",
        help="run every worker as a spawned process over gloo (default: a simulated world in this process)",
    )


# ------------------------------------------------------------------------------------------ settings


def _positive(name: str, value: float, *, below: float | None = None, upto: float | None = None) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"reproduce --{name}: must be > 0, got {value!r}")
    if below is not None and value >= below:
        raise ConfigError(f"reproduce --{name}: must be < {below}, got {value!r}")
    if upto is not None and value > upto:
        raise ConfigError(f"reproduce --{name}: must be <= {upto}, got {value!r}")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The problem's settings: its defaults overridden by the flags given, all checked."""
    from commsgd.problems import PAPER_POINTS, parse_points

    for flag, problem in ONLY_FOR.items():
        if getattr(args, flag, None) is not None and args.problem != problem:
            raise ConfigError(f"reproduce --{flag}: only for {problem}")
    s = dict(DEFAULTS[args.problem])
    s.update({k: getattr(args, k) for k in s if getattr(args, k, None) is not None})
    _positive("lr", s["lr"])
    _positive("pull", s["pull"], below=1)
    for name in ("steps", "period", "dim", "rank", "workers", "trials"):
        if name in s and s[name] < 1:
            raise ConfigError(f"reproduce --{name}: must be >= 1, got {s[name]}")
    workers = getattr(args, "workers", None)
    if workers is not None and workers < 1:
        raise ConfigError(f"reproduce --workers: must be >= 1, got {workers}")
    processes = bool(getattr(args, "processes", False))
    most = (MAX_PROCESSES if processes else MAX_SIMULATED)[args.problem]
    where = "local processes (--processes)" if processes else "simulated workers"
    if args.problem == "toy2d":
        _positive("beta", s["beta"], upto=1)
        try:
            points = parse_points(args.points) if args.points else list(PAPER_POINTS)
        except ValueError as exc:
            raise ConfigError(f'reproduce --points: expected "x,y;x,y;...": {exc}') from None
        if not all(math.isfinite(c) for p in points for c in p):
            raise ConfigError("reproduce --points: coordinates must be finite")
        if workers is not None and args.points and workers != len(points):
            raise ConfigError(f"reproduce --workers: {workers}, but --points gives {len(points)} point(s)")
        if workers is not None and not args.points:
            points = more_points(points, workers)
        if len(points) > most:
            raise ConfigError(f"reproduce --workers: toy2d runs at most {most} {where}, got {len(points)}")
        s["points"] = points
    else:
        if s["workers"] > most:
            raise ConfigError(f"reproduce --workers: at most {most} {where}, got {s['workers']}")
        if s["seed"] < 0:
            raise ConfigError(f"reproduce --seed: must be >= 0, got {s['seed']}")
        if s["rank"] > s["dim"]:
            raise ConfigError(f"reproduce --rank: must be <= --dim ({s['dim']}), got {s['rank']}")
        if s["pull"] * s["workers"] > 1:  # EAGD's beta = workers * alpha must stay <= 1
            raise ConfigError("reproduce --pull: EAGD needs pull * workers <= 1")
    return s


def more_points(points: Sequence[tuple[float, float]], count: int) -> list[tuple[float, float]]:
    """`count` starting points: the first of `points`, then points drawn uniformly from [-20, 20]^2 (fixed
    seed, so every run starts from the same ones)."""
    if count <= len(points):
        return list(points[:count])
    g = torch.Generator().manual_seed(0)
    extra = (torch.rand(count - len(points), 2, generator=g, dtype=torch.float64) * 40 - 20).tolist()
    return [*points, *((round(x, 3), round(y, 3)) for x, y in extra)]


# ------------------------------------------------------------------------------------------ workers


def _algorithm(method: str, pull: float, beta: float, period: int) -> Any:
    """LGD = lsgd with the exact objective as leader score; EAGD = easgd."""
    from commsgd.algorithms import build_algorithm

    if method == "lgd":
        return build_algorithm("lsgd", pull=pull, tau=period, window=1, leaders="single")
    return build_algorithm("easgd", beta=beta, tau=period)


class Trace:
    """What a worker keeps of one run: the objective (and the point) at each of the first `dense` steps,
    then every `every` steps, and at the end (log-scale plots need the early steps)."""

    def __init__(self, last: int, points: bool, dense: int = 1000, every: int = 1) -> None:
        self.last, self.keep_points, self.dense, self.every = last, points, dense, every
        self.step = 0
        self.values: list[tuple[int, float]] = []
        self.points: list[list[float]] = []

    def __call__(self, x: torch.Tensor, value: float) -> None:
        """The point before step `self.step + 1` (or the final one) and its objective."""
        if self.step <= self.dense or self.step % self.every == 0 or self.step == self.last:
            self.values.append((self.step, value))
            if self.keep_points:
                self.points.append(x.tolist())
        self.step += 1


def descend(
    ctx: Any,
    algo: Any,
    start: torch.Tensor,
    objective: Callable[[torch.Tensor], tuple[float | torch.Tensor, torch.Tensor]],
    lr: float,
    steps: int,
    record: Callable[[torch.Tensor, float], None],
    label: str,
) -> dict[str, Any]:
    """Run one algorithm from `start` with exact gradients, recording each point and its objective.

    `objective(x)` gives the value and its gradient (closed form: no autograd graph for a small point);
    the gradient goes into `.grad` and `CommOptimizer.step(value)` runs the algorithm as in training,
    with plain SGD at `lr`. The final point and objective, and the model the algorithm evaluates (its
    center) with its objective; `label` names the progress line's field."""
    from commsgd.api import CommOptimizer
    from commsgd.problems import PlainSGD, Point
    from commsgd.simworld import report_progress

    model = Point(start)
    sgd = PlainSGD(model.parameters(), lr=lr)  # torch.optim.SGD's result without its per-step hooks
    opt = CommOptimizer(typing.cast(torch.optim.Optimizer, sgd), algo, model, ctx)

    every = max(1, steps // 100)
    x = model.x  # the one parameter (the algorithms move its values, never replace it)
    with torch.no_grad():  # closed-form gradients: nothing here records an autograd graph
        for step in range(1, steps + 1):
            value, x.grad = objective(x)
            record(x, float(value))
            opt.step(value, step=step)
            if step % every == 0:
                report_progress(**{label: f"{100 * step // steps:3d}%"})
        final = model.x.detach().clone()
        final_value = float(objective(final)[0])
        record(final, final_value)
        with algo.evaluated_parameters():
            center = model.x.detach().clone()
    return {
        "final": final_value,
        "final_x": final.tolist(),
        "center": float(objective(center)[0]),
        "center_x": center.tolist(),
    }


def _descend(
    ctx: Any,
    method: str,
    start: torch.Tensor,
    objective: Callable[[torch.Tensor], tuple[float | torch.Tensor, torch.Tensor]],
    s: dict[str, Any],
    beta: float,
    record: Trace,
) -> dict[str, Any]:
    """LGD or EAGD (`method`) from `start` with the problem's settings `s` (see `descend`)."""
    algo = _algorithm(method, s["pull"], beta, s["period"])
    return descend(ctx, algo, start, objective, s["lr"], s["steps"], record, method.upper())


def _toy2d_worker(s: dict[str, Any]) -> dict[str, Any]:
    import commsgd
    from commsgd.problems import toy2d_value_and_grad

    ctx = commsgd.init()
    out: dict[str, Any] = {}
    start = torch.tensor(s["points"][ctx.rank], dtype=torch.float64)
    for method in METHODS:
        trace = Trace(s["steps"], points=True, every=max(1, s["steps"] // 500))
        result = _descend(ctx, method, start, toy2d_value_and_grad, s, s["beta"], trace)
        out[method] = {**result, "path": trace.points, "losses": trace.values}
    return out


def _matrix_worker(s: dict[str, Any]) -> dict[str, list[list[float]]]:
    import commsgd
    from commsgd.problems import matrix_instance, matrix_start, matrix_value_and_grad

    ctx = commsgd.init()
    curves: dict[str, list[list[float]]] = {m: [] for m in METHODS}
    residual = torch.empty(s["dim"], s["dim"], dtype=torch.float64)  # this worker's, every step
    for trial in range(s["trials"]):
        if ctx.rank == 0:
            from commsgd.simworld import report_progress

            report_progress(trial=f"{trial + 1}/{s['trials']}")
        m = matrix_instance(s["dim"], s["rank"], s["seed"], trial)
        start = matrix_start(s["dim"], s["rank"], s["seed"], trial, ctx.rank)

        def objective(x: torch.Tensor, m: torch.Tensor = m) -> tuple[torch.Tensor, torch.Tensor]:
            return matrix_value_and_grad(x, m, residual)

        for method in METHODS:
            trace = Trace(s["steps"], points=False)
            # EAGD: alpha = the effective pull of sec. 8, so beta = workers * pull
            _descend(ctx, method, start, objective, s, s["pull"] * ctx.world_size, trace)
            curves[method].append([value for _, value in trace.values])
    return curves


# ------------------------------------------------------------------------------------------ problems


def _run_workers(
    fn: Callable[..., Any], count: int, s: dict[str, Any], processes: bool, scheduler: str = "threads"
) -> list[Any]:
    """`fn(s)` on `count` workers: spawned gloo processes, or a simulated world (`scheduler`, see
    `SimulatedWorld`) with a progress line."""
    if processes:
        from commsgd.testing import run_distributed

        return run_distributed(fn, count, s, timeout=math.inf)
    import sys

    from commsgd.simworld import ProgressLine, SimulatedWorld

    show = ProgressLine(sys.stderr)
    try:
        return SimulatedWorld(count, timeout_s=600.0, scheduler=scheduler).run(fn, s, progress=show)
    finally:
        show.clear()


def toy2d(s: dict[str, Any], processes: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Both methods from `s['points']` (one worker per point); (JSON summary, per-worker traces)."""
    # coroutines: a step is a few microseconds of math and a hand-over or two, and no worker waits
    # inside backward (the gradients are closed forms)
    workers = _run_workers(_toy2d_worker, len(s["points"]), s, processes, scheduler="greenlet")
    summary = {
        method: {"best": min(w[method]["final"] for w in workers), "center": workers[0][method]["center"]}
        for method in METHODS
    }
    return summary, workers


def matrix_completion(s: dict[str, Any], processes: bool = False) -> dict[str, Any]:
    """Both methods on `s['trials']` random instances; per method and trial the best objective per step."""
    # coroutines: each worker keeps its d x d residual buffer (`matrix_value_and_grad`), so one thread
    # no longer hands 8 MB temporaries back to the OS and faults them in again every step (which made
    # threads the faster scheduler here: ~100x the page faults, a third of the run in the kernel)
    workers = _run_workers(_matrix_worker, s["workers"], s, processes, scheduler="greenlet")
    summary: dict[str, Any] = {}
    for method in METHODS:
        curves = [
            [min(values) for values in zip(*(w[method][trial] for w in workers))]
            for trial in range(s["trials"])
        ]
        summary[method] = {"curve": curves, "final": [c[-1] for c in curves]}
    return summary


# ------------------------------------------------------------------------------------------ reports


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def toy2d_table(summary: dict[str, Any], s: dict[str, Any]) -> str:
    lines = [
        f"toy2d: {len(s['points'])} workers, {s['steps']} steps, lr {s['lr']:g}, pull {s['pull']:g}, "
        f"beta {s['beta']:g}, period {s['period']}",
        f"{'method':<7} {'best L':>9} {'center L':>9} {'paper (Table 1)':>16}",
    ]
    for method in METHODS:
        r = summary[method]
        lines.append(
            f"{method.upper():<7} {r['best']:>9.4f} {r['center']:>9.4f} {PAPER_TABLE1[method]:>16.4f}"
        )
    return "\n".join(lines)


def matrix_table(summary: dict[str, Any], s: dict[str, Any]) -> str:
    lines = [
        f"matrix completion: d {s['dim']}, rank {s['rank']}, {s['workers']} workers, {s['steps']} steps, "
        f"lr {s['lr']:g}, pull {s['pull']:g}, {s['trials']} trials",
        f"{'method':<7} {'median best F':>14} {'min':>11} {'max':>11}",
    ]
    for method in METHODS:
        final = summary[method]["final"]
        lines.append(f"{method.upper():<7} {_median(final):>14.4g} {min(final):>11.4g} {max(final):>11.4g}")
    return "\n".join(lines)


def plot_toy2d(workers: list[dict[str, Any]], path: Path) -> None:
    """Trajectories over the landscape (top) and each worker's L per step (bottom), as Figure 7."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from commsgd.problems import toy2d_loss

    fig, axes = plt.subplots(2, 2, figsize=(11, 9))
    reach = max(abs(c) for w in workers for m in METHODS for p in w[m]["path"] for c in p) * 1.1
    grid = torch.linspace(-reach, reach, 300, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    landscape = toy2d_loss(torch.stack([xx, yy], -1))
    for col, method in enumerate(METHODS):
        top, bottom = axes[0][col], axes[1][col]
        top.contourf(xx.numpy(), yy.numpy(), landscape.numpy(), levels=40, cmap="viridis")
        for rank, w in enumerate(workers):
            xs, ys = zip(*w[method]["path"])
            label = f"worker {rank}" if rank < 16 else None  # a legend of the first 16 at most
            top.plot(xs, ys, lw=1.2, label=label)
            top.plot(xs[0], ys[0], "o", color="red")
            top.plot(xs[-1], ys[-1], "o", color="blue")
            steps, values = zip(*w[method]["losses"])
            bottom.plot([max(t, 1) for t in steps], values, label=label)
        cx, cy = workers[0][method]["center_x"]
        top.plot(cx, cy, "*", color="white", markersize=12, label="center")
        top.set_title(f"{method.upper()}: trajectories (red start, blue end)")
        top.set_aspect("equal")
        top.legend(fontsize=7, loc="upper left")
        bottom.set_xscale("log")
        bottom.set_xlabel("step")
        bottom.set_ylabel("L(x, y)")
        bottom.set_title(f"{method.upper()}: objective of each worker")
        bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_matrix(summary: dict[str, Any], s: dict[str, Any], path: Path) -> None:
    """Best objective over the workers per step, every trial, both methods (log scale), as Figure 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for method, color in zip(METHODS, ("tab:red", "tab:blue")):
        for i, curve in enumerate(summary[method]["curve"]):
            label = method.upper() if i == 0 else None
            ax.plot([max(v, 1e-300) for v in curve], color=color, lw=0.8, alpha=0.7, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("best objective over workers")
    ax.set_title(f"matrix completion, d = {s['dim']}, r = {s['rank']}, {s['workers']} workers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    s = settings(args)
    out = Path(args.out or f"runs/reproduce-{args.problem}")
    out.mkdir(parents=True, exist_ok=True)
    plot = out / f"{args.problem}.png"
    if args.problem == "toy2d":
        summary, workers = toy2d(s, args.processes)
        plot_toy2d(workers, plot)
        table = toy2d_table(summary, s)
    else:
        summary = matrix_completion(s, args.processes)
        plot_matrix(summary, s, plot)
        table = matrix_table(summary, s)
    (out / "results.json").write_text(json.dumps({"settings": s, **summary}) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        print(f"{table}\nplot: {plot}", flush=True)
    return 0

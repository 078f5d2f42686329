"""`commsgd reproduce` against plain loops over the same steps, side by side.

    python benchmarks/reproduce_numpy.py [--steps 20000] [--repeats 3]                  toy2d
    python benchmarks/reproduce_numpy.py --problem matrix-completion [--steps 200] [--trials 10]

The loops are the two methods' math and nothing else: the closed-form gradient, the SGD step, then LGD's
leader pull (eq. 3 of the LSGD paper: the worker with the lowest objective at x_t leads, the others move
by -pull (x_t - x_leader)) or EAGD's elastic pull toward the center.

- toy2d: once on numpy arrays, every worker's point in one (workers, 2) array
  (`commsgd.problems.toy2d_reference`, the tests' check of the command), and once on Python floats point
  by point (the faster of the two for 4 points of 2 numbers); all three must reach the same best and
  center objectives (to 1e-9).
- matrix-completion: on numpy arrays worker by worker (`commsgd.problems.matrix_reference`, d 1000, rank
  10, 8 workers: the command's defaults, instances and starting points); both must reach the same best
  objective per trial and method (relative 1e-6; values below 1e-12 count as equal).

It times them alternately: the command from its start to its exit (torch's import, the simulated world,
the plot), the loops in this process (numpy and torch with their default threads). Prints a Markdown
table, the ratio to the faster loop and the load average.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from commsgd.problems import PAPER_POINTS, matrix_instance, matrix_reference, matrix_start, toy2d_reference
from commsgd.reproduce import DEFAULTS

#: reproduce toy2d's defaults (commsgd/reproduce.py: a round every step)
LR, PULL, BETA = 0.1, 0.1, 0.43
#: what each problem's loops return: per method, the numbers the command's JSON gives too
Result = dict[str, Any]


def float_value_and_grad(x: float, y: float) -> tuple[float, float, float]:
    """sin(pi r) / (pi r) at one point and its gradient, on Python floats (1 and 0 at the origin)."""
    r = math.sqrt(x * x + y * y)
    if r <= 1e-15:
        return 1.0, 0.0, 0.0
    pr = math.pi * r
    slope = (math.cos(pr) * pr - math.sin(pr)) / (pr * r * r)
    return math.sin(pr) / pr, slope * x, slope * y


def descend_floats(method: str, points: list[list[float]], steps: int) -> dict[str, float]:
    """One method from `points` on Python floats, worker by worker (faster than numpy for 4 points of
    2 numbers): the best final objective over the workers and the center's."""
    x = [list(p) for p in points]
    workers = len(x)
    center = [sum(p[0] for p in x) / workers, sum(p[1] for p in x) / workers]
    alpha = BETA / workers
    for _ in range(steps):
        start = [list(p) for p in x]
        values = []
        for p in x:
            value, gx, gy = float_value_and_grad(p[0], p[1])
            values.append(value)
            p[0] -= LR * gx
            p[1] -= LR * gy
        if method == "lgd":
            lead = start[values.index(min(values))]
            for p, s in zip(x, start):
                p[0] -= PULL * (s[0] - lead[0])
                p[1] -= PULL * (s[1] - lead[1])
        else:
            total = [0.0, 0.0]
            for p, s in zip(x, start):
                for k in (0, 1):
                    diff = s[k] - center[k]
                    p[k] -= alpha * diff
                    total[k] += diff
            center = [center[0] + alpha * total[0], center[1] + alpha * total[1]]
    finals = [float_value_and_grad(p[0], p[1])[0] for p in x]
    if method == "lgd":
        center = [sum(p[0] for p in x) / workers, sum(p[1] for p in x) / workers]
    return {"best": min(finals), "center": float_value_and_grad(center[0], center[1])[0]}


def toy2d_loops(steps: int) -> dict[str, Callable[[], Result]]:
    return {
        "numpy loop (one array of the 4 points)": lambda: toy2d_reference(
            PAPER_POINTS, steps, LR, PULL, BETA
        ),
        "Python loop (floats, point by point)": lambda: {
            method: descend_floats(method, [list(p) for p in PAPER_POINTS], steps)
            for method in ("lgd", "eagd")
        },
    }


def matrix_loops(steps: int, trials: int) -> dict[str, Callable[[], Result]]:
    s = DEFAULTS["matrix-completion"]
    dim, rank, workers, seed = s["dim"], s["rank"], s["workers"], s["seed"]

    def run() -> Result:
        instances = [matrix_instance(dim, rank, seed, t).numpy() for t in range(trials)]
        starts = [
            [matrix_start(dim, rank, seed, t, w).numpy() for w in range(workers)] for t in range(trials)
        ]
        curves = matrix_reference(instances, starts, steps, s["lr"], s["pull"])
        return {method: [curve[-1] for curve in per_trial] for method, per_trial in curves.items()}

    return {"numpy loop (worker by worker)": run}


def command_run(problem: str, flags: list[str], out: Path) -> tuple[float, Result]:
    """Seconds from the command's start to its exit, and its summary in the loops' form."""
    cmd = [sys.executable, "-m", "commsgd", "reproduce", problem, *flags, "--json", "--out", str(out)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    if problem == "toy2d":
        return seconds, {m: {"best": summary[m]["best"], "center": summary[m]["center"]} for m in summary}
    return seconds, {m: summary[m]["final"] for m in summary}


def disagreement(problem: str, ours: Result, theirs: Result) -> str | None:
    """What differs between a loop's result and the command's, or None."""
    for method, values in ours.items():
        if problem == "toy2d":
            pairs = [(f"{method} {k}", v, theirs[method][k]) for k, v in values.items()]
            close = [math.isclose(a, b, rel_tol=0, abs_tol=1e-9) for _, a, b in pairs]
        else:
            pairs = [(f"{method} trial {t}", a, b) for t, (a, b) in enumerate(zip(values, theirs[method]))]
            close = [math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12) for _, a, b in pairs]
        for (what, a, b), ok in zip(pairs, close):
            if not ok:
                return f"{what}: {a!r}, commsgd {b!r}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", choices=("toy2d", "matrix-completion"), default="toy2d")
    parser.add_argument("--steps", type=int, help="steps per worker (the command's default)")
    parser.add_argument("--trials", type=int, help="matrix-completion: instances (the command's 10)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    defaults = DEFAULTS[args.problem]
    steps = defaults["steps"] if args.steps is None else args.steps
    trials = defaults.get("trials", 1) if args.trials is None else args.trials
    if steps < 1 or args.repeats < 1 or trials < 1:
        parser.error("--steps, --trials and --repeats must be >= 1")  # one line, exit 2
    if args.trials is not None and args.problem != "matrix-completion":
        parser.error("--trials: only for matrix-completion")
    load_before = os.getloadavg()[0]
    if args.problem == "toy2d":
        loops, flags = toy2d_loops(steps), ["--steps", str(steps)]
        title = f"toy2d, 4 workers, {steps} steps of each method (LGD, EAGD)"
        said = "best and center objectives (to 1e-9)"
    else:
        loops, flags = matrix_loops(steps, trials), ["--steps", str(steps), "--trials", str(trials)]
        d = defaults
        title = f"matrix completion, d {d['dim']}, rank {d['rank']}, {d['workers']} workers, {trials} trials"
        title += f", {steps} steps of each method (LGD, EAGD)"
        said = "best objective per trial (relative 1e-6)"
    seconds: dict[str, list[float]] = {name: [] for name in [*loops, "command"]}
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, loop in loops.items():
                start = time.perf_counter()
                results[name] = loop()
                seconds[name].append(time.perf_counter() - start)
            took, results["command"] = command_run(args.problem, flags, Path(tmp))
            seconds["command"].append(took)
    for name in loops:
        wrong = disagreement(args.problem, results[name], results["command"])
        if wrong is not None:
            print(f"{name}: {wrong}", file=sys.stderr)
            return 1
    median = {name: statistics.median(runs) for name, runs in seconds.items()}
    fastest = min(loops, key=lambda name: median[name])
    print(f"{title}; median of {args.repeats}, alternated\n")
    print("| what | seconds | runs |")
    print("|---|---|---|")
    for name, runs in seconds.items():
        what = (
            f"`commsgd reproduce {args.problem}`, command to exit"
            if name == "command"
            else f"{name}, the math only"
        )
        print(f"| {what} | {median[name]:.3f} | {', '.join(f'{s:.3f}' for s in runs)} |")
    ratio = median["command"] / median[fastest]
    faster = fastest.split(" (")[0]
    print(f"\nthe command takes {ratio:.1f}x the faster loop ({faster}); all reach the same {said}")
    if args.problem == "toy2d":
        print(
            ", ".join(
                f"{m.upper()} {r['best']:.4f} / {r['center']:.4f}" for m, r in results["command"].items()
            )
        )
    else:
        print(", ".join(f"{m.upper()} {min(r):.3g}-{max(r):.3g}" for m, r in results["command"].items()))
    print(f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())

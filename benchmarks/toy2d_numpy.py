"""`commsgd reproduce toy2d` against a plain numpy loop over the same steps, side by side.

    python benchmarks/toy2d_numpy.py [--steps 20000] [--repeats 3]

The loops are the two methods' math and nothing else: the closed-form gradient, the SGD step, then LGD's
leader pull (eq. 3 of the LSGD paper: the worker with the lowest objective at x_t leads, the others move
by -pull (x_t - x_leader)) or EAGD's elastic pull toward the center (alpha = beta / workers); once on
numpy arrays, every worker's point in one (workers, 2) array (`commsgd.problems.toy2d_reference`, the
tests' check of the command), and once on Python floats point by point (the faster of the two for 4
points of 2 numbers). It checks that all three reach the same points
(the best objective and the center's, to 1e-9) and times them alternately: the command from its start
to its exit (torch's import, the simulated world, the plot), the loops in this process. Prints a Markdown
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
from pathlib import Path

from commsgd.problems import PAPER_POINTS, toy2d_reference

#: reproduce toy2d's defaults (commsgd/reproduce.py: a round every step)
LR, PULL, BETA = 0.1, 0.1, 0.43


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


def numpy_run(steps: int) -> dict[str, dict[str, float]]:
    return toy2d_reference(PAPER_POINTS, steps, LR, PULL, BETA)


def floats_run(steps: int) -> dict[str, dict[str, float]]:
    points = [list(p) for p in PAPER_POINTS]
    return {method: descend_floats(method, points, steps) for method in ("lgd", "eagd")}


def command_run(steps: int, out: Path) -> tuple[float, dict[str, dict[str, float]]]:
    """Seconds from the command's start to its exit, and its summary."""
    cmd = [sys.executable, "-m", "commsgd", "reproduce", "toy2d", "--steps", str(steps), "--json"]
    start = time.perf_counter()
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return seconds, {m: {"best": summary[m]["best"], "center": summary[m]["center"]} for m in summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1")  # one line, exit 2
    load_before = os.getloadavg()[0]
    loops = {
        "numpy loop (one array of the 4 points)": numpy_run,
        "Python loop (floats, point by point)": floats_run,
    }
    seconds: dict[str, list[float]] = {name: [] for name in [*loops, "command"]}
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, loop in loops.items():
                start = time.perf_counter()
                results[name] = loop(args.steps)
                seconds[name].append(time.perf_counter() - start)
            took, results["command"] = command_run(args.steps, Path(tmp))
            seconds["command"].append(took)
    for name, result in results.items():
        for method, ref in result.items():
            for key, value in ref.items():
                theirs = results["command"][method][key]
                if not math.isclose(value, theirs, rel_tol=0, abs_tol=1e-9):
                    print(f"{name}: {method} {key} {value!r}, commsgd {theirs!r}", file=sys.stderr)
                    return 1
    median = {name: statistics.median(runs) for name, runs in seconds.items()}
    fastest = min(loops, key=lambda name: median[name])
    steps, repeats = args.steps, args.repeats
    print(f"toy2d, 4 workers, {steps} steps of each method (LGD, EAGD); median of {repeats}, alternated\n")
    print("| what | seconds | runs |")
    print("|---|---|---|")
    for name, runs in seconds.items():
        what = "`commsgd reproduce toy2d`, command to exit" if name == "command" else f"{name}, the math only"
        print(f"| {what} | {median[name]:.3f} | {', '.join(f'{s:.3f}' for s in runs)} |")
    summary = ", ".join(
        f"{m.upper()} {r['best']:.4f} / {r['center']:.4f}" for m, r in results["command"].items()
    )
    ratio = median["command"] / median[fastest]
    loop = fastest.split(" (")[0]
    print(f"\nthe command takes {ratio:.1f}x the faster loop ({loop}); all three reach the same")
    print(f"best and center objectives (to 1e-9): {summary}")
    print(f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())

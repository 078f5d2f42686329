"""How the algorithms' communication patterns behave as the job widens: 4 to 1,024 simulated workers.

    python benchmarks/wide_world.py [--workers 4 16 64 256 1024] [--steps 200] [--out DIR]

Every worker i minimises its own quadratic f_i(x) = 1/2 ||x - b_i||^2 (x in R^16, b_i from N(0, I),
seed 0: data that differ between workers); the job's objective is their mean, whose minimum x* is the
mean of the b_i. Each method is the commsgd algorithm itself, stepped by `CommOptimizer` with plain SGD
(lr 0.1) on the exact gradient (`commsgd.reproduce.descend`, as for the paper's problems), its workers in
one process (`commsgd.simworld`, coroutines: the same Communicator and byte counts as a real job).
After the steps, per method and width:

- gap: the mean over workers of 1/2 ||x_i - x*||^2, x_i the model the worker would evaluate
  (`evaluated_parameters`: EASGD's and LSGD's center, D-PSGD's average, the others' own model);
- own gap: the same for the workers' own models (what each worker holds, e.g. to serve from);
- consensus: the mean over workers of ||x_i - mean x||^2 of the workers' own models;
- bytes sent per worker per step (the Communicator's count).

Writes a Markdown table to stdout and `wide_world.json` and `wide_world.png` to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from commsgd.algorithms import build_algorithm
from commsgd.reproduce import descend
from commsgd.simworld import SimulatedWorld

DIM, LR, SEED = 16, 0.1, 0
#: (label, algorithm, parameters): the baselines, the periodic methods and the decentralized ones
METHODS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("allreduce", "allreduce", {"overlap": False}),
    ("local_sgd (tau 4)", "local_sgd", {"tau": 4}),
    ("easgd (tau 1)", "easgd", {"tau": 1}),
    ("lsgd (tau 1)", "lsgd", {"tau": 1, "window": 1, "leaders": "single"}),
    ("dpsgd ring", "dpsgd", {"topology": "ring"}),
    ("dpsgd torus", "dpsgd", {"topology": "torus"}),
    ("qdsgd ring", "qdsgd", {"topology": "ring"}),
)


def targets(workers: int) -> torch.Tensor:
    """Every worker's b_i, one row each (the same for every method at this width)."""
    g = torch.Generator().manual_seed(SEED)
    return torch.randn(workers, DIM, generator=g, dtype=torch.float64)


def worker(s: dict[str, Any]) -> dict[str, Any]:
    """One worker's run of one method: its evaluated model, its own model and its bytes sent."""
    import commsgd

    ctx = commsgd.init()
    b = s["targets"][ctx.rank]

    def objective(x: torch.Tensor) -> tuple[float, torch.Tensor]:
        grad = x - b
        return 0.5 * float(grad.dot(grad)), grad

    algo = build_algorithm(s["algorithm"], **s["params"])
    start = torch.zeros(DIM, dtype=torch.float64)
    out = descend(ctx, algo, start, objective, LR, s["steps"], lambda x, value: None, "step")
    sent = ctx.comm.meter.totals().bytes_sent
    return {"evaluated": out["center_x"], "own": out["final_x"], "bytes_per_step": sent / s["steps"]}


def measure(label: str, algorithm: str, params: dict[str, Any], workers: int, steps: int) -> dict[str, Any]:
    b = targets(workers)
    s = {"algorithm": algorithm, "params": params, "steps": steps, "targets": b}
    start = time.perf_counter()
    out = SimulatedWorld(workers, timeout_s=600.0, scheduler="greenlet").run(worker, s)
    seconds = time.perf_counter() - start
    optimum = b.mean(0)
    evaluated = torch.tensor([w["evaluated"] for w in out], dtype=torch.float64)
    own = torch.tensor([w["own"] for w in out], dtype=torch.float64)
    return {
        "method": label,
        "workers": workers,
        "gap": float(0.5 * ((evaluated - optimum) ** 2).sum(1).mean()),
        "own_gap": float(0.5 * ((own - optimum) ** 2).sum(1).mean()),
        "consensus": float(((own - own.mean(0)) ** 2).sum(1).mean()),
        "bytes_per_step": max(w["bytes_per_step"] for w in out),
        "seconds": seconds,
    }


def plot(rows: list[dict[str, Any]], path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 5.2))
    panels = (
        ("gap", "gap of the evaluated models"),
        ("own_gap", "gap of the workers' own models"),
        ("consensus", "consensus distance"),
        ("bytes_per_step", "bytes sent per worker per step"),
    )
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ax, (key, title) in zip(axes, panels):
        for k, method in enumerate(methods):
            these = [r for r in rows if r["method"] == method]
            values = [max(r[key], 1e-30) for r in these]
            # markers shrink from one method to the next, so methods on the same values all stay visible
            ax.plot(
                [r["workers"] for r in these],
                values,
                marker="osD^vx+"[k % 7],
                ms=12 - k,
                mfc="none",
                label=method,
            )
        ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("workers")
        ax.set_title(f"{title}, {steps} steps" if key != "bytes_per_step" else title, fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(methods), fontsize=9)
    fig.suptitle(
        f"{DIM}-dimensional quadratics, one target per worker, lr {LR} (drawn at 1e-30: exactly 0; "
        "where lines lie on one another the methods give the same values)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 16, 64, 256, 1024])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="runs/wide-world", help="directory for the JSON and the plot")
    args = parser.parse_args(argv)
    if args.steps < 1 or min(args.workers) < 2 or max(args.workers) > 1024:
        parser.error("--steps must be >= 1 and --workers between 2 and 1024")  # one line, exit 2
    load_before = os.getloadavg()[0]
    rows = []
    for workers in sorted(set(args.workers)):
        for label, algorithm, params in METHODS:
            rows.append(measure(label, algorithm, params, workers, args.steps))
            print(f"  {workers} workers, {label}: {rows[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"dim": DIM, "lr": LR, "seed": SEED, "steps": args.steps, "workers": sorted(set(args.workers))}
    (out / "wide_world.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    plot(rows, out / "wide_world.png", args.steps)
    print(f"{DIM}-dimensional quadratics, one target per worker, {args.steps} steps, lr {LR}\n")
    print("| method | workers | gap | own gap | consensus | bytes / worker / step | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [r["method"], str(r["workers"]), *(f"{r[k]:.3g}" for k in ("gap", "own_gap", "consensus"))]
        cells += [f"{r['bytes_per_step']:.0f}", f"{r['seconds']:.1f}"]
        print(f"| {' | '.join(cells)} |")
    print(f"\nload average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; files in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`commsgd sweep`: one `commsgd train` run per point of a grid of overrides; a table and plot of the best.

A grid is given as overrides with comma-separated values (``optim.lr=0.1,0.05 algo.pull=0.2,0.1``: the
cartesian product, 4 points) and/or a named grid of the LSGD paper's tables (``--grid lsgd-paper-cnn7``;
``--list-grids``). Commas split values only outside brackets and quotes, so ``optim.drop_steps=[10,20],[30]``
is two values and ``key="a,b"`` is one. Every point is validated with the loader `commsgd train` uses before
any point runs, then runs as its own ``python -m commsgd train`` process into ``OUT/<name>`` (its output in
``OUT/logs/<name>.log``): a failed point is recorded with its one-line error and the others go on.

``OUT/sweep.json`` (written atomically after every change) names the sweep and each point's status. Running
the same command again skips finished points (their run directory reads as a finished run: summary.json
and eval.jsonl, see `commsgd.report.load_run`), resumes interrupted ones from their checkpoint
(``commsgd train --resume``) or restarts them from scratch when they have none, and retries failed ones.
Results: ``OUT/sweep.md`` (every point, and the best point per algorithm by test error at the budget) and
``OUT/sweep.png`` (test error against wall-clock time of each algorithm's best point).

Nothing here imports torch at module import: the CLI builds its parser without it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from commsgd.errors import UserError

if TYPE_CHECKING:
    from commsgd.report import Run

MANIFEST = "sweep.json"
MANIFEST_VERSION = 1
#: the named flags of `commsgd train` a sweep passes on (attribute -> type); --out/--resume are the sweep's
TRAIN_FLAGS: dict[str, type] = {
    "config": str,
    "algorithm": str,
    "workers": int,
    "steps": int,
    "epochs": int,
    "model": str,
    "dataset": str,
    "data_dir": str,
    "seed": int,
    "device": str,
    "max_restarts": int,
}
#: what every point gets before the user's overrides (which win): a progress bar is noise in a log file
POINT_DEFAULTS = ("progress=false",)


class SweepError(UserError):
    """A grid, a sweep option or the sweep directory cannot be used."""


# --------------------------------------------------------------------------------------- grids


@dataclass(frozen=True)
class Axis:
    """One override key and the values (as typed, YAML text) the sweep gives it."""

    key: str
    values: tuple[str, ...]


#: a block is a cartesian product of axes; a grid is the union of its blocks' points
Block = tuple[Axis, ...]
#: one point: the (key, value text) overrides it adds to the train command, in axis order
Point = tuple[tuple[str, str], ...]


def split_values(text: str) -> list[str]:
    """Split `text` at the commas outside brackets ([], {}, ()) and quotes; SweepError if unbalanced."""
    pairs = {"]": "[", "}": "{", ")": "("}
    parts, depth, quote, start = [], [], "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth.append(ch)
        elif ch in pairs:
            if not depth or depth.pop() != pairs[ch]:
                raise SweepError(f"grid value {text!r}: unbalanced {ch!r}")
        elif ch == "," and not depth:
            parts.append(text[start:i])
            start = i + 1
    if quote or depth:
        raise SweepError(f"grid value {text!r}: unclosed {quote or depth[-1]!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts]


def parse_axis(text: str) -> Axis:
    """``key=v1,v2,...`` as an Axis; each ``key=value`` must read as a `commsgd train` override."""
    from commsgd.config import parse_override

    if "=" not in text:
        raise SweepError(f"grid item {text!r}: expected key=value[,value...], e.g. optim.lr=0.1,0.05")
    key, raw = (s.strip() for s in text.split("=", 1))
    values = split_values(raw)
    if any(not v for v in values):
        raise SweepError(f"grid item {text!r}: an empty value (two commas in a row, or one at an end)")
    if len(set(values)) != len(values):
        raise SweepError(f"grid item {text!r}: a value appears twice")
    for value in values:
        parse_override(f"{key}={value}")  # a ConfigError names the bad key
    return Axis(key, tuple(values))


def expand(blocks: Sequence[Block]) -> list[Point]:
    """Every point of the grid: each block's cartesian product, blocks one after another."""
    points: list[Point] = []
    for block in blocks:
        block_points: list[Point] = [()]
        for axis in block:
            block_points = [(*p, (axis.key, v)) for p in block_points for v in axis.values]
        points.extend(block_points)
    return points


def combine(named: Sequence[Block], given: Block) -> list[Block]:
    """A named grid's blocks with the command-line axes added to each (or the command line's alone).

    A key set both ways is refused: which value wins would be a guess.
    """
    if not named:
        return [given]
    for block in named:
        both = {a.key for a in block} & {a.key for a in given}
        if both:
            raise SweepError(f"grid: {sorted(both)[0]} is set by the named grid and on the command line")
    return [tuple(block) + tuple(given) for block in named]


def _label(key: str, keys: Sequence[str]) -> str:
    """The short name of `key` in point names: its last part, unless another key ends the same."""
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def point_names(points: Sequence[Point]) -> list[str]:
    """A readable, unique directory name per point, from the keys that take more than one value.

    E.g. ``lr=0.1,pull=0.2``; characters other than letters, digits and ``.=,+-`` become ``_``; names
    that still clash (or a single point) get ``-<index>``/``point``.
    """
    keys: list[str] = []
    for point in points:
        keys += [k for k, _ in point if k not in keys]
    varying = [k for k in keys if len({dict(p)[k] for p in points if k in dict(p)}) > 1]
    names = []
    for point in points:
        values = dict(point)
        text = ",".join(f"{_label(k, varying)}={values[k]}" for k in varying if k in values)
        names.append(re.sub(r"[^A-Za-z0-9.=,+-]", "_", text)[:120] or "point")
    seen: dict[str, int] = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
    return [n if seen[n] == 1 else f"{n}-{i}" for i, n in enumerate(names)]


@dataclass(frozen=True)
class NamedGrid:
    """A grid from the LSGD paper's supplement: its blocks (one per method) and where its values come from."""

    name: str
    doc: str
    blocks: tuple[Block, ...]


def _block(*axes: tuple[str, Sequence[str]]) -> Block:
    return tuple(Axis(k, tuple(v)) for k, v in axes)


def _paper_grid(
    name: str, model: str, lrs: dict[str, Sequence[str]], common: Sequence[tuple[str, str]], doc: str
) -> NamedGrid:
    """The four methods of the paper's CIFAR-10 tables: SGD, DOWNPOUR, EASGD, LSGD (in that order)."""
    fixed = (("model", [model]), *((k, [v]) for k, v in common))
    methods: dict[str, Sequence[tuple[str, Sequence[str]]]] = {
        "sgd": (("workers", ["1"]),),  # the paper's SGD is the sequential baseline
        "downpour": (("algo.n_push", ["1"]), ("algo.n_fetch", ["1"])),  # communication period 1
        "easgd": (("algo.beta", ["0.43"]), ("algo.tau", ["64"])),
        "lsgd": (("algo.tau", ["64"]), ("algo.tau_global", ["128"]), ("algo.pull", PULLS)),
    }
    blocks = tuple(
        _block(("algorithm", [algo]), *fixed, ("optim.lr", lrs[algo]), *extra)
        for algo, extra in methods.items()
    )
    return NamedGrid(name, doc, blocks)


#: LSGD's lambda in Tables 2 and 3 (lambda_G = lambda: algo.pull_global defaults to algo.pull)
PULLS = ("0.5", "0.2", "0.1", "0.05", "0.025")
_PAPER_COMMON = (("optim.weight_decay", "1e-4"), ("data.batch_size", "128"))
_PAPER_OPEN = (
    "LSGD's leader window is commsgd's default, 10 batches, as sec. 4 says for CIFAR-10. Not in the "
    "paper's text, so left at commsgd's defaults or to you: momentum (optim.momentum 0.9), the data "
    "set (pass --dataset/--data-dir, e.g. imagefolder on cifar10-jpeg), the number of workers of the "
    "distributed methods (the paper: 4 or 16; pass --workers) and the run length (--steps or --epochs)."
)

NAMED_GRIDS: dict[str, NamedGrid] = {
    g.name: g
    for g in (
        _paper_grid(
            "lsgd-paper-cnn7",
            "cnn7",
            {
                "sgd": ("0.1", "0.05", "0.01", "0.005", "0.001"),
                "downpour": ("0.05", "0.01", "0.005", "0.001", "0.0005"),
                "easgd": ("0.1", "0.05", "0.01", "0.005", "0.001"),
                "lsgd": ("0.1", "0.05", "0.01", "0.005", "0.001"),
            },
            (*_PAPER_COMMON, ("optim.schedule", "constant")),
            "LSGD paper, supplement Table 2 (CNN7 on CIFAR-10): learning rates per method, EASGD beta 0.43, "
            "LSGD lambda in {0.5, 0.2, 0.1, 0.05, 0.025} with lambda_G = lambda; constant learning rate, "
            "weight decay 1e-4, batch 128 (sec. 4, 9.1); tau 64 for EASGD and LSGD, tau_G 128 (sec. 4); "
            "DOWNPOUR with communication period 1; SGD on one worker. " + _PAPER_OPEN,
        ),
        _paper_grid(
            "lsgd-paper-resnet20",
            "resnet20",
            {
                "sgd": ("0.2", "0.1", "0.05"),
                "downpour": ("0.2", "0.1", "0.05", "0.01"),
                "easgd": ("0.2", "0.1", "0.05"),
                "lsgd": ("0.2", "0.1", "0.05"),
            },
            (*_PAPER_COMMON, ("optim.drop_seconds", "[1500]"), ("optim.drop_factor", "0.1")),
            "LSGD paper, supplement Table 3 (ResNet-20 on CIFAR-10): initial learning rates per method, "
            "dropped by 0.1 at 1500 s; EASGD beta 0.43, LSGD lambda in {0.5, 0.2, 0.1, 0.05, 0.025} with "
            "lambda_G = lambda; weight decay 1e-4, batch 128; tau 64, tau_G 128 (the CNN7 setting, sec. 4); "
            "DOWNPOUR with communication period 1; SGD on one worker. " + _PAPER_OPEN,
        ),
    )
}


def grid_listing() -> str:
    """`commsgd sweep --list-grids`: each named grid, its size and its doc."""
    lines = []
    for grid in NAMED_GRIDS.values():
        lines.append(f"{grid.name} ({len(expand(grid.blocks))} points)")
        for block in grid.blocks:
            lines.append("    " + " ".join(f"{a.key}={','.join(a.values)}" for a in block))
        lines.append(f"  {grid.doc}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- the sweep


@dataclass
class PointRun:
    """One point: its name, overrides, the train arguments it runs with and its status in the manifest."""

    name: str
    overrides: Point
    flags: list[str]
    workers: int = 1
    status: str = "pending"
    error: str = ""
    exit_code: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def train_argv(self, run_dir: Path) -> list[str]:
        """``train <flags> --out RUN_DIR <overrides>`` (the overrides last: argparse takes the list there)."""
        overrides = [*POINT_DEFAULTS, *(f"{k}={v}" for k, v in self.overrides)]
        return ["train", *self.flags, "--out", str(run_dir), *overrides]

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "name": self.name,
            "overrides": [f"{k}={v}" for k, v in self.overrides],
            "status": self.status,
        }
        if self.error:
            rec["error"] = self.error
        if self.exit_code is not None:
            rec["exit_code"] = self.exit_code
        return rec


def train_flag_argv(args: argparse.Namespace) -> list[str]:
    """The named `commsgd train` flags the sweep command was given, as arguments again."""
    argv: list[str] = []
    for attr in TRAIN_FLAGS:
        value = getattr(args, attr, None)
        if value is not None:
            argv += [f"--{attr.replace('_', '-')}", str(value)]
    return argv


def sweep_spec(args: argparse.Namespace, blocks: Sequence[Block]) -> dict[str, Any]:
    """What makes two sweep commands the same sweep (kept in the manifest): flags, grid, axes."""
    return {
        "train_flags": train_flag_argv(args),
        "grid": args.grid,
        "blocks": [[[a.key, list(a.values)] for a in block] for block in blocks],
    }


@contextlib.contextmanager
def _datasets_loaded_once() -> Iterator[None]:
    """Within the body, `commsgd.tasks.load_dataset` loads each (data set, directory, model, seed) once:
    checking 40 points of one data set should not decode it 40 times."""
    import commsgd.tasks as tasks

    original = tasks.load_dataset
    loaded: dict[str, Any] = {}

    def load_once(*args: Any, **kwargs: Any) -> Any:
        key = repr((args, sorted(kwargs.items())))
        if key not in loaded:
            loaded[key] = original(*args, **kwargs)
        return loaded[key]

    tasks.load_dataset = load_once
    try:
        yield
    finally:
        tasks.load_dataset = original


def check_points(points: Sequence[PointRun], out: Path) -> None:
    """Resolve every point's train command as `commsgd train` would, before any point runs.

    Uses `commsgd.cli.resolve_train_config` on the exact arguments the point runs with (its --out
    replaced by a path that is never created, so a finished or interrupted point is checked too).
    A bad point raises its UserError, prefixed with the point's name. Sets each point's worker count.
    """
    from commsgd import cli

    with _datasets_loaded_once():
        for point in points:
            _, args = cli.parse_command_line(point.train_argv(out / ".check" / point.name))
            try:
                cfg, _, _ = cli.resolve_train_config(args)
            except UserError as exc:
                raise SweepError(f"point {point.name}: {exc}") from None
            point.workers = int(cfg.workers)
            point.extra["threads_set"] = cfg.cluster.threads is not None


def _read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise SweepError(f"out: {path} is not a readable sweep manifest; use another --out") from None
    if not isinstance(data, dict):
        raise SweepError(f"out: {path} is not a sweep manifest; use another --out")
    return data


def check_out(out: Path, spec: dict[str, Any]) -> None:
    """`out` must be new, empty, or hold this same sweep (SweepError otherwise)."""
    if out.exists() and not out.is_dir():
        raise SweepError(f"out: {out} exists and is not a directory")
    manifest = _read_manifest(out)
    if manifest is None:
        if out.is_dir() and any(p.name != ".lock" for p in out.iterdir()):
            raise SweepError(f"out: {out} is not empty and holds no sweep ({MANIFEST}); use another --out")
        return
    if manifest.get("spec") != json.loads(json.dumps(spec)):
        raise SweepError(
            f"out: {out} holds a different sweep (other flags or grid, see its {MANIFEST}); use another --out"
        )


def write_manifest(out: Path, spec: dict[str, Any], points: Sequence[PointRun], **extra: Any) -> None:
    from commsgd.files import write_atomically

    data = {"version": MANIFEST_VERSION, "spec": spec, "points": [p.record() for p in points], **extra}
    text = (json.dumps(data, indent=2) + "\n").encode("utf-8")
    write_atomically(out / MANIFEST, lambda handle: handle.write(text), mode=0o644)


def finished_run(run_dir: Path) -> Run | None:
    """The run in `run_dir` if it finished (reads as a complete run directory), else None."""
    from commsgd.report import load_run

    if not (run_dir / "summary.json").is_file():
        return None
    try:
        return load_run(run_dir)
    except UserError:
        return None


def error_line(output: str) -> str:
    """The one line that says why a point failed: commsgd's own last line, else the last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    own = [ln for ln in lines if ln.startswith("commsgd:")]
    return ((own or lines or ["no output"])[-1])[:300]


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def command_for(point: PointRun, out: Path) -> list[str]:
    """The `commsgd train` arguments that (re)start `point`: --resume from a checkpoint, else from scratch.

    An interrupted point without a checkpoint has its directory removed first, so it starts clean.
    """
    from commsgd.checkpoint import saved_steps

    run_dir = out / point.name
    if (run_dir / "config.yaml").is_file() and saved_steps(run_dir, 0):
        return ["train", "--resume", str(run_dir)]
    shutil.rmtree(run_dir, ignore_errors=True)
    return point.train_argv(run_dir)


Launcher = Callable[[list[str], Path, dict[str, str]], "subprocess.Popen[bytes]"]


def launch(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``python -m commsgd <argv>`` with its output in `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "commsgd", *argv], stdout=handle, stderr=subprocess.STDOUT, env=env
        )


def run_points(
    todo: Sequence[PointRun], out: Path, parallel: int, threads: int, save: Callable[[], None]
) -> None:
    """Run the points `todo`, up to `parallel` at once, saving the manifest after every change.

    Each point gets `threads` threads per worker (OMP_NUM_THREADS and cluster.threads unless its
    config sets them). Ctrl-C reaches the points too (one process group): their runs save what they
    can, and they are marked interrupted.
    """
    queue = list(todo)
    running: dict[str, tuple[PointRun, subprocess.Popen[bytes], Path]] = {}
    try:
        while queue or running:
            while queue and len(running) < parallel:
                point = queue.pop(0)
                argv = command_for(point, out)
                if argv[1] != "--resume" and not point.extra.get("threads_set"):
                    argv.append(f"cluster.threads={threads}")
                log = out / "logs" / f"{point.name}.log"
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                running[point.name] = (point, launch(argv, log, env), log)
                point.status, point.error, point.exit_code = "running", "", None
                print(f"sweep: {point.name}: {'resumed' if argv[1] == '--resume' else 'started'}", flush=True)
                save()
            for name, (point, proc, log) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[name]
                point.exit_code = code
                if code == 0 and finished_run(out / point.name) is not None:
                    point.status = "finished"
                else:
                    point.status = "failed"
                    point.error = error_line(log.read_text(encoding="utf-8", errors="replace"))
                print(f"sweep: {point.name}: {point.status}" + (f": {point.error}" if point.error else ""))
                save()
            time.sleep(0.2)
    except KeyboardInterrupt:
        for point, proc, _ in running.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=120)
            point.status = "interrupted"
        save()
        raise


# --------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Budget:
    """Where points are compared: at `seconds` of wall-clock time, at `steps`, or (both None) at the end."""

    seconds: float | None = None
    steps: int | None = None

    def describe(self) -> str:
        if self.seconds is not None:
            return f"at {self.seconds:g} s of wall-clock time"
        if self.steps is not None:
            return f"at step {self.steps}"
        return "at the end of the run"


def error_at(evals: Sequence[dict[str, Any]], final: float | None, budget: Budget) -> float | None:
    """Test error of the last evaluation within `budget` (`final`, the summary's, with no budget);
    None when no evaluation falls within it."""
    if budget.seconds is None and budget.steps is None:
        return final
    key, limit = ("wall_s", budget.seconds) if budget.seconds is not None else ("step", budget.steps)
    within = [
        e
        for e in evals
        if isinstance(e.get(key), int | float)
        and isinstance(e.get("test_error"), int | float)
        and float(e[key]) <= float(limit) + 1e-9  # type: ignore[arg-type]
    ]
    if not within:
        return None
    return float(max(within, key=lambda e: (float(e[key]), float(e.get("wall_s", 0))))["test_error"])


def best_per_method(scores: Sequence[tuple[str, str, float | None]]) -> dict[str, tuple[str, float]]:
    """(algorithm, point, error) rows -> algorithm: (point, error) of the smallest error (first on ties)."""
    best: dict[str, tuple[str, float]] = {}
    for algorithm, name, err in scores:
        if err is not None and (algorithm not in best or err < best[algorithm][1]):
            best[algorithm] = (name, err)
    return best


@dataclass
class Scores:
    """The finished points' runs, each one's test error at the budget, and the best point per algorithm."""

    runs: dict[str, Run]
    errors: dict[str, float | None]
    best: dict[str, tuple[str, float]]


def score(points: Sequence[PointRun], out: Path, budget: Budget) -> Scores:
    """Read the finished points' run directories and pick each algorithm's best point at `budget`."""
    runs: dict[str, Run] = {}
    for p in points:
        run = finished_run(out / p.name) if p.status == "finished" else None
        if run is not None:
            runs[p.name] = run
    rows = [
        (r.algorithm, name, error_at(r.evals, float(r.summary["test_error"]), budget))
        for name, r in runs.items()
    ]
    return Scores(runs, {name: err for _, name, err in rows}, best_per_method(rows))


def results(points: Sequence[PointRun], out: Path, budget: Budget) -> tuple[str, dict[str, Any]]:
    """The Markdown tables of the sweep (every point, best per algorithm), their data, and the plot."""
    from commsgd.report import md_table, pct, secs

    scores = score(points, out, budget)
    runs, by_name, best = scores.runs, scores.errors, scores.best
    best_names = {name for name, _ in best.values()}
    rows = []
    for p in points:
        run = runs.get(p.name)
        rows.append(
            [
                p.name + (" *" if p.name in best_names else ""),
                run.algorithm if run else dict(p.overrides).get("algorithm", ""),
                p.status + (f": {p.error}" if p.error else ""),
                max(run.summary["steps"]) if run else "",
                secs(float(run.summary["wall_time_s"])) if run else "",
                pct(by_name.get(p.name)) if run else "",
                pct(float(run.summary["test_error"])) if run else "",
            ]
        )
    text = [
        f"## Points ({budget.describe()}; * = best of its algorithm)",
        "",
        md_table(
            ["point", "algorithm", "status", "steps", "wall", "test error at budget", "final test error"],
            rows,
        ),
        "",
        f"## Best point per algorithm ({budget.describe()})",
        "",
        md_table(
            ["algorithm", "point", "test error at budget", "final test error", "wall"],
            [
                [
                    a,
                    n,
                    pct(e),
                    pct(float(runs[n].summary["test_error"])),
                    secs(float(runs[n].summary["wall_time_s"])),
                ]
                for a, (n, e) in best.items()
            ],
        )
        if best
        else "no finished point has an evaluation within the budget",
        "",
    ]
    data = {
        "budget": {"seconds": budget.seconds, "steps": budget.steps},
        "best": {a: n for a, (n, _) in best.items()},
    }
    if best:
        plot_best(out / "sweep.png", {a: runs[n] for a, (n, _) in best.items()}, budget)
        text += ["![test error of the best point per algorithm](sweep.png)", ""]
    return "\n".join(text), data


def plot_best(path: Path, best: dict[str, Run], budget: Budget) -> Path:
    """Test error against wall-clock time of each algorithm's best point (150 dpi)."""
    from commsgd.plots import Panel, Series, save_figure

    series = []
    for algorithm, run in best.items():
        t, err = run.curve("test_error")
        series.append(Series(f"{algorithm} ({run.path.name})", t, [100 * e for e in err]))
    panel = Panel(
        f"best point per algorithm ({budget.describe()})",
        "wall-clock time (s)",
        "test error (%)",
        series,
        markers=True,
    )
    return save_figure(path, [panel], columns=1, dpi=150, size=(7.0, 4.5))


# --------------------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.add_argument("--out", help="sweep directory (one run directory per point, sweep.json, sweep.md)")
    parser.add_argument("--grid", help="a named grid (see --list-grids)")
    parser.add_argument("--list-grids", action="store_true", help="show the named grids and exit")
    parser.add_argument(
        "--parallel", type=int, default=1, metavar="K", help="run up to K points at once (default 1)"
    )
    parser.add_argument(
        "--oversubscribe", action="store_true", help="allow --parallel K with K x workers above the cores"
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-seconds", type=float, help="compare points at this wall-clock time")
    budget.add_argument("--budget-steps", type=int, help="compare points at this step")
    train = parser.add_argument_group("passed to every `commsgd train`")
    for attr, kind in TRAIN_FLAGS.items():
        train.add_argument(f"--{attr.replace('_', '-')}", dest=attr, type=kind)
    # key=v1,v2 words may stand anywhere among the flags: the CLI puts them into args.overrides
    parser.add_argument_group("grid", "key=v1,v2,...  a config field and its values (one value: fixed)")


def run(args: argparse.Namespace) -> int:
    if args.list_grids:
        print(grid_listing())
        return 0
    if args.grid is not None and args.grid not in NAMED_GRIDS:
        raise SweepError(f"--grid: unknown grid {args.grid!r}; choose from {', '.join(NAMED_GRIDS)}")
    if args.out is None:
        raise SweepError("--out: a sweep needs its own directory")
    if args.parallel < 1:
        raise SweepError(f"--parallel: must be at least 1, got {args.parallel}")
    for name in ("budget_seconds", "budget_steps"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise SweepError(f"--{name.replace('_', '-')}: must be positive, got {value}")
    named = NAMED_GRIDS[args.grid].blocks if args.grid else ()
    blocks = combine(named, tuple(parse_axis(item) for item in args.overrides))
    grid = expand(blocks)
    names = point_names(grid)
    flags = train_flag_argv(args)
    points = [PointRun(name, point, flags) for name, point in zip(names, grid)]
    out = Path(args.out)
    spec = sweep_spec(args, blocks)
    check_out(out, spec)
    check_points(points, out)
    cores, widest = usable_cores(), max(p.workers for p in points)
    if args.parallel * widest > cores and not args.oversubscribe:
        raise SweepError(
            f"--parallel {args.parallel}: {args.parallel} points of up to {widest} workers need "
            f"{args.parallel * widest} cores, this machine has {cores}; lower it or pass --oversubscribe"
        )
    threads = max(1, cores // (args.parallel * widest))
    from commsgd.files import write_atomically
    from commsgd.rundir import locked

    with locked(out, "out"):  # a second sweep on the same directory is refused
        check_out(out, spec)
        todo = []
        for point in points:
            if finished_run(out / point.name) is not None:
                point.status = "finished"
            else:
                todo.append(point)
        skipped = len(points) - len(todo)
        print(f"sweep: {len(points)} points, {skipped} finished before, {len(todo)} to run", flush=True)

        def save() -> None:
            write_manifest(out, spec, points)

        save()
        run_points(todo, out, args.parallel, threads, save)
        budget = Budget(args.budget_seconds, args.budget_steps)
        text, data = results(points, out, budget)
        write_manifest(out, spec, points, results=data)
        report = f"# Sweep in {out}\n\n{text}"
        data_md = report.encode("utf-8")
        write_atomically(out / "sweep.md", lambda handle: handle.write(data_md), mode=0o644)
    print(text)
    failed = sum(p.status != "finished" for p in points)
    if failed:
        print(
            f"sweep: {failed} of {len(points)} points did not finish (see {out / MANIFEST})", file=sys.stderr
        )
    return 1 if failed else 0

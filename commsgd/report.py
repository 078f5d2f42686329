"""`commsgd report RUN_DIR...`: a Markdown report with PNG plots from finished run directories.

Reads each run's config.yaml, summary.json, eval.jsonl, metrics/rank*.jsonl and events/rank*.jsonl
(see `commsgd.metrics`) and writes ``report.md`` next to its 150 dpi figures: test error (in percent)
and loss vs wall-clock with a zoom into the last stretch, test error vs bytes sent, bytes per step and
communication share, training loss vs steps, LSGD leader switching (when leader events were logged),
and a table per run. It warns when the runs were made under very different machine load.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from commsgd.errors import UserError
from commsgd.metrics import human_bytes, mean, read_jsonl

if TYPE_CHECKING:  # matplotlib loads only when figures are drawn (the CLI imports this module)
    from commsgd.plots import Panel, Series


class ReportError(UserError):
    """A run directory cannot be read, or report options are invalid."""


@dataclass
class Run:
    """One finished run directory, read into memory."""

    path: Path
    label: str
    config: dict[str, Any]
    summary: dict[str, Any]
    evals: list[dict[str, Any]]
    metrics: dict[int, list[dict[str, Any]]]
    events: dict[int, list[dict[str, Any]]]

    @property
    def algorithm(self) -> str:
        return str(self.summary.get("algorithm", self.config.get("algorithm", "?")))

    @property
    def world_size(self) -> int:
        return int(self.summary.get("world_size", len(self.summary.get("steps", [])) or 1))

    @property
    def num_nodes(self) -> int:
        return int(self.summary.get("num_nodes", 1))

    @property
    def batch_size(self) -> int:
        data = self.config.get("data") or {}
        return int(data.get("batch_size", 32)) if isinstance(data, dict) else 32

    @property
    def train_s(self) -> float:
        """Seconds of training: the slowest worker's wall clock less its evaluations (`train_time_s` of
        summary.json); for older runs the last evaluation's `train_s` (rank 0's, at the end: every run
        evaluates after its last step), else the wall time."""
        workers = self.summary.get("train_time_s")
        if isinstance(workers, list) and workers:
            return max(float(t) for t in workers)
        logged = [float(e["train_s"]) for e in self.evals if isinstance(e.get("train_s"), int | float)]
        return max(logged) if logged else float(self.summary["wall_time_s"])

    def curve(self, key: str) -> tuple[list[float], list[float]]:
        """(seconds, value) of every evaluation that recorded `key`: seconds of training (`train_s`,
        the wall clock less the evaluations before it) where the run logged them, else wall seconds."""
        points = [
            (float(e.get("train_s", e["wall_s"])), float(e[key]))
            for e in self.evals
            if isinstance(e.get(key), int | float)
        ]
        return [p[0] for p in points], [p[1] for p in points]


# --------------------------------------------------------------------------------------- loading


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not readable JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return data


def _per_rank(folder: Path) -> dict[int, list[dict[str, Any]]]:
    """``rank{r}.jsonl`` files of a folder, by rank (records that are not JSON objects are skipped)."""
    result: dict[int, list[dict[str, Any]]] = {}
    if not folder.is_dir():
        return result
    for file in sorted(folder.glob("rank*.jsonl")):
        suffix = file.stem[len("rank") :]
        if suffix.isdigit():
            result[int(suffix)] = [r for r in read_jsonl(file) if isinstance(r, dict)]
    return result


REQUIRED_SUMMARY = ("algorithm", "test_error", "wall_time_s", "steps", "bytes_sent", "bytes_per_step")


def load_run(path: str | Path, label: str | None = None) -> Run:
    """Read a finished run directory; ReportError (one line) if it is not one."""
    p = Path(path)
    if not p.is_dir():
        raise ReportError(f"{p}: not a directory")
    if not (p / "config.yaml").is_file():
        raise ReportError(f"{p}: not a commsgd run directory (no config.yaml)")
    if not (p / "summary.json").is_file():
        raise ReportError(f"{p}: no summary.json (the run did not finish)")
    if not (p / "eval.jsonl").is_file():
        raise ReportError(f"{p}: no eval.jsonl (the run recorded no evaluation)")
    try:
        config = yaml.safe_load((p / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ReportError(f"{p / 'config.yaml'}: not readable YAML ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise ReportError(f"{p / 'config.yaml'}: expected a mapping")
    summary = _read_json(p / "summary.json")
    missing = [k for k in REQUIRED_SUMMARY if k not in summary]
    if missing:
        raise ReportError(f"{p / 'summary.json'}: missing field(s) {', '.join(missing)}")
    evals = [
        e
        for e in read_jsonl(p / "eval.jsonl")
        if isinstance(e, dict)
        and isinstance(e.get("wall_s"), int | float)
        and not isinstance(e["wall_s"], bool)
    ]
    evals.sort(key=lambda e: float(e["wall_s"]))
    run = Run(
        path=p,
        label=label or p.name,
        config=config,
        summary=summary,
        evals=evals,
        metrics=_per_rank(p / "metrics"),
        events=_per_rank(p / "events"),
    )
    try:
        run_stats(run, 0.5)
    except (TypeError, ValueError, KeyError, AttributeError):
        raise ReportError(f"{p / 'summary.json'}: a field has the wrong type or shape") from None
    return run


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Read several run directories; labels are directory names, made unique with their parents."""
    if not paths:
        raise ReportError("no run directories given")
    runs = [load_run(p) for p in paths]
    names = Counter(r.label for r in runs)
    for r in runs:
        if names[r.label] > 1:
            r.label = f"{r.path.parent.name}/{r.path.name}"
    return runs


# --------------------------------------------------------------------------------------- numbers


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _numeric(record: dict[str, Any], *keys: str) -> bool:
    return all(_is_number(record.get(k)) for k in keys)


def time_to_target(run: Run, target: float) -> float | None:
    """Wall seconds of the first evaluation at or below `target` test error; None if never reached."""
    for t, err in zip(*run.curve("test_error")):
        if err <= target:
            return t
    return None


def best_error(run: Run) -> float:
    _, errors = run.curve("test_error")
    return min([*errors, float(run.summary["test_error"])])


def auto_target(runs: Sequence[Run]) -> float:
    """A target every run reaches: the highest best test error among the runs."""
    return max(best_error(r) for r in runs)


def baseline_run(runs: Sequence[Run]) -> Run | None:
    """The one-worker reference for speedups: a world_size-1 run, `sgd` preferred."""
    singles = [r for r in runs if r.world_size == 1]
    singles.sort(key=lambda r: r.algorithm != "sgd")
    return singles[0] if singles else None


@dataclass
class RunStats:
    """The numbers in a run's table row."""

    final_error: float
    best_error: float
    time_to_target: float | None
    steps_min: int
    steps_max: int
    bytes_per_worker: float
    bytes_per_step: float
    comm_share: float
    wall_s: float
    samples_per_s: float
    speedup_target: float | None = None
    speedup_throughput: float | None = None


def samples_trained(run: Run) -> int:
    """Samples whose gradients were used, over all workers: the algorithm's own count where every rank
    reports one (deadline-based methods use a varying number per step), else steps x batch size."""
    per_rank = run.summary.get("algorithm_summary")
    if isinstance(per_rank, list) and per_rank:
        counts = [r.get("samples") if isinstance(r, dict) else None for r in per_rank]
        valid = [c for c in counts if isinstance(c, int) and not isinstance(c, bool)]
        if len(valid) == len(counts):
            return sum(valid)
    return sum(int(x) for x in run.summary["steps"]) * run.batch_size


def run_stats(run: Run, target: float) -> RunStats:
    s = run.summary
    steps = [int(x) for x in s["steps"]] or [0]
    wall, trained = float(s["wall_time_s"]), run.train_s
    return RunStats(
        final_error=float(s["test_error"]),
        best_error=best_error(run),
        time_to_target=time_to_target(run, target),
        steps_min=min(steps),
        steps_max=max(steps),
        bytes_per_worker=mean([float(x) for x in s["bytes_sent"]]),
        bytes_per_step=mean([float(x) for x in s["bytes_per_step"]]),
        comm_share=mean([float(x) for x in s.get("comm_share", [])]),
        wall_s=wall,
        samples_per_s=samples_trained(run) / trained if trained > 0 else 0.0,
    )


def all_stats(runs: Sequence[Run], target: float) -> list[RunStats]:
    """Stats per run, with speedups over the one-worker baseline when one is among the runs."""
    stats = [run_stats(r, target) for r in runs]
    base = baseline_run(runs)
    if base is not None:
        b = stats[next(i for i, r in enumerate(runs) if r is base)]
        for st in stats:
            if b.time_to_target is not None and st.time_to_target:
                st.speedup_target = b.time_to_target / st.time_to_target
            if b.samples_per_s > 0:
                st.speedup_throughput = st.samples_per_s / b.samples_per_s
    return stats


# --------------------------------------------------------------------------------------- tables


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table (cells are str()-ed, pipes escaped)."""

    def cell(v: object) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def pct(x: float | None, digits: int = 2) -> str:
    return "—" if x is None or math.isnan(x) else f"{100 * x:.{digits}f} %"


def secs(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.1f} s" if x >= 10 else f"{x:.2f} s"


def times(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def setup_table(runs: Sequence[Run]) -> str:
    rows = []
    for r in runs:
        net = r.summary.get("network_model") or {}
        network = f"model: {net.get('inter_gbps')} Gbit/s inter-node" if net else "real (no model)"
        data = r.config.get("data") or {}
        rows.append(
            [
                r.label,
                r.algorithm,
                r.world_size,
                r.num_nodes,
                f"{r.summary.get('model', r.config.get('model', '?'))} on "
                f"{r.summary.get('dataset', data.get('dataset', '?'))}",
                r.batch_size,
                network,
                json.dumps(r.config.get("algo") or {}, sort_keys=True),
                load_text(machine_load(r)),
            ]
        )
    headers = [
        "run",
        "algorithm",
        "workers",
        "nodes",
        "task",
        "batch/worker",
        "network",
        "algo params",
        "load avg, start → end",
    ]
    return md_table(headers, rows)


def results_table(runs: Sequence[Run], stats: Sequence[RunStats], target: float) -> str:
    rows = []
    for r, st in zip(runs, stats):
        steps = f"{st.steps_min}" if st.steps_min == st.steps_max else f"{st.steps_min}-{st.steps_max}"
        rows.append(
            [
                r.label,
                pct(st.final_error),
                pct(st.best_error),
                secs(st.time_to_target),
                steps,
                human_bytes(st.bytes_per_worker),
                human_bytes(st.bytes_per_step),
                pct(st.comm_share, 1),
                secs(st.wall_s),
                f"{st.samples_per_s:,.0f}",
                times(st.speedup_target),
                times(st.speedup_throughput),
            ]
        )
    headers = [
        "run",
        "final test error",
        "best test error",
        f"time to {pct(target)}",
        "steps/worker",
        "bytes sent/worker",
        "bytes/worker-step",
        "comm share of wall",
        "wall time",
        "throughput: samples/s, all workers",
        "speedup to target",
        "throughput vs 1 worker's samples/s",
    ]
    return md_table(headers, rows)


THROUGHPUT_NOTE = (
    "Throughput: training samples whose gradients were used, summed over all workers of the run, per "
    "second of its training (wall time less evaluations: the test set is shared out among the workers, "
    "so evaluations cost a wide run less and would flatter its throughput)."
)


# --------------------------------------------------------------------------------------- machine load

#: runs whose load averages differ by more than this factor and by more than LOAD_GAP (one more busy
#: core's worth) were timed on differently busy machines
LOAD_RATIO = 2.0
LOAD_GAP = 1.0


def machine_load(run: Run) -> tuple[float, float] | None:
    """The 1-minute load average at the start and the end of training (summary.json), if recorded."""
    record = run.summary.get("load_average")
    if not isinstance(record, dict):
        return None
    start, end = record.get("start"), record.get("end")
    if not (isinstance(start, list) and start and isinstance(end, list) and end):
        return None
    if not (_is_number(start[0]) and _is_number(end[0])):
        return None
    return float(start[0]), float(end[0])


def load_text(load: tuple[float, float] | None) -> str:
    return "not recorded" if load is None else f"{load[0]:.2f} → {load[1]:.2f}"


def load_warning(runs: Sequence[Run]) -> str | None:
    """A warning line when the runs were made under very different machine load, else None.

    Each run counts with the higher of its start and end load: times and throughputs of runs that
    shared the cores with different amounts of other work are not comparable."""
    loads = {r.label: max(load) for r in runs if (load := machine_load(r)) is not None}
    if len(loads) < 2:
        return None
    low, high = min(loads.values()), max(loads.values())
    if high - low <= LOAD_GAP or high <= LOAD_RATIO * low:
        return None
    listed = ", ".join(f"`{label}` {load:.2f}" for label, load in loads.items())
    return (
        f"**Warning:** these runs were made under very different machine load (1-minute load average, "
        f"the higher of start and end: {listed}); their times and throughputs are not comparable."
    )


# --------------------------------------------------------------------------------------- leaders


def _level(record: dict[str, Any]) -> str:
    """Which leader a record is about: its kind (global/local) and group, when given."""
    kind, group = record.get("kind"), record.get("group")
    parts = [str(kind) if kind is not None else "", f"group {group}" if group is not None else ""]
    return " ".join(p for p in parts if p) or "leader"


def leader_records(run: Run) -> list[dict[str, Any]]:
    """Leader records of all ranks (fields kind/round/step/group/leader/loss, any subset), deduplicated."""
    seen: set[tuple[str, str, int]] = set()
    result: list[dict[str, Any]] = []
    for rank in sorted(run.events):
        for e in run.events[rank]:
            leader = e.get("leader")
            if isinstance(leader, bool) or not isinstance(leader, int | float):
                continue
            when = e.get("round", e.get("step"))
            key = (_level(e), str(when) if when is not None else f"r{rank}-{len(result)}", int(leader))
            if key in seen:
                continue
            seen.add(key)
            result.append(e)
    return result


def leader_panels(run: Run) -> list[Panel]:
    """Leader rank vs iterations (one line per leader level/group) and how many times each worker led."""
    from commsgd.plots import Panel, Series

    records = leader_records(run)
    if not records:
        return []
    lines_by: dict[str, list[tuple[float, int]]] = {}
    counts_by: dict[str, Counter[int]] = {}
    for i, e in enumerate(records):
        x = e.get("step", e.get("round", i))
        x = float(x) if isinstance(x, int | float) else float(i)
        lines_by.setdefault(_level(e), []).append((x, int(e["leader"])))
        kind = str(e.get("kind", "leader"))
        counts_by.setdefault(kind, Counter())[int(e["leader"])] += 1
    uses_steps = all("step" in e for e in records)
    lines = []
    for level, points in sorted(lines_by.items()):
        points.sort()
        lines.append(Series(level, [p[0] for p in points], [float(p[1]) for p in points]))
    top = max(max(c) for c in counts_by.values())
    workers = [str(w) for w in range(max(run.world_size, top + 1))]
    bars = [
        Series(kind if len(counts_by) > 1 else "", workers, [float(c.get(int(w), 0)) for w in workers])
        for kind, c in sorted(counts_by.items())
    ]
    return [
        Panel(f"{run.label}: leader", "step" if uses_steps else "round", "leader rank", lines, kind="step"),
        Panel(f"{run.label}: rounds each worker led", "worker rank", "rounds as leader", bars, kind="bar"),
    ]


# --------------------------------------------------------------------------------------- figures


def _smoothed(values: Sequence[float], points: int = 50) -> list[float]:
    """A trailing mean over 1/`points` of the curve: noise down, shape kept."""
    window = max(1, len(values) // points)
    return [mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


RankPoints = Callable[[list[dict[str, Any]]], list[tuple[int, float]]]


def _mean_over_ranks(run: Run, points_of: RankPoints) -> Series:
    """(step, value) points of every rank's metrics, averaged over the ranks that have the step, smoothed."""
    from commsgd.plots import Series

    by_step: dict[int, list[float]] = {}
    for records in run.metrics.values():
        for step, value in points_of(sorted((r for r in records if _numeric(r, "step")), key=_step)):
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return Series(run.label, [float(s) for s in steps], _smoothed([mean(by_step[s]) for s in steps]))


def _step(record: dict[str, Any]) -> int:
    return int(record["step"])


def _losses(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(_step(r), float(r["loss"])) for r in records if _numeric(r, "loss")]


def _rates(key: Callable[[dict[str, Any]], float], per: Callable[[dict[str, Any]], float]) -> RankPoints:
    """Change of a cumulative counter between consecutive records, per unit of another one (steps,
    seconds); the first record counts from zero."""

    def points(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
        result, last = [], (0.0, 0.0)
        for r in records:
            now = (key(r), per(r))
            if now[1] > last[1]:
                result.append((_step(r), (now[0] - last[0]) / (now[1] - last[1])))
            last = now
        return result

    return points


def _bytes(r: dict[str, Any]) -> float:
    return float(r["bytes_sent"]) if _numeric(r, "bytes_sent") else 0.0


def _comm_seconds(r: dict[str, Any]) -> float:
    return sum(float(r[k]) for k in ("comm_s", "wait_s") if _numeric(r, k))


def _wall(r: dict[str, Any]) -> float:
    return float(r["wall_s"]) if _numeric(r, "wall_s") else 0.0


def bytes_per_step_curve(run: Run) -> Series:
    """Bytes each worker sent per step (between logged steps), mean over workers."""
    return _mean_over_ranks(run, _rates(_bytes, lambda r: float(_step(r))))


def comm_share_curve(run: Run) -> Series:
    """Share of wall time spent communicating or waiting for peers, per logged interval, mean over workers."""
    return _mean_over_ranks(run, _rates(_comm_seconds, _wall))


def bytes_at_evaluations(run: Run) -> tuple[list[float], list[float]]:
    """(bytes sent per worker so far, test error) at each evaluation: every rank's cumulative count at
    its last logged step up to the evaluation's step, mean over ranks. By step, not wall time: each
    rank's clock starts when it does, seconds apart under load."""
    ranks = [
        sorted((_step(r), _bytes(r)) for r in records if _numeric(r, "step", "bytes_sent"))
        for records in run.metrics.values()
    ]
    ranks = [points for points in ranks if points]
    points = [
        (int(e["step"]), float(e["test_error"])) for e in run.evals if _numeric(e, "step", "test_error")
    ]
    if not ranks:
        return [], []
    sent = []
    for step, _ in points:
        before = [bisect.bisect_right(counts, (step, math.inf)) for counts in ranks]
        sent.append(mean([counts[i - 1][1] if i else 0.0 for counts, i in zip(ranks, before)]))
    return sent, [error for _, error in points]


def on_log_axis(series: Series, axis: str) -> Series:
    """`series` without the points a log `axis` ("x" or "y") cannot show (zero bytes), saying so in
    its note (beside its label in the legend), so that a run which sent nothing is named instead of
    silently missing."""
    from commsgd.plots import Series

    kept = [(x, y) for x, y in zip(series.x, series.y) if float(x if axis == "x" else y) > 0]
    if len(kept) == len(series.y):
        return series
    note = "sent 0 B" if not kept else "points at 0 B left out"
    return Series(series.label, [x for x, _ in kept], [y for _, y in kept], note=note)


#: the zoom panel shows the last this much of each curve's x range
ZOOM_FRACTION = 0.3


def zoom_window(
    series: Sequence[Series], fraction: float = ZOOM_FRACTION
) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """(x limits, y limits) of a zoom into the last stretch of every curve.

    A curve's last stretch is the last `fraction` of its x range (first to last evaluation). x spans
    from the earliest such stretch to the latest end; y is the range the curves take in their own
    last stretch, plus a margin, so the early descent of a curve that started later leaves the panel
    instead of stretching its y axis.
    """
    tails: list[tuple[float, float, list[float]]] = []
    for s in series:
        if not len(s.y):
            continue
        xs = [float(x) for x in s.x]
        start = xs[-1] - fraction * (xs[-1] - xs[0])
        tails.append((start, xs[-1], [float(y) for x, y in zip(xs, s.y) if x >= start]))
    if not tails:
        return None
    x_low, x_high = min(t[0] for t in tails), max(t[1] for t in tails)
    inside = [y for t in tails for y in t[2]]
    y_low, y_high = min(inside), max(inside)
    margin = 0.1 * (y_high - y_low) if y_high > y_low else max(0.1 * abs(y_high), 1e-3)
    x_margin = 0.03 * (x_high - x_low) if x_high > x_low else 0.5
    return (x_low - x_margin, x_high + x_margin), (max(0.0, y_low - margin), y_high + margin)


def write_figures(runs: Sequence[Run], out: Path) -> dict[str, Path]:
    """Write the report's PNGs into `out`; returns them by role."""
    from commsgd.plots import Panel, Series, save_figure

    errors = [Series(r.label, *r.curve("test_error")) for r in runs]
    losses = [Series(r.label, *r.curve("test_loss")) for r in runs]
    zoom = zoom_window(errors)
    figures: dict[str, Path] = {}
    figures["eval"] = save_figure(
        out / "error_vs_time.png",
        [
            Panel("test error", "training time (s)", "test error", errors, markers=True, percent_y=True),
            Panel(
                f"test error, zoom: last {100 * ZOOM_FRACTION:.0f} % of each run",
                "training time (s)",
                "test error",
                errors,
                xlim=zoom[0] if zoom else None,
                ylim=zoom[1] if zoom else None,
                markers=True,
                percent_y=True,
            ),
            Panel("test loss", "training time (s)", "test loss", losses, logy=True, markers=True),
        ],
        title="evaluated model (center variable) vs training time",
    )
    sent = [Series(r.label, *bytes_at_evaluations(r)) for r in runs]
    sent = [on_log_axis(Series(s.label, [float(x) / 1e6 for x in s.x], s.y), "x") for s in sent]
    figures["bytes"] = save_figure(
        out / "error_vs_bytes.png",
        [
            Panel(
                "test error vs bytes sent",
                "MB sent per worker (log scale)",
                "test error",
                sent,
                markers=True,
                logx_plain=True,
                percent_y=True,
            )
        ],
        columns=1,
        size=(6.4, 4.2),
    )
    stats = [run_stats(r, auto_target(runs)) for r in runs]
    labels = [r.label for r in runs]
    long_labels = max(len(label) for label in labels) > 12
    figures["comm"] = save_figure(
        out / "communication.png",
        [
            Panel(
                "bytes sent per step (mean over workers)",
                "step",
                "bytes per step (log scale)",
                [on_log_axis(bytes_per_step_curve(r), "y") for r in runs],
                logy=True,
            ),
            Panel(
                "communication share of wall time, per step",
                "step",
                "communicating or waiting",
                [comm_share_curve(r) for r in runs],
                percent_y=True,
            ),
            Panel(
                "communication share, whole run",
                "",
                "share of wall time",
                [Series("", labels, [st.comm_share for st in stats])],
                kind="bar",
                percent_y=True,
                color_bars=True,
                rotate_xticks=20 if long_labels else 0,
            ),
        ],
        title="communication: bytes and time (training phase; evaluation traffic excluded)",
    )
    train = [_mean_over_ranks(r, _losses) for r in runs]
    if any(s.y for s in train):
        figures["train"] = save_figure(
            out / "train_loss.png",
            [Panel("training loss (mean over workers)", "step", "mini-batch loss", train, logy=True)],
            columns=1,
            size=(6.4, 4.2),
        )
    leader = [p for r in runs for p in leader_panels(r)]
    if leader:
        figures["leaders"] = save_figure(out / "leaders.png", leader, columns=2)
    return figures


# --------------------------------------------------------------------------------------- report


def write_report(
    runs: Sequence[Run],
    out: Path,
    target: float | None = None,
    title: str = "commsgd report",
    intro: str = "",
) -> Path:
    """Write ``report.md`` and its figures into `out`; returns the Markdown file."""
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    chosen = target if target is not None else auto_target(runs)
    stats = all_stats(runs, chosen)
    figures = write_figures(runs, out)
    how = (
        "given"
        if target is not None
        else "automatic: the highest best error among the runs, so each reaches it"
    )
    base = baseline_run(runs)
    lines = [f"# {title}", ""]
    if intro:
        lines += [intro, ""]
    lines += ["## Runs", "", setup_table(runs), ""]
    warning = load_warning(runs)
    if warning:
        lines += [warning, ""]
    lines += ["## Results", ""]
    lines += [
        f"Target test error {pct(chosen)} ({how}). Times are seconds of training, evaluations "
        "excluded (wall-clock for runs that did not log it)."
    ]
    lines += [
        f"Speedups are over the one-worker run `{base.label}`."
        if base
        else "No one-worker run among the inputs, so no speedups (—)."
    ]
    lines += [THROUGHPUT_NOTE, "", results_table(runs, stats, chosen), ""]
    lines += ["## Test error and loss vs training time", ""]
    lines += [
        f"The zoom shows the last {100 * ZOOM_FRACTION:.0f} % of each run's time from its first to its "
        "last evaluation, the error axis limited to the range the curves take there (a run's earlier "
        "points may lie outside).",
        "",
        f"![test error and loss vs training time]({figures['eval'].name})",
        "",
        "## Test error vs bytes sent",
        "",
        "Training bytes each worker had sent at each evaluation (mean over workers, log scale; a run that "
        "sent nothing is named in the legend).",
        "",
        f"![test error vs bytes sent]({figures['bytes'].name})",
        "",
        "## Bytes per step and communication share",
        "",
        "Training traffic per step, and the share of wall time spent in communication or waiting for",
        "peers, per logged interval and over the whole run (the table's comm share).",
        "",
        f"![bytes per step and communication share]({figures['comm'].name})",
        "",
    ]
    if "train" in figures:
        lines += ["## Training loss vs steps", "", f"![training loss]({figures['train'].name})", ""]
    lines += ["## Leader switching", ""]
    if "leaders" in figures:
        lines += ["Leader rank per recorded round (one line per group) and how often each worker led.", ""]
        lines += [f"![leader switching]({figures['leaders'].name})", ""]
    else:
        lines += ["No leader events in these runs (`events/rank*.jsonl` with a `leader` field).", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------- CLI


def parse_target(text: str) -> float:
    """``0.05`` or ``5%`` -> 0.05."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (e.g. 0.05 or 5%)") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a fraction in (0, 1), e.g. 0.05 or 5%")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0] if __doc__ else None
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished run directories")
    parser.add_argument("--out", default="report", help="output directory (default: report/)")
    parser.add_argument(
        "--target-error",
        type=parse_target,
        help="test error for time-to-target, e.g. 0.05 or 5%% (default: auto)",
    )
    parser.add_argument("--title", default="commsgd report")


def run(args: argparse.Namespace) -> int:
    runs = load_runs(args.runs)
    path = write_report(runs, Path(args.out), args.target_error, args.title)
    print(f"report: {path}")
    return 0

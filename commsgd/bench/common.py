"""What every benchmark shares: where results go, the machine they ran on, and how training runs start.

A benchmark writes ``<out>/<name>.md`` (with the command that made it and the machine), ``<name>.json``
(the raw numbers) and optional PNGs. Training runs are real `commsgd train` runs whose run
directories live under ``<out>/runs/<name>/`` (checkpoints removed after reading them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from commsgd.report import Run, load_run

#: overrides every benchmark run gets: no progress bar, a bounded wait on broken peers, and one torch
#: thread per worker (a lone worker would otherwise take every core and not compare with N workers)
RUN_DEFAULTS = ("progress=false", "cluster.timeout_s=120", "cluster.threads=1")


@dataclass
class Job:
    """One training run: a name (its run directory) and the `commsgd train` arguments."""

    name: str
    algorithm: str
    workers: int
    steps: int
    overrides: list[str] = field(default_factory=list)

    def argv(self, run_dir: Path) -> list[str]:
        return [
            "train",
            "--algorithm",
            self.algorithm,
            "--workers",
            str(self.workers),
            "--steps",
            str(self.steps),
            "--out",
            str(run_dir),
            *RUN_DEFAULTS,
            *self.overrides,
        ]


@dataclass
class BenchEnv:
    """Options and output of one benchmark invocation."""

    out: Path
    quick: bool = False
    data_dir: str | None = None
    command: str = ""
    keep_runs: bool = False
    notes: list[str] = field(default_factory=list)

    def runs_dir(self, bench: str) -> Path:
        return self.out / "runs" / bench

    def note(self, text: str) -> None:
        """A remark for the result file (skipped algorithm, failed run), echoed to stderr."""
        self.notes.append(text)
        print(f"  note: {text}", file=sys.stderr, flush=True)

    def log(self, text: str) -> None:
        print(f"  {text}", file=sys.stderr, flush=True)


def machine() -> str:
    """One line describing where the numbers came from."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()}-core CPU ({cpu}), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, gloo backend, no GPU"
    )


def registered() -> list[str]:
    from commsgd.algorithms import algorithm_names

    return algorithm_names()


def available(env: BenchEnv, names: Sequence[str], bench: str) -> list[str]:
    """The names that are registered now; a note for each that is not (yet)."""
    known = set(registered())
    for name in names:
        if name not in known:
            env.note(f"{bench}: algorithm `{name}` is not registered yet; skipped")
    return [n for n in names if n in known]


def param_fields(algorithm: str) -> dict[str, Any]:
    """The algorithm's parameters with their defaults ({} if it has none or is not registered)."""
    from commsgd.algorithms import validate_params
    from commsgd.errors import UserError

    try:
        return validate_params(algorithm, {})
    except UserError:
        return {}


def accepts(algorithm: str, params: dict[str, Any]) -> bool:
    """Whether `params` are valid for the algorithm."""
    from commsgd.algorithms import validate_params
    from commsgd.errors import UserError

    try:
        validate_params(algorithm, params)
    except UserError:
        return False
    return True


# --------------------------------------------------------------------------------------- running


def _finish(env: BenchEnv, run_dir: Path, label: str) -> Run | None:
    if not (run_dir / "summary.json").is_file():
        return None
    if not env.keep_runs:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return load_run(run_dir, label=label)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(" ")]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[-1][:300]


def run_subprocess(env: BenchEnv, bench: str, job: Job, timeout_s: float = 600) -> Run | None:
    """Run one job as its own `python -m commsgd train` process; None (with a note) if it fails."""
    run_dir = env.runs_dir(bench) / job.name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "commsgd", *job.argv(run_dir)]
    env.log(f"{bench}: {job.name}: commsgd {shlex.join(job.argv(run_dir))}")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        partial = [
            x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
            for x in (exc.stdout, exc.stderr)
        ]
        output, code = "".join(partial) + f"\ntimed out after {timeout_s:.0f} s", -1
    (run_dir.parent / f"{job.name}.log").write_text(str(output), encoding="utf-8")
    run = _finish(env, run_dir, job.name) if code == 0 else None
    if run is None:
        env.note(f"{bench}: run `{job.name}` failed (exit {code}): {_last_line(str(output))}")
    else:
        env.log(f"{bench}: {job.name}: done in {time.perf_counter() - start:.1f} s")
    return run


def _batch_worker(jobs: list[tuple[str, dict[str, Any], str]]) -> list[str]:
    """In each of N spawned workers: run the jobs one after another in this process.

    Each job gets a port picked by rank 0 just before the job starts and handed to the others through
    one store that lives for the whole batch (on the port the batch was started with): a port picked
    minutes ahead may be taken by then.
    """
    import torch.distributed as dist

    from commsgd.config import Config, from_dict
    from commsgd.launch import free_port
    from commsgd.train import run_worker

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=rank == 0
    )
    done = []
    for index, (name, cfg_data, run_dir) in enumerate(jobs):
        key = f"port/{index}"
        if rank == 0:
            store.set(key, str(free_port()))
        os.environ["MASTER_PORT"] = store.get(key).decode()
        cfg = from_dict(Config, cfg_data)
        log = Path(run_dir).parent / f"{name}.log"
        with log.open("a", encoding="utf-8") as handle, contextlib.redirect_stdout(handle):
            run_worker(cfg, Path(run_dir), False)
        done.append(name)
    return done


def _error_line(exc: BaseException) -> str:
    """The worker's exception line out of run_distributed's report (its first line names the rank)."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def run_batch(env: BenchEnv, bench: str, jobs: Sequence[Job]) -> dict[str, Run | None]:
    """Run jobs of equal worker count one after another in one set of worker processes (fast).

    Every job is still a full `Trainer` run that writes its own run directory and summary.json. When a
    job fails, it is noted with the worker's error and the jobs after it continue in a fresh set of
    processes.
    """
    from commsgd.cli import parse_command_line, resolve_train_config
    from commsgd.config import save_config, to_dict
    from commsgd.errors import UserError
    from commsgd.testing import run_distributed

    results: dict[str, Run | None] = {}
    by_workers: dict[int, list[tuple[str, dict[str, Any], str]]] = {}
    for job in jobs:
        run_dir = env.runs_dir(bench) / job.name
        shutil.rmtree(run_dir, ignore_errors=True)
        try:
            cfg, _, _ = resolve_train_config(parse_command_line(job.argv(run_dir))[1])
        except UserError as exc:
            env.note(f"{bench}: run `{job.name}` rejected: {exc}")
            results[job.name] = None
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        by_workers.setdefault(cfg.workers, []).append((job.name, to_dict(cfg), str(run_dir)))
    for workers, pending in by_workers.items():
        while pending:
            names = ", ".join(b[0] for b in pending)
            env.log(f"{bench}: {len(pending)} run(s) on {workers} worker(s) in one set of processes: {names}")
            error = ""
            try:
                timeout = 60 + 60 * len(pending)
                run_distributed(_batch_worker, workers, pending, timeout=timeout)
            except (
                Exception
            ) as exc:  # a job failed: the ones before it finished, the ones after it did not run
                error = _error_line(exc)
            while pending and (run := _finish(env, Path(pending[0][2]), pending[0][0])) is not None:
                results[pending.pop(0)[0]] = run
            if pending:
                name = pending.pop(0)[0]
                results[name] = None
                env.note(f"{bench}: run `{name}` failed: {error or 'no summary.json'}")
    return results


def add_reuse_argument(parser: argparse.ArgumentParser) -> None:
    """`--reuse` for a benchmark that reads its runs back with `reuse_runs`."""
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="train nothing: remake the results from the runs an earlier run of this command left in --out "
        "(same arguments)",
    )


def made_by(run: Run, job: Job) -> bool:
    """Whether the run directory's config is what `job` asks for: algorithm, workers, steps and every
    override (cluster.* left out: the emulated cluster places those per node)."""
    from commsgd.config import parse_override

    cfg = run.config
    if (cfg.get("algorithm"), cfg.get("workers"), cfg.get("steps")) != (
        job.algorithm,
        job.workers,
        job.steps,
    ):
        return False
    for text in (*RUN_DEFAULTS, *job.overrides):
        parts, value = parse_override(text)
        if parts[0] == "cluster":
            continue
        node: Any = cfg
        for part in parts:
            node = node.get(part) if isinstance(node, dict) else None
        if node != value:
            return False
    return True


def reuse_runs(env: BenchEnv, bench: str, jobs: Sequence[Job]) -> dict[str, Run | None]:
    """`--reuse`: train nothing, read the jobs' finished run directories an earlier run of the benchmark
    left in the output folder (None, with a note, for one that is missing, unfinished or was made with
    other arguments). ConfigError (exit 2) when the folder holds no finished run at all."""
    from commsgd.errors import ConfigError
    from commsgd.report import ReportError

    if not any(env.runs_dir(bench).glob("*/summary.json")):
        raise ConfigError(
            f"{bench} --reuse: {env.runs_dir(bench)} holds no finished run; run the command once without "
            "--reuse (same arguments and --out)"
        )
    found: dict[str, Run | None] = {}
    for job in jobs:
        folder = env.runs_dir(bench) / job.name
        run = None
        if (folder / "summary.json").is_file():
            with contextlib.suppress(ReportError):
                run = load_run(folder, label=job.name)
        if run is not None and not made_by(run, job):
            env.note(f"{bench} --reuse: {folder} was made with other arguments; not used")
            run = None
        elif run is None:
            env.note(f"{bench} --reuse: {folder} holds no finished run")
        found[job.name] = run
    return found


def run_jobs(env: BenchEnv, bench: str, jobs: Sequence[Job]) -> dict[str, Run | None]:
    """Each job as its own process (timings as a user would see them), or batched in --quick mode."""
    if env.quick:
        return run_batch(env, bench, jobs)
    return {job.name: run_subprocess(env, bench, job) for job in jobs}


# --------------------------------------------------------------------------------------- output


def write_result(
    env: BenchEnv, name: str, title: str, body: str, data: dict[str, Any], seconds: float | None = None
) -> Path:
    """Write ``<name>.md`` (command, machine, body, notes) and ``<name>.json`` into the output folder."""
    env.out.mkdir(parents=True, exist_ok=True)
    header = [
        f"# {title}",
        "",
        f"- command: `{env.command}`" if env.command else "",
        f"- machine: {machine()}; load average {os.getloadavg()[0]:.1f} when written",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}"
        + (f"; took {seconds:.0f} s" if seconds is not None else ""),
        "- mode: "
        + ("--quick (tiny sizes: checks the pipeline, numbers mean nothing)" if env.quick else "full"),
        "",
    ]
    notes = ["", "## Notes", "", *[f"- {n}" for n in env.notes]] if env.notes else []
    path = env.out / f"{name}.md"
    path.write_text(
        "\n".join([h for h in header if h is not None] + [body.rstrip(), *notes, ""]), encoding="utf-8"
    )
    payload = {"benchmark": name, "machine": machine(), "quick": env.quick, "notes": env.notes, **data}
    (env.out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return path

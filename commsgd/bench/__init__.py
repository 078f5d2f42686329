"""`commsgd bench NAME`: benchmarks from real runs; tables, JSON and plots go to ``--out``.

    commsgd bench all --out benchmarks/results      the whole suite (about 20 minutes on 2 cores)
    commsgd bench all --quick                       tiny sizes: checks the pipeline in a couple of minutes
    commsgd bench overhead | bytes | compressors | powersgd | paper | scaling | stragglers | cluster
    commsgd bench lowcomm | limit

Without --out, results go to a new folder runs/<time>-bench-<name>[-quick]-<hex>: only an explicit
--out writes the committed benchmarks/results, and a --quick run into a folder of full results is refused.

Algorithms that are not registered yet are skipped with a note in the result file.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import shlex
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from commsgd.bench.common import BenchEnv

#: name -> module; each has TITLE, add_arguments(parser) and run(env, args) -> str (a headline)
BENCHMARKS = {
    "overhead": "commsgd.bench.overhead",
    "bytes": "commsgd.bench.traffic",
    "compressors": "commsgd.bench.compressors",
    "powersgd": "commsgd.bench.powersgd",
    "paper": "commsgd.bench.paper",
    "scaling": "commsgd.bench.scaling",
    "stragglers": "commsgd.bench.stragglers",
    "cluster": "commsgd.bench.cluster",
    "lowcomm": "commsgd.bench.lowcomm",
    "limit": "commsgd.bench.limit",
}

_PARSERS: dict[str, argparse.ArgumentParser] = {}


def _module(name: str) -> ModuleType:
    return importlib.import_module(BENCHMARKS[name])


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        help="results folder (default: a new runs/<time>-bench-<name>-<hex>; the committed results are "
        "made with --out benchmarks/results)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: a pipeline check, not a measurement"
    )
    parser.add_argument("--keep-runs", action="store_true", help="keep the runs' checkpoints")
    parser.add_argument("--data-dir", help="CIFAR-10 folder (cifar-10-batches-py): paper runs CNN7 on it")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK", parser_class=type(parser))
    suite = sub.add_parser("all", help="every benchmark below, in order", description=__doc__)
    suite.formatter_class = argparse.RawDescriptionHelpFormatter
    _common(suite)
    suite.add_argument(
        "--skip", nargs="+", default=[], choices=list(BENCHMARKS), help="benchmarks to leave out"
    )
    for name in BENCHMARKS:
        try:
            mod = _module(name)
        except ModuleNotFoundError as exc:  # a benchmark module not written yet
            if exc.name != BENCHMARKS[name]:
                raise
            continue
        p = sub.add_parser(name, help=mod.TITLE, description=(mod.__doc__ or mod.TITLE))
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        _common(p)
        mod.add_arguments(p)
        _PARSERS[name] = p


def _defaults(name: str, args: argparse.Namespace) -> argparse.Namespace:
    """A benchmark's own defaults, with the common options of `args`."""
    ns = _PARSERS[name].parse_args([])
    for key in ("out", "quick", "keep_runs", "data_dir"):
        setattr(ns, key, getattr(args, key))
    ns.in_suite = True  # e.g. an unavailable emulated cluster is a note, not an error
    return ns


def run_one(name: str, args: argparse.Namespace, command: str) -> str:
    """Run one benchmark and record its headline in the results folder's index."""
    from commsgd.bench.common import BenchEnv

    env = BenchEnv(Path(args.out), args.quick, args.data_dir, command, args.keep_runs)
    print(f"bench {name}:", file=sys.stderr, flush=True)
    start = time.perf_counter()
    headline = str(_module(name).run(env, args))
    seconds = time.perf_counter() - start
    print(f"bench {name}: {headline} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    if not getattr(args, "train", None):  # `cluster --train` runs a user's job: no result to index
        update_index(env, name, headline, seconds)
    return headline


def update_index(env: BenchEnv, name: str, headline: str, seconds: float) -> None:
    """Rewrite ``index.md``: the latest headline, time and command of every benchmark run into this folder."""
    import json

    from commsgd.bench.common import BenchEnv, write_result
    from commsgd.report import md_table

    path = env.out / "index.json"
    entries: dict[str, dict[str, object]] = {}
    with contextlib.suppress(OSError, ValueError, AttributeError):
        entries = dict(json.loads(path.read_text(encoding="utf-8")).get("entries", {}))
    entries[name] = {
        "headline": headline,
        "seconds": round(seconds, 1),
        "command": env.command,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "quick": env.quick,
    }
    order = [n for n in BENCHMARKS if n in entries] + [n for n in entries if n not in BENCHMARKS]
    rows = [
        (
            f"[{n}]({n}.md)",
            entries[n]["headline"],
            f"{entries[n]['seconds']:.0f} s",
            f"`{entries[n]['command']}`",
        )
        for n in order
    ]
    table = md_table(["benchmark", "result", "time", "made by"], rows)
    index_env = BenchEnv(env.out, env.quick, env.data_dir, "see the last column")
    write_result(index_env, "index", "commsgd benchmark suite", table, {"entries": entries})


def _command(args: argparse.Namespace) -> str:
    """The command line that made the results (from sys.argv when run as `commsgd bench ...`)."""
    argv = sys.argv[1:]
    if argv[:1] == ["bench"]:
        return "commsgd " + shlex.join(argv)
    quick = " --quick" if args.quick else ""
    return f"commsgd bench {args.bench} --out {shlex.quote(args.out)}{quick}"


def holds_full_results(out: Path) -> bool:
    """Whether `out` has results of a full (not --quick) benchmark run, by its index.json."""
    import json

    with contextlib.suppress(OSError, ValueError, AttributeError):
        entries = json.loads((out / "index.json").read_text(encoding="utf-8")).get("entries", {})
        return any(isinstance(e, dict) and e.get("quick") is False for e in entries.values())
    return False


def choose_out(args: argparse.Namespace) -> None:
    """Set `args.out`: a fresh folder under runs/ when none is given (so quick and ad-hoc runs never
    land in the committed benchmarks/results); a --quick run into a folder of full results is refused."""
    from commsgd.errors import ConfigError
    from commsgd.rundir import new_run_dir, shown_path

    if args.out is None:
        stem = f"bench-{args.bench}" + ("-quick" if args.quick else "")
        args.out = str(new_run_dir(Path("runs"), stem))
        print(f"bench: results go to {args.out}", file=sys.stderr, flush=True)
    elif args.quick and holds_full_results(Path(args.out)):
        raise ConfigError(
            f"out: {shown_path(args.out)} holds full results (index.json): a --quick run would overwrite "
            "them with numbers that mean nothing; choose another --out"
        )


def run(args: argparse.Namespace) -> int:
    if args.bench is None:
        print(__doc__)
        return 0
    choose_out(args)
    command = _command(args)
    if args.bench != "all":
        run_one(args.bench, args, command)
        return 0
    start = time.perf_counter()
    for name in [n for n in _PARSERS if n not in args.skip]:
        run_one(name, _defaults(name, args), command)
    print(
        f"suite done in {time.perf_counter() - start:.0f} s: {Path(args.out) / 'index.md'}", file=sys.stderr
    )
    return 0

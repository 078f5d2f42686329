"""The `commsgd` command: train | reproduce | bench | report | list.

Bad input (config, flags, data directory, checkpoint) prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from commsgd.errors import CheckpointError, ConfigError, UserError

# Subcommands living in their own modules: each has `add_arguments(parser)` and `run(args) -> int`.
EXTRA_COMMANDS = {
    "reproduce": ("commsgd.reproduce", "run the paper's deterministic problems (toy2d, matrix completion)"),
    "report": ("commsgd.report", "write a Markdown report with plots from run directories"),
    "bench": ("commsgd.bench", "run benchmarks (overhead, bytes, compressors, ...)"),
}


def printable(text: str) -> str:
    """`text` with every non-printable character escaped as repr does (``\\r``, ``\\x1b``, ``\\u2028``).

    Error lines quote what the user typed: a raw newline or carriage return would split the one-line
    message, and an escape sequence would drive the terminal.
    """
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit code 2 like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {printable(message)}", file=sys.stderr)
        sys.exit(2)


def catalogue() -> str:
    from commsgd.algorithms import REGISTRY, algorithm_names
    from commsgd.tasks import DATASETS, MODELS

    lines = ["algorithms:"]
    lines += [f"  {name:<12} {REGISTRY[name].summary_line}" for name in algorithm_names()]
    lines.append(f"models:     {', '.join(MODELS)}")
    lines.append(f"datasets:   {', '.join(DATASETS)}")
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="commsgd",
        description="Communication-efficient distributed training on PyTorch.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=catalogue(),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    train = sub.add_parser(
        "train",
        help="train a model with a distributed algorithm (default: 4 local workers on digits)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=catalogue() + "\n\noverrides: any config field as key=value, e.g. optim.lr=0.1 algo.tau=64 "
        "data.batch_size=64 cluster.group_size=2 network.enabled=true",
    )
    train.add_argument("--config", help="YAML config file")
    train.add_argument("--algorithm", help="algorithm name (see below)")
    train.add_argument(
        "--workers", type=int, help="number of local worker processes (ignored under torchrun)"
    )
    budget = train.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="steps per worker")
    budget.add_argument("--epochs", type=int, help="epochs over each worker's shard")
    train.add_argument("--model", help="model name")
    train.add_argument("--dataset", help="data set name")
    train.add_argument("--data-dir", help="data directory (cifar10: holds cifar-10-batches-py)")
    train.add_argument("--out", help="run directory (default runs/<timestamp>-<algorithm>)")
    train.add_argument("--seed", type=int)
    train.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint"
    )
    train.add_argument("--max-restarts", type=int, help="restart the worker group up to K times on failure")
    train.add_argument("overrides", nargs="*", metavar="key=value")
    sub.add_parser("list", help="list algorithms, models and data sets")
    for name, (module, text) in EXTRA_COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            raise
        mod.add_arguments(
            sub.add_parser(name, help=text, formatter_class=argparse.RawDescriptionHelpFormatter)
        )
    return parser


#: the named flags of `train` (argparse attribute -> config key)
FLAG_KEYS = {
    "algorithm": "algorithm",
    "workers": "workers",
    "steps": "steps",
    "epochs": "epochs",
    "model": "model",
    "dataset": "data.dataset",
    "data_dir": "data.data_dir",
    "out": "out",
    "seed": "seed",
    "max_restarts": "cluster.max_restarts",
}


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The named flags of `train` that were given, as config key -> value.

    Values are taken as typed, not re-read as YAML: YAML would fold a newline in a path into a space
    and cannot carry NUL, so a bad path would be changed or quoted back wrongly instead of refused.
    """
    return {key: getattr(args, attr) for attr, key in FLAG_KEYS.items() if getattr(args, attr) is not None}


def requested_config(base: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """`base` with the named flags and then the key=value overrides applied (so key=value wins).

    Plain data, not validated yet: `load_config` does that.
    """
    from commsgd.config import apply_override, parse_override, plain_tree

    data: dict[str, Any] = plain_tree(dict(base), "config")
    for key, value in flag_values(args).items():
        apply_override(data, key.split("."), value)
    for text in args.overrides:
        apply_override(data, *parse_override(text))
    return data


def check_resume_matches(run_dir: Path, saved: dict[str, Any], requested: dict[str, Any]) -> None:
    """A resumed run keeps its algorithm and worker count: say so before anything is validated.

    Checked ahead of `load_config`, which would otherwise judge the saved `algo` parameters against
    the new algorithm and name one of them instead of the change that cannot work.
    """
    from commsgd.config import shown

    old, new = saved.get("algorithm"), requested.get("algorithm")
    if isinstance(new, str) and new != old:
        raise CheckpointError(
            f"--resume: the run in {shown(run_dir)} used algorithm {old!r}, this command asks for {new!r}"
        )
    old, new = saved.get("workers"), requested.get("workers")
    if isinstance(new, int) and not isinstance(new, bool) and new != old:
        raise CheckpointError(
            f"--resume: the run in {shown(run_dir)} ran on {old} workers, "
            f"this command asks to continue on {new}"
        )


def resolve_train_config(args: argparse.Namespace) -> tuple[Any, Path, bool]:
    """Config, run directory and resume flag for `commsgd train`, all validated before any worker starts."""
    from commsgd.algorithms import get_algorithm_class, validate_params
    from commsgd.config import load_config, read_yaml, shown
    from commsgd.tasks import DATASETS, MODELS, load_dataset

    resume = args.resume is not None
    if resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise CheckpointError(f"resume {shown(run_dir)}: not a commsgd run directory (no config.yaml)")
        base = read_yaml(run_dir / "config.yaml")
        if args.config:
            raise ConfigError(
                "--config and --resume: a resumed run keeps its own config; pass overrides instead"
            )
    else:
        base = read_yaml(args.config) if args.config else {}
    requested = requested_config(base, args)
    if resume:
        check_resume_matches(run_dir, base, requested)
    cfg = load_config(requested, validate_algorithm=validate_params)
    if resume:
        cfg.out = str(run_dir)
    if cfg.model not in MODELS:
        raise ConfigError(f"model: unknown name {cfg.model!r}; choose from {', '.join(MODELS)}")
    if cfg.data.dataset not in DATASETS:
        raise ConfigError(
            f"data.dataset: unknown name {cfg.data.dataset!r}; choose from {', '.join(DATASETS)}"
        )
    if get_algorithm_class(cfg.algorithm).single_worker and cfg.workers != 1:
        raise ConfigError(f"workers: algorithm {cfg.algorithm!r} runs on one worker; use --workers 1")
    load_dataset(cfg.data.dataset, cfg.data.data_dir, model=cfg.model, seed=cfg.seed)  # fail fast on bad data
    run_dir = Path(cfg.out) if cfg.out else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.algorithm}"
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0  # torchrun restarts its own run
    if not (resume or restarted) and (
        (run_dir / "summary.json").exists() or (run_dir / "checkpoints").exists()
    ):
        raise ConfigError(f"out: {run_dir} already holds a run; use --resume {run_dir} or another --out")
    cfg.out = str(run_dir)
    return cfg, run_dir, resume


def cmd_train(args: argparse.Namespace) -> int:
    from commsgd.config import save_config, to_dict
    from commsgd.context import launched_by_torchrun
    from commsgd.launch import launch_local, worker_entry

    cfg, run_dir, resume = resolve_train_config(args)
    if launched_by_torchrun():
        cfg.workers = int(os.environ["WORLD_SIZE"])
        if int(os.environ["RANK"]) == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
        worker_entry(to_dict(cfg), str(run_dir), resume)
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return launch_local(cfg, run_dir, resume)


def cmd_list(_: argparse.Namespace) -> int:
    print(catalogue())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "train":
            return cmd_train(args)
        if args.command == "list":
            return cmd_list(args)
        module = importlib.import_module(EXTRA_COMMANDS[args.command][0])
        return int(module.run(args))
    except UserError as exc:
        print(f"commsgd: error: {printable(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("commsgd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

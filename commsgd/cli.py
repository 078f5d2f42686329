"""The `commsgd` command: train | reproduce | bench | report | list.

Bad input (config, flags, data directory, checkpoint) prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Iterator, Sequence
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
    train.add_argument(
        "--data-dir",
        help="data directory (cifar10: holds cifar-10-batches-py; imagefolder: holds train/<class>/<image> "
        "and test/ or val/; text: a UTF-8 file)",
    )
    train.add_argument(
        "--out",
        help="run directory (default: a new runs/<timestamp>-<algorithm>-<hex>; needed under torchrun)",
    )
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


#: config fields a resumed run cannot change (dotted key, how messages name it): the checkpoint's
#: state was made for them. The node layout (group_size) shapes leader state and the link classes
#: of the emulated network.
RESUME_FIXED = (
    ("algorithm", "algorithm"),
    ("model", "model"),
    ("data.dataset", "data set"),
    ("cluster.group_size", "cluster.group_size"),
)
_MISSING = object()


def _field(tree: Any, dotted: str) -> Any:
    """The value at a dotted key of a plain config tree, or _MISSING."""
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def check_resume_matches(
    run_dir: Path, saved: dict[str, Any], requested: dict[str, Any], source: str = ""
) -> None:
    """A resumed run keeps its algorithm, worker count, model, data set and node layout.

    `saved` is what the run used (its config.yaml, or the config in a checkpoint, named by `source`).
    Checked ahead of `load_config`, which would otherwise judge the saved `algo` parameters against
    the new algorithm and name one of them instead of the change that cannot work.
    """
    from commsgd.config import shown

    where = source or f"the run in {shown(run_dir)}"
    for key, label in RESUME_FIXED:
        old, new = _field(saved, key), _field(requested, key)
        if old is not _MISSING and new is not _MISSING and new != old and type(new) in (str, int, type(None)):
            verb = "is for" if source else "used"
            raise CheckpointError(f"--resume: {where} {verb} {label} {old!r}, this command asks for {new!r}")
    old, new = saved.get("workers"), requested.get("workers")
    if isinstance(new, int) and not isinstance(new, bool) and new != old:
        raise CheckpointError(
            f"--resume: {where} ran on {old} workers, this command asks to continue on {new}"
        )


def check_resume_checkpoint(run_dir: Path, cfg: Any, spec: Any) -> None:
    """Compare the newest checkpoint of rank 0 with the resumed config before anything is written.

    The checkpoint's own config is checked like config.yaml (which an older commsgd rewrote on a
    failed resume), and its model tensors against the model `cfg` builds for data `spec`: a data
    directory with another input shape or number of classes (or vocabulary) is refused here, not
    in a worker's traceback. No loadable checkpoint: nothing to compare (the workers say so).
    """
    import torch

    from commsgd import checkpoint
    from commsgd.config import shown, to_dict
    from commsgd.tasks import build_model

    for step in checkpoint.saved_steps(run_dir, 0):
        try:
            state = checkpoint.load_checkpoint(checkpoint.checkpoint_path(run_dir, step, 0))
        except CheckpointError:
            continue
        break
    else:
        return
    source = f"the checkpoint of step {step} in {shown(run_dir)}"
    meta = _mapping(state.get("meta"))
    saved = dict(_mapping(meta.get("config")))
    saved.setdefault("workers", meta.get("world_size"))
    check_resume_matches(run_dir, saved, to_dict(cfg), source)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        wanted = {k: tuple(v.shape) for k, v in build_model(cfg.model, spec).state_dict().items()}
    model = _mapping(state.get("model"))
    found = {k: tuple(v.shape) for k, v in model.items() if isinstance(v, torch.Tensor)}
    if found != wanted:
        differs = [k for k in wanted if found.get(k) != wanted[k]] + sorted(found.keys() - wanted.keys())
        name = differs[0]
        raise CheckpointError(
            f"--resume: {source} holds a model that does not fit model {cfg.model!r} on data set "
            f"{spec.name!r} here: {name!r} has shape {list(found.get(name, ()))} there, "
            f"{list(wanted.get(name, ()))} here (another data directory?)"
        )


def _mapping(value: Any) -> dict[str, Any]:
    """`value` if it is a dict, else an empty one (a checkpoint's fields are untrusted data)."""
    return value if isinstance(value, dict) else {}


def check_fresh_out(run_dir: Path, resume: bool) -> None:
    """`--out` must not name a run that was started: its records would be overwritten."""
    from commsgd.rundir import holds_run, shown_path

    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0  # torchrun restarts its own run
    if not (resume or restarted) and holds_run(run_dir):
        shown = shown_path(run_dir)
        raise ConfigError(f"out: {shown} already holds a run; use --resume {shown} or another --out")


def check_before_spawn(cfg: Any, dataset: Any) -> None:
    """What the workers would find wrong with `cfg`, found once here instead: a worker's error is
    said by every worker and, under `--max-restarts`, tried again. Uses the workers' own checks."""
    from commsgd.context import choose_device, node_layout
    from commsgd.tasks.models import check_model_fits
    from commsgd.train import ShardedBatches

    choose_device(cfg.cluster, 0)  # cuda asked for without a device, nccl without cuda
    if cfg.cluster.group_size is not None:
        node_layout(cfg.workers, cfg.cluster.group_size)
    check_model_fits(cfg.model, dataset.spec)
    ShardedBatches(len(dataset.train_y), cfg.data.batch_size, 0, cfg.workers, cfg.seed)  # batch vs shard


def resolve_train_config(args: argparse.Namespace) -> tuple[Any, Path, bool]:
    """Config, run directory and resume flag for `commsgd train`, all validated before any worker starts."""
    from commsgd.algorithms import get_algorithm_class, validate_params
    from commsgd.config import load_config, read_yaml, shown
    from commsgd.context import launched_by_torchrun
    from commsgd.rundir import new_run_dir, path_problem
    from commsgd.tasks import DATASETS, MODELS, load_dataset

    resume = args.resume is not None
    if resume:
        run_dir = Path(args.resume)
        try:
            is_run = (run_dir / "config.yaml").is_file()
        except OSError as exc:  # e.g. a name too long for the file system
            raise path_problem("--resume", run_dir, exc) from None
        if not is_run:
            raise CheckpointError(f"resume {shown(run_dir)}: not a commsgd run directory (no config.yaml)")
        base = read_yaml(run_dir / "config.yaml")
        if args.config:
            raise ConfigError(
                "--config and --resume: a resumed run keeps its own config; pass overrides instead"
            )
    else:
        base = read_yaml(args.config) if args.config else {}
    requested = requested_config(base, args)
    if launched_by_torchrun():  # torchrun decides the world size (--workers is ignored under it)
        requested["workers"] = int(os.environ["WORLD_SIZE"])
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
    dataset = load_dataset(cfg.data.dataset, cfg.data.data_dir, model=cfg.model, seed=cfg.seed)  # fail fast
    check_before_spawn(cfg, dataset)
    if resume:
        check_resume_checkpoint(run_dir, cfg, dataset.spec)
    elif cfg.out is None and launched_by_torchrun():
        raise ConfigError("out: under torchrun every process must name the same run directory; pass --out")
    if cfg.out:
        run_dir = Path(cfg.out)
        check_fresh_out(run_dir, resume)
    else:  # checks done: a fresh directory no other run has (created now, so it stays unique)
        run_dir = new_run_dir(Path("runs"), cfg.algorithm)
    cfg.out = str(run_dir)
    return cfg, run_dir, resume


def cmd_train(args: argparse.Namespace) -> int:
    from commsgd.config import save_config, to_dict
    from commsgd.context import launched_by_torchrun
    from commsgd.launch import launch_local, worker_entry

    cfg, run_dir, resume = resolve_train_config(args)
    if launched_by_torchrun():
        cfg.workers = int(os.environ["WORLD_SIZE"])
        if int(os.environ["RANK"]) != 0:  # cannot pass process-group setup before rank 0 holds the lock
            worker_entry(to_dict(cfg), str(run_dir), resume)
            return 0
        with claim_run_dir(run_dir, resume):
            save_config(cfg, run_dir / "config.yaml")
            worker_entry(to_dict(cfg), str(run_dir), resume)
        return 0
    with claim_run_dir(run_dir, resume):  # held by this launcher for the whole run, restarts included
        save_config(cfg, run_dir / "config.yaml")
        return launch_local(cfg, run_dir, resume)


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, resume: bool) -> Iterator[None]:
    """Hold the run directory's lock (see `commsgd.rundir`); checked again under it, so that of two
    runs started together on one `--out` the second is refused, not merged into the first."""
    from commsgd.rundir import locked

    with locked(run_dir, "--resume" if resume else "out"):
        check_fresh_out(run_dir, resume)
        yield


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

"""The `commsgd` command: train | reproduce | bench | report | list.

Bad input (config, flags, data directory, checkpoint) prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
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
    "sweep": ("commsgd.sweep", "one training per point of a hyperparameter grid; table and plot of the best"),
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
    """Algorithms, models and data sets, from the torch-free `commsgd.catalogue`."""
    from commsgd import catalogue

    return catalogue.text()


def build_parser(argv: Sequence[str] = ()) -> ArgumentParser:
    """The parser. Of the EXTRA_COMMANDS only the one named in `argv` is imported (for its arguments):
    they import torch, and `commsgd --help` must not wait for it."""
    from commsgd import __version__

    parser = ArgumentParser(
        prog="commsgd",
        description="Communication-efficient distributed training on PyTorch.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=catalogue(),
    )
    parser.add_argument("--version", action="version", version=f"commsgd {__version__}")
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
    train.add_argument("--model", help="model name, or your builder as package.module:function")
    train.add_argument("--dataset", help="data set name, or your builder as package.module:function")
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
        "--device",
        choices=("auto", "cpu", "cuda"),
        help="where workers compute (cluster.device; cuda: one GPU per local rank, nccl by default)",
    )
    train.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint"
    )
    train.add_argument("--max-restarts", type=int, help="restart the worker group up to K times on failure")
    train.add_argument(
        "--print-config",
        action="store_true",
        help="print the fully resolved config as YAML (usable as --config) and exit without training",
    )
    # key=value overrides may stand anywhere among the flags: main() takes them from what argparse
    # leaves over (a positional here would end at the first flag after it); listed for --help only
    train.add_argument_group("overrides", "key=value  any config field, anywhere among the flags")
    listing = sub.add_parser(
        "list", help="list algorithms, models and data sets, or one algorithm's parameters"
    )
    listing.add_argument("algorithm", nargs="?", help="show this algorithm's parameters")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, text) in EXTRA_COMMANDS.items():
        if importlib.util.find_spec(module) is None:
            continue
        command = sub.add_parser(name, help=text, formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == chosen:
            importlib.import_module(module).add_arguments(command)
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
    "device": "cluster.device",
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
    from commsgd.algorithms import build_algorithm
    from commsgd.context import choose_device, node_layout
    from commsgd.optim import check_training_options
    from commsgd.tasks.models import check_model_fits
    from commsgd.train import ShardedBatches

    choose_device(cfg.cluster, 0)  # cuda asked for without a device, nccl without cuda
    if cfg.cluster.group_size is not None:
        node_layout(cfg.workers, cfg.cluster.group_size)
    check_model_fits(cfg.model, dataset.spec)
    ShardedBatches(len(dataset.train_y), cfg.data.batch_size, 0, cfg.workers, cfg.seed)  # batch vs shard
    check_training_options(cfg, build_algorithm(cfg.algorithm, cfg.algo))  # optim.name, precision, ...
    if cfg.tensorboard:
        from commsgd.tensorboard_log import require_tensorboard

        require_tensorboard()  # the optional package: one line here, not one traceback per worker


def resolve_train_config(args: argparse.Namespace) -> tuple[Any, Path, bool]:
    """Config, run directory and resume flag for `commsgd train`, all validated before any worker starts."""
    from commsgd.launch import launched_by_torchrun
    from commsgd.rundir import new_run_dir

    cfg = checked_train_config(args)
    resume = args.resume is not None
    if not resume and cfg.out is None and launched_by_torchrun():
        raise ConfigError("out: under torchrun every process must name the same run directory; pass --out")
    if cfg.out:
        run_dir = Path(cfg.out)
        check_fresh_out(run_dir, resume)
    else:  # checks done: a fresh directory no other run has (created now, so it stays unique)
        run_dir = new_run_dir(Path("runs"), cfg.algorithm)
    cfg.out = str(run_dir)
    return cfg, run_dir, resume


def checked_train_config(args: argparse.Namespace) -> Any:
    """The config `commsgd train` asks for, with every check that needs no run directory done
    (a resumed run's is its own, in `out`). Nothing is created."""
    from commsgd.algorithms import get_algorithm_class, validate_params
    from commsgd.config import load_config, read_yaml, shown
    from commsgd.launch import launched_by_torchrun
    from commsgd.rundir import path_problem
    from commsgd.tasks import DATASETS, MODELS, load_dataset
    from commsgd.tasks.user import is_user_spec

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
        if args.config and _names_own_run(base, Path(args.config)):
            del base["out"]  # where that run lives, not where this one goes: it gets its own
    requested = requested_config(base, args)
    if launched_by_torchrun():  # torchrun decides the world size (--workers is ignored under it)
        requested["workers"] = int(os.environ["WORLD_SIZE"])
    if resume:
        check_resume_matches(run_dir, base, requested)
    cfg = load_config(requested, validate_algorithm=validate_params)
    if resume:
        cfg.out = str(run_dir)
    if cfg.model not in MODELS and not is_user_spec(cfg.model):
        raise ConfigError(f"model: unknown name {cfg.model!r}; choose from {', '.join(MODELS)}")
    if cfg.data.dataset not in DATASETS and not is_user_spec(cfg.data.dataset):
        raise ConfigError(
            f"data.dataset: unknown name {cfg.data.dataset!r}; choose from {', '.join(DATASETS)}"
        )
    if get_algorithm_class(cfg.algorithm).single_worker and cfg.workers != 1:
        raise ConfigError(f"workers: algorithm {cfg.algorithm!r} runs on one worker; use --workers 1")
    dataset = load_dataset(cfg.data.dataset, cfg.data.data_dir, model=cfg.model, seed=cfg.seed)  # fail fast
    check_before_spawn(cfg, dataset)
    if resume:
        check_resume_checkpoint(run_dir, cfg, dataset.spec)
    return cfg


def _names_own_run(base: dict[str, Any], config_file: Path) -> bool:
    """Whether `base` is a run's saved config.yaml whose `out` is the directory holding it."""
    out = base.get("out")
    if not isinstance(out, str):
        return False
    try:
        return Path(out).resolve() == config_file.resolve().parent
    except (OSError, ValueError):  # a name the OS cannot hold: not this file's directory
        return False


def resolved_config_text(cfg: Any) -> str:
    """`cfg` as YAML with the values left to the workers filled in as they would be here:
    `steps` (when no budget is given), `cluster.group_size` and `cluster.threads`. `out` stays as
    given (empty: each run makes its own directory), so the text can be passed to `--config`."""
    import yaml

    from commsgd.config import DEFAULT_STEPS, to_dict
    from commsgd.launch import launched_by_torchrun
    from commsgd.train import worker_threads

    data = to_dict(cfg)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", cfg.workers)) if launched_by_torchrun() else cfg.workers
    if cfg.steps is None and cfg.epochs is None:
        data["steps"] = DEFAULT_STEPS
    data["cluster"]["group_size"] = cfg.cluster.group_size or local
    data["cluster"]["threads"] = worker_threads(cfg, local)
    return str(yaml.safe_dump(data, sort_keys=False))


def cmd_train(args: argparse.Namespace) -> int:
    from commsgd.config import save_config, to_dict
    from commsgd.launch import launch_local, launched_by_torchrun, worker_entry, worker_server

    if args.print_config:  # checked as for a run, but nothing is created or started
        print(resolved_config_text(checked_train_config(args)), end="")
        return 0
    if not launched_by_torchrun():
        with worker_server():  # the workers' imports, done beside the checks
            cfg, run_dir, resume = resolve_train_config(args)
            with claim_run_dir(run_dir, resume):  # held by this launcher for the whole run and restarts
                if not resume:
                    save_config(cfg, run_dir / "config.yaml")
                return launch_local(cfg, run_dir, resume)
    cfg, run_dir, resume = resolve_train_config(args)  # under torchrun: this process is a worker
    cfg.workers = int(os.environ["WORLD_SIZE"])
    if int(os.environ["RANK"]) != 0:  # cannot pass process-group setup before rank 0 holds the lock
        worker_entry(to_dict(cfg), str(run_dir), resume)
        return 0
    with claim_run_dir(run_dir, resume):
        if not resume:  # a resumed run's config is rewritten by rank 0 once its checkpoint loaded
            save_config(cfg, run_dir / "config.yaml")
        worker_entry(to_dict(cfg), str(run_dir), resume)
    return 0


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, resume: bool) -> Iterator[None]:
    """Hold the run directory's lock (see `commsgd.rundir`); checked again under it, so that of two
    runs started together on one `--out` the second is refused, not merged into the first."""
    from commsgd.rundir import locked

    with locked(run_dir, "--resume" if resume else "out"):
        check_fresh_out(run_dir, resume)
        yield


def cmd_list(args: argparse.Namespace) -> int:
    """The catalogue, or with a name the parameters of that algorithm (`algo.*`)."""
    if args.algorithm is None:
        print(catalogue())
        return 0
    print(describe_algorithm(args.algorithm))
    return 0


def describe_algorithm(name: str) -> str:
    """Name, summary and one line per parameter (type, default, range, doc) of algorithm `name`.

    An unknown name is refused from the torch-free catalogue, with the nearest name, before the
    registry (and torch) is imported."""
    import difflib

    from commsgd import catalogue
    from commsgd.config import describe_fields, shown

    if name not in catalogue.ALGORITHMS:
        near = difflib.get_close_matches(name, list(catalogue.ALGORITHMS), n=1, cutoff=0.6)
        hint = f"did you mean {near[0]}? " if near else ""
        raise ConfigError(f"list: unknown algorithm {shown(name)}; {hint}see `commsgd list`")
    from commsgd.algorithms import get_algorithm_class

    cls = get_algorithm_class(name)
    rows = describe_fields(cls.Params)
    lines = [f"{name}: {cls.summary_line}", ""]
    if not rows:
        lines.append("no parameters of its own")
    else:
        lines.append("parameters (algo.NAME=VALUE, or under `algo:` in a config file):")
    for field_name, type_name, default, allowed, doc in rows:
        lines.append(f"  {field_name}: {type_name} = {default!r}" + (f"  ({allowed})" if allowed else ""))
        if doc:
            lines.append(f"      {doc}")
    return "\n".join(lines)


def split_leftovers(parser: ArgumentParser, args: argparse.Namespace, leftovers: Sequence[str]) -> None:
    """Put the key=value words argparse left over into `args.overrides`; refuse anything else.

    Overrides may stand anywhere among the flags. An unknown flag or word gets one line with the
    nearest flag or config key (``--lr 0.05`` -> ``optim.lr=0.05``) where there is one."""
    args.overrides = []
    words = list(leftovers)
    if args.command in ("train", "sweep"):
        args.overrides = [w for w in words if "=" in w and not w.startswith("-")]
        words = [w for w in words if w not in args.overrides]
    if not words:
        return
    hint = suggest_for(words) if args.command == "train" else ""
    parser.error(f"unrecognized arguments: {' '.join(words)}{hint}")


def suggest_for(words: Sequence[str]) -> str:
    """'; did you mean ...?' for the first of the unknown `words`, or ''."""
    import difflib

    from commsgd.config import Config, field_keys, near_keys

    word = words[0]
    name, _, value = word.lstrip("-").partition("=")
    if not value and word.startswith("-") and len(words) > 1 and not words[1].startswith("-"):
        value = words[1]  # `--lr 0.05`
    flags = [*sorted(attr.replace("_", "-") for attr in FLAG_KEYS), "config", "resume", "print-config"]
    if word.startswith("-"):
        close = difflib.get_close_matches(name.replace("_", "-"), flags, n=1, cutoff=0.75)
        if close:
            return f"; did you mean --{close[0]}?"
    near = near_keys(name.replace("-", "_"), field_keys(Config))
    if near is None:
        return ""
    return f"; did you mean {near}={value or '...'}?"


def parse_command_line(words: Sequence[str]) -> tuple[ArgumentParser, argparse.Namespace]:
    """The parser and the parsed `words` (``train --workers 2 optim.lr=0.1 ...``): flags by argparse,
    key=value overrides from what it leaves over, anywhere among the flags. The one way commands
    are read, by `main` and by the commands that build `commsgd train` runs (sweep, bench)."""
    parser = build_parser(words)
    args, leftovers = parser.parse_known_args(words)
    split_leftovers(parser, args, leftovers)
    return parser, args


def main(argv: Sequence[str] | None = None) -> int:
    parser, args = parse_command_line(list(sys.argv[1:] if argv is None else argv))
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


_interrupted = False


def _on_sigint(signum: int, frame: Any) -> None:
    """Python's own Ctrl-C (KeyboardInterrupt), remembered: an interrupt that lands inside an import
    of a C extension (numpy's, under torch) can surface as an ImportError instead."""
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def run() -> None:
    """The `commsgd` program: `main()` on the command line, then exit without torch's teardown."""
    import signal

    from commsgd.fastexit import exit_program
    from commsgd.startup import note_program_start

    note_program_start()  # the start-up the user waits for counts from here (the final table shows it)
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        code = main()
    except BrokenPipeError:  # `commsgd list | head`: the reader left; Python's documented recipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    except Exception:
        if not _interrupted:
            raise
        print("commsgd: interrupted", file=sys.stderr)  # what Ctrl-C turned into, not a crash
        code = 130
    exit_program(code)


if __name__ == "__main__":
    run()

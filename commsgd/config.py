"""Typed run configuration: dataclasses loaded from YAML, overridden by flags, validated field by field.

Every problem is reported as one `ConfigError` line that names the field (``optim.lr``) and what is
allowed, so the CLI can print it and exit with code 2. The same converter validates each algorithm's
own parameter dataclass, so algorithms declare their hyperparameters once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from commsgd.errors import ConfigError
from commsgd.files import write_atomically

T = TypeVar("T")


def bounded(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    doc: str = "",
) -> Any:
    """A dataclass field with a numeric range that `from_dict` enforces."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "doc": doc}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    """Which data set each worker reads and how much of it per step."""

    dataset: str = "digits"
    data_dir: str | None = None
    batch_size: int = bounded(32, ge=1, doc="mini-batch per worker")
    test_samples: int | None = bounded(
        None, ge=1, doc="evaluate on this many test samples, drawn once by the seed (default: all)"
    )

    def validate(self) -> None:
        check_path_text(self.data_dir, "data.data_dir")


@dataclass
class OptimConfig:
    """Local optimizer (torch SGD or AdamW), its learning-rate schedule, clipping and accumulation.

    See docs/training.md; `commsgd.optim` builds the optimizer and computes the schedule."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = bounded(0.05, gt=0)
    momentum: float = bounded(0.9, ge=0, lt=1, doc="sgd only")
    nesterov: bool = False
    weight_decay: float = bounded(1e-4, ge=0, doc="sgd: L2 in the gradient; adamw: decoupled")
    betas: list[float] = bounded([0.9, 0.999], ge=0, lt=1, doc="adamw only: (beta1, beta2)")
    eps: float = bounded(1e-8, gt=0, doc="adamw only")
    schedule: Literal["constant", "step", "cosine"] = "constant"
    warmup_steps: int = bounded(0, ge=0, doc="linear warm-up from lr/warmup_steps to lr (any schedule)")
    min_lr: float = bounded(0.0, ge=0, doc="cosine: the rate at the end of the run")
    clip_norm: float | None = bounded(
        None, gt=0, doc="clip the gradient's global norm to this, after communication, before the step"
    )
    accumulate: int = bounded(1, ge=1, le=65536, doc="micro-batches per step (data.batch_size each)")
    drop_steps: list[int] = bounded([], doc="steps at which lr is multiplied by drop_factor")
    drop_seconds: list[float] = bounded(
        [], doc="wall-clock seconds at which lr drops, by rank 0's clock every 10 steps (paper: 1500)"
    )
    drop_factor: float = bounded(0.1, gt=0, le=1)

    def validate(self) -> None:
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas: two numbers (beta1, beta2) are needed, got {self.betas}")
        if self.schedule == "cosine" and (self.drop_steps or self.drop_seconds):
            raise ConfigError(
                "optim.drop_steps, optim.drop_seconds: drops are for schedule=step; cosine decays by itself"
            )
        if self.name == "adamw" and self.nesterov:
            raise ConfigError("optim.nesterov: is SGD's; adamw has its own momentum (optim.betas)")
        if self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr: must be <= optim.lr ({self.lr:g}), got {self.min_lr:g}")


@dataclass
class NetworkConfig:
    """Optional network model: a delay computed from the bytes over each op's busiest link, per link class.

    Emulates e.g. 1 Gbit/s Ethernet between nodes on one machine. Off by default.
    """

    enabled: bool = False
    intra_gbps: float = bounded(100.0, ge=1e-6, doc="bandwidth within a node, Gbit/s")
    intra_latency_us: float = bounded(5.0, ge=0, le=1e7)
    inter_gbps: float = bounded(1.0, ge=1e-6, doc="bandwidth across nodes, Gbit/s")
    inter_latency_us: float = bounded(50.0, ge=0, le=1e7)


@dataclass
class ClusterConfig:
    """How workers are placed, grouped into nodes, slowed down and timed out."""

    group_size: int | None = bounded(None, ge=1, doc="workers per emulated node (default: LOCAL_WORLD_SIZE)")
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = bounded(
        None, ge=1, le=4096, doc="torch threads per worker (default: cores / workers)"
    )
    timeout_s: float = bounded(
        300.0, gt=0, le=7 * 86400, doc="a collective, round or dead peer waiting longer than this fails"
    )
    max_restarts: int = bounded(
        0, ge=0, le=1000, doc="restarts of the worker group from the last checkpoint after a failure"
    )
    slow_ranks: list[int] = bounded([], doc="ranks that are slowed down")
    slow_factor: float = bounded(
        1.0, ge=1, le=1e6, doc="slowed ranks take this many times their compute time"
    )
    slow_sleep_s: float = bounded(0.0, ge=0, le=86400, doc="extra sleep per step on slowed ranks")
    split_wait: bool = False
    reuse_memory: bool = bounded(
        True, doc="keep freed host memory for the next step (no page faults for model-sized temporaries)"
    )


@dataclass
class Config:
    """One training run. YAML sections map to the nested dataclasses; `algo` to the algorithm's params."""

    algorithm: str = "allreduce"
    algo: dict[str, Any] = bounded({}, doc="parameters of the chosen algorithm")
    workers: int = bounded(4, ge=1, le=1024)
    model: str = "mlp"
    steps: int | None = bounded(None, ge=1)
    epochs: int | None = bounded(None, ge=1)
    max_seconds: float | None = bounded(
        None,
        gt=0,
        le=10**7,
        doc="end training after this many seconds (rank 0's clock), at a step all workers agree on",
    )
    seed: int = bounded(0, ge=0, le=2**32 - 1)
    out: str | None = None
    eval_every: int = bounded(100, ge=1, doc="evaluate the center variable every N steps and at the end")
    checkpoint_every: int = bounded(
        500, ge=0, doc="save every N steps (0: only the final one); a signal saves where it stops"
    )
    keep_checkpoints: int = bounded(3, ge=1)
    nonfinite: Literal["skip", "stop"] = "skip"
    max_bad_steps: int = bounded(
        5, ge=1, doc="nonfinite=skip: stop after this many consecutive non-finite steps on a worker"
    )
    log_every: int = bounded(1, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = bounded(
        "fp32", doc="autocast for forward passes; fp16 with a loss scaler whose skips all workers agree"
    )
    progress: bool = bounded(True, doc="rank 0 shows progress: a bar on a terminal, else plain lines")
    progress_every: int = bounded(
        0, ge=0, doc="not a terminal: a progress line every N steps (0: every 10 % of the steps)"
    )
    progress_every_s: float = bounded(
        30.0, gt=0, le=86400, doc="not a terminal: a progress line at least this often (seconds)"
    )
    tensorboard: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def validate(self) -> None:
        check_path_text(self.out, "out")


DEFAULT_STEPS = 600
#: a config (after YAML aliases are expanded) with more values than this is refused, not expanded
MAX_CONFIG_NODES = 100_000
#: integers with more decimal digits are refused: Python will not turn them into text (or back) by
#: default, and no field needs them
MAX_INT_DIGITS = 4300
_INT_LIMIT = 10**MAX_INT_DIGITS
_HUGE_INT = f"an integer of more than {MAX_INT_DIGITS} digits; no field takes one"
_TOO_MANY_DIGITS = "for integer string conversion"  # in Python's ValueError for such an integer


def shown(text: Any) -> str:
    """`text` as it can appear inside a one-line message: as is when printable, else its repr."""
    s = str(text)
    return s if s.isprintable() and s.strip() == s and s else repr(s)


def check_path_text(value: str | None, where: str) -> None:
    """A path field must not hold NUL or other control characters (no OS takes them; messages break)."""
    if value is not None and any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ConfigError(f"{where}: a path without control characters is needed, got {value!r}")


# --------------------------------------------------------------------------------------- converter


_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widened to float where asked)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        if not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where}: keys must be strings")
        return dict(value)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; everyone means a number
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            raise ConfigError(
                f"{where}: must be a finite number, got an integer of {len(str(value))} digits"
            ) from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def _check_range(value: Any, meta: Mapping[str, Any], where: str) -> None:
    items = value if isinstance(value, list) else [value]
    for v in items:
        if not isinstance(v, int | float) or isinstance(v, bool):
            continue
        for key, ok, text in (
            ("ge", lambda a, b: a >= b, ">="),
            ("gt", lambda a, b: a > b, ">"),
            ("le", lambda a, b: a <= b, "<="),
            ("lt", lambda a, b: a < b, "<"),
        ):
            bound = meta.get(key)
            if bound is not None and not ok(v, bound):
                raise ConfigError(f"{where}: must be {text} {bound}, got {v!r}")


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from a plain mapping, rejecting unknown keys, wrong types and bad ranges."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    prefix = f"{where}." if where else ""
    unknown = [k for k in data if k not in fields]
    if unknown:
        near = near_keys(str(unknown[0]), field_keys(cls))
        hint = f"did you mean {prefix}{near}? " if near else ""
        if near == unknown[0]:  # `optim.lr:` as one YAML key
            hint = "in a YAML file, a dotted key is written as nested sections; "
        raise ConfigError(
            f"{prefix}{shown(unknown[0])}: unknown field; {hint}allowed: {', '.join(sorted(fields))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        path = f"{prefix}{name}"
        converted = _convert(value, hints[name], path)
        _check_range(converted, fields[name].metadata, path)
        kwargs[name] = converted
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        check()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-data copy of a config dataclass (what gets saved as YAML)."""
    return dataclasses.asdict(obj)


def describe_fields(cls: type[Any]) -> list[tuple[str, str, Any, str, str]]:
    """(name, type, default, allowed range, doc) per field, for `commsgd list ALGORITHM`."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        bounds = [(key, f.metadata.get(key)) for key in ("ge", "gt", "le", "lt")]
        allowed = ", ".join(f"{_RANGE_TEXT[k]} {b:g}" for k, b in bounds if isinstance(b, int | float))
        rows.append((f.name, _type_name(hints[f.name]), default, allowed, f.metadata.get("doc", "")))
    return rows


_RANGE_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def field_keys(cls: type[Any], prefix: str = "") -> list[str]:
    """The dotted name of every field of dataclass `cls`, its sections expanded (``optim.lr``)."""
    hints = typing.get_type_hints(cls)
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            keys += field_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def near_keys(name: str, keys: Sequence[str]) -> str | None:
    """The key of `keys` that `name` most likely meant: the same field in a section (``lr`` ->
    ``optim.lr``), else the closest spelling of the whole key or of its last part; None if none is close."""
    import difflib

    leaf = name.rsplit(".", 1)[-1]
    same = [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k != name]
    if same:
        return same[0]
    close = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
    if close:
        return close[0]
    leaves = {k.rsplit(".", 1)[-1]: k for k in reversed(keys)}
    close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
    return leaves[close[0]] if close else None


# --------------------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``optim.lr=0.1`` into (["optim", "lr"], 0.1); the value is read as a YAML scalar/list."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. optim.lr=0.1")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(p.isidentifier() for p in parts):
        raise ConfigError(f"override {text!r}: {key!r} is not a dotted field name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    except ValueError as exc:  # a scalar YAML recognises but Python cannot build
        if _TOO_MANY_DIGITS in str(exc):
            raise ConfigError(f"{'.'.join(parts)}: {_HUGE_INT}") from None
        value = raw  # e.g. the date 2001-13-45: taken as the text it is
    return parts, plain_tree(value, ".".join(parts))


def apply_override(data: dict[str, Any], parts: Sequence[str], value: Any) -> None:
    """Set a dotted key inside a nested plain dict, creating sections as needed."""
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is not a section, cannot set {'.'.join(parts)}")
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader; any problem is one ConfigError line."""
    p = Path(path)
    if not p.is_file():  # False (not an error) for names the OS cannot hold, e.g. with NUL
        raise ConfigError(f"config file {shown(p)}: not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as exc:  # a syntax error: say where, as an editor counts
        mark = exc.problem_mark or exc.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = exc.problem or exc.context or type(exc).__name__
        raise ConfigError(f"config file {shown(p)}{where}: not valid YAML ({what.strip()})") from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config file {shown(p)}: not valid YAML ({first})") from None
    except ValueError as exc:  # a scalar YAML recognises but Python cannot build (huge int, bad date)
        if _TOO_MANY_DIGITS in str(exc):
            raise ConfigError(f"config file {shown(p)}{_huge_int_line(p)}: {_HUGE_INT}") from None
        reason = str(exc).strip()[:200]
        raise ConfigError(f"config file {shown(p)}: a value Python cannot build ({reason})") from None
    except OSError as exc:
        raise ConfigError(f"config file {shown(p)}: cannot be read ({exc.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {shown(p)}: top level must be a mapping of fields")
    return plain_tree(data, "config")


def _huge_int_line(path: Path) -> str:
    """', line N' of the first integer with too many digits in a YAML file ('' if none is found)."""
    with contextlib.suppress(yaml.YAMLError, RecursionError, OSError, UnicodeDecodeError):
        todo = [yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)]
        while todo:
            node = todo.pop(0)
            if isinstance(node, yaml.ScalarNode):
                digits = node.value.lstrip("+-").replace("_", "")
                if node.tag.endswith(":int") and len(digits) > MAX_INT_DIGITS:
                    return f", line {node.start_mark.line + 1}"
            elif isinstance(node, yaml.SequenceNode):
                todo.extend(node.value)
            elif isinstance(node, yaml.MappingNode):
                todo.extend(v for pair in node.value for v in pair)
    return ""


AlgoValidator = Callable[[str, dict[str, Any]], dict[str, Any]]


def load_config(
    base: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    *,
    validate_algorithm: AlgoValidator | None = None,
) -> Config:
    """Merge a plain mapping (from YAML) with ``key=value`` overrides and validate everything.

    `validate_algorithm(name, params)` checks the algorithm name and its parameters and returns them
    with defaults filled in; the algorithm registry provides it (kept out of here to avoid an import cycle).
    """
    data: dict[str, Any] = plain_tree(dict(base or {}), "config")
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(data, parts, value)
    cfg = from_dict(Config, data)
    if cfg.steps is not None and cfg.epochs is not None:
        raise ConfigError("steps, epochs: give one of them, not both")
    if validate_algorithm is not None:
        cfg.algo = validate_algorithm(cfg.algorithm, cfg.algo)
    return cfg


def plain_tree(data: Any, where: str) -> Any:
    """A fresh copy of nested dicts and lists (tuples become lists).

    YAML anchors and aliases can make a small document a cycle or an exponentially large tree once
    expanded: both are refused with a ConfigError instead of recursing or expanding without bound.
    """
    budget = [MAX_CONFIG_NODES]
    open_ids: set[int] = set()

    def copy(node: Any, path: str) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise ConfigError(f"{where}: more than {MAX_CONFIG_NODES} values once YAML aliases are expanded")
        if isinstance(node, int) and not -_INT_LIMIT < node < _INT_LIMIT:
            raise ConfigError(f"{path}: {_HUGE_INT}")  # e.g. YAML hex, which has no digit limit
        if not isinstance(node, dict | list | tuple):
            return node
        if id(node) in open_ids:
            raise ConfigError(f"{where}: a value contains itself (recursive YAML alias)")
        if len(open_ids) > 100:
            raise ConfigError(f"{where}: nested more than 100 levels deep")
        open_ids.add(id(node))
        try:
            if isinstance(node, dict):
                prefix = "" if path == "config" else f"{path}."
                return {k: copy(v, f"{prefix}{k}") for k, v in node.items()}
            return [copy(v, f"{path}[{i}]") for i, v in enumerate(node)]
        finally:
            open_ids.discard(id(node))

    return copy(data, where)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (the run directory's record of what ran), atomically."""
    text: str = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    data = text.encode("utf-8")
    write_atomically(Path(path), lambda handle: handle.write(data), mode=0o644)

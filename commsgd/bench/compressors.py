"""compressors: compress + decompress throughput (GB/s of float32 input) of every compressor.

Runs `benchmarks/compressors.py` (its `main`, with ``--out``) from the repository checkout; the
table is that script's output.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import time
from pathlib import Path
from types import ModuleType

from commsgd.bench.common import BenchEnv, write_result

TITLE = "compress + decompress throughput per compressor (GB/s), via benchmarks/compressors.py"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--script", help="path of benchmarks/compressors.py (default: found from the checkout)"
    )


def find_script(explicit: str | None = None) -> Path | None:
    """benchmarks/compressors.py next to this package's checkout, or in the current directory."""
    candidates = [Path(explicit)] if explicit else []
    candidates += [
        Path(__file__).resolve().parents[2] / "benchmarks" / "compressors.py",
        Path.cwd() / "benchmarks" / "compressors.py",
    ]
    return next((c for c in candidates if c.is_file()), None)


def load_script(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("commsgd_benchmarks_compressors", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(env: BenchEnv, args: argparse.Namespace) -> str:
    start = time.perf_counter()
    script = find_script(args.script)
    module = load_script(script) if script is not None else None
    if script is None or module is None or not hasattr(module, "main"):
        body = "Not available: benchmarks/compressors.py (with a `main(argv)`) is not in this checkout."
        env.note("compressors: benchmarks/compressors.py not found; skipped")
        write_result(env, "compressors", "Compressor throughput", body, {"available": False})
        return "not available (benchmarks/compressors.py missing)"
    table_file = env.out / "runs" / "compressors" / "table.md"
    table_file.parent.mkdir(parents=True, exist_ok=True)
    argv = ["--out", str(table_file)]
    if env.quick:
        argv += ["--numel", "65536", "--repeat", "3"]
    env.log(f"compressors: python {script.name} {' '.join(argv)}")
    with contextlib.redirect_stdout(io.StringIO()):
        module.main(argv)
    table = table_file.read_text(encoding="utf-8")
    rows = _parse(table)
    body = f"Made by `python benchmarks/compressors.py {' '.join(argv[2:])}` (one CPU thread).\n\n{table}"
    write_result(
        env, "compressors", "Compressor throughput", body, {"rows": rows}, time.perf_counter() - start
    )
    speeds: list[tuple[str, float]] = []
    for r in rows:
        value = _float(r.get("GB/s", ""))
        if value is not None:
            speeds.append((r.get("compressor", "?"), value))
    if not speeds:
        return f"{len(rows)} rows"
    slow, fast = min(speeds, key=lambda s: s[1]), max(speeds, key=lambda s: s[1])
    return f"{len(rows)} rows; slowest {slow[0]} {slow[1]:.2f} GB/s, fastest {fast[0]} {fast[1]:.2f} GB/s"


def _float(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _parse(table: str) -> list[dict[str, str]]:
    """Rows of the first Markdown table in `table` as dicts keyed by its header."""
    lines = [ln.strip() for ln in table.splitlines() if ln.strip().startswith("|")]
    if len(lines) < 2:
        return []
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]

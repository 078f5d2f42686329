"""Compress + decompress throughput of every compressor, in GB/s of float32 input.

    python benchmarks/compressors.py [--numel N ...] [--repeat R] [--threads 1] [--out FILE.md]

Defaults: a ResNet20-sized vector (269,722 elements) and a 4M one, one CPU thread. Each phase is timed
over `--repeat` calls after two warm-up calls; the table gives the medians and, for busy machines, the
throughput of the fastest calls. powersgd needs a matrix, so it gets the vector cut to 256 rows (numel
rounded down to a multiple of 256) and keeps its warm start across calls. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from commsgd.compression import COMPRESSORS, get

RESNET20_NUMEL = 269_722
MATRIX_ROWS = 256


def wall_times(fn: Callable[[], object], repeat: int) -> list[float]:
    """Wall time of each of `repeat` calls of `fn`, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_one(name: str, numel: int, repeat: int) -> list[str]:
    """One table row: compressor, shape, wire size, ratio, median compress and decompress ms, GB/s."""
    compressor = get(name)
    shape = (MATRIX_ROWS, numel // MATRIX_ROWS) if name == "powersgd" else (numel,)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    payload = compressor.compress(x, generator=generator)
    t_compress = wall_times(lambda: compressor.compress(x, generator=generator), repeat)
    t_decompress = wall_times(lambda: compressor.decompress(payload), repeat)
    input_bytes = 4 * x.numel()
    median = statistics.median(t_compress) + statistics.median(t_decompress)
    best = min(t_compress) + min(t_decompress)
    return [
        name,
        "x".join(map(str, shape)),
        f"{payload.nbytes:,}",
        f"{input_bytes / payload.nbytes:.1f}",
        f"{statistics.median(t_compress) * 1e3:.3f}",
        f"{statistics.median(t_decompress) * 1e3:.3f}",
        f"{input_bytes / median / 1e9:.2f}",
        f"{input_bytes / best / 1e9:.2f}",
    ]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, nargs="+", default=[RESNET20_NUMEL, 4 * 2**20])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compressors", nargs="+", default=list(COMPRESSORS), choices=COMPRESSORS)
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    rows = [bench_one(name, numel, args.repeat) for numel in args.numel for name in args.compressors]
    header = [
        "compressor",
        "shape",
        "wire bytes",
        "ratio",
        "compress ms",
        "decompress ms",
        "GB/s",
        "best GB/s",
    ]
    text = (
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.machine()}, "
        f"{args.repeat} timed calls each; ms and GB/s from medians, best GB/s from the fastest calls; "
        "GB/s = float32 input bytes / (compress + decompress time)\n\n" + markdown_table(header, rows)
    )
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

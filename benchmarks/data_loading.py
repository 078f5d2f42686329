"""Image-folder data: cold decode, warm start, augmentation cost and the data share of training steps.

    python benchmarks/data_loading.py --data-dir ../shared/data/cifar10-jpeg [--workers 4] [--steps 40]
        [--batch-size 32] [--model cnn7] [--no-cold] [--out FILE.md]

1. cold: decode the whole folder into a fresh cache directory (a process per core), timed;
2. warm: a new process loads the same folder from the cache (scan, fingerprint, memory-map), timed;
3. augmentation: milliseconds per `train_batch` (gather + crop + flip + normalise), median of 50;
4. training: `commsgd train` with `--workers` workers for `--steps` steps on the cached folder; the
   summary's data share (time drawing and augmenting batches / step time) of each worker.
Without --no-cold the cache directory is a new temporary one (removed at the end); with it, the
usual cache directory is used (warm if an earlier run decoded the folder). Prints a Markdown report.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from commsgd.bench.common import machine
from commsgd.files import write_atomically

WARM_START = """
import sys, time
start = time.perf_counter()
from commsgd.tasks import load_dataset
imported = time.perf_counter()
data = load_dataset("imagefolder", sys.argv[1], model=sys.argv[2], seed=0)
print(imported - start, time.perf_counter() - imported, data.num_train, data.num_test)
"""


def augmentation_ms(data_dir: str, model: str, batch: int, repeat: int = 50) -> float:
    """Median milliseconds of one `train_batch` of `batch` random samples (one thread, like a worker)."""
    from commsgd.tasks import load_dataset

    data = load_dataset("imagefolder", data_dir, model=model, seed=0)
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(repeat):
        indices = torch.randint(0, data.num_train, (batch,), generator=generator)
        start = time.perf_counter()
        data.train_batch(indices, generator)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--model", default="cnn7")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-cold", action="store_true", help="skip the cold decode; use the usual cache")
    parser.add_argument("--out", help="also write the report to this Markdown file")
    args = parser.parse_args()
    command = "python benchmarks/data_loading.py " + " ".join(sys.argv[1:])
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="commsgd-bench-data-") as scratch:
        env = dict(os.environ)
        if not args.no_cold:
            env["COMMSGD_CACHE_DIR"] = os.environ["COMMSGD_CACHE_DIR"] = str(Path(scratch) / "cache")
            from commsgd.tasks import load_dataset
            from commsgd.tasks.decode import usable_cores

            start = time.perf_counter()
            data = load_dataset("imagefolder", args.data_dir, model=args.model, seed=0)
            cold = time.perf_counter() - start
            count = data.num_train + data.num_test
            rows.append(
                (
                    "cold decode (scan, decode, write cache)",
                    f"{cold:.1f} s for {count:,} images on {usable_cores()} cores "
                    f"({1e6 * cold / count:.0f} µs per image)",
                )
            )
        done = subprocess.run(
            [sys.executable, "-c", WARM_START, args.data_dir, args.model],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        imported, warm, n_train, n_test = done.stdout.split()[-4:]
        rows.append(
            (
                "warm start in a new process (from the cache)",
                f"{float(warm):.2f} s load ({n_train} train + {n_test} test images), after "
                f"{float(imported):.2f} s importing commsgd",
            )
        )
        torch.set_num_threads(1)
        for batch in sorted({args.batch_size, 128}):
            ms = augmentation_ms(args.data_dir, args.model, batch)
            rows.append((f"train_batch of {batch} ({args.model} preprocessing)", f"{ms:.2f} ms"))
        out = Path(scratch) / "run"
        train = [
            sys.executable, "-m", "commsgd", "train", "--dataset", "imagefolder", "--data-dir", args.data_dir,
            "--model", args.model, "--workers", str(args.workers), "--steps", str(args.steps),
            "--out", str(out), f"data.batch_size={args.batch_size}", "progress=false",
        ]  # fmt: skip
        subprocess.run(train, env=env, check=True, stdout=subprocess.DEVNULL)
        summary = json.loads((out / "summary.json").read_text())
    shares = summary["data_share"]
    step_s = [
        c + m + w
        for c, m, w in zip(summary["compute_time_s"], summary["comm_time_s"], summary["wait_time_s"])
    ]
    rows.append(
        (
            f"data share of step time, {args.model}, {args.workers} workers, batch {args.batch_size}",
            f"{100 * statistics.mean(shares):.2f} % mean, {100 * max(shares):.2f} % max over workers "
            f"(data {statistics.mean(summary['data_time_s']):.2f} s of {statistics.mean(step_s):.1f} s "
            f"step time in {args.steps} steps)",
        )
    )
    report = "\n".join(
        [
            "# Image-folder data loading",
            "",
            f"- command: `{command}`",
            f"- machine: {machine()}; load average {os.getloadavg()[0]:.1f} when written",
            f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
            f"- data: {args.data_dir}",
            "",
            "| what | measured |",
            "| --- | --- |",
            *[f"| {what} | {value} |" for what, value in rows],
            "",
        ]
    )
    print(report)
    if args.out:
        write_atomically(Path(args.out), lambda handle: handle.write(report.encode()), mode=0o644)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

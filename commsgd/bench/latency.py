"""The latency of one small all-reduce across a job, through commsgd's communication layer.

    python -m torch.distributed.run ... -m commsgd.bench.latency OUT.json [COUNT]

Run by `commsgd bench limit` on every node of the emulated cluster: each worker all-reduces one float
COUNT times (after 20 untimed ones); rank 0 writes the median seconds per all-reduce to OUT.json. It is
the "per-collective latency" of the physical limit: what a collective costs when it carries no bytes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    import torch

    import commsgd
    from commsgd.metrics import write_json_atomic

    out, count = Path(argv[0]), int(argv[1]) if len(argv) > 1 else 200
    ctx = commsgd.init()
    tensor = torch.zeros(1)
    times = []
    for i in range(20 + count):
        start = time.perf_counter()
        ctx.comm.all_reduce(tensor)
        if i >= 20:
            times.append(time.perf_counter() - start)
    times.sort()
    if ctx.rank == 0:
        write_json_atomic(
            out, {"all_reduce_s": times[len(times) // 2], "count": count, "world_size": ctx.world_size}
        )
    ctx.comm.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

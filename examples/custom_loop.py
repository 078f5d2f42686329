"""Your own PyTorch training loop with a commsgd algorithm: the only new lines are marked  # commsgd.

Run on one machine with two workers:
    torchrun --nproc-per-node 2 examples/custom_loop.py --algorithm allreduce --steps 200
Every registered algorithm works (`commsgd list`), e.g. --algorithm lsgd, easgd, powersgd, quantimed,
downpour. The step takes a `next_batch` callable rather than a ready loss, so that algorithms which draw
their own mini-batches (quantimed draws until a deadline) can call it as often as they need; the others
call it once per step.

With a parameter server (downpour, easgd mode=async-server) rank 0 is a worker too, but its own pushes
reach the server in memory: its line shows nothing sent as a worker, and says what the server thread
on rank 0 sent and received while it served the other workers.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import commsgd
from commsgd.config import OptimConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--algorithm", default="allreduce")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)

    ctx = commsgd.init()  # commsgd: join the job torchrun started
    torch.manual_seed(0)
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32) / 16.0
    y = torch.tensor(labels)
    train_x, train_y, test_x, test_y = x[:1500], y[:1500], x[1500:], y[1500:]
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    algorithm = commsgd.build_algorithm(args.algorithm)  # commsgd
    # commsgd: the local SGD with the algorithm's overrides (compressed ones apply momentum themselves)
    local = OptimConfig(lr=0.05, momentum=0.9, weight_decay=0.0)
    settings: dict[str, Any] = {"lr": local.lr, "momentum": local.momentum, "weight_decay": 0.0}
    settings.update(algorithm.optimizer_overrides(local))
    sgd = torch.optim.SGD(model.parameters(), **settings)
    optimizer = commsgd.CommOptimizer(sgd, algorithm, model, ctx)  # commsgd: wrap the optimizer

    generator = torch.Generator().manual_seed(ctx.rank)  # each worker draws its own batches

    def next_batch() -> commsgd.MiniBatch:
        """This worker's next mini-batch and its loss (the forward pass runs when the step calls it)."""
        batch = torch.randint(0, len(train_y), (32,), generator=generator)
        bx, by = train_x[batch], train_y[batch]
        return commsgd.MiniBatch(lambda: F.cross_entropy(model(bx), by), len(by))

    for _ in range(args.steps):
        optimizer.step(next_batch=next_batch)  # commsgd: backward and communication happen inside

    algorithm.finish()  # commsgd: drain pending rounds, stop the parameter server
    with optimizer.evaluated_parameters():  # commsgd: evaluate the center variable
        error = (model(test_x).argmax(1) != test_y).float().mean().item()
    sent = ctx.comm.meter.totals().bytes_sent
    line = f"rank {ctx.rank}: {args.algorithm} test error {100 * error:.1f} %, sent {sent / 1e6:.2f} MB"
    server = algorithm.summary().get("server")  # commsgd: rank 0 of a parameter-server algorithm
    if server is not None and "bytes_sent" in server:
        line += (
            " as a worker (its pushes reach its own server in memory); its parameter server sent "
            f"{server['bytes_sent'] / 1e6:.2f} MB, received {server['bytes_recv'] / 1e6:.2f} MB "
            f"and applied {sum(server['pushes_applied'])} pushes"
        )
    sys.stdout.write(line + "\n")  # one write, so the ranks' lines do not interleave
    sys.stdout.flush()
    ctx.close()


if __name__ == "__main__":
    main()

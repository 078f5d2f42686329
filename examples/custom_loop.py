"""Your own PyTorch training loop with a commsgd algorithm: the only new lines are marked  # commsgd.

Run on one machine with two workers:
    torchrun --nproc-per-node 2 examples/custom_loop.py --algorithm allreduce --steps 200
Any registered algorithm works (`commsgd list`), e.g. --algorithm lsgd, easgd, powersgd.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import commsgd


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--algorithm", default="allreduce")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    ctx = commsgd.init()  # commsgd: join the job torchrun started
    torch.manual_seed(0)
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32) / 16.0
    y = torch.tensor(labels)
    train_x, train_y, test_x, test_y = x[:1500], y[:1500], x[1500:], y[1500:]
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    algorithm = commsgd.build_algorithm(args.algorithm)  # commsgd
    optimizer = commsgd.CommOptimizer(optimizer, algorithm, model, ctx)  # commsgd: wrap the optimizer

    generator = torch.Generator().manual_seed(ctx.rank)  # each worker draws its own batches
    for _ in range(args.steps):
        batch = torch.randint(0, len(train_y), (32,), generator=generator)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(train_x[batch]), train_y[batch])
        loss.backward()
        optimizer.step(loss)  # commsgd: communication happens inside

    with optimizer.evaluated_parameters():  # commsgd: evaluate the center variable
        error = (model(test_x).argmax(1) != test_y).float().mean().item()
    sent = ctx.comm.meter.totals().bytes_sent
    line = f"rank {ctx.rank}: {args.algorithm} test error {100 * error:.1f} %, sent {sent / 1e6:.2f} MB\n"
    sys.stdout.write(line)  # one write per line, so the two ranks' lines do not interleave
    sys.stdout.flush()
    ctx.close()


if __name__ == "__main__":
    main()

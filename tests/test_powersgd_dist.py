"""The powersgd reducer: linearity (two workers = one worker with the mean gradient), the error-feedback
invariant, bytes per step (in the simulated world), and accuracy close to PyTorch's powerSGD_hook on DDP
after the same steps (gloo processes: DDP needs a real process group)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import commsgd
from commsgd.simworld import run_simulated
from commsgd.testing import SoloContext, run_distributed

SHAPES = [(16, 3, 3, 3), (16,), (10, 32), (10, 32), (6, 5), (3, 4), (7,)]
STEPS = 4


class _Params(nn.Module):
    """Tensors of mixed kinds: a conv kernel, two same-shape matrices, matrices too small to compress."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors = nn.ParameterList(nn.Parameter(torch.zeros(s)) for s in SHAPES)


def _gradient(step: int, rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(31 * step + rank)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _reduce(ctx: Any, gradients: Any, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the reducer for STEPS steps with the given gradients; results, errors and bytes per step."""
    model = _Params()
    algo = commsgd.build_algorithm("powersgd", params)
    algo.bind(ctx, model, torch.optim.SGD(model.parameters(), lr=0.1))
    out = []
    for step in range(1, STEPS + 1):
        for p, g in zip(model.parameters(), gradients(step)):
            p.grad = g.clone()
        error = algo.state_dict()["error"]
        before = ctx.comm.meter.totals().bytes_sent
        algo.after_backward(step)
        out.append(
            {
                "result": torch.cat([p.grad.reshape(-1) for p in model.parameters()]),
                "old_error": error,
                "error": algo.state_dict()["error"],
                "sent": ctx.comm.meter.totals().bytes_sent - before,
            }
        )
    return out


RANKS = (1, 2, 4)


def _two_workers() -> dict[int, list[dict[str, Any]]]:
    ctx = commsgd.init()
    return {r: _reduce(ctx, lambda step: _gradient(step, ctx.rank), _params(r)) for r in RANKS}


def _params(rank: int) -> dict[str, Any]:
    return {"rank": rank, "warmup_steps": 1}


def _mean_gradient(step: int) -> list[torch.Tensor]:
    return [(a + b) / 2 for a, b in zip(_gradient(step, 0), _gradient(step, 1))]


@pytest.fixture(scope="module")
def two_workers() -> list[dict[int, list[dict[str, Any]]]]:
    """Each rank's records for every tested rank r: one simulated world of two workers for the module."""
    return run_simulated(_two_workers, 2)


@pytest.mark.parametrize("rank", RANKS)
def test_two_workers_equal_one_worker_with_the_mean_gradient(
    two_workers: list[dict[int, list[dict[str, Any]]]], rank: int
) -> None:
    workers = [w[rank] for w in two_workers]
    single = _reduce(SoloContext(), _mean_gradient, _params(rank))
    for step in range(STEPS):
        a, b, ref = workers[0][step], workers[1][step], single[step]
        torch.testing.assert_close(a["result"], b["result"], rtol=0, atol=0)
        torch.testing.assert_close(a["result"], ref["result"], rtol=1e-4, atol=1e-5)
        # the workers' mean error is the one-worker error: the next steps stay equal too
        torch.testing.assert_close((a["error"] + b["error"]) / 2, ref["error"], rtol=1e-4, atol=1e-5)


def _gradient_numel(step: int) -> int:
    return sum(g.numel() for g in _gradient(step, 0))


def test_error_feedback_invariant_and_bytes(two_workers: list[dict[int, list[dict[str, Any]]]]) -> None:
    world, r = 2, 2
    workers = [w[r] for w in two_workers]
    # P: n*r per compressed matrix, Q: m*r; uncompressed: vectors and the 3x4 matrix (2*(3+4) >= 12)
    p_numel = 16 * r + 2 * 10 * r + 6 * r
    q_numel = 27 * r + 2 * 32 * r + 5 * r
    plain = 16 + 12 + 7
    ring = 2 * (world - 1) / world * 4
    for rank_steps in workers:
        assert rank_steps[0]["sent"] == pytest.approx(ring * _gradient_numel(1))  # warm-up: all-reduce
        for record in rank_steps[1:]:
            assert record["sent"] == pytest.approx(ring * (p_numel + q_numel + plain))
    mask = _matrix_mask()
    for step in range(1, STEPS):
        recs = [w[step] for w in workers]
        grads = [torch.cat([g.reshape(-1) for g in _gradient(step + 1, rank)]) for rank in range(world)]
        # on the compressed matrices: sum over workers of (gradient + old error) equals
        # sum of new errors + world * result (the mean of the workers' shares P Q_i^T)
        lhs = sum(rec["error"] for rec in recs) + world * recs[0]["result"][mask]
        rhs = sum(g[mask] for g in grads) + sum(rec["old_error"] for rec in recs)
        torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-5)


def _matrix_mask() -> torch.Tensor:
    """Flat positions of the compressed matrices in the gradient, in the reducer's buffer order:
    the (16, 27) kernel, the two (10, 32) matrices, the (6, 5) one."""
    starts = [0]
    for s in SHAPES:
        starts.append(starts[-1] + torch.Size(s).numel())
    return torch.cat([torch.arange(starts[i], starts[i + 1]) for i in (0, 2, 3, 4)])


# --------------------------------------------------------------------------- against powerSGD_hook


def _train_both(steps: int, rank: int) -> dict[str, tuple[float, float]]:
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook

    from commsgd.tasks import build_model, load_dataset, loss_and_errors

    ctx = commsgd.init()
    data = load_dataset("digits", None, model="mlp", seed=0)
    results = {}
    for which in ("commsgd", "hook"):
        torch.manual_seed(0)
        model = build_model("mlp", data.spec)
        net: nn.Module = model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        if which == "hook":
            net = nn.parallel.DistributedDataParallel(model)
            state = PowerSGDState(
                process_group=None,
                matrix_approximation_rank=rank,
                start_powerSGD_iter=2,
                min_compression_rate=2,
                use_error_feedback=True,
                warm_start=True,
                orthogonalization_epsilon=1e-8,
                random_seed=0,
            )
            net.register_comm_hook(state, powerSGD_hook)
            step_fn = _plain_step(optimizer)
        else:
            algo = commsgd.build_algorithm("powersgd", rank=rank, warmup_steps=2, min_compression_rate=2.0)
            step_fn = commsgd.CommOptimizer(optimizer, algo, model, ctx).step
        gen = torch.Generator().manual_seed(100 + ctx.rank)
        for _ in range(steps):
            index = torch.randint(0, data.num_train, (32,), generator=gen)
            optimizer.zero_grad()
            loss = F.cross_entropy(net(data.train_x[index]), data.train_y[index])
            loss.backward()
            step_fn(loss)
        with torch.no_grad():
            loss, errors = loss_and_errors(model(data.test_x), data.test_y)
        results[which] = (float(loss), float(errors) / data.num_test)
    return results


def _plain_step(optimizer: torch.optim.Optimizer) -> Any:
    return lambda loss: optimizer.step()


@pytest.mark.multiprocess
def test_accuracy_close_to_pytorch_powersgd_hook() -> None:
    for result in run_distributed(_train_both, 2, 150, 2):
        print(result)
        (ours_loss, ours_error), (hook_loss, hook_error) = result["commsgd"], result["hook"]
        assert ours_error < 0.1 and hook_error < 0.1, result
        assert abs(ours_error - hook_error) < 0.04, result
        assert abs(ours_loss - hook_loss) < 0.1, result

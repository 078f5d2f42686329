"""Single-process parts of the decentralized methods: params, wire format, model vector, deadline loop."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import commsgd
from commsgd.algorithms import validate_params
from commsgd.algorithms.base import Slowdown
from commsgd.algorithms.gossip import ModelVector
from commsgd.algorithms.stragglers import Stragglers, gradient_by_deadline
from commsgd.compression import Wire
from commsgd.compression import get as get_compressor
from commsgd.errors import ConfigError
from commsgd.topology import build_topology

# ------------------------------------------------------------------------------------ params


def test_defaults_and_recorded_params() -> None:
    dpsgd = validate_params("dpsgd", {})
    assert dpsgd["topology"] == "ring" and dpsgd["rule"] == "metropolis" and dpsgd["straggler"] == "off"
    timed = validate_params("quantimed", {"straggler": "per_iteration", "sample_time_max_s": 0.001})
    assert timed["rule"] == "laplacian" and timed["compressor"] == "rounding"  # the paper's W and Q
    assert timed["sample_time_max_s"] == 0.001 and timed["deadline_s"] > 0


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("dpsgd", {"topology": "hypercube"}, "algo.topology"),
        ("dpsgd", {"topology": "custom"}, "algo.weights_file"),
        ("dpsgd", {"weights_file": "w.txt"}, "algo.weights_file"),
        ("dpsgd", {"straggler": "per_worker"}, "algo.sample_time_max_s"),
        ("dpsgd", {"sample_time_min_s": 0.2, "sample_time_max_s": 0.1}, "algo.sample_time_min_s"),
        ("qdsgd", {"eps": 1.5}, "algo.eps"),
        ("qdsgd", {"step_rule": "paper", "eps": 5.0, "horizon": 16}, "algo.eps"),
        ("qdsgd", {"compressor": "fp16"}, "algo.compressor"),
        ("qdsgd", {"compressor": "zip"}, "unknown compressor"),
        ("quantimed", {"deadline_s": 0}, "algo.deadline_s"),
    ],
)
def test_bad_params_name_the_field(name: str, params: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        validate_params(name, params)


@pytest.mark.parametrize("name", ["qdsgd", "quantimed"])
@pytest.mark.parametrize("args", [{}, {"shared_indices": False, "scaled": True}], ids=str)
def test_randomk_is_refused_at_config_time_with_the_reason(name: str, args: dict[str, object]) -> None:
    # It used to pass validation and fail at the first exchange (shared indices cannot travel point to
    # point); with indices sent and d/k scaling, runs diverge, so it is refused in every form.
    with pytest.raises(ConfigError, match=r"algo\.compressor: randomk does not suit Q-DSGD") as info:
        validate_params(name, {"compressor": "randomk", "compressor_args": args})
    assert "\n" not in str(info.value) and "point to point" in str(info.value)


def test_paper_schedule_may_take_b_above_one_when_the_step_in_use_is_not() -> None:
    assert validate_params("quantimed", {"step_rule": "paper", "eps": 2.0, "horizon": 16})["eps"] == 2.0


def test_custom_weights_file_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "w.txt"
    np.savetxt(path, build_topology("ring", 4).weights)
    assert validate_params("dpsgd", {"topology": "custom", "weights_file": str(path)})["weights_file"] == str(
        path
    )
    np.savetxt(path, np.ones((3, 3)))
    with pytest.raises(ConfigError, match="sums to"):
        validate_params("dpsgd", {"topology": "custom", "weights_file": str(path)})


# ------------------------------------------------------------------------------------ wire format


@pytest.mark.parametrize(
    ("name", "args"), [("rounding", {}), ("rounding", {"bits": 12}), ("qsgd", {}), ("none", {})]
)
def test_wire_message_round_trip(name: str, args: dict[str, object]) -> None:
    compressor = get_compressor(name, **args)
    x = torch.randn(1001)
    codec = Wire(compressor, x.numel(), x.dtype)
    payload = compressor.compress(x, generator=torch.Generator().manual_seed(0))
    wire = codec.encode(payload)
    assert wire.dtype == torch.uint8 and wire.numel() == codec.nbytes == compressor.payload_nbytes(x.numel())
    received = codec.empty()
    received.copy_(wire)
    torch.testing.assert_close(codec.decode(received), compressor.decompress(payload))


def test_wire_refuses_a_point_to_point_payload_with_shared_tensors() -> None:
    compressor = get_compressor("randomk", ratio=0.1, shared_indices=True)
    payload = compressor.compress(torch.randn(100), generator=torch.Generator().manual_seed(0))
    assert payload.shared
    with pytest.raises(ValueError, match="shared tensors"):
        Wire(compressor, 100).encode(payload)


# ------------------------------------------------------------------------------------ model vector


def test_model_vector_layout() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    vector = ModelVector(model)
    params = sum(p.numel() for p in model.parameters())
    assert vector.numel == params + 8  # running mean and var; the int64 batch counter stays out
    model(torch.randn(5, 3)).sum().backward()
    (values,), (grads,) = vector.read(), vector.gradients()
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]
    torch.testing.assert_close(grads[:params], expected)
    assert torch.count_nonzero(grads[params:]) == 0
    vector.write([values + 1])
    torch.testing.assert_close(vector.read()[0], values + 1)
    torch.testing.assert_close(model[1].running_var, values[params + 4 :] + 1)


# ------------------------------------------------------------------------------------ deadline loop


def _batches(
    model: torch.nn.Module, sizes: list[int]
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], object]:
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)) for n in sizes]
    it = iter(data)

    def next_batch() -> commsgd.MiniBatch:
        x, y = next(it)
        return commsgd.MiniBatch(lambda: torch.nn.functional.mse_loss(model(x), y), len(y))

    return data, next_batch


def test_deadline_gradient_is_the_sample_weighted_mean() -> None:
    model = torch.nn.Linear(3, 1)
    data, next_batch = _batches(model, [4, 2, 6, 5])
    slept: list[float] = []
    result = gradient_by_deadline(
        list(model.parameters()), next_batch, 60.0, 1e-4, slept.append, max_batches=3
    )
    assert (result.samples, result.batches) == (12, 3)
    assert slept == pytest.approx([4e-4, 2e-4, 6e-4])
    x = torch.cat([d[0] for d in data[:3]])
    y = torch.cat([d[1] for d in data[:3]])
    reference = torch.nn.Linear(3, 1)
    reference.load_state_dict(model.state_dict())
    torch.nn.functional.mse_loss(reference(x), y).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert result.loss == pytest.approx(torch.nn.functional.mse_loss(reference(x), y).item(), rel=1e-5)


def test_batch_missing_the_deadline_gives_zero_gradient() -> None:
    model = torch.nn.Linear(3, 1)
    _, next_batch = _batches(model, [4])
    slept: list[float] = []
    result = gradient_by_deadline(list(model.parameters()), next_batch, 0.5, 10.0, slept.append)
    assert (result.samples, result.batches) == (0, 0) and math.isfinite(result.loss)
    assert len(slept) == 1 and 0 <= slept[0] <= 0.5  # idles out the rest of the deadline, not 40 s
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())  # type: ignore[arg-type]


@pytest.mark.parametrize(("factor", "expected"), [(1.0, 10), (2.0, 5), (3.0, 3)])
def test_a_slowed_worker_spends_its_slowdown_inside_the_deadline(
    monkeypatch: pytest.MonkeyPatch, factor: float, expected: int
) -> None:
    """On a fake clock where every batch computes for 1 s: a deadline of 10.5 s fits 10 batches, and
    a worker slowed `factor` times fits 10.5 // factor; the slowdown never runs past the deadline."""
    clock = [0.0]
    monkeypatch.setattr("commsgd.algorithms.stragglers.time.perf_counter", lambda: clock[0])

    def advance(seconds: float) -> None:
        clock[0] += seconds

    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(2, 3), torch.randn(2, 1)

    def next_batch() -> commsgd.MiniBatch:
        def loss() -> torch.Tensor:
            advance(1.0)  # the batch's real compute time
            return torch.nn.functional.mse_loss(model(x), y)

        return commsgd.MiniBatch(loss, 2)

    slowdown = Slowdown(factor, extra_s=0.0)
    result = gradient_by_deadline(list(model.parameters()), next_batch, 10.5, 0.0, advance, slowdown=slowdown)
    assert result.batches == expected
    assert clock[0] <= 10.5 + 1.0  # at most the dropped batch's own compute past the deadline


# ------------------------------------------------------------------------------------ stragglers


def test_straggler_speeds() -> None:
    off = Stragglers("off", 0.0, 0.0, seed=1)
    assert off.begin_iteration() == 0.0 and off.summary() == {"straggler": "off"}
    fixed = Stragglers("per_worker", 0.1, 0.3, seed=1)
    first = fixed.begin_iteration()
    assert 0.1 <= first <= 0.3 and fixed.begin_iteration() == first
    varying = Stragglers("per_iteration", 0.1, 0.3, seed=1)
    draws = [varying.begin_iteration() for _ in range(20)]
    assert all(0.1 <= d <= 0.3 for d in draws) and len(set(draws)) == 20
    resumed = Stragglers("per_iteration", 0.1, 0.3, seed=99)
    resumed.load_state_dict(varying.state_dict())
    assert resumed.begin_iteration() == varying.begin_iteration()
    assert varying.summary()["mean_sample_time_s"] == pytest.approx(varying.drawn_sum / varying.draws)

"""Single-process pieces of the compressed algorithms: wire packing, slicing, parameter validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from commsgd.algorithms import build_algorithm, validate_params
from commsgd.algorithms.compressed import ErrorFeedbackSGD
from commsgd.algorithms.powersgd import planned_rank
from commsgd.compression import NonFiniteError, RandomK, Wire, get
from commsgd.compression.slices import slice_bounds
from commsgd.errors import ConfigError
from commsgd.testing import SoloContext


@pytest.mark.parametrize(
    ("name", "params"),
    [("topk", {"ratio": 0.1}), ("scaled_sign", {}), ("block_sign", {"block_size": 7}), ("qsgd", {})],
)
def test_wire_round_trip_of_multi_buffer_payloads(name: str, params: dict[str, object]) -> None:
    compressor = get(name, **params)
    x = torch.randn(101, generator=torch.Generator().manual_seed(0))
    payload = compressor.compress(x, generator=torch.Generator().manual_seed(1))
    wire = Wire(compressor, x.numel())
    assert wire.nbytes == payload.nbytes == compressor.payload_nbytes(x.numel())
    row = torch.full((wire.nbytes + 3,), 255, dtype=torch.uint8)  # a padded row, as after a collective
    wire.pack(payload, row)
    # an odd offset, as row i of a gathered (p, nbytes) tensor would have
    shifted = torch.cat([torch.zeros(1, dtype=torch.uint8), row])[1:]
    torch.testing.assert_close(wire.decode(shifted), compressor.decompress(payload))


def test_slices_follow_block_boundaries_and_cover_the_vector() -> None:
    bounds = slice_bounds(1000, 3, 64)
    assert bounds == [(0, 384), (384, 768), (768, 1000)]
    assert slice_bounds(10, 4, 8) == [(0, 8), (8, 10), (10, 10), (10, 10)]


def test_planned_rank_sends_vectors_and_non_shrinking_matrices_uncompressed() -> None:
    assert planned_rank(torch.Size([64]), 2) is None
    assert planned_rank(torch.Size([128, 64]), 2) == 2
    assert planned_rank(torch.Size([4, 4]), 2) is None  # 2 * 8 = 16 is not < 16
    assert planned_rank(torch.Size([10, 128]), 4, 2.0) == 4
    assert planned_rank(torch.Size([10, 128]), 4, 3.0) is None  # 4 * 138 * 3 > 1280
    assert planned_rank(torch.Size([16, 16, 3, 3]), 8) == 8


def test_aliases_are_ef_sgd_with_their_defaults() -> None:
    assert validate_params("qsgd", {})["error_feedback"] is False
    assert validate_params("topk", {})["error_feedback"] is True
    assert validate_params("randomk", {})["error_feedback"] is False
    assert validate_params("ef_sgd", {"compressor": "topk", "k": 5})["k"] == 5
    assert validate_params("randomk", {"k": 5})["k"] == 5  # no default ratio in the way
    assert build_algorithm("fp16").params.compressor == "fp16"
    assert isinstance(build_algorithm("qsgd"), ErrorFeedbackSGD)


@pytest.mark.parametrize("name", ["randomk", "ef_sgd"])
def test_randomk_defaults_to_unscaled_ten_percent(name: str) -> None:
    # Scaled by d/k, random-k is unbiased but no contraction: with error feedback the error grows without
    # bound, and without it the default lr diverges. Unscaled is the default of both entry points.
    compressor = build_algorithm(name, compressor="randomk").params.build()
    assert isinstance(compressor, RandomK)
    assert (compressor.ratio, compressor.scaled, compressor.unbiased) == (0.1, False, False)
    scaled = build_algorithm(name, compressor="randomk", scaled=True).params.build()
    assert scaled.unbiased


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("qsgd", {"compressor": "topk"}, "fixed to 'qsgd'"),
        ("ef_sgd", {"compressor": "powersgd"}, "powersgd algorithm"),
        ("ef_sgd", {"compressor": "qsgd", "ratio": 0.1}, "unknown parameter"),
        ("ef_sgd", {"compressor": "topk", "block_per_tensor": True}, "block_per_tensor"),
        ("ef_sgd", {"compressor": "nope"}, "unknown compressor"),
        ("dist_ef_sgd", {"compressor": "randomk"}, "shared_indices=false"),
        ("randomk", {"ratio": 1.5}, "algo.ratio: must be <= 1"),  # an alias keeps the base's ranges
        ("randomk", {"scaled": "yes"}, "algo.scaled"),
        ("signum", {"lr_scale": 0}, "algo.lr_scale"),
        ("dist_ef_sgd", {"server": "two"}, "sharded"),
        ("powersgd", {"rank": 0}, ">= 1"),
    ],
)
def test_bad_parameters_fail_at_config_time(name: str, params: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_params(name, params)


#: algorithms whose failed compression reaches every worker as NaN gradients instead of raising on one
POISONING = ("ef_sgd", "signum", "dist_ef_sgd")


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("ef_sgd", {"compressor": "topk", "ratio": 0.2}),
        ("signum", {}),
        ("powersgd", {}),
        ("dist_ef_sgd", {"compressor": "block_sign", "block_size": 4}),
    ],
)
def test_nan_gradient_fails_the_step_and_leaves_the_state_alone(name: str, params: dict[str, object]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    algo = build_algorithm(name, params)
    algo.bind(SoloContext(), model, torch.optim.SGD(model.parameters(), lr=0.1))  # type: ignore[arg-type]
    for step in (1, 2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        algo.after_backward(step)
    before = algo.state_dict()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model[0].weight.grad[1, 2] = float("nan")  # type: ignore[index]
    if name in POISONING:  # the failure travels with the message: NaN gradients for the guard
        algo.after_backward(3)
        assert not all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())  # type: ignore[arg-type]
    else:
        with pytest.raises(NonFiniteError):
            algo.after_backward(3)
    after = algo.state_dict()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)
    if name == "ef_sgd":
        torch.testing.assert_close(after["feedback"]["errors"], before["feedback"]["errors"], rtol=0, atol=0)

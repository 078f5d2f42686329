"""Tests of commsgd.compression: wire sizes, guarantees (delta, unbiasedness), error feedback, PowerSGD."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from commsgd.compression import (
    COMPRESSORS,
    Compressor,
    ErrorFeedback,
    NonFiniteError,
    RandomK,
    TopK,
    get,
    initial_q,
    orthonormalize_,
    pack_signs,
    unpack_signs,
)
from commsgd.errors import ConfigError

# One instance per family, with small blocks so that several blocks and a short last one occur.
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("none", {}),
    ("fp16", {}),
    ("bf16", {}),
    ("sign", {}),
    ("scaled_sign", {}),
    ("block_sign", {"block_size": 5}),
    ("topk", {"ratio": 0.2}),
    ("topk", {"k": 3}),
    ("randomk", {"ratio": 0.3}),
    ("randomk", {"ratio": 0.3, "shared_indices": False}),
    ("randomk", {"ratio": 0.3, "scaled": True}),
    ("qsgd", {"levels": 4, "bucket_size": 6}),
    ("qsgd", {}),
    ("rounding", {"bits": 3}),
    ("rounding", {"bits": 12}),
    ("rounding", {"bits": 8, "step": 0.5}),
    ("powersgd", {"rank": 2}),
]
CONFIG_IDS = [name + "".join(f"-{k}={v}" for k, v in params.items()) for name, params in CONFIGS]
SHAPES = [(1,), (7,), (9,), (64,), (33, 5), (4, 3, 5), (2, 100)]
DELTA_CONFIGS = [
    ("scaled_sign", {}),
    ("block_sign", {"block_size": 7}),
    ("topk", {"ratio": 0.25}),
    ("topk", {"k": 1}),
    ("powersgd", {"rank": 1}),
    ("powersgd", {"rank": 3}),
]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sq(x: torch.Tensor) -> float:
    """||x||^2 in float64 (float32 would overflow for 1e30 entries)."""
    return float(x.double().pow(2).sum())


# --- registry and parameters -------------------------------------------------------------------------


def test_registry_lists_every_compressor() -> None:
    assert set(COMPRESSORS) == {name for name, _ in CONFIGS}
    for name in COMPRESSORS:
        assert get(name).name == name


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="topk") as info:
        get("top-k")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "params", "param"),
    [
        ("topk", {"ratio": 0.0}, "ratio"),
        ("topk", {"ratio": 1.5}, "ratio"),
        ("topk", {"k": 0}, "k"),
        ("topk", {"k": 2, "ratio": 0.1}, "ratio"),
        ("randomk", {"shared_indices": "yes"}, "shared_indices"),
        ("randomk", {"scaled": 1}, "scaled"),
        ("qsgd", {"levels": 128}, "levels"),
        ("qsgd", {"bucket_size": 0}, "bucket_size"),
        ("rounding", {"bits": 17}, "bits"),
        ("rounding", {"step": -1.0}, "step"),
        ("block_sign", {"block_size": 0}, "block_size"),
        ("block_sign", {"block_size": 4, "sizes": [4]}, "sizes"),
        ("block_sign", {"sizes": [3, 0]}, "sizes"),
        ("block_sign", {"sizes": []}, "sizes"),
        ("powersgd", {"rank": 0}, "rank"),
        ("powersgd", {"rank": 1.5}, "rank"),
        ("sign", {"scale": 2}, "scale"),
    ],
)
def test_bad_parameters_raise_one_line_config_error(name: str, params: dict[str, Any], param: str) -> None:
    with pytest.raises(ConfigError, match=param) as info:
        get(name, **params)
    assert "\n" not in str(info.value)


# --- wire format -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_payload_size_matches_prediction_and_round_trip_keeps_shape(
    name: str, params: dict[str, Any], shape: tuple[int, ...]
) -> None:
    c = get(name, **params)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = torch.randn(shape, generator=gen(1)).to(dtype)
        payload = c.compress(x, generator=gen(2))
        assert payload.nbytes == c.payload_nbytes(shape)
        empty = c.empty_payload(shape, dtype)
        assert {k: (b.shape, b.dtype) for k, b in payload.buffers.items()} == {
            k: (b.shape, b.dtype) for k, b in empty.buffers.items()
        }
        y = c.decompress(payload)
        assert y.shape == x.shape and y.dtype == dtype and bool(torch.isfinite(y).all())


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("shape", [(1,), (7,), (9,), (33, 5), (2, 100)], ids=str)
def test_decompress_into_a_buffer_gives_the_same_bits(
    name: str, params: dict[str, Any], shape: tuple[int, ...]
) -> None:
    c = get(name, **params)
    x = torch.randn(shape, generator=gen(1))
    payload = c.compress(x, generator=gen(2), key="t")
    out = torch.full((math.prod(shape),), math.nan)  # whatever was there is overwritten
    assert c.decompress(payload, out=out) is out
    assert torch.equal(out.view(shape), c.decompress(payload))
    with pytest.raises(ValueError, match="float32 `out`"):
        c.decompress(payload, out=torch.empty(math.prod(shape) + 1))


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=CONFIG_IDS)
def test_empty_tensor(name: str, params: dict[str, Any]) -> None:
    c = get(name, **params)
    y = c.decompress(c.compress(torch.zeros(0, 3)))
    assert y.shape == (0, 3)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 100, 1001])
def test_packed_sizes(n: int) -> None:
    assert get("sign").payload_nbytes(n) == math.ceil(n / 8)  # no header
    assert get("none").payload_nbytes(n) == 4 * n
    assert get("fp16").payload_nbytes(n) == 2 * n
    assert get("scaled_sign").payload_nbytes(n) == math.ceil(n / 8) + 4
    assert get("block_sign", block_size=16).payload_nbytes(n) == math.ceil(n / 8) + 4 * math.ceil(n / 16)
    k = max(1, round(0.1 * n))
    assert get("topk", ratio=0.1).payload_nbytes(n) == k * (4 + 4)
    assert get("randomk", ratio=0.1).payload_nbytes(n) == k * 4  # shared indices do not travel
    assert get("randomk", ratio=0.1, shared_indices=False).payload_nbytes(n) == k * (4 + 4)
    assert get("qsgd", bucket_size=64).payload_nbytes(n) == n + 4 * math.ceil(n / 64)
    assert get("rounding", bits=8).payload_nbytes(n) == n + 8
    assert get("rounding", bits=9).payload_nbytes(n) == 2 * n + 8
    assert get("powersgd").payload_nbytes(n) == 4 * n  # vectors travel uncompressed


def test_powersgd_payload_is_p_and_q() -> None:
    c = get("powersgd", rank=2)
    assert c.payload_nbytes((64, 3, 3, 3)) == 4 * 2 * (64 + 27)
    assert c.payload_nbytes((3, 4)) == 4 * 12  # (3 + 4) * 2 >= 12: no gain, sent as is
    m = torch.randn(64, 27, generator=gen(32))
    payload = c.compress(m)
    assert set(payload.buffers) == {"p", "q"}
    p, q = payload.buffers["p"].view(2, 64).T, payload.buffers["q"].view(2, 27).T  # stored transposed
    assert torch.allclose(p.T @ p, torch.eye(2), atol=1e-5)  # P orthonormal
    assert torch.allclose(q, m.T @ p, atol=1e-4)  # Q = M^T P


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-10, 10, width=32) | st.sampled_from([0.0, -0.0]), max_size=70))
def test_sign_bits_round_trip_exactly(values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    packed = pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(len(values) / 8)
    assert torch.equal(unpack_signs(packed, len(values)), torch.where(x >= 0, 1.0, -1.0))


def test_sign_bits_cover_every_byte_pattern() -> None:
    bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
    x = (bits * 2 - 1).float().reshape(-1)
    assert torch.equal(pack_signs(x), torch.arange(256).to(torch.uint8))
    assert torch.equal(unpack_signs(pack_signs(x), x.numel()), x)


def test_sign_maps_zero_to_plus_one() -> None:
    x = torch.tensor([0.0, -0.0, -1.0, 2.0, 0.0])
    c = get("sign")
    assert c.decompress(c.compress(x)).tolist() == [1.0, 1.0, -1.0, 1.0, 1.0]


# --- delta-approximation -----------------------------------------------------------------------------


def assert_delta_bound(c: Compressor, x: torch.Tensor) -> None:
    y = c.decompress(c.compress(x))
    assert bool(torch.isfinite(y).all())
    delta = c.delta(x.numel())
    assert delta is not None and 0.0 <= delta <= 1.0
    err, norm = sq(x - y.double()), sq(x)
    assert err <= (1 - delta) * norm * (1 + 1e-5) + 1e-300, (err, norm, delta)


def adversarial(shape: tuple[int, int]) -> list[torch.Tensor]:
    n = shape[0] * shape[1]
    spike = torch.zeros(n)
    spike[n // 3] = -5.0
    base = torch.randn(n, generator=gen(3))
    mixed = base * torch.logspace(-30, 30, n)
    return [
        t.reshape(shape)
        for t in (torch.zeros(n), spike, torch.full((n,), 2.5), base * 1e30, base * 1e-30, mixed)
    ]


@pytest.mark.parametrize(("name", "params"), DELTA_CONFIGS, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (1, 13), (9, 7), (16, 40)], ids=str)
def test_delta_bound_on_adversarial_tensors(
    name: str, params: dict[str, Any], shape: tuple[int, int]
) -> None:
    c = get(name, **params)
    for x in adversarial(shape):
        assert_delta_bound(c, x)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e30]),
    seed=st.integers(0, 2**16),
    which=st.sampled_from(DELTA_CONFIGS),
)
def test_delta_bound_on_random_tensors(
    rows: int, cols: int, scale: float, seed: int, which: tuple[str, dict[str, Any]]
) -> None:
    x = torch.randn(rows, cols, generator=gen(seed)) ** 3 * scale  # heavy-tailed entries
    assert_delta_bound(get(which[0], **which[1]), x)


def large_vectors() -> dict[str, torch.Tensor]:
    """Vectors long enough for topk's probe, including one built to fool it and one of ties."""
    noise = torch.randn(65536, generator=gen(36))
    fooling = noise * 1e-3
    fooling[::8] += 10  # exactly the probed positions are large: too few candidates, full topk fallback
    return {"random": noise, "fooling": fooling, "ties": torch.ones(65536), "spiky": noise**9}


@pytest.mark.parametrize("kind", ["random", "fooling", "ties", "spiky"])
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.1, 0.5])
def test_topk_selects_the_largest_magnitudes_on_large_inputs(kind: str, ratio: float) -> None:
    x = large_vectors()[kind]
    c = TopK(ratio=ratio)
    payload = c.compress(x)
    k = c.k_for(x.numel())
    indices = payload.buffers["indices"].long()
    assert indices.unique().numel() == k
    assert torch.equal(x.abs()[indices].sort().values, x.abs().topk(k).values.sort().values)
    assert_delta_bound(c, x)


def test_stated_deltas() -> None:
    assert get("scaled_sign").delta(100) == pytest.approx(1 / 100)
    assert get("block_sign", block_size=8).delta(100) == pytest.approx(1 / 8)
    assert get("block_sign", sizes=[3, 90, 7]).delta(100) == pytest.approx(1 / 90)
    assert get("topk", k=5).delta(100) == pytest.approx(0.05)
    assert get("none").delta(10) == 1.0
    assert get("qsgd").delta(10) is None and get("sign").delta(10) is None


def test_scaled_sign_reaches_its_data_dependent_delta() -> None:
    x = torch.randn(500, generator=gen(4))
    c = get("scaled_sign")
    err = sq(x - c.decompress(c.compress(x)))
    d = x.numel()
    data_delta = float(x.abs().sum()) ** 2 / (d * sq(x))
    assert err == pytest.approx((1 - data_delta) * sq(x), rel=1e-4)


def test_block_sign_with_tensor_sizes_scales_each_tensor() -> None:
    parts = [torch.randn(5, generator=gen(5)), 100 * torch.randn(11, generator=gen(6)), torch.randn(1)]
    x = torch.cat(parts)
    c = get("block_sign", sizes=[p.numel() for p in parts])
    payload = c.compress(x)
    assert torch.allclose(payload.buffers["scales"], torch.stack([p.abs().mean() for p in parts]))
    y = c.decompress(payload)
    assert torch.allclose(y[5:16].abs(), parts[1].abs().mean().expand(11))
    with pytest.raises(ValueError, match="sizes"):
        c.compress(torch.randn(16))


# --- non-finite input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("shape", [(1,), (37,), (12, 10)], ids=str)
def test_non_finite_input_raises(
    name: str, params: dict[str, Any], bad: float, shape: tuple[int, ...]
) -> None:
    c = get(name, **params)
    for position in {0, math.prod(shape) // 2, math.prod(shape) - 1}:
        x = torch.randn(shape, generator=gen(7))
        x.view(-1)[position] = bad
        with pytest.raises(NonFiniteError):
            c.compress(x, generator=gen(8))
    assert issubclass(NonFiniteError, ValueError)


def test_fp16_overflow_is_not_sent_as_inf() -> None:
    with pytest.raises(NonFiniteError):
        get("fp16").compress(torch.tensor([1.0, 1e5]))


# --- unbiasedness ------------------------------------------------------------------------------------------


def monte_carlo(c: Compressor, x: torch.Tensor, draws: int, *, tiled: bool) -> torch.Tensor:
    """`draws` decompressions of x (a draws x d float64 tensor). `tiled`: compress x repeated `draws`
    times in one call, valid when the scheme treats each copy alike (same grid, bucket-aligned copies)."""
    g = gen(9)
    if tiled:
        return c.decompress(c.compress(x.repeat(draws), generator=g)).view(draws, -1).double()
    return torch.stack([c.decompress(c.compress(x, generator=g)) for _ in range(draws)]).double()


def assert_unbiased(samples: torch.Tensor, x: torch.Tensor, var_bound: torch.Tensor) -> None:
    """The sample mean matches x: per coordinate within 5 standard errors (from the variance bound), and
    along x, where a systematic scale error shows, within 4 empirical standard errors. The seeds are
    fixed, so these tolerances decide once whether the scheme is unbiased, they cannot flake."""
    n, x64 = samples.shape[0], x.double()
    tolerance = 5 * (var_bound / n).sqrt() + 1e-12
    assert bool(((samples.mean(0) - x64).abs() <= tolerance).all())
    along_x = samples @ x64 / x64.dot(x64)
    assert abs(float(along_x.mean()) - 1) <= 4 * float(along_x.std()) / math.sqrt(n)


def test_qsgd_is_unbiased() -> None:
    levels, bucket = 3, 8
    x = torch.randn(24, generator=gen(10))
    samples = monte_carlo(get("qsgd", levels=levels, bucket_size=bucket), x, 100_000, tiled=True)
    # Stochastic rounding to a grid of step N_b / s has variance <= step^2 / 4 per coordinate.
    norms = x.view(-1, bucket).norm(dim=1).repeat_interleave(bucket).double()
    assert_unbiased(samples, x, (norms / levels) ** 2 / 4)
    assert bool((samples.mean(0) - x.double()).abs().max() > 0)  # it is random, not exact


def test_scaled_randomk_is_unbiased() -> None:
    d, k = 20, 4
    x = torch.randn(d, generator=gen(11))
    c = get("randomk", k=k, scaled=True)
    assert c.unbiased
    samples = monte_carlo(c, x, 4000, tiled=False)
    # C_i = (d/k) x_i Binomial(k, 1/d): variance (d/k) x_i^2 (1 - 1/d).
    assert_unbiased(samples, x, (d / k) * x.double() ** 2)


@pytest.mark.parametrize("shared_indices", [True, False])
def test_unscaled_randomk_keeps_drawn_coordinates_and_contracts(shared_indices: bool) -> None:
    """Unscaled random-k is x on the drawn coordinates (once, however often drawn) and 0 elsewhere, so
    E||x - C(x)||^2 = (1 - 1/d)^k ||x||^2 < ||x||^2: the contraction error feedback relies on."""
    d, k, draws = 20, 8, 4000
    c = get("randomk", k=k, shared_indices=shared_indices)
    assert not c.unbiased
    x = torch.randn(d, generator=gen(11))
    g = gen(12)
    errors = []
    for _ in range(draws):
        y = c.decompress(c.compress(x, generator=g))
        kept = y != 0
        assert torch.equal(y[kept], x[kept])
        errors.append(sq(x - y))
    ratio = sum(errors) / draws / sq(x)
    assert ratio == pytest.approx((1 - 1 / d) ** k, abs=0.02)  # 0.663; scaled random-k gives (d-1)/k = 2.4


@pytest.mark.parametrize("params", [{"bits": 2}, {"bits": 4, "step": 0.75}], ids=str)
def test_rounding_is_unbiased_with_bounded_variance(params: dict[str, Any]) -> None:
    x = torch.randn(30, generator=gen(12))
    c = get("rounding", **params)
    step = float(c.compress(x).buffers["step"])
    samples = monte_carlo(c, x, 100_000, tiled=True)  # the tiled copies share min and max, hence the grid
    assert_unbiased(samples, x, torch.full_like(samples[0], step**2 / 4))
    # E(Q(x) - x)^2 = p(1 - p) step^2 <= step^2 / 4 per coordinate; allow 10% sampling slack.
    mean_sq_error = (samples - x.double()).pow(2).mean(0)
    assert bool((mean_sq_error <= step**2 / 4 * 1.1).all())


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1.0, 1e30], ids=str)
def test_quantisers_stay_within_one_step_at_any_magnitude(scale: float) -> None:
    x = torch.randn(1000, generator=gen(33)) * scale
    x[:100] *= 1e-3  # buckets of very different sizes
    qsgd = get("qsgd", levels=15, bucket_size=100)
    payload = qsgd.compress(x, generator=gen(34))
    true_norms = x.double().view(10, 100).norm(dim=1)
    if scale:  # the 2-norm is exact whether float32 squares overflow (1e30) or underflow (1e-30)
        assert torch.allclose(payload.buffers["norms"].double(), true_norms, rtol=1e-5, atol=0)
    step = (payload.buffers["norms"].double() / 15).repeat_interleave(100)
    assert bool(((qsgd.decompress(payload).double() - x.double()).abs() <= step * (1 + 1e-5)).all())

    rounding = get("rounding", bits=6)
    payload = rounding.compress(x, generator=gen(35))
    step_r = float(payload.buffers["step"])
    assert step_r == pytest.approx(float(x.max() - x.min()) / 63, rel=1e-5, abs=1e-37)
    assert bool(((rounding.decompress(payload) - x).abs() <= step_r * (1 + 1e-5)).all())


def test_rounding_with_fixed_step_lands_on_the_grid() -> None:
    c = get("rounding", bits=8, step=0.125)
    y = c.decompress(c.compress(torch.randn(50, generator=gen(13)), generator=gen(14)))
    assert torch.allclose(y / 0.125, (y / 0.125).round(), atol=1e-4)
    with pytest.raises(ValueError, match="step"):
        c.compress(torch.tensor([0.0, 100.0]))


@pytest.mark.parametrize("name", ["qsgd", "rounding", "randomk"])
def test_same_generator_state_gives_same_payload(name: str) -> None:
    c = get(name)
    x = torch.randn(300, generator=gen(15))
    a, b = c.compress(x, generator=gen(16)), c.compress(x, generator=gen(16))
    assert all(torch.equal(a.buffers[k], b.buffers[k]) for k in a.buffers)


# --- error feedback ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=CONFIG_IDS)
def test_error_feedback_loses_nothing(name: str, params: dict[str, Any]) -> None:
    c = get(name, **params)
    ef = ErrorFeedback(c)
    g = gen(17)
    for step in range(4):
        scale = 1.0 if "step" in params else 10.0**step  # a fixed grid only covers a fixed range
        grads = {"w": torch.randn(12, 10, generator=g), "b": torch.randn(10, generator=g) * scale}
        for key, grad in grads.items():
            old = ef.error(key)
            payload = ef.compress(key, grad, generator=g)
            new = ef.error(key)
            assert new is not None
            expected = grad + (old if old is not None else 0)
            assert torch.allclose(c.decompress(payload) + new, expected, rtol=1e-5, atol=1e-5 * scale)


def test_error_feedback_rescale_and_state_dict() -> None:
    ef = ErrorFeedback(get("powersgd", rank=1))
    x = torch.randn(8, 6, generator=gen(18))
    ef.compress("w", x)
    error = ef.error("w")
    assert error is not None
    before = error.clone()
    ef.rescale(0.5)
    assert torch.allclose(error, before * 0.5)

    twin = ErrorFeedback(get("powersgd", rank=1))
    twin.load_state_dict(ef.state_dict())
    a, b = ef.compress("w", x), twin.compress("w", x)  # same error and same warm start
    assert all(torch.equal(a.buffers[k], b.buffers[k]) for k in a.buffers)
    with pytest.raises(ValueError, match="shape"):
        ef.compress("w", torch.randn(3))
    with pytest.raises(ValueError):
        ef.rescale(float("nan"))


# --- summability -------------------------------------------------------------------------------------------


def test_summable_claims() -> None:
    claimed = {name for name in COMPRESSORS if get(name).summable}
    assert claimed == {"none", "fp16", "bf16", "randomk"}
    assert not get("randomk", shared_indices=False).summable


@pytest.mark.parametrize("name", ["none", "fp16", "bf16", "randomk"])
def test_sum_of_payloads_decompresses_to_sum(name: str) -> None:
    c = get(name)
    xs = [torch.randn(200, generator=gen(19 + w)) for w in range(3)]
    payloads = [c.compress(x, generator=gen(99)) for x in xs]  # workers share the generator seed
    summed = {k: torch.stack([p.buffers[k] for p in payloads]).sum(0) for k in payloads[0].buffers}
    together = c.decompress(payloads[0].with_buffers(summed))
    apart = sum(c.decompress(p) for p in payloads)
    tol = 1e-5 if name in ("none", "randomk") else 2e-2
    assert isinstance(apart, torch.Tensor) and torch.allclose(together, apart, rtol=tol, atol=tol)


def test_randomk_shared_indices_stay_off_the_wire() -> None:
    c = RandomK(k=5)
    x = torch.randn(50, generator=gen(20))
    payload = c.compress(x, generator=gen(21))
    assert set(payload.buffers) == {"values"}
    assert torch.equal(payload.shared["indices"], c.draw_indices(50, gen(21)))
    with pytest.raises(ValueError, match="shared"):
        c.decompress(c.empty_payload(50))


# --- PowerSGD ------------------------------------------------------------------------------------------


def low_rank_matrix(n: int, m: int, rank: int, seed: int) -> torch.Tensor:
    g = gen(seed)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, m, generator=g)


def test_powersgd_warm_start_reduces_error() -> None:
    g = gen(22)
    u, _ = torch.linalg.qr(torch.randn(40, 30, generator=g))
    v, _ = torch.linalg.qr(torch.randn(30, 30, generator=g))
    m = u @ torch.diag(0.7 ** torch.arange(30.0)) @ v.T  # decaying spectrum
    c = get("powersgd", rank=2)
    errors = [sq(m - c.decompress(c.compress(m))) for _ in range(12)]
    best = float((0.7 ** torch.arange(2.0, 30.0)).pow(2).sum())  # best rank-2 error (Eckart-Young)
    assert errors[-1] < errors[0]
    assert errors[-1] == pytest.approx(best, rel=1e-3)


def test_powersgd_is_exact_for_low_rank_matrices() -> None:
    c = get("powersgd", rank=3)
    for rank in (1, 3):
        m = low_rank_matrix(20, 15, rank, seed=23 + rank)
        for _ in range(2):
            y = c.decompress(c.compress(m, key=f"r{rank}"))
        assert sq(m - y) <= 1e-10 * sq(m)


def test_powersgd_zero_matrix_gives_zeros_and_keeps_its_warm_start() -> None:
    c = get("powersgd", rank=2)
    zero = c.decompress(c.compress(torch.zeros(10, 8)))
    assert bool((zero == 0).all())
    # A zero M gives Q = 0, whose orthonormalisation would be the first unit vectors; a matrix whose first
    # columns are zero would then stay invisible. The kept warm start still sees it.
    m = low_rank_matrix(10, 8, 1, seed=25)
    m[:, :2] = 0
    assert sq(m - c.decompress(c.compress(m))) <= 1e-10 * sq(m)


def test_powersgd_keys_keep_separate_warm_starts() -> None:
    a, b = low_rank_matrix(12, 9, 1, seed=26), low_rank_matrix(12, 9, 1, seed=27)
    keyed = get("powersgd", rank=1)
    keyed.compress(a, key="a")
    keyed.compress(b, key="b")
    assert set(keyed.state_dict()["q_t"]) == {"a", "b"}
    by_shape = get("powersgd", rank=1)
    by_shape.compress(a)
    assert set(by_shape.state_dict()["q_t"]) == {(12, 9)}


def test_powersgd_handles_conv_and_vector_tensors() -> None:
    c = get("powersgd", rank=2)
    w = torch.randn(16, 4, 3, 3, generator=gen(28))
    assert c.decompress(c.compress(w)).shape == w.shape
    bias = torch.randn(16, generator=gen(29))
    assert torch.equal(c.decompress(c.compress(bias)), bias)


def test_initial_q_depends_only_on_seed() -> None:
    state = torch.random.get_rng_state()
    assert torch.equal(initial_q(7, 2, seed=3), initial_q(7, 2, seed=3))
    assert not torch.equal(initial_q(7, 2, seed=3), initial_q(7, 2, seed=4))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    x = torch.randn(9, 7, generator=gen(30))
    first, second = get("powersgd", seed=5).compress(x), get("powersgd", seed=5).compress(x)
    assert torch.equal(first.buffers["p"], second.buffers["p"])


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_orthonormalize_is_robust(scale: float) -> None:
    g = gen(31)
    full = torch.randn(20, 3, generator=g)
    deficient = torch.cat([full[:, :1], full[:, :1] * 2, torch.zeros(20, 1)], dim=1)
    for a in (full * scale, deficient * scale, torch.zeros(20, 3)):
        q = orthonormalize_(a.clone())
        assert bool(torch.isfinite(q).all())
        assert torch.allclose(q.T @ q, torch.eye(3), atol=1e-5)

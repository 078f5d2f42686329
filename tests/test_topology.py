"""Tests for commsgd.topology: graphs, mixing rules, validation and user matrices."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from commsgd.errors import ConfigError
from commsgd.topology import (
    GRAPHS,
    MIXING_RULES,
    TOPOLOGIES,
    Topology,
    build_topology,
    describe,
    graph,
    load_weights,
    mixing_matrix,
    validate_mixing_matrix,
)

SIZES = (1, 2, 3, 4, 5, 6, 7, 9, 12, 16)


def assert_valid_mixing(w: np.ndarray) -> None:
    """W is symmetric, doubly stochastic, non-negative, with spectral gap in (0, 1]."""
    n = w.shape[0]
    assert w.shape == (n, n)
    assert w.dtype == np.float64
    np.testing.assert_allclose(w, w.T, atol=1e-12)
    assert w.min() >= 0.0
    np.testing.assert_allclose(w.sum(axis=0), np.ones(n), atol=1e-12)
    np.testing.assert_allclose(w.sum(axis=1), np.ones(n), atol=1e-12)
    gap = validate_mixing_matrix(w)
    assert 0.0 < gap <= 1.0 + 1e-12


@pytest.mark.parametrize("rule", MIXING_RULES)
@pytest.mark.parametrize("name", GRAPHS)
@pytest.mark.parametrize("n", SIZES)
def test_every_topology_gives_valid_weights(name: str, n: int, rule: str) -> None:
    topo = build_topology(name, n, rule=rule, p=0.6, seed=3)
    assert_valid_mixing(topo.weights)
    assert topo.name == name and topo.n == n
    assert 0.0 < topo.spectral_gap <= 1.0 + 1e-12
    assert topo.spectral_gap == pytest.approx(validate_mixing_matrix(topo.weights))
    for i in range(n):
        expected = [j for j in range(n) if j != i and topo.weights[i, j] > 0]
        assert topo.neighbors(i) == expected
        for j in expected:
            assert (min(i, j), max(i, j)) in topo.edges
    assert all(i < j for i, j in topo.edges)
    assert len(topo.edges) == sum(len(topo.neighbors(i)) for i in range(n)) // 2
    assert topo.max_degree == max(len(topo.neighbors(i)) for i in range(n))


@pytest.mark.parametrize("name", GRAPHS)
def test_single_worker_is_trivial(name: str) -> None:
    topo = build_topology(name, 1)
    np.testing.assert_array_equal(topo.weights, [[1.0]])
    assert topo.edges == [] and topo.neighbors(0) == [] and topo.max_degree == 0
    assert topo.spectral_gap == 1.0


@pytest.mark.parametrize("n", [3, 4, 5, 8, 13])
def test_ring_degree_two(n: int) -> None:
    topo = build_topology("ring", n)
    assert all(topo.neighbors(i) == sorted({(i - 1) % n, (i + 1) % n}) for i in range(n))
    assert len(topo.edges) == n


def test_ring_of_two_is_one_edge() -> None:
    topo = build_topology("ring", 2)
    assert topo.edges == [(0, 1)]
    np.testing.assert_allclose(topo.weights, np.full((2, 2), 0.5))
    assert topo.spectral_gap == pytest.approx(1.0)


@pytest.mark.parametrize("n", [2, 3, 6, 10])
def test_complete_degree(n: int) -> None:
    topo = build_topology("complete", n)
    assert all(len(topo.neighbors(i)) == n - 1 for i in range(n))
    np.testing.assert_allclose(topo.weights, np.full((n, n), 1.0 / n))
    assert topo.spectral_gap == pytest.approx(1.0)


@pytest.mark.parametrize("n", [2, 4, 7])
def test_star_hub(n: int) -> None:
    topo = build_topology("star", n)
    assert topo.neighbors(0) == list(range(1, n))
    assert all(topo.neighbors(i) == [0] for i in range(1, n))
    assert topo.max_degree == n - 1


@pytest.mark.parametrize("n", [9, 12, 16, 20])
def test_torus_degree_four(n: int) -> None:
    adj = graph("torus", n)
    assert adj.dtype == np.bool_
    assert np.array_equal(adj.sum(axis=1), np.full(n, 4))


def test_torus_small_sides_degenerate() -> None:
    # A prime n has sides 1 x n: the torus is a ring. 2 x 3 gives a prism (degree 3).
    np.testing.assert_array_equal(graph("torus", 7), graph("ring", 7))
    assert np.array_equal(graph("torus", 6).sum(axis=1), np.full(6, 3))


@pytest.mark.parametrize("name", GRAPHS)
def test_graph_adjacency_is_symmetric_without_loops(name: str) -> None:
    adj = graph(name, 10, p=0.5, seed=1)
    assert adj.shape == (10, 10) and adj.dtype == np.bool_
    assert np.array_equal(adj, adj.T)
    assert not adj.diagonal().any()


def test_metropolis_ring_known_spectral_gap() -> None:
    # Ring of 4, every degree 2: W = (I + A) / 3, eigenvalues of A are 2, 0, -2, 0,
    # so W has 1, 1/3, -1/3, 1/3 and the gap is 1 - 1/3.
    topo = build_topology("ring", 4, rule="metropolis")
    a = graph("ring", 4).astype(float)
    np.testing.assert_allclose(topo.weights, (np.eye(4) + a) / 3)
    assert topo.spectral_gap == pytest.approx(2.0 / 3.0)
    # Ring of 5: eigenvalues (1 + 2 cos(2 pi k / 5)) / 3, the largest besides 1 is at k = 1.
    gap5 = 1.0 - (1.0 + 2.0 * math.cos(2.0 * math.pi / 5.0)) / 3.0
    assert build_topology("ring", 5).spectral_gap == pytest.approx(gap5)


def test_star_known_weights_and_gap() -> None:
    # Hub degree 3, leaves degree 1: hub-leaf weights 1/4, leaves keep 3/4; eigenvalues 1, 3/4, 3/4, 0.
    w = mixing_matrix(graph("star", 4), "metropolis")
    expected = np.array(
        [[0.25, 0.25, 0.25, 0.25], [0.25, 0.75, 0, 0], [0.25, 0, 0.75, 0], [0.25, 0, 0, 0.75]]
    )
    np.testing.assert_allclose(w, expected)
    np.testing.assert_allclose(mixing_matrix(graph("star", 4), "laplacian"), expected)
    assert validate_mixing_matrix(w) == pytest.approx(0.25)


def test_rules_differ_on_irregular_graph() -> None:
    # Path 0-1-2 plus pendant 3 on node 1: Metropolis uses endpoint degrees, Laplacian the max degree.
    adj = np.zeros((4, 4), dtype=bool)
    for i, j in [(0, 1), (1, 2), (1, 3), (2, 3)]:
        adj[i, j] = adj[j, i] = True
    metropolis = mixing_matrix(adj, "metropolis")
    laplacian = mixing_matrix(adj, "laplacian")
    assert metropolis[2, 3] == pytest.approx(1.0 / 3.0)
    assert laplacian[2, 3] == pytest.approx(1.0 / 4.0)
    assert laplacian[0, 0] == pytest.approx(1.0 - 1.0 / 4.0)
    assert_valid_mixing(metropolis)
    assert_valid_mixing(laplacian)


def test_erdos_renyi_seeded_and_connected() -> None:
    a = graph("erdos_renyi", 30, p=0.15, seed=7)
    b = graph("erdos_renyi", 30, p=0.15, seed=7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, graph("erdos_renyi", 30, p=0.15, seed=8))
    assert build_topology("erdos_renyi", 30, p=0.15, seed=7).spectral_gap > 0


def test_erdos_renyi_p_zero_rejected() -> None:
    with pytest.raises(ConfigError, match=r"p=0\.0 is too small"):
        graph("erdos_renyi", 5, p=0.0)
    assert graph("erdos_renyi", 1, p=0.0).shape == (1, 1)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_erdos_renyi_bad_p(p: float) -> None:
    with pytest.raises(ConfigError, match=r"p \(edge probability\)"):
        graph("erdos_renyi", 5, p=p)


def test_erdos_renyi_full_probability_is_complete() -> None:
    np.testing.assert_array_equal(graph("erdos_renyi", 6, p=1.0), graph("complete", 6))


def ring5() -> np.ndarray:
    return build_topology("ring", 5).weights.copy()


@pytest.mark.parametrize(
    ("matrix", "reason"),
    [
        (np.array([[0.5, 0.5], [0.4, 0.6]]), r"not symmetric: W\[0, 1\] = 0.5 but W\[1, 0\] = 0.4"),
        (np.array([[1.2, -0.2], [-0.2, 1.2]]), r"entry \[0, 1\] is -0.2, must be >= 0"),
        (np.array([[0.5, np.nan], [np.nan, 0.5]]), r"entry \[0, 1\] is nan, must be finite"),
        (np.array([[0.5, 0.5], [0.5, np.inf]]), r"entry \[1, 1\] is inf, must be finite"),
        (
            np.block([[np.full((2, 2), 0.5), np.zeros((2, 2))], [np.zeros((2, 2)), np.full((2, 2), 0.5)]]),
            "disconnected: workers form 2 groups",
        ),
        (np.eye(3), "disconnected: workers form 3 groups"),
        (np.array([[0.0, 1.0], [1.0, 0.0]]), "periodic"),
        (np.ones((2, 3)) / 3, r"square 2-D matrix, got shape \(2, 3\)"),
        (np.ones(4), r"square 2-D matrix, got shape \(4,\)"),
        (np.zeros((0, 0)), "non-empty"),
    ],
)
def test_bad_matrices_rejected(matrix: np.ndarray, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        validate_mixing_matrix(matrix)
    with pytest.raises(ConfigError, match=reason):
        build_topology("custom", max(matrix.shape[0], 1), weights=matrix)


def test_row_sum_reason_names_row() -> None:
    w = ring5()
    w[3, 3] -= 0.1
    with pytest.raises(ConfigError, match=r"^mixing matrix row 3 sums to 0.9, must be 1$"):
        validate_mixing_matrix(w)


def test_error_messages_are_one_line() -> None:
    bad = [np.eye(3), np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([[0.5, 0.5], [0.4, 0.6]])]
    for w in bad:
        with pytest.raises(ConfigError) as info:
            validate_mixing_matrix(w)
        assert "\n" not in str(info.value)


def test_custom_topology_roundtrip() -> None:
    w = ring5()
    topo = build_topology("custom", 5, weights=w)
    np.testing.assert_array_equal(topo.weights, w)
    assert topo.neighbors(0) == [1, 4]
    w[0, 0] = 99.0  # the topology keeps its own read-only copy
    assert topo.weights[0, 0] != 99.0
    with pytest.raises(ValueError):
        topo.weights[0, 0] = 1.0


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"name": "hypercube", "n": 4}, "topology 'hypercube' is unknown"),
        ({"name": "ring", "n": 0}, r"n \(number of workers\) must be an integer >= 1"),
        ({"name": "ring", "n": 2.5}, r"n \(number of workers\)"),
        ({"name": "ring", "n": True}, r"n \(number of workers\)"),
        ({"name": "ring", "n": 4, "rule": "uniform"}, "rule must be one of metropolis, laplacian"),
        ({"name": "custom", "n": 4}, "needs weights"),
        ({"name": "ring", "n": 4, "weights": np.eye(4)}, "only used with topology 'custom'"),
        ({"name": "custom", "n": 3, "weights": np.full((2, 2), 0.5)}, r"must have shape \(3, 3\)"),
        ({"name": "erdos_renyi", "n": 4, "seed": -1}, "seed must be an integer >= 0"),
    ],
)
def test_bad_arguments_rejected(kwargs: dict, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        build_topology(**kwargs)


def test_bad_adjacency_rejected() -> None:
    with pytest.raises(ConfigError, match="symmetric"):
        mixing_matrix(np.triu(np.ones((3, 3), dtype=bool), k=1), "metropolis")
    with pytest.raises(ConfigError, match="0/1"):
        mixing_matrix(np.full((3, 3), 0.5), "laplacian")
    with pytest.raises(ConfigError, match="graph 'line' is unknown"):
        graph("line", 3)


def test_neighbors_index_out_of_range() -> None:
    with pytest.raises(IndexError):
        build_topology("ring", 4).neighbors(4)


def test_load_weights_npy_and_text(tmp_path: Path) -> None:
    w = ring5()
    npy = tmp_path / "w.npy"
    np.save(npy, w)
    np.testing.assert_array_equal(load_weights(npy), w)
    txt = tmp_path / "w.txt"
    np.savetxt(txt, w, fmt="%.17g")
    np.testing.assert_allclose(load_weights(str(txt)), w, atol=0)
    topo = build_topology("custom", 5, weights=load_weights(txt))
    assert topo.spectral_gap == pytest.approx(build_topology("ring", 5).spectral_gap)


def test_load_weights_single_worker_text(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    path.write_text("1.0\n")
    np.testing.assert_array_equal(load_weights(path), [[1.0]])


def test_load_weights_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_weights(tmp_path / "missing.npy")
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("0.5 0.5\nhello 0.5\n")
    with pytest.raises(ConfigError, match="not a readable numeric matrix"):
        load_weights(garbage)
    ragged = tmp_path / "ragged.txt"
    ragged.write_text("0.5 0.5\n0.5\n")
    with pytest.raises(ConfigError, match="weights file"):
        load_weights(ragged)
    corrupt = tmp_path / "corrupt.npy"
    corrupt.write_bytes(b"not numpy")
    with pytest.raises(ConfigError, match="not a readable numeric matrix"):
        load_weights(corrupt)
    invalid = tmp_path / "invalid.txt"
    np.savetxt(invalid, np.eye(3))
    with pytest.raises(ConfigError, match=r"invalid.txt.*disconnected"):
        load_weights(invalid)


def test_describe_is_one_line() -> None:
    line = describe(build_topology("ring", 4))
    assert line == "topology ring: n=4, 4 edges, max degree 2, spectral gap 0.6667"


def test_topology_constructor_validates() -> None:
    with pytest.raises(ConfigError, match="disconnected"):
        Topology("mine", 2, np.eye(2))
    assert "custom" in TOPOLOGIES and set(GRAPHS) < set(TOPOLOGIES)


@st.composite
def connected_graphs(draw: st.DrawFn) -> np.ndarray:
    """A random spanning tree plus random extra edges: always connected."""
    n = draw(st.integers(min_value=1, max_value=14))
    adj = np.zeros((n, n), dtype=bool)
    for i in range(1, n):
        parent = draw(st.integers(min_value=0, max_value=i - 1))
        adj[i, parent] = adj[parent, i] = True
    extra = draw(st.lists(st.booleans(), min_size=n * n, max_size=n * n))
    upper = np.triu(np.array(extra, dtype=bool).reshape(n, n), k=1)
    return adj | upper | upper.T


@settings(max_examples=60, deadline=None)
@given(adj=connected_graphs(), rule=st.sampled_from(MIXING_RULES))
def test_random_connected_graphs_give_valid_weights(adj: np.ndarray, rule: str) -> None:
    w = mixing_matrix(adj, rule)  # type: ignore[arg-type]
    assert_valid_mixing(w)
    off_diagonal = ~np.eye(adj.shape[0], dtype=bool)
    assert np.array_equal(w[off_diagonal] > 0, adj[off_diagonal])
    assert (w.diagonal() > 0).all()

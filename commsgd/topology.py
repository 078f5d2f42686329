"""Communication graphs and mixing matrices for decentralized training (D-PSGD, QuanTimed-DSGD).

Worker i averages its model with its neighbours j using weights W[i, j]. For the average to reach
consensus, W must be symmetric, doubly stochastic, non-negative and have second-largest eigenvalue
modulus (SLEM) below 1, i.e. the graph is connected and averaging does not oscillate. The spectral
gap 1 - SLEM sets how fast the workers agree: 1 for the complete graph, about 1/n^2 for a ring.

Small-n conventions, chosen so every topology works for any n >= 1:
- n = 1: a single worker, no edges, W = [[1]], spectral gap 1.
- ring with n = 2: the single edge 0-1 (the two ring edges coincide); W = [[.5, .5], [.5, .5]].
- torus: n = a * b with a <= b and a as large as possible. Wrap-around links along a side of
  length 2 coincide and along a side of length 1 vanish, so degree is 4 only when a, b >= 3;
  a prime n gives a = 1, i.e. a ring.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Literal, cast

import numpy as np
import numpy.typing as npt

from commsgd.errors import ConfigError

GRAPHS: tuple[str, ...] = ("ring", "torus", "complete", "star", "erdos_renyi")
"""Names accepted by `graph`."""

TOPOLOGIES: tuple[str, ...] = (*GRAPHS, "custom")
"""Names accepted by `build_topology`; "custom" takes a user-given mixing matrix."""

MIXING_RULES: tuple[str, ...] = ("metropolis", "laplacian")
"""Rules that turn an adjacency matrix into a mixing matrix."""

ER_MAX_DRAWS = 100
"""Erdos-Renyi graphs are redrawn at most this many times before giving up on connectivity."""

Rule = Literal["metropolis", "laplacian"]
BoolMatrix = npt.NDArray[np.bool_]
FloatMatrix = npt.NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class Topology:
    """A validated mixing matrix with its graph; immutable (weights are a read-only copy).

    Equality is identity: comparing float matrices element-wise is rarely what a caller wants.
    """

    name: str
    n: int
    weights: FloatMatrix
    _gap: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_n(self.n)
        object.__setattr__(self, "n", int(self.n))
        w = _as_float_matrix(self.weights, "weights")
        if w.shape != (self.n, self.n):
            raise ConfigError(
                f"weights of topology {self.name!r} must have shape ({self.n}, {self.n}), got {w.shape}"
            )
        w = w.copy()
        w.setflags(write=False)
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "_gap", validate_mixing_matrix(w))

    def neighbors(self, i: int) -> list[int]:
        """Workers j != i that worker i averages with (W[i, j] > 0), in increasing order."""
        if not 0 <= i < self.n:
            raise IndexError(f"worker index {i} out of range for a topology of {self.n} workers")
        row = self.weights[i]
        return [j for j in np.flatnonzero(row > 0).tolist() if j != i]

    @property
    def edges(self) -> list[tuple[int, int]]:
        """Undirected edges (i, j) with i < j and W[i, j] > 0, in lexicographic order."""
        rows, cols = np.nonzero(np.triu(self.weights > 0, k=1))
        return list(zip(rows.tolist(), cols.tolist()))

    @property
    def spectral_gap(self) -> float:
        """1 - second-largest eigenvalue modulus of W; larger means faster consensus."""
        return self._gap

    @property
    def max_degree(self) -> int:
        """Largest number of neighbours of any worker."""
        off_diagonal = (self.weights > 0) & ~np.eye(self.n, dtype=bool)
        return int(off_diagonal.sum(axis=1).max())


def graph(name: str, n: int, *, p: float = 0.5, seed: int = 0) -> BoolMatrix:
    """Symmetric boolean adjacency matrix (n, n) of a named graph, without self loops.

    `p` and `seed` are used only by "erdos_renyi", which is redrawn from the same generator until
    it is connected (at most `ER_MAX_DRAWS` draws).
    """
    if name not in GRAPHS:
        raise ConfigError(f"graph {name!r} is unknown; choose one of {', '.join(GRAPHS)}")
    _check_n(n)
    adj = np.zeros((n, n), dtype=bool)
    if name == "ring":
        idx = np.arange(n)
        adj[idx, (idx + 1) % n] = True
    elif name == "torus":
        a = _torus_side(n)
        b = n // a
        for r in range(a):
            for c in range(b):
                i = r * b + c
                adj[i, ((r + 1) % a) * b + c] = True
                adj[i, r * b + (c + 1) % b] = True
    elif name == "complete":
        adj[:] = True
    elif name == "star":
        adj[0, 1:] = True
    else:
        return _erdos_renyi(n, p, seed)
    adj |= adj.T
    np.fill_diagonal(adj, False)
    return adj


def mixing_matrix(adjacency: npt.ArrayLike, rule: Rule) -> FloatMatrix:
    """Mixing matrix W of an undirected graph; symmetric and doubly stochastic by construction.

    "metropolis" (Metropolis-Hastings): W_ij = 1 / (1 + max(d_i, d_j)) on edges, needs only the
    degrees of the two endpoints. "laplacian": W = I - L / (max_degree + 1), the choice of the
    QuanTimed-DSGD paper. Both have a positive diagonal, so a connected graph gives SLEM < 1.
    """
    if rule not in MIXING_RULES:
        raise ConfigError(f"rule must be one of {', '.join(MIXING_RULES)}, got {rule!r}")
    adj = _as_adjacency(adjacency)
    n = adj.shape[0]
    a = adj.astype(np.float64)
    degree = a.sum(axis=1)
    if rule == "metropolis":
        w = a / (1.0 + np.maximum.outer(degree, degree))
        np.fill_diagonal(w, 1.0 - w.sum(axis=1))
        return w
    max_degree = float(degree.max()) if n else 0.0
    laplacian = np.diag(degree) - a
    return np.eye(n) - laplacian / (max_degree + 1.0)


def build_topology(
    name: str,
    n: int,
    *,
    rule: str = "metropolis",
    p: float = 0.5,
    seed: int = 0,
    weights: npt.ArrayLike | None = None,
) -> Topology:
    """Build and validate a topology: a named graph with a mixing rule, or "custom" from `weights`.

    For "custom", `weights` is the user's mixing matrix (see `load_weights`) and `rule`, `p` and
    `seed` are ignored; `n` must match its size.
    """
    if name not in TOPOLOGIES:
        raise ConfigError(f"topology {name!r} is unknown; choose one of {', '.join(TOPOLOGIES)}")
    if name == "custom":
        if weights is None:
            raise ConfigError("topology 'custom' needs weights (a mixing matrix, e.g. from load_weights)")
        return Topology(name, n, _as_float_matrix(weights, "weights"))
    if weights is not None:
        raise ConfigError(f"weights are only used with topology 'custom', not {name!r}")
    if rule not in MIXING_RULES:
        raise ConfigError(f"rule must be one of {', '.join(MIXING_RULES)}, got {rule!r}")
    return _named_topology(name, n, rule, p, seed)


@functools.lru_cache(maxsize=8)
def _named_topology(name: str, n: int, rule: str, p: float, seed: int) -> Topology:
    """A named graph's topology, kept: it is immutable, every worker of a simulated world builds the same
    one, and its check (an n x n eigendecomposition) is most of its cost (0.15 s at n = 1,024)."""
    adjacency = graph(name, n, p=p, seed=seed)
    return Topology(name, n, mixing_matrix(adjacency, cast(Rule, rule)))


def validate_mixing_matrix(w: npt.ArrayLike, *, tol: float = 1e-9) -> float:
    """Check that `w` is a usable mixing matrix and return its spectral gap 1 - SLEM.

    Raises ConfigError naming the first property that fails: square, finite, symmetric,
    non-negative, rows (hence columns) summing to 1, SLEM < 1 - tol (connected, not periodic).
    """
    m = _as_float_matrix(w, "mixing matrix")
    n = m.shape[0]
    bad = np.argwhere(~np.isfinite(m))
    if bad.size:
        i, j = bad[0].tolist()
        raise ConfigError(f"mixing matrix entry [{i}, {j}] is {m[i, j]}, must be finite")
    asym = np.abs(m - m.T)
    if asym.max() > tol:
        i, j = np.unravel_index(int(np.argmax(asym)), asym.shape)
        raise ConfigError(
            f"mixing matrix is not symmetric: W[{i}, {j}] = {m[i, j]:.12g} but W[{j}, {i}] = {m[j, i]:.12g}"
        )
    if m.min() < -tol:
        i, j = np.unravel_index(int(np.argmin(m)), m.shape)
        raise ConfigError(f"mixing matrix entry [{i}, {j}] is {m[i, j]:.12g}, must be >= 0")
    sums = m.sum(axis=1)
    off = np.flatnonzero(np.abs(sums - 1.0) > tol)
    if off.size:
        i = int(off[0])
        raise ConfigError(f"mixing matrix row {i} sums to {sums[i]:.12g}, must be 1")
    if n == 1:
        return 1.0
    eigenvalues = np.linalg.eigvalsh((m + m.T) / 2.0)  # ascending; the largest is 1
    slem = max(abs(float(eigenvalues[0])), abs(float(eigenvalues[-2])))
    if slem < 1.0 - tol:
        return 1.0 - slem
    groups = len(set(_components(m > 0)))
    if groups > 1:
        raise ConfigError(
            f"mixing matrix is disconnected: workers form {groups} groups that never "
            f"exchange (second-largest eigenvalue modulus is 1), must be connected"
        )
    if eigenvalues[0] <= -1.0 + tol:
        raise ConfigError(
            "mixing matrix is periodic: it has eigenvalue -1 (bipartite graph with zero "
            "diagonal), so averaging oscillates; give workers positive self-weights"
        )
    raise ConfigError(
        f"mixing matrix second-largest eigenvalue modulus is {slem:.12g}, must be below 1 - {tol:g}"
    )


def load_weights(path: str | os.PathLike[str]) -> FloatMatrix:
    """Load and validate a user mixing matrix from a `.npy` file or a whitespace-separated text file."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise ConfigError(f"weights file {name!r} does not exist")
    try:
        if name.endswith(".npy"):
            raw = np.load(name, allow_pickle=False)
        else:
            raw = np.loadtxt(name, dtype=np.float64, ndmin=2)
        w = _as_float_matrix(raw, "mixing matrix")
        validate_mixing_matrix(w)
    except ConfigError as exc:
        raise ConfigError(f"weights file {name!r}: {exc}") from None
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"weights file {name!r} is not a readable numeric matrix: {reason}") from None
    return w


def describe(topology: Topology) -> str:
    """One-line summary for logs: name, size, edge count, max degree and spectral gap."""
    return (
        f"topology {topology.name}: n={topology.n}, {len(topology.edges)} edges, "
        f"max degree {topology.max_degree}, spectral gap {topology.spectral_gap:.4g}"
    )


def _check_n(n: object) -> None:
    """Reject a worker count that is not a positive integer."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ConfigError(f"n (number of workers) must be an integer >= 1, got {n!r}")


def _as_float_matrix(w: npt.ArrayLike, what: str) -> FloatMatrix:
    """`w` as a float64 array, checked to be a non-empty square matrix."""
    try:
        m = np.asarray(w, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a numeric square matrix, got {type(w).__name__}") from None
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ConfigError(f"{what} must be a non-empty square 2-D matrix, got shape {m.shape}")
    return m


def _as_adjacency(adjacency: npt.ArrayLike) -> BoolMatrix:
    """A square, symmetric 0/1 matrix as booleans with the diagonal (self loops) cleared."""
    m = _as_float_matrix(adjacency, "adjacency")
    if not np.all((m == 0) | (m == 1)):
        raise ConfigError("adjacency must contain only 0/1 (or False/True) entries")
    adj = m == 1
    if not np.array_equal(adj, adj.T):
        raise ConfigError("adjacency must be symmetric (an undirected graph)")
    np.fill_diagonal(adj, False)
    return adj


def _components(adj: BoolMatrix) -> list[int]:
    """Connected-component label of every node of an undirected graph (breadth-first search)."""
    n = adj.shape[0]
    label = [-1] * n
    for start in range(n):
        if label[start] >= 0:
            continue
        label[start] = start
        frontier = [start]
        while frontier:
            nxt: list[int] = []
            for i in frontier:
                for j in np.flatnonzero(adj[i]).tolist():
                    if label[j] < 0:
                        label[j] = start
                        nxt.append(j)
            frontier = nxt
    return label


def _torus_side(n: int) -> int:
    """Largest divisor of n that is at most sqrt(n): the short side of the most square torus."""
    return max(a for a in range(1, math.isqrt(n) + 1) if n % a == 0)


def _erdos_renyi(n: int, p: float, seed: int) -> BoolMatrix:
    """Connected G(n, p), redrawn from one seeded generator until connected."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
        raise ConfigError(f"p (edge probability) must be a number in [0, 1], got {p!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    for _ in range(ER_MAX_DRAWS):
        upper = np.triu(rng.random((n, n)) < p, k=1)
        adj = upper | upper.T
        if len(set(_components(adj))) == 1:
            return adj
    hint = math.log(n) / n
    raise ConfigError(
        f"p={p} is too small: erdos_renyi graph on n={n} workers was disconnected in all "
        f"{ER_MAX_DRAWS} draws; use p of at least about ln(n)/n = {hint:.3g}"
    )

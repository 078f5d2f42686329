"""PowerSGD (Vogels, Karimireddy, Jaggi 2019) as a gradient reducer: rank-r approximation by one
warm-started power-iteration step, with error feedback, built on all-reduce.

Each gradient tensor is viewed as an n x m matrix (first dimension by the rest). For those where
compression pays, r (n + m) * min_compression_rate < n m, with M = gradient + error:

    P = M Q;  all-reduce P;  orthonormalize P;  Q = M^T P;  all-reduce Q (mean);  gradient := P Q^T

Every P of every matrix travels in one flat all-reduce together with the tensors that go uncompressed
(one dimension: biases, norms; matrices that would not shrink), every Q in a second: two collectives a
step, so that a small model's step pays two latencies, not three. Q is kept for the next step (warm
start) with its columns scaled to unit norm: orthonormalizing it would change P only by an r x r factor
on the right, which P's own orthonormalization removes, and the scaling keeps P clear of under- and
overflow. The first Q comes from a seed derived from `ctx.seed`, the same on every worker.

Same-shape matrices sit next to each other in the flat buffers, so each product above is one batched
matmul per distinct shape. P and Q are stored transposed (r x n, r x m): on a CPU, M Q and M^T P with
their r-column right factor run several times slower than the same products written Q^T M^T and P^T M.

The result depends only on the workers' mean M (linearity): P and Q are sums of per-worker products.

Error feedback: a worker's new error is M minus its own share of the approximation, P Q_i^T with
Q_i = M^T P before the all-reduce (the mean of the shares is P Q^T). The workers' mean error, and so
every update, is the same as with error = M - P Q^T (epfml/powersgd), but each local error stays a
projection residual of its M instead of also accumulating the worker's distance from the mean gradient.

The first `warmup_steps` steps are plain all-reduce steps. The local torch SGD applies momentum and
weight decay to the result, as with DDP and PyTorch's powerSGD_hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from commsgd.algorithms.base import Algorithm, register
from commsgd.algorithms.compressed import FlatGradients, Traffic, derived_seed, load_into
from commsgd.compression import NonFiniteError, initial_q, low_rank, orthonormalize_
from commsgd.config import bounded
from commsgd.finite import all_finite
from commsgd.flat import parameters_of

if TYPE_CHECKING:
    from commsgd.context import WorkerContext

_TINY = torch.finfo(torch.float32).tiny


@dataclass
class PowerSGDParams:
    rank: int = bounded(2, ge=1, doc="rank r of the approximation (1, 2 or 4 in practice)")
    warmup_steps: int = bounded(0, ge=0, doc="plain all-reduce steps before compression starts")
    error_feedback: bool = True
    min_compression_rate: float = bounded(
        1.0, ge=1.0, doc="compress a matrix only when n*m > rate * r*(n+m) (PyTorch's hook uses 2)"
    )


def planned_rank(shape: torch.Size, rank: int, min_rate: float = 1.0) -> int | None:
    """The rank used for a tensor of `shape`, or None when it travels uncompressed."""
    r = low_rank(shape, rank)
    if r is None:
        return None
    n = shape[0]
    m = shape.numel() // n
    return r if r * (n + m) * min_rate < n * m else None


@dataclass(frozen=True)
class ShapeGroup:
    """`count` same-shape n x m matrices of rank r: batched views into the flat buffers."""

    count: int
    n: int
    m: int
    r: int
    matrices: Tensor  # (count, n, m): M, later the approximation
    errors: Tensor  # (count, n, m)
    pt: Tensor  # (count, r, n): P transposed
    qt: Tensor  # (count, r, m): Q transposed; the warm start, then this step's mean Q
    qt_local: Tensor  # (count, r, m): this worker's Q before the all-reduce, transposed


@register
class PowerSGD(Algorithm):
    """PowerSGD reducer: low-rank gradients with error feedback; two all-reduces per step (every P
    with the uncompressed gradients, then every Q)."""

    name = "powersgd"
    summary_line = "PowerSGD: rank-r power iteration with warm start and error feedback, all-reduced"
    Params = PowerSGDParams
    params: PowerSGDParams

    def bind(self, ctx: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().bind(ctx, model, optimizer)
        params = parameters_of(model)
        by_shape: dict[tuple[int, int, int], list[torch.Tensor]] = {}
        plain: list[torch.Tensor] = []
        for p in params:
            r = planned_rank(p.shape, self.params.rank, self.params.min_compression_rate)
            if r is None:
                plain.append(p)
            else:
                by_shape.setdefault((p.shape[0], p.numel() // p.shape[0], r), []).append(p)
        matrices = [p for group in by_shape.values() for p in group]
        self._matrix = FlatGradients(matrices) if matrices else None
        device = params[0].device
        numel = 0 if self._matrix is None else self._matrix.numel
        self._error = torch.zeros(numel, device=device)
        p_numel = sum(len(ps) * n * r for (n, _, r), ps in by_shape.items())
        q_numel = sum(len(ps) * m * r for (_, m, r), ps in by_shape.items())
        # one message for every P and the uncompressed gradients after them: one all-reduce, not two
        self._p_and_plain = torch.zeros(p_numel + sum(p.numel() for p in plain), device=device)
        self._p = self._p_and_plain[:p_numel]
        self._plain = FlatGradients(plain, self._p_and_plain[p_numel:]) if plain else None
        self._q = initial_q(q_numel, 1, derived_seed(ctx.seed, 4), device).view(-1)
        self._q_local = torch.zeros_like(self._q)
        self._groups = self._views(by_shape)
        self._normalize_q()
        self._traffic = Traffic.for_allreduce(sum(p.numel() for p in params), ctx.world_size)

    def _views(self, by_shape: dict[tuple[int, int, int], list[torch.Tensor]]) -> list[ShapeGroup]:
        groups, at_m, at_p, at_q = [], 0, 0, 0
        for (n, m, r), ps in by_shape.items():
            c = len(ps)
            assert self._matrix is not None
            groups.append(
                ShapeGroup(
                    c,
                    n,
                    m,
                    r,
                    self._matrix.buffer[at_m : at_m + c * n * m].view(c, n, m),
                    self._error[at_m : at_m + c * n * m].view(c, n, m),
                    self._p[at_p : at_p + c * n * r].view(c, r, n),
                    self._q[at_q : at_q + c * m * r].view(c, r, m),
                    self._q_local[at_q : at_q + c * m * r].view(c, r, m),
                )
            )
            at_m, at_p, at_q = at_m + c * n * m, at_p + c * n * r, at_q + c * m * r
        return groups

    # -- the step ---------------------------------------------------------------------------

    def after_backward(self, step: int) -> None:
        ctx = self.bound_ctx
        if step <= self.params.warmup_steps:
            self._all_reduce_plainly()
            return
        comm, world = ctx.comm, ctx.world_size
        with self._traffic.step(comm):
            plain = None if self._plain is None else self._plain.gather()
            if self._matrix is not None:
                m = self._matrix.gather()
                if self.params.error_feedback:
                    m.add_(self._error)
                for g in self._groups:  # P^T = Q^T M^T
                    torch.bmm(g.qt, g.matrices.transpose(1, 2), out=g.pt)
            comm.all_reduce(self._p_and_plain, op="sum")  # every P and the uncompressed gradients
            self._check_finite(plain)  # reduced sums: every rank raises, or none; before any state changes
            if self._matrix is not None:
                self._project(world)
            if self._plain is not None and plain is not None:
                self._plain.scatter(plain.div_(world))

    def _project(self, world: int) -> None:
        """From the all-reduced P: Q, its all-reduce, the new error, and the approximation as gradient."""
        assert self._matrix is not None
        comm = self.bound_ctx.comm
        for g in self._groups:  # Q^T = P^T M
            orthonormalize_(g.pt.transpose(1, 2))
            torch.bmm(g.pt, g.matrices, out=g.qt)
        feedback = self.params.error_feedback
        if feedback:
            self._q_local.copy_(self._q)
        pending = comm.all_reduce(self._q, op="sum", async_op=True)
        assert pending is not None
        if feedback:  # overlaps with the Q all-reduce
            for g in self._groups:
                torch.baddbmm(g.matrices, g.pt.transpose(1, 2), g.qt_local, alpha=-1, out=g.errors)
        pending.wait()
        self._q.div_(world)
        for g in self._groups:
            torch.bmm(g.pt.transpose(1, 2), g.qt, out=g.matrices)
        self._matrix.scatter(self._matrix.buffer)
        self._normalize_q()

    def _normalize_q(self) -> None:
        """Scale every column of the warm-start Q to unit norm (done after a step, so that a step that
        raises on non-finite input leaves Q exactly as it was)."""
        for g in self._groups:
            g.qt.div_(torch.linalg.vector_norm(g.qt, dim=2, keepdim=True).clamp_(min=_TINY))

    def _check_finite(self, plain: Tensor | None) -> None:
        for name, t in (("P", self._p), ("uncompressed gradients", plain)):
            if t is not None and not all_finite([t]):
                raise NonFiniteError(
                    f"powersgd: the all-reduced {name} hold NaN or Inf (a worker's gradient)"
                )

    def _all_reduce_plainly(self) -> None:
        """A warm-up step: the mean gradient, uncompressed (one all-reduce per flat buffer)."""
        ctx = self.bound_ctx
        for flat in (self._plain, self._matrix):
            if flat is not None:
                buffer = flat.gather()
                ctx.comm.all_reduce(buffer, op="sum")
                flat.scatter(buffer.div_(ctx.world_size))

    # -- resume and reporting ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"error": self._error.clone(), "q": self._q.clone(), "traffic": self._traffic.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_into("powersgd error", self._error, state["error"])
        load_into("powersgd q", self._q, state["q"])
        self._traffic.load_state_dict(state["traffic"])

    def summary(self) -> dict[str, Any]:
        """Traffic of the compressed steps (warm-up steps send what all-reduce sends)."""
        return {
            "rank": self.params.rank,
            "compressed_tensors": sum(g.count for g in self._groups),
            "uncompressed_tensors": 0 if self._plain is None else len(self._plain.params),
            **self._traffic.summary(),
        }

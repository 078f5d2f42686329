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

`overlap`: the parameters are cut into buckets of about `bucket_mb` (whole tensors, in the reverse order
backward finishes them: `commsgd.algorithms.lanes.Overlap`), each bucket its own P and Q messages (a
`PowerBucket`), and a bucket's P leaves as soon as backward has its gradients. The two rounds pipeline:
posting bucket i's P first takes bucket i-1's P back, orthonormalizes it and posts its Q, so every worker
sends P0, P1, Q0, P2, Q1, ... and `after_backward` has only the last Q to wait for. Each matrix's math is
the same as without overlap (a matrix's initial Q is the one it gets in the whole-model layout), so only
the grouping of messages changes. While a step is in flight nothing of the kept state changes: M lives
beside the gradient, the new error beside the old one and the new Q beside the warm start, and all of it
is taken on only when every bucket's P came back finite. A bucket whose all-reduced P is not finite (a
worker's gradient was NaN when backward sent it) makes the step's gradient NaN on every worker, which the
non-finite guard skips alike; a second backward pass before the step (accumulation without `no_sync`)
drops what the first one sent.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from commsgd.algorithms.base import Algorithm, register
from commsgd.algorithms.compressed import FlatGradients, Traffic, derived_seed, load_into
from commsgd.algorithms.lanes import Overlap, OverlapsBackward, bucket_states
from commsgd.comm import Communicator, Pending
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
    overlap: bool = bounded(
        False, doc="send each gradient bucket's P and Q while backward runs (each bucket its own messages)"
    )
    bucket_mb: float = bounded(25.0, gt=0, doc="overlap: gradient bucket size in MB (DDP's default is 25)")


def planned_rank(shape: torch.Size, rank: int, min_rate: float = 1.0) -> int | None:
    """The rank used for a tensor of `shape`, or None when it travels uncompressed."""
    r = low_rank(shape, rank)
    if r is None:
        return None
    n = shape[0]
    m = shape.numel() // n
    return r if r * (n + m) * min_rate < n * m else None


Layout = dict[tuple[int, int, int], list[torch.Tensor]]


def layout(params: Sequence[torch.Tensor], rank: int, min_rate: float) -> tuple[Layout, list[torch.Tensor]]:
    """The compressed matrices grouped by (n, m, r) in first-seen order, and the tensors sent as they are."""
    by_shape: Layout = {}
    plain: list[torch.Tensor] = []
    for p in params:
        r = planned_rank(p.shape, rank, min_rate)
        if r is None:
            plain.append(p)
        else:
            by_shape.setdefault((p.shape[0], p.numel() // p.shape[0], r), []).append(p)
    return by_shape, plain


def initial_qs(by_shape: Layout, seed: int) -> dict[int, Tensor]:
    """Each matrix's first Q (transposed, r x m), keyed by the parameter's id: drawn for the whole
    model's layout at once, so that a bucket's matrices start where they would without buckets."""
    q = initial_q(sum(len(ps) * m * r for (_, m, r), ps in by_shape.items()), 1, seed).view(-1)
    out, at = {}, 0
    for (_, m, r), ps in by_shape.items():
        for p in ps:
            out[id(p)] = q[at : at + m * r].view(r, m)
            at += m * r
    return out


@dataclass(frozen=True)
class ShapeGroup:
    """`count` same-shape n x m matrices of rank r: batched views into a bucket's flat buffers."""

    count: int
    n: int
    m: int
    r: int
    matrices: Tensor  # (count, n, m): M = gradient + error (overlap: then the new error)
    out: Tensor  # (count, n, m): the gradients' storage, where the approximation goes
    errors: Tensor  # (count, n, m): the error kept from the last step
    pt: Tensor  # (count, r, n): P transposed
    qt: Tensor  # (count, r, m): Q transposed, the warm start (kept until the step is taken)
    qt_sum: Tensor  # (count, r, m): this step's Q, all-reduced, then the workers' mean
    qt_local: Tensor  # (count, r, m): this worker's Q before the all-reduce


class PowerBucket:
    """The parameters of one message pair: P of every matrix with the uncompressed tensors, then every
    Q. `in_place` (the one bucket without overlap) builds M in the gradients' storage and writes the new
    error over the old one; otherwise both live beside them (a later backward pass may still add to the
    gradients, and a step in flight may be dropped), and the new error is taken on by `take`."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        qs: dict[int, Tensor],
        p: PowerSGDParams,
        comm: Communicator,
        world_size: int,
        in_place: bool,
    ) -> None:
        self._comm, self._world, self._in_place = comm, world_size, in_place
        self._feedback = p.error_feedback
        by_shape, plain = layout(params, p.rank, p.min_compression_rate)
        matrices = [t for group in by_shape.values() for t in group]
        self.matrix = FlatGradients(matrices) if matrices else None
        self.plain = FlatGradients(plain) if plain else None
        device = params[0].device
        numel = 0 if self.matrix is None else self.matrix.numel
        self.error = torch.zeros(numel, device=device)
        if self.matrix is None or in_place:
            self._m = self.matrix.buffer if self.matrix is not None else self.error
        else:
            self._m = torch.zeros(numel, device=device)
        p_numel = sum(len(ps) * n * r for (n, _, r), ps in by_shape.items())
        self._message = torch.zeros(p_numel + sum(t.numel() for t in plain), device=device)
        self._p, self._plain_sent = self._message[:p_numel], self._message[p_numel:]
        first_q = [qs[id(t)].reshape(-1) for t in matrices]
        self.q = torch.cat(first_q).to(device) if first_q else torch.zeros(0, device=device)
        self._q_sum, self._q_local = torch.zeros_like(self.q), torch.zeros_like(self.q)
        self.groups = self._views(by_shape)
        self.normalize_q()
        self.dense = False  # this step is a warm-up step: the gradients all-reduced as they are
        self.previous: PowerBucket | None = None  # the bucket posted before this one (overlap)
        self.failure: str | None = None  # what came back not finite
        self._pending: list[Pending] = []
        self._stage = "idle"  # idle -> "p" (P in flight) -> "q" (Q in flight); "dense": warm-up in flight

    def _views(self, by_shape: Layout) -> list[ShapeGroup]:
        if self.matrix is None:
            return []
        groups, at_m, at_p, at_q = [], 0, 0, 0
        for (n, m, r), ps in by_shape.items():
            c = len(ps)
            mats = [
                t[at_m : at_m + c * n * m].view(c, n, m) for t in (self._m, self.matrix.buffer, self.error)
            ]
            pt = self._p[at_p : at_p + c * n * r].view(c, r, n)
            qts = [t[at_q : at_q + c * m * r].view(c, r, m) for t in (self.q, self._q_sum, self._q_local)]
            groups.append(ShapeGroup(c, n, m, r, mats[0], mats[1], mats[2], pt, qts[0], qts[1], qts[2]))
            at_m, at_p, at_q = at_m + c * n * m, at_p + c * n * r, at_q + c * m * r
        return groups

    @property
    def compressed_tensors(self) -> int:
        return sum(g.count for g in self.groups)

    # -- the messages, in the order every worker sends them ------------------------------------

    def post(self, blocking: bool = False) -> None:
        """Send this bucket's first message (P with the uncompressed tensors, or a warm-up's gradients);
        then take the bucket before it one round further (its Q), so that the rounds pipeline."""
        self.failure = None
        if self.plain is not None:
            self._plain_sent.copy_(self.plain.gather())
        if self.dense:
            self._stage = "dense"
            if self.matrix is not None:
                m = self.matrix.gather()
                self._send(self._m if self._m is m else self._m.copy_(m), blocking)
            if self.plain is not None:
                self._send(self._plain_sent, blocking)
        else:
            self._stage = "p"
            if self.matrix is not None:
                g = self.matrix.gather()
                if self._feedback:
                    torch.add(g, self.error, out=self._m)
                elif self._m is not g:
                    self._m.copy_(g)
                for group in self.groups:  # P^T = Q^T M^T
                    torch.bmm(group.qt, group.matrices.transpose(1, 2), out=group.pt)
            self._send(self._message, blocking)
        if self.previous is not None:
            self.previous.advance()

    def _send(self, tensor: Tensor, blocking: bool) -> None:
        pending = self._comm.all_reduce(tensor, op="sum", async_op=not blocking)
        if pending is not None:
            self._pending.append(pending)

    def _wait(self) -> None:
        for pending in self._pending:
            pending.wait()
        self._pending.clear()

    def advance(self) -> None:
        """P is back: check it, orthonormalize it, compute this worker's Q and send it; the residual
        (the new error) is computed while Q travels. A P that is not finite stops the bucket here."""
        if self._stage != "p":
            return
        self._wait()
        self._stage = "q"
        if not all_finite([self._message]):  # reduced sums: every rank sees the same
            self.failure = (
                "powersgd: the all-reduced P or uncompressed gradients hold NaN or Inf (a worker's gradient)"
            )
            return
        if self.matrix is None:
            return
        for g in self.groups:  # Q^T = P^T M
            orthonormalize_(g.pt.transpose(1, 2))
            torch.bmm(g.pt, g.matrices, out=g.qt_sum)
        if self._feedback:
            self._q_local.copy_(self._q_sum)
        self._send(self._q_sum, blocking=False)
        if self._feedback:  # overlaps with the Q all-reduce
            for g in self.groups:
                if self._in_place:
                    torch.baddbmm(g.matrices, g.pt.transpose(1, 2), g.qt_local, alpha=-1, out=g.errors)
                else:  # over M itself: the new error, taken on by `apply`
                    g.matrices.baddbmm_(g.pt.transpose(1, 2), g.qt_local, alpha=-1)

    def wait(self) -> bool:
        """Wait for the last message; whether everything that came back is finite."""
        self.advance()
        self._wait()
        return self.failure is None

    def apply(self) -> None:
        """Write the workers' mean (warm-up) or the approximation P Q^T as the gradients, and take on
        this step's error and Q."""
        stage, self._stage = self._stage, "idle"
        world = self._world
        if self.plain is not None:
            self.plain.scatter(torch.div(self._plain_sent, world, out=self.plain.buffer))
        if self.matrix is None:
            return
        buffer = self.matrix.buffer
        if stage == "dense":
            self.matrix.scatter(torch.div(self._m, world, out=buffer))
            return
        self._q_sum.div_(world)
        for g in self.groups:
            torch.bmm(g.pt.transpose(1, 2), g.qt_sum, out=g.out)
        self.matrix.scatter(buffer)
        if self._feedback and not self._in_place:
            self.error, self._m = self._m, self.error
            self.groups = [replace(g, matrices=g.errors, errors=g.matrices) for g in self.groups]
        self.q.copy_(self._q_sum)
        self.normalize_q()

    def fail(self) -> None:
        """The step is not taken: the gradients become NaN (the guard skips the step on every worker);
        the error and the warm start stay as they were."""
        self._stage = "idle"
        for flat in (self.matrix, self.plain):
            if flat is not None:
                flat.scatter(flat.buffer.fill_(math.nan))

    def discard(self) -> None:
        """Wait for what is in flight and forget it (a later backward pass of the step sends instead)."""
        self._wait()
        self._stage = "idle"
        self.failure = None

    def normalize_q(self) -> None:
        """Scale every column of the warm-start Q to unit norm."""
        for g in self.groups:
            g.qt.div_(torch.linalg.vector_norm(g.qt, dim=2, keepdim=True).clamp_(min=_TINY))

    def state_dict(self) -> dict[str, Tensor]:
        return {"error": self.error.clone(), "q": self.q.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        load_into("powersgd error", self.error, state["error"])
        load_into("powersgd q", self.q, state["q"])


@register
class PowerSGD(OverlapsBackward, Algorithm):
    """PowerSGD reducer: low-rank gradients with error feedback; two all-reduces per step (every P
    with the uncompressed gradients, then every Q), or two per bucket sent during backward (`overlap`)."""

    name = "powersgd"
    summary_line = "PowerSGD: rank-r power iteration with warm start and error feedback, all-reduced"
    Params = PowerSGDParams
    params: PowerSGDParams

    def bind(self, ctx: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().bind(ctx, model, optimizer)
        params = parameters_of(model)
        p = self.params
        qs = initial_qs(layout(params, p.rank, p.min_compression_rate)[0], derived_seed(ctx.seed, 4))
        self._traffic = Traffic.for_allreduce(sum(t.numel() for t in params), ctx.world_size)
        self._overlap: Overlap[PowerBucket] | None = None
        if p.overlap:
            self._overlap = Overlap(
                params,
                int(p.bucket_mb * 2**20),
                # a bucket lays its tensors out in the model's order: one bucket is the layout without overlap
                lambda _, ps: PowerBucket(ps[::-1], qs, p, ctx.comm, ctx.world_size, in_place=False),
                self._counting,
            )
            self._buckets = self._overlap.lanes
            for before, bucket in zip(self._buckets, self._buckets[1:]):
                bucket.previous = before
        else:
            self._buckets = [PowerBucket(params, qs, p, ctx.comm, ctx.world_size, in_place=True)]
        self._set_dense(p.warmup_steps >= 1)

    def _counting(self) -> contextlib.AbstractContextManager[None]:
        """Count what is sent as compressed traffic (`summary`), except in warm-up steps."""
        if self._buckets[0].dense:
            return contextlib.nullcontext()
        return self._traffic.counting(self.bound_ctx.comm)

    def _set_dense(self, dense: bool) -> None:
        for bucket in self._buckets:
            bucket.dense = dense

    # -- the step ---------------------------------------------------------------------------

    def after_backward(self, step: int) -> None:
        ctx = self.bound_ctx
        dense = step <= self.params.warmup_steps
        with contextlib.nullcontext() if dense else self._traffic.step(ctx.comm):
            if self._overlap is None:
                self._set_dense(dense)
                self._buckets[0].post(blocking=True)
            elif self._buckets[0].dense != dense:  # backward guessed the kind of step wrong (a resume)
                self._overlap.drop()
                self._set_dense(dense)
                self._overlap.finish()
            else:
                self._overlap.finish()
            finite = [bucket.wait() for bucket in self._buckets]
        self._set_dense(step + 1 <= self.params.warmup_steps)
        if all(finite):
            for bucket in self._buckets:
                bucket.apply()
            return
        for bucket in self._buckets:
            bucket.fail()
        if self._overlap is None:  # the guard saw a finite gradient on every worker: stop, do not skip
            raise NonFiniteError(next(b.failure for b in self._buckets if b.failure is not None))

    # -- resume and reporting ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        traffic = self._traffic.state_dict()
        if self._overlap is None:
            return {**self._buckets[0].state_dict(), "traffic": traffic}
        return {"buckets": [b.state_dict() for b in self._buckets], "traffic": traffic}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        kept = bucket_states(self.name, state, self._overlap, len(self._buckets))
        for bucket, bucket_state in zip(self._buckets, kept):
            bucket.load_state_dict(bucket_state)
        self._traffic.load_state_dict(state["traffic"])

    def summary(self) -> dict[str, Any]:
        """Traffic of the compressed steps (warm-up steps send what all-reduce sends)."""
        plain = [b.plain for b in self._buckets if b.plain is not None]
        return {
            "rank": self.params.rank,
            "compressed_tensors": sum(b.compressed_tensors for b in self._buckets),
            "uncompressed_tensors": sum(len(flat.params) for flat in plain),
            **self._traffic.summary(),
        }

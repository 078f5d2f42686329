"""dist-EF-SGD (Zheng, Huang, Kwok 2019): two-way compression with error feedback on workers and server.

Each worker runs Nesterov momentum on its own gradient, adds its error, compresses and keeps the new
error; the server averages the decompressed messages, adds its own error, compresses again, keeps its
error and sends the result back; every worker applies it. With `compressor=block_sign` this is
dist-EF-BlockSGD. Errors are kept in gradient units (the learning rate is not folded in):

    worker i:  m_i = mu m_i + g_i;   d_i = g_i + mu m_i (Nesterov; m_i without);
               p_i = d_i + e_i;      send C(p_i);            e_i = p_i - C(p_i)
    server:    q = mean_i C(p_i) + e_s;   send C(q);         e_s = q - C(q)
    everyone:  x -= lr * C(q)        (the local torch SGD step, with torch momentum off)

This is the paper's form with lr-scaled errors (p = eta d + E, x -= C(p)) divided by eta. When the rate
changes from eta_{t-1} to eta_t, both error kinds are multiplied by eta_{t-1} / eta_t (the gradient is
not), which is what keeps the two forms equal; `on_lr_change` does it, and so does a step that finds the
optimizer's rate changed under it (a user's own schedule). Weight decay is part of the gradient (g += wd x,
before momentum and compression): `bind` moves each torch param group's weight_decay into the algorithm.

The server role is sharded (`server: sharded`): the flat vector is cut into one slice per rank (slices
aligned to the compressor's blocks or buckets), every worker compresses each slice and one all-to-all
delivers slice j of every worker to rank j, which acts as the server for it; one all-gather of the
compressed results brings every slice back to everyone. `server: single` is the textbook layout for
comparison: rank 0 gathers the whole compressed vectors and broadcasts the compressed result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from commsgd.algorithms.base import register
from commsgd.algorithms.compressed import (
    CompressorParams,
    OwnsMomentum,
    Traffic,
    Wire,
    derived_seed,
    load_into,
)
from commsgd.compression import QSGD, BlockSign, Compressor
from commsgd.config import bounded
from commsgd.errors import ConfigError

if TYPE_CHECKING:
    from commsgd.context import WorkerContext

SERVER_RANK = 0


@dataclass
class DistEFParams(CompressorParams):
    compressor: str = "scaled_sign"
    momentum: float = bounded(0.9, ge=0, lt=1, doc="Nesterov momentum of each worker (torch momentum is off)")
    nesterov: bool = True
    server: Literal["sharded", "single"] = "sharded"

    def validate(self) -> None:
        super().validate()
        if self.compressor == "randomk" and self.shared_indices is not False:
            raise ConfigError(
                "algo.shared_indices: dist_ef_sgd needs shared_indices=false with randomk "
                "(the server draws its own coordinates, so they must travel)"
            )


@dataclass(frozen=True)
class Slice:
    """A contiguous part of the flat vector, its compressor and the byte layout of its payloads."""

    start: int
    stop: int
    compressor: Compressor
    wire: Wire

    @property
    def numel(self) -> int:
        return self.stop - self.start


def slice_bounds(numel: int, parts: int, align: int) -> list[tuple[int, int]]:
    """`parts` consecutive ranges covering [0, numel), all but the last a multiple of `align` long
    (trailing ranges may be empty when the vector is small)."""
    size = math.ceil(math.ceil(numel / parts) / align) * align
    return [(min(j * size, numel), min((j + 1) * size, numel)) for j in range(parts)]


def segments(numels: Sequence[int], start: int, stop: int) -> list[int]:
    """Sizes of the pieces of consecutive tensors of `numels` elements that fall in [start, stop)."""
    sizes, offset = [], 0
    for n in numels:
        lo, hi = max(offset, start), min(offset + n, stop)
        if hi > lo:
            sizes.append(hi - lo)
        offset += n
    return sizes


def alignment(compressor: Compressor) -> int:
    """Slice boundaries fall on block (bucket) boundaries, so slicing does not change the blocks."""
    if isinstance(compressor, BlockSign) and compressor.sizes is None:
        return compressor.block_size
    if isinstance(compressor, QSGD):
        return compressor.bucket_size
    return 8  # whole bytes of sign bits


@register
class DistEFSGD(OwnsMomentum):
    """Two-way compressed SGD with Nesterov momentum and error feedback on both sides."""

    name = "dist_ef_sgd"
    summary_line = "dist-EF-SGD: two-way compression, Nesterov momentum, worker + server error feedback"
    Params = DistEFParams
    params: DistEFParams

    def bind(self, ctx: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().bind(ctx, model, optimizer)
        self._decay = take_weight_decay(optimizer, self._grads.params)
        numel, world = self._grads.numel, ctx.world_size
        if self.params.server == "sharded":
            probe = self.params.build(self._grads.numels)
            bounds = slice_bounds(numel, world, alignment(probe))
            self._server_slice: int | None = ctx.rank
        else:
            bounds = [(0, numel)]
            self._server_slice = 0 if ctx.rank == SERVER_RANK else None
        self._slices = [self._slice(start, stop) for start, stop in bounds]
        self._bytes = max(s.wire.nbytes for s in self._slices)
        device = self._grads.buffer.device
        self._momentum = torch.zeros(numel, device=device)
        self._error = torch.zeros(numel, device=device)
        served = 0 if self._server_slice is None else self._slices[self._server_slice].numel
        self._server_error = torch.zeros(served, device=device)
        self._worker_gen = torch.Generator(device=device).manual_seed(derived_seed(ctx.seed, 2, ctx.rank))
        self._server_gen = torch.Generator(device=device).manual_seed(derived_seed(ctx.seed, 3, ctx.rank))
        self._lr: float | None = None
        self._traffic = Traffic.for_allreduce(numel, world)

    def _slice(self, start: int, stop: int) -> Slice:
        compressor = self.params.build(segments(self._grads.numels, start, stop))
        return Slice(start, stop, compressor, Wire(compressor, stop - start))

    # -- the step ---------------------------------------------------------------------------

    def after_backward(self, step: int) -> None:
        assert self.optimizer is not None
        self._rescale_errors(float(self.optimizer.param_groups[0]["lr"]))
        comm = self.bound_ctx.comm
        with self._traffic.step(comm):
            packed = self._worker_compress()
            if self.params.server == "sharded":
                received = torch.empty_like(packed)
                comm.all_to_all(received, packed)
                rows = comm.all_gather(self._serve(received))
            else:
                gathered = comm.gather(packed[0], dst=SERVER_RANK)
                rows = self._serve(gathered).unsqueeze(0)
                comm.broadcast(rows[0], src=SERVER_RANK)
            result = torch.empty_like(self._grads.buffer)
            for piece, row in zip(self._slices, rows):
                result[piece.start : piece.stop] = piece.wire.decode(row)
            self._grads.scatter(result)

    def _worker_compress(self) -> Tensor:
        """Momentum, error feedback and compression of every slice; one row of packed bytes per slice.
        State (momentum, error) changes only once every slice has compressed (NaN input raises first)."""
        g = self._grads.gather()
        if self._decay:
            for view, p, wd in zip(g.split(self._grads.numels), self._grads.params, self._decay):
                if wd:
                    view.add_(p.detach().reshape(-1), alpha=wd)
        mu = self.params.momentum
        momentum = torch.add(g, self._momentum, alpha=mu)
        direction = torch.add(g, momentum, alpha=mu) if self.params.nesterov else momentum
        corrected = direction + self._error if self.params.error_feedback else direction
        packed = torch.zeros(len(self._slices), self._bytes, dtype=torch.uint8, device=g.device)
        sent = torch.empty_like(corrected) if self.params.error_feedback else corrected
        for row, piece in zip(packed, self._slices):
            if piece.numel == 0:
                continue
            payload = piece.compressor.compress(
                corrected[piece.start : piece.stop], generator=self._worker_gen
            )
            piece.wire.pack(payload, row)
            if self.params.error_feedback:
                sent[piece.start : piece.stop] = piece.compressor.decompress(payload)
        self._momentum = momentum
        if self.params.error_feedback:
            self._error = corrected.sub_(sent)
        return packed

    def _serve(self, received: Tensor | None) -> Tensor:
        """The server's part for its slice: average the workers' messages, add the server error,
        compress; returns the packed result (zeros on a rank that serves nothing)."""
        out = torch.zeros(self._bytes, dtype=torch.uint8, device=self._grads.buffer.device)
        if self._server_slice is None or received is None:
            return out
        piece = self._slices[self._server_slice]
        if piece.numel == 0:
            return out
        mean = torch.zeros(piece.numel, device=out.device)
        for row in received:
            mean.add_(piece.wire.decode(row))
        mean.div_(received.shape[0])
        if self.params.error_feedback:
            mean.add_(self._server_error)
        payload = piece.compressor.compress(mean, generator=self._server_gen)
        if self.params.error_feedback:
            self._server_error = mean.sub_(piece.compressor.decompress(payload))
        return piece.wire.pack(payload, out)

    # -- learning rate -----------------------------------------------------------------------

    def on_lr_change(self, old_lr: float, new_lr: float) -> None:
        self._rescale_errors(new_lr)

    def _rescale_errors(self, lr: float) -> None:
        """Errors are in units of the previous rate: multiply by eta_{t-1} / eta_t when it changed."""
        if self._lr is not None and lr != self._lr:
            factor = self._lr / lr
            self._error.mul_(factor)
            self._server_error.mul_(factor)
        self._lr = lr

    # -- resume and reporting ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "momentum": self._momentum.clone(),
            "error": self._error.clone(),
            "server_error": self._server_error.clone(),
            "worker_generator": self._worker_gen.get_state(),
            "server_generator": self._server_gen.get_state(),
            "lr": self._lr,
            "traffic": self._traffic.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_into("dist_ef_sgd momentum", self._momentum, state["momentum"])
        load_into("dist_ef_sgd error", self._error, state["error"])
        load_into("dist_ef_sgd server error", self._server_error, state["server_error"])
        self._worker_gen.set_state(state["worker_generator"])
        self._server_gen.set_state(state["server_generator"])
        self._lr = state["lr"]
        self._traffic.load_state_dict(state["traffic"])

    def summary(self) -> dict[str, Any]:
        return {"compressor": self.params.compressor, "server": self.params.server, **self._traffic.summary()}


def take_weight_decay(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> list[float]:
    """Each parameter's weight decay from its torch param group, which is then set to 0 (the algorithm
    adds it to the gradient itself). Returns [] when no group decays."""
    decay = {id(p): float(g.get("weight_decay", 0.0)) for g in optimizer.param_groups for p in g["params"]}
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0
    values = [decay.get(id(p), 0.0) for p in params]
    return values if any(values) else []

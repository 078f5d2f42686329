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

The server role is sharded (`server: sharded`) without changing the algorithm: the result is the
one of `server: single` (rank 0 gathers the whole compressed vectors and broadcasts C(q)) up to float
rounding, for every compressor and worker count. The flat vector is cut into one slice per rank
(`commsgd.compression.slices`); each worker compresses its whole vector, as one server would see it,
and sends slice j of that payload to rank j (one all-to-all); rank j averages, adds its part of the
server error and compresses its slice as part of the whole q (statistics that span slices, such as
scaled sign's ||q||_1 or the rounding grid's min and max, take one small all-reduce; stochastic
rounding draws the same random words one server would); one all-gather brings every slice back.
Compressors that pick coordinates over the whole vector (topk, randomk) cannot be cut so: there every
rank gathers all packed messages and runs the server for the whole vector itself (`layout:
replicated` in the summary), which gives the same result with no broadcast.

A compression that fails on one rank (a value beyond float16's range, a fixed rounding grid too small)
does not stop that rank alone: every message carries a status byte, a failed worker or server marks
its rows, every rank sees the marks in the results, and on every rank the step keeps the algorithm's
state as it was and hands NaN gradients to the non-finite guard, which skips (or stops) the step on
all workers alike.
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
    FlatGradients,
    OwnsMomentum,
    Traffic,
    compression_failed,
    derived_seed,
    load_into,
)
from commsgd.compression import Compressor, NonFiniteError, Payload, Wire
from commsgd.compression.slices import codec_for
from commsgd.config import bounded
from commsgd.errors import ConfigError
from commsgd.flat import parameters_of

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
    """A contiguous part of the flat vector, the compressor that decodes it and its payloads' byte layout."""

    start: int
    stop: int
    compressor: Compressor
    wire: Wire

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass
class Spare:
    """The buffers a step writes its new momentum and errors into; they swap with the kept ones after a
    step that succeeded, so a failed step leaves the state as it was and no step allocates them anew."""

    momentum: Tensor
    error: Tensor
    server_error: Tensor


@register
class DistEFSGD(OwnsMomentum):
    """Two-way compressed SGD with Nesterov momentum and error feedback on both sides."""

    name = "dist_ef_sgd"
    inner_optimizer_reason = (
        "its Nesterov momentum and both error feedbacks are the paper's SGD update x -= lr * C(q); "
        "AdamW would be a second optimizer on top"
    )
    summary_line = "dist-EF-SGD: two-way compression, Nesterov momentum, worker + server error feedback"
    Params = DistEFParams
    params: DistEFParams

    def bind(self, ctx: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().bind(ctx, model, optimizer)
        self._grads = FlatGradients(parameters_of(model))
        self._decay = take_weight_decay(optimizer, self._grads.params)
        numel, world = self._grads.numel, ctx.world_size
        self._compressor = self.params.build(self._grads.numels)
        self._codec = codec_for(self._compressor, numel, world) if self.params.server == "sharded" else None
        if self._codec is not None:
            self.layout = "sharded"
            self._slices = [
                Slice(a, b, self._codec.compressor(j), Wire(self._codec.compressor(j), b - a))
                for j, (a, b) in enumerate(self._codec.bounds)
            ]
            served = self._slices[ctx.rank].numel
        else:
            self.layout = "replicated" if self.params.server == "sharded" else "single"
            self._slices = [Slice(0, numel, self._compressor, Wire(self._compressor, numel))]
            served = numel if self.layout == "replicated" or ctx.rank == SERVER_RANK else 0
        self._row = max(s.wire.nbytes for s in self._slices) + 1  # the payload, then a status byte
        device = self._grads.buffer.device
        self._momentum = torch.zeros(numel, device=device)
        self._error = torch.zeros(numel, device=device)
        self._server_error = torch.zeros(served, device=device)
        # where the next momentum and errors are written while the current ones stay intact (a failed
        # step keeps them): the two of each kind swap after a step; plus one vector to decode into
        self._spare = Spare(*(torch.empty(n, device=device) for n in (numel, numel, served)))
        self._decoded = torch.empty(numel, device=device)
        self._worker_gen = torch.Generator(device=device).manual_seed(derived_seed(ctx.seed, 2, ctx.rank))
        # one stream for the server role, whichever ranks play it: the same draws as one server's
        self._server_gen = torch.Generator(device=device).manual_seed(derived_seed(ctx.seed, 3))
        self._lr: float | None = None
        self._traffic = Traffic.for_allreduce(numel, world)
        self.failed_steps = 0

    # -- the step ---------------------------------------------------------------------------

    def after_backward(self, step: int) -> None:
        assert self.optimizer is not None
        self._rescale_errors(float(self.optimizer.param_groups[0]["lr"]))
        comm = self.bound_ctx.comm
        with self._traffic.step(comm):
            packed, worker_state = self._worker_compress(step)
            if self.layout == "sharded":
                received = torch.empty_like(packed)
                comm.all_to_all(received, packed)
                own, server_error = self._serve(received, self._slices[self.bound_ctx.rank], step)
                rows = comm.all_gather(own)
            elif self.layout == "replicated":
                own, server_error = self._serve(comm.all_gather(packed[0]), self._slices[0], step)
                rows = own.unsqueeze(0)
            else:
                gathered = comm.gather(packed[0], dst=SERVER_RANK)
                if gathered is None:
                    own, server_error = torch.zeros(self._row, dtype=torch.uint8, device=packed.device), None
                else:
                    own, server_error = self._serve(gathered, self._slices[0], step)
                comm.broadcast(own, src=SERVER_RANK)
                rows = own.unsqueeze(0)
        if worker_state is None or bool(rows[:, -1].any()):
            # every rank sees the same status bytes: all keep their state, all hand NaN to the guard
            self.failed_steps += 1
            self._grads.scatter(torch.full_like(self._grads.buffer, math.nan))
            return
        momentum, error = worker_state
        self._momentum, self._spare.momentum = momentum, self._momentum
        if error is not None:
            self._error, self._spare.error = error, self._error
        if server_error is not None:
            self._server_error, self._spare.server_error = server_error, self._server_error
        result = self._grads.buffer  # the gradient is spent: the result goes where it was (no copy)
        for piece, row in zip(self._slices, rows):
            piece.wire.decode(row, out=result[piece.start : piece.stop])
        self._grads.scatter(result)

    def _worker_compress(self, step: int) -> tuple[Tensor, tuple[Tensor, Tensor | None] | None]:
        """Momentum, error feedback and compression of this worker's whole vector, one row of packed bytes
        per slice; returns the rows and the new (momentum, error), or marked rows and None when the
        compression fails (the state is then left as it was)."""
        g = self._grads.gather()
        if self._decay:
            for view, p, wd in zip(g.split(self._grads.numels), self._grads.params, self._decay):
                if wd:
                    view.add_(p.detach().reshape(-1), alpha=wd)
        mu, feedback = self.params.momentum, self.params.error_feedback
        momentum = torch.add(g, self._momentum, alpha=mu, out=self._spare.momentum)
        # the gradient is not needed past the momentum: the direction is written over it
        direction = g.add_(momentum, alpha=mu) if self.params.nesterov else momentum
        corrected = torch.add(direction, self._error, out=self._spare.error) if feedback else direction
        packed = torch.zeros(len(self._slices), self._row, dtype=torch.uint8, device=g.device)
        try:
            payloads = self._compress(corrected, self._worker_gen)
        except NonFiniteError as exc:
            compression_failed(self.bound_ctx, step, exc)
            packed[:, -1] = 1
            return packed, None
        for row, piece, payload in zip(packed, self._slices, payloads):
            if piece.numel == 0:
                continue
            piece.wire.pack(payload, row)
            if feedback:
                part = slice(piece.start, piece.stop)
                corrected[part].sub_(piece.compressor.decompress(payload, out=self._decoded[part]))
        return packed, (momentum, corrected if feedback else None)

    def _compress(self, x: Tensor, generator: torch.Generator) -> list[Payload]:
        """C(x) for the whole vector, one payload per slice (each slice's part of the one result)."""
        if self._codec is None:
            return [self._compressor.compress(x, generator=generator)]
        codec = self._codec
        parts = [x[piece.start : piece.stop] for piece in self._slices]
        shared = codec.combine([codec.stats(part, j) for j, part in enumerate(parts)])
        return [codec.encode(part, j, shared, generator) for j, part in enumerate(parts)]

    def _serve(self, received: Tensor, piece: Slice, step: int) -> tuple[Tensor, Tensor | None]:
        """The server's part for `piece`: average the workers' rows, add the server error, compress;
        returns the packed row (status byte set when a worker's row or this compression failed) and the
        new server error (None when it failed)."""
        out = torch.zeros(self._row, dtype=torch.uint8, device=self._grads.buffer.device)
        failed = bool(received[:, -1].any())
        mean = self._spare.server_error  # the next server error (scratch without error feedback)
        if failed:
            mean.zero_()
        else:
            decoded = self._decoded[: piece.numel]
            piece.wire.decode(received[0], out=mean)
            for row in received[1:]:
                mean.add_(piece.wire.decode(row, out=decoded))
            mean.div_(received.shape[0])
            if self.params.error_feedback:
                mean.add_(self._server_error)
        try:
            payload = self._serve_compress(mean)  # also on a failed step: every owner draws alike
        except NonFiniteError as exc:
            compression_failed(self.bound_ctx, step, exc)
            failed = True
        if failed:
            out[-1] = 1
            return out, None
        piece.wire.pack(payload, out)
        if not self.params.error_feedback:
            return out, None
        return out, mean.sub_(piece.compressor.decompress(payload, out=self._decoded[: piece.numel]))

    def _serve_compress(self, mean: Tensor) -> Payload:
        """C(q) for the served part: all of q, or this rank's slice of it (collective when sharded)."""
        if self._codec is None:
            return self._compressor.compress(mean, generator=self._server_gen)
        codec, j = self._codec, self.bound_ctx.rank
        shared = codec.stats(mean, j)
        if codec.num_stats:
            self.bound_ctx.comm.all_reduce(shared, op=codec.op)
        return codec.encode_alone(mean, j, shared, self._server_gen)

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
            "failed_steps": self.failed_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_into("dist_ef_sgd momentum", self._momentum, state["momentum"])
        load_into("dist_ef_sgd error", self._error, state["error"])
        load_into("dist_ef_sgd server error", self._server_error, state["server_error"])
        self._worker_gen.set_state(state["worker_generator"])
        self._server_gen.set_state(state["server_generator"])
        self._lr = state["lr"]
        self._traffic.load_state_dict(state["traffic"])
        self.failed_steps = int(state.get("failed_steps", 0))

    def summary(self) -> dict[str, Any]:
        return {
            "compressor": self.params.compressor,
            "server": self.params.server,
            "layout": self.layout,
            "failed_steps": self.failed_steps,
            **self._traffic.summary(),
        }


def take_weight_decay(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> list[float]:
    """Each parameter's weight decay from its torch param group, which is then set to 0 (the algorithm
    adds it to the gradient itself). Returns [] when no group decays."""
    decay = {id(p): float(g.get("weight_decay", 0.0)) for g in optimizer.param_groups for p in g["params"]}
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0
    values = [decay.get(id(p), 0.0) for p in params]
    return values if any(values) else []

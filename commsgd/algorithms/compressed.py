"""Compressed gradient averaging: error-feedback SGD over any compressor, and signum with majority vote.

`ef_sgd` (EF-SGD, Karimireddy et al. 2019) compresses one flat float32 vector of all gradients per step:

    p = g + e;   send C(p);   e = p - decompress(C(p))          (e is kept only with error_feedback)

and averages the workers' decompressed messages. Payloads that can be added without decoding (the
compressor is `summable`: fp16, none, randomk with shared indices) are all-reduced; the others (sign,
top-k, QSGD, ...) are all-gathered as packed bytes, and every worker decodes all of them and averages.
The raw gradient is compressed: the local torch SGD applies momentum and weight decay to the averaged
gradient, identically on every worker. `qsgd`, `topk`, `randomk` and `fp16` are `ef_sgd` with that
compressor and its usual error-feedback default (`ef_alias`).

`signum` (Bernstein et al. 2018): each worker keeps m = beta m + (1 - beta) g, all-gathers the packed
signs of m, and steps x -= lr_scale * lr * sign(sum of the workers' signs) (a tie, possible with an even
number of workers, leaves the coordinate unchanged). A sign moves every coordinate by the full step, so
the step must be far smaller than an SGD rate: lr_scale 0.02 gives 0.001 at the trainer's lr 0.05 (the
signSGD papers use 1e-4 to 1e-3). Torch momentum is off; torch weight decay stays on and is decoupled:
x -= lr * (lr_scale * vote + wd x).

The helpers here (`FlatGradients`, `CompressorParams`, `Traffic`, `OwnsMomentum`) are shared with
`dist_ef_sgd`; the byte layout of a payload is `commsgd.compression.Wire`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from commsgd.algorithms.base import Algorithm, register
from commsgd.algorithms.lanes import Lane, Overlap, OverlapsBackward, bucket_states, in_model_order
from commsgd.comm import Communicator
from commsgd.compression import (
    Compressor,
    ErrorFeedback,
    RandomK,
    get,
)
from commsgd.config import OptimConfig, bounded
from commsgd.errors import ConfigError, say
from commsgd.finite import all_finite
from commsgd.flat import parameters_of

if TYPE_CHECKING:
    from commsgd.context import WorkerContext

FLOAT32_BYTES = 4


# ---------------------------------------------------------------------------------------- shared helpers


class FlatGradients:
    """The gradients of a parameter list as one float32 vector (one message), and back.

    After `scatter(buffer)` every gradient is a view of the vector (as DDP's `gradient_as_bucket_view`;
    a gradient that is a view of another buffer, such as DDP's bucket, is written in place instead): the
    next backward pass accumulates into it, so `gather` and `scatter(buffer)` copy nothing while the
    views last. A gradient replaced meanwhile (`zero_grad(set_to_none=True)`, an assignment) is copied in
    by `gather` and the views are set again by the next `scatter`. A parameter without a gradient counts
    as a zero gradient (as in `allreduce`).
    """

    def __init__(self, params: Sequence[torch.Tensor], buffer: Tensor | None = None) -> None:
        """`buffer`: where the vector lives (e.g. a slice of a larger message); default: its own."""
        if not params:
            raise ValueError("FlatGradients needs at least one parameter")
        self.params = list(params)
        self.numels = [p.numel() for p in self.params]
        self.numel = sum(self.numels)
        if buffer is None:
            buffer = torch.zeros(self.numel, dtype=torch.float32, device=self.params[0].device)
        if buffer.shape != (self.numel,) or buffer.dtype != torch.float32:
            raise ValueError(f"FlatGradients needs a float32 buffer of {self.numel} elements")
        self.buffer = buffer
        viewable = all(p.dtype == torch.float32 and p.device == self.buffer.device for p in self.params)
        self._views = (
            [v.view_as(p) for v, p in zip(self.buffer.split(self.numels), self.params)] if viewable else None
        )

    def viewed(self) -> bool:
        """Whether every gradient is still the view of the vector that `scatter` left there."""
        return self._views is not None and all(
            p.grad is not None and p.grad.data_ptr() == v.data_ptr() and p.grad.shape == v.shape
            for p, v in zip(self.params, self._views)
        )

    def gather(self) -> Tensor:
        """The current gradients as the vector (copied in unless they are its views) and return it.
        While they are views, writing to the vector writes to the gradients."""
        if self.viewed():
            return self.buffer
        grads = [p.grad for p in self.params]
        if all(g is not None and g.dtype == torch.float32 for g in grads):
            return torch.cat([g.reshape(-1) for g in grads if g is not None], out=self.buffer)
        for view, p in zip(self.buffer.split(self.numels), self.params):
            if p.grad is None:
                view.zero_()
            else:
                view.copy_(p.grad.reshape(-1))
        return self.buffer

    def scatter(self, flat: Tensor) -> None:
        """Write `flat` (numel elements) into the parameters' gradients; `flat` the vector itself: make
        the gradients its views (no copy)."""
        if flat is self.buffer and self._views is not None:
            if not self.viewed():
                for p, view in zip(self.params, self._views):
                    if p.grad is None or p.grad._base is None:  # a gradient of its own: now the view
                        p.grad = view
                    else:  # a view of another buffer (DDP's bucket in `ddp_hook`): written in place
                        p.grad.copy_(view)
            return
        for view, p in zip(flat.split(self.numels), self.params):
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(view.view_as(p))

    def values(self) -> Tensor:
        """The parameters themselves as one float32 vector (a copy)."""
        return torch.cat([p.detach().reshape(-1).to(torch.float32) for p in self.params])


@dataclass
class CompressorParams:
    """A compressor by name plus its parameters; a parameter left unset keeps the compressor's default."""

    fixed_compressor: ClassVar[str | None] = None

    compressor: str = "scaled_sign"
    ratio: float | None = bounded(None, gt=0, le=1, doc="topk/randomk: fraction of coordinates sent (1%/10%)")
    k: int | None = bounded(None, ge=1, doc="topk/randomk: number of coordinates sent (instead of ratio)")
    block_size: int | None = bounded(None, ge=1, doc="block_sign: elements per block")
    block_per_tensor: bool = False
    levels: int | None = bounded(None, ge=1, le=127, doc="qsgd: quantisation levels s")
    bucket_size: int | None = bounded(None, ge=1, doc="qsgd: elements per norm bucket")
    bits: int | None = bounded(None, ge=1, le=16, doc="rounding: bits per level")
    shared_indices: bool | None = None
    scaled: bool | None = None
    error_feedback: bool = True

    def compressor_kwargs(self) -> dict[str, Any]:
        names = ("ratio", "k", "block_size", "levels", "bucket_size", "bits", "shared_indices", "scaled")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def build(self, sizes: Sequence[int] | None = None) -> Compressor:
        """The compressor; `sizes` are the per-tensor block sizes used with `block_per_tensor`."""
        kwargs = self.compressor_kwargs()
        if self.block_per_tensor:
            kwargs["sizes"] = list(sizes) if sizes is not None else [1]
        return get(self.compressor, **kwargs)

    def validate(self) -> None:
        if self.fixed_compressor is not None and self.compressor != self.fixed_compressor:
            raise ConfigError(
                f"algo.compressor: fixed to {self.fixed_compressor!r} here; use ef_sgd for other compressors"
            )
        if self.compressor == "powersgd":
            raise ConfigError("algo.compressor: powersgd needs matrices; use the powersgd algorithm")
        if self.block_per_tensor and (self.compressor != "block_sign" or self.block_size is not None):
            raise ConfigError("algo.block_per_tensor: only with compressor=block_sign and no block_size")
        self.build()  # unknown or out-of-range compressor parameters fail here, at config time


def derived_seed(seed: int, salt: int, rank: int | None = None) -> int:
    """A generator seed from the run seed: shared by all workers when `rank` is None."""
    return (seed * 1_000_003 + salt * 7919 + (0 if rank is None else rank + 1)) % 2**63


def shares_randomness(compressor: Compressor) -> bool:
    """Whether workers must draw the same random numbers (randomk with indices derived, not sent)."""
    return isinstance(compressor, RandomK) and compressor.shared_indices


@dataclass
class Traffic:
    """Gradient bytes this worker sent, against a plain float32 all-reduce of the same gradients."""

    dense_bytes_per_step: float
    steps: int = 0
    bytes_sent: float = 0.0

    @classmethod
    def for_allreduce(cls, numel: int, world_size: int) -> Traffic:
        return cls(2 * (world_size - 1) / world_size * FLOAT32_BYTES * numel)

    @contextlib.contextmanager
    def counting(self, comm: Communicator) -> Iterator[None]:
        """Count what `comm` sends inside the block as gradient traffic of the step under way."""
        before = comm.meter.current.bytes_sent
        yield
        self.bytes_sent += comm.meter.current.bytes_sent - before

    @contextlib.contextmanager
    def step(self, comm: Communicator) -> Iterator[None]:
        """Count what `comm` sends inside the block, and the step (it ends with the block)."""
        with self.counting(comm):
            yield
        self.steps += 1

    def summary(self) -> dict[str, Any]:
        per_step = self.bytes_sent / self.steps if self.steps else 0.0
        ratio = self.dense_bytes_per_step / per_step if per_step > 0 else None
        return {
            "bytes_per_step": per_step,
            "allreduce_bytes_per_step": self.dense_bytes_per_step,
            "compression_ratio": ratio,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "bytes_sent": self.bytes_sent}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.bytes_sent = int(state["steps"]), float(state["bytes_sent"])


def compression_failed(ctx: WorkerContext, step: int, exc: Exception) -> None:
    """Say that this worker's compression failed at `step` (the step then fails on every worker)."""
    ctx.log_event({"event": "compression_failed", "step": step, "rank": ctx.rank, "reason": str(exc)})
    say(f"commsgd: warning: rank {ctx.rank}: {exc} at step {step}; the step fails on every worker")


def averaged(
    ctx: WorkerContext, step: int, lanes: list[Lane], overlap: Overlap[Lane] | None
) -> tuple[list[Lane], list[Tensor]]:
    """Send what backward did not (without overlap: the one lane, blocking), say which compressions
    failed on this worker, and return the lanes with the workers' averages."""
    if overlap is not None:
        lanes = overlap.finish()
    else:
        lanes[0].post(blocking=True)
    for lane in lanes:
        if lane.failure is not None:
            compression_failed(ctx, step, lane.failure)
    return lanes, [lane.average() for lane in lanes]


def load_into(name: str, target: Tensor, source: Tensor) -> None:
    """Copy a checkpointed buffer into a bound one, refusing a shape that does not match."""
    if source.shape != target.shape:
        raise ValueError(
            f"{name}: checkpoint has shape {tuple(source.shape)}, this model {tuple(target.shape)}"
        )
    target.copy_(source)


class OwnsMomentum(Algorithm):
    """An algorithm that applies momentum to the flat gradient itself (`signum`, `dist_ef_sgd`): the
    trainer's torch momentum is switched off, and a torch optimizer with momentum (a user's own loop) is
    refused, since it would apply momentum a second time. The local step must be plain SGD."""

    inner_optimizers = ("sgd",)
    inner_optimizer_reason = (
        "it applies its own momentum to the gradient before communication, and the local step is "
        "x -= lr * (what came back); AdamW would be a second optimizer on top"
    )

    def optimizer_overrides(self, optim: OptimConfig) -> dict[str, Any]:
        return {"momentum": 0.0, "nesterov": False}

    def bind(self, ctx: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().bind(ctx, model, optimizer)
        if any(group.get("momentum", 0.0) for group in optimizer.param_groups):
            raise ConfigError(
                f"{self.name}: keeps its own momentum; build the torch optimizer with momentum=0 "
                "(the commsgd trainer does this through optimizer_overrides)"
            )


# ---------------------------------------------------------------------------------------- ef_sgd


@dataclass
class EFParams(CompressorParams):
    """ef_sgd's parameters: a compressor, and whether buckets are sent while backward runs."""

    overlap: bool = bounded(
        False,
        doc="compress and send each gradient bucket once backward has it (each bucket compressed alone)",
    )
    bucket_mb: float = bounded(25.0, gt=0, doc="overlap: gradient bucket size in MB (DDP's default is 25)")

    def validate(self) -> None:
        super().validate()
        if self.overlap and self.k is not None:
            raise ConfigError(
                "algo.k: with overlap each bucket is compressed alone; give algo.ratio (a share per bucket)"
            )


@register
class ErrorFeedbackSGD(OverlapsBackward, Algorithm):
    """Compress the flat gradient (plus the error kept from earlier steps), average the messages; with
    `overlap`, bucket by bucket while backward runs (`commsgd.algorithms.lanes`)."""

    name = "ef_sgd"
    summary_line = "error-feedback SGD over any compressor (algo.compressor=topk, block_sign, qsgd, ...)"
    Params = EFParams
    params: EFParams

    def bind(self, ctx: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().bind(ctx, model, optimizer)
        params = parameters_of(model)
        self._traffic = Traffic.for_allreduce(sum(p.numel() for p in params), ctx.world_size)
        self._overlap: Overlap[Lane] | None = None
        if self.params.overlap:
            self._overlap = Overlap(
                params,
                int(self.params.bucket_mb * 2**20),
                lambda index, ps: self._lane(FlatGradients(ps), 100 + index),
                lambda: self._traffic.counting(ctx.comm),
            )
            self._lanes = self._overlap.lanes
        else:
            self._lanes = [self._lane(FlatGradients(params), 1)]
        self.compressor = self._lanes[0].compressor

    def _lane(self, grads: FlatGradients, salt: int) -> Lane:
        """The lane of `grads`, its random numbers seeded by `salt` (1 for the whole model, as before
        overlap existed: the same run gives the same bits)."""
        ctx = self.bound_ctx
        compressor = self.params.build(grads.numels)
        feedback = ErrorFeedback(compressor) if self.params.error_feedback else None
        seed = derived_seed(ctx.seed, salt, None if shares_randomness(compressor) else ctx.rank)
        generator = torch.Generator(device=ctx.device).manual_seed(seed)
        return Lane(grads, compressor, feedback, "grad", generator, ctx.comm, ctx.world_size)

    def after_backward(self, step: int) -> None:
        """Compress, average, apply (the buckets sent during backward: wait for them). A compression
        that fails on this worker sends a poisoned payload (`Lane`): every worker's average is then NaN,
        every worker puts its errors back as they were, and the non-finite guard skips (or stops) the
        step on all of them alike."""
        with self._traffic.step(self.bound_ctx.comm):
            lanes, averages = averaged(self.bound_ctx, step, self._lanes, self._overlap)
            if self.params.error_feedback and not all_finite(averages):
                for lane in lanes:
                    lane.restore()  # the job skips this step
            for lane, average in zip(lanes, averages):
                typing.cast(FlatGradients, lane.grads).scatter(average)

    def payload_nbytes(self) -> int:
        """Bytes of this worker's message per step (the sum over the buckets with `overlap`)."""
        return sum(lane.nbytes for lane in self._lanes)

    def error(self) -> Tensor | None:
        """This worker's error, flat in the model's parameter order (None before the first step or
        without error feedback)."""
        errors = [None if lane.feedback is None else lane.feedback.error("grad") for lane in self._lanes]
        if any(e is None for e in errors):
            return None
        if self._overlap is None:
            return errors[0]
        return in_model_order([e for e in errors if e is not None], self._lanes)

    def state_dict(self) -> dict[str, Any]:
        lanes = [
            {
                "feedback": None if lane.feedback is None else lane.feedback.state_dict(),
                "generator": lane.generator.get_state(),
            }
            for lane in self._lanes
        ]
        traffic = self._traffic.state_dict()
        return (
            {**lanes[0], "traffic": traffic}
            if self._overlap is None
            else {"buckets": lanes, "traffic": traffic}
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        lanes = bucket_states(self.name, state, self._overlap, len(self._lanes))
        for lane, kept in zip(self._lanes, lanes):
            if lane.feedback is not None and kept["feedback"] is not None:
                for name, error in kept["feedback"]["errors"].items():
                    if error.numel() != lane.grads.numel:
                        raise ValueError(
                            f"{self.name}: the checkpoint's error {name!r} has {error.numel()} elements, "
                            f"this model's {lane.grads.numel}"
                        )
                lane.feedback.load_state_dict(kept["feedback"])
            lane.generator.set_state(kept["generator"])
        self._traffic.load_state_dict(state["traffic"])

    def summary(self) -> dict[str, Any]:
        return {"compressor": self.compressor.name, **self._traffic.summary()}


def ef_alias(compressor: str, summary: str, **defaults: Any) -> type[ErrorFeedbackSGD]:
    """Register the algorithm `compressor`: `ef_sgd` with that compressor fixed and `defaults` for other
    parameters (their ranges and docs kept)."""
    hints = typing.get_type_hints(EFParams)
    base = {f.name: f for f in dataclasses.fields(EFParams)}
    changed = [
        (name, hints[name], dataclasses.field(default=value, metadata=base[name].metadata))
        for name, value in {"compressor": compressor, **defaults}.items()
    ]
    made = dataclasses.make_dataclass(
        f"{compressor}_params", changed, bases=(EFParams,), namespace={"fixed_compressor": compressor}
    )
    params = typing.cast(type[EFParams], made)

    class Alias(ErrorFeedbackSGD):
        name = compressor
        summary_line = summary
        Params = params

    Alias.__name__ = Alias.__qualname__ = f"ErrorFeedbackSGD_{compressor}"
    register(Alias)
    return Alias


QSGDAlgorithm = ef_alias(
    "qsgd", "ef_sgd with QSGD quantisation (int8 levels, no error feedback by default)", error_feedback=False
)
TopKAlgorithm = ef_alias("topk", "ef_sgd with top-k sparsification and error feedback")
RandomKAlgorithm = ef_alias(
    "randomk",
    "ef_sgd with random-k sparsification (10%, unscaled, shared indices, all-reduced, no error feedback)",
    error_feedback=False,
)
FP16Algorithm = ef_alias("fp16", "ef_sgd with float16 gradients (all-reduced)", error_feedback=False)


# ---------------------------------------------------------------------------------------- signum


@dataclass
class SignumParams:
    beta: float = bounded(0.9, ge=0, lt=1, doc="signum's own momentum (torch momentum is off)")
    lr_scale: float = bounded(
        0.02, gt=0, le=1, doc="step per coordinate = lr_scale * lr: a sign is 1 where a gradient is small"
    )
    overlap: bool = bounded(
        False, doc="update the momentum and send its signs for each gradient bucket once backward has it"
    )
    bucket_mb: float = bounded(25.0, gt=0, doc="overlap: gradient bucket size in MB (DDP's default is 25)")


class Momentum:
    """signum's momentum of one lane: `update` is the lane's `prepare` (the next momentum, computed
    beside the kept one), `take` keeps it once the step is taken."""

    def __init__(self, like: Tensor, beta: float) -> None:
        self.kept = torch.zeros_like(like)
        self._next = torch.empty_like(like)
        self._weight = 1.0 - beta

    def update(self, gradient: Tensor) -> Tensor:
        return torch.lerp(self.kept, gradient, self._weight, out=self._next)

    def take(self) -> None:
        self.kept, self._next = self._next, self.kept


@register
class Signum(OverlapsBackward, OwnsMomentum):
    """signSGD with momentum and majority vote: 1 bit per coordinate and worker, all-gathered; with
    `overlap`, bucket by bucket while backward runs (`commsgd.algorithms.lanes`)."""

    name = "signum"
    summary_line = "signSGD with momentum, packed signs all-gathered, majority vote (x -= lr_scale*lr*vote)"
    Params = SignumParams
    params: SignumParams

    def bind(self, ctx: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().bind(ctx, model, optimizer)
        params = parameters_of(model)
        self.compressor = get("sign")
        self._traffic = Traffic.for_allreduce(sum(p.numel() for p in params), ctx.world_size)
        self._momenta: list[Momentum] = []
        self._overlap: Overlap[Lane] | None = None
        if self.params.overlap:
            self._overlap = Overlap(
                params,
                int(self.params.bucket_mb * 2**20),
                lambda _, ps: self._lane(FlatGradients(ps)),
                lambda: self._traffic.counting(ctx.comm),
            )
            self._lanes = self._overlap.lanes
        else:
            self._lanes = [self._lane(FlatGradients(params))]

    def _lane(self, grads: FlatGradients) -> Lane:
        ctx = self.bound_ctx
        momentum = Momentum(grads.buffer, self.params.beta)
        self._momenta.append(momentum)
        generator = torch.Generator(device=ctx.device)  # the signs draw nothing
        return Lane(
            grads, self.compressor, None, "momentum", generator, ctx.comm, ctx.world_size, momentum.update
        )

    def after_backward(self, step: int) -> None:
        """The vote: the sign of the workers' mean sign, times lr_scale. A momentum that is not finite
        on one worker sends a poisoned payload (`Lane`): every worker's vote is then NaN, the guard
        skips the step on all of them, and the momentum stays as it was."""
        with self._traffic.step(self.bound_ctx.comm):
            lanes, votes = averaged(self.bound_ctx, step, self._lanes, self._overlap)
        finite = all_finite(votes)
        if finite:
            for momentum in self._momenta:
                momentum.take()
        for lane, vote in zip(lanes, votes):  # (torch's sign of NaN is 0: a failed vote is kept as it is)
            typing.cast(FlatGradients, lane.grads).scatter(
                vote.sign_().mul_(self.params.lr_scale) if finite else vote
            )

    def momentum(self) -> Tensor:
        """This worker's momentum, flat in the model's parameter order."""
        if self._overlap is None:
            return self._momenta[0].kept
        return in_model_order([m.kept for m in self._momenta], self._lanes)

    def state_dict(self) -> dict[str, Any]:
        traffic = self._traffic.state_dict()
        if self._overlap is None:
            return {"momentum": self._momenta[0].kept.clone(), "traffic": traffic}
        return {"buckets": [{"momentum": m.kept.clone()} for m in self._momenta], "traffic": traffic}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for momentum, kept in zip(
            self._momenta, bucket_states(self.name, state, self._overlap, len(self._lanes))
        ):
            load_into("signum momentum", momentum.kept, kept["momentum"])
        self._traffic.load_state_dict(state["traffic"])

    def summary(self) -> dict[str, Any]:
        return self._traffic.summary()


__all__ = [
    "CompressorParams",
    "ErrorFeedbackSGD",
    "FlatGradients",
    "OwnsMomentum",
    "Signum",
    "Traffic",
    "derived_seed",
]

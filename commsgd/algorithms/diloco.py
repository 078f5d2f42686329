"""DiLoCo and Streaming DiLoCo: H inner steps, then an outer optimizer step on the averaged pseudo-gradient.

DiLoCo (Douillard et al. 2023). Every worker runs its own torch optimizer (the inner optimizer, state
kept across rounds) for `inner_steps` H steps. Then the pseudo-gradient delta = x_global - x_local is
averaged over the workers (one flat float32 all-reduce), an outer torch SGD (`outer_lr`,
`outer_momentum`, `outer_nesterov`) steps the shared copy x_global with delta as its gradient, and every
worker continues from the new x_global. Outer steps happen after steps H, 2H, ... (1-based). With
outer_lr = 1 and no momentum this is local SGD with tau = H.

Streaming DiLoCo (Douillard et al. 2025). `fragments` P > 1 cuts the parameter list into P contiguous
fragments of about equal size; fragment i (0-based) is sent after steps (i+1) H / P, then every H steps.
Its average travels as an asynchronous all-reduce during the next `overlap_steps` tau inner steps and is
merged after step s + tau: x_global_i takes the outer step and x_local_i <- mix x_local_i + (1 - mix)
x_global_i. P = 1, tau = 0, mix = 0 (the defaults) is DiLoCo exactly.

`compressor`: any flat-vector commsgd compressor on the pseudo-gradient, with error feedback on the
workers (`error_feedback`, default on for biased compressors). Summable payloads are all-reduced
(asynchronously); the others are all-gathered as packed bytes when the fragment is sent, and decoded
and merged tau steps later (the result is the same; the all-gather is not hidden behind compute).

Batch-norm statistics (float buffers) are averaged after steps H, 2H, ... as local SGD does. The
evaluated model is x_global with the workers' averaged buffers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from commsgd.algorithms.base import Algorithm, register
from commsgd.algorithms.compressed import (
    CompressorParams,
    compression_failed,
    derived_seed,
    load_into,
    shares_randomness,
)
from commsgd.comm import Pending
from commsgd.compression import Compressor, ErrorFeedback, NonFiniteError, Payload, Wire, poisoned
from commsgd.config import bounded
from commsgd.errors import ConfigError
from commsgd.finite import all_finite
from commsgd.flat import by_dtype, parameters_of

if TYPE_CHECKING:
    from commsgd.context import WorkerContext


@dataclass
class DiLoCoParams(CompressorParams):
    inner_steps: int = bounded(64, ge=1, doc="H: inner optimizer steps between outer steps")
    outer_lr: float = bounded(0.7, gt=0, doc="outer SGD learning rate")
    outer_momentum: float = bounded(0.9, ge=0, lt=1, doc="outer SGD momentum")
    outer_nesterov: bool = True
    fragments: int = bounded(1, ge=1, doc="P: contiguous parameter fragments, synchronised staggered")
    overlap_steps: int = bounded(0, ge=0, doc="tau: inner steps a fragment's all-reduce overlaps")
    mix: float = bounded(0.0, ge=0, le=1, doc="alpha: merge x_local <- alpha x_local + (1-alpha) x_global")
    compressor: str = "none"
    # None (the default here): on for biased compressors; ef_sgd's field is a plain bool (default on)
    error_feedback: bool | None = None  # type: ignore[assignment]

    def validate(self) -> None:
        super().validate()
        if self.block_per_tensor:
            raise ConfigError("algo.block_per_tensor: not with diloco (fragments are flat vectors)")
        h, p, tau = self.inner_steps, self.fragments, self.overlap_steps
        if p > h:
            raise ConfigError(f"algo.fragments: {p} fragments need inner_steps >= {p}, got {h}")
        if tau * p >= h:
            raise ConfigError(
                f"algo.overlap_steps: must be < inner_steps / fragments = {h}/{p} "
                f"(a fragment merged before the next one is sent), got {tau}"
            )

    def feedback_on(self, compressor: Compressor) -> bool:
        """Error feedback as asked, or by default for biased compressors (never for `none`)."""
        if self.error_feedback is not None:
            return self.error_feedback
        return not compressor.unbiased


def split_contiguous(numels: Sequence[int], parts: int) -> list[range]:
    """Index ranges cutting `numels` (in order) into `parts` non-empty runs of about equal total size."""
    n = len(numels)
    if not 1 <= parts <= n:
        raise ConfigError(f"algo.fragments: {parts} fragments, but the model has {n} parameter tensors")
    total = sum(numels)
    bounds, cum, j = [0], 0, 0
    for k in range(1, parts):
        while j < n and cum + numels[j] / 2 < k * total / parts:
            cum += numels[j]
            j += 1
        j = min(max(j, bounds[-1] + 1), n - (parts - k))  # every run keeps at least one tensor
        cum = sum(numels[:j])
        bounds.append(j)
    bounds.append(n)
    return [range(a, b) for a, b in itertools.pairwise(bounds)]


def fragment_offsets(inner_steps: int, fragments: int) -> list[int]:
    """The step (within the first round) after which each fragment is first sent: (i+1) H / P."""
    return [(i + 1) * inner_steps // fragments for i in range(fragments)]


class Fragment:
    """One contiguous run of parameters: its float32 x_global and the outer optimizer over it."""

    def __init__(self, params: Sequence[Tensor], p: DiLoCoParams) -> None:
        self.params = list(params)
        self.numels = [t.numel() for t in self.params]
        self.global_ = self.local().clone()
        self.outer = torch.optim.SGD(
            [self.global_],
            lr=p.outer_lr,
            momentum=p.outer_momentum,
            nesterov=p.outer_nesterov and p.outer_momentum > 0,
        )

    def local(self) -> Tensor:
        """This worker's current parameters of the fragment, as one float32 vector (a copy)."""
        return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in self.params])

    def write(self, flat: Tensor) -> None:
        """Load a float32 vector of the fragment's size into its parameters (cast to their dtypes)."""
        with torch.no_grad():
            for view, t in zip(flat.split(self.numels), self.params):
                t.copy_(view.view_as(t))


class _All:
    """Several pending collectives waited on as one (a payload of several summable buffers)."""

    def __init__(self, works: Sequence[Pending | None]) -> None:
        self.works = [w for w in works if w is not None]

    def wait(self) -> None:
        for w in self.works:
            w.wait()


@dataclass
class InFlight:
    """A fragment sent and not merged yet: its collective, or (once settled) the averaged delta."""

    fragment: int
    merge_step: int
    work: Pending | _All | None = None
    payload: Payload | None = None
    rows: Tensor | None = None
    failed: bool = False
    error_before: Tensor | None = None
    average: Tensor | None = None


@register
class DiLoCo(Algorithm):
    """Inner optimizer for H steps, outer Nesterov SGD on the averaged pseudo-gradient; streaming option."""

    name = "diloco"
    summary_line = (
        "DiLoCo / Streaming DiLoCo: H inner steps, outer Nesterov on averaged pseudo-gradients "
        "(algo.fragments, overlap_steps, compressor)"
    )
    Params = DiLoCoParams
    params: DiLoCoParams
    replaces_gradients = False  # outer steps move the parameters; the inner gradient stays backward's

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.outer_rounds = 0
        self.skipped_rounds = 0
        self.pseudo_gradient_bytes = 0.0
        self.sends = 0  # fragments sent (the last ones may still be in flight at the end)
        self.in_flight: list[InFlight] = []

    def bind(self, ctx: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().bind(ctx, model, optimizer)
        p = self.params
        params = parameters_of(model)
        if ctx.world_size > 1:  # one x_global for all: every worker starts from rank 0's model
            with ctx.comm.meter.in_phase("control"), torch.no_grad():
                for flat in by_dtype(params):
                    ctx.comm.broadcast(flat.pack(), src=0)
                    flat.unpack()
        runs = split_contiguous([t.numel() for t in params], p.fragments)
        self.fragments = [Fragment([params[i] for i in run], p) for run in runs]
        self.offsets = fragment_offsets(p.inner_steps, p.fragments)
        self.compressor = p.build()
        self.wires = [Wire(self.compressor, sum(f.numels)) for f in self.fragments]
        self.feedback = ErrorFeedback(self.compressor) if p.feedback_on(self.compressor) else None
        shared = shares_randomness(self.compressor)
        seed = derived_seed(ctx.seed, 14, None if shared else ctx.rank)
        self.generator = torch.Generator(device=ctx.device).manual_seed(seed)
        buffers = [b for b in model.buffers() if b.is_floating_point()]
        self.buffers = by_dtype(buffers) if buffers else []

    # -- the schedule ---------------------------------------------------------------------------

    def sent_after(self, step: int) -> list[int]:
        """The fragments sent after `step`."""
        h = self.params.inner_steps
        return [i for i, first in enumerate(self.offsets) if step >= first and (step - first) % h == 0]

    def after_step(self, step: int, loss: float) -> None:
        for item in [f for f in self.in_flight if f.merge_step == step]:
            self._merge(item)
        for i in self.sent_after(step):
            self._send(i, step)
            if self.params.overlap_steps == 0:
                self._merge(self.in_flight[-1])
        if step % self.params.inner_steps == 0:
            self._average_buffers()

    def _send(self, index: int, step: int) -> None:
        """Start averaging fragment `index`'s pseudo-gradient x_global - x_local (compressed)."""
        ctx = self.bound_ctx
        fragment = self.fragments[index]
        delta = fragment.global_ - fragment.local()
        key = f"fragment{index}"
        item = InFlight(index, step + self.params.overlap_steps)
        if self.feedback is not None:
            item.error_before = self.feedback.error(key)
        try:
            if self.feedback is not None:
                payload = self.feedback.compress(key, delta, generator=self.generator)
            else:
                payload = self.compressor.compress(delta, generator=self.generator)
        except NonFiniteError as exc:
            compression_failed(ctx, step, exc)
            payload = poisoned(self.compressor.empty_payload(delta.numel(), device=delta.device))
            item.failed = True
        before = ctx.comm.meter.current.bytes_sent
        if self.compressor.summable:
            buffers = list(payload.buffers.values())
            works = [ctx.comm.all_reduce(b, op="sum", async_op=True) for b in buffers]
            item.work = _All(works)
        else:
            wire = self.wires[index]
            send = torch.empty(wire.nbytes, dtype=torch.uint8, device=delta.device)
            item.rows = ctx.comm.all_gather(wire.pack(payload, send))
        self.pseudo_gradient_bytes += ctx.comm.meter.current.bytes_sent - before
        self.sends += 1
        item.payload = payload
        self.in_flight.append(item)

    def _settle(self, item: InFlight) -> Tensor:
        """Wait for `item`'s collective and decode the workers' mean pseudo-gradient (once)."""
        if item.average is not None:
            return item.average
        world = self.bound_ctx.world_size
        payload = item.payload
        assert payload is not None
        numel = sum(self.fragments[item.fragment].numels)
        if item.work is not None:
            item.work.wait()
        if item.failed and self.compressor.summable:
            average = torch.full((numel,), math.nan, device=self.fragments[item.fragment].global_.device)
        elif item.rows is None:
            average = self.compressor.decompress(payload).reshape(-1).to(torch.float32).div_(world)
        else:
            wire = self.wires[item.fragment]
            average = torch.zeros(numel, dtype=torch.float32, device=item.rows.device)
            for row in item.rows:
                average.add_(wire.decode(row, payload))
            average.div_(world)
        item.average = average
        item.work = item.payload = item.rows = None
        return average

    def _merge(self, item: InFlight) -> None:
        """The outer step on the fragment's x_global, then x_local <- mix x_local + (1 - mix) x_global."""
        average = self._settle(item)
        self.in_flight.remove(item)
        fragment = self.fragments[item.fragment]
        if all_finite([average]):
            fragment.global_.grad = average
            fragment.outer.step()
            fragment.global_.grad = None
            self.outer_rounds += 1
        else:  # a worker's compression failed: every worker skips this outer step alike
            if self.feedback is not None:
                self.feedback.restore(f"fragment{item.fragment}", item.error_before)
            self.skipped_rounds += 1
            self.bound_ctx.log_event(
                {"event": "outer_step_skipped", "fragment": item.fragment, "step": item.merge_step}
            )
        mix = self.params.mix
        target = fragment.global_ if mix == 0 else torch.lerp(fragment.global_, fragment.local(), mix)
        fragment.write(target)

    def _average_buffers(self) -> None:
        comm = self.bound_ctx.comm
        if self.bound_ctx.world_size == 1:
            return
        for flat in self.buffers:
            flat.pack()
            comm.all_reduce(flat.buffer, op="avg")
            flat.unpack()

    def finish(self) -> None:
        """Complete the collectives still in flight (their merge would come after the last step)."""
        self.prepare_checkpoint()

    def prepare_checkpoint(self) -> None:
        """Wait for fragments in flight; their averages are saved and merged at their own step."""
        for item in self.in_flight:
            self._settle(item)

    # -- evaluation -------------------------------------------------------------------------------

    @contextmanager
    def evaluated_parameters(self) -> Iterator[None]:
        """x_global, with the workers' averaged float buffers."""
        saved = [f.local() for f in self.fragments]
        saved_buffers = [flat.pack().clone() for flat in self.buffers]
        for f in self.fragments:
            f.write(f.global_)
        if self.bound_ctx.world_size > 1:
            with self.bound_ctx.comm.meter.in_phase("eval"):
                for flat in self.buffers:
                    self.bound_ctx.comm.all_reduce(flat.buffer, op="avg")
                    flat.unpack()
        try:
            yield
        finally:
            for f, flat_params in zip(self.fragments, saved):
                f.write(flat_params)
            for flat, buffer in zip(self.buffers, saved_buffers):
                flat.unpack(buffer)

    # -- resume -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        self.prepare_checkpoint()
        return {
            "global": [f.global_.detach().clone() for f in self.fragments],
            "outer": [f.outer.state_dict() for f in self.fragments],
            "in_flight": [
                {"fragment": i.fragment, "merge_step": i.merge_step, "average": i.average}
                | ({"error_before": i.error_before} if i.error_before is not None else {})
                for i in self.in_flight
            ],
            "feedback": None if self.feedback is None else self.feedback.state_dict(),
            "generator": self.generator.get_state(),
            "schedule": {"inner_steps": self.params.inner_steps, "fragments": self.params.fragments},
            "outer_rounds": self.outer_rounds,
            "skipped_rounds": self.skipped_rounds,
            "pseudo_gradient_bytes": self.pseudo_gradient_bytes,
            "sends": self.sends,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["schedule"]
        mine = {"inner_steps": self.params.inner_steps, "fragments": self.params.fragments}
        if saved != mine:
            raise ValueError(f"diloco: checkpoint has schedule {saved}, this run {mine}")
        for i, (fragment, x, outer) in enumerate(zip(self.fragments, state["global"], state["outer"])):
            load_into(f"diloco fragment {i}", fragment.global_, x)
            fragment.outer.load_state_dict(outer)
        self.in_flight = [
            InFlight(
                int(d["fragment"]),
                int(d["merge_step"]),
                average=d["average"],
                error_before=d.get("error_before"),
            )
            for d in state["in_flight"]
        ]
        if self.feedback is not None and state["feedback"] is not None:
            self.feedback.load_state_dict(state["feedback"])
        self.generator.set_state(state["generator"])
        self.outer_rounds = int(state["outer_rounds"])
        self.skipped_rounds = int(state["skipped_rounds"])
        self.pseudo_gradient_bytes = float(state["pseudo_gradient_bytes"])
        self.sends = int(state["sends"])

    def summary(self) -> dict[str, Any]:
        return {
            "outer_rounds": self.outer_rounds,
            "skipped_outer_rounds": self.skipped_rounds,
            "fragments": len(self.fragments) if hasattr(self, "fragments") else self.params.fragments,
            "compressor": self.params.compressor,
            "pseudo_gradient_bytes_per_round": self.pseudo_gradient_bytes / self.sends if self.sends else 0.0,
        }


__all__ = ["DiLoCo", "DiLoCoParams", "fragment_offsets", "split_contiguous"]

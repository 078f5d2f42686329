"""Decentralized SGD over a topology: D-PSGD, Q-DSGD and QuanTimed-DSGD.

Each worker keeps its own model x_i and talks only to its neighbours in the graph, weighting them by
its row of the doubly stochastic mixing matrix W (`commsgd.topology`). Models travel as flat buffers,
one point-to-point message per neighbour per round (all receives and sends posted at once).

- `dpsgd`: x_i <- sum_j w_ij x_j - lr d_i, where d_i is the local optimizer's step direction (SGD with
  the configured momentum and weight decay) at x_i; the exchange overlaps the optimizer step.
- `qdsgd`: x_i <- (1 - eps + eps w_ii) x_i + eps sum_{j != i} w_ij Q(x_j) - alpha eps g_i with an
  unbiased quantizer Q and one mini-batch per iteration; each round waits for the slowest neighbour.
- `quantimed`: the same update, but g_i is the mean gradient over the mini-batches this worker
  finishes before the deadline T_d (zero when it finishes none).

qdsgd and quantimed apply their own step (the torch optimizer is skipped: `.grad` is cleared before it
runs), with constant (alpha, eps) or the paper's schedule alpha = a / T^(1/6), eps = b / T^(1/2).
Weight decay is part of g_i (g_i + wd x_i, the gradient of the L2-regularised local loss); momentum has
no place in the update, and rank 0 says so at start-up when it is set.
The evaluated model is the average of all workers' models.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from commsgd.algorithms.base import Algorithm, MiniBatch, NextBatch, register
from commsgd.algorithms.dist_ef_sgd import take_weight_decay
from commsgd.algorithms.gossip import ModelVector, Neighbourhood
from commsgd.algorithms.stragglers import StragglerMode, Stragglers, gradient_by_deadline
from commsgd.comm import Pending
from commsgd.compression import Wire
from commsgd.compression import get as get_compressor
from commsgd.config import OptimConfig, bounded
from commsgd.errors import ConfigError, say
from commsgd.flat import parameters_of
from commsgd.topology import TOPOLOGIES, Topology, build_topology, load_weights

if TYPE_CHECKING:
    from commsgd.context import WorkerContext


# ------------------------------------------------------------------------------------------ params


@dataclass
class GossipParams:
    """The graph every worker builds (from the run seed) and the emulated straggler speeds."""

    topology: str = "ring"
    rule: Literal["metropolis", "laplacian"] = "metropolis"
    p: float = bounded(0.5, ge=0, le=1, doc="edge probability of topology erdos_renyi")
    weights_file: str | None = None
    straggler: StragglerMode = "off"
    sample_time_min_s: float = bounded(0.0, ge=0, doc="straggler: lowest seconds per sample")
    sample_time_max_s: float = bounded(0.0, ge=0, doc="straggler: highest seconds per sample")

    def validate(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise ConfigError(f"algo.topology: must be one of {', '.join(TOPOLOGIES)}; got {self.topology!r}")
        if (self.topology == "custom") != (self.weights_file is not None):
            raise ConfigError("algo.weights_file: give it exactly when algo.topology is custom")
        if self.weights_file is not None:
            load_weights(self.weights_file)
        if self.sample_time_min_s > self.sample_time_max_s:
            raise ConfigError(
                f"algo.sample_time_min_s: {self.sample_time_min_s} is above "
                f"sample_time_max_s {self.sample_time_max_s}"
            )
        if self.straggler != "off" and self.sample_time_max_s == 0:
            raise ConfigError("algo.sample_time_max_s: must be > 0 when algo.straggler is on")


@dataclass
class QuantizedParams(GossipParams):
    """Q-DSGD: quantized model exchange and the algorithm's own step sizes."""

    rule: Literal["metropolis", "laplacian"] = "laplacian"
    compressor: str = "rounding"
    compressor_args: dict[str, Any] = bounded({}, doc="parameters of the compressor, e.g. {bits: 4}")
    alpha: float = bounded(0.4, gt=0, doc="gradient step alpha (the update subtracts alpha*eps*g)")
    eps: float = bounded(0.5, gt=0, doc="consensus step eps (b of the paper schedule); at most 1 in use")
    step_rule: Literal["constant", "paper"] = "constant"
    horizon: int = bounded(0, ge=0, doc="T of the paper schedule; 0: the run's step budget")

    def validate(self) -> None:
        super().validate()
        if self.compressor == "randomk":  # scaled it diverges (measured); unscaled it is biased
            raise ConfigError(
                "algo.compressor: randomk does not suit Q-DSGD: scaled to be unbiased its noise is "
                "(d/k - 1)||x||^2 on whole models, and its shared indices do not travel point to point; "
                "use rounding or qsgd"
            )
        compressor = get_compressor(self.compressor, **self.compressor_args)
        if self.step_rule == "constant" or self.horizon:
            used = self.eps / math.sqrt(self.horizon) if self.step_rule == "paper" else self.eps
            if used > 1:
                raise ConfigError(f"algo.eps: the consensus step in use is {used:g}, must be <= 1")
        if not compressor.unbiased:
            raise ConfigError(
                f"algo.compressor: {self.compressor!r} is biased; Q-DSGD needs an unbiased quantizer"
            )


@dataclass
class QuanTimedParams(QuantizedParams):
    """QuanTimed-DSGD: gradient computation bounded by a deadline."""

    deadline_s: float = bounded(0.05, gt=0, doc="T_d: seconds of gradient computation per iteration")
    max_batches: int = bounded(0, ge=0, doc="stop after this many mini-batches per iteration (0: no limit)")


def topology_for(params: GossipParams, workers: int, seed: int) -> Topology:
    """The topology every worker builds identically from the params and the run seed."""
    weights = load_weights(params.weights_file) if params.weights_file is not None else None
    return build_topology(params.topology, workers, rule=params.rule, p=params.p, seed=seed, weights=weights)


def _stream_seed(seed: int, rank: int, stream: int) -> int:
    """A per-worker random stream derived from the run seed."""
    return (seed * 1_000_003 + rank * 7_919 + stream) % 2**63


# ------------------------------------------------------------------------------------------ algorithms


class Decentralized(Algorithm):
    """What the decentralized methods share: topology, model vector, stragglers, averaged evaluation."""

    params: GossipParams

    def bind(self, ctx: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().bind(ctx, model, optimizer)
        self.topology = topology_for(self.params, ctx.world_size, ctx.seed)
        self.hood = Neighbourhood.of(self.topology, ctx.rank)
        self.vector = ModelVector(model)
        p = self.params
        self.stragglers = Stragglers(
            p.straggler, p.sample_time_min_s, p.sample_time_max_s, _stream_seed(ctx.seed, ctx.rank, 1)
        )
        self.iterations = 0
        self.samples = 0
        ctx.log_event(
            {
                "event": "neighbours",
                "rank": ctx.rank,
                "peers": list(self.hood.peers),
                "weights": list(self.hood.weights),
                "self_weight": self.hood.self_weight,
            }
        )

    def compute_gradient(self, step: int, next_batch: NextBatch) -> float:
        """One mini-batch, then the emulated straggler time for its samples."""
        sizes: list[int] = []

        def counted() -> MiniBatch:
            batch = next_batch()
            sizes.append(batch.size)
            return batch

        loss = super().compute_gradient(step, counted)
        self.stragglers.sleep(self.stragglers.begin_iteration() * sum(sizes))
        self.samples += sum(sizes)
        return loss

    @contextlib.contextmanager
    def evaluated_parameters(self) -> Iterator[None]:
        """The average of all workers' models (an all-reduce), restored afterwards."""
        ctx = self.bound_ctx
        if ctx.world_size == 1:
            yield
            return
        own = self.vector.read()
        average = [x.clone() for x in own]
        for x in average:
            ctx.comm.all_reduce(x, op="avg")
        self.vector.write(average)
        try:
            yield
        finally:
            self.vector.write(own)

    def summary(self) -> dict[str, Any]:
        return {
            "topology": self.topology.name,
            "degree": len(self.hood.peers),
            "spectral_gap": self.topology.spectral_gap,
            "iterations": self.iterations,
            "samples": self.samples,
            **self.stragglers.summary(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "stragglers": self.stragglers.state_dict(),
            "iterations": self.iterations,
            "samples": self.samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stragglers.load_state_dict(state["stragglers"])
        self.iterations, self.samples = int(state["iterations"]), int(state["samples"])


@register
class DPSGD(Decentralized):
    """D-PSGD: a local optimizer step, then a weighted average with the neighbours' models."""

    name = "dpsgd"
    summary_line = "decentralized parallel SGD: gossip averaging with neighbours by a mixing matrix"
    Params = GossipParams

    def bind(self, ctx: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().bind(ctx, model, optimizer)
        self._sent: list[torch.Tensor] = []
        self._received: list[list[torch.Tensor]] = []
        self._pending: list[Pending] = []

    def after_backward(self, step: int) -> None:
        """Send x_i (before the optimizer moves it) to every neighbour; receive theirs."""
        self.iterations += 1
        peers = self.hood.peers
        self._sent = self.vector.read()
        self._received = [[torch.empty_like(x) for _ in peers] for x in self._sent]
        sends = [(x, j) for x in self._sent for j in peers]
        recvs = [(buf, j) for bufs in self._received for buf, j in zip(bufs, peers)]
        self._pending = self.bound_ctx.comm.post_exchange(sends, recvs)

    def after_step(self, step: int, loss: float) -> None:
        """x_i <- w_ii x_i + sum_j w_ij x_j + (optimizer's move of x_i)."""
        for pending in self._pending:
            pending.wait()
        mixed = []
        for sent, received, now in zip(self._sent, self._received, self.vector.read()):
            new = sent * self.hood.self_weight
            for buf, w in zip(received, self.hood.weights):
                new.add_(buf, alpha=w)
            mixed.append(new.add_(now - sent))
        self.vector.write(mixed)
        self._pending, self._sent, self._received = [], [], []


@register
class QDSGD(Decentralized):
    """Q-DSGD: quantized models from the neighbours, one mini-batch per iteration, own step sizes."""

    name = "qdsgd"
    summary_line = "quantized decentralized SGD: neighbours' models through an unbiased quantizer"
    Params = QuantizedParams
    params: QuantizedParams
    _configured_momentum = 0.0  # optim.momentum, seen in optimizer_overrides (the trainer sets it to 0)
    inner_optimizers = ("sgd",)
    inner_optimizer_reason = (
        "it applies its own step x <- mix - alpha*eps*g and clears .grad, "
        "so no torch optimizer moves the model"
    )

    def check_optim(self, optim: OptimConfig) -> None:
        super().check_optim(optim)
        if optim.clip_norm is not None:
            raise ConfigError(
                f"optim.clip_norm: {self.name} applies its own step to the raw gradient "
                "(x <- mix - alpha*eps*g); clipping is not part of it"
            )

    def optimizer_overrides(self, optim: OptimConfig) -> dict[str, Any]:
        # The algorithm applies alpha*eps*g itself and clears .grad, so the torch optimizer never moves x;
        # weight decay reaches `bind`, which moves it into g (momentum has no place in the update).
        self._configured_momentum = optim.momentum
        return {"momentum": 0.0}

    def bind(self, ctx: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().bind(ctx, model, optimizer)
        self.compressor = get_compressor(self.params.compressor, **self.params.compressor_args)
        self.wires = [Wire(self.compressor, f.numel, f.buffer.dtype) for f in self.vector.flats]
        # a neighbour's message is decoded here (float32 vectors; others get a new tensor per message)
        self._decoded = [
            torch.empty(f.numel, device=ctx.device) if f.buffer.dtype == torch.float32 else None
            for f in self.vector.flats
        ]
        self.quant_gen = torch.Generator(device=ctx.device).manual_seed(_stream_seed(ctx.seed, ctx.rank, 2))
        self._initial_lr = float(optimizer.param_groups[0]["lr"])
        self._budget = 0
        self._params = parameters_of(model)
        self._decay = take_weight_decay(optimizer, self._params)
        momentum = max([self._configured_momentum] + [g.get("momentum", 0.0) for g in optimizer.param_groups])
        if momentum and ctx.rank == 0:
            say(
                f"commsgd: warning: {self.name}: momentum {momentum:g} is not used: the Q-DSGD update "
                "x <- mix - alpha*eps*g has none (set optim.momentum=0 to silence this)"
            )

    def should_stop(self, step: int, total_steps: int) -> bool:
        self._budget = total_steps  # T of the paper schedule when no horizon is given
        return super().should_stop(step, total_steps)

    def step_sizes(self) -> tuple[float, float]:
        """(alpha, eps) for this iteration; optimizer lr schedule drops scale alpha."""
        p = self.params
        alpha, eps = p.alpha, p.eps
        if p.step_rule == "paper":
            horizon = p.horizon or self._budget
            if horizon < 1:
                raise ValueError(f"{self.name}: step_rule=paper needs algo.horizon (T) outside commsgd train")
            alpha, eps = alpha / horizon ** (1 / 6), eps / math.sqrt(horizon)
            if eps > 1:
                raise ConfigError(f"algo.eps: b / sqrt(T) = {eps:g} for T = {horizon}, must be <= 1")
        assert self.optimizer is not None
        return alpha * float(self.optimizer.param_groups[0]["lr"]) / self._initial_lr, eps

    def after_backward(self, step: int) -> None:
        """x_i <- (1 - eps + eps w_ii) x_i + eps sum_j w_ij Q(x_j) - alpha eps g_i (optimizer skipped)."""
        self.iterations += 1
        alpha, eps = self.step_sizes()
        for param, wd in zip(self._params, self._decay):  # g_i + wd x_i: the L2-regularised local loss
            if wd:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                param.grad.add_(param.detach(), alpha=wd)
        xs, grads = self.vector.read(), self.vector.gradients()
        peers = self.hood.peers
        messages = [
            wire.encode(self.compressor.compress(x, generator=self.quant_gen))
            for wire, x in zip(self.wires, xs)
        ]
        received = [[wire.empty(self.bound_ctx.device) for _ in peers] for wire in self.wires]
        sends = [(message, j) for message in messages for j in peers]
        recvs = [(buf, j) for bufs in received for buf, j in zip(bufs, peers)]
        for pending in self.bound_ctx.comm.post_exchange(sends, recvs):
            pending.wait()
        mixed = []
        for wire, x, g, bufs, decoded in zip(self.wires, xs, grads, received, self._decoded):
            new = x.mul_(1 - eps + eps * self.hood.self_weight)
            for buf, w in zip(bufs, self.hood.weights):
                new.add_(wire.decode(buf, out=decoded), alpha=eps * w)
            mixed.append(new.add_(g, alpha=-alpha * eps))
        self.vector.write(mixed)
        for param in parameters_of(self.bound_model):
            param.grad = None  # torch SGD skips parameters without a gradient

    def summary(self) -> dict[str, Any]:
        return {
            **super().summary(),
            "compressor": self.params.compressor,
            "payload_bytes": sum(w.nbytes for w in self.wires),
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "quant_gen": self.quant_gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.quant_gen.set_state(state["quant_gen"])


@register
class QuanTimed(QDSGD):
    """QuanTimed-DSGD: as many mini-batches as finish before the deadline, then the Q-DSGD update."""

    name = "quantimed"
    summary_line = "QuanTimed-DSGD: deadline-bounded local gradients, quantized gossip with neighbours"
    Params = QuanTimedParams
    params: QuanTimedParams
    draws_batches = True

    def bind(self, ctx: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().bind(ctx, model, optimizer)
        self.zero_gradient_iterations = 0
        self.cut_samples = 0  # samples counted from batches the deadline cut short

    def compute_gradient(self, step: int, next_batch: NextBatch) -> float:
        result = gradient_by_deadline(
            parameters_of(self.bound_model),
            next_batch,
            self.params.deadline_s,
            self.stragglers.begin_iteration(),
            self.stragglers.sleep,
            self.params.max_batches,
            self.slowdown,
        )
        self.samples += result.samples
        self.zero_gradient_iterations += result.samples == 0
        self.cut_samples += result.cut_samples
        return result.loss

    def summary(self) -> dict[str, Any]:
        return {
            **super().summary(),
            "deadline_s": self.params.deadline_s,
            "mean_samples_per_iteration": self.samples / max(self.iterations, 1),
            "zero_gradient_iterations": self.zero_gradient_iterations,
            "cut_samples": self.cut_samples,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "zero_gradient_iterations": self.zero_gradient_iterations,
            "cut_samples": self.cut_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.zero_gradient_iterations = int(state["zero_gradient_iterations"])
        self.cut_samples = int(state.get("cut_samples", 0))  # absent in older checkpoints

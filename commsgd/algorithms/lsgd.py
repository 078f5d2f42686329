"""Leader SGD (Teng et al., NeurIPS 2019): workers run local SGD and are pulled toward the best one.

Every worker takes local (momentum) SGD steps. In a round the leader is the worker with the smallest
mean training loss over its last `window` mini-batches (a worker whose estimate is not finite is
never chosen); it broadcasts its parameters and every worker moves toward them (eq. 3):

    x <- x - eta g(x) - lambda (x - local leader) - lambda_G (x - global leader)

Leaders. `leaders: single`: one leader for all workers every `tau` steps. `leaders: node` with
several nodes (LOCAL_WORLD_SIZE or `cluster.group_size`): a local leader per node every `tau` steps,
pulled with `pull`, and a global leader over all workers every `tau_global` steps, pulled with
`pull_global`. When every node holds one worker (torchrun with one GPU per machine, group_size=1) the
node level is empty and the leader of all workers is the first level: it runs every `tau` steps with
`pull`, as `leaders: single` does (`tau_global` and `pull_global` are then not used; rank 0 says so
when they were set). Traffic per round: one scalar all-gather (the loss estimates; over the node for a
local-only round, over all workers when a global round is due) plus one broadcast of the leader's
flat model state per level, within the node or across all workers.

Pull modes. `once` (the paper's experiments): the round step itself is the eq. 3 step, the rest of
the period is plain SGD. `every-step`: eq. 3 on every step toward the last known leaders, whose
parameters each worker keeps a copy of.

The evaluated model is the average of all workers (`evaluate: center`) or the current parameters of
the (global) leader (`evaluate: leader`). Every round's choice is logged to the run's events.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from commsgd.algorithms.base import register
from commsgd.algorithms.pull import Buffers, RoundAlgorithm, average_of_workers, swapped_in
from commsgd.config import bounded
from commsgd.errors import ConfigError, say
from commsgd.flat import host_floats

if TYPE_CHECKING:
    from commsgd.comm import CommGroup
    from commsgd.context import WorkerContext


@dataclass
class LSGDParams:
    pull: float = bounded(0.1, gt=0, lt=1, doc="lambda: pull toward the (local) leader, not scaled by lr")
    pull_global: float | None = bounded(
        None, gt=0, lt=1, doc="lambda_G toward the global leader (default: pull)"
    )
    tau: int = bounded(64, ge=1, doc="steps between (local) leader rounds")
    tau_global: int | None = bounded(None, ge=1, doc="steps between global rounds (default: 2 * tau)")
    window: int = bounded(10, ge=1, doc="k: the leader has the smallest mean loss over its last k batches")
    pull_mode: Literal["once", "every-step"] = "once"
    leaders: Literal["node", "single"] = "node"
    mode: Literal["sync", "async"] = "sync"
    evaluate: Literal["center", "leader"] = "center"

    def validate(self) -> None:
        if self.tau_global is not None and self.tau_global <= self.tau:
            raise ConfigError(f"algo.tau_global: must be > tau ({self.tau}), got {self.tau_global}")

    @property
    def global_period(self) -> int:
        return self.tau_global if self.tau_global is not None else 2 * self.tau

    @property
    def global_pull(self) -> float:
        return self.pull_global if self.pull_global is not None else self.pull


class LossWindow:
    """The last k training losses of this worker; their mean is its leader-selection score."""

    def __init__(self, size: int) -> None:
        self.losses: deque[float] = deque(maxlen=size)

    def add(self, loss: float) -> None:
        self.losses.append(float(loss))

    def estimate(self) -> float:
        """Mean of the window; +inf when it is empty or holds a non-finite loss (never a leader)."""
        if not self.losses:
            return math.inf
        value = sum(self.losses) / len(self.losses)
        return value if math.isfinite(value) else math.inf


def select_leader(estimates: Sequence[float]) -> int | None:
    """Index of the smallest finite estimate (the lowest index on ties); None when none is finite.

    On host floats: a round's table is a few numbers, and tensor ops on them cost more than the rest of
    the round in a simulated world of small models; one pass without a list, since a simulated world of
    1,024 workers makes every one of them scan the whole table each round."""
    index, best = None, math.inf
    for i, value in enumerate(estimates):
        if value < best and value != -math.inf:  # NaN and +inf compare False; strict: lowest index on ties
            index, best = i, value
    return index


@dataclass(frozen=True)
class Level:
    """One kind of leader: which workers choose it, how often, and how hard it pulls."""

    kind: Literal["local", "global"]
    group: CommGroup
    period: int
    pull: float


@register
class LSGD(RoundAlgorithm):
    """Leader SGD: local steps, and every tau steps a pull toward the best worker's parameters."""

    name = "lsgd"
    summary_line = "Leader SGD: periodic pull toward the best worker (local/global leaders, sync or async)"
    Params = LSGDParams
    params: LSGDParams

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.window = LossWindow(self.params.window)
        self.leaders: dict[str, int] = {}
        self.times_led = {"local": 0, "global": 0}
        self.rounds = {"local": 0, "global": 0}
        self.changes = 0
        self.snapshot_every_step = self.params.pull_mode == "every-step"
        self._saved_targets: dict[str, Buffers] = {}

    def bind(self, ctx: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        p = self.params
        if p.leaders == "node" and 1 < ctx.num_nodes < ctx.world_size:
            levels = [Level("local", ctx.node_group, p.tau, p.pull)]
            levels.append(Level("global", ctx.world, p.global_period, p.global_pull))
        else:  # one node, leaders=single, or one worker per node: the one level runs at tau with pull
            levels = [Level("global", ctx.world, p.tau, p.pull)]
            if p.leaders == "node" and ctx.num_nodes > 1 and ctx.rank == 0:
                given = {"tau_global": p.tau_global, "pull_global": p.pull_global}
                note = [f"{k}={v}" for k, v in given.items() if v is not None]
                if note:
                    say(
                        f"commsgd: warning: lsgd: every node has one worker, so leaders=node has one level: "
                        f"a leader of all workers every tau={p.tau} steps with pull={p.pull}; "
                        f"{', '.join(note)} not used"
                    )
        self.levels = [lv for lv in levels if lv.group.size > 1]  # a group of one has nobody to pull
        self._periods = [lv.period for lv in self.levels] or [p.tau]
        super().bind(ctx, model, optimizer)
        self.scratch = self.state.empty()
        self.targets: dict[str, Buffers] = {}
        if self.snapshot_every_step:
            self.targets = {lv.kind: self.state.empty() for lv in self.levels}
        self._loaded_targets()

    def periods(self) -> Sequence[int]:
        return self._periods

    def observe(self, loss: float) -> None:
        self.window.add(loss)

    # -- a round ------------------------------------------------------------------------------

    def run_round(self, vstep: int, ready: bool) -> bool | None:
        active = [lv for lv in self.levels if vstep % lv.period == 0]
        if not active:
            return None
        ctx = self.bound_ctx
        # one scalar all-gather: over all workers if any active level spans them, else over the node
        widest = max(active, key=lambda lv: lv.group.size).group
        payload = [self.window.estimate()] + ([float(ready)] if self.clock is not None else [])
        table = ctx.comm.all_gather(host_floats(payload), widest)
        column = table.view(-1).tolist()[:: len(payload)]  # on host floats: cheaper than a column view
        for level in active:
            same = level.group is widest  # the column as it is; else each member's entry
            estimates = column if same else [column[widest.index(r)] for r in level.group.ranks]
            index = select_leader(estimates)
            if index is None:
                continue
            leader = level.group.ranks[index]
            self._record(level, leader, vstep, estimates[index])
            self._follow(level, leader)
        if self.clock is None or widest.size != ctx.world_size:
            return None
        return bool((table[:, 1] > 0).all())

    def _record(self, level: Level, leader: int, vstep: int, estimate: float) -> None:
        ctx = self.bound_ctx
        previous = self.leaders.get(level.kind)
        self.leaders[level.kind] = leader
        self.rounds[level.kind] += 1
        self.times_led[level.kind] += int(leader == ctx.rank)
        self.changes += int(previous is not None and previous != leader)
        if ctx.rank == level.group.ranks[0]:
            ctx.log_event(
                {
                    "event": "leader",
                    "kind": level.kind,
                    "round": self.rounds[level.kind],
                    "step": vstep,
                    "group": ctx.node if level.kind == "local" else None,
                    "leader": leader,
                    "loss": estimate,
                }
            )

    def _follow(self, level: Level, leader: int) -> None:
        """Broadcast the leader's source parameters; pull now (once) or keep them (every-step)."""
        ctx = self.bound_ctx
        target = self.targets.get(level.kind, self.scratch)
        if ctx.rank == leader:
            for t, s in zip(target, self.source):
                t.copy_(s)
        for t in target:
            ctx.comm.broadcast(t, src=leader, group=level.group)
        if not self.snapshot_every_step and ctx.rank != leader:
            self._pull_toward(target, level.pull)

    def _pull_toward(self, target: Buffers, pull: float) -> None:
        """x -= pull * (source - target), with the difference formed in the scratch buffers."""
        for d, s, t in zip(self.scratch, self.source, target):
            torch.sub(s, t, out=d)
        self.state.add_(self.scratch, -pull)

    def pull_each_step(self) -> None:
        for level in self.levels:
            if level.kind in self.leaders:  # a leader is known for this level
                self._pull_toward(self.targets[level.kind], level.pull)

    # -- evaluation ---------------------------------------------------------------------------

    @contextmanager
    def evaluated_parameters(self) -> Iterator[None]:
        ctx = self.bound_ctx
        with ctx.comm.meter.in_phase("eval"):
            if self.params.evaluate == "center":
                buffers = average_of_workers(self.state, ctx.comm)
            else:
                buffers = self.state.copy()
                for b in buffers:
                    ctx.comm.broadcast(b, src=self.leader)
        with swapped_in(self.state, buffers):
            yield

    @property
    def leader(self) -> int:
        """The last chosen leader of all workers (rank 0 before the first round)."""
        return self.leaders.get("global", 0)

    # -- resume and reporting -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": list(self.window.losses),
            "leaders": dict(self.leaders),
            "times_led": dict(self.times_led),
            "rounds": dict(self.rounds),
            "changes": self.changes,
            "targets": {kind: [t.clone() for t in bufs] for kind, bufs in self.targets.items()},
            "clock": self.clock_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.losses.clear()
        for loss in state["window"]:
            self.window.add(loss)
        self.leaders = {k: int(v) for k, v in state["leaders"].items()}
        self.times_led = {k: int(v) for k, v in state["times_led"].items()}
        self.rounds = {k: int(v) for k, v in state["rounds"].items()}
        self.changes = int(state["changes"])
        self._saved_targets = state.get("targets", {})
        self.load_clock_state(state.get("clock", {}))
        if self.ctx is not None:
            self._loaded_targets()

    def _loaded_targets(self) -> None:
        for kind, buffers in self._saved_targets.items():
            if kind in self.targets:
                for t, s in zip(self.targets[kind], buffers):
                    t.copy_(s)
        self._saved_targets = {}

    def summary(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "times_led": self.times_led["global"],
            "rounds": self.rounds["global"],
            "leader_changes": self.changes,
            "final_leader": self.leaders.get("global"),
        }
        if any(lv.kind == "local" for lv in self.levels):
            result["times_led_local"] = self.times_led["local"]
            result["local_rounds"] = self.rounds["local"]
        if self.clock is not None:
            result["rounds_joined"] = self.clock.rounds
        return result

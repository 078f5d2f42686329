"""commsgd's communication inside an existing torch DDP job: a comm hook for `register_comm_hook`.

    state, hook = commsgd.ddp_hook("powersgd", rank=2)      # after commsgd.init() (or pass ctx=)
    ddp_model.register_comm_hook(state, hook)

`allreduce` averages each bucket asynchronously (the all-reduce starts in the hook, overlapping the rest
of backward; the end of the backward pass waits for it, as `commsgd.algorithms.allreduce` does). Every
other name runs commsgd's own algorithm on the bucket's gradients: the bucket is the algorithm's "model"
(one per bucket, so error feedback, PowerSGD's Q and signum's momentum are kept per bucket), its
`after_backward` communicates them, and the hook returns the bucket with the result. These hooks run
their communication synchronously inside the hook (a completed future). Every byte goes through
`ctx.comm`, so it is counted and timed in `ctx.comm.meter`.

What matches commsgd's own algorithm: a bucket's algorithm gets its parameters in the order the hook
first saw them (DDP's first iteration, before it rebuilds its buckets; with one bucket, the model's
order), so with one bucket (a large `bucket_cap_mb`) the hook computes what the algorithm computes on
the same batches. `tests/test_ddp_hook.py` checks this for powersgd and ef_sgd with topk. With several
buckets each is compressed on its own (PowerSGD is per matrix either way; top-k per bucket is not
top-k over the model). The local optimizer works on the result as with DDP: signum's result is
lr_scale * vote, meant for SGD without momentum. A non-finite gradient raises out of `backward()`
(powersgd) or reaches every worker as NaN (ef_sgd); commsgd's non-finite guard is not there to skip it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.autograd import Variable

from commsgd.algorithms.base import Algorithm, build_algorithm, validate_params
from commsgd.comm import Pending
from commsgd.context import WorkerContext
from commsgd.errors import CheckpointError, ConfigError, say

#: hook name -> (commsgd algorithm, fixed parameters); `allreduce` is the hook's own plain averaging
HOOKS: dict[str, tuple[str, dict[str, Any]]] = {
    "allreduce": ("allreduce", {}),
    "ef_sgd": ("ef_sgd", {}),
    "topk": ("topk", {}),
    "randomk": ("randomk", {}),
    "qsgd": ("qsgd", {}),
    "fp16": ("fp16", {}),
    "bf16": ("ef_sgd", {"compressor": "bf16", "error_feedback": False}),
    "powersgd": ("powersgd", {}),
    "signum": ("signum", {}),
}

Hook = Callable[[Any, Any], torch.futures.Future]


def _done(tensor: torch.Tensor) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(tensor)
    return fut


class _BucketModel(torch.nn.Module):
    """Stand-ins for one bucket's parameters: zero-stride placeholders (no memory) whose `.grad` are
    views into the bucket, so that an algorithm reading and writing `.grad` works on the bucket."""

    def __init__(self, shapes: list[torch.Size], like: torch.Tensor) -> None:
        super().__init__()
        zero = torch.zeros((), dtype=like.dtype, device=like.device)
        self.slots = torch.nn.ParameterList([torch.nn.Parameter(zero.expand(s)) for s in shapes])

    def point_at(self, buffer: torch.Tensor, offsets: list[int]) -> None:
        for p, offset in zip(self.slots, offsets):
            p.grad = buffer[offset : offset + p.numel()].view(p.shape)


class _Group:
    """The commsgd algorithm of one set of parameters (a bucket), bound to their gradients, and its step
    count. The parameters are always handed over in the same order, whatever order DDP's bucket has."""

    def __init__(self, state: HookState, shapes: list[torch.Size], like: torch.Tensor) -> None:
        self.shapes = shapes
        self.model = _BucketModel(shapes, like)
        optimizer = torch.optim.SGD(self.model.parameters(), lr=1.0)  # never stepped: bind() inspects it
        self.algo: Algorithm = build_algorithm(state.algorithm, state.params)
        self.algo.bind(state.ctx, self.model, optimizer)
        self.steps = 0

    def reduce(self, buffer: torch.Tensor, offsets: list[int]) -> torch.Tensor:
        self.model.point_at(buffer, offsets)
        self.steps += 1
        self.algo.after_backward(self.steps)
        return buffer


class HookState:
    """What a commsgd DDP hook keeps: the context, one algorithm per bucket, the allreduce in flight.

    DDP rebuilds its buckets after the first iteration (in the order gradients became ready), so a
    bucket is known by its set of parameters, not its index: each parameter gets a number when the hook
    first sees it (DDP's initial buckets, the same in every run of one model), and a bucket's algorithm
    gets its parameters in that order. A rebuilt bucket with the same parameters keeps its state (with
    one bucket, always); one with a new set continues the step count but starts its state afresh (with
    a warning, unless those were powersgd's warm-up steps, which leave no state). A resumed job's first
    iteration (DDP's initial buckets again) is split along the checkpoint's groups, so it resumes exactly.
    `state_dict()` / `load_state_dict()` save and restore every group's algorithm state (error feedback,
    Q, momentum, generators) and step count.
    """

    def __init__(self, name: str, ctx: WorkerContext, params: dict[str, Any]) -> None:
        self.name, self.ctx = name, ctx
        self.algorithm, fixed = HOOKS[name]
        self.params = validate_params(self.algorithm, {**params, **fixed}) if name != "allreduce" else {}
        if self.params.get("overlap"):
            raise ConfigError(
                f"ddp_hook({name!r}): overlap is DDP's own here (its buckets arrive as backward makes them); "
                "leave overlap unset"
            )
        self.groups: dict[tuple[int, ...], _Group] = {}
        self._numbers: dict[int, int] = {}  # id(parameter) -> its number
        self._loaded: dict[tuple[int, ...], dict[str, Any]] = {}
        self._in_flight: list[tuple[Pending, torch.futures.Future, torch.Tensor]] = []
        self._warned = False
        self._steps_of: dict[int, int] = {}  # parameter number -> steps of its dropped group

    # -- allreduce: asynchronous, finished at the end of the backward pass ----------------------

    def start_average(self, buffer: torch.Tensor) -> torch.futures.Future:
        world = self.ctx.world_size
        buffer.div_(world)  # as DDP: each worker's share, then a sum (bitwise DDP's result)
        pending = self.ctx.comm.all_reduce(buffer, op="sum", async_op=True)
        assert pending is not None
        if torch._C._current_graph_task_id() == -1:  # not inside backward: nothing to finish it later
            pending.wait()
            return _done(buffer)
        fut: torch.futures.Future = torch.futures.Future()
        if not self._in_flight:
            Variable._execution_engine.queue_callback(self._finish)
        self._in_flight.append((pending, fut, buffer))
        return fut

    def _finish(self) -> None:
        """Runs after the backward pass, before DDP's own end of pass waits on the futures."""
        in_flight, self._in_flight = self._in_flight, []
        for pending, fut, buffer in in_flight:
            pending.wait()  # the time blocked here is what the meter counts
            fut.set_result(buffer)

    # -- the other algorithms: per bucket, synchronous ------------------------------------------

    def reduce(self, buffer: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        """Reduce one bucket (`params`' gradients end to end in `buffer`) with its groups' algorithms."""
        numbers = [self._numbers.setdefault(id(p), len(self._numbers)) for p in params]
        at = {n: i for i, n in enumerate(numbers)}
        starts = [0]
        for p in params[:-1]:
            starts.append(starts[-1] + p.numel())
        for key in self._cover(set(numbers)):
            group = self._group(key, [params[at[n]].shape for n in key], buffer)
            group.reduce(buffer, [starts[at[n]] for n in key])
        return buffer

    def _cover(self, members: set[int]) -> list[tuple[int, ...]]:
        """The groups that reduce a bucket: known (live or checkpointed) groups that cover it exactly,
        e.g. a resumed job in DDP's first-iteration buckets; else the bucket as one group."""
        known = [k for k in (*self.groups, *self._loaded) if set(k) <= members]
        if sum(map(len, known)) == len(members) and set().union(*known) == members:
            return known
        return [tuple(sorted(members))]

    def _group(self, key: tuple[int, ...], shapes: list[torch.Size], like: torch.Tensor) -> _Group:
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = _Group(self, shapes, like)
            group.steps = self._regrouped(set(key))
            saved = self._loaded.pop(key, None)
            if saved is not None:
                self._restore(group, saved)
        return group

    def _regrouped(self, members: set[int]) -> int:
        """Drop the groups (live or checkpointed) that share parameters with a new one (DDP rebuilt its
        buckets into other sets of parameters); return their step count, which the new group continues."""
        for k in [k for k in self.groups if members & set(k) and set(k) != members]:
            self._steps_of.update(dict.fromkeys(k, self.groups.pop(k).steps))
        for k in [k for k in self._loaded if members & set(k) and set(k) != members]:
            self._steps_of.update(dict.fromkeys(k, int(self._loaded.pop(k)["steps"])))
        steps = max((self._steps_of.pop(m, 0) for m in members), default=0)
        if steps > int(self.params.get("warmup_steps", 0)) and not self._warned and self.ctx.rank == 0:
            self._warned = True
            say(
                f"commsgd: warning: ddp_hook: DDP regrouped its buckets after step {steps}; the {self.name} "
                "state of those steps restarts (use one bucket, or powersgd with warmup_steps >= 1)"
            )
        return steps

    def _restore(self, group: _Group, saved: dict[str, Any]) -> None:
        shapes = [list(s) for s in group.shapes]
        if shapes != saved["shapes"]:
            raise CheckpointError(
                f"ddp_hook: a bucket holds parameters of shapes {saved['shapes']} in the checkpoint, "
                f"{shapes} in this model (the same model and bucket_cap_mb are needed)"
            )
        group.algo.load_state_dict(saved["algorithm"])
        group.steps = int(saved["steps"])

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume: per group of parameters their shapes, step count and algorithm state."""
        groups = {
            key: {"shapes": [list(s) for s in g.shapes], "steps": g.steps, "algorithm": g.algo.state_dict()}
            for key, g in self.groups.items()
        }
        entries = [{"params": list(k), **v} for k, v in {**self._loaded, **groups}.items()]
        return {"name": self.name, "params": self.params, "groups": entries}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()`; each group is rebuilt from it when DDP first hands its bucket over.
        Call it before the first backward pass, on a model whose DDP has not run an iteration yet."""
        if state.get("name") != self.name:
            raise CheckpointError(
                f"ddp_hook: the checkpoint is for {state.get('name')!r}, this hook is {self.name!r}"
            )
        self.groups.clear()
        self._loaded = {
            tuple(int(i) for i in e["params"]): {k: v for k, v in e.items() if k != "params"}
            for e in state["groups"]
        }


def _names_line() -> str:
    return ", ".join(sorted(HOOKS))


def ddp_hook(name: str, ctx: WorkerContext | None = None, **params: Any) -> tuple[HookState, Hook]:
    """`(state, hook)` for `DistributedDataParallel.register_comm_hook(state, hook)`: commsgd's
    algorithm `name` (see `HOOKS`) with `params`, counted in `ctx.comm.meter` (ctx: the one from
    `commsgd.init()`, which is called when none is given). ConfigError for a name that cannot be a hook."""
    if name not in HOOKS:
        raise ConfigError(
            f"ddp_hook: {name!r} cannot be a DDP gradient hook (it is not a per-step gradient reduction); "
            f"choose one of: {_names_line()}"
        )
    if name == "allreduce" and params:
        raise ConfigError(f"ddp_hook: allreduce takes no parameters, got {', '.join(sorted(params))}")
    fixed = sorted(set(params) & set(HOOKS[name][1]))
    if fixed:
        raise ConfigError(f"ddp_hook: {name} fixes {', '.join(fixed)}; use ef_sgd to choose them")
    if ctx is None:
        from commsgd.api import init

        ctx = init()
    state = HookState(name, ctx, params)
    return state, _allreduce_hook if name == "allreduce" else _algorithm_hook


def _allreduce_hook(state: HookState, bucket: Any) -> torch.futures.Future:
    """DDP comm hook: the bucket averaged over all workers (asynchronous)."""
    return state.start_average(bucket.buffer())


def _algorithm_hook(state: HookState, bucket: Any) -> torch.futures.Future:
    """DDP comm hook: the bucket reduced by the state's commsgd algorithm."""
    buffer, params = bucket.buffer(), list(bucket.parameters())
    if sum(p.numel() for p in params) != buffer.numel():
        raise RuntimeError("ddp_hook: the bucket does not hold exactly its parameters' gradients")
    return _done(state.reduce(buffer, params))


# DDP reads the hooks' annotations and wants the objects themselves (this module's are strings).
for _hook in (_allreduce_hook, _algorithm_hook):
    _hook.__annotations__ = {
        "state": HookState,
        "bucket": torch.distributed.GradBucket,
        "return": torch.futures.Future[torch.Tensor],
    }


__all__ = ["HOOKS", "HookState", "ddp_hook"]

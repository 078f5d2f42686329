"""Asynchronous rounds (LSGD's Algorithm 1): a job-wide iteration counter decides when workers meet.

Workers do not wait for each other between rounds. The counter lives on the torch.distributed store
(`ctx.add_global_steps`, an atomic add). With W workers, a round with period `tau` fires each time
the job's total iteration count crosses a multiple of W * tau; rounds are numbered by their *virtual
step* s = count / W, so the synchronous and asynchronous schedules name the same rounds.

Tickets. A worker takes a ticket (adds 1 to the counter) for each step it is about to take: the
first in `should_stop`, every later one right after its previous step, in `after_step`. Ticket c
is the job's c-th iteration; every ticket below it has been handed out, so all rounds with
s * W <= c - 1 have fired and the worker joins those it has not joined yet, in order. A ticket above
the job's budget B = W * steps means the budget is used up: the worker does not take that step.
Exactly B iterations run, and the rounds are exactly those with s <= B / W, as in synchronous mode.

Why it cannot deadlock. Rounds are collectives joined in the same order by everyone. A worker
waiting in round s waits only for workers that are inside a step: each of them takes its next ticket
after that step (all tickets up to s * W are out, so it sees round s) or finds the budget used up,
and then it has seen every round anyway. A worker that leaves the loop joins what is left in
`finish()`, so no round is lost.

Evaluation is collective too, so it happens only right after a round that every worker joined from
inside its loop (each worker says so in the round's own collective, see `RoundAlgorithm.run_round`):
the first such round past each multiple of the evaluation period. A worker stops joining rounds
after an evaluation round until it has evaluated, so all workers evaluate between the same rounds.

Checkpoints (`checkpoint_every` C > 0) sit on the same schedule: checkpoint m*C is due once the job
has handed out the tickets up to m*C*W (m*C below the budget's B / W). Each worker writes it at its
first step boundary after that, having joined exactly the rounds at or before virtual step m*C
(`_join` stops there, as it stops for an evaluation), so the round state in every worker's file
(center variable, leaders, rounds done) is the same. The label is m*C on every worker; the file holds
the worker's own step and data position. Every worker writes every checkpoint, one per step, so one
whose step passed several writes them at its next steps. The workers' steps in one checkpoint sum to
m*C*W (every ticket at or below it was a finished step, every pending ticket is above it), or a
little more when a worker wrote it a step or more late: resuming counts the steps actually taken.

Resume. The counter starts from zero in every launch. On its first `should_stop` each worker reports
its step; the counter is moved on by their sum. The rounds done are those in the checkpoint (the same
on every worker); for an older checkpoint whose workers disagree, those at or before the job's steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from commsgd.context import WorkerContext

#: one round: (virtual step, this worker could evaluate right after it) -> every worker could (or None)
RoundFn = Callable[[int, bool], "bool | None"]


class AsyncRounds:
    """One worker's view of the asynchronous schedule: its tickets, the rounds it joined, evaluation."""

    def __init__(self, ctx: WorkerContext, periods: Sequence[int], checkpoint_every: int = 0) -> None:
        if not periods or min(periods) < 1:
            raise ValueError(f"round periods must be positive, got {list(periods)}")
        self.ctx = ctx
        self.periods = tuple(periods)
        self.ticket = 0  # ticket of this worker's next step; 0: none taken yet
        self.budget: int | None = None  # job-wide iterations, known from should_stop
        self.done = 0  # virtual step of the last round this worker joined (or skipped on resume)
        self.rounds = 0  # rounds this worker joined
        self.last_eval = 0  # virtual step of the last evaluation round
        self.every: int | None = None
        self.eval_due = False
        self.checkpoint_every = checkpoint_every
        self.checkpointed = 0  # virtual step of the last checkpoint due (or restored)
        self._checkpoint_due: int | None = None
        self._started = False

    def next_round(self, vstep: int) -> int:
        """The first round after virtual step `vstep`."""
        return min((vstep // p + 1) * p for p in self.periods)

    def _start(self, step: int) -> None:
        """Agree on where the job stands (fresh start or resume); collective, once per launch."""
        ctx = self.ctx
        with ctx.comm.meter.in_phase("control"):
            reports = ctx.comm.all_gather_json([step, self.done, self.last_eval, self.checkpointed])
            base = sum(int(r[0]) for r in reports)
            if base:
                if ctx.rank == 0:
                    ctx.add_global_steps(base)
                ctx.comm.barrier()
        joined = {int(r[1]) for r in reports}
        if len(joined) == 1:  # one checkpoint of the job's schedule (or a fresh start): rounds done agree
            self.done = joined.pop()
        else:  # an older checkpoint taken at one local step: the rounds up to the job's steps count as done
            self.done = max([*joined, base // ctx.world_size])
        self.last_eval = max(int(r[2]) for r in reports)
        every = self.checkpoint_every
        floor = (base // ctx.world_size) // every * every if every else 0  # also without a saved mark
        self.checkpointed = max([int(r[3]) for r in reports] + [floor])
        self._started = True

    def should_stop(self, step: int, total_steps: int) -> bool:
        """Whether the job's budget (workers x `total_steps` iterations) is used up for this worker."""
        if not self._started:
            self._start(step)
        self.budget = self.ctx.world_size * total_steps
        if self.ticket == 0:
            self.ticket = self.ctx.add_global_steps(1)
        return self.ticket > self.budget

    def after_step(self, run: RoundFn) -> None:
        """Take the next step's ticket and join every round that has fired since the last one."""
        if self.budget is None:
            raise RuntimeError(
                "asynchronous mode: call should_stop(step, total_steps) before each step; "
                "it sets the job-wide step budget"
            )
        self.ticket = self.ctx.add_global_steps(1)
        self._join(min(self.ticket - 1, self.budget) // self.ctx.world_size, run, in_loop=True)

    def finish(self, run: RoundFn) -> None:
        """Join the rounds this worker has not joined yet, up to the last one of the job."""
        if self.budget is not None:
            self._join(self.budget // self.ctx.world_size, run, in_loop=False)

    def _join(self, upto: int, run: RoundFn, in_loop: bool) -> None:
        vstep = self.next_round(self.done)
        while True:
            if in_loop and self._checkpoint_before(vstep, upto):
                return  # checkpoint before the next round
            if vstep > upto:
                return
            everyone_ready = run(vstep, in_loop and self.every is not None)
            self.done = vstep
            self.rounds += 1
            if everyone_ready and self.every and vstep // self.every > self.last_eval // self.every:
                self.last_eval, self.eval_due = vstep, True
                if in_loop:  # a checkpoint before the next round follows the evaluation
                    self._checkpoint_before(self.next_round(vstep), upto)
                return  # evaluate before the next round
            vstep = self.next_round(vstep)

    def _checkpoint_before(self, vstep: int, upto: int) -> bool:
        """Make the next checkpoint due if the job has reached it and it comes before round `vstep`."""
        every = self.checkpoint_every
        if not every or self.budget is None:
            return False
        mark = (self.checkpointed // every + 1) * every  # every worker writes every one, in order
        if mark > upto or mark >= vstep or mark * self.ctx.world_size >= self.budget:
            return False  # not reached, after the next round, or at the end (the final checkpoint)
        self.checkpointed = self._checkpoint_due = mark
        return True

    def checkpoint_label(self) -> int | None:
        """The virtual step of the checkpoint due after this worker's current step, or None."""
        due, self._checkpoint_due = self._checkpoint_due, None
        return due

    def should_evaluate(self, every: int) -> bool:
        self.every = every
        due, self.eval_due = self.eval_due, False
        return due

    def state_dict(self) -> dict[str, Any]:
        return {
            "done": self.done,
            "rounds": self.rounds,
            "last_eval": self.last_eval,
            "checkpointed": self.checkpointed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = int(state.get("done", 0))
        self.rounds = int(state.get("rounds", 0))
        self.last_eval = int(state.get("last_eval", 0))
        self.checkpointed = int(state.get("checkpointed", 0))
        self.ticket, self._started, self._checkpoint_due = 0, False, None

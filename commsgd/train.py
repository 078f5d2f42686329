"""The worker loop shared by every algorithm: data -> forward/backward -> hooks -> optimizer -> hooks -> log.

One `Trainer` runs in each worker process. It builds the data set, model, local optimizer and the
algorithm from the config, restores a checkpoint when resuming, and writes the run directory
(see `commsgd.metrics`). Evaluation of the algorithm's evaluated parameters (the center variable) is
collective: every worker evaluates its shard of the test set and the sums are all-reduced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from commsgd import checkpoint, interrupt
from commsgd.algorithms import build_algorithm
from commsgd.algorithms.base import MiniBatch, Slowdown
from commsgd.api import CommOptimizer, NonFiniteError
from commsgd.config import DEFAULT_STEPS, Config, save_config, to_dict
from commsgd.context import WorkerContext, create_context
from commsgd.errors import CheckpointError, ConfigError, UserError, WorkerError, say
from commsgd.hostmemory import keep_freed_memory
from commsgd.interrupt import TIME_LIMIT, Interrupted, StopAgreement
from commsgd.jobclock import JobClock
from commsgd.metrics import JsonlLog, mean, peak_memory_mb, summary_table, write_json_atomic
from commsgd.optim import build_optimizer, check_training_options, uses_job_clock
from commsgd.optim import learning_rate as optim_rate
from commsgd.precision import AgreedScaler, autocast
from commsgd.progress import Progress
from commsgd.startup import startup_s
from commsgd.tasks import Dataset, build_model, derived_metrics, load_dataset, loss_and_errors
from commsgd.tensorboard_log import TensorBoardLog


class ShardedBatches:
    """Each worker's exclusive shard of the training set per epoch, in mini-batches (last one dropped)."""

    def __init__(self, size: int, batch_size: int, rank: int, world: int, seed: int) -> None:
        self.sampler: DistributedSampler[int] = DistributedSampler(
            range(size),  # type: ignore[arg-type]  # only len() is used
            num_replicas=world,
            rank=rank,
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
        self.batch_size = batch_size
        self.per_epoch = len(self.sampler) // batch_size
        if self.per_epoch == 0:
            raise ConfigError(
                f"data.batch_size: {batch_size} is larger than a worker's shard ({len(self.sampler)} samples)"
            )

        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.int64)

    def batch(self, epoch: int, index: int) -> torch.Tensor:
        """Sample indices of mini-batch `index` of `epoch` (deterministic: resumable from any position)."""
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._order, self._epoch = torch.tensor(list(self.sampler), dtype=torch.int64), epoch
        return self._order[index * self.batch_size : (index + 1) * self.batch_size]


def learning_rate(cfg: Config, step: int, elapsed_s: float, total: int = DEFAULT_STEPS) -> float:
    """The rate after `step` finished steps of `total` (`commsgd.optim.learning_rate`).

    `elapsed_s` is the job's clock (`commsgd.jobclock`), not this worker's: the same on every worker."""
    return optim_rate(cfg.optim, step, elapsed_s, total)


def total_steps(cfg: Config, batches_per_epoch: int) -> int:
    """Steps of the run; an epoch is `batches_per_epoch` mini-batches, `optim.accumulate` per step."""
    if cfg.steps is not None:
        return cfg.steps
    if cfg.epochs is not None:
        return max(1, cfg.epochs * batches_per_epoch // cfg.optim.accumulate)
    return DEFAULT_STEPS


def worker_threads(cfg: Config, local_workers: int) -> int:
    """torch threads per worker: `cluster.threads`, else the cores this process may run on (its affinity
    mask, e.g. an emulated node's share under `taskset`, or a container's cpuset) shared by its workers."""
    if cfg.cluster.threads:
        return cfg.cluster.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // local_workers)


class Trainer:
    """Runs one worker from the first (or restored) step to the end and writes its records."""

    def __init__(self, cfg: Config, ctx: WorkerContext, run_dir: Path) -> None:
        self.cfg, self.ctx, self.run_dir = cfg, ctx, run_dir
        torch.set_num_threads(worker_threads(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
        if cfg.cluster.reuse_memory:
            keep_freed_memory()
        self.dataset: Dataset = load_dataset(
            cfg.data.dataset, cfg.data.data_dir, model=cfg.model, seed=cfg.seed
        )
        if cfg.data.test_samples is not None:
            self.dataset = self.dataset.with_test_subset(cfg.data.test_samples, cfg.seed)
        torch.manual_seed(cfg.seed)  # the same initial model on every worker
        self.model = build_model(cfg.model, self.dataset.spec).to(ctx.device)
        self.algo = build_algorithm(cfg.algorithm, cfg.algo)
        if ctx.rank in cfg.cluster.slow_ranks:
            self.algo.slowdown = Slowdown(cfg.cluster.slow_factor, cfg.cluster.slow_sleep_s)
        self.algo.checkpoint_every = cfg.checkpoint_every  # before bind: async schedules need it
        self.algo.accumulate = cfg.optim.accumulate
        check_training_options(cfg, self.algo)
        self.optimizer = build_optimizer(cfg, self.model, self.algo)
        self.scaler = AgreedScaler() if cfg.precision == "fp16" else None
        self.step_fn = CommOptimizer(
            self.optimizer,
            self.algo,
            self.model,
            ctx,
            nonfinite=cfg.nonfinite,
            max_bad_steps=cfg.max_bad_steps,
            clip_norm=cfg.optim.clip_norm,
            scaler=self.scaler,
        )
        self.batches = ShardedBatches(
            len(self.dataset.train_y), cfg.data.batch_size, ctx.rank, ctx.world_size, cfg.seed
        )
        self.total = total_steps(cfg, self.batches.per_epoch)
        # Worker-specific randomness (augmentation, dropout) from one run seed.
        self.data_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 1 + ctx.rank)
        torch.manual_seed(cfg.seed * 7919 + 1000 + ctx.rank)
        random.seed(cfg.seed * 7919 + ctx.rank)
        np.random.seed((cfg.seed * 7919 + ctx.rank) % 2**32)
        self.step = 0
        self.batches_drawn = 0  # data position: one batch per step, or more for deadline-based methods
        self.label = 0  # label of the newest checkpoint this worker wrote or restored
        self.complete: int | None = None  # newest label every worker is known to have written
        self._announced: set[int] = set()  # labels this worker has counted as written in the store
        self.compute_s = 0.0
        self.data_s = 0.0  # drawing and augmenting batches (part of compute_s), in this process's steps
        self.eval_s = 0.0  # in evaluations since this process started (not part of training time)
        self._step_s_from: float | None = None  # step time when this process drew its first batch
        self.wall_offset = 0.0
        self.eval_offset = 0.0  # evaluation seconds before a resume (from the checkpoint)
        self.lr = cfg.optim.lr
        # `optim.drop_seconds` by rank 0's clock, so that replicas drop at one step (commsgd.jobclock)
        self.job_clock = JobClock(
            ctx.comm, ctx.store, ctx.rank, ctx.world_size, cfg.optim.drop_seconds, self.algo.lockstep
        )
        self.metrics = JsonlLog(run_dir / "metrics" / f"rank{ctx.rank}.jsonl")
        self.evals = JsonlLog(run_dir / "eval.jsonl")
        self._last_eval: tuple[int, dict[str, float]] | None = None  # (step, result) recorded last
        self.tensorboard = self._tensorboard()

    # ------------------------------------------------------------------ resume

    def restore(self, resume: bool = False) -> bool:
        """Load the newest checkpoint that every worker can load; False when there is none to load.

        Damaged, unsafe or foreign files are skipped with a warning each. No common checkpoint after
        one was finished by every worker is refused (`checkpoint.agreed_label`) before anything is
        changed; so is `resume` (``--resume``) without a common checkpoint. Every worker gets back
        its own step and data position (asynchronous algorithms: different on each worker).
        """
        ctx = self.ctx
        files = checkpoint.saved_steps(self.run_dir, ctx.rank)
        with warnings.catch_warnings(record=True) as problems:
            warnings.simplefilter("always")
            mine = checkpoint.loadable_steps(self.run_dir, ctx.rank, max(1, len(files)))
        for problem in problems:  # a truncated, corrupt or unsafe file: said once per file, then skipped
            say(f"commsgd: warning: rank {ctx.rank}: {problem.message}")
            ctx.log_event({"event": "checkpoint_skipped", "rank": ctx.rank, "reason": str(problem.message)})
        finished = checkpoint.recorded_complete(self.run_dir, ctx.rank)
        with ctx.comm.meter.in_phase("control"):
            everyone = ctx.comm.all_gather_json([mine, files, finished])
        loadable, saved, completed = ([e[i] for e in everyone] for i in range(3))
        label = checkpoint.agreed_label(self.run_dir, loadable, saved, completed, resume=resume)
        if label is None:
            self._start_again(saved)
            return False
        path = checkpoint.checkpoint_path(self.run_dir, label, ctx.rank)
        failure = self._load(path)
        with ctx.comm.meter.in_phase("control"):
            reported = [p for p in ctx.comm.all_gather_json(failure) if p]
        if reported:  # the same line on every worker, whichever worker found it
            raise CheckpointError(reported[0])
        self.label = self.complete = label
        checkpoint.discard_newer(self.run_dir, ctx.rank, label)  # a dead attempt's unfinished ones
        self.metrics.truncate_after(self.step)
        if ctx.is_main:
            self.evals.truncate_after(self.step)  # rank 0 records evaluations at its own steps
            say(f"commsgd: resumed from the checkpoint of step {label} (attempt {ctx.restart_count})")
        if not checkpoint.has_checksum(path):
            say(
                f"commsgd: warning: rank {ctx.rank}: checkpoint {path} has no checksum (written by an "
                "older commsgd); loaded without verifying its bytes"
            )
        ctx.log_event(
            {"event": "restored", "step": label, "local_step": self.step, "attempt": ctx.restart_count}
        )
        return True

    def _start_again(self, saved: list[list[int]]) -> None:
        """Nothing to restore: say so on a restart, and drop the files of checkpoints never finished."""
        ctx = self.ctx
        if ctx.restart_count > 0 and ctx.is_main:
            if any(saved):
                why = "no checkpoint was finished by every worker yet"
            else:
                why = "no checkpoint was written yet"
            say(f"commsgd: warning: restarting from step 0: {why} (attempt {ctx.restart_count})")
        checkpoint.discard_newer(self.run_dir, ctx.rank, 0)

    def _load(self, path: Path) -> str | None:
        """Load this worker's file of the agreed checkpoint into the trainer; the problem, if any."""
        ctx = self.ctx
        try:
            state = checkpoint.load_checkpoint(path)
            meta = state["meta"]
            if meta["algorithm"] != self.cfg.algorithm or meta["world_size"] != ctx.world_size:
                return (
                    f"resume {self.run_dir}: checkpoint is from algorithm {meta['algorithm']!r} on "
                    f"{meta['world_size']} workers; this run is {self.cfg.algorithm!r} on {ctx.world_size}"
                )
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            # The rate in force when the checkpoint was taken, so that a schedule drop already passed
            # does not fire `on_lr_change` again. Older checkpoints lack "lr": the optimizer's rate is
            # the one `_apply_lr` set last.
            self.lr = float(state.get("lr", self.optimizer.param_groups[0]["lr"]))
            self.algo.load_state_dict(state["algorithm"])
            self.step_fn.load_guard_state(state.get("nonfinite", {}))
            if self.scaler is not None and "scaler" in state:  # absent: saved by an fp32/bf16 run
                self.scaler.load_state_dict(state["scaler"])
            ctx.comm.meter.load_state_dict(state["meter"])
            set_rng_state(state["rng"])
            self.data_gen.set_state(state["rng"]["data"])
            self.step = int(state["step"])
            self.batches_drawn = int(state.get("batches", self.step))
            self.compute_s, self.wall_offset = float(state["compute_s"]), float(state["wall_s"])
            self.eval_offset = float(state.get("eval_s", 0.0))  # absent: saved before evaluations were timed
        except CheckpointError as exc:
            return str(exc)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return f"checkpoint {path}: does not fit this run ({type(exc).__name__}: {reason[:160]})"
        return None

    def save(self, label: int | None = None) -> None:
        """Write this worker's checkpoint `label`, then prune. Without a label: the end-of-run checkpoint,
        which every worker writes at the same point (after `finish`, or when stopped on a signal).

        Collective where the algorithm's checkpoints are (`prepare_checkpoint`), and for the end-of-run
        one. Each worker counts the labels it has written in the job's store; pruning keeps the newest
        label every worker has written (`checkpoint.prune_checkpoints`).
        """
        ctx = self.ctx
        final = label is None
        if label is None:
            label = max(self.algo.final_checkpoint_label(self.step, self.total), self.label)
        self.algo.prepare_checkpoint()
        state = {
            "step": self.step,
            "batches": self.batches_drawn,
            "lr": self.lr,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "algorithm": self.algo.state_dict(),
            "nonfinite": self.step_fn.guard_state(),
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
            "meter": ctx.comm.meter.state_dict(),
            "rng": {**rng_state(), "data": self.data_gen.get_state()},
            "compute_s": self.compute_s,
            "wall_s": self.wall_s(),
            "eval_s": self.eval_offset + self.eval_s,
            "meta": {
                "algorithm": self.cfg.algorithm,
                "world_size": ctx.world_size,
                "config": to_dict(self.cfg),
            },
        }
        checkpoint.save_checkpoint(self.run_dir, label, ctx.rank, state)
        self.label = label
        self._announce(label)
        if final:  # everyone writes it: wait for the others, so that older ones can go now
            with ctx.comm.meter.in_phase("control"):
                ctx.comm.barrier()
        complete = self._newest_complete()
        if complete is not None and complete != self.complete:
            checkpoint.record_complete(self.run_dir, ctx.rank, complete)
        self.complete = complete
        checkpoint.prune_checkpoints(self.run_dir, ctx.rank, self.cfg.keep_checkpoints, self.complete)

    def _announce(self, label: int) -> None:
        """Count checkpoint `label` as written by this worker (once per label and launch)."""
        if label not in self._announced:
            with self.ctx.comm.meter.in_phase("control"):
                self.ctx.comm.store_add(self.ctx.store, f"checkpoint/written/{label}", 1)
            self._announced.add(label)

    def _newest_complete(self) -> int | None:
        """The newest label that every worker has written (as far as the job's store knows)."""
        ctx, comm = self.ctx, self.ctx.comm
        with comm.meter.in_phase("control"):
            for step in checkpoint.saved_steps(self.run_dir, ctx.rank):
                if self.complete is not None and step <= self.complete:
                    break
                if step in self._announced and (
                    comm.store_add(ctx.store, f"checkpoint/written/{step}", 0) >= ctx.world_size
                ):
                    return step
        return self.complete

    # ------------------------------------------------------------------ the loop

    def wall_s(self) -> float:
        return self.wall_offset + time.perf_counter() - self._start

    def train_s(self) -> float:
        """Seconds of training so far: the wall clock less the evaluations (what `max_seconds` counts
        and what curves of test error against time are drawn over)."""
        return self.wall_s() - self.eval_offset - self.eval_s

    def run(self) -> dict[str, Any] | None:
        cfg, ctx = self.cfg, self.ctx
        if ctx.world_size > 1:  # start the clocks together: the start-up skew is not communication
            with ctx.comm.meter.in_phase("control"):
                ctx.comm.barrier()
        self._start = time.perf_counter()
        self._first_step_at = time.time()  # the start-up the user waited for ends here (startup_s)
        self._load_at_start = load_average()  # summary.json: was the machine busy (commsgd report)
        bar = self._progress()
        comm = ctx.comm.meter
        stopper = StopAgreement(
            ctx.comm,
            ctx.store,
            ctx.rank,
            ctx.world_size,
            self.total,
            self.algo.step_aligned,
            cfg.cluster.timeout_s,
            peers_lost=self._peer_lost,
            # with a time limit every step is a check step (a store read, ~0.1 ms): a run of slow steps
            # must not overrun its limit by ten of them
            check_every=1 if cfg.max_seconds is not None else interrupt.CHECK_EVERY,
        )
        limit = cfg.max_seconds
        while not self.algo.should_stop(self.step, self.total):
            epoch = self.batches_drawn // self.batches.per_epoch
            self._apply_lr(epoch)
            before = comm.totals()
            spent_in_comm = before.comm_s + before.wait_s
            start = time.perf_counter()
            self.step += 1
            loss_value = self.step_fn.step(step=self.step, next_batch=self._next_batch)
            # An algorithm that draws its own batches spends the slowdown inside its computation.
            if self.algo.slowdown.active and not self.algo.draws_batches:
                now = comm.totals()
                in_comm = now.comm_s + now.wait_s - spent_in_comm
                self._sleep(self.algo.slowdown.delay(time.perf_counter() - start - in_comm))
            after = comm.totals()
            self.compute_s += time.perf_counter() - start - (after.comm_s + after.wait_s - spent_in_comm)
            if self.step % cfg.log_every == 0:
                self._log(epoch, loss_value)
            if bar is not None:
                bar.update(self.step, loss_value)
            if self.algo.should_evaluate(self.step, cfg.eval_every):
                result = self.evaluate()
                self._record_eval(result)
                if bar is not None:
                    bar.test_error(result["test_error"])
            label = self.algo.checkpoint_label(self.step)  # on a job-wide schedule for async ones
            saved = label is not None
            if label is not None:
                self.save(label)
            if limit is not None and ctx.rank == 0 and self.train_s() >= limit:
                stopper.limit_reached = True  # the others learn it at their next check step
            if stopper.should_stop(self.step):  # SIGINT / SIGTERM / max_seconds: commsgd.interrupt
                if stopper.signum() == TIME_LIMIT:
                    self.ctx.log_event({"event": "time_limit", "step": self.step, "seconds": limit})
                    break  # ends like the last step: final evaluation and checkpoint below
                if bar is not None:
                    bar.close()
                self._stop_on_signal(stopper, saved)
        if bar is not None:
            bar.close()
        self.algo.finish()
        final = self.evaluate()
        self._record_eval(final)
        self.save()
        return self._summarise(final)

    def _peer_lost(self) -> bool:
        """Whether a peer is gone (no heartbeat, or it reported a failure); takes a few beats."""
        heartbeat = self.ctx.heartbeat
        if heartbeat is None:
            return False
        found = heartbeat.silent_peers()
        return found is None or bool(found[0] or found[1])

    def _stop_on_signal(self, stopper: StopAgreement, saved: bool) -> NoReturn:
        """The workers stop on a signal after this step: save it (step-aligned algorithms) and end.

        Asynchronous algorithms stop without a new checkpoint: their workers are at different steps.
        """
        step: int | None = None
        if self.algo.step_aligned:
            if not saved:
                self.save()
            self.algo.finish()  # stop servers; every worker is at this step, so nobody waits
            step = self.step
        signum = stopper.signum()
        self.ctx.log_event({"event": "interrupted", "step": self.step, "saved": step, "signal": signum})
        self.metrics.close()
        self.evals.close()
        raise Interrupted(signum, step)

    def _loss_closure(self, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
        """The batch's loss: the forward pass under `precision`'s autocast; with fp16, a backward
        through it multiplies the gradient by the loss scale (the value itself is unscaled)."""

        def loss() -> torch.Tensor:
            with autocast(self.cfg.precision, self.ctx.device):
                value = loss_and_errors(self.model(x), y)[0]
            return value if self.scaler is None else self.scaler.scaled(value)

        return loss

    def _next_batch(self) -> MiniBatch:
        """This worker's next mini-batch (the algorithm draws one per step, or more by a deadline)."""
        start = time.perf_counter()
        if self._step_s_from is None:  # time restored from a checkpoint holds no data time of ours
            self._step_s_from = self._step_s()
        epoch, index = divmod(self.batches_drawn, self.batches.per_epoch)
        self.batches_drawn += 1
        indices = self.batches.batch(epoch, index)
        x, y = self.dataset.train_batch(indices, self.data_gen)
        x, y = x.to(self.ctx.device, non_blocking=True), y.to(self.ctx.device, non_blocking=True)
        self.data_s += time.perf_counter() - start
        return MiniBatch(
            self._loss_closure(x, y),
            int(indices.numel()),
            head=lambda n: MiniBatch(self._loss_closure(x[:n], y[:n]), n),
        )

    def _step_s(self) -> float:
        """Training step time so far: computation (data included), communication and waiting."""
        c = self.ctx.comm.meter.totals()
        return self.compute_s + c.comm_s + c.wait_s

    def _apply_lr(self, epoch: int) -> None:
        timed = uses_job_clock(self.cfg.optim)
        elapsed = self.job_clock.seconds(self.step, self.wall_s()) if timed else 0.0
        lr = learning_rate(self.cfg, self.step, elapsed, self.total)
        if lr != self.lr:
            self.algo.on_lr_change(self.lr, lr)
            self.lr = lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @staticmethod
    def _sleep(seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def _log(self, epoch: int, loss: float) -> None:
        c = self.ctx.comm.meter.totals()
        record = {
            "step": self.step,
            "epoch": epoch,
            "loss": loss,
            "lr": self.lr,
            "wall_s": round(self.wall_s(), 6),
            "bytes_sent": c.bytes_sent,
            "bytes_recv": c.bytes_recv,
            "link_bytes": c.link_bytes,
            "compute_s": round(self.compute_s, 6),
            "comm_s": round(c.comm_s, 6),
            "wait_s": round(c.wait_s, 6),
            "collectives": c.calls,
        }
        self.metrics.write(record)
        if self.tensorboard is not None:
            self.tensorboard.log_step(self.step, loss, self.lr, c.bytes_sent, c.comm_s + c.wait_s)

    def evaluate(self) -> dict[str, float]:
        """Test loss and error of the evaluated parameters; every worker takes part.

        Only the passes over the test set count as evaluation time (`eval_s`); getting the evaluated
        parameters (a parameter server first applies every push in flight, then sends its center) is
        the algorithm's communication and stays in the training time."""
        ctx, model = self.ctx, self.model
        with ctx.comm.meter.in_phase("eval"), self.algo.evaluated_parameters():
            started = time.perf_counter()
            was_training = model.training
            model.eval()
            sums = torch.zeros(3, dtype=torch.float64)
            with torch.no_grad():
                for x, y in self.dataset.test_batches(256, shard=(ctx.rank, ctx.world_size)):
                    with autocast(self.cfg.precision, ctx.device):
                        out = model(x.to(ctx.device))
                        loss, errors = loss_and_errors(out, y.to(ctx.device))
                    count = y.numel()
                    sums += torch.tensor(
                        [loss.item() * count, float(errors), float(count)], dtype=torch.float64
                    )
            model.train(was_training)
            ctx.comm.all_reduce(sums, op="sum")
            self.eval_s += time.perf_counter() - started
        total = max(sums[2].item(), 1.0)
        test_loss = sums[0].item() / total
        return {
            "test_loss": test_loss,
            "test_error": sums[1].item() / total,
            **derived_metrics(self.dataset.spec, test_loss),
        }

    def _record_eval(self, result: dict[str, float]) -> None:
        """Log an evaluation (rank 0); the end-of-run one only if it differs from one just taken."""
        if self._last_eval == (self.step, result):  # the last step was an evaluation step too
            return
        self._last_eval = (self.step, result)
        if self.ctx.is_main:
            record = {
                "step": self.step,
                "wall_s": round(self.wall_s(), 6),
                "train_s": round(self.train_s(), 6),
                **result,
            }
            self.evals.write(record)
            if self.tensorboard is not None:
                self.tensorboard.log_eval(self.step, result)

    def _summarise(self, final: dict[str, float]) -> dict[str, Any] | None:
        ctx = self.ctx
        c = ctx.comm.meter.totals()
        wall = self.wall_s()
        mine = {
            "steps": self.step,
            "bytes_sent": c.bytes_sent,
            "bytes_recv": c.bytes_recv,
            "comm_time_s": c.comm_s,
            "wait_time_s": c.wait_s,
            "compute_time_s": self.compute_s,
            "data_time_s": self.data_s,
            "data_share": self.data_s / max(self._step_s() - (self._step_s_from or 0.0), 1e-9),
            "wall_time_s": wall,
            "eval_time_s": self.eval_offset + self.eval_s,
            "train_time_s": wall - (self.eval_offset + self.eval_s),
            "peak_memory_mb": peak_memory_mb(ctx.device),
            "eval_bytes_sent": ctx.comm.meter.totals("eval").bytes_sent,
            "algorithm": self.algo.summary(),
        }
        with ctx.comm.meter.in_phase("control"):
            workers = ctx.comm.all_gather_json(mine)
        self.metrics.close()
        self.evals.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if not ctx.is_main:
            return None
        summary: dict[str, Any] = {
            "algorithm": self.cfg.algorithm,
            "world_size": ctx.world_size,
            "num_nodes": ctx.num_nodes,
            "model": self.cfg.model,
            "dataset": self.cfg.data.dataset,
            "backend": ctx.backend,
            "device": str(ctx.device),
            "workers_per_node": [ctx.comm.node_of.count(n) for n in range(ctx.num_nodes)],
            **algorithm_parameters(self.algo),
            **final,
            "wall_time_s": max(w["wall_time_s"] for w in workers),
            "startup_s": startup_s(self._first_step_at),
            "load_average": {"start": self._load_at_start, "end": load_average()},
        }
        for key in (
            "steps",
            "bytes_sent",
            "bytes_recv",
            "comm_time_s",
            "wait_time_s",
            "compute_time_s",
            "data_time_s",
            "data_share",
            "eval_time_s",
            "train_time_s",
            "peak_memory_mb",
            "eval_bytes_sent",
        ):
            summary[key] = [w[key] for w in workers]
        summary["bytes_per_step"] = [w["bytes_sent"] / max(w["steps"], 1) for w in workers]
        summary["comm_share"] = [
            (w["comm_time_s"] + w["wait_time_s"]) / train
            if (train := w["wall_time_s"] - w["eval_time_s"]) > 0
            else 0.0
            for w in workers
        ]
        summary["algorithm_summary"] = [w["algorithm"] for w in workers]
        summary["network_model"] = to_dict(self.cfg.network) if self.cfg.network.enabled else None
        write_json_atomic(self.run_dir / "summary.json", summary)
        print(summary_table(summary), flush=True)
        print(f"run directory: {self.run_dir}", flush=True)
        return summary

    # ------------------------------------------------------------------ extras

    def _progress(self) -> Progress | None:
        """Rank 0's bar (a terminal) or plain lines (a batch job), when `progress` is on."""
        if not (self.ctx.is_main and self.cfg.progress):
            return None
        cfg = self.cfg
        return Progress(
            self.total,
            self.step,
            cfg.algorithm,
            every_steps=cfg.progress_every,
            every_s=cfg.progress_every_s,
        )

    def _tensorboard(self) -> TensorBoardLog | None:
        """Rank 0's TensorBoard scalars when `tensorboard` is on (commsgd.tensorboard_log)."""
        if not (self.cfg.tensorboard and self.ctx.is_main):
            return None
        return TensorBoardLog(self.run_dir)


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def algorithm_parameters(algo: Any) -> dict[str, Any]:
    """The algorithm's parameters for summary.json: all of them, and the names set away from their
    defaults (the final table shows those, or all when they are few)."""
    params = getattr(algo, "params", None)
    if params is None or not dataclasses.is_dataclass(params) or isinstance(params, type):
        return {"algorithm_params": {}, "algorithm_params_set": []}
    values = dataclasses.asdict(params)
    defaults = dataclasses.asdict(type(params)())
    changed = [k for k in values if values[k] != defaults[k]]
    return {"algorithm_params": values, "algorithm_params_set": changed}


def rng_state() -> dict[str, Any]:
    """Every global random stream a worker draws from, as tensors and plain data (safe to load)."""
    legacy = np.random.get_state(legacy=True)
    assert isinstance(legacy, tuple)
    kind, keys, pos, has_gauss, cached = legacy
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [
            kind,
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved (older checkpoints hold the torch state only)."""
    torch.set_rng_state(state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_worker_record(run_dir: Path, ctx: WorkerContext, lost: tuple[int, ...] | None = None) -> None:
    """``workers/rank{r}.json``: pid, host and attempt of this worker (for operators and fault tests).

    Written again with `lost` (the peers without a heartbeat) when this worker's collective failed
    on them, so that the launcher's last line names the hung or dead peer, not this survivor.
    """
    path = run_dir / "workers" / f"rank{ctx.rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "rank": ctx.rank,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "attempt": ctx.restart_count,
    }
    if lost is not None:
        record["lost"] = list(lost)
    write_json_atomic(path, record)


def read_worker_record(run_dir: Path, rank: int) -> dict[str, Any] | None:
    """The record `write_worker_record` left for `rank`; None when it is missing or unreadable."""
    try:
        record = json.loads((run_dir / "workers" / f"rank{rank}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def run_worker(cfg: Config, run_dir: Path | None, resume: bool) -> dict[str, Any] | None:
    """Entry point of one worker process (embedded launcher or torchrun).

    A failed collective is turned into a one-line `PeerFailure` naming the peers whose heartbeat
    stopped (see `WorkerContext.diagnose_failure`); other errors propagate unchanged.
    """
    if run_dir is None:
        raise ConfigError("out: a run directory is needed")
    ctx = create_context(cfg.cluster, cfg.network, cfg.seed, run_dir)
    # Only now: a worker still joining its process group is blocked in C++, where a recorded signal
    # would never be acted on; until here SIGTERM ends it at once (the agent then stops the rest).
    interrupt.install()
    try:
        write_worker_record(run_dir, ctx)
        return _train(cfg, ctx, run_dir, resume)
    except (UserError, WorkerError, NonFiniteError):  # explained in one line by this worker
        if ctx.heartbeat is not None:
            ctx.heartbeat.report("failed")
        raise
    except Exception as exc:
        failure = ctx.diagnose_failure(exc)
        if failure is None:
            raise
        if failure.lost:
            with contextlib.suppress(OSError):  # the record is a hint; the failure is what matters
                write_worker_record(run_dir, ctx, failure.lost)
        raise failure from exc
    finally:
        ctx.close()


def _train(cfg: Config, ctx: WorkerContext, run_dir: Path, resume: bool) -> dict[str, Any] | None:
    """Build the trainer, restore on --resume or after an elastic restart, and run to the end."""
    trainer = Trainer(cfg, ctx, run_dir)
    restored = trainer.restore(resume) if (resume or ctx.restart_count > 0) else False
    if resume and restored and ctx.is_main:
        # Only now, with every worker's state loaded: a resume that fails (a changed parameter that
        # shapes the algorithm's state, say) leaves the run's config.yaml as it was.
        save_config(cfg, run_dir / "config.yaml")
    if not restored:  # a fresh start (or a restart before the first checkpoint): no stale records
        trainer.metrics.truncate_after(0)
        if ctx.is_main:
            trainer.evals.truncate_after(0)
    return trainer.run()


__all__ = ["ShardedBatches", "Trainer", "learning_rate", "mean", "run_worker", "total_steps"]

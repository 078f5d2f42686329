"""Checkpoint faults in one process: flipped bits, crafted and foreign files, a full disk, pruning that
keeps a checkpoint common to every worker, the choice of the checkpoint to restore, and the job-wide
checkpoint schedule of the asynchronous algorithms (rounds and DOWNPOUR's job budget)."""

from __future__ import annotations

import contextlib
import errno
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from fs_faults import small_tmpfs

from commsgd import checkpoint
from commsgd.algorithms.downpour import JobBudget
from commsgd.algorithms.rounds import AsyncRounds
from commsgd.checkpoint import (
    agreed_label,
    checkpoint_path,
    has_checksum,
    load_checkpoint,
    loadable_steps,
    prune_checkpoints,
    save_checkpoint,
    saved_steps,
)
from commsgd.errors import CheckpointError, WorkerError


def _state(step: int, **extra: Any) -> dict[str, Any]:
    weights = torch.arange(4096, dtype=torch.float32) + step
    return {
        "step": step,
        "model": {"w": weights},
        "meta": {"algorithm": "allreduce", "world_size": 2},
        **extra,
    }


class Payload:
    """Unpickling this runs `open(marker, "w")`: a stand-in for code hidden in a crafted checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


# -- checksums ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["tensor", "header", "end", "checksum"])
def test_a_flipped_bit_anywhere_is_detected_and_an_older_checkpoint_used(tmp_path: Path, where: str) -> None:
    for step in (10, 20):
        save_checkpoint(tmp_path, step, 0, _state(step))
    newest = checkpoint_path(tmp_path, 20, 0)
    data = newest.read_bytes()
    offset = {
        "tensor": data.find((torch.arange(4096, dtype=torch.float32) + 20).numpy().tobytes()[4000:4016]),
        "header": 40,
        "end": len(data) - 100,  # the zip's central directory
        "checksum": len(data) - 5,
    }[where]
    assert offset > 0
    _flip(newest, offset)
    with pytest.raises(CheckpointError, match=r"checksum mismatch|truncated or damaged") as info:
        load_checkpoint(newest)
    assert "\n" not in str(info.value)
    with pytest.warns(UserWarning, match=r"rank0\.pt.*falling back to an older checkpoint"):
        assert loadable_steps(tmp_path, 0, 5) == [10]


def test_checkpoints_are_valid_zips_that_torch_loads_directly(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 5, 1, _state(5))
    assert has_checksum(path)
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], _state(5)["model"]["w"])
    import zipfile

    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None and archive.comment.startswith(b"commsgd-sha256:")


def test_an_older_file_without_checksum_still_loads(tmp_path: Path) -> None:
    path = checkpoint_path(tmp_path, 10, 0)
    path.parent.mkdir(parents=True)
    torch.save(_state(10), path)  # what commsgd wrote before checksums
    assert not has_checksum(path)
    assert load_checkpoint(path)["step"] == 10
    path.write_bytes(path.read_bytes()[:-30])  # truncated: no longer ends like a zip
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        load_checkpoint(path)


# -- crafted and foreign files -----------------------------------------------------------------------


def test_a_crafted_file_with_a_valid_checksum_is_refused_in_commsgds_words(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = save_checkpoint(tmp_path, 20, 0, _state(20, model=Payload(marker)))  # checksummed like ours
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert not marker.exists()
    assert "refused: loading it would call io.open" in message
    assert "nothing in the file was run" in message
    for advice in ("weights_only", "Weights only", "add_safe_globals", "trust", "\x1b"):
        assert advice not in message
    assert "\n" not in message and len(message) < 300


def test_a_checkpoint_without_its_metadata_is_a_clear_refusal(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 10, 0, _state(10))
    bare = _state(20)
    del bare["meta"]
    save_checkpoint(tmp_path, 20, 0, bare)
    with pytest.raises(CheckpointError, match=r"rank0\.pt: its metadata .* is missing"):
        load_checkpoint(checkpoint_path(tmp_path, 20, 0))
    with pytest.warns(UserWarning, match="metadata"):
        assert loadable_steps(tmp_path, 0, 5) == [10]


# -- a full disk -------------------------------------------------------------------------------------


def test_disk_full_while_saving_is_one_line_and_leaves_the_earlier_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path, 10, 1, _state(10))
    real_save = torch.save

    def fills_the_disk(obj: Any, handle: Any) -> None:
        real_save(obj, handle)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", fills_the_disk)
    with pytest.raises(WorkerError) as info:
        save_checkpoint(tmp_path, 20, 1, _state(20))
    monkeypatch.undo()
    message = str(info.value)
    assert message.startswith("rank 1: disk full while saving checkpoint ")
    assert "earlier checkpoints are intact" in message and f"--resume {tmp_path}" in message
    assert "\n" not in message
    assert list((tmp_path / "checkpoints" / "step00000020").iterdir()) == []  # no temp file left
    assert loadable_steps(tmp_path, 1, 5) == [10]


def test_a_really_full_disk_is_one_line_and_leaves_the_earlier_checkpoints(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", "1m") as disk:
        save_checkpoint(disk, 10, 0, _state(10))
        big = _state(20, extra=torch.zeros(512 * 1024))  # 2 MB: does not fit
        with pytest.raises(WorkerError, match=r"^rank 0: disk full while saving checkpoint .*step00000020"):
            save_checkpoint(disk, 20, 0, big)
        assert [p.name for p in (disk / "checkpoints" / "step00000020").iterdir()] == []
        assert loadable_steps(disk, 0, 5) == [10]


# -- pruning keeps a checkpoint that every worker has ---------------------------------------------------


def test_a_worker_prunes_only_below_the_newest_checkpoint_every_worker_completed(tmp_path: Path) -> None:
    # keep_checkpoints=1, two workers: rank 0 is one checkpoint ahead of rank 1
    save_checkpoint(tmp_path, 10, 0, _state(10))
    save_checkpoint(tmp_path, 10, 1, _state(10))
    prune_checkpoints(tmp_path, 0, keep=1, complete=10)
    save_checkpoint(tmp_path, 20, 0, _state(20))
    prune_checkpoints(tmp_path, 0, keep=1, complete=10)  # rank 1 has not written 20 yet
    assert saved_steps(tmp_path, 0) == [20, 10]
    assert agreed_label(tmp_path, [[20, 10], [10]], [[20, 10], [10]], [10, 10], resume=False) == 10
    save_checkpoint(tmp_path, 20, 1, _state(20))
    prune_checkpoints(tmp_path, 1, keep=1, complete=20)
    prune_checkpoints(tmp_path, 0, keep=1, complete=20)
    assert saved_steps(tmp_path, 0) == saved_steps(tmp_path, 1) == [20]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step00000020"]
    prune_checkpoints(tmp_path, 0, keep=1, complete=None)  # nothing known complete: nothing deleted
    assert saved_steps(tmp_path, 0) == [20]


# -- which checkpoint a restart or --resume takes -----------------------------------------------------------


def test_the_newest_common_checkpoint_is_chosen(tmp_path: Path) -> None:
    loadable = [[30, 20, 10], [20, 10]]
    assert agreed_label(tmp_path, loadable, loadable, [20, 20], resume=True) == 20


def test_without_any_checkpoint_a_restart_starts_again_and_resume_refuses(tmp_path: Path) -> None:
    assert agreed_label(tmp_path, [[], []], [[], []], [None, None], resume=False) is None
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        agreed_label(tmp_path, [[], []], [[], []], [None, None], resume=True)


@pytest.mark.parametrize("files", [[[10], []], [[20, 10], []], [[10], [20]]])
def test_before_any_checkpoint_was_finished_by_every_worker_a_restart_starts_again(
    tmp_path: Path, files: list[list[int]]
) -> None:
    # killed before the first checkpoint every worker finished (asynchronous workers write them at
    # different times): nothing could be resumed, so a restart loses nothing by starting again
    assert agreed_label(tmp_path, files, files, [None, None], resume=False) is None
    with pytest.raises(CheckpointError, match="no checkpoint is common"):
        agreed_label(tmp_path, files, files, [None, None], resume=True)


@pytest.mark.parametrize("resume", [False, True])
def test_checkpoints_without_a_common_one_are_refused_naming_what_each_worker_has(
    tmp_path: Path, resume: bool
) -> None:
    # e.g. what the old pruning left: a worker deleted its older file before the others wrote the newer
    loadable, saved = [[26, 13], [20, 10], []], [[26, 13], [20, 10], [20]]
    with pytest.raises(CheckpointError) as info:
        agreed_label(tmp_path, loadable, saved, [10, 10, None], resume=resume)
    assert str(info.value) == (
        f"resume {tmp_path}: no checkpoint is common to all workers, so the run cannot continue from one "
        "(rank 0: steps 26, 13; rank 1: steps 20, 10; rank 2: none that loads (files for steps 20)); "
        "nothing in the run directory was changed"
    )
    # a checkpoint every worker finished but one of them can no longer load is refused too
    with pytest.raises(CheckpointError, match="no checkpoint is common"):
        agreed_label(tmp_path, [[10], []], [[10], [10]], [10, 10], resume=resume)


def test_the_record_of_finished_checkpoints_is_per_rank(tmp_path: Path) -> None:
    assert checkpoint.recorded_complete(tmp_path, 1) is None
    checkpoint.record_complete(tmp_path, 1, 20)
    assert (
        checkpoint.recorded_complete(tmp_path, 1) == 20 and checkpoint.recorded_complete(tmp_path, 0) is None
    )
    assert saved_steps(tmp_path, 1) == []  # not a checkpoint


# -- the job-wide schedule of asynchronous rounds -----------------------------------------------------------


class _Meter:
    @contextlib.contextmanager
    def in_phase(self, name: str) -> Iterator[None]:
        yield


@dataclass
class _Job:
    """What the simulated workers share: the job's step counter and the reports of a (re)start."""

    world: int
    counter: int = 0
    reports: list[Any] = field(default_factory=list)


@dataclass
class _Comm:
    job: _Job
    meter: _Meter = field(default_factory=_Meter)

    def all_gather_json(self, obj: Any) -> list[Any]:
        # every simulated worker reports before any of them takes a step: the test fills `reports`
        return self.job.reports or [obj] * self.job.world

    def barrier(self) -> None:
        pass


@dataclass
class _Context:
    rank: int
    world_size: int
    job: _Job
    comm: _Comm = field(init=False)

    def __post_init__(self) -> None:
        self.comm = _Comm(self.job)

    def add_global_steps(self, amount: int = 1) -> int:
        self.job.counter += amount
        return self.job.counter


@dataclass
class _Worker:
    clock: AsyncRounds
    step: int = 0
    joined: list[int] = field(default_factory=list)
    saves: dict[int, tuple[int, dict[str, Any]]] = field(default_factory=dict)  # label -> (step, state)


def _run_rounds(workers: list[_Worker], total: int, speeds: tuple[float, ...], seed: int) -> None:
    """Interleave the workers' steps at random (each a training-loop iteration) until all have ended."""
    rng = random.Random(seed)
    running = set(range(len(workers)))
    while running:
        rank = rng.choices(sorted(running), weights=[speeds[r] for r in sorted(running)])[0]
        w = workers[rank]
        join = lambda vstep, ready, w=w: w.joined.append(vstep)  # noqa: E731
        if w.clock.should_stop(w.step, total):
            w.clock.finish(join)
            running.discard(rank)
            continue
        w.step += 1
        w.clock.after_step(join)
        label = w.clock.checkpoint_label()  # what the Trainer asks after every step
        if label is not None:
            w.saves[label] = (w.step, w.clock.state_dict())


def _workers(job: _Job, periods: tuple[int, ...], every: int) -> list[_Worker]:
    ctxs = [_Context(r, job.world, job) for r in range(job.world)]
    return [_Worker(AsyncRounds(ctx, periods, every)) for ctx in ctxs]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("speeds", "periods", "every", "seed"),
    [((1.0, 1.0), (4,), 10, 0), ((1.0, 0.2, 0.7), (4, 6), 5, 1), ((1.0, 0.05, 1.0, 0.5), (16,), 3, 2)],
)
def test_async_rounds_checkpoint_on_the_job_wide_schedule_and_resume_exactly(
    speeds: tuple[float, ...], periods: tuple[int, ...], every: int, seed: int
) -> None:
    world, total = len(speeds), 40
    expected_rounds = sorted({s for p in periods for s in range(p, total + 1, p)})
    job = _Job(world)
    first = _workers(job, periods, every)
    _run_rounds(first, total, speeds, seed)
    assert sum(w.step for w in first) == world * total
    # the workers' checkpoints carry one label each, the job's virtual step, below the budget
    common = set.intersection(*(set(w.saves) for w in first))
    assert len(common) >= 2 and all(label % every == 0 and label < total for label in common)
    for label in common:
        states = [w.saves[label][1] for w in first]
        assert {s["done"] for s in states} == {max([0, *(r for r in expected_rounds if r <= label)])}
        assert sum(w.saves[label][0] for w in first) >= label * world  # every step up to it is in

    for label in sorted(common):  # the job dies after any of them; every worker resumes from its file
        job = _Job(world)
        resumed = _workers(job, periods, every)
        for w, before in zip(resumed, first):
            w.step, state = before.saves[label]
            w.clock.load_state_dict(state)
        job.reports = [
            [w.step, *(w.clock.state_dict()[k] for k in ("done", "last_eval", "checkpointed"))]
            for w in resumed
        ]
        _run_rounds(resumed, total, speeds, seed + label)
        done = first[0].saves[label][1]["done"]
        for before, after in zip(first, resumed):
            assert [r for r in before.joined if r <= done] + after.joined == expected_rounds  # each once
        assert sum(w.step for w in resumed) == world * total  # the budget, exactly, across the restart
        assert all(c > label and c % every == 0 for w in resumed for c in w.saves)  # none again


# -- DOWNPOUR's job budget: evaluations and checkpoints in one order -------------------------------------


def _simulate_budget(
    world: int, total: int, every: int, ckpt: int, starts: list[int], state: dict[str, Any], seed: int
) -> tuple[list[int], list[list[tuple[str, int]]]]:
    """Workers of the training loop at random speeds; evaluations and checkpoints are collective: a
    worker in one waits until every worker has entered the same one. Fails on a mismatch or deadlock."""
    rng = random.Random(seed)
    counter = [0]

    def add(n: int) -> int:
        counter[0] += n
        return counter[0]

    budgets = [JobBudget(world, add, ckpt) for _ in range(world)]
    for b, step in zip(budgets, starts):
        b.load_state_dict(state)
        b.begin(sum(starts), step)
    steps = list(starts)
    moments: list[list[tuple[str, int]]] = [[] for _ in range(world)]
    blocked, stopped = [False] * world, [False] * world
    speed = [rng.uniform(0.1, 1.0) for _ in range(world)]
    for _ in range(200_000):
        if all(stopped):
            return steps, moments
        runnable = [r for r in range(world) if not (blocked[r] or stopped[r])]
        assert runnable, f"deadlock: {moments}"
        r = rng.choices(runnable, weights=[speed[i] for i in runnable])[0]
        b = budgets[r]
        if b.should_stop(steps[r], total):
            stopped[r] = True
            continue
        steps[r] += 1
        b.count(steps[r])
        entered = []
        if b.should_evaluate(steps[r], every):
            entered.append(("eval", steps[r]))
        label = b.checkpoint_label()
        if label is not None:
            entered.append(("checkpoint", label))
        for kind, value in entered:
            moments[r].append((kind, value if kind == "checkpoint" else 0))
        if entered:
            blocked[r] = True
            if all(blocked[i] or stopped[i] for i in range(world)):
                assert len({tuple(m) for m in moments}) == 1, f"collectives do not match: {moments}"
                blocked = [False] * world
    raise AssertionError("did not finish")


@pytest.mark.parametrize(
    ("world", "total", "every", "ckpt", "seed"),
    [(3, 30, 5, 4, 0), (2, 40, 6, 6, 1), (4, 20, 1, 3, 2), (3, 25, 100, 5, 3), (2, 12, 3, 1, 4)],
)
def test_job_budget_takes_evaluations_and_checkpoints_in_one_order_on_every_worker(
    world: int, total: int, every: int, ckpt: int, seed: int
) -> None:
    steps, moments = _simulate_budget(world, total, every, ckpt, [0] * world, {}, seed)
    assert len({tuple(m) for m in moments}) == 1
    labels = [v for kind, v in moments[0] if kind == "checkpoint"]
    assert labels == list(range(ckpt, total, ckpt))  # every checkpoint below the budget, in order
    assert sum(steps) >= world * total


def test_job_budget_resumes_from_workers_at_different_local_steps() -> None:
    # a checkpoint at virtual step 12 of 3 workers that had taken 20, 9 and 7 steps (36 = 12 * 3)
    state = {"evaluated": 10, "checkpointed": 12}
    steps, moments = _simulate_budget(3, 30, 5, 4, [20, 9, 7], state, seed=5)
    kinds = moments[0]
    assert [v for k, v in kinds if k == "checkpoint"] == [16, 20, 24, 28]  # none repeated or skipped
    assert sum(k == "eval" for k, _ in kinds) == 3  # 15, 20 and 25: not 10 again
    assert 90 <= sum(steps) <= 90 + 3 * 4


def test_old_job_budget_state_counts_from_the_restored_steps() -> None:
    _, moments = _simulate_budget(3, 30, 5, 0, [10, 10, 10], {}, seed=6)
    assert sum(k == "eval" for k, _ in moments[0]) == 3  # as before: 15, 20, 25 (10 was done)

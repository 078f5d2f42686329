"""Checkpoint files: atomic writes, the newest few kept, bad files detected and skipped with a warning,
and loading that never executes code from the file."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from commsgd import checkpoint
from commsgd.checkpoint import checkpoint_path, load_checkpoint, loadable_steps, save_checkpoint, saved_steps
from commsgd.errors import CheckpointError


def _state(step: int) -> dict[str, Any]:
    meta = {"algorithm": "allreduce", "world_size": 2}
    return {"step": step, "model": {"w": torch.full((3,), float(step))}, "meta": meta}


class Payload:
    """Unpickling this calls `open(marker, "w")`: a stand-in for any code hidden in a crafted file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 7, 1, _state(7))
    assert path == checkpoint_path(tmp_path, 7, 1) == tmp_path / "checkpoints" / "step00000007" / "rank1.pt"
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((3,), 7.0))
    assert [p.name for p in path.parent.iterdir()] == ["rank1.pt"]  # no temporary file left behind


def test_a_crash_during_save_leaves_no_file_under_the_final_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path, 10, 0, _state(10))

    def dies_half_way(obj: Any, handle: Any) -> None:
        handle.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # e.g. the process is being stopped

    monkeypatch.setattr(checkpoint.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 20, 0, _state(20))
    monkeypatch.undo()
    assert saved_steps(tmp_path, 0) == [10]
    assert list((tmp_path / "checkpoints" / "step00000020").iterdir()) == []
    assert loadable_steps(tmp_path, 0, 5) == [10]


def test_only_the_newest_checkpoints_are_kept_and_killed_saves_are_cleaned_up(tmp_path: Path) -> None:
    stale = tmp_path / "checkpoints" / "step00000002" / ".rank0.abc.tmp"  # a save killed mid-way
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    other_rank = tmp_path / "checkpoints" / "step00000002" / ".rank1.abc.tmp"
    other_rank.write_bytes(b"partial")
    for step in range(1, 7):
        save_checkpoint(tmp_path, step, 0, _state(step))
        checkpoint.prune_checkpoints(tmp_path, 0, keep=3, complete=step)
    assert saved_steps(tmp_path, 0) == [6, 5, 4]
    assert not stale.exists() and other_rank.exists()  # only this rank's leftovers are its to remove
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step00000002",
        "step00000004",
        "step00000005",
        "step00000006",
    ]


@pytest.mark.parametrize(
    "damage",
    ["truncated", "garbage", "empty", "not_a_dict", "no_step"],
)
def test_a_damaged_newest_file_is_detected_and_the_previous_one_used(tmp_path: Path, damage: str) -> None:
    for step in (10, 20):
        save_checkpoint(tmp_path, step, 0, _state(step))
    newest = checkpoint_path(tmp_path, 20, 0)
    if damage == "truncated":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    elif damage == "garbage":
        newest.write_bytes(b"\x00\xff" * 100)
    elif damage == "empty":
        newest.write_bytes(b"")
    elif damage == "not_a_dict":
        torch.save([1, 2, 3], newest)
    else:
        torch.save({"model": {}}, newest)
    with pytest.warns(
        UserWarning, match=r"checkpoint .*step00000020.*rank0\.pt.*falling back to an older checkpoint"
    ):
        assert loadable_steps(tmp_path, 0, 5) == [10]
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(newest)
    assert "\n" not in str(info.value)


def test_a_pickled_callable_is_refused_and_never_executed(tmp_path: Path) -> None:
    # the crafted file is real: a plain unpickler runs its code
    demo_marker = tmp_path / "demo-ran"
    pickle.loads(pickle.dumps(Payload(demo_marker)))
    assert demo_marker.exists()

    marker = tmp_path / "code-ran"
    save_checkpoint(tmp_path, 10, 0, _state(10))
    path = checkpoint_path(tmp_path, 20, 0)
    path.parent.mkdir(parents=True)
    torch.save({"step": 20, "model": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refused: loading it would call io\.open"):
        load_checkpoint(path)
    with pytest.warns(UserWarning):
        assert loadable_steps(tmp_path, 0, 5) == [10]
    assert not marker.exists()


def test_checkpoints_are_loaded_with_weights_only() -> None:
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(checkpoint))
    loads = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "torch.load"]
    assert loads and all(
        any(k.arg == "weights_only" and ast.unparse(k.value) == "True" for k in call.keywords)
        for call in loads
    )

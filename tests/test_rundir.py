"""Run directories under real use: one run per directory, unique default names, resumes that check
before they write, bench output that stays out of the committed results, bad paths and huge numbers
refused with one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from commsgd import checkpoint, cli, config, launch
from commsgd.algorithms import validate_params
from commsgd.config import load_config, save_config, to_dict
from commsgd.tasks import build_model, load_dataset

FakeLaunch = Callable[[Any, Path, bool], int]


@pytest.fixture(autouse=True)
def local_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)


def _fake_launch(monkeypatch: pytest.MonkeyPatch, body: FakeLaunch | None = None) -> list[Path]:
    """Replace the launcher; returns the run directories it was called with."""
    seen: list[Path] = []

    def fake(cfg: Any, run_dir: Path, resume: bool) -> int:
        seen.append(run_dir)
        return body(cfg, run_dir, resume) if body is not None else 0

    monkeypatch.setattr(launch, "launch_local", fake)
    return seen


def _one_line(code: int, err: str) -> str:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("commsgd: error: "), err
    return lines[0]


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = cli.main(argv)
    return _one_line(code, capsys.readouterr().err)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- one run per directory


def test_a_second_run_on_a_busy_directory_is_refused_and_touches_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    inner: dict[str, Any] = {}

    def first_run(cfg: Any, run_dir: Path, resume: bool) -> int:
        if inner:  # the second run got through: record it and stop
            return 0
        (run_dir / "metrics").mkdir()
        (run_dir / "metrics" / "rank0.jsonl").write_text('{"step": 1}\n')
        before = _snapshot(run_dir)
        capsys.readouterr()
        again = ["train", "--workers", "2", "--steps", "9", "--out", str(run_dir)]
        inner["out"] = cli.main(again), capsys.readouterr().err  # before the first checkpoint
        (run_dir / "checkpoints" / "step00000001").mkdir(parents=True)
        (run_dir / "checkpoints" / "step00000001" / ".rank0.x.tmp").write_bytes(b"half")
        before.update(_snapshot(run_dir))
        inner["later"] = cli.main(again), capsys.readouterr().err
        inner["resume"] = cli.main(["train", "--resume", str(run_dir)]), capsys.readouterr().err
        inner["untouched"] = _snapshot(run_dir) == before
        return 0

    seen = _fake_launch(monkeypatch, first_run)
    assert cli.main(["train", "--workers", "2", "--steps", "5", "--out", str(out)]) == 0
    line = _one_line(*inner["out"])
    assert line == (
        f"commsgd: error: out: {out} is in use by another commsgd run (pid {os.getpid()} on "
        f"{socket.gethostname()}); wait for it to end or choose another --out"
    )
    assert "already holds a run" in _one_line(*inner["later"])
    line = _one_line(*inner["resume"])
    assert line.startswith(f"commsgd: error: --resume: {out} is in use") and "wait for it to end" in line
    assert inner["untouched"] and seen == [out]


@contextlib.contextmanager
def _held_elsewhere(run_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the lock of `run_dir` until the block ends (then SIGKILLed)."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from commsgd.rundir import locked\n"
            f"with locked(Path({str(run_dir)!r})):\n    print('locked', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock, no stale lock is left
        holder.wait()


def test_the_lock_of_another_process_is_respected_and_ends_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    seen = _fake_launch(monkeypatch)
    with _held_elsewhere(out) as holder:
        line = _refused(["train", "--out", str(out)], capsys)
        assert f"pid {holder.pid}" in line and not seen and not (out / "config.yaml").exists()
    assert cli.main(["train", "--out", str(out)]) == 0 and seen == [out]


@pytest.mark.multiprocess
def test_a_torchrun_style_start_on_a_busy_directory_writes_nothing(tmp_path: Path) -> None:
    """Rank 0 is refused the lock; rank 1 cannot get past process-group setup without rank 0.

    Two env:// processes as torchrun starts them (without an agent, so rank 1 must give up on its
    own: after cluster.timeout_s).
    """
    out, port = tmp_path / "run", str(launch.free_port())
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    env.update(MASTER_PORT=port, WORLD_SIZE="2", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    argv = [sys.executable, "-m", "commsgd", "train", "--out", str(out), "--steps", "5"]
    with _held_elsewhere(out) as holder:
        before = _snapshot(out)
        ranks = [
            subprocess.Popen(
                [*argv, "progress=false", "cluster.timeout_s=3"],
                env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for r in (0, 1)
        ]
        (_, err0), _ = (p.communicate(timeout=180) for p in ranks)
        assert ranks[1].returncode != 0
        line = _one_line(ranks[0].returncode, err0)
        assert line.startswith(
            f"commsgd: error: out: {out} is in use by another commsgd run (pid {holder.pid}"
        )
        assert _snapshot(out) == before and sorted(p.name for p in out.iterdir()) == [".lock"]


def test_default_run_directories_are_unique_within_one_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda *_: "20260101-000000")
    seen = _fake_launch(monkeypatch)
    assert cli.main(["train", "--steps", "3"]) == 0
    assert cli.main(["train", "--steps", "3"]) == 0
    first, second = seen
    assert first != second and first.is_dir() and second.is_dir()
    assert all(p.name.startswith("20260101-000000-allreduce-") for p in seen)
    assert (first / "config.yaml").is_file() and (second / "config.yaml").is_file()


def test_a_default_name_already_taken_is_retried_with_another_suffix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import secrets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda *_: "20260101-000000")
    suffixes = iter(["aaaaaa", "aaaaaa", "bbbbbb"])
    monkeypatch.setattr(secrets, "token_hex", lambda _: next(suffixes))
    seen = _fake_launch(monkeypatch)
    assert cli.main(["train", "--steps", "3"]) == 0 and cli.main(["train", "--steps", "3"]) == 0
    assert [p.name for p in seen] == ["20260101-000000-allreduce-aaaaaa", "20260101-000000-allreduce-bbbbbb"]


def test_torchrun_without_out_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1")):
        monkeypatch.setenv(name, value)
    started: list[Any] = []
    monkeypatch.setattr(launch, "worker_entry", lambda *a: started.append(a))
    line = _refused(["train", "--steps", "3"], capsys)
    assert line.startswith("commsgd: error: out: ") and "torchrun" in line
    assert not started and not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- bad paths


def test_unusable_out_paths_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_launch(monkeypatch)
    (tmp_path / "file").write_text("x")
    line = _refused(["train", "--out", str(tmp_path / "file")], capsys)
    assert "is not a directory" in line
    line = _refused(["train", "--out", str(tmp_path / "file" / "run")], capsys)
    assert "Not a directory" in line
    line = _refused(["train", "--out", str(tmp_path / ("a" * 300))], capsys)
    assert "File name too long" in line and len(line) < 400
    line = _refused(["train", "--out", "/".join(["b" * 200] * 30)], capsys)
    assert "too long" in line
    line = _refused(["train", "--resume", str(tmp_path / ("a" * 300))], capsys)
    assert "--resume" in line or "resume" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_an_unwritable_out_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_launch(monkeypatch)
    locked_dir = tmp_path / "ro"
    locked_dir.mkdir()
    locked_dir.chmod(0o555)
    try:
        assert "Permission denied" in _refused(["train", "--out", str(locked_dir / "run")], capsys)
    finally:
        locked_dir.chmod(0o755)


def test_an_out_on_a_read_only_file_system_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Works as root too: /proc refuses new entries to everybody."""
    _fake_launch(monkeypatch)
    line = _refused(["train", "--out", "/proc/commsgd-run"], capsys)
    assert "/proc/commsgd-run" in line


# ----------------------------------------------------------------------------- huge integers


HUGE = "1" * 5000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"seed: {HUGE}\n", "c.yaml, line 1: an integer of more than 4300 digits"),
        (f"optim:\n  lr: 0.1\n  momentum: {HUGE}\n", "c.yaml, line 3: an integer of more than 4300"),
        (f"workers: 0x{'f' * 5000}\n", "workers: an integer of more than 4300 digits"),
        ("seed: 2001-13-45\n", "c.yaml: a value Python cannot build (month must be in 1..12)"),
    ],
)
def test_huge_integers_in_a_config_file_are_one_line(
    text: str,
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _fake_launch(monkeypatch)
    path = tmp_path / "c.yaml"
    path.write_text(text)
    line = _refused(["train", "--config", str(path), "--out", str(tmp_path / "o")], capsys)
    assert expected in line and len(line) < 400 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("override", [f"seed={HUGE}", f"optim.lr={HUGE}", f"workers=0x{'f' * 5000}"])
def test_huge_integers_in_overrides_are_one_line(
    override: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_launch(monkeypatch)
    field = override.split("=")[0]
    line = _refused(["train", "--out", str(tmp_path / "o"), override], capsys)
    assert line.startswith(f"commsgd: error: {field}: ") and "4300 digits" in line and len(line) < 400


def test_huge_integers_through_the_python_api_are_one_line() -> None:
    with pytest.raises(config.ConfigError, match=r"^algo\.tau: an integer of more than 4300 digits"):
        load_config({"algo": {"tau": 16**5000}})


# ----------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real 1-worker run of 4 steps with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    saved = {n: os.environ.pop(n) for n in ("RANK", "WORLD_SIZE", "MASTER_ADDR") if n in os.environ}
    try:
        argv = ["train", "--workers", "1", "--steps", "4", "--out", str(out)]
        assert cli.main([*argv, "progress=false", "checkpoint_every=2", "eval_every=2"]) == 0
    finally:
        os.environ.update(saved)
    yield out


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


@pytest.mark.multiprocess
def test_a_resume_with_another_model_changes_nothing_and_a_plain_resume_still_works(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _snapshot(run_copy)
    line = _refused(["train", "--resume", str(run_copy), "--model", "logreg"], capsys)
    assert line == (
        f"commsgd: error: --resume: the run in {run_copy} used model 'mlp', this command asks for 'logreg'"
    )
    assert _snapshot(run_copy) == before
    assert cli.main(["train", "--resume", str(run_copy), "--steps", "6"]) == 0
    summary = json.loads((run_copy / "summary.json").read_text())
    assert summary["steps"] == [6]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--dataset", "synthetic"], "used data set 'digits', this command asks for 'synthetic'"),
        (["cluster.group_size=1"], "used cluster.group_size None, this command asks for 1"),
    ],
)
def test_a_resume_that_changes_what_the_state_depends_on_is_refused(
    flags: list[str],
    expected: str,
    run_copy: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seen = _fake_launch(monkeypatch)
    before = _snapshot(run_copy)
    assert expected in _refused(["train", "--resume", str(run_copy), *flags], capsys)
    assert _snapshot(run_copy) == before and not seen


def test_a_resume_checks_the_checkpoint_not_only_config_yaml(
    run_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """config.yaml rewritten by an older failed resume: the checkpoint still says what ran."""
    seen = _fake_launch(monkeypatch)
    cfg = load_config({"workers": 1, "steps": 4, "model": "logreg"}, validate_algorithm=validate_params)
    save_config(cfg, run_copy / "config.yaml")
    before = _snapshot(run_copy)
    line = _refused(["train", "--resume", str(run_copy)], capsys)
    assert f"the checkpoint of step 4 in {run_copy} is for model 'mlp'" in line and "'logreg'" in line
    assert _snapshot(run_copy) == before and not seen


def test_a_resume_on_data_of_another_shape_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A text corpus with other characters: another vocabulary, so the model's shapes change."""
    corpus_a, corpus_b = tmp_path / "a.txt", tmp_path / "b.txt"
    corpus_a.write_text("abc " * 400)
    corpus_b.write_text("abcdefgh " * 400)
    cfg = load_config(
        {"workers": 1, "steps": 4, "model": "lstm", "data": {"dataset": "text", "data_dir": str(corpus_a)}},
        validate_algorithm=validate_params,
    )
    run = tmp_path / "run"
    cfg.out = str(run)
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    model = build_model("lstm", load_dataset("text", str(corpus_a), model="lstm", seed=0).spec)
    meta = {"algorithm": cfg.algorithm, "world_size": 1, "config": to_dict(cfg)}
    checkpoint.save_checkpoint(run, 4, 0, {"step": 4, "model": model.state_dict(), "meta": meta})
    seen = _fake_launch(monkeypatch)
    before = _snapshot(run)
    line = _refused(["train", "--resume", str(run), "--data-dir", str(corpus_b)], capsys)
    assert "the checkpoint of step 4" in line and "model 'lstm' on data set 'text'" in line
    assert "shape" in line and _snapshot(run) == before and not seen
    assert cli.main(["train", "--resume", str(run), "--data-dir", str(tmp_path / "a.txt")]) == 0
    assert seen == [run]


def test_config_yaml_is_replaced_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails before its final rename leaves the old config.yaml whole."""
    path = tmp_path / "config.yaml"
    save_config(load_config({"steps": 4}), path)
    before = path.read_bytes()

    def fail(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        save_config(load_config({"steps": 8}), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


# ----------------------------------------------------------------------------- bench output


def test_a_quick_bench_leaves_the_committed_results_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "compressors.md").write_text("# real numbers\n")
    before = _snapshot(results)
    assert cli.main(["bench", "compressors", "--quick"]) == 0
    assert _snapshot(results) == before
    (made,) = (tmp_path / "runs").glob("*-bench-compressors-quick-*/compressors.md")
    assert "numbers mean nothing" in made.read_text()
    assert str(made.parent.relative_to(tmp_path)) in capsys.readouterr().err


def test_a_quick_bench_into_full_results_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "index.json").write_text(json.dumps({"entries": {"bytes": {"quick": False}}}))
    before = _snapshot(tmp_path)
    line = _refused(["bench", "compressors", "--quick", "--out", str(tmp_path)], capsys)
    assert "full results" in line and _snapshot(tmp_path) == before


def test_a_metrics_log_cut_back_while_open_keeps_what_is_written_after(tmp_path: Path) -> None:
    from commsgd.metrics import JsonlLog, read_jsonl

    log = JsonlLog(tmp_path / "metrics" / "rank0.jsonl")
    for step in (1, 2, 3):
        log.write({"step": step})
    log.truncate_after(1)
    log.write({"step": 2, "again": True})
    log.close()
    assert read_jsonl(log.path) == [{"step": 1}, {"step": 2, "again": True}]
    assert [p.name for p in log.path.parent.iterdir()] == ["rank0.jsonl"]


@pytest.mark.multiprocess
def test_a_resume_refused_by_the_algorithm_state_leaves_config_yaml_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A parameter that shapes the algorithm's state (PowerSGD's rank) is found only when the
    workers load the checkpoint: the run's config.yaml must still say what the checkpoint is."""
    out = tmp_path / "run"
    argv = ["train", "--workers", "1", "--steps", "2", "--algorithm", "powersgd", "--out", str(out)]
    assert cli.main([*argv, "progress=false", "algo.rank=2", "algo.warmup_steps=0"]) == 0
    before = (out / "config.yaml").read_text()
    assert cli.main(["train", "--resume", str(out), "--steps", "4", "algo.rank=4"]) == 2
    assert "does not fit this run" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == before

"""Bad input through `commsgd train`: one `commsgd: error:` line, exit code 2, nothing started or written.

Data directories (missing, wrong layout, truncated CIFAR batch, labels out of range), run directories
that must not be overwritten, and resumes that cannot continue the run they name.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from commsgd import cli, launch
from commsgd.algorithms import validate_params
from commsgd.config import Config, load_config, save_config
from commsgd.tasks import write_fake_cifar10


@pytest.fixture(autouse=True)
def no_launch(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Config, Path, bool]]:
    """Record instead of starting workers: these tests are about what happens before the launch."""
    calls: list[tuple[Config, Path, bool]] = []

    def fake(cfg: Config, run_dir: Path, resume: bool) -> int:
        calls.append((cfg, run_dir, resume))
        return 0

    monkeypatch.setattr(launch, "launch_local", fake)
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    return calls


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("commsgd: error: "), err
    return lines[0]


def _cifar(tmp_path: Path) -> Path:
    return write_fake_cifar10(tmp_path / "data", n_train_per_batch=10, n_test=10)


def _train_cifar(data_dir: Path | str, out: Path) -> list[str]:
    data = ["--dataset", "cifar10", "--model", "mlp", "--data-dir", str(data_dir)]
    return ["train", *data, "--out", str(out), "data.batch_size=4"]  # the fake set: 12 samples a worker


def test_fake_cifar_is_accepted(tmp_path: Path, no_launch: list[Any]) -> None:
    folder = _cifar(tmp_path)
    assert cli.main(_train_cifar(folder.parent, tmp_path / "out")) == 0
    assert len(no_launch) == 1


def test_missing_data_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_launch: list[Any]
) -> None:
    line = _refused(_train_cifar(tmp_path / "nowhere", tmp_path / "out"), capsys)
    assert "nowhere" in line and "does not exist" in line and "cifar-10-batches-py" in line
    assert not (tmp_path / "out").exists() and not no_launch


def test_wrong_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_launch: list[Any]) -> None:
    (tmp_path / "empty").mkdir()
    line = _refused(_train_cifar(tmp_path / "empty", tmp_path / "out"), capsys)
    assert "lacks data_batch_1" in line and "test_batch" in line
    assert not no_launch


def test_truncated_batch_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_launch: list[Any]
) -> None:
    folder = _cifar(tmp_path)
    batch = folder / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])
    line = _refused(_train_cifar(folder.parent, tmp_path / "out"), capsys)
    assert "data_batch_3" in line and "truncated" in line
    assert not no_launch


def test_labels_out_of_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_launch: list[Any]
) -> None:
    folder = _cifar(tmp_path)
    batch = {b"data": np.zeros((10, 3072), dtype=np.uint8), b"labels": [3] * 9 + [12]}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=4))
    line = _refused(_train_cifar(folder.parent, tmp_path / "out"), capsys)
    assert "test_batch" in line and "labels must lie in 0..9" in line
    assert not no_launch


def test_cifar_without_a_data_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _refused(["train", "--dataset", "cifar10", "--out", str(tmp_path / "out")], capsys)
    assert "data_dir" in line


def test_control_characters_in_a_path_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _refused(_train_cifar("a\tb", tmp_path / "out"), capsys)
    assert line.startswith("commsgd: error: data.data_dir:")
    line = _refused(["train", "--out", str(tmp_path / "o\x00ut")], capsys)
    assert line.startswith("commsgd: error: out:")


def test_flag_values_reach_the_config_as_typed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_launch: list[Any]
) -> None:
    """A newline in a path is refused, not folded into a space by a YAML round trip."""
    line = _refused(["train", "--out", str(tmp_path / "a\nb")], capsys)
    assert line.startswith("commsgd: error: out:") and "a\\nb" in line
    assert not (tmp_path / "a b").exists() and not no_launch
    line = _refused(["train", "--out", str(tmp_path / "o"), "--algorithm", "it's\x1b[31m"], capsys)
    assert line.startswith('commsgd: error: algorithm: unknown name "it\'s\\x1b[31m";'), line
    assert cli.main(["train", "--out", str(tmp_path / "it's 'quoted'")]) == 0
    assert no_launch[0][0].out == str(tmp_path / "it's 'quoted'")


def test_control_characters_in_error_lines_are_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--bogus=a\rb\x1b[2Jc\u2028d"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == "commsgd: error: unrecognized arguments: --bogus=a\\rb\\x1b[2Jc\\u2028d\n"
    line = _refused(["train", "--resume", "r\nun"], capsys)
    assert line == "commsgd: error: resume 'r\\nun': not a commsgd run directory (no config.yaml)"


# ----------------------------------------------------------------------------- run directories


def _run_dir(tmp_path: Path, *overrides: str, finished: bool = True) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config({}, ["workers=2", "steps=20", *overrides], validate_algorithm=validate_params)
    cfg.out = str(run)
    save_config(cfg, run / "config.yaml")
    if finished:
        (run / "checkpoints" / "step00000020").mkdir(parents=True)
        (run / "summary.json").write_text("{}", encoding="utf-8")
    return run


def test_out_pointing_at_an_existing_run_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_launch: list[Any]
) -> None:
    run = _run_dir(tmp_path)
    before = (run / "config.yaml").read_text()
    line = _refused(["train", "--workers", "2", "--out", str(run)], capsys)
    assert "already holds a run" in line and f"--resume {run}" in line
    assert (run / "config.yaml").read_text() == before and not no_launch


def test_resume_with_another_world_size_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_launch: list[Any]
) -> None:
    run = _run_dir(tmp_path)
    line = _refused(["train", "--resume", str(run), "--workers", "3"], capsys)
    assert "on 2 workers" in line and "on 3" in line
    assert not no_launch


def _other_algorithm() -> str:
    from commsgd.algorithms import algorithm_names

    return next(n for n in ("local_sgd", "lsgd", "easgd", "ef_sgd", "sgd") if n in algorithm_names())


def test_resume_with_another_algorithm_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_launch: list[Any]
) -> None:
    run = _run_dir(tmp_path)
    _refused(["train", "--resume", str(run), "--algorithm", _other_algorithm()], capsys)
    assert not no_launch


def test_resume_with_another_algorithm_names_both_algorithms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run_dir(tmp_path)
    other = _other_algorithm()
    expected = (
        f"commsgd: error: --resume: the run in {run} used algorithm 'allreduce', "
        f"this command asks for {other!r}"
    )
    assert _refused(["train", "--resume", str(run), "--algorithm", other], capsys) == expected
    assert _refused(["train", "--resume", str(run), f"algorithm={other}"], capsys) == expected


def test_resume_names_the_algorithm_change_before_a_bad_param(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run_dir(tmp_path)
    line = _refused(["train", "--resume", str(run), "--algorithm", _other_algorithm(), "algo.nope=1"], capsys)
    assert "used algorithm 'allreduce'" in line and "nope" not in line


def test_resume_of_a_directory_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "plain").mkdir()
    line = _refused(["train", "--resume", str(tmp_path / "plain")], capsys)
    assert "not a commsgd run directory" in line


def test_resume_with_a_longer_step_budget_is_allowed(tmp_path: Path, no_launch: list[Any]) -> None:
    run = _run_dir(tmp_path)
    assert cli.main(["train", "--resume", str(run), "--steps", "50"]) == 0
    ((cfg, run_dir, resume),) = no_launch
    assert resume and run_dir == run and cfg.steps == 50 and cfg.workers == 2


def test_flag_errors_are_one_line_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--workers", "two"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--workers" in err[0] and "invalid int value" in err[0]
    line = _refused(["train", "--out", str(tmp_path / "o"), "optim.lr=-1"], capsys)
    assert line == "commsgd: error: optim.lr: must be > 0, got -1.0"
    line = _refused(["train", "--out", str(tmp_path / "o"), "nonfinite=maybe"], capsys)
    assert line == "commsgd: error: nonfinite: must be one of skip, stop; got 'maybe'"

"""The command line as PyTorch users expect it: `list ALGORITHM`, `--print-config`, a run's config.yaml
as `--config`, suggestions for near-miss keys and flags, YAML errors with their line, and key=value
overrides anywhere among the flags. Nothing here starts workers (the launch is recorded instead).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from commsgd import cli, launch
from commsgd.config import Config, to_dict


@pytest.fixture(autouse=True)
def no_launch(monkeypatch: pytest.MonkeyPatch) -> list[Config]:
    """Record the config instead of starting workers."""
    calls: list[Config] = []

    def fake(cfg: Config, run_dir: Path, resume: bool) -> int:
        calls.append(cfg)
        return 0

    monkeypatch.setattr(launch, "launch_local", fake)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    return calls


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line of `commsgd ARGV` (exit code 2, from argparse or from a config check)."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("commsgd: error: "), err
    return lines[0]


def test_overrides_stand_anywhere_among_the_flags(tmp_path: Path, no_launch: list[Config]) -> None:
    out = tmp_path / "x"
    argv = ["train", "--workers", "2", "optim.lr=0.05", "--out", str(out), "progress=false"]
    assert cli.main(argv) == 0
    (cfg,) = no_launch
    assert (cfg.workers, cfg.optim.lr, cfg.progress, cfg.out) == (2, 0.05, False, str(out))


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["train", "lr=0.1"], "lr: unknown field; did you mean optim.lr?"),
        (["train", "optim.lrr=0.1"], "optim.lrr: unknown field; did you mean optim.lr?"),
        (["train", "batch_size=8"], "did you mean data.batch_size?"),
        (["train", "--lr", "0.1"], "unrecognized arguments: --lr 0.1; did you mean optim.lr=0.1?"),
        (["train", "--lr=0.1"], "did you mean optim.lr=0.1?"),
        (["train", "--batch-size", "8"], "did you mean data.batch_size=8?"),
        (["train", "--wrkers", "2"], "did you mean --workers?"),
        (["train", "algorithm=lsgd", "algo.tua=3"], "algo.tua: unknown field; did you mean algo.tau?"),
    ],
)
def test_near_miss_keys_and_flags_get_a_suggestion(
    argv: list[str], hint: str, capsys: pytest.CaptureFixture[str], no_launch: list[Config]
) -> None:
    assert hint in _refused(argv, capsys)
    assert not no_launch


def test_unknown_words_without_a_near_key_are_refused_plainly(capsys: pytest.CaptureFixture[str]) -> None:
    assert _refused(["train", "--zzzqqq"], capsys) == "commsgd: error: unrecognized arguments: --zzzqqq"
    assert _refused(["list", "lsgd", "x=1"], capsys) == "commsgd: error: unrecognized arguments: x=1"


def test_a_yaml_syntax_error_names_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("workers: 2\noptim:\n  lr: 0.1\n  betas: [0.9\nseed: 1\n", encoding="utf-8")
    line = _refused(["train", "--config", str(path)], capsys)
    assert line.startswith(f"commsgd: error: config file {path}, line 5, column 5: not valid YAML ("), line


def test_list_algorithm_shows_its_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list", "lsgd"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("lsgd: Leader SGD")
    assert "  tau: int = 64  (>= 1)\n      steps between (local) leader rounds\n" in out
    assert "  pull: float = 0.1  (> 0, < 1)\n" in out
    assert "  mode: 'sync' | 'async' = 'sync'\n" in out
    assert cli.main(["list", "sgd"]) == 0
    assert "no parameters of its own" in capsys.readouterr().out


def test_list_of_an_unknown_algorithm_suggests_the_nearest(capsys: pytest.CaptureFixture[str]) -> None:
    line = _refused(["list", "lsdg"], capsys)
    assert line == "commsgd: error: list: unknown algorithm lsdg; did you mean lsgd? see `commsgd list`"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == "commsgd 0.1.0\n"


def test_print_config_is_resolved_and_starts_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_launch: list[Config],
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--workers", "2", "--print-config", "--algorithm", "lsgd", "optim.lr=0.2"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    data = yaml.safe_load(text)
    assert not no_launch and not (tmp_path / "runs").exists()
    assert (data["workers"], data["optim"]["lr"], data["algorithm"]) == (2, 0.2, "lsgd")
    assert data["steps"] == 600 and data["cluster"]["group_size"] == 2  # derived, not null
    assert isinstance(data["cluster"]["threads"], int) and data["cluster"]["threads"] >= 1
    assert data["algo"]["tau"] == 64  # the algorithm's defaults filled in
    assert data["out"] is None  # each run still makes its own directory
    saved = tmp_path / "printed.yaml"
    saved.write_text(text, encoding="utf-8")
    assert cli.main(["train", "--config", str(saved), "--print-config"]) == 0
    assert capsys.readouterr().out == text


def test_print_config_refuses_bad_input_like_a_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert "workers: must be >= 1" in _refused(["train", "--workers", "0", "--print-config"], capsys)


def test_a_runs_config_yaml_starts_a_new_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_launch: list[Config]
) -> None:
    """config.yaml names its own run as `out`: as --config that is where the old run lives."""
    monkeypatch.chdir(tmp_path)
    first = tmp_path / "first"
    argv = ["train", "--workers", "2", "--steps", "3", "--algorithm", "local_sgd", "algo.tau=2"]
    assert cli.main([*argv, "--out", str(first)]) == 0
    assert (first / "config.yaml").is_file()
    second = tmp_path / "second"
    assert cli.main(["train", "--config", str(first / "config.yaml"), "--out", str(second)]) == 0
    old, new = to_dict(no_launch[0]), to_dict(no_launch[1])
    assert new.pop("out") == str(second) and old.pop("out") == str(first)
    assert new == old
    assert cli.main(["train", "--config", str(first / "config.yaml")]) == 0  # a fresh runs/<...> directory
    assert Path(no_launch[2].out or "") not in (first, second)
    assert Path(no_launch[2].out or "").parent.name == "runs"


def test_a_dotted_key_in_yaml_is_pointed_to_sections(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("optim.lr: 0.1\n", encoding="utf-8")
    line = _refused(["train", "--config", str(path)], capsys)
    assert "optim.lr: unknown field; in a YAML file, a dotted key is written as nested sections;" in line


def test_device_is_a_flag(
    tmp_path: Path, no_launch: list[Config], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["train", "--device", "cpu", "--workers", "2", "--out", str(tmp_path / "x")]) == 0
    (cfg,) = no_launch
    assert cfg.cluster.device == "cpu"
    if not torch.cuda.is_available():  # asked for, absent: refused before any worker
        line = _refused(["train", "--device", "cuda", "--out", str(tmp_path / "y")], capsys)
        assert "cuda was asked for but no CUDA device is available" in line

"""easgd's modes in one process: names and budgets validated, the right class for each mode, EAMSGD."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from commsgd.algorithms import build_algorithm, validate_params
from commsgd.algorithms.downpour import ServerAlgorithm
from commsgd.algorithms.easgd import EASGD, EASGDServer
from commsgd.cli import main
from commsgd.config import OptimConfig
from commsgd.errors import CheckpointError, ConfigError


def test_modes_and_budget_are_validated() -> None:
    full = validate_params("easgd", {"mode": "async-server"})
    assert full["mode"] == "async-server" and full["budget"] == "worker"
    assert validate_params("easgd", {"mode": "async-server", "budget": "job"})["budget"] == "job"
    with pytest.raises(ConfigError, match=r"algo\.mode.*sync.*async.*async-server"):
        validate_params("easgd", {"mode": "server"})
    for mode in ("sync", "async"):  # a job budget needs the server's own clocks
        with pytest.raises(ConfigError, match=r"algo\.budget: 'job' needs mode 'async-server'"):
            validate_params("easgd", {"mode": mode, "budget": "job"})


def test_each_mode_builds_its_class() -> None:
    for mode in ("sync", "async"):
        algo = build_algorithm("easgd", mode=mode)
        assert type(algo) is EASGD
    server = build_algorithm("easgd", mode="async-server", tau=5, beta=0.5)
    assert type(server) is EASGDServer and isinstance(server, ServerAlgorithm)
    assert server.name == "easgd" and server.params.tau == 5
    with pytest.raises(ValueError, match=r"EASGD\.create"):  # never a replicated center in server mode
        EASGD(server.params)


def test_eamsgd_momentum_in_every_mode() -> None:
    optim = OptimConfig(momentum=0.7)
    for mode in ("sync", "async", "async-server"):
        assert build_algorithm("easgd", mode=mode).optimizer_overrides(optim) == {}
        eamsgd = build_algorithm("easgd", mode=mode, eamsgd=True)
        assert eamsgd.optimizer_overrides(optim) == {"momentum": 0.7, "nesterov": True}
        own = build_algorithm("easgd", mode=mode, eamsgd=True, momentum=0.9)
        assert own.optimizer_overrides(optim) == {"momentum": 0.9, "nesterov": True}


def test_a_checkpoint_of_the_other_center_is_refused() -> None:
    with pytest.raises(CheckpointError, match="from mode 'async-server'"):
        build_algorithm("easgd").load_state_dict({"mode": "async-server", "rounds": 1})
    with pytest.raises(CheckpointError, match="this run is mode 'async-server'"):
        build_algorithm("easgd", mode="async-server").load_state_dict({"center": [], "rounds": 1})


def test_cli_refuses_a_bad_mode_before_workers_start(tmp_path: Path) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", "--algorithm", "easgd", "--out", f"{tmp_path}/run", "algo.mode=server"])
    assert code == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("commsgd: error: algo.mode:"), lines

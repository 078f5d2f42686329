"""Every compressed algorithm learns the bundled digits set (mlp, 2 workers, 200 steps) to < 15% test error,
with its default parameters where the trainer's lr 0.05 and momentum 0.9 suit it.

All algorithms train one after another inside one pair of workers through the trainer (the code path of
`commsgd train` minus the launcher), so the start-up of workers is paid once; one real CLI run (the
dist-EF-BlockSGD variant, one server) checks the command line end to end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import commsgd
from commsgd.algorithms import validate_params
from commsgd.cli import main
from commsgd.config import load_config
from commsgd.simworld import run_simulated
from commsgd.train import Trainer

pytestmark = pytest.mark.multiprocess

MAX_TEST_ERROR = 0.15
STEPS = 200

RUNS: dict[str, list[str]] = {
    "ef_sgd": ["algorithm=ef_sgd", "algo.compressor=block_sign", "algo.block_size=256"],
    "topk": ["algorithm=topk"],
    "qsgd": ["algorithm=qsgd"],
    "randomk": ["algorithm=randomk"],
    # unscaled random-k with error feedback trains (scaled, the error grew without bound at any lr); the
    # errors it sends ~1/ratio steps late oscillate with momentum 0.9, hence 0.5
    "ef_sgd_randomk": ["algorithm=ef_sgd", "algo.compressor=randomk", "optim.momentum=0.5"],
    "fp16": ["algorithm=fp16"],
    "signum": ["algorithm=signum"],
    "powersgd": ["algorithm=powersgd", "algo.rank=2"],
    "dist_ef_sgd": ["algorithm=dist_ef_sgd"],
}


def _train_all(root: str) -> dict[str, dict[str, Any]]:
    ctx = commsgd.init()
    summaries = {}
    for key, overrides in RUNS.items():
        common = [f"steps={STEPS}", "workers=2", "progress=false", f"out={root}/{key}", "eval_every=1000"]
        cfg = load_config({}, [*common, *overrides], validate_algorithm=validate_params)
        summary = Trainer(cfg, ctx, Path(cfg.out or "")).run()
        if summary is not None:
            summaries[key] = summary
    return summaries


def test_every_algorithm_learns_digits(tmp_path: Path) -> None:
    summaries = run_simulated(_train_all, 2, str(tmp_path), timeout=600)[0]
    errors = {key: s["test_error"] for key, s in summaries.items()}
    assert set(errors) == set(RUNS)
    assert all(error < MAX_TEST_ERROR for error in errors.values()), errors
    for key, summary in summaries.items():
        ratio = summary["algorithm_summary"][0]["compression_ratio"]
        assert ratio is not None and ratio >= (2.0 if key in ("fp16", "qsgd") else 8.0), (key, ratio)


def test_cli_run_reaches_the_target(tmp_path: Path) -> None:
    out = tmp_path / "run"
    flags = ["--algorithm", "dist_ef_sgd", "--workers", "2", "--steps", str(STEPS), "--out", str(out)]
    assert main(["train", *flags, "progress=false", "algo.compressor=block_sign", "algo.server=single"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_error"] < MAX_TEST_ERROR
    assert summary["algorithm_summary"][0]["compression_ratio"] > 10

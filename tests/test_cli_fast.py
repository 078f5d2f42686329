"""Commands that start and end fast: `--help`, `list`, `--version` and argument errors import no torch;
a local run says it is starting its workers before they start, and its processes skip torch's teardown.

Timings are never asserted (the cores are shared): what is checked is what makes the time, i.e. that
torch is not imported, that the line comes first, and that the quick exit keeps the exit code and output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from commsgd import catalogue, cli

#: runs `python -m commsgd ARGS` in this interpreter for each ARGS and reports, per run, the exit code
#: and whether torch got imported
_PROBE = """
import json, runpy, sys
results = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["commsgd", *argv]
    try:
        runpy.run_module("commsgd", run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    results.append([code, "torch" in sys.modules])
print(json.dumps(results), file=sys.__stderr__)
"""


def test_help_list_version_and_argument_errors_do_not_import_torch() -> None:
    cases = [
        ["--help"],
        ["list"],
        ["--version"],
        ["train", "--help"],
        ["train", "--bogus"],
        ["train", "--workers", "two"],
        ["list", "lsdg"],
        ["nosuchcommand"],
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(cases)], capture_output=True, text=True, timeout=120
    )
    results = json.loads(proc.stderr.strip().splitlines()[-1])
    assert [code for code, _ in results] == [0, 0, 0, 0, 2, 2, 2, 2], proc.stderr
    assert [torch for _, torch in results] == [False] * len(cases), proc.stderr
    assert "algorithms:" in proc.stdout and "commsgd 0.1.0" in proc.stdout


def test_catalogue_equals_the_registry_and_the_task_tables() -> None:
    """The torch-free catalogue mirrors the registry; on a mismatch, the lines to paste are shown."""
    from commsgd.algorithms import REGISTRY
    from commsgd.tasks import DATASETS, MODELS

    wanted = {name: REGISTRY[name].summary_line for name in sorted(REGISTRY)}
    paste = "\n".join(f"    {name!r}: {line!r}," for name, line in wanted.items())
    assert wanted == catalogue.ALGORITHMS, f"update ALGORITHMS in commsgd/catalogue.py to:\n{paste}"
    assert tuple(MODELS) == catalogue.MODELS, f"MODELS in commsgd/catalogue.py: {tuple(MODELS)}"
    assert tuple(DATASETS) == catalogue.DATASETS, f"DATASETS in commsgd/catalogue.py: {tuple(DATASETS)}"


def test_list_prints_the_catalogue(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("algorithms:\n  allreduce ") and "models:     mlp," in out


def test_exit_program_keeps_code_output_and_exit_handlers(tmp_path: Path) -> None:
    code = (
        "import atexit, torch\n"
        "from commsgd.fastexit import exit_program\n"
        "atexit.register(print, 'handler ran')\n"
        "print('unflushed', end='')\n"
        "exit_program(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "unflushedhandler ran\n"


@pytest.mark.multiprocess
def test_local_run_says_it_starts_its_workers_first(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The line comes before the workers' output; workers ending without teardown still exit 0."""
    out = tmp_path / "run"
    argv = ["train", "--workers", "2", "--steps", "1", "--out", str(out), "progress=false", "eval_every=1"]
    assert cli.main(argv) == 0
    text = capfd.readouterr().out
    assert text.startswith("starting 2 workers\n"), text
    assert "run directory:" in text
    assert json.loads((out / "summary.json").read_text())["steps"] == [1, 1]

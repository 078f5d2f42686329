"""`commsgd sweep`: grid parsing, validation before any run, a tiny real sweep, skipping finished points,
failed points, best-point selection, and the named grids against the LSGD paper's Tables 2-3."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from commsgd import sweep
from commsgd.cli import main
from commsgd.errors import UserError
from commsgd.sweep import Axis, Budget, PointRun, SweepError

SEEDS = Path(__file__).resolve().parents[1] / ".." / "shared" / "seeds" / "003_e18e3d6f7a1a5a02.txt"
#: the fastest real run: one worker, plain SGD, a few steps of the mlp on the bundled digits
TINY = ["--algorithm", "sgd", "--workers", "1", "--steps", "4", "eval_every=2", "checkpoint_every=1000"]


# --------------------------------------------------------------------------------------- parsing


def test_values_split_at_top_level_commas_only() -> None:
    assert sweep.split_values("0.1,0.05, 0.01") == ["0.1", "0.05", "0.01"]
    assert sweep.split_values("[10,20],[30]") == ["[10,20]", "[30]"]
    assert sweep.split_values('"a,b",c') == ['"a,b"', "c"]
    assert sweep.split_values("{x: 1, y: 2}") == ["{x: 1, y: 2}"]
    for bad in ("[1,2", "1]", "[1,2)", '"a,b'):
        with pytest.raises(SweepError):
            sweep.split_values(bad)


def test_grid_is_the_cartesian_product_with_readable_unique_names() -> None:
    axes = (sweep.parse_axis("optim.lr=0.1,0.05,0.01"), sweep.parse_axis("algo.pull=0.2,0.1"))
    points = sweep.expand([axes])
    assert len(points) == 6
    assert points[0] == (("optim.lr", "0.1"), ("algo.pull", "0.2"))
    assert points[1] == (("optim.lr", "0.1"), ("algo.pull", "0.1"))
    names = sweep.point_names(points)
    assert names[0] == "lr=0.1,pull=0.2" and len(set(names)) == 6
    # a list value keeps its commas; keys ending alike are named in full; odd characters are replaced
    lists = sweep.expand([(sweep.parse_axis("optim.drop_steps=[10,20],[30]"),)])
    assert [dict(p)["optim.drop_steps"] for p in lists] == ["[10,20]", "[30]"]
    assert sweep.point_names(lists) == ["drop_steps=_10,20_", "drop_steps=_30_"]
    both = sweep.expand([(Axis("optim.momentum", ("0", "0.9")), Axis("algo.momentum", ("0.5", "0.6")))])
    assert sweep.point_names(both)[0] == "optim.momentum=0,algo.momentum=0.5"
    # a single-valued axis is fixed and not in the name
    fixed = sweep.expand([(Axis("seed", ("3",)), Axis("optim.lr", ("0.1", "0.2")))])
    assert sweep.point_names(fixed) == ["lr=0.1", "lr=0.2"]


@pytest.mark.parametrize(
    "item", ["optim.lr", "optim.lr=0.1,,0.2", "optim.lr=0.1,", "optim.lr=0.1,0.1", "optim lr=1,2", "x=[1,2"]
)
def test_malformed_grid_items_are_refused(item: str) -> None:
    with pytest.raises(UserError):
        sweep.parse_axis(item)


def test_bad_grid_on_the_command_line_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    for argv in (
        ["optim.lr=0.1,,0.2"],
        ["--grid", "no-such-grid"],
        ["--grid", "lsgd-paper-cnn7", "optim.lr=0.1,0.2"],  # set by the grid and the command line
        ["optim.lr=0.1", "--budget-steps", "0"],
    ):
        assert main(["sweep", *TINY, "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("commsgd: error: ") and "\n" not in err, err
    assert not out.exists()


def test_every_point_is_validated_before_any_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_launch(*_: Any) -> None:
        raise AssertionError("a point was started")

    monkeypatch.setattr(sweep, "launch", no_launch)
    out = tmp_path / "sweep"
    for argv, wanted in (
        (["optim.lr=0.1,-1"], "point lr=-1: optim.lr"),  # the second point is out of range
        (["optim.lrr=0.1,0.2"], "optim.lrr"),  # unknown key
        (["algo.pull=0.1,0.2"], "pull"),  # not a parameter of sgd
        (["model=mlp,nosuchmodel"], "nosuchmodel"),
    ):
        assert main(["sweep", *TINY, "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("commsgd: error: ") and wanted in err and "\n" not in err, err
        assert not out.exists()


def test_parallel_beyond_the_cores_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    k = sweep.usable_cores() + 1
    assert main(["sweep", *TINY, "--parallel", str(k), "optim.lr=0.1,0.2", "--out", str(tmp_path / "s")]) == 2
    assert "--oversubscribe" in capsys.readouterr().err


def test_a_directory_holding_another_sweep_or_other_files_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    spec = sweep.sweep_spec(sweep_args(["--steps", "9"]), [(Axis("optim.lr", ("0.1",)),)])
    sweep.write_manifest(out, spec, [])
    assert main(["sweep", *TINY, "optim.lr=0.1", "--out", str(out)]) == 2
    assert "holds a different sweep" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    assert main(["sweep", *TINY, "optim.lr=0.1", "--out", str(other)]) == 2
    assert "holds no sweep" in capsys.readouterr().err


def sweep_args(flags: list[str]) -> Any:
    from commsgd.cli import build_parser

    args, _ = build_parser(["sweep"]).parse_known_args(["sweep", *flags])
    return args


# --------------------------------------------------------------------------------------- resume


def test_interrupted_point_resumes_from_a_checkpoint_else_restarts_clean(tmp_path: Path) -> None:
    point = PointRun("lr=0.1", (("optim.lr", "0.1"),), ["--steps", "4"])
    run_dir = tmp_path / "lr=0.1"
    (run_dir / "checkpoints" / "step00000002").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("algorithm: sgd\n")
    (run_dir / "checkpoints" / "step00000002" / "rank0.pt").write_bytes(b"x")
    assert sweep.command_for(point, tmp_path) == ["train", "--resume", str(run_dir)]
    (run_dir / "checkpoints" / "step00000002" / "rank0.pt").unlink()  # no checkpoint: a clean start
    (run_dir / "eval.jsonl").write_text('{"step": 1}\n')
    argv = sweep.command_for(point, tmp_path)
    assert argv[:4] == ["train", "--steps", "4", "--out"] and "optim.lr=0.1" in argv
    assert not run_dir.exists()


# --------------------------------------------------------------------------------------- results


def fake_run(root: Path, name: str, algorithm: str, evals: list[tuple[int, float, float]]) -> None:
    """A finished run directory with the given (step, wall_s, test_error) evaluations."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"algorithm: {algorithm}\n")
    step, wall, err = evals[-1]
    summary = {
        "algorithm": algorithm,
        "test_error": err,
        "test_loss": 1.0,
        "wall_time_s": wall,
        "steps": [step],
        "bytes_sent": [0],
        "bytes_per_step": [0.0],
        "comm_share": [0.0],
    }
    (run / "summary.json").write_text(json.dumps(summary))
    lines = [json.dumps({"step": s, "wall_s": w, "test_error": e, "test_loss": 1.0}) for s, w, e in evals]
    (run / "eval.jsonl").write_text("\n".join(lines) + "\n")


def test_best_point_per_method_at_each_budget(tmp_path: Path) -> None:
    # fast: good early, poor at the end; slow: poor early, best at the end
    fake_run(tmp_path, "fast", "lsgd", [(10, 1.0, 0.30), (20, 2.0, 0.25), (40, 9.0, 0.22)])
    fake_run(tmp_path, "slow", "lsgd", [(10, 3.0, 0.50), (20, 6.0, 0.21), (40, 12.0, 0.10)])
    fake_run(tmp_path, "easy", "easgd", [(10, 1.5, 0.40), (40, 10.0, 0.20)])
    points = [PointRun(n, (), [], status="finished") for n in ("fast", "slow", "easy")]
    points.append(PointRun("broken", (), [], status="failed", error="commsgd: error: boom"))

    def best(budget: Budget) -> dict[str, str]:
        return {a: name for a, (name, _) in sweep.score(points, tmp_path, budget).best.items()}

    assert best(Budget()) == {"lsgd": "slow", "easgd": "easy"}
    assert best(Budget(seconds=2.5)) == {"lsgd": "fast", "easgd": "easy"}  # slow has no eval by 2.5 s
    assert best(Budget(seconds=6.0)) == {"lsgd": "slow", "easgd": "easy"}  # 0.21 < 0.25
    assert best(Budget(steps=10)) == {"lsgd": "fast", "easgd": "easy"}
    assert best(Budget(seconds=1.2)) == {"lsgd": "fast"}  # easgd has nothing within 1.2 s
    text, _ = sweep.results(points, tmp_path, Budget(seconds=2.5))
    assert "| fast * | lsgd | finished |" in text and "broken | " in text and "commsgd: error: boom" in text
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert sweep.best_per_method([("a", "x", 0.2), ("a", "y", 0.2), ("a", "z", None)]) == {"a": ("x", 0.2)}


# --------------------------------------------------------------------------------------- named grids


def seed_table(text: str, number: int) -> dict[str, dict[str, set[str]]]:
    """Method -> {'lr': {...}, 'lambda': {...}, 'beta': {...}} from Table `number` of the supplement."""
    start = text.index(f"In Table {number} we summarize")
    body = text[start : text.index(f"In Table {number + 1} we summarize", start)]
    table: dict[str, dict[str, set[str]]] = {}
    for line in body.splitlines():
        name = line.split("\t", 1)[0].strip()
        if name not in ("SGD", "DOWNPOUR", "EASGD", "LSGD"):
            continue
        sets = [set(s.replace(" ", "").split(",")) for s in re.findall(r"\\\{([^}]*)\\\}", line)]
        row = {"lr": sets[0]}
        if "lambda" in line:
            row["lambda"] = sets[1]
        beta = re.search(r"beta\s*=\s*([0-9.]+)", line)
        if beta:
            row["beta"] = {beta.group(1)}
        table[name.lower()] = row
    return table


def grid_values(grid: str) -> dict[str, dict[str, str | set[str]]]:
    result: dict[str, dict[str, str | set[str]]] = {}
    for block in sweep.NAMED_GRIDS[grid].blocks:
        axes = {a.key: a.values for a in block}
        result[axes["algorithm"][0]] = {k: set(v) if len(v) > 1 else v[0] for k, v in axes.items()}
    return result


@pytest.mark.parametrize(
    ("grid", "table", "model"), [("lsgd-paper-cnn7", 2, "cnn7"), ("lsgd-paper-resnet20", 3, "resnet20")]
)
def test_named_grids_hold_the_papers_values(grid: str, table: int, model: str) -> None:
    if not SEEDS.is_file():
        pytest.skip(f"the LSGD paper's text is not at {SEEDS}")
    paper = seed_table(SEEDS.read_text(encoding="utf-8"), table)
    ours = grid_values(grid)
    assert set(ours) == {"sgd", "downpour", "easgd", "lsgd"} == set(paper)
    for method, row in paper.items():
        lrs = ours[method]["optim.lr"]
        assert {float(x) for x in (lrs if isinstance(lrs, set) else {lrs})} == {float(x) for x in row["lr"]}
        assert ours[method]["model"] == model
        assert ours[method]["optim.weight_decay"] == "1e-4" and ours[method]["data.batch_size"] == "128"
    assert ours["easgd"]["algo.beta"] == next(iter(paper["easgd"]["beta"]))
    assert {float(x) for x in ours["lsgd"]["algo.pull"]} == {float(x) for x in paper["lsgd"]["lambda"]}
    assert "algo.pull_global" not in ours["lsgd"]  # lambda_G = lambda: the default of pull_global
    assert (
        ours["easgd"]["algo.tau"] == ours["lsgd"]["algo.tau"] == "64"
        and ours["lsgd"]["algo.tau_global"] == "128"
    )
    assert ours["sgd"]["workers"] == "1"
    assert ours["downpour"]["algo.n_push"] == ours["downpour"]["algo.n_fetch"] == "1"


def test_named_grids_validate_and_are_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "--list-grids"]) == 0
    listing = capsys.readouterr().out
    assert "lsgd-paper-cnn7 (40 points)" in listing and "lsgd-paper-resnet20 (25 points)" in listing
    grid = sweep.NAMED_GRIDS["lsgd-paper-resnet20"]
    points = [
        PointRun(n, p, ["--steps", "2", "--dataset", "digits"])
        for n, p in zip(sweep.point_names(sweep.expand(grid.blocks)), sweep.expand(grid.blocks))
    ]
    assert points[0].name == "algorithm=sgd,lr=0.2" and points[-1].name == "algorithm=lsgd,lr=0.05,pull=0.025"
    sweep.check_points(points[:1] + points[-1:], tmp_path)  # the paper's values pass train's checks


# --------------------------------------------------------------------------------------- real runs


@pytest.mark.multiprocess
def test_tiny_sweep_records_a_failed_point_and_skips_finished_ones_on_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    real_launch = sweep.launch
    started: list[str] = []

    def launch(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        started.append(log.stem)
        if "optim.lr=0.02" in argv:  # this point fails as a run does: a line and exit code 1
            code = "import sys; print('commsgd: error: out of disk space'); sys.exit(1)"
            return real_launch_python(code, log, env)
        return real_launch(argv, log, env)

    monkeypatch.setattr(sweep, "launch", launch)
    command = ["sweep", *TINY, "optim.lr=0.1,0.05,0.02", "--out", str(out)]
    assert main(command) == 1  # one point did not finish
    printed = capsys.readouterr().out
    manifest = json.loads((out / "sweep.json").read_text())
    status = {p["name"]: (p["status"], p.get("error")) for p in manifest["points"]}
    assert status == {
        "lr=0.1": ("finished", None),
        "lr=0.05": ("finished", None),
        "lr=0.02": ("failed", "commsgd: error: out of disk space"),
    }
    assert started == ["lr=0.1", "lr=0.05", "lr=0.02"]
    assert set(manifest["results"]["best"]) == {"sgd"}
    assert "## Best point per algorithm" in printed and (out / "sweep.md").is_file()
    assert (out / "sweep.png").stat().st_size > 0
    summaries = {n: (out / n / "summary.json").stat().st_mtime_ns for n in ("lr=0.1", "lr=0.05")}

    started.clear()
    assert main(command) == 1  # finished points are skipped; the failed one is tried again
    assert started == ["lr=0.02"]
    assert "2 finished before, 1 to run" in capsys.readouterr().out
    assert {n: (out / n / "summary.json").stat().st_mtime_ns for n in summaries} == summaries


def real_launch_python(code: str, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-c", code], stdout=handle, stderr=subprocess.STDOUT, env=env
        )


def test_parallel_runs_at_most_k_points_with_their_share_of_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    live: list[int] = []
    most = [0]
    seen: list[tuple[list[str], str]] = []

    class Proc:
        """A point process that ends at its second poll (as a failed run: no run directory)."""

        def __init__(self) -> None:
            self.polls = 0
            live.append(1)
            most[0] = max(most[0], len(live))

        def poll(self) -> int | None:
            self.polls += 1
            if self.polls < 2:
                return None
            live.pop()
            return 3

    def launch(argv: list[str], log: Path, env: dict[str, str]) -> Any:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("starting\ncommsgd: error: no\n")
        seen.append((argv, env["OMP_NUM_THREADS"]))
        return Proc()

    monkeypatch.setattr(sweep, "launch", launch)
    monkeypatch.setattr(sweep.time, "sleep", lambda _: None)
    points = [PointRun(f"p{i}", (("optim.lr", f"0.{i + 1}"),), []) for i in range(5)]
    points[4].extra["threads_set"] = True  # its config sets cluster.threads: left alone
    saves = []
    sweep.run_points(points, tmp_path, 2, 3, lambda: saves.append(1))
    assert most[0] == 2 and len(seen) == 5
    assert all(env == "3" for _, env in seen)
    assert [a[-1] == "cluster.threads=3" for a, _ in seen] == [True] * 4 + [False]
    assert {p.status for p in points} == {"failed"} and points[0].error == "commsgd: error: no"
    assert points[0].exit_code == 3 and len(saves) == 10


def test_the_sweep_module_and_its_listing_start_without_torch() -> None:
    code = (
        "import sys; from commsgd.cli import main; assert main(['sweep', '--list-grids']) == 0; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "lsgd-paper-cnn7" in done.stdout

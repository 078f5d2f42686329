"""`commsgd bench`: the emulated cluster's plan and checks, result files, and the --quick suite end to end.

Nothing here asserts a timing: only that results are produced and well formed.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from commsgd.bench import cluster as cl
from commsgd.bench import compressors, powersgd, traffic
from commsgd.bench.common import BenchEnv, available, write_result
from commsgd.cli import main
from commsgd.tasks import write_fake_cifar10

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BENCH_SUBNET = ipaddress.ip_network("198.18.0.0/15")


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table in `text` as rows of cells."""
    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def assert_well_formed(md: Path) -> None:
    text = md.read_text()
    assert text.startswith("# ") and "- machine:" in text and "- command: `commsgd bench" in text
    for table in markdown_tables(text):
        assert len(table) >= 2 and set("".join(table[1])) <= set("-: "), f"{md}: bad table header"
        assert all(len(row) == len(table[0]) for row in table), f"{md}: ragged table"


# --------------------------------------------------------------------------------------- cluster plan


def test_cluster_plan_uses_only_benchmarking_addresses_and_namespaces() -> None:
    plan = cl.ClusterPlan("t1", nodes=3, gbps=0.1, procs=2)
    assert [plan.address(k) for k in range(3)] == ["198.18.0.1", "198.18.0.2", "198.18.0.3"]
    assert all(ipaddress.ip_address(plan.address(k)) in BENCH_SUBNET for k in range(3))
    cmds = plan.setup_commands()
    for cmd in cmds:
        if cmd[:2] == ["ip", "netns"]:
            assert cmd[3].startswith("commsgd-t1-")
        else:  # every link, address and qdisc command runs inside one of our namespaces
            assert cmd[1] == "-n" and cmd[2] in plan.namespaces, cmd
    addrs = [c[c.index("add") + 1] for c in cmds if "addr" in c]
    assert all(ipaddress.ip_interface(a).network.subnet_of(BENCH_SUBNET) for a in addrs)
    shaped = [c for c in cmds if c[0] == "tc"]
    assert len(shaped) == 2 * 3 and all("tbf" in c and "100000000bit" in c for c in shaped)
    # both ends of every link hand tbf only packets that fit its bucket (tbf would cut larger ones up)
    bursts = {int(c[c.index("burst") + 1]) for c in shaped}
    gso = [int(c[-1]) for c in cmds if "gso_max_size" in c]
    assert len(gso) == 2 * 3 and bursts == {32 * 1024} and all(0 < g <= 16 * 1024 for g in gso)
    fast = cl.ClusterPlan("t1", nodes=2, gbps=10.0)
    assert fast.burst == 1_250_000 and fast.gso_bytes == 64 * 1024
    assert not any("netem" in c or "route" in c for c in cmds)
    assert plan.teardown_commands() == [["ip", "netns", "del", ns] for ns in plan.namespaces]


def test_cluster_torchrun_command_and_environment() -> None:
    plan = cl.ClusterPlan("t2", nodes=2, gbps=1.0, procs=2, port=29555)
    argv = plan.torchrun(1, ["train", "--out", "/tmp/x"])
    joined = " ".join(argv)
    for part in (
        "--nnodes 2",
        "--nproc-per-node 2",
        "--node-rank 1",
        "--rdzv-backend c10d",
        "--rdzv-endpoint 198.18.0.1:29555",
        "--local-addr 198.18.0.2",
        "is_host=0",
        "-m commsgd train --out /tmp/x",
    ):
        assert part in joined
    assert "is_host=1" in " ".join(plan.torchrun(0, ["train"]))
    env = plan.node_env({"RANK": "3", "MASTER_ADDR": "10.0.0.1", "PATH": "/bin"})
    assert env["GLOO_SOCKET_IFNAME"] == "veth0" and env["PATH"] == "/bin"
    assert "RANK" not in env and "MASTER_ADDR" not in env


def test_cluster_plan_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        cl.ClusterPlan("t", nodes=0, gbps=1.0)
    with pytest.raises(ValueError):
        cl.ClusterPlan("t", nodes=2, gbps=0.0)


def test_cluster_without_root_says_so_and_points_to_the_network_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cl.os, "geteuid", lambda: 1000)
    with pytest.raises(cl.ClusterUnavailable, match=r"network\.enabled=true network\.inter_gbps=1"):
        cl.check_support()
    assert main(["bench", "cluster", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs root" in err
    assert "Not available" in (tmp_path / "cluster.md").read_text()
    assert json.loads((tmp_path / "cluster.json").read_text())["available"] is False


# --------------------------------------------------------------------------------------- entries


def test_write_result_and_notes(tmp_path: Path) -> None:
    env = BenchEnv(tmp_path, command="commsgd bench x")
    assert available(env, ["allreduce", "no-such-algorithm"], "x") == ["allreduce"]
    path = write_result(env, "x", "Title", "| a | b |\n|---|---|\n| 1 | 2 |", {"value": 1}, 3.0)
    assert_well_formed(path)
    assert "no-such-algorithm" in path.read_text()
    data = json.loads((tmp_path / "x.json").read_text())
    assert data["value"] == 1 and data["notes"]


def test_powersgd_entry_when_not_registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(powersgd, "registered", lambda: ["allreduce", "sgd"])
    env = BenchEnv(tmp_path, command="commsgd bench powersgd")
    args = argparse.Namespace(rank=2, workers=2, steps=None)
    assert "not available" in powersgd.run(env, args)
    assert "Not available yet" in (tmp_path / "powersgd.md").read_text()


def test_powersgd_times_only_compressed_steps_and_keeps_warmup_bytes_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    warmup, chunks = powersgd.schedule(2, 7, 3)
    assert list(warmup) == [0, 1]
    assert [list(part) for part, _ in chunks] == [[2, 3, 4], [5, 6, 7], [8]]
    assert [first for _, first in chunks] == [True, False, True]

    def fake(fn: Any, workers: int, model: str, steps: int, *rest: Any, timeout: float) -> list[dict]:
        one = {"model": model, "steps": steps, "commsgd_s": 0.2, "torch_s": 0.4}
        bytes_ = {"commsgd_bytes_per_step": 56_800.0, "commsgd_bytes_per_warmup_step": 1_080_000.0}
        return [
            {**one, **bytes_, "commsgd_chunks_s": [1.0, 2.0], "torch_chunks_s": [2.0, 2.0]},
            {**one, **bytes_, "commsgd_chunks_s": [1.5, 1.0], "torch_chunks_s": [1.0, 4.0]},
        ]

    monkeypatch.setattr("commsgd.testing.run_distributed", fake)
    powersgd.run(BenchEnv(tmp_path), argparse.Namespace(rank=2, workers=2, steps=None))
    table = markdown_tables((tmp_path / "powersgd.md").read_text())[0]
    header, resnet = table[0], table[-1]
    assert resnet[header.index("commsgd bytes / compressed step")] == "56.8 KB"
    assert resnet[header.index("commsgd bytes / warm-up step")] == "1080.0 KB"
    assert resnet[header.index("ratio per chunk (min-max)")] == "0.500-0.750"  # slowest rank per chunk


def test_bytes_variants_follow_the_compressor_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(traffic, "param_fields", lambda a: {"compressor": "topk", "ratio": None})
    monkeypatch.setattr(traffic, "accepts", lambda a, p: p["compressor"] in ("topk", "sign"))
    names = [label for label, _ in traffic.variants("x")]
    assert names == ["topk", "sign"]
    monkeypatch.setattr(traffic, "param_fields", lambda a: {"tau": 4})
    assert traffic.variants("x") == [("", {})]


def test_compressor_table_parser() -> None:
    rows = compressors._parse(
        "text\n\n| compressor | GB/s |\n| --- | --- |\n| sign | 1.50 |\n| topk | 0.40 |\n"
    )
    assert rows == [{"compressor": "sign", "GB/s": "1.50"}, {"compressor": "topk", "GB/s": "0.40"}]


# --------------------------------------------------------------------------------------- the suite


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_quick_suite_produces_reports_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "results"
    # lowcomm and limit have their own tests (tests/test_bench_lowcomm.py, tests/test_bench_limit.py)
    skip = ["cluster", "lowcomm", "limit"]
    assert main(["bench", "all", "--quick", "--skip", *skip, "--out", str(out)]) == 0
    index = (out / "index.md").read_text()
    names = ["overhead", "bytes", "compressors", "powersgd", "paper", "scaling", "stragglers"]
    for name in names:
        assert f"[{name}]({name}.md)" in index
        assert_well_formed(out / f"{name}.md")
        json.loads((out / f"{name}.json").read_text())
    for png in ("bytes.png", "scaling.png", "paper/2w/error_vs_time.png", "paper/2w/train_loss.png"):
        assert (out / png).read_bytes().startswith(PNG_MAGIC), png
    bytes_rows = markdown_tables((out / "bytes.md").read_text())[0]
    assert any(row[0] == "allreduce" and row[5] == "1.0000" for row in bytes_rows)
    assert (out / "paper" / "2w" / "report.md").is_file()
    assert not list((out / "runs").glob("*/*/checkpoints"))  # checkpoints are removed after reading


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_paper_runs_cnn7_on_a_cifar10_directory(tmp_path: Path) -> None:
    """`bench paper --data-dir` trains the paper's CNN7 on CIFAR-10 read from the directory given."""
    data = write_fake_cifar10(tmp_path / "cifar", n_train_per_batch=40, n_test=40).parent
    out = tmp_path / "results"
    argv = ["bench", "paper", "--quick", "--steps", "4", "--data-dir", str(data), "--out", str(out)]
    assert main(argv) == 0
    text = (out / "paper.md").read_text()
    assert "CNN7 on CIFAR-10" in text
    assert_well_formed(out / "paper.md")
    configs = list((out / "runs" / "paper").glob("*/config.yaml"))
    assert configs
    for config in configs:
        cfg = yaml.safe_load(config.read_text())
        assert cfg["model"] == "cnn7" and cfg["data"]["dataset"] == "cifar10"
        assert cfg["data"]["data_dir"] == str(data)


def test_a_cluster_train_job_is_not_indexed_as_a_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    import commsgd.bench as bench

    monkeypatch.setattr(bench, "_module", lambda name: types.SimpleNamespace(run=lambda env, args: "ran"))
    common = {"out": str(tmp_path), "quick": False, "data_dir": None, "keep_runs": False}
    bench.run_one("cluster", argparse.Namespace(**common, train=["--out", "x"]), "cmd")
    assert not (tmp_path / "index.md").exists()
    bench.run_one("cluster", argparse.Namespace(**common, train=None), "cmd")
    assert "ran" in (tmp_path / "index.md").read_text()


def test_scaling_on_the_cluster_gives_every_worker_its_own_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from commsgd.bench import scaling

    placed: list[tuple[str, int, int, list[str]]] = []

    def on_cluster(env: BenchEnv, bench: str, job: Any, nodes: int, procs: int, gbps: float) -> None:
        placed.append((job.name, nodes, procs, list(job.overrides)))

    monkeypatch.setattr(cl, "run_on_cluster", on_cluster)
    monkeypatch.setattr(scaling, "run_jobs", lambda env, bench, jobs: {})
    monkeypatch.setattr(scaling, "available", lambda env, names, bench: ["allreduce", "lsgd"])
    args = argparse.Namespace(workers=[1, 2, 4], steps=5, gbps=1.0, target_error=0.06, cluster=True)
    scaling.run(BenchEnv(tmp_path), args)
    assert [(n, k, p) for n, k, p, _ in placed] == [
        ("allreduce-2", 2, 1),
        ("allreduce-4", 4, 1),
        ("lsgd-2", 2, 1),
        ("lsgd-4", 4, 1),
    ]
    assert not [o for *_, overrides in placed for o in overrides if o.startswith(("network.", "cluster."))]
    assert "emulated cluster" in (tmp_path / "scaling.md").read_text()


@pytest.mark.parametrize("text", ["-1", "0", "abc", "nan", "inf"])
def test_a_bad_quantimed_deadline_is_refused_before_any_run(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "stragglers", "--deadline", text, "--out", "/nonexistent/never-written"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--deadline" in err


def test_scaling_takes_an_image_model_on_the_data_folder_and_refuses_one_without(tmp_path: Path) -> None:
    from commsgd.bench.scaling import task_overrides
    from commsgd.errors import ConfigError

    assert task_overrides(BenchEnv(tmp_path), "mlp") == ["model=mlp"]
    with pytest.raises(ConfigError, match="needs --data-dir"):
        task_overrides(BenchEnv(tmp_path), "resnet20")
    found = task_overrides(BenchEnv(tmp_path, data_dir="/data/jpeg"), "resnet20")
    assert found == [
        "model=resnet20",
        "data.dataset=imagefolder",
        "data.data_dir=/data/jpeg",
        "data.test_samples=500",
    ]


def test_scaling_refuses_an_unknown_model_and_powersgd_a_rate_not_above_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "scaling", "--model", "nosuch", "--quick", "--out", str(tmp_path / "a")]) == 2
    assert "unknown model 'nosuch'" in capsys.readouterr().err
    for rate in ("0", "-1"):
        assert main(["bench", "powersgd", "--cluster", rate, "--quick", "--out", str(tmp_path / rate)]) == 2
        assert "the link rate must be positive" in capsys.readouterr().err

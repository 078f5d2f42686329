"""The user's own model and data set from the command line (`--model` / `--dataset package.module:function`).

Bad cases go through `commsgd train` with the launcher replaced: one `commsgd: error:` line, exit code 2,
no worker started. One good case runs a real (spawned) worker on a model and data set defined in a module
of the test's directory (the current directory, as a user would run it).
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from commsgd import cli, launch
from commsgd.errors import ConfigError
from commsgd.tasks import build_model, load_dataset

USER_MODULE = """
import torch
from torch import nn
from torch.utils.data import Dataset


class Pairs(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _xy(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def data():
    return Pairs(*_xy(256, 0)), _xy(64, 1)


def tiny(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], 16), nn.ReLU(), nn.Linear(16, num_classes))


def not_a_model(input_shape, num_classes):
    return [input_shape, num_classes]


def raises(input_shape, num_classes):
    raise ValueError("no such layer")


def one_set():
    return _xy(10, 0)[0]


def float_labels():
    x, y = _xy(10, 0)
    return (x, y.float()), (x, y.float())


def misshapen():
    x, y = _xy(10, 0)
    return (x, y), (x[:, :3], y)


NOT_CALLABLE = 3
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module `usermod_<test>` in the current directory (like a user's project); its name."""
    name = f"usermod_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield name
    sys.modules.pop(name, None)


def test_user_builders_give_the_model_and_data(user_module: str) -> None:
    data = load_dataset(f"{user_module}:data", None, model="mlp", seed=0)
    assert (data.spec.kind, data.spec.input_shape, data.spec.num_classes) == ("vector", (5,), 3)
    assert data.train_x.shape == (256, 5) and data.train_y.dtype == torch.int64 and data.num_test == 64
    model = build_model(f"{user_module}:tiny", data.spec)
    assert model(data.test_x[:4]).shape == (4, 3)
    assert build_model("mlp", data.spec)(data.test_x[:2]).shape == (2, 3)  # a bundled model on user data


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "no_such_module_xyz:build"], "model: cannot import 'no_such_module_xyz'"),
        (["--model", "{mod}:missing"], "model: module '{mod}' has no 'missing'"),
        (["--model", "{mod}:NOT_CALLABLE"], "model: '{mod}:NOT_CALLABLE' is a int, not a function"),
        (["--model", "{mod}:not_a_model"], "model: {mod}:not_a_model returned a list, not a torch.nn.Module"),
        (
            ["--model", "{mod}:raises"],
            "model: {mod}:raises((1, 8, 8), 10) failed (ValueError: no such layer)",
        ),
        (["--model", "{mod}:a:b"], "model: '{mod}:a:b' is not package.module:function"),
        (
            ["--dataset", "{mod}:one_set"],
            "data.dataset: {mod}:one_set returned a Tensor; expected (train, test)",
        ),
        (["--dataset", "{mod}:float_labels"], "labels must be integer class indices"),
        (["--dataset", "{mod}:misshapen"], "train and test samples differ in shape"),
        (["--dataset", "{mod}:tiny"], "data.dataset: {mod}:tiny() failed (TypeError"),
    ],
)
def test_bad_user_code_is_one_line_before_any_worker(
    flags: list[str],
    message: str,
    user_module: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    launched: list[object] = []
    monkeypatch.setattr(launch, "launch_local", lambda *a: launched.append(a) or 0)
    argv = ["train", "--workers", "2", "--steps", "2", "--out", str(tmp_path / "run")]
    code = cli.main(argv + [f.format(mod=user_module) for f in flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("commsgd: error: ") and err.count("\n") == 1, err
    assert message.format(mod=user_module) in err
    assert not launched and not (tmp_path / "run").exists()


def test_user_dataset_with_torch_dataset_items_that_are_not_pairs(user_module: str, tmp_path: Path) -> None:
    (tmp_path / f"{user_module}_b.py").write_text(
        "import torch\n"
        "class Singles(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 3\n"
        "    def __getitem__(self, i): return torch.zeros(2)\n"
        "def data(): return Singles(), Singles()\n"
    )
    try:
        with pytest.raises(ConfigError, match=r"train set\[0\] is a Tensor, not an \(x, y\) pair"):
            load_dataset(f"{user_module}_b:data", None, model="mlp", seed=0)
    finally:
        sys.modules.pop(f"{user_module}_b", None)


@pytest.mark.multiprocess
def test_train_runs_the_users_model_on_the_users_data(user_module: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = cli.main(
        [
            "train",
            "--workers",
            "1",
            "--steps",
            "6",
            "--out",
            str(out),
            "--model",
            f"{user_module}:tiny",
            "--dataset",
            f"{user_module}:data",
            "progress=false",
            "cluster.threads=1",
            "optim.name=adamw",
            "optim.lr=0.01",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == f"{user_module}:tiny" and summary["dataset"] == f"{user_module}:data"
    assert summary["steps"] == [6] and 0.0 <= summary["test_error"] <= 1.0

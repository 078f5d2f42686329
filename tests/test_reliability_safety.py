"""No code from user input is ever executed: no eval/exec, YAML only through the safe loader, pickles only
through restricted unpicklers, checkpoints only with `weights_only=True`. Checked on the package source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "commsgd"
SOURCES = sorted(PACKAGE.rglob("*.py"))

#: calls that run code or build arbitrary objects from data
FORBIDDEN = {
    "eval",
    "exec",
    "compile",
    "__import__",
    "yaml.load",
    "yaml.unsafe_load",
    "yaml.full_load",
    "yaml.load_all",
    "yaml.unsafe_load_all",
    "pickle.load",
    "pickle.loads",
    "marshal.loads",
    "dill.load",
    "dill.loads",
    "os.system",
    "subprocess.call",
}


#: (file, call) pairs that are safe for a stated reason
ALLOWED = {
    # the test helper reads back result files its own spawned workers wrote into a private temp dir
    ("testing.py", "pickle.loads"),
}


def _calls(path: Path) -> list[tuple[int, str, ast.Call]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [(n.lineno, ast.unparse(n.func), n) for n in ast.walk(tree) if isinstance(n, ast.Call)]


def test_the_package_source_was_found() -> None:
    assert len(SOURCES) > 10 and (PACKAGE / "config.py") in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_call_executes_code_from_data(path: Path) -> None:
    for line, name, call in _calls(path):
        assert name not in FORBIDDEN or (path.name, name) in ALLOWED, f"{path.name}:{line}: {name}(...)"
        flags = {k.arg: ast.unparse(k.value) for k in call.keywords}
        if name in ("np.load", "numpy.load"):
            assert flags.get("allow_pickle") == "False", f"{path.name}:{line}: {name} may unpickle"
        if name == "torch.load":
            assert flags.get("weights_only") == "True", (
                f"{path.name}:{line}: torch.load without weights_only=True"
            )
        if name.endswith("Unpickler") and name != "SafeUnpickler":
            pytest.fail(f"{path.name}:{line}: {name} is not a restricted unpickler")


def test_config_files_and_overrides_use_yaml_safe_load() -> None:
    names = [name for _, name, _ in _calls(PACKAGE / "config.py")]
    assert names.count("yaml.safe_load") >= 2  # config files and key=value overrides
    # yaml.compose builds nodes only (no Python objects); config.py uses it to find a line number
    allowed = ("yaml.safe_load", "yaml.safe_dump", "yaml.compose")
    assert not any(n.startswith("yaml.") and n not in allowed for n in names)
    source = (PACKAGE / "config.py").read_text(encoding="utf-8")
    assert source.count("yaml.compose(") == source.count("Loader=yaml.SafeLoader)")

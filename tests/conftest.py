"""Keep torch single-threaded in the test process so parallel workers do not oversubscribe the cores.

Every test session also gets its own commsgd cache directory (COMMSGD_CACHE_DIR), so the user's cache
is never read or written; spawned workers inherit it through the environment.
"""

from collections.abc import Iterator

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def session_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Point COMMSGD_CACHE_DIR at a fresh directory shared by the whole session."""
    patch = pytest.MonkeyPatch()
    patch.setenv("COMMSGD_CACHE_DIR", str(tmp_path_factory.mktemp("commsgd-cache")))
    yield
    patch.undo()

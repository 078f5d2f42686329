"""Tests for commsgd.tasks: data sets (bundled, CIFAR-10 loader, text), models and the shared loss."""

from __future__ import annotations

import importlib.metadata
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
import torch

from commsgd.errors import ConfigError, DataError
from commsgd.tasks import (
    DATASETS,
    MODELS,
    Dataset,
    DatasetSpec,
    build_model,
    bundled,
    load_dataset,
    loss_and_errors,
    write_fake_cifar10,
    write_fake_image_folder,
)
from commsgd.tasks.text import SEQ_LEN
from commsgd.tasks.transforms import CIFAR_MEAN, CIFAR_STD

TRAIN_PER_BATCH = 8
N_TEST = 12


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake CIFAR-10 in the official layout, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar10(root, TRAIN_PER_BATCH, N_TEST, seed=3)
    return root


@pytest.fixture()
def own_cifar(tmp_path: Path) -> Path:
    """A fake CIFAR-10 batches folder a test may damage."""
    return write_fake_cifar10(tmp_path, 4, 4, seed=0)


def normalized(raw: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (raw.float() / 255 - mean) / std


# ---------------------------------------------------------------- models


MODEL_DATA = [
    ("mlp", "digits"),
    ("sigmoid_mlp", "digits"),
    ("logreg", "digits"),
    ("cnn_small", "digits"),
    ("mlp", "synthetic"),
    ("logreg", "synthetic"),
    ("mlp", "cifar10"),
    ("cnn7", "cifar10"),
    ("resnet20", "cifar10"),
    ("vgg16", "cifar10"),
    ("resnet50", "cifar10"),
    ("cnn7", "imagefolder"),
    ("lstm", "text"),
]


def test_every_model_is_exercised() -> None:
    assert {m for m, _ in MODEL_DATA} == set(MODELS)
    assert {d for _, d in MODEL_DATA} == set(DATASETS)


@pytest.mark.parametrize(("model_name", "data_name"), MODEL_DATA)
def test_model_forward_backward(model_name: str, data_name: str, cifar_root: Path, tmp_path: Path) -> None:
    folders = {"cifar10": cifar_root, "imagefolder": write_fake_image_folder(tmp_path)}
    data_dir = str(folders[data_name]) if data_name in folders else None
    data = load_dataset(data_name, data_dir, model=model_name, seed=0)
    torch.manual_seed(0)
    model = build_model(model_name, data.spec)
    x, y = data.train_batch(torch.arange(4), torch.Generator().manual_seed(0))
    assert tuple(x.shape[1:]) == data.spec.input_shape
    out = model(x)
    if data.spec.kind == "text":
        assert out.shape == (4, SEQ_LEN, data.spec.num_classes)
    else:
        assert out.shape == (4, data.spec.num_classes)
    loss, errors = loss_and_errors(out, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert 0 <= int(errors) <= y.numel()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_cifar_models_accept_both_crop_sizes() -> None:
    for side in (28, 32):
        spec = DatasetSpec("cifar10", "image", (3, side, side), 10)
        for name in ("cnn7", "resnet20", "vgg16"):
            model = build_model(name, spec).eval()
            with torch.no_grad():
                assert model(torch.zeros(2, 3, side, side)).shape == (2, 10)


def test_resnet20_parameter_count() -> None:
    model = build_model("resnet20", DatasetSpec("cifar10", "image", (3, 28, 28), 10))
    count = sum(p.numel() for p in model.parameters())
    assert 260_000 <= count <= 280_000


def test_initialisation_follows_global_seed() -> None:
    spec = DatasetSpec("digits", "image", (1, 8, 8), 10)
    torch.manual_seed(5)
    first = build_model("cnn_small", spec).state_dict()
    torch.manual_seed(5)
    second = build_model("cnn_small", spec).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_incompatible_model_is_config_error() -> None:
    image = DatasetSpec("digits", "image", (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="use one of"):
        build_model("lstm", image)
    with pytest.raises(ConfigError, match="lstm"):
        build_model("mlp", DatasetSpec("text", "text", (SEQ_LEN,), 30))
    with pytest.raises(ConfigError, match="cnn7"):
        build_model("cnn7", DatasetSpec("synthetic", "vector", (32,), 10))
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("transformer", image)


def test_unknown_dataset_and_missing_cifar_dir_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset("mnist", None, model="mlp", seed=0)
    with pytest.raises(ConfigError, match="data_dir"):
        load_dataset("cifar10", None, model="cnn7", seed=0)


def test_loss_and_errors_counts_wrong_predictions() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    loss, errors = loss_and_errors(logits, torch.tensor([0, 0, 0]))
    assert int(errors) == 1
    assert float(loss) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, torch.zeros(3).long()))
    )
    text_logits = torch.zeros(2, 3, 5)
    text_logits[..., 1] = 1.0
    _, text_errors = loss_and_errors(text_logits, torch.tensor([[1, 1, 0], [1, 2, 1]]))
    assert int(text_errors) == 2


# ---------------------------------------------------------------- bundled data sets


def test_digits_split_and_normalisation() -> None:
    data = load_dataset("digits", None, model="mlp", seed=0)
    assert data.spec == DatasetSpec("digits", "image", (1, 8, 8), 10)
    assert data.num_train + data.num_test == 1797
    assert data.num_test == 360
    assert data.train_x.shape == (data.num_train, 1, 8, 8) and data.train_x.dtype == torch.float32
    assert abs(float(data.train_x.mean())) < 1e-4
    assert float(data.train_x.std()) == pytest.approx(1.0, abs=1e-3)
    assert set(data.test_y.tolist()) == set(range(10))
    other = load_dataset("digits", None, model="mlp", seed=99)
    assert torch.equal(data.test_x, other.test_x)


def test_worker_start_up_leaves_heavy_packages_unimported() -> None:
    """scikit-learn (about 1 s with scipy) is imported by the digits loader only, not by every worker;
    plotting and test-only packages never are."""
    code = (
        "import sys, commsgd.cli, commsgd.launch, commsgd.train; "
        "print(' '.join(m for m in ('sklearn', 'scipy', 'matplotlib', 'hypothesis') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []


# ---------------------------------------------------------------- digits cache


@pytest.fixture()
def digits_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache directory of this test's own; returns the digits cache file path in it."""
    monkeypatch.setenv("COMMSGD_CACHE_DIR", str(tmp_path / "cache"))
    path = bundled._digits_cache_path()
    assert path is not None and path.parent == tmp_path / "cache"
    return path


@pytest.fixture(scope="module")
def sklearn_digits() -> dict[str, torch.Tensor]:
    """The prepared digits arrays computed with scikit-learn, never read from a cache."""
    return {key: torch.from_numpy(value) for key, value in bundled._compute_digits_arrays().items()}


def _assert_digits_equal(data: Dataset, reference: dict[str, torch.Tensor]) -> None:
    """Bitwise equality (floats compared as their int32 bit patterns, so even -0.0 vs 0.0 differs)."""
    loaded = {"x_tr": data.train_x, "y_tr": data.train_y, "x_te": data.test_x, "y_te": data.test_y}
    for key, tensor in loaded.items():
        assert tensor.dtype == reference[key].dtype and tensor.shape == reference[key].shape, key
        if tensor.dtype == torch.float32:
            assert torch.equal(tensor.view(torch.int32), reference[key].view(torch.int32)), key
        else:
            assert torch.equal(tensor, reference[key]), key


def _no_sklearn() -> dict[str, np.ndarray]:
    raise AssertionError("digits were computed with scikit-learn, not read from the cache")


def test_digits_cache_location_and_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COMMSGD_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert bundled.cache_dir() == tmp_path / "home" / ".cache" / "commsgd"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert bundled.cache_dir() == tmp_path / "home" / ".cache" / "commsgd"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert bundled.cache_dir() == tmp_path / "xdg" / "commsgd"
    monkeypatch.setenv("COMMSGD_CACHE_DIR", str(tmp_path / "own"))
    assert bundled.cache_dir() == tmp_path / "own"
    path = bundled._digits_cache_path()
    assert path is not None and path.parent == tmp_path / "own"
    assert f"-v{bundled.DIGITS_CACHE_FORMAT}-" in path.name
    assert f"sklearn{importlib.metadata.version('scikit-learn')}" in path.name


def test_digits_cache_hit_is_bitwise_identical(
    digits_cache: Path, sklearn_digits: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    cold = load_dataset("digits", None, model="mlp", seed=0)
    _assert_digits_equal(cold, sklearn_digits)
    assert [p.name for p in digits_cache.parent.iterdir()] == [digits_cache.name]  # no temp file left
    monkeypatch.setattr(bundled, "_compute_digits_arrays", _no_sklearn)
    warm = load_dataset("digits", None, model="mlp", seed=0)
    _assert_digits_equal(warm, sklearn_digits)
    assert warm.spec == cold.spec


def _corrupt(path: Path, kind: str) -> None:
    """Damage a valid cache file at `path` in one of several ways."""
    raw = path.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "bit_flip":  # inside the array data: only the zip CRC notices
        middle = len(raw) // 2
        path.write_bytes(raw[:middle] + bytes([raw[middle] ^ 0x10]) + raw[middle + 1 :])
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "object_array":  # would need pickle to load
        with path.open("wb") as handle:
            np.savez(handle, x_tr=np.array([{"a": 1}], dtype=object))
    elif kind == "wrong_dtype":
        with np.load(path) as archive:
            arrays = {key: archive[key] for key in archive.files}
        arrays["x_tr"] = arrays["x_tr"].astype(np.float64)
        with path.open("wb") as handle:
            np.savez(handle, **arrays)
    elif kind == "missing_array":
        with np.load(path) as archive:
            arrays = {key: archive[key] for key in archive.files if key != "y_te"}
        with path.open("wb") as handle:
            np.savez(handle, **arrays)
    elif kind == "directory":
        path.unlink()
        path.mkdir()
        return
    assert path.read_bytes() != raw


@pytest.mark.parametrize(
    "kind",
    [
        "empty",
        "truncated",
        "bit_flip",
        "garbage",
        "object_array",
        "wrong_dtype",
        "missing_array",
        "directory",
    ],
)
def test_corrupt_digits_cache_falls_back_and_is_rewritten(
    digits_cache: Path, sklearn_digits: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    load_dataset("digits", None, model="mlp", seed=0)
    _corrupt(digits_cache, kind)
    assert bundled._read_digits_cache(digits_cache) is None
    _assert_digits_equal(load_dataset("digits", None, model="mlp", seed=0), sklearn_digits)
    if kind != "directory":  # os.replace cannot put a file over a directory: just not cached
        monkeypatch.setattr(bundled, "_compute_digits_arrays", _no_sklearn)
        _assert_digits_equal(load_dataset("digits", None, model="mlp", seed=0), sklearn_digits)
    assert not list(digits_cache.parent.glob(".*.tmp"))


@pytest.mark.parametrize("where", ["file", "below_file"])
def test_unwritable_digits_cache_dir_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sklearn_digits: dict[str, torch.Tensor], where: str
) -> None:
    """A cache directory that cannot be created (works as root too, unlike a read-only directory)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory", encoding="utf-8")
    monkeypatch.setenv("COMMSGD_CACHE_DIR", str(blocker if where == "file" else blocker / "cache"))
    _assert_digits_equal(load_dataset("digits", None, model="mlp", seed=0), sklearn_digits)
    assert blocker.read_text(encoding="utf-8") == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_failed_digits_cache_write_leaves_old_file_and_no_temp(
    digits_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that dies halfway (disk full) never shows at the cache path: readers see the old file."""
    arrays = bundled._compute_digits_arrays()
    bundled._write_digits_cache(digits_cache, arrays)
    before = digits_cache.read_bytes()

    def half_write(handle: BinaryIO, **kwargs: np.ndarray) -> None:
        handle.write(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bundled.np, "savez", half_write)
    bundled._write_digits_cache(digits_cache, arrays)
    assert digits_cache.read_bytes() == before
    assert [p.name for p in digits_cache.parent.iterdir()] == [digits_cache.name]


def test_warm_digits_cache_spares_a_fresh_process_sklearn(tmp_path: Path) -> None:
    """The first process computes and caches the split (importing sklearn); the next only reads the cache."""
    code = (
        "import sys; from commsgd.tasks import load_dataset; "
        "data = load_dataset('digits', None, model='mlp', seed=0); "
        "print(data.num_train, data.num_test, 'sklearn' in sys.modules, 'scipy' in sys.modules)"
    )
    env = {**os.environ, "COMMSGD_CACHE_DIR": str(tmp_path)}
    outputs = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
        )
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout.split())
    assert outputs == [["1437", "360", "True", "True"], ["1437", "360", "False", "False"]]


def test_synthetic_shapes() -> None:
    data = load_dataset("synthetic", None, model="logreg", seed=0)
    assert data.spec.kind == "vector" and data.spec.input_shape == (32,) and data.spec.num_classes == 10
    assert data.train_x.shape == (data.num_train, 32)
    assert set(data.train_y.tolist()) == set(range(10))


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_test_shards_cover_every_sample_once(world: int) -> None:
    data = load_dataset("digits", None, model="mlp", seed=0)
    parts = [list(data.test_batches(16, shard=(rank, world))) for rank in range(world)]
    xs = torch.cat([x for part in parts for x, _ in part])
    ys = torch.cat([y for part in parts for _, y in part])
    assert torch.equal(xs, data.test_x) and torch.equal(ys, data.test_y)
    sizes = [sum(len(y) for _, y in part) for part in parts]
    assert max(sizes) - min(sizes) <= 1


def test_bad_shard_or_batch_size_is_config_error() -> None:
    data = load_dataset("digits", None, model="mlp", seed=0)
    with pytest.raises(ConfigError):
        next(data.test_batches(8, shard=(2, 2)))
    with pytest.raises(ConfigError):
        next(data.test_batches(0))


# ---------------------------------------------------------------- CIFAR-10


def test_cifar_both_directory_forms(cifar_root: Path) -> None:
    outer = load_dataset("cifar10", str(cifar_root), model="vgg16", seed=0)
    inner = load_dataset("cifar10", str(cifar_root / "cifar-10-batches-py"), model="vgg16", seed=0)
    assert torch.equal(outer.train_x, inner.train_x) and torch.equal(outer.test_y, inner.test_y)
    assert outer.train_x.shape == (5 * TRAIN_PER_BATCH, 3, 32, 32) and outer.train_x.dtype == torch.uint8
    assert outer.test_x.shape == (N_TEST, 3, 32, 32)
    assert outer.train_y.dtype == torch.int64 and int(outer.train_y.max()) <= 9


@pytest.mark.parametrize(("model_name", "side"), [("cnn7", 28), ("resnet20", 28), ("vgg16", 32), ("mlp", 32)])
def test_cifar_crop_sizes_and_test_transform(cifar_root: Path, model_name: str, side: int) -> None:
    data = load_dataset("cifar10", str(cifar_root), model=model_name, seed=0)
    assert data.spec.input_shape == (3, side, side)
    x, _ = data.train_batch(torch.arange(6), torch.Generator().manual_seed(0))
    assert x.shape == (6, 3, side, side) and x.dtype == torch.float32
    test_x, test_y = next(data.test_batches(N_TEST))
    offset = (32 - side) // 2
    expected = normalized(data.test_x)[:, :, offset : offset + side, offset : offset + side]
    assert torch.allclose(test_x, expected) and torch.equal(test_y, data.test_y)


def _match(window: torch.Tensor, padded: torch.Tensor, side: int) -> tuple[bool, bool]:
    """Whether `window` is some crop of `padded`, and whether it is a mirrored one."""
    limit = padded.shape[-1] - side + 1
    for top in range(limit):
        for left in range(limit):
            crop = padded[:, top : top + side, left : left + side]
            if torch.allclose(window, crop):
                return True, False
            if torch.allclose(window, crop.flip(-1)):
                return True, True
    return False, False


@pytest.mark.parametrize(("model_name", "side", "pad"), [("resnet20", 28, 0), ("vgg16", 32, 4)])
def test_cifar_augmentation_crops_and_flips(cifar_root: Path, model_name: str, side: int, pad: int) -> None:
    data = load_dataset("cifar10", str(cifar_root), model=model_name, seed=0)
    indices = torch.arange(data.num_train)
    x, y = data.train_batch(indices, torch.Generator().manual_seed(11))
    again, _ = data.train_batch(indices, torch.Generator().manual_seed(11))
    assert torch.equal(x, again) and torch.equal(y, data.train_y)
    padded = torch.nn.functional.pad(normalized(data.train_x), (pad, pad, pad, pad))
    flips = 0
    for i in range(data.num_train):
        found, flipped = _match(x[i], padded[i], side)
        assert found
        flips += flipped
    assert 0 < flips < data.num_train
    different, _ = data.train_batch(indices, torch.Generator().manual_seed(12))
    assert not torch.equal(x, different)


def test_cifar_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset("cifar10", str(tmp_path / "nowhere"), model="cnn7", seed=0)
    with pytest.raises(DataError, match="data_batch_1"):
        load_dataset("cifar10", str(tmp_path), model="cnn7", seed=0)


def test_cifar_missing_file(own_cifar: Path) -> None:
    (own_cifar / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", str(own_cifar.parent), model="cnn7", seed=0)


def test_cifar_truncated_file(own_cifar: Path) -> None:
    path = own_cifar / "test_batch"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", str(own_cifar), model="cnn7", seed=0)


def _write_batch(path: Path, data: np.ndarray, labels: list[int]) -> None:
    with path.open("wb") as handle:
        pickle.dump({b"data": data, b"labels": labels}, handle, protocol=4)


def test_cifar_labels_out_of_range(own_cifar: Path) -> None:
    _write_batch(own_cifar / "data_batch_2", np.zeros((2, 3072), np.uint8), [3, 10])
    with pytest.raises(DataError, match=r"0\.\.9"):
        load_dataset("cifar10", str(own_cifar), model="cnn7", seed=0)


def test_cifar_wrong_shape(own_cifar: Path) -> None:
    _write_batch(own_cifar / "data_batch_1", np.zeros((2, 1024), np.uint8), [0, 1])
    with pytest.raises(DataError, match="3072"):
        load_dataset("cifar10", str(own_cifar), model="cnn7", seed=0)


class _Exploit:
    """Pickles as a call to os.system; a safe loader must refuse it before it runs."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


def test_cifar_refuses_disallowed_global(own_cifar: Path) -> None:
    marker = own_cifar / "pwned"
    payload = {b"data": _Exploit(f"touch {marker}"), b"labels": [0]}
    (own_cifar / "data_batch_4").write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(DataError, match="system"):
        load_dataset("cifar10", str(own_cifar), model="cnn7", seed=0)
    assert not marker.exists()


# ---------------------------------------------------------------- text


def _check_windows(data: Dataset) -> None:
    assert data.spec.kind == "text" and data.spec.input_shape == (SEQ_LEN,)
    assert data.train_x.dtype == torch.int64 and data.train_x.shape == data.train_y.shape
    assert data.train_x.shape[1] == SEQ_LEN and data.num_test > 0
    assert torch.equal(data.train_x[:, 1:], data.train_y[:, :-1])
    assert torch.equal(data.train_x[1:, 0], data.train_y[:-1, -1])  # windows are adjacent, not overlapping
    assert int(data.train_x.max()) < data.spec.num_classes


def test_text_generated_corpus() -> None:
    data = load_dataset("text", None, model="lstm", seed=0)
    _check_windows(data)
    assert data.num_train * SEQ_LEN > 20_000
    again = load_dataset("text", None, model="lstm", seed=1)
    assert torch.equal(data.train_x, again.train_x)


def test_text_user_file(tmp_path: Path) -> None:
    text = "abcab cabba! " * 40
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    data = load_dataset("text", str(path), model="lstm", seed=0)
    _check_windows(data)
    vocab = sorted(set(text[: int(len(text) * 0.9)]))
    assert data.spec.num_classes == len(vocab) + 1
    decoded = "".join(vocab[i] for i in data.train_x[0].tolist())
    assert decoded == text[:SEQ_LEN]


def test_text_directory_maps_unknown_test_chars(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("hello world " * 10, encoding="utf-8")
    (tmp_path / "test.txt").write_text("hello wörld " * 10, encoding="utf-8")
    data = load_dataset("text", str(tmp_path), model="lstm", seed=0)
    unknown = data.spec.num_classes - 1
    assert data.test_x[0, 7] == unknown
    assert int((data.test_x == unknown).sum()) > 0 and int((data.train_x == unknown).sum()) == 0


def test_text_bad_inputs(tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    with pytest.raises(DataError, match="at least"):
        load_dataset("text", str(short), model="lstm", seed=0)
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.txt"):
        load_dataset("text", str(empty), model="lstm", seed=0)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe" * 400)
    with pytest.raises(DataError, match="UTF-8"):
        load_dataset("text", str(binary), model="lstm", seed=0)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("text", str(tmp_path / "missing.txt"), model="lstm", seed=0)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(DataError, match=r"train\.txt"):
        load_dataset("text", str(folder), model="lstm", seed=0)


def test_a_test_subset_is_drawn_once_by_the_seed_and_kept_in_order() -> None:
    import torch

    from commsgd.tasks.dataset import Dataset, DatasetSpec

    n = 1000
    data = Dataset(
        DatasetSpec("toy", "vector", (1,), 10),
        torch.zeros(4, 1),
        torch.zeros(4, dtype=torch.long),
        torch.arange(n, dtype=torch.float32).unsqueeze(1),
        torch.arange(n) % 10,
    )
    a, b, c = data.with_test_subset(100, 3), data.with_test_subset(100, 3), data.with_test_subset(100, 4)
    kept = a.test_x.squeeze(1)
    assert a.num_test == 100 and torch.equal(kept, b.test_x.squeeze(1))  # same seed: same subset
    assert not torch.equal(kept, c.test_x.squeeze(1))
    assert torch.equal(kept, kept.sort().values) and kept.unique().numel() == 100
    assert torch.equal(a.test_y, kept.long() % 10)  # labels travel with their samples
    assert len(set((kept.long() % 10).tolist())) == 10  # drawn across the classes, not the first 100
    assert data.with_test_subset(n, 0) is data

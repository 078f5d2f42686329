"""The `imagefolder` data set: layout, decoding (JPEG and PNG, odd sizes), the uint8 cache, bad input.

Every folder is written here through Pillow (real JPEG and PNG encodings); a few tests read a handful of
images from ../shared/data/cifar10-jpeg when it is there. None needs the whole set.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from commsgd import cli, launch
from commsgd.errors import DataError
from commsgd.tasks import decode, imagefolder, load_dataset, write_fake_image_folder
from commsgd.tasks.imagefiles import scan_image_folder
from commsgd.tasks.transforms import CIFAR_STATS, IMAGENET_STATS, normalize

REAL_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"
ODD_SIZES = ((300, 200), (97, 131), (64, 64), (512, 256), (33, 45))


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache directory of this test's own (not created yet)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("COMMSGD_CACHE_DIR", str(path))
    return path


def _save(path: Path, pixels: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path)


def _cache_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


# ---------------------------------------------------------------- layout and decoding


def test_layout_classes_labels_and_skipped_files(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    exact: dict[str, np.ndarray] = {}
    for split in ("train", "val"):
        for name in ("zebra", "Ant", "bee"):  # sorted by name: Ant, bee, zebra
            for i in range(2):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                relative = f"{split}/{name}/{i}.png"
                _save(root / relative, pixels)
                exact[relative] = pixels
    _save(root / "train/bee/nested/deep.PNG", np.zeros((32, 32, 3), np.uint8))  # subfolders count
    (root / "train/zebra/README").write_text("not an image")
    (root / "train/zebra/.DS_Store").write_bytes(b"\0\1")
    (root / "train/.hidden").mkdir()  # hidden folders are no classes
    (root / "val/notes.txt").write_text("skipped")
    data = load_dataset("imagefolder", str(root), model="cnn7", seed=0)
    folder = scan_image_folder(str(root))
    assert folder.classes == ("Ant", "bee", "zebra") and folder.test_split == "val"
    assert data.spec.num_classes == 3 and data.spec.input_shape == (3, 28, 28)
    assert data.train_y.tolist() == [0, 0, 1, 1, 1, 2, 2] and data.test_y.tolist() == [0, 0, 1, 1, 2, 2]
    assert [f.path for f in folder.train][2:5] == [
        os.path.join("train", "bee", "0.png"),
        os.path.join("train", "bee", "1.png"),
        os.path.join("train", "bee", "nested", "deep.PNG"),
    ]
    for i, item in enumerate(folder.files):  # PNG is lossless: the stored pixels are the written ones
        if item.path in exact:
            stored = (data.train_x if i < 7 else data.test_x)[i if i < 7 else i - 7]
            assert torch.equal(stored, torch.from_numpy(exact[item.path]).permute(2, 0, 1)), item.path


def test_jpeg_grey_and_transparent_images_become_rgb(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "data"
    colour = np.full((32, 32, 3), (200, 30, 90), np.uint8)
    for split in ("train", "test"):
        _save(root / split / "a" / "rgb.jpg", colour)
        _save(root / split / "a" / "grey.png", np.full((32, 32), 77, np.uint8), "L")
        _save(root / split / "a" / "see-through.png", np.dstack([colour, np.full((32, 32), 128, np.uint8)]))
    data = load_dataset("imagefolder", str(root), model="vgg16", seed=0)
    assert data.train_x.shape == (3, 3, 32, 32) and data.train_x.dtype == torch.uint8
    grey, jpeg, rgba_stored = data.train_x  # sorted: grey.png, rgb.jpg, see-through.png
    assert (grey == 77).all()
    assert (jpeg.float().mean(dim=(1, 2)) - torch.tensor([200.0, 30.0, 90.0])).abs().max() < 4
    assert torch.equal(rgba_stored, torch.from_numpy(colour).permute(2, 0, 1))


def test_32x32_preprocessing_matches_the_cifar10_loader(tmp_path: Path, cache: Path) -> None:
    root = write_fake_image_folder(tmp_path / "data", per_class=(5, 3))
    for model, side, pad in (("cnn7", 28, 0), ("resnet20", 28, 0), ("vgg16", 32, 4), ("mlp", 32, 4)):
        data = load_dataset("imagefolder", str(root), model=model, seed=0)
        assert data.spec.input_shape == (3, side, side)
        train = data.train_transform
        assert (train.crop, train.pad, train.stats) == (side, pad, CIFAR_STATS)  # type: ignore[attr-defined]
        x, _ = data.train_batch(torch.arange(data.num_train), torch.Generator().manual_seed(0))
        assert x.shape == (data.num_train, 3, side, side)
        test_x, _ = next(data.test_batches(100))
        offset = (32 - side) // 2
        expected = normalize(data.test_x, CIFAR_STATS)[:, :, offset : offset + side, offset : offset + side]
        assert torch.allclose(test_x, expected)


def test_larger_images_are_stored_at_256_and_cut_to_224(tmp_path: Path, cache: Path) -> None:
    root = write_fake_image_folder(tmp_path / "data", per_class=(5, 2), sizes=ODD_SIZES, test_split="val")
    data = load_dataset("imagefolder", str(root), model="resnet50", seed=0)
    assert data.spec.input_shape == (3, 224, 224) and data.train_x.shape == (10, 3, 256, 256)
    x, _ = data.train_batch(torch.arange(10), torch.Generator().manual_seed(1))
    assert x.shape == (10, 3, 224, 224) and x.dtype == torch.float32 and torch.isfinite(x).all()
    test_x, _ = next(data.test_batches(4))
    expected = normalize(data.test_x, IMAGENET_STATS)[:, :, 16:240, 16:240]
    assert torch.allclose(test_x, expected)


def test_large_image_keeps_the_centre_square_of_the_shorter_side(tmp_path: Path, cache: Path) -> None:
    # 512x256 (width x height): red left quarter, green middle half, blue right quarter (PNG: exact)
    wide = np.zeros((256, 512, 3), np.uint8)
    wide[:, :128, 0] = 255
    wide[:, 128:384, 1] = 255
    wide[:, 384:, 2] = 255
    for split in ("train", "test"):
        _save(tmp_path / "data" / split / "c" / "wide.png", wide)
    stored = load_dataset("imagefolder", str(tmp_path / "data"), model="mlp", seed=0).train_x[0]
    assert stored.shape == (3, 256, 256)
    assert (stored[1] == 255).all() and (stored[0] == 0).all() and (stored[2] == 0).all()


def test_mixed_sizes_use_the_imagenet_way(tmp_path: Path, cache: Path) -> None:
    root = write_fake_image_folder(tmp_path / "data", per_class=(3, 2))
    _save(root / "test" / "dog" / "big.png", np.zeros((40, 40, 3), np.uint8))  # the last image decoded
    data = load_dataset("imagefolder", str(root), model="cnn7", seed=0)
    assert data.train_x.shape[2:] == (256, 256) and data.spec.input_shape == (3, 224, 224)


def test_pool_decoding_matches_decoding_in_process(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_fake_image_folder(tmp_path / "data", per_class=(20, 5), sizes=((32, 32),))
    paths = [f.path for f in scan_image_folder(str(root)).files]
    alone = np.concatenate(list(decode.decode_chunks(root, paths, None, workers=1)))
    monkeypatch.setattr(decode, "POOL_MIN_IMAGES", 0)
    pooled = np.concatenate(list(decode.decode_chunks(root, paths, None, workers=2)))
    assert alone.shape == (50, 3, 32, 32) and np.array_equal(alone, pooled)
    with pytest.raises(decode.MixedSizes):
        list(decode.decode_chunks(root, [*paths, _big_image(root)], None, workers=2))
    large = np.concatenate(list(decode.decode_chunks(root, paths[:6], 256, workers=2)))
    assert large.shape == (6, 3, 256, 256)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not a JPEG")  # an error in a pool worker reaches us
    with pytest.raises(DataError, match=r"cannot decode image .*broken\.jpg"):
        list(decode.decode_chunks(root, [*paths, "broken.jpg"], None, workers=2))


def _big_image(root: Path) -> str:
    _save(root / "extra.png", np.zeros((50, 60, 3), np.uint8))
    return "extra.png"


# ---------------------------------------------------------------- the cache


def test_second_load_reads_the_cache(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_fake_image_folder(tmp_path / "data")
    cold = load_dataset("imagefolder", str(root), model="cnn7", seed=0)
    names = _cache_files(cache)
    assert len(names) == 1 and names[0].startswith("imagefolder-v1-") and names[0].endswith(".npy")
    assert (cache / names[0]).stat().st_mode & 0o777 == 0o644  # readable by everyone sharing it

    def no_decoding(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(imagefolder, "decode_chunks", no_decoding)
    warm = load_dataset("imagefolder", str(root), model="cnn7", seed=0)
    assert torch.equal(cold.train_x, warm.train_x) and torch.equal(cold.test_x, warm.test_x)
    assert torch.equal(cold.train_y, warm.train_y)
    assert _cache_files(cache) == names  # no temp or lock file left


def test_a_changed_folder_is_decoded_again(tmp_path: Path, cache: Path) -> None:
    root = write_fake_image_folder(tmp_path / "data")
    first = load_dataset("imagefolder", str(root), model="cnn7", seed=0)
    target = root / "train" / "cat" / "0001.png"
    new = np.full((32, 32, 3), 9, np.uint8)
    _save(target, new)
    os.utime(target, ns=(1, 1))  # a different mtime even on coarse-clock file systems
    second = load_dataset("imagefolder", str(root), model="cnn7", seed=0)
    assert len(_cache_files(cache)) == 2
    assert not torch.equal(first.train_x, second.train_x)
    assert (second.train_x[1] == 9).all()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong-shape"])
def test_a_damaged_cache_is_decoded_again(tmp_path: Path, cache: Path, damage: str) -> None:
    root = write_fake_image_folder(tmp_path / "data")
    good = load_dataset("imagefolder", str(root), model="cnn7", seed=0)
    train_x, test_x = good.train_x.clone(), good.test_x.clone()
    path = cache / _cache_files(cache)[0]
    content = path.read_bytes()
    path.unlink()  # a new file: `good` still maps the old one (cutting a mapped file short is SIGBUS)
    if damage == "truncate":
        path.write_bytes(content[:200])
    elif damage == "garbage":
        path.write_bytes(b"not a numpy file at all")
    else:
        np.save(path, np.zeros((3, 3, 32, 32), np.uint8))
    assert imagefolder.read_image_cache(path, len(good.train_y) + len(good.test_y)) is None
    again = load_dataset("imagefolder", str(root), model="cnn7", seed=0)
    assert torch.equal(train_x, again.train_x) and torch.equal(test_x, again.test_x)
    assert imagefolder.read_image_cache(path, 12) is not None  # rewritten


def test_unwritable_cache_decodes_into_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("COMMSGD_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    root = write_fake_image_folder(tmp_path / "data")
    data = load_dataset("imagefolder", str(root), model="cnn7", seed=0)
    assert data.train_x.shape == (8, 3, 32, 32)
    assert "cannot write the image cache" in capfd.readouterr().err


def test_one_process_decodes_while_another_waits(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loader that finds the lock taken waits for the holder's cache file instead of decoding too."""
    root = write_fake_image_folder(tmp_path / "data")
    folder = scan_image_folder(str(root))
    reference = imagefolder._decode(folder, lambda side, blocks: np.concatenate(list(blocks)))
    path = imagefolder.image_cache_path(folder)
    assert path is not None
    decoded: list[int] = []
    real = imagefolder.decode_chunks
    monkeypatch.setattr(imagefolder, "decode_chunks", lambda *a, **k: decoded.append(1) or real(*a, **k))
    missed = threading.Event()
    real_read = imagefolder.read_image_cache

    def read(p: Path, count: int) -> np.ndarray | None:
        found = real_read(p, count)
        if found is None:
            missed.set()
        return found

    monkeypatch.setattr(imagefolder, "read_image_cache", read)
    result: list[np.ndarray] = []
    with imagefolder._exclusive(path):  # "another process" holds the lock while it decodes
        waiter = threading.Thread(target=lambda: result.append(imagefolder.load_image_array(folder)))
        waiter.start()
        assert missed.wait(60)
        time.sleep(0.5)  # the waiter is now blocked on the lock (without a lock it would decode now)
        np.save(path, reference)
    waiter.join(60)
    assert not waiter.is_alive() and decoded == []
    assert np.array_equal(result[0], reference)


# ---------------------------------------------------------------- bad input through `commsgd train`


@pytest.fixture()
def no_launch(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record instead of starting workers: these tests are about what happens before the launch."""
    calls: list[Any] = []
    monkeypatch.setattr(launch, "launch_local", lambda *args: calls.append(args) or 0)
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    return calls


def _train(data_dir: Path, out: Path) -> list[str]:
    return [
        "train", "--dataset", "imagefolder", "--model", "mlp", "--data-dir", str(data_dir), "--out", str(out),
        "data.batch_size=2", "--workers", "1", "--algorithm", "sgd",
    ]  # fmt: skip


def _no_train(root: Path) -> None:
    (root / "test" / "cat").mkdir(parents=True)


def _no_test(root: Path) -> None:
    write_fake_image_folder(root)
    os.rename(root / "test", root / "testing")


def _class_only_in_train(root: Path) -> None:
    write_fake_image_folder(root)
    _save(root / "train" / "emu" / "0.png", np.zeros((32, 32, 3), np.uint8))


def _class_only_in_test(root: Path) -> None:
    write_fake_image_folder(root, test_split="val")
    _save(root / "val" / "emu" / "0.png", np.zeros((32, 32, 3), np.uint8))


def _empty_class(root: Path) -> None:
    write_fake_image_folder(root)
    (root / "test" / "dog" / "0000.jpg").unlink()
    (root / "test" / "dog" / "0001.png").unlink()
    (root / "test" / "dog" / "README.txt").write_text("only this")


def _undecodable(root: Path) -> None:
    write_fake_image_folder(root)
    (root / "train" / "dog" / "0002.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")


def _truncated(root: Path) -> None:
    write_fake_image_folder(root, sizes=((64, 64),))
    path = root / "test" / "cat" / "0000.jpg"
    path.write_bytes(path.read_bytes()[:300])


def _no_images(root: Path) -> None:
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "train" / "README").write_text("nothing here")


def _image_outside_class(root: Path) -> None:
    write_fake_image_folder(root)
    _save(root / "train" / "stray.png", np.zeros((32, 32, 3), np.uint8))


BAD_LAYOUTS = {
    "missing": (lambda root: None, "does not exist", ""),
    "no-train": (_no_train, "no train/", ""),
    "no-test": (_no_test, "no test/ or val/", ""),
    "class-only-in-train": (_class_only_in_train, "has no counterpart", "train/emu"),
    "class-only-in-val": (_class_only_in_test, "has no counterpart", "val/emu"),
    "empty-class": (_empty_class, "holds no JPEG or PNG", "test/dog"),
    "undecodable": (_undecodable, "cannot decode image", "train/dog/0002.jpg"),
    "truncated": (_truncated, "cannot decode image", "test/cat/0000.jpg"),
    "no-images": (_no_images, "no class folders", "train"),
    "outside-class": (_image_outside_class, "not in a class folder", "train/stray.png"),
}


@pytest.mark.parametrize("case", sorted(BAD_LAYOUTS))
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    case: str,
    tmp_path: Path,
    cache: Path,
    capsys: pytest.CaptureFixture[str],
    no_launch: list[Any],
) -> None:
    make, message, named = BAD_LAYOUTS[case]
    root = tmp_path / "data"
    make(root)
    out = tmp_path / "out"
    code = cli.main(_train(root, out))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("commsgd: error: "), err
    assert message in lines[0] and str(root / named).rstrip("/") in lines[0], lines[0]
    assert not out.exists() and no_launch == []
    assert _cache_files(cache) == []  # no cache file, temp file or lock left behind


def test_imagefolder_without_a_data_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["train", "--dataset", "imagefolder", "--out", str(tmp_path / "out")])
    assert code == 2 and "imagefolder needs data_dir" in capsys.readouterr().err


def test_load_refuses_bad_layout_directly(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("imagefolder", str(tmp_path / "nowhere"), model="cnn7", seed=0)


# ---------------------------------------------------------------- a real run, and the real images


@pytest.mark.multiprocess
def test_two_workers_train_on_an_image_folder(tmp_path: Path, cache: Path) -> None:
    import json

    root = write_fake_image_folder(tmp_path / "data", per_class=(16, 4), test_split="val")
    out = tmp_path / "run"
    argv = ["train", "--dataset", "imagefolder", "--data-dir", str(root), "--model", "cnn7", "--workers", "2"]
    assert cli.main([*argv, "--steps", "6", "--out", str(out), "data.batch_size=4", "progress=false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "imagefolder" and summary["steps"] == [6, 6]
    assert all(t > 0 for t in summary["data_time_s"])
    assert all(0 < share < 1 for share in summary["data_share"])
    assert len(_cache_files(cache)) == 1  # decoded once by the launcher, read by both workers


@pytest.mark.skipif(not REAL_CIFAR.is_dir(), reason=f"{REAL_CIFAR} is not there")
def test_a_few_real_cifar10_jpegs(tmp_path: Path, cache: Path) -> None:
    classes = sorted(p.name for p in (REAL_CIFAR / "train").iterdir())
    assert classes == [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    root = tmp_path / "data"
    for split in ("train", "test"):
        for name in classes[:3]:
            (root / split / name).mkdir(parents=True)
            for source in sorted((REAL_CIFAR / split / name).iterdir())[:3]:
                (root / split / name / source.name).symlink_to(source)
    data = load_dataset("imagefolder", str(root), model="cnn7", seed=0)
    assert data.train_x.shape == (9, 3, 32, 32) and data.test_x.shape == (9, 3, 32, 32)
    assert data.train_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    first = sorted((REAL_CIFAR / "train" / classes[0]).iterdir())[0]
    with Image.open(first) as image:
        assert torch.equal(data.train_x[0], torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1))
    assert data.train_x.float().std() > 20  # real photographs, not a flat colour

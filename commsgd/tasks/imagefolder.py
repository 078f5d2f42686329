"""`imagefolder`: a class-per-folder image set (ImageNet's layout), decoded once and cached as uint8.

The decoded images of both splits are one ``.npy`` file in the cache directory (see `cache_dir`),
named by a fingerprint of every file's path, size and mtime (and the Pillow version), so any change
to the folder means a new decode. The file is written atomically while an exclusive lock beside it
makes other processes wait for it instead of decoding too; later runs memory-map it, so the second
start on a folder takes seconds and the workers of one machine share its pages. The data folder
itself is only read.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
import torch

from commsgd.errors import say
from commsgd.files import write_atomically
from commsgd.tasks.bundled import _safe_version, cache_dir
from commsgd.tasks.cifar import cifar_transforms
from commsgd.tasks.dataset import Dataset, DatasetSpec, TestTransform, TrainTransform
from commsgd.tasks.decode import SMALL_SIDE, STORED_SIDE, MixedSizes, decode_chunks
from commsgd.tasks.imagefiles import TRAIN_SPLIT, ImageFolder, scan_image_folder
from commsgd.tasks.transforms import IMAGENET_STATS, CenterCropTransform, ResizedCropFlipTransform

CACHE_FORMAT = 1  # bump when the stored arrays or their preparation change
IMAGENET_CROP = 224

T = TypeVar("T")


def image_cache_path(folder: ImageFolder) -> Path | None:
    """The cache file for `folder`'s current files, or None when there is no cache directory."""
    key = folder.fingerprint(
        f"format={CACHE_FORMAT}", f"pillow={_safe_version('pillow')}", f"side={STORED_SIDE}"
    )
    try:
        return cache_dir() / f"imagefolder-v{CACHE_FORMAT}-{key[:40]}.npy"
    except RuntimeError:  # Path.home() when no home directory can be found
        return None


def read_image_cache(path: Path, count: int) -> np.ndarray | None:
    """The cached images (count, 3, S, S) memory-mapped read-only, or None if unusable.

    Read-only and shared, not copy-on-write: a private writable mapping is charged against memory, so
    a cache larger than RAM (ImageNet) could not be mapped. A cache must never fail a run: a missing,
    truncated or foreign file means "not cached".
    """
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:
        return None
    if not isinstance(images, np.ndarray):  # an .npz archive under this name
        with contextlib.suppress(Exception):
            images.close()
        return None
    shape = images.shape
    if images.dtype != np.uint8 or len(shape) != 4 or shape[:2] != (count, 3):
        return None
    if shape[2] != shape[3] or shape[2] not in (SMALL_SIDE, STORED_SIDE):
        return None
    return images


def _write_npy(handle: BinaryIO, count: int, side: int, blocks: Iterator[np.ndarray]) -> None:
    """Stream `blocks` into `handle` as one .npy array (count, 3, side, side) of uint8."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
    np.lib.format.write_array_header_2_0(handle, {**header, "shape": (count, 3, side, side)})
    written = 0
    for block in blocks:
        handle.write(block.tobytes())
        written += len(block)
    if written != count:
        raise RuntimeError(f"decoded {written} images, expected {count}")


def _fill(count: int, side: int, blocks: Iterator[np.ndarray]) -> np.ndarray:
    """Collect `blocks` into one in-memory array (count, 3, side, side)."""
    images = np.empty((count, 3, side, side), dtype=np.uint8)
    start = 0
    for block in blocks:
        images[start : start + len(block)] = block
        start += len(block)
    return images


def _decode(folder: ImageFolder, consume: Callable[[int, Iterator[np.ndarray]], T]) -> T:
    """Decode every image, 32x32 as they are if all are that size, else the ImageNet way."""
    paths = [f.path for f in folder.files]
    try:
        return consume(SMALL_SIDE, decode_chunks(folder.root, paths, None))
    except MixedSizes:
        return consume(STORED_SIDE, decode_chunks(folder.root, paths, STORED_SIDE))


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside `path`, so that one process decodes while the others wait.

    Where no lock can be taken (no fcntl, a file system without locks) every process decodes for
    itself; the atomic write keeps that safe. The lock file is removed on the way out.
    """
    lock = path.with_name(f".{path.name}.lock")
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"commsgd: waiting for another process to decode the images into {path}", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def load_image_array(folder: ImageFolder) -> np.ndarray:
    """All decoded images of `folder` (train, then test): from the cache, else decoded and cached."""
    count = len(folder.files)
    path = image_cache_path(folder)
    if path is not None:
        cached = read_image_cache(path, count)
        if cached is not None:
            return cached
        with _exclusive(path):
            cached = read_image_cache(path, count)
            if cached is not None:
                return cached
            # on stdout: stderr carries only warnings and the one-line error of bad input
            print(f"commsgd: decoding {count} images of {folder.root} once, into {path}", flush=True)
            try:
                _decode(
                    folder,
                    lambda side, blocks: write_atomically(
                        path, lambda handle: _write_npy(handle, count, side, blocks), mode=0o644
                    ),
                )
            except OSError as exc:  # read-only or full cache disk: decode into memory instead
                say(
                    f"commsgd: warning: cannot write the image cache {path} ({exc.strerror or exc}); "
                    "decoding into memory"
                )
            else:
                cached = read_image_cache(path, count)
                if cached is not None:
                    return cached
    return _decode(folder, lambda side, blocks: _fill(count, side, blocks))


def image_transforms(side: int, model: str) -> tuple[int, TrainTransform, TestTransform]:
    """Input size and transforms for stored images of `side` pixels (LSGD supplement sec. 9.1).

    32x32 (CIFAR): as `cifar_transforms`. Larger (ImageNet, stored at 256x256): random crops of
    8-100 % of the area, aspect 3/4-4/3, resized to 224x224 and flipped; the centre 224x224 at test
    (the stored image is already the shorter side resized to 256); ImageNet mean and std.
    """
    if side == SMALL_SIDE:
        return cifar_transforms(model)
    return (
        IMAGENET_CROP,
        ResizedCropFlipTransform(IMAGENET_CROP),
        CenterCropTransform(IMAGENET_CROP, IMAGENET_STATS),
    )


def load_imagefolder(data_dir: str, model: str) -> Dataset:
    """The image folder at `data_dir` as a Dataset of uint8 images with the paper's preprocessing."""
    folder = scan_image_folder(data_dir)
    array = load_image_array(folder)
    with warnings.catch_warnings():  # the cache is mapped read-only: samples are gathered, never written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        images = torch.from_numpy(array)
    crop, train_transform, test_transform = image_transforms(int(images.shape[2]), model)
    n_train = len(folder.train)
    spec = DatasetSpec("imagefolder", "image", (3, crop, crop), len(folder.classes))
    return Dataset(
        spec,
        images[:n_train],
        torch.tensor(folder.train_labels, dtype=torch.int64),
        images[n_train:],
        torch.tensor(folder.test_labels, dtype=torch.int64),
        train_transform,
        test_transform,
    )


def write_fake_image_folder(
    directory: str | Path,
    classes: tuple[str, ...] = ("cat", "dog"),
    per_class: tuple[int, int] = (4, 2),
    sizes: tuple[tuple[int, int], ...] = ((32, 32),),
    test_split: str = "test",
    seed: int = 0,
) -> Path:
    """Write a small image folder (`per_class` = train, test images per class); returns its root.

    Images alternate between JPEG and PNG and cycle through `sizes` (width, height); each is noise
    around a colour of its class, so a model can learn something from it. Used by tests and docs.
    """
    from PIL import Image

    root = Path(directory)
    rng = np.random.default_rng(seed)
    index = 0
    for split, count in ((TRAIN_SPLIT, per_class[0]), (test_split, per_class[1])):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array([40.0, 128.0, 215.0]) + 160.0 * label / max(len(classes) - 1, 1) - 80.0
            for i in range(count):
                width, height = sizes[index % len(sizes)]
                pixels = np.clip(colour + rng.normal(0.0, 30.0, size=(height, width, 3)), 0, 255)
                suffix = ".png" if index % 2 else ".jpg"
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:04d}{suffix}")
                index += 1
    return root

"""Decoding JPEG and PNG files into uint8 arrays (3, S, S) with Pillow, on every core.

Two ways to store an image, chosen for the whole set: 32x32 images (CIFAR) are kept as they are;
if any image has another size, every image is stored the ImageNet way, its shorter side resized to
`STORED_SIDE` (256) and the centred 256x256 square kept, from which training crops and the 224x224
test centre are cut. The caller first tries the 32x32 way; the first other size ends it with
`MixedSizes`, and it decodes again the other way (ImageNet folders stop at their first image).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from commsgd.errors import DataError

SMALL_SIDE = 32
STORED_SIDE = 256
POOL_MIN_IMAGES = 1024  # fewer images are decoded in this process: starting a pool would cost more
LARGE_CHUNK = 32  # 256x256 images per pool task (6 MB)


class MixedSizes(Exception):
    """Not every image is 32x32: the set must be stored the ImageNet way."""


def decode_image(path: Path, side: int | None) -> np.ndarray | None:
    """The RGB image at `path` as uint8 (3, S, S); None when `side` is None and it is not 32x32.

    `side=None` keeps a 32x32 image as it is; a number resizes the shorter side to `side` (antialiased
    bilinear; JPEGs are first decoded at a reduced scale where that still leaves `side` pixels) and
    keeps the centred square. Any decoding problem is a one-line DataError naming the file.
    """
    from PIL import Image

    try:
        with Image.open(path, formats=("JPEG", "PNG")) as image:  # reads the header only
            if side is None:
                if image.size != (SMALL_SIDE, SMALL_SIDE):
                    return None
                rgb = image.convert("RGB")
            else:
                image.draft("RGB", (side, side))
                rgb = image.convert("RGB")
                width, height = rgb.size
                short = min(width, height)
                left, top = (width - short) / 2, (height - short) / 2
                box = (left, top, left + short, top + short)
                rgb = rgb.resize((side, side), Image.Resampling.BILINEAR, box=box)
            pixels = np.asarray(rgb, dtype=np.uint8)
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise DataError(f"imagefolder: cannot decode image {path}: {reason}") from None
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _decode_chunk(task: tuple[str, Sequence[str], int | None]) -> np.ndarray | None:
    """Decode the files of one task into (n, 3, S, S); None as soon as one is not 32x32 (side None)."""
    root, paths, side = task
    images = []
    for path in paths:
        image = decode_image(Path(root) / path, side)
        if image is None:
            return None
        images.append(image)
    return np.stack(images)


def usable_cores() -> int:
    """The number of cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _pool_context() -> multiprocessing.context.BaseContext | None:
    """Fork where the platform has it: the children need no fresh imports (torch takes seconds)."""
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return None


def decode_chunks(
    root: Path, paths: Sequence[str], side: int | None, workers: int | None = None
) -> Iterator[np.ndarray]:
    """Decode `paths` (relative to `root`) in order, yielding uint8 blocks (n, 3, S, S).

    Uses a process pool of `workers` (default: every usable core) unless there are only a few images.
    Raises MixedSizes when `side` is None and some image is not 32x32.
    """
    workers = usable_cores() if workers is None else workers
    # 32x32: about 8 tasks per worker, so that a slow one does not hold up the rest
    chunk = max(16, min(512, len(paths) // (8 * workers))) if side is None else LARGE_CHUNK
    tasks = [(str(root), paths[i : i + chunk], side) for i in range(0, len(paths), chunk)]
    if workers <= 1 or len(paths) < POOL_MIN_IMAGES:
        for task in tasks:
            block = _decode_chunk(task)
            if block is None:
                raise MixedSizes
            yield block
        return
    executor = ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=_pool_context())
    try:
        for block in executor.map(_decode_chunk, tasks):
            if block is None:
                raise MixedSizes
            yield block
    finally:  # on an error (or MixedSizes) drop the queued tasks instead of decoding them all
        executor.shutdown(wait=True, cancel_futures=True)

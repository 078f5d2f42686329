"""The file list of an image-folder data set: `train/<class>/<image>` and `test/` (or `val/`) alike.

This is the layout of ImageNet (ILSVRC 2012) and of most image sets on disk. Classes are the folder
names, sorted; images are JPEG and PNG files (found by suffix, in class folders and their subfolders);
other files (README, .DS_Store) and hidden entries are skipped. Every layout problem is a one-line
`DataError` naming the path, raised before anything is decoded or written.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from commsgd.errors import DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
TRAIN_SPLIT = "train"
TEST_SPLITS = ("test", "val")  # the first one present is the test split
LAYOUT = "train/<class>/<image> and test/<class>/<image> (or val/), JPEG or PNG"


@dataclass(frozen=True)
class ImageFile:
    """One image: its path relative to the data directory, size and modification time."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class ImageFolder:
    """The images of both splits, in a fixed order: by class, then by path."""

    root: Path
    classes: tuple[str, ...]
    test_split: str  # "test" or "val"
    train: tuple[ImageFile, ...]
    train_labels: tuple[int, ...]
    test: tuple[ImageFile, ...]
    test_labels: tuple[int, ...]

    @property
    def files(self) -> tuple[ImageFile, ...]:
        """Train images, then test images: the order of the decoded array."""
        return self.train + self.test

    def fingerprint(self, *extra: str) -> str:
        """A hex digest of every file's path, size and mtime (and `extra`): changes when any file does."""
        digest = hashlib.sha256()
        for part in extra:
            digest.update(part.encode() + b"\0")
        for split, files in ((TRAIN_SPLIT, self.train), (self.test_split, self.test)):
            digest.update(f"{split}\0{len(files)}\0".encode())
            for item in files:
                digest.update(f"{item.path}\0{item.size}\0{item.mtime_ns}\0".encode())
        return digest.hexdigest()


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    """The visible entries of `folder`, sorted by name; an unreadable folder is a DataError."""
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"imagefolder: cannot read {folder}: {exc.strerror or exc}") from None


def _is_image(entry: os.DirEntry[str]) -> bool:
    return os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES


def _is_dir(entry: os.DirEntry[str], follow_symlinks: bool = True) -> bool:
    try:
        return entry.is_dir(follow_symlinks=follow_symlinks)
    except OSError:
        return False


def _images_under(folder: Path, root: Path) -> Iterator[ImageFile]:
    """Every image file below `folder` (depth first, sorted), with paths relative to `root`.

    Links to folders are followed for class folders only, so a link loop below one cannot recurse.
    """
    for entry in _entries(folder):
        if _is_dir(entry, follow_symlinks=False):
            yield from _images_under(Path(entry.path), root)
        elif _is_image(entry):
            try:
                info = entry.stat()
            except OSError as exc:
                raise DataError(f"imagefolder: cannot read {entry.path}: {exc.strerror or exc}") from None
            yield ImageFile(os.path.relpath(entry.path, root), info.st_size, info.st_mtime_ns)


def _scan_split(root: Path, split: str) -> dict[str, list[ImageFile]]:
    """Class name -> its images, for one split; images outside a class folder are refused."""
    folder = root / split
    classes: dict[str, list[ImageFile]] = {}
    for entry in _entries(folder):
        if _is_dir(entry):
            classes[entry.name] = list(_images_under(Path(entry.path), root))
        elif _is_image(entry):
            raise DataError(
                f"imagefolder: {entry.path} is not in a class folder; expected {split}/<class>/<image>"
            )
    if not classes:
        raise DataError(f"imagefolder: {folder} has no class folders (and so no images); expected {LAYOUT}")
    for name, files in classes.items():
        if not files:
            raise DataError(f"imagefolder: class folder {folder / name} holds no JPEG or PNG images")
    return classes


def scan_image_folder(data_dir: str) -> ImageFolder:
    """List and check the image folder at `data_dir`; DataError (one line, naming the path) if it is bad."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"imagefolder data directory {root} does not exist; expected {root}/{LAYOUT}")
    if not (root / TRAIN_SPLIT).is_dir():
        raise DataError(f"imagefolder: {root} has no {TRAIN_SPLIT}/ folder; expected {root}/{LAYOUT}")
    test_split = next((s for s in TEST_SPLITS if (root / s).is_dir()), None)
    if test_split is None:
        raise DataError(f"imagefolder: {root} has no test/ or val/ folder; expected {root}/{LAYOUT}")
    train = _scan_split(root, TRAIN_SPLIT)
    test = _scan_split(root, test_split)
    for have, lack in ((TRAIN_SPLIT, test_split), (test_split, TRAIN_SPLIT)):
        mine, theirs = (train, test) if have == TRAIN_SPLIT else (test, train)
        missing = sorted(set(mine) - set(theirs))
        if missing:
            raise DataError(
                f"imagefolder: class folder {root / have / missing[0]} has no counterpart "
                f"{root / lack / missing[0]} ({len(missing)} such classes); both splits need the same classes"
            )
    classes = tuple(sorted(train))
    train_files = [(f, label) for label, name in enumerate(classes) for f in train[name]]
    test_files = [(f, label) for label, name in enumerate(classes) for f in test[name]]
    return ImageFolder(
        root,
        classes,
        test_split,
        tuple(f for f, _ in train_files),
        tuple(label for _, label in train_files),
        tuple(f for f, _ in test_files),
        tuple(label for _, label in test_files),
    )

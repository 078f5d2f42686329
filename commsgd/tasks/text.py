"""Character-level language modelling: a user's UTF-8 text, or a small generated corpus for offline use.

Samples are non-overlapping windows of `SEQ_LEN` characters; the target is the window shifted by one.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from commsgd.errors import DataError
from commsgd.tasks.dataset import Dataset, DatasetSpec

SEQ_LEN = 32
HELD_OUT_FRACTION = 0.1
GENERATED_SEED = 7
GENERATED_SENTENCES = 1000

_SUBJECTS = (
    "the cat", "a dog", "my neighbour", "the old sailor", "every student", "the robot", "a small bird",
    "the teacher", "our baker", "the tired runner",
)  # fmt: skip
_VERBS = ("sees", "likes", "follows", "paints", "finds", "remembers", "carries", "greets", "counts", "hears")
_OBJECTS = (
    "the moon", "a red ball", "the garden", "an apple", "the river", "a quiet song", "the map", "two stones",
    "the letters", "a blue kite",
)  # fmt: skip
_ENDINGS = ("", " today", " at night", " in the rain", " near the house", " with great care", " again")


def generated_corpus(sentences: int = GENERATED_SENTENCES) -> str:
    """Deterministic sentences from a tiny grammar (about 35 KB by default), so demos need no download."""
    rng = random.Random(GENERATED_SEED)
    lines = []
    for _ in range(sentences):
        words = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}"
        lines.append(words[0].upper() + words[1:] + rng.choice((".", ".", "!", "?")))
    return " ".join(lines) + "\n"


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"text data {path} is not valid UTF-8 (byte {exc.start})") from exc
    except OSError as exc:
        raise DataError(f"cannot read text data {path}: {exc.strerror}") from exc


def read_texts(data_dir: str) -> tuple[str, str, str]:
    """Return (train text, test text, source) for a file or a folder with train.txt and maybe test.txt."""
    path = Path(data_dir)
    if path.is_dir():
        train_path = path / "train.txt"
        if not train_path.is_file():
            raise DataError(f"text data directory {path} has no train.txt (optional test.txt beside it)")
        test_path = path / "test.txt"
        if test_path.is_file():
            return _read(train_path), _read(test_path), str(path)
        source = train_path
    elif path.is_file():
        source = path
    else:
        raise DataError(f"text data {path} does not exist; expected a UTF-8 file or a folder with train.txt")
    text = _read(source)
    cut = int(len(text) * (1 - HELD_OUT_FRACTION))
    return text[:cut], text[cut:], str(source)


def _windows(ids: Tensor) -> tuple[Tensor, Tensor]:
    """Cut ids into non-overlapping (x, y) windows, y being x shifted one character ahead."""
    count = (ids.numel() - 1) // SEQ_LEN
    x = ids[: count * SEQ_LEN].view(count, SEQ_LEN)
    y = ids[1 : count * SEQ_LEN + 1].view(count, SEQ_LEN)
    return x, y


def encode(text: str, vocab: dict[str, int], unknown: int) -> Tensor:
    """Map characters to int64 ids, characters outside `vocab` to `unknown`."""
    return torch.from_numpy(
        np.fromiter((vocab.get(c, unknown) for c in text), dtype=np.int64, count=len(text))
    )


def load_text_dataset(data_dir: str | None) -> Dataset:
    """Build the char-level set; vocabulary: sorted training characters, then one id for unknown ones."""
    if data_dir is None:
        corpus = generated_corpus()
        cut = int(len(corpus) * (1 - HELD_OUT_FRACTION))
        train_text, test_text, source = corpus[:cut], corpus[cut:], "generated corpus"
    else:
        train_text, test_text, source = read_texts(data_dir)
    for part, text in (("training", train_text), ("test", test_text)):
        if len(text) < SEQ_LEN + 1:
            raise DataError(
                f"text data {source}: {part} part has {len(text)} characters, needs at least {SEQ_LEN + 1}"
                " (a single file gives its last 10% to the test part)"
            )
    vocab = {c: i for i, c in enumerate(sorted(set(train_text)))}
    unknown = len(vocab)
    train_x, train_y = _windows(encode(train_text, vocab, unknown))
    test_x, test_y = _windows(encode(test_text, vocab, unknown))
    spec = DatasetSpec("text", "text", (SEQ_LEN,), len(vocab) + 1)
    return Dataset(spec, train_x, train_y, test_x, test_y)

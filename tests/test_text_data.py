"""Character-level text (the stand-in for the LSGD rebuttal's LSTM language model): tinyshakespeare,
the held-out tail as test split, and test loss reported as bits per character and perplexity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from commsgd.cli import main
from commsgd.metrics import summary_table
from commsgd.tasks import DatasetSpec, derived_metrics, load_dataset
from commsgd.tasks.text import HELD_OUT_FRACTION, SEQ_LEN, generated_corpus

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def test_bits_per_character_and_perplexity_of_a_text_loss() -> None:
    text = DatasetSpec("text", "text", (SEQ_LEN,), 66)
    extra = derived_metrics(text, 1.5)
    assert extra["test_bits_per_char"] == pytest.approx(1.5 / math.log(2))
    assert extra["test_perplexity"] == pytest.approx(math.exp(1.5))
    assert derived_metrics(DatasetSpec("digits", "image", (1, 8, 8), 10), 1.5) == {}
    assert math.isfinite(derived_metrics(text, 1e6)["test_perplexity"])  # a diverged run still reports


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is not there")
def test_tinyshakespeare_has_its_tail_as_test_split() -> None:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    data = load_dataset("text", str(SHAKESPEARE), model="lstm", seed=0)
    cut = int(len(text) * (1 - HELD_OUT_FRACTION))
    vocab = sorted(set(text[:cut]))
    assert data.spec.kind == "text" and data.spec.num_classes == len(vocab) + 1  # + one unknown id
    assert data.num_train == (cut - 1) // SEQ_LEN and data.num_test == (len(text) - cut - 1) // SEQ_LEN
    decode = "".join
    assert decode(vocab[i] for i in data.test_x[0].tolist()) == text[cut : cut + SEQ_LEN]
    last = data.num_train - 1
    assert (
        decode(vocab[i] for i in data.train_x[last].tolist()) == text[last * SEQ_LEN : (last + 1) * SEQ_LEN]
    )


@pytest.mark.multiprocess
def test_lstm_run_reports_bits_per_character(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "corpus.txt"
    if SHAKESPEARE.is_file():
        source.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    else:
        source.write_text(generated_corpus(), encoding="utf-8")
    out = tmp_path / "run"
    argv = ["train", "--dataset", "text", "--data-dir", str(source), "--model", "lstm", "--workers", "2"]
    assert main([*argv, "--steps", "4", "--out", str(out), "progress=false", "data.batch_size=8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_bits_per_char"] == pytest.approx(summary["test_loss"] / math.log(2))
    assert summary["test_perplexity"] == pytest.approx(math.exp(summary["test_loss"]))
    assert "test bits per character" in capfd.readouterr().out
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert all("test_bits_per_char" in record for record in evals)
    assert "test bits per character" in summary_table(summary)

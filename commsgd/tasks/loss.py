"""The objective every task shares: mean cross-entropy, plus the error count used for test error."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from commsgd.tasks.dataset import DatasetSpec


def loss_and_errors(output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy and the number of wrong argmax predictions (an int64 scalar tensor).

    Text output (B, L, V) with target (B, L) is scored per token, so the error rate's denominator is
    `target.numel()` for every kind of task.
    """
    if output.dim() == 3:
        output = output.reshape(-1, output.shape[-1])
        target = target.reshape(-1)
    loss = F.cross_entropy(output, target)
    errors = (output.detach().argmax(dim=1) != target).sum()
    return loss, errors


def derived_metrics(spec: DatasetSpec, test_loss: float) -> dict[str, float]:
    """Extra scores of a test loss: bits per character and perplexity for character-level text.

    The loss is the mean cross-entropy in nats per character, so bits per character = loss / ln 2 and
    perplexity = exp(loss). Other kinds of task get none.
    """
    if spec.kind != "text":
        return {}
    return {"test_bits_per_char": test_loss / math.log(2), "test_perplexity": math.exp(min(test_loss, 700.0))}

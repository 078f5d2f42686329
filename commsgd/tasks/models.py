"""`build_model`: model names, which data set kinds they fit, and the small dense and recurrent models.

Weights come from PyTorch's default initialisers, so a model is reproducible given the global torch seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor, nn

from commsgd.errors import ConfigError
from commsgd.tasks.convnets import ResNet20, ResNet50, cnn7, cnn_small, vgg16
from commsgd.tasks.dataset import DatasetSpec
from commsgd.tasks.user import build_user_model, is_user_spec

HIDDEN = 128


def mlp(input_shape: tuple[int, ...], num_classes: int, activation: type[nn.Module] = nn.ReLU) -> nn.Module:
    """Flatten, two hidden layers of 128 units, linear output."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), HIDDEN),
        activation(),
        nn.Linear(HIDDEN, HIDDEN),
        activation(),
        nn.Linear(HIDDEN, num_classes),
    )


def sigmoid_mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The MLP with sigmoid activations: the non-convex task of the QuanTimed-DSGD paper."""
    return mlp(input_shape, num_classes, nn.Sigmoid)


def logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression (one linear layer; softmax lives in the loss): a convex task."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


class CharLSTM(nn.Module):
    """Character language model: Embedding(vocab, 64), 2-layer LSTM of 128 units, linear to vocab.

    Input (B, L) int64 ids, output (B, L, vocab) logits for the next character at every position.
    """

    def __init__(self, vocab_size: int, embed: int = 64, hidden: int = HIDDEN, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.head(out)


def lstm(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The character LSTM; `num_classes` is the vocabulary size."""
    return CharLSTM(num_classes)


def resnet20(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """ResNet-20 for CIFAR-style images."""
    return ResNet20(input_shape[0], num_classes)


def resnet50(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """ResNet-50 for ImageNet-style images (224x224 in the paper's setting)."""
    return ResNet50(input_shape[0], num_classes)


_BUILDERS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "mlp": mlp,
    "sigmoid_mlp": sigmoid_mlp,
    "logreg": logreg,
    "cnn_small": cnn_small,
    "cnn7": cnn7,
    "resnet20": resnet20,
    "vgg16": vgg16,
    "resnet50": resnet50,
    "lstm": lstm,
}
MODELS = tuple(_BUILDERS)
_DENSE = ("mlp", "sigmoid_mlp", "logreg")
COMPATIBLE: dict[str, tuple[str, ...]] = {
    "image": (*_DENSE, "cnn_small", "cnn7", "resnet20", "vgg16", "resnet50"),
    "vector": _DENSE,
    "text": ("lstm",),
}


def check_model_fits(name: str, spec: DatasetSpec) -> None:
    """ConfigError if model `name` is unknown or does not fit the data set kind of `spec`.

    The user's own builder (``package.module:function``) is imported and called to find out."""
    if is_user_spec(name):
        build_user_model(name, spec)
        return
    if name not in _BUILDERS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    fits = COMPATIBLE[spec.kind]
    if name not in fits:
        raise ConfigError(
            f"model {name!r} does not fit {spec.kind} data set {spec.name!r}; use one of {', '.join(fits)}"
        )


def build_model(name: str, spec: DatasetSpec) -> nn.Module:
    """Build model `name` sized for `spec`; ConfigError if unknown or unfit for the data set kind."""
    if is_user_spec(name):
        return build_user_model(name, spec)
    check_model_fits(name, spec)
    return _BUILDERS[name](spec.input_shape, spec.num_classes)

"""Convolutional image classifiers: a small CNN for digits, the CIFAR models of the papers we reproduce,
and the ImageNet ResNet-50 of the LSGD paper's ImageNet runs (sec. 9, Table 5).

Every model takes (B, C, H, W) float input and returns (B, classes) logits; sizes after the conv
stack are found by a dummy forward or adaptive pooling, so 8x8, 28x28 and 32x32 inputs all work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def flat_size(features: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Number of features `features` outputs per sample, found by running it on one zero input."""
    with torch.no_grad():
        return int(features(torch.zeros(1, *input_shape)).numel())


def cnn_small(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two 3x3 conv layers and a linear head; sized for 8x8 digits (about 10k parameters there)."""
    features = nn.Sequential(
        nn.Conv2d(input_shape[0], 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    return nn.Sequential(features, nn.Linear(flat_size(features, input_shape), num_classes))


def cnn7(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The 7-layer CNN of EASGD (Zhang, Choromanska, LeCun 2015, sec. 5.1) for 3x28x28 CIFAR crops.

    Convs use 'same' padding and pools pad by one, giving 64x7x7 features for 28x28 input.
    """
    features = nn.Sequential(
        nn.Conv2d(input_shape[0], 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(64, 128, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(128, 64, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
    )
    return nn.Sequential(
        features,
        nn.Linear(flat_size(features, input_shape), 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a parameter-free (option A) shortcut: subsample, zero-pad channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.extra_channels:
            half = self.extra_channels // 2
            shortcut = F.pad(shortcut, (0, 0, 0, 0, half, self.extra_channels - half))
        return F.relu(out + shortcut)


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016): 3 stages of 3 basic blocks, 16/32/64 channels, ~0.27M parameters."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        channels = 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(BasicBlock(channels, width, stride if i == 0 else 1))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


def vgg16(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """CIFAR VGG16 with batch norm (13 convs) and a 512-512-classes head.

    Pools use ceil mode so 28x28 input still reaches 1x1 (28-14-7-4-2-1) instead of vanishing,
    and adaptive pooling feeds the head whatever spatial size is left.
    """
    layers: list[nn.Module] = []
    channels = input_shape[0]
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
        else:
            width = int(item)
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
    return nn.Sequential(
        *layers,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (with the stride), 1x1 expand to 4x `width`; a projection shortcut if shapes change."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


RESNET50_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, stride)


class ResNet50(nn.Module):
    """ImageNet ResNet-50 (He et al. 2016, the stride in the 3x3 conv): 25.56M parameters for 1000 classes.

    A 7x7/2 stem and 3x3/2 max pool, four stages of bottleneck blocks, global average pooling and a
    linear head. Convolutions start from He (fan-out) initialisation as in the paper.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        blocks: list[nn.Module] = []
        channels = 64
        for width, count, stride in RESNET50_STAGES:
            for i in range(count):
                blocks.append(Bottleneck(channels, width, stride if i == 0 else 1))
                channels = width * Bottleneck.expansion
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))

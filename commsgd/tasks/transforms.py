"""CIFAR-10 batch transforms: normalisation, random crop and horizontal flip, vectorised over the batch.

Preprocessing follows the LSGD paper. Transforms are frozen dataclasses so a `Dataset` pickles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


def normalize_cifar(x: Tensor) -> Tensor:
    """Turn uint8 images (B, 3, H, W) into float32 normalised with the CIFAR-10 channel mean and std."""
    mean = torch.tensor(CIFAR_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.to(torch.float32) / 255.0 - mean) / std


def random_crop_flip(images: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """Cut a random `size` x `size` window from each image and mirror it horizontally with p=0.5.

    One gather over flattened pixels does crop and flip for the whole batch: a flipped sample simply
    reads its window's columns right to left.
    """
    batch, channels, height, width = images.shape
    top = torch.randint(0, height - size + 1, (batch,), generator=generator)
    left = torch.randint(0, width - size + 1, (batch,), generator=generator)
    flip = torch.rand(batch, generator=generator) < 0.5
    steps = torch.arange(size)
    rows = top[:, None] + steps  # (B, size)
    cols = left[:, None] + torch.where(flip[:, None], size - 1 - steps, steps)  # (B, size)
    pixels = (rows[:, :, None] * width + cols[:, None, :]).reshape(batch, 1, size * size)
    flat = images.reshape(batch, channels, height * width)
    return flat.gather(2, pixels.expand(batch, channels, -1)).view(batch, channels, size, size)


@dataclass(frozen=True)
class CifarTrainTransform:
    """Normalise, zero-pad `pad` pixels per side (after normalising: mean colour), random crop, flip."""

    crop: int
    pad: int = 0

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        images = normalize_cifar(x)
        if self.pad:
            images = F.pad(images, (self.pad, self.pad, self.pad, self.pad))
        return random_crop_flip(images, self.crop, generator)


@dataclass(frozen=True)
class CifarTestTransform:
    """Normalise and take the centre `crop` x `crop` window (the whole image when crop is 32)."""

    crop: int

    def __call__(self, x: Tensor) -> Tensor:
        images = normalize_cifar(x)
        top = (images.shape[2] - self.crop) // 2
        left = (images.shape[3] - self.crop) // 2
        return images[:, :, top : top + self.crop, left : left + self.crop]

"""Image batch transforms of the LSGD paper (supplement sec. 9.1), vectorised over the batch.

32x32 images (CIFAR): normalise, random crop (optionally after zero padding), horizontal flip; at test
the centre crop. Larger images (ImageNet): a random crop of 8-100 % of the area with aspect ratio 3/4-4/3
resized to 224x224, flipped; at test the centre 224x224 of the stored 256x256 image. Transforms are
frozen dataclasses so a `Dataset` pickles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel mean and standard deviation of pixels scaled to [0, 1]."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
CIFAR_STATS = ChannelStats(CIFAR_MEAN, CIFAR_STD)
IMAGENET_STATS = ChannelStats((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def normalize(x: Tensor, stats: ChannelStats) -> Tensor:
    """Turn images (B, 3, H, W) with values in 0..255 into float32 normalised per channel."""
    mean = torch.tensor(stats.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(stats.std, dtype=torch.float32).view(1, 3, 1, 1)
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


def center_crop(images: Tensor, size: int) -> Tensor:
    """The centre `size` x `size` window of every image (B, C, H, W)."""
    top = (images.shape[2] - size) // 2
    left = (images.shape[3] - size) // 2
    return images[:, :, top : top + size, left : left + size]


RESIZED_CROP_ATTEMPTS = 10


def random_resized_boxes(
    batch: int,
    height: int,
    width: int,
    generator: torch.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(top, left, box height, box width) of one random crop per sample, as float tensors of shape (B,).

    Each box covers a uniform `scale` fraction of the area, with an aspect ratio (width / height)
    log-uniform in `ratio`; of `RESIZED_CROP_ATTEMPTS` draws the first that fits is used, else the
    largest centred box whose ratio is clamped into `ratio` (the rule of Szegedy et al. 2015 as torchvision
    implements it, drawn for the whole batch at once).
    """
    shape = (batch, RESIZED_CROP_ATTEMPTS)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * torch.rand(shape, generator=generator))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(shape, generator=generator))
    box_w = torch.sqrt(area * aspect).round()
    box_h = torch.sqrt(area / aspect).round()
    fits = (box_w >= 1) & (box_w <= width) & (box_h >= 1) & (box_h <= height)
    first = fits.to(torch.int8).argmax(dim=1)  # index of the first fitting draw (0 when none fits)
    w = box_w.gather(1, first[:, None]).squeeze(1)
    h = box_h.gather(1, first[:, None]).squeeze(1)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = float(width), float(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = float(round(height * ratio[1])), float(height)
    else:
        fallback_w, fallback_h = float(width), float(height)
    any_fits = fits.any(dim=1)
    w = torch.where(any_fits, w, torch.full_like(w, fallback_w))
    h = torch.where(any_fits, h, torch.full_like(h, fallback_h))
    top = torch.floor(torch.rand(batch, generator=generator) * (height - h + 1))
    left = torch.floor(torch.rand(batch, generator=generator) * (width - w + 1))
    top = torch.where(any_fits, top, torch.floor((height - h) / 2))
    left = torch.where(any_fits, left, torch.floor((width - w) / 2))
    return top, left, h, w


def resized_crop_flip(
    images: Tensor,
    boxes: tuple[Tensor, Tensor, Tensor, Tensor],
    flip: Tensor,
    size: int,
) -> Tensor:
    """Resample box `(top, left, h, w)` of each image to `size` x `size` (bilinear), mirrored where `flip`.

    One `grid_sample` serves the whole batch: each sample's affine map sends the output square onto
    its box (with a negative x scale for a flipped sample).
    """
    batch, _, height, width = images.shape
    top, left, h, w = boxes
    sign = torch.where(flip, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = sign * w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [batch, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass(frozen=True)
class CropFlipTransform:
    """Normalise, zero-pad `pad` pixels per side (after normalising: mean colour), random crop, flip."""

    crop: int
    pad: int = 0
    stats: ChannelStats = CIFAR_STATS

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        images = normalize(x, self.stats)
        if self.pad:
            images = F.pad(images, (self.pad, self.pad, self.pad, self.pad))
        return random_crop_flip(images, self.crop, generator)


@dataclass(frozen=True)
class CenterCropTransform:
    """Normalise and take the centre `crop` x `crop` window (the whole image when it is that size)."""

    crop: int
    stats: ChannelStats = CIFAR_STATS

    def __call__(self, x: Tensor) -> Tensor:
        return center_crop(normalize(x, self.stats), self.crop)


@dataclass(frozen=True)
class ResizedCropFlipTransform:
    """ImageNet training augmentation: random-area crop resized to `size`, flip with p=0.5, normalise."""

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    stats: ChannelStats = IMAGENET_STATS

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        batch, _, height, width = x.shape
        boxes = random_resized_boxes(batch, height, width, generator, self.scale, self.ratio)
        flip = torch.rand(batch, generator=generator) < 0.5
        # Normalising first is exact: bilinear weights sum to one and the boxes lie inside the image.
        return resized_crop_flip(normalize(x, self.stats), boxes, flip, self.size)

"""The paper's ImageNet setting: random-area crops resized to 224x224 with torch ops, and ResNet-50."""

from __future__ import annotations

import math

import pytest
import torch

from commsgd.tasks import DatasetSpec, build_model, loss_and_errors
from commsgd.tasks.transforms import (
    IMAGENET_STATS,
    ResizedCropFlipTransform,
    normalize,
    random_resized_boxes,
    resized_crop_flip,
)


def test_random_boxes_cover_8_to_100_percent_with_ratio_3_4_to_4_3() -> None:
    generator = torch.Generator().manual_seed(0)
    top, left, h, w = random_resized_boxes(4000, 256, 256, generator, (0.08, 1.0), (3 / 4, 4 / 3))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 256).all() and (left + w <= 256).all()
    assert torch.equal(top, top.floor()) and torch.equal(w, w.round())  # whole pixels
    area = h * w / 256**2
    slack = 2 / 256  # rounding each side to whole pixels
    assert area.min() >= 0.08 - slack and area.max() <= 1.0
    assert area.min() < 0.12 and area.max() > 0.9  # the whole range is drawn
    ratio = w / h
    assert ratio.min() >= 3 / 4 - 0.05 and ratio.max() <= 4 / 3 + 0.05
    assert ratio.min() < 0.8 and ratio.max() > 1.25
    again = random_resized_boxes(
        4000, 256, 256, torch.Generator().manual_seed(0), (0.08, 1.0), (3 / 4, 4 / 3)
    )
    assert all(torch.equal(a, b) for a, b in zip((top, left, h, w), again))


def test_boxes_fall_back_to_the_centre_when_no_draw_fits() -> None:
    # a 100x10 strip cannot hold a box of >= 90 % of its area with a ratio near 1: centred, ratio clamped
    top, left, h, w = random_resized_boxes(
        50, 10, 100, torch.Generator().manual_seed(0), (0.9, 1.0), (1.0, 1.2)
    )
    assert torch.equal(h, torch.full((50,), 10.0)) and torch.equal(w, torch.full((50,), 12.0))
    assert torch.equal(left, torch.full((50,), 44.0)) and torch.equal(top, torch.zeros(50))


def test_resampling_a_box_of_the_output_size_is_an_exact_crop_and_flip() -> None:
    images = torch.rand(3, 3, 40, 50)
    boxes = (
        torch.tensor([0.0, 5.0, 8.0]),
        torch.tensor([0.0, 7.0, 18.0]),
        torch.full((3,), 32.0),
        torch.full((3,), 32.0),
    )
    flip = torch.tensor([False, False, True])
    out = resized_crop_flip(images, boxes, flip, 32)
    assert torch.allclose(out[0], images[0, :, :32, :32], atol=1e-5)
    assert torch.allclose(out[1], images[1, :, 5:37, 7:39], atol=1e-5)
    assert torch.allclose(out[2], images[2, :, 8:40, 18:50].flip(-1), atol=1e-5)


def test_resampling_scales_a_box_up() -> None:
    # a left-to-right ramp: its right half resampled to twice the width is the ramp over that half
    ramp = torch.arange(64.0).repeat(1, 3, 64, 1)
    boxes = (torch.zeros(1), torch.full((1,), 32.0), torch.full((1,), 64.0), torch.full((1,), 32.0))
    out = resized_crop_flip(ramp, boxes, torch.tensor([False]), 64)
    expected = (32 + (torch.arange(64.0) + 0.5) / 2 - 0.5).clamp(max=63)
    assert torch.allclose(out[0, 0, 10], expected, atol=1e-4)


def test_imagenet_train_transform_is_seeded_normalised_and_flips() -> None:
    x = torch.randint(0, 256, (16, 3, 256, 256), dtype=torch.uint8)
    transform = ResizedCropFlipTransform()
    a = transform(x, torch.Generator().manual_seed(5))
    b = transform(x, torch.Generator().manual_seed(5))
    c = transform(x, torch.Generator().manual_seed(6))
    assert a.shape == (16, 3, 224, 224) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    low, high = normalize(torch.tensor([0.0, 255.0]).view(2, 1, 1, 1).expand(2, 3, 1, 1), IMAGENET_STATS)
    assert (a >= low.min() - 1e-5).all() and (a <= high.max() + 1e-5).all()
    flat = torch.full((1, 3, 256, 256), 128, dtype=torch.uint8)  # a flat image stays flat, normalised
    out = transform(flat, torch.Generator().manual_seed(0))
    assert torch.allclose(out, normalize(flat, IMAGENET_STATS)[:, :, :224, :224], atol=1e-5)


def test_resnet50_has_the_published_parameter_count() -> None:
    model = build_model("resnet50", DatasetSpec("imagenet", "image", (3, 224, 224), 1000))
    assert sum(p.numel() for p in model.parameters()) == 25_557_032


@pytest.mark.parametrize("side", [64, 32])
def test_resnet50_forward_and_backward_on_small_input(side: int) -> None:
    torch.manual_seed(0)
    model = build_model("resnet50", DatasetSpec("tiny", "image", (3, side, side), 7))
    x, y = torch.randn(2, 3, side, side), torch.tensor([1, 6])
    out = model(x)
    assert out.shape == (2, 7)
    loss, _ = loss_and_errors(out, y)
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

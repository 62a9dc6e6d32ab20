"""Shared helpers of the dataset tests: random concept datasets, a planted-unit model, probe comparisons.

The comparisons are plain: every array of two probes, and every number of two dissections, must be equal.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

import lightning_dissect as ld

PROBE_ARRAYS = ("images", "label_maps", "image_labels", "label_area", "category_present", "image_level_present",
                "label_category")
LAYER_NUMBERS = ("thresholds", "iou", "intersection", "unit_area", "label_area", "category_labels",
                 "category_scores", "labels", "scores", "top_images", "top_activations")

RANDOM_CATEGORIES = ["color", "object", "part", "scene"]
RANDOM_NAMES = ["-", "red", "blue", "dog", "cat", "leg", "head", "kitchen", "beach", "orphan"]


def random_items(count: int = 20, size: int = 16, seed: int = 0) -> list[tuple[object, dict]]:
    """Items in every form `concept_source` allows: float, uint8 and PIL images; one map, several maps, a
    missing category, image-level labels as ints and in a list with a map, a label in two categories (blue:
    color and object), a label that is pixel- and image-level in one item (beach), and a label that never
    occurs (orphan)."""
    rng = np.random.default_rng(seed)
    half = size // 2
    items = []
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        image: object
        if i % 3 == 0:
            image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
        elif i % 3 == 1:
            image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        else:
            image = Image.fromarray(pixels)
        labels: dict = {"color": rng.choice([0, 1, 2], size=(half, half), p=[0.4, 0.3, 0.3])}
        if i % 5 != 4:
            objects = rng.choice([0, 2, 3, 4, 8], size=(half, half), p=[0.5, 0.1, 0.2, 0.1, 0.1])
            labels["object"] = [torch.from_numpy(objects)] + ([8] if i % 4 == 0 else [])
        labels["part"] = [rng.choice([0, 4, 5, 6], size=(half, half)) for _ in range(int(rng.integers(0, 3)))]
        labels["scene"] = [int(v) for v in rng.choice([7, 8], size=int(rng.integers(0, 3)))]
        items.append((image, labels))
    return items


def assert_same_probe(probe: ld.ProbeSet, reference: ld.ProbeSet) -> None:
    assert probe.label_names == reference.label_names
    assert probe.categories == reference.categories
    assert probe.segmentation_size == reference.segmentation_size
    for name in PROBE_ARRAYS:
        got, expected = getattr(probe, name), getattr(reference, name)
        assert got.dtype == expected.dtype and got.shape == expected.shape and torch.equal(got, expected), name


def assert_same_dissection(first: ld.Dissection, second: ld.Dissection) -> None:
    assert list(first) == list(second)
    for layer in first:
        a, b = first[layer], second[layer]
        assert a.label_names == b.label_names and a.categories == b.categories
        for name in LAYER_NUMBERS:
            assert torch.equal(getattr(a, name), getattr(b, name)), (layer, name)
        assert a.summary() == b.summary()


class SmallCNN(nn.Module):
    """A random network with two spatial layers."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.block = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(6, 5, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x)).mean((2, 3))


class PlantedRed(nn.Module):
    """Unit 0 is the red channel averaged over 2 x 2 cells (one value per label-map pixel); unit 1 is zero."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = nn.functional.avg_pool2d(x[:, :1], 2)
        return self.features(torch.cat([red, torch.zeros_like(red)], dim=1))


def planted_quantile(inside: int, total: int) -> float:
    """The quantile whose threshold lies halfway between the `inside` largest of `total` values and the rest."""
    return (inside - 0.5) / (total - 1)


def planted_image(region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uint8 `(2h, 2w, 3)` image whose red channel is 255 on `region` (a `(h, w)` mask, in 2 x 2 cells) and at
    most 60 elsewhere; green and blue are random."""
    image = rng.integers(0, 256, (2 * region.shape[0], 2 * region.shape[1], 3), dtype=np.uint8)
    red = np.where(np.kron(region, np.ones((2, 2), dtype=bool)), 255, rng.integers(0, 61, image.shape[:2]))
    image[..., 0] = red
    return image

"""Masks, intersections and unit areas, accumulated over a probe set (SEMANTICS §2, §4).

Masks are sparse by construction: a unit's mask keeps the pixels above its top
0.5% threshold. A bilinearly upsampled pixel is a convex combination of at
most four raw cells, so an image whose raw map never exceeds the threshold has
an empty mask. The tally upsamples only the (image, unit) maps that can
exceed it, and counts intersections from the mask pixels alone, with one
`bincount` over `unit * C + label`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Denominator = Literal["paper", "lite", "global"]
DENOMINATORS: tuple[str, ...] = ("paper", "lite", "global")

# Float32 rounding can lift a bilinear combination a few ulps above its largest
# input; a relative slack of 2^-20 (about 8 ulps) keeps the candidate filter safe.
_ROUNDING_SLACK = 2.0**-20
# Upsampled maps held at once, in float32 elements.
_CHUNK_ELEMENTS = 2**23


def upsample_masks(maps: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`M_u(x) = upsample(A[x, u]) > T_u` for a stack of raw maps (SEMANTICS §2).

    Args:
        maps: float32 `(n, h, w)` raw activation maps.
        thresholds: float64 `(n,)`, the threshold of each map's unit.
        size: `(sh, sw)`, the segmentation size.

    Returns:
        bool `(n, sh * sw)`.
    """
    upsampled = F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
    # Compared in float64: the threshold is never rounded to float32.
    return (upsampled.flatten(1) > thresholds.unsqueeze(1)).reshape(maps.shape[0], -1)


def candidate_pairs(activations: torch.Tensor, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (image, unit) maps whose upsampled mask may be non-empty.

    Returns:
        `(images, units)`: long tensors of batch positions and unit indices.
    """
    peak = activations.amax(dim=(2, 3)).double()
    bound = peak + peak.abs() * _ROUNDING_SLACK
    images, units = (bound > thresholds).nonzero(as_tuple=True)
    return images, units


class IoUTally:
    """Running sums `I(u, c)` and `A_k(u)` over the probe images (SEMANTICS §4).

    Args:
        num_units: `K`.
        label_category: long `(C,)`, the primary category index of every
            label (-1: never scored).
        num_categories: the number of dissected categories.
        denominator: `"paper"`, `"lite"` or `"global"`, which unit area to sum.
        device: where the sums live.

    Attributes:
        intersection: long `(K, C)`.
        unit_area: long `(K, num_categories)`; for `"global"` all columns are equal.
    """

    def __init__(self, num_units: int, label_category: torch.Tensor, num_categories: int,
                 denominator: Denominator = "paper", device: torch.device | str | None = None) -> None:
        if denominator not in DENOMINATORS:
            raise ValueError(f"denominator={denominator!r} is not one of {DENOMINATORS}")
        self.denominator = denominator
        self.num_units = num_units
        self.num_categories = num_categories
        self.label_category = label_category.to(device)
        self.num_labels = label_category.shape[0]
        self.intersection = torch.zeros(num_units, self.num_labels, dtype=torch.long, device=device)
        self.unit_area = torch.zeros(num_units, num_categories, dtype=torch.long, device=device)

    def add(self, activations: torch.Tensor, thresholds: torch.Tensor, label_maps: torch.Tensor,
            image_labels: torch.Tensor, present: torch.Tensor, image_level_present: torch.Tensor) -> None:
        """Add one batch of images.

        Args:
            activations: float32 `(B, K, h, w)`.
            thresholds: float64 `(K,)`.
            label_maps: canonical integer label maps `(B, M, sh, sw)`.
            image_labels: canonical long `(B, L)`.
            present: bool `(B, num_categories)`, category presence (paper rule).
            image_level_present: bool `(B, num_categories)`, categories of the
                image-level labels (lite rule).
        """
        size = (label_maps.shape[-2], label_maps.shape[-1])
        pixels = size[0] * size[1]
        activations = activations.float().contiguous()
        # (B, P, M): the labels at one pixel are contiguous, so a gather reads one row.
        labels_at_pixel = label_maps.reshape(label_maps.shape[0], label_maps.shape[1], pixels).transpose(1, 2)
        images, units = candidate_pairs(activations, thresholds)
        chunk = max(1, _CHUNK_ELEMENTS // pixels)
        for start in range(0, images.shape[0], chunk):
            image, unit = images[start : start + chunk], units[start : start + chunk]
            masks = upsample_masks(activations[image, unit], thresholds[unit], size)
            self._add_masks(masks, image, unit, labels_at_pixel, image_labels, present, image_level_present)

    def _add_masks(self, masks: torch.Tensor, image: torch.Tensor, unit: torch.Tensor,
                   labels_at_pixel: torch.Tensor, image_labels: torch.Tensor, present: torch.Tensor,
                   image_level_present: torch.Tensor) -> None:
        num_labels, num_categories = self.num_labels, self.num_categories
        area = masks.sum(dim=1)
        pair, pixel = masks.nonzero(as_tuple=True)
        labels = labels_at_pixel[image[pair], pixel].long()  # (nnz, M)
        hit = labels > 0
        cells = (unit[pair].unsqueeze(1) * num_labels + labels)[hit]
        self.intersection.view(-1).add_(torch.bincount(cells, minlength=self.intersection.numel()))
        # An image-level label covers every pixel: the whole mask intersects it.
        image_level = image_labels[image].long()
        tagged = image_level > 0
        self.intersection.view(-1).index_add_(
            0, (unit.unsqueeze(1) * num_labels + image_level)[tagged], area.unsqueeze(1).expand_as(image_level)[tagged]
        )
        if self.denominator == "paper":
            counted = present[image]
        elif self.denominator == "global":
            counted = torch.ones(area.shape[0], num_categories, dtype=torch.bool, device=area.device)
        else:
            # lite: the mask must touch a pixel label of the category, or the image carry one image-level.
            category = self.label_category[labels]
            touched = (pair.unsqueeze(1) * num_categories + category)[category >= 0]
            counted = torch.bincount(touched, minlength=area.shape[0] * num_categories) > 0
            counted = counted.view(-1, num_categories) | image_level_present[image]
        self.unit_area.index_add_(0, unit, area.unsqueeze(1) * counted)

    def merge(self, other_intersection: torch.Tensor, other_unit_area: torch.Tensor) -> None:
        """Add the sums of a disjoint shard of the probe set."""
        self.intersection += other_intersection.to(self.intersection.device)
        self.unit_area += other_unit_area.to(self.unit_area.device)

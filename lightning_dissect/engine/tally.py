"""Intersections and unit areas, summed over the probe images (SEMANTICS §4).

`I(u, c) = sum_x |M_u(x) & L_c(x)|` and the unit area `A_k(u)` under one of
three denominators. The masks come from `engine.masks.mask_pixels` as pixel
lists, so the counts are made from the mask pixels alone: one `bincount` over
`unit * C + label` for the pixel-level labels, the whole mask for image-level
labels (which cover every pixel).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from lightning_dissect.engine.masks import mask_pixels

Denominator = Literal["paper", "lite", "global"]
"""Which unit area `A_k(u)` the IoU divides by (SEMANTICS §4): "paper" (the default: the mask's
pixels in images where category k is present), "lite" (NetDissect-Lite's: only where the mask
touches a label of category k, or the image has an image-level one) or "global" (every image)."""
DENOMINATORS: tuple[Denominator, ...] = get_args(Denominator)


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
        maps, pixels = mask_pixels(activations, thresholds, size)
        self.add_pixels(maps, pixels, label_maps, image_labels, present, image_level_present)

    def add_pixels(self, maps: torch.Tensor, pixels: torch.Tensor, label_maps: torch.Tensor,
                   image_labels: torch.Tensor, present: torch.Tensor, image_level_present: torch.Tensor) -> None:
        """Add one batch given its mask pixels (`mask_pixels`); the other arguments as in `add`."""
        batch, num_maps = label_maps.shape[0], label_maps.shape[1]
        units, num_labels, num_categories = self.num_units, self.num_labels, self.num_categories
        pixel_count = label_maps.shape[-2] * label_maps.shape[-1]
        image, unit = maps // units, maps % units
        area = torch.bincount(maps, minlength=batch * units).view(batch, units)
        # (mask pixels, M): the M label maps at each mask pixel, gathered without reordering the batch.
        labels = label_maps.reshape(batch, num_maps, pixel_count)[image, :, pixels].long()
        hit = labels > 0
        cells = (unit.unsqueeze(1) * num_labels + labels)[hit]
        self.intersection.view(-1).add_(torch.bincount(cells, minlength=self.intersection.numel()))
        # An image-level label covers every pixel: the whole mask intersects it (padding 0 adds 0).
        image_level = image_labels.long().unsqueeze(1)  # (B, 1, L)
        cells = torch.arange(units, device=maps.device).view(1, units, 1) * num_labels + image_level
        self.intersection.view(-1).index_add_(0, cells.reshape(-1), (area.unsqueeze(2) * (image_level > 0)).reshape(-1))
        if self.denominator == "paper":
            counted = present.unsqueeze(1).expand(batch, units, num_categories)
        elif self.denominator == "global":
            counted = torch.ones(batch, units, num_categories, dtype=torch.bool, device=maps.device)
        else:
            # lite: the mask must touch a pixel label of the category, or the image carry one image-level.
            category = self.label_category[labels]
            touched = (maps.unsqueeze(1) * num_categories + category)[category >= 0]
            counted = torch.bincount(touched, minlength=batch * units * num_categories) > 0
            counted = counted.view(batch, units, num_categories) | image_level_present.unsqueeze(1)
        self.unit_area += (area.unsqueeze(2) * counted).sum(0)

    def merge(self, other_intersection: torch.Tensor, other_unit_area: torch.Tensor) -> None:
        """Add the sums of a disjoint shard of the probe set."""
        self.intersection += other_intersection.to(self.intersection.device)
        self.unit_area += other_unit_area.to(self.unit_area.device)

"""Intersections and unit areas, summed over the probe images (SEMANTICS §4).

`I(u, c) = sum_x |M_u(x) & L_c(x)|` and the unit area `A_k(u)` under one of
three denominators. The masks come from `engine.masks.mask_pixels` as pixel
lists, so the counts are made from the mask pixels alone: one `bincount` over
`unit * C + label` for the pixel-level labels, the whole mask for image-level
labels (which cover every pixel). :class:`IoUTally` keeps the two sums as a
`torchmetrics.Metric` (int64, summed across processes).
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Executor
from typing import Any, Literal, get_args

import torch
from torchmetrics import Metric

from lightning_dissect.engine.masks import mask_pixels

Denominator = Literal["paper", "lite", "global"]
"""Which unit area `A_k(u)` the IoU divides by (SEMANTICS §4): "paper" (the default: the mask's
pixels in images where category k is present), "lite" (NetDissect-Lite's: only where the mask
touches a label of category k, or the image has an image-level one) or "global" (every image)."""
DENOMINATORS: tuple[Denominator, ...] = get_args(Denominator)
MASK_PIXEL_CHUNK = 2**18
MASK_IMAGES = 16


def count_masks(maps: torch.Tensor, pixels: torch.Tensor, label_maps: torch.Tensor, image_labels: torch.Tensor,
                present: torch.Tensor, image_level_present: torch.Tensor, label_category: torch.Tensor,
                num_units: int, num_categories: int, denominator: Denominator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's intersections and unit areas from its mask pixels (SEMANTICS §4).

    Args:
        maps, pixels: the batch's mask pixels (`mask_pixels`).
        label_maps: canonical integer label maps `(B, M, sh, sw)` (`engine.labels.canonical_labels`).
        image_labels: canonical long `(B, L)`.
        present: bool `(B, num_categories)`, category presence (paper rule).
        image_level_present: bool `(B, num_categories)`, the categories of the image-level labels (lite rule).
        label_category: long `(C,)`, the primary category index of every label (-1: never scored).
        num_units: `K`.
        num_categories: the number of dissected categories.
        denominator: which unit area to count.

    Returns:
        `(intersection, unit_area)`: long `(K, C)` and `(K, num_categories)`.
    """
    batch, num_maps = label_maps.shape[0], label_maps.shape[1]
    units, num_labels = num_units, label_category.shape[0]
    pixel_count = label_maps.shape[-2] * label_maps.shape[-1]
    area = torch.bincount(maps, minlength=batch * units).view(batch, units)
    flat_labels = label_maps.reshape(-1)
    # Where map m of image x keeps pixel p: x * M * pixels + m * pixels + p. The per-pixel arrays are int32
    # where every index fits (half the memory traffic of int64); the counts are int64.
    small = max(batch * num_maps * pixel_count, batch * units, units * num_labels) < 2**31
    index_type = torch.int32 if small else torch.long
    map_offsets = torch.arange(num_maps, device=maps.device, dtype=index_type) * pixel_count
    intersection = torch.zeros(units * num_labels, dtype=torch.long, device=maps.device)
    touched = torch.zeros(batch * units * num_categories, dtype=torch.bool, device=maps.device)
    # The mask pixels in chunks: the per-pixel labels below take about 20 * M bytes a pixel, and a batch's
    # mask pixels are many more in its worst batch than in a typical one (the worst of more batches is
    # worse): in chunks the memory is bounded whatever the probe's size. The sums are exact either way.
    for start in range(0, maps.shape[0], MASK_PIXEL_CHUNK):
        chunk_maps = maps[start : start + MASK_PIXEL_CHUNK].to(index_type)
        chunk_pixels = pixels[start : start + MASK_PIXEL_CHUNK].to(index_type)
        image = chunk_maps // units
        unit = chunk_maps - image * units
        # (mask pixels, M): the M label maps at each mask pixel, gathered without reordering the batch.
        at = (image * (num_maps * pixel_count) + chunk_pixels).unsqueeze(1) + map_offsets
        labels = flat_labels.index_select(0, at.view(-1)).view(-1, num_maps).to(index_type)
        # Label 0 (no label) lands in column 0, which is cleared below.
        intersection += torch.bincount((unit.unsqueeze(1) * num_labels + labels).view(-1),
                                       minlength=units * num_labels)
        if denominator == "lite":
            # lite: the mask must touch a pixel label of the category, or the image carry one image-level.
            category = label_category[labels.long()]
            touched_at = (chunk_maps.long().unsqueeze(1) * num_categories + category)[category >= 0]
            touched |= torch.bincount(touched_at, minlength=batch * units * num_categories) > 0
    intersection.view(units, num_labels)[:, 0] = 0
    # An image-level label covers every pixel: the whole mask intersects it (padding 0 adds 0).
    image_level = image_labels.long().unsqueeze(1)  # (B, 1, L)
    cells = torch.arange(units, device=maps.device).view(1, units, 1) * num_labels + image_level
    intersection.index_add_(0, cells.reshape(-1), (area.unsqueeze(2) * (image_level > 0)).reshape(-1))
    if denominator == "paper":
        counted = present.unsqueeze(1).expand(batch, units, num_categories)
    elif denominator == "global":
        counted = torch.ones(batch, units, num_categories, dtype=torch.bool, device=maps.device)
    else:
        counted = touched.view(batch, units, num_categories) | image_level_present.unsqueeze(1)
    return intersection.view(units, num_labels), (area.unsqueeze(2) * counted).sum(0)


class IoUTally(Metric):
    """Running sums `I(u, c)` and `A_k(u)` over the probe images, for fixed thresholds (SEMANTICS §4).

    The IoU follows with `engine.scores.iou(intersection, unit_area, label_area, label_category)`.

    Args:
        thresholds: float64 `(K,)`, the threshold `T_u` of every unit (`ActivationThresholds`).
        label_category: long `(C,)`, the primary category index of every label (-1: never scored).
        num_categories: the number of dissected categories.
        denominator: which unit area to sum.
        kwargs: passed to `torchmetrics.Metric` (`sync_on_compute`, `dist_sync_fn`, ...).

    Attributes:
        intersection: long `(K, C)`.
        unit_area: long `(K, num_categories)`; for "global" all columns are equal.

    Example:
        >>> tally = IoUTally(torch.tensor([0.5], dtype=torch.float64), torch.tensor([-1, 0]), num_categories=1)
        >>> activations = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # one image, one unit, 2 x 2
        >>> label_maps = torch.tensor([[[[1, 1], [0, 0]]]])           # label 1 on the top row
        >>> tally.update(activations, label_maps, torch.zeros(1, 1, dtype=torch.long),
        ...              torch.tensor([[True]]), torch.tensor([[False]]))
        >>> tally.intersection, tally.unit_area
        (tensor([[0, 1]]), tensor([[1]]))
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None
    intersection: torch.Tensor
    unit_area: torch.Tensor
    thresholds: torch.Tensor
    label_category: torch.Tensor

    def __init__(self, thresholds: torch.Tensor, label_category: torch.Tensor, num_categories: int,
                 denominator: Denominator = "paper", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if denominator not in DENOMINATORS:
            raise ValueError(f"denominator={denominator!r} is not one of {DENOMINATORS}")
        if thresholds.ndim != 1 or label_category.ndim != 1:
            raise ValueError(f"thresholds {tuple(thresholds.shape)} and label_category {tuple(label_category.shape)} "
                             "must be 1-d: (K,) and (C,)")
        self.denominator: Denominator = denominator
        self.num_units, self.num_categories = thresholds.shape[0], num_categories
        # Inputs, not state: they move with the metric but are not summed or saved.
        self.register_buffer("thresholds", thresholds.double(), persistent=False)
        self.register_buffer("label_category", label_category.long(), persistent=False)
        num_labels = label_category.shape[0]
        self.add_state("intersection", torch.zeros(self.num_units, num_labels, dtype=torch.long),
                       dist_reduce_fx="sum", persistent=True)
        self.add_state("unit_area", torch.zeros(self.num_units, num_categories, dtype=torch.long),
                       dist_reduce_fx="sum", persistent=True)

    def update(self, activations: torch.Tensor, label_maps: torch.Tensor, image_labels: torch.Tensor,
               present: torch.Tensor, image_level_present: torch.Tensor, workers: Executor | None = None) -> None:
        """Add one batch of images.

        Args:
            activations: float32 `(B, K, h, w)`.
            label_maps: canonical integer label maps `(B, M, sh, sw)`.
            image_labels: canonical long `(B, L)`.
            present: bool `(B, num_categories)`, category presence (paper rule).
            image_level_present: bool `(B, num_categories)`, categories of the
                image-level labels (lite rule).
            workers: threads to count the image groups on (`engine.tally_threads`); None: this thread.
        """
        size = (label_maps.shape[-2], label_maps.shape[-1])

        def count(start: int) -> tuple[torch.Tensor, torch.Tensor]:
            end = start + MASK_IMAGES
            maps, pixels = mask_pixels(activations[start:end], self.thresholds, size)
            return count_masks(maps, pixels, label_maps[start:end], image_labels[start:end], present[start:end],
                               image_level_present[start:end], self.label_category, self.num_units,
                               self.num_categories, self.denominator)

        # A few images at a time: the mask pixels of a group are far fewer than of a batch, and the worst
        # group of a larger probe set is little worse than a typical one, so memory stays flat as the
        # probe grows. The sums are exact integers, the same in any order.
        starts = range(0, activations.shape[0], MASK_IMAGES)
        counts: Iterable[tuple[torch.Tensor, torch.Tensor]] = (
            workers.map(count, starts) if workers is not None else map(count, starts))
        for intersection, unit_area in counts:
            self.intersection += intersection
            self.unit_area += unit_area

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(intersection, unit_area)`: long `(K, C)` and `(K, num_categories)` (torchmetrics squeezes a
        single element to a 0-d tensor; the states `intersection` and `unit_area` keep the shape)."""
        return self.intersection, self.unit_area

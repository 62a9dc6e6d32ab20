"""Label tensors of a probe set, in the form the tally needs (SEMANTICS §3).

Everything here depends on the data only, never on the model, so a probe set
computes it once and every dissection reuses it.
"""

from __future__ import annotations

import torch


def canonical_labels(
    label_maps: torch.Tensor, image_labels: torch.Tensor, label_category: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewrite decoded labels so that simple sums give SEMANTICS §3 and §4.

    `L_c(x)` is a union over an image's maps, and an image-level label covers
    every pixel. So that summing pixels never counts a pixel twice for one
    label, this zeroes (a) a pixel label already present at the same pixel in
    an earlier map, (b) a pixel label that is also an image-level label of the
    same image (the image-level label covers the pixel already), (c) labels
    that are scored in no selected category, and removes duplicate and unscored
    image-level labels.

    Args:
        label_maps: integer tensor `(N, M, sh, sw)` of global label numbers, 0 unlabeled.
        image_labels: integer tensor `(N, L)` of image-level label numbers, 0 padding.
        label_category: long tensor `(C,)`, the primary category index of each
            label, -1 where the label is never scored.

    Returns:
        `(label_maps, image_labels)` with the same shapes and dtypes.
    """
    scored = label_category >= 0
    maps = label_maps.clone()
    maps[~scored[maps.long()]] = 0
    images = image_labels.long().clone()
    images[~scored[images]] = 0
    # Duplicate image-level labels: keep the first occurrence.
    if images.shape[1] > 1:
        sorted_labels, order = images.sort(dim=1)
        repeat = torch.zeros_like(sorted_labels, dtype=torch.bool)
        repeat[:, 1:] = sorted_labels[:, 1:] == sorted_labels[:, :-1]
        images = images.scatter(1, order, torch.where(repeat, 0, sorted_labels))
    if maps.numel():
        # (b): a pixel-level label that is also image-level for that image.
        for slot in range(images.shape[1]):
            maps[maps == images[:, slot].view(-1, 1, 1, 1).to(maps.dtype)] = 0
        # (a): keep a label at a pixel only in the first map that carries it.
        for later in range(1, maps.shape[1]):
            duplicate = (maps[:, :later] == maps[:, later : later + 1]).any(dim=1)
            maps[:, later][duplicate] = 0
    return maps, images.to(image_labels.dtype)


def label_area(label_maps: torch.Tensor, image_labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """`G(c) = sum_x |L_c(x)|` from canonical labels (SEMANTICS §4).

    Returns:
        long tensor `(num_labels,)`; column 0 is always 0.
    """
    pixels = label_maps.shape[-2] * label_maps.shape[-1]
    area = torch.bincount(label_maps.reshape(-1).long(), minlength=num_labels)
    area += torch.bincount(image_labels.reshape(-1).long(), minlength=num_labels) * pixels
    area[0] = 0
    return area


def category_presence(
    label_maps: torch.Tensor, image_labels: torch.Tensor, label_category: torch.Tensor, num_categories: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which categories each image is annotated with (SEMANTICS §3).

    Returns:
        `(present, image_level)`: bool tensors `(N, num_categories)`. `present`
        is the paper rule's "category k is present in image x"; `image_level`
        marks the categories of the image-level labels alone (the `lite`
        denominator needs them separately).
    """
    n = label_maps.shape[0]
    # Shift by one so that unscored labels and padding (category -1) land in a dropped column 0.
    pixel_categories = label_category[label_maps.reshape(n, -1).long()] + 1
    image_categories = label_category[image_labels.long()] + 1
    present = torch.zeros(n, num_categories + 1, dtype=torch.bool, device=label_maps.device)
    image_level = torch.zeros_like(present)
    image_level.scatter_(1, image_categories, True)
    present.scatter_(1, pixel_categories, True)
    present |= image_level
    return present[:, 1:], image_level[:, 1:]

"""The straightforward dense Network Dissection: the reference of the engine's tests and the
baseline `benchmarks/bench_dissect.py` times.

Every map is upsampled at full resolution as part of its layer tensor, compared with its float64
threshold, and every label is compared with every mask (as one-hot matrix products). Thresholds
are `torch.quantile` over all activations of a unit (SEMANTICS §2). It shares nothing with the
engine but the probe set's canonical labels (SEMANTICS §3), which do not depend on the model.
Unlike `tests/reference.py` (loops, one image at a time) it runs at benchmark sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Dense elements held at once (upsampled values), to bound memory.
_CHUNK_ELEMENTS = 2**25


def dense_pixels(activations: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Sorted `map * P + pixel` of every mask pixel (`map = x * K + u`, `P = sh * sw`): `F.interpolate`
    of the whole layer tensor `(B, K, h, w)`, compared in float64 (SEMANTICS §2)."""
    upsampled = F.interpolate(activations, size=size, mode="bilinear", align_corners=False)
    masks = upsampled.double() > thresholds.view(1, -1, 1, 1)
    return masks.flatten().nonzero().squeeze(1)


def dense_thresholds(activations: torch.Tensor, quantile: float) -> torch.Tensor:
    """`T_u = torch.quantile(A[:, u].flatten().double(), 1 - q)` for every unit (needs N*h*w <= 2^24)."""
    units = activations.shape[1]
    return torch.stack([torch.quantile(activations[:, u].flatten().double(), 1 - quantile) for u in range(units)])


def dense_tally(activations: torch.Tensor, thresholds: torch.Tensor, label_maps: torch.Tensor,
                image_labels: torch.Tensor, label_category: torch.Tensor, num_categories: int,
                denominator: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`I(u, c)` and `A_k(u)` (SEMANTICS §4) the obvious way.

    Args:
        activations: `(N, K, h, w)` raw activations.
        thresholds: float64 `(K,)`.
        label_maps: canonical `(N, M, sh, sw)` pixel labels.
        image_labels: canonical `(N, L)` image-level labels.
        label_category: long `(C,)` primary category per label, -1: never scored.
        num_categories: number of categories.
        denominator: "paper", "lite" or "global".

    Returns:
        `(intersection (K, C), unit_area (K, num_categories))`, long.
    """
    n, units = activations.shape[:2]
    sh, sw = label_maps.shape[-2:]
    num_labels = label_category.shape[0]
    pixels = sh * sw
    device = activations.device
    intersection = torch.zeros(units, num_labels, dtype=torch.float64, device=device)
    unit_area = torch.zeros(units, num_categories, dtype=torch.float64, device=device)
    labels = torch.arange(num_labels, device=device)
    step = max(1, _CHUNK_ELEMENTS // (units * pixels))
    scored = label_category >= 0
    # label -> its primary category
    category_of = torch.zeros(num_labels, num_categories, dtype=torch.bool, device=device)
    category_of[scored.nonzero().squeeze(1), label_category[scored]] = True
    for start in range(0, n, step):
        part = slice(start, start + step)
        # The layer tensor itself, as SEMANTICS §2 defines the mask.
        upsampled = F.interpolate(activations[part].float().contiguous(), size=(sh, sw), mode="bilinear",
                                  align_corners=False)
        masks = (upsampled.double() > thresholds.view(1, -1, 1, 1)).flatten(2)  # (B, K, P)
        batch = masks.shape[0]
        maps = label_maps[part].long().flatten(2)  # (B, M, P)
        # L_c(x) for every label: a pixel carries c if any map does, or c is an image-level label.
        pixel_region = torch.zeros(batch, pixels, num_labels, dtype=torch.bool, device=device)
        for m in range(maps.shape[1]):
            pixel_region |= maps[:, m].unsqueeze(2) == labels
        pixel_region[:, :, ~scored] = False
        tagged = torch.zeros(batch, num_labels, dtype=torch.bool, device=device)
        tagged.scatter_(1, image_labels[part].long(), True)
        tagged[:, ~scored] = False
        region = pixel_region | tagged.unsqueeze(1)
        masks_float = masks.float()
        intersection += torch.einsum("bkp,bpc->kc", masks_float, region.float()).double()
        area = masks.sum(2).double()  # (B, K)
        if denominator == "paper":  # a category is present when any of the image's labels has it
            counted = ((region.any(1).float() @ category_of.float()) > 0).unsqueeze(1)
        elif denominator == "global":
            counted = torch.ones(batch, 1, num_categories, dtype=torch.bool, device=device)
        else:  # lite: the mask touches a pixel label of the category, or an image-level label has it
            pixel_category = (pixel_region.float() @ category_of.float()) > 0  # (B, P, num_categories)
            touched = torch.einsum("bkp,bpn->bkn", masks_float, pixel_category.float()) > 0
            counted = touched | ((tagged.float() @ category_of.float()) > 0).unsqueeze(1)
        unit_area += (area.unsqueeze(2) * counted).sum(0)
    return intersection.long(), unit_area.long()

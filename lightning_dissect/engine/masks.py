"""The masks `M_u(x)` of a batch (SEMANTICS §2), as the pixels the tally counts.

`M_u(x) = upsample(A[x, u]) > T_u`: the layer tensor `(B, K, h, w)` upsampled
bilinearly to the segmentation size (`F.interpolate`, half-pixel centres,
float32, contiguous NCHW) and compared with the float64 threshold.

:func:`mask_pixels` is the entry point. It runs the fast path
(`engine/_fast_masks.py`: only the pixels near each threshold are evaluated,
and the kernel decides those within rounding reach), which equals the
definition bit for bit; with the reference switch on (`engine/reference.py`)
it runs :func:`reference_mask_pixels`, the definition as written.
:func:`upsample_masks` draws the masks of a few maps for the report.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_dissect.engine._fast_masks import CHUNK_ELEMENTS, fast_mask_pixels, float32_below, upsample_masks
from lightning_dissect.engine.reference import reference_path, use_reference

__all__ = ["float32_below", "mask_pixels", "reference_mask_pixels", "reference_path", "upsample_masks"]


def mask_pixels(activations: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixels of all masks `M_u(x)` of a batch (SEMANTICS §2).

    Args:
        activations: float32 `(B, K, h, w)`.
        thresholds: float64 `(K,)`.
        size: `(sh, sw)`, the segmentation size.

    Returns:
        `(maps, pixels)`: long tensors, one entry per mask pixel: the map `x * K + u`
        and the pixel `row * sw + column`. Their order is unspecified.

    Example:
        >>> maps, pixels = mask_pixels(torch.tensor([[[[0.0, 1.0]]]]), torch.tensor([0.5], dtype=torch.float64),
        ...                            (1, 4))
        >>> pixels.sort().values.tolist()  # upsampled: 0, 0.25, 0.75, 1
        [2, 3]
    """
    if use_reference():
        return reference_mask_pixels(activations, thresholds, size)
    return fast_mask_pixels(activations, thresholds, size)


def reference_mask_pixels(activations: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mask_pixels` as SEMANTICS §2 writes it: `F.interpolate` of the layer tensor, compared
    in float64. A few images at a time, so memory stays bounded; each image's bits do not depend
    on the others."""
    batch, units = activations.shape[:2]
    activations = activations.float().contiguous()
    step = max(1, CHUNK_ELEMENTS // (units * size[0] * size[1]))
    out_maps, out_pixels = [], []
    for start in range(0, batch, step):
        upsampled = F.interpolate(activations[start : start + step], size=size, mode="bilinear",
                                  align_corners=False)
        masks = upsampled.flatten(2).double() > thresholds.view(1, units, 1)
        image, unit, pixel = masks.nonzero(as_tuple=True)
        out_maps.append((image + start) * units + unit)
        out_pixels.append(pixel)
    if not out_maps:
        empty = torch.zeros(0, dtype=torch.long, device=activations.device)
        return empty, empty
    return torch.cat(out_maps), torch.cat(out_pixels)

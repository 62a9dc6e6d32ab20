"""The top-activating probe images of every unit, kept over a stream of batches.

What NetDissect's report shows for a unit (its strip) are the `k` probe images
with the largest per-image maximum of the unit's map. Ties go to the lower
probe position, so the choice does not depend on the batch size or on how the
probe set was sharded. :class:`TopImages` keeps them as a `torchmetrics.Metric`
whose state packs `(value, position)` pairs into one float64 tensor (both are
exact in float64: values come from float32 maps, positions are far below
2^53), so one reduction merges values and positions jointly across processes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torchmetrics import Metric

_EMPTY = (-math.inf, math.inf)  # an empty slot: below every value, after every position


def merge_top_images(pairs: torch.Tensor, k: int) -> torch.Tensor:
    """The `k` best `(value, position)` pairs of each unit: largest value first, ties to the lower position.

    Args:
        pairs: float64 `(K, m, 2)`, `m >= k`.
        k: how many to keep.

    Returns:
        float64 `(K, k, 2)`.
    """
    # Sort by position first, then stably by value: equal values stay in position order.
    by_position = pairs[..., 1].argsort(dim=1, stable=True)
    order = pairs[..., 0].gather(1, by_position).argsort(dim=1, descending=True, stable=True)[:, :k]
    return pairs.gather(1, by_position.gather(1, order).unsqueeze(2).expand(-1, -1, 2))


def merge_top_image_states(states: torch.Tensor) -> torch.Tensor:
    """The exact merge of `TopImages` states of disjoint shards: `(P, K, k, 2)` stacked -> `(K, k, 2)`.

    The best `k` of a union are the best `k` of the parts' best `k`. Used by torchmetrics as
    `TopImages.top`'s `dist_reduce_fx`.
    """
    parts, units, k, _ = states.shape
    return merge_top_images(states.permute(1, 0, 2, 3).reshape(units, parts * k, 2), k)


def unpack_top_images(pairs: torch.Tensor, images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(values, positions)` of a `TopImages` state `(K, k, 2)` that has seen `images` images:
    float32 and long `(K, min(k, images))`, most active first (the empty slots dropped)."""
    width = min(pairs.shape[1], images)
    return pairs[:, :width, 0].float(), pairs[:, :width, 1].long()


class TopImages(Metric):
    """Per unit, the `k` images with the largest per-image maximum activation.

    Ties go to the lower probe position. Exact; memory `K x k` pairs. States of
    disjoint shards merge exactly across processes (:func:`merge_top_image_states`).

    Args:
        num_units: `K`.
        k: images to keep per unit (0 keeps none).
        kwargs: passed to `torchmetrics.Metric` (`sync_on_compute`, `dist_sync_fn`, ...).

    Example:
        >>> top = TopImages(num_units=1, k=2)
        >>> top.update(torch.tensor([[[[1.0]]], [[[3.0]]], [[[3.0]]]]), torch.tensor([0, 1, 2]))
        >>> top.compute()
        (tensor([[3., 3.]]), tensor([[1, 2]]))
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None
    top: torch.Tensor
    images: torch.Tensor

    def __init__(self, num_units: int, k: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_units, int) or num_units < 1:
            raise ValueError(f"num_units={num_units!r} must be a positive integer")
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"k={k!r} must be a non-negative integer")
        self.num_units, self.k = num_units, k
        empty = torch.tensor(_EMPTY, dtype=torch.float64).expand(num_units, k, 2)
        self.add_state("top", empty.clone(), dist_reduce_fx=merge_top_image_states, persistent=True)
        self.add_state("images", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum", persistent=True)

    def update(self, maps: torch.Tensor, positions: torch.Tensor) -> None:
        """Add a batch of activations `(B, K, h, w)` of the images at probe `positions` `(B,)`."""
        if maps.ndim < 2 or maps.shape[1] != self.num_units or positions.shape != maps.shape[:1]:
            raise ValueError(f"maps has shape {tuple(maps.shape)} and positions {tuple(positions.shape)}; "
                             f"expected (B, {self.num_units}, ...) and (B,)")
        self.images += maps.shape[0]
        if not self.k:
            return
        peaks = maps.flatten(2).amax(dim=2).t().double()  # (K, B)
        batch = torch.stack([peaks, positions.to(peaks).expand_as(peaks)], dim=2)
        self.top = merge_top_images(torch.cat([self.top, batch], dim=1), self.k)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(values, positions)`: float32 and long `(K, min(k, images seen))`, most active first,
        `unpack_top_images` of the states (torchmetrics squeezes a single element to a 0-d tensor)."""
        return unpack_top_images(self.top, int(self.images))

"""Exact per-unit activation quantiles over a stream of batches (SEMANTICS §2).

The references estimate the threshold with a sketch. Here it is exact: the
`1 - q` quantile with linear interpolation only reads the order statistics at
and above `floor((1 - q) * (n - 1))`, so a running top-k of that many values per
unit holds everything the quantile needs, in `O(q * n)` memory per unit.
"""

from __future__ import annotations

import math

import torch


def quantile_rank(num_values: int, quantile: float) -> tuple[int, float]:
    """Where the `1 - quantile` quantile of `num_values` sorted values lies.

    Follows `torch.quantile(..., interpolation="linear")` bit for bit: the
    position is `(1 - q) * (n - 1)` computed in float64.

    Returns:
        `(below, weight)`: the 0-based ascending index of the lower order
        statistic and the interpolation weight towards the next one.
    """
    rank = (torch.tensor(1.0 - quantile, dtype=torch.float64) * (num_values - 1)).item()
    below = math.floor(rank)
    return below, rank - below


def top_count(num_values: int, quantile: float) -> int:
    """How many of the largest values of each unit the exact quantile needs.

    This is `floor(q * (n - 1)) + 2` up to float rounding, capped at `n`
    (SEMANTICS §2).
    """
    below, _ = quantile_rank(num_values, quantile)
    return min(num_values, num_values - below)


class RunningTopK:
    """The `k` largest values of each unit seen so far, merged batch by batch.

    Exact. Memory is `K x k` values. States from disjoint shards of the data
    merge with :meth:`merge` (used across distributed ranks).

    Example:
        >>> top = RunningTopK(num_units=2, k=3)
        >>> top.add(torch.tensor([[1.0, 5.0, 2.0, 4.0], [0.0, -1.0, 3.0, 2.0]]))
        >>> top.values
        tensor([[5., 4., 2.],
                [3., 2., 0.]])
    """

    def __init__(self, num_units: int, k: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.k = k
        self.values = torch.empty(num_units, 0, device=device, dtype=dtype)

    def add(self, values: torch.Tensor) -> None:
        """Merge `values` of shape `(K, n)` (one row per unit) into the state."""
        self.add_maps(values.unsqueeze(0))

    def add_maps(self, maps: torch.Tensor) -> None:
        """Merge a batch of maps `(B, K, ...)` (units on axis 1) into the state: the same as
        `add(maps.transpose(0, 1).reshape(K, -1))`, without copying the batch into unit order."""
        flat = maps.reshape(maps.shape[0], maps.shape[1], -1).to(self.values.dtype)
        batch, units, size = flat.shape
        full = self.values.shape[1] == self.k > 0
        bound = None
        if full:
            # Only values above a unit's smallest kept value can enter its top k (an equal one
            # would replace an equal one).
            bound = self.values[:, -1]
        elif self.values.shape[1] == 0 and batch * size >= 8 * self.k > 0:
            bound = _sample_bound(flat, self.k)
        if bound is not None:
            image, unit, column = (flat > bound.view(1, units, 1)).nonzero(as_tuple=True)
            # nonzero lists the values image by image, unit by unit: `runs` of one (image, unit) each.
            runs = torch.bincount(image * units + unit, minlength=batch * units)
            per_image = runs.view(batch, units)
            counts = per_image.sum(0)
            # A sampled bound counts only where every unit has k values above it.
            if full or bool((counts >= self.k).all()):
                if image.shape[0] == 0:
                    return
                width = int(counts.max())
                if width < batch * size // 2:
                    # Usually few values pass: each unit's, packed left into a (K, width) block
                    # padded with -inf, go to the top-k instead of the whole batch. A value's place
                    # in its unit's row: the unit's values in earlier images, then its rank in its run.
                    run = image * units + unit
                    earlier = (per_image.cumsum(0) - per_image).view(-1)
                    position = (torch.arange(run.shape[0], device=run.device) - (runs.cumsum(0) - runs)[run]
                                + earlier[run])
                    packed = torch.full((units, width), -math.inf, dtype=flat.dtype, device=flat.device)
                    packed[unit, position] = flat[image, unit, column]
                    self.values = _top(torch.cat([self.values, packed], dim=1), self.k)
                    return
        rows = flat.transpose(0, 1).reshape(units, batch * size)
        self.values = _top(torch.cat([self.values, rows], dim=1), self.k)

    def merge(self, values: torch.Tensor) -> None:
        """Merge another state's `values` `(K, k')` (from a disjoint shard)."""
        self.add(values)

    @property
    def minimum(self) -> torch.Tensor:
        """Per unit, the smallest value kept (`-inf` until `k` values were seen)."""
        if self.values.shape[1] < self.k:
            return torch.full(self.values.shape[:1], -math.inf, dtype=self.values.dtype,
                              device=self.values.device)
        return self.values[:, -1]

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        return {"k": self.k, "values": self.values}

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        self.k = int(state["k"])
        self.values = state["values"]


def _sample_bound(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Per unit of `flat` `(B, K, m)`, a value that a strided sample of its `B * m` values puts
    near rank `2k`: usually about `2k` values lie above it, so a first batch much larger than
    `k` needs no top-k over all its values. The caller checks that at least `k` do."""
    batch, units, size = flat.shape
    stride = batch * size // (4 * k)
    sample = flat[:, :, ::stride] if stride <= size else flat[:: stride // size]  # else whole maps of some images
    sample = sample.transpose(0, 1).reshape(units, -1)
    rank = min(sample.shape[1], math.ceil(2 * k * sample.shape[1] / (batch * size)))
    return sample.topk(rank, dim=1, sorted=False).values.amin(1)


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    """The `k` largest entries of each row, in descending order."""
    k = min(k, values.shape[1])
    return values.topk(k, dim=1, largest=True, sorted=True).values


def quantile_from_top(top_values: torch.Tensor, num_values: int, quantile: float) -> torch.Tensor:
    """The exact `1 - quantile` quantile of each unit from its largest values.

    Args:
        top_values: `(K, m)` the largest values of each unit in descending
            order, `m >= top_count(num_values, quantile)`.
        num_values: `n`, the number of values of each unit in the whole probe set.
        quantile: `q`.

    Returns:
        float64 tensor `(K,)`, equal to
        `torch.quantile(all_values.double(), 1 - q)` for every unit.
    """
    needed = top_count(num_values, quantile)
    if top_values.shape[1] < needed:
        raise ValueError(f"quantile needs the top {needed} values of each unit, got {top_values.shape[1]}")
    below, weight = quantile_rank(num_values, quantile)
    above = min(below + 1, num_values - 1) if weight > 0 else below
    # Ascending index i is descending index n - 1 - i.
    low = top_values[:, num_values - 1 - below].double()
    high = top_values[:, num_values - 1 - above].double()
    # torch.quantile interpolates with lerp; calling it gives the same bits.
    return torch.lerp(low, high, torch.full_like(low, weight))

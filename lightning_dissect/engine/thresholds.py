"""Exact per-unit activation thresholds over a stream of batches (SEMANTICS §2).

The references estimate the threshold with a sketch. Here it is exact: the
`1 - q` quantile with linear interpolation only reads the order statistics at
and above `floor((1 - q) * (n - 1))`, so a running top-k of `top_count(n, q)`
values per unit holds everything the quantile needs, in `O(q * n)` memory per
unit. The top `k` of a union is the top `k` of the parts' top `k`, so states of
disjoint shards (distributed ranks) merge exactly: :class:`ActivationThresholds`
is a `torchmetrics.Metric` whose reduction across processes is that merge.

The running top-k has a fast update (`top_values_update`): a bound on what can
enter each unit's top `k` (the smallest kept value, or for a large first batch
one taken from a strided sample), then only the values above it, packed per
unit, go to `topk`. The state is written in place: until it holds `k` values
the batches fill its empty slots as they come, and after that the entering
values and the state's smallest give the largest of them back to the same
slots, so the state, which grows with the probe, is never held twice; where
those smallest values are is kept from one batch to the next (:class:`Frontier`),
so most batches' updates do not search the whole state. A step
with many values to handle (the first batches after the state fills) is split by
units, so the update's own working set is bounded too (`UPDATE_VALUES`). It keeps
the same values as a plain `topk` of the state and the batch, which is what the
reference path (`engine/reference.py`) runs. The state holds the `k` largest
values in no particular order, its empty slots (`-inf`) last.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchmetrics import Metric

from lightning_dissect.engine.reference import use_reference

UPDATE_VALUES = 2**18
"""The most values one step of the fast update handles at once (values above the bound, or a batch's
rows): its working set, some tens of bytes a value, stays within a few tens of MiB whatever the probe."""
FRONTIER_VALUES = 2**18
"""How many of a full state's smallest values, over all units, a `Frontier` keeps where the state allows (or four
times a batch's entering values per unit, where that is more): at most 8 MiB whatever the probe, and at most a
`FRONTIER_SHARE` of the state's values (a sixteenth of its bytes: int32 slots, float32 copies), unless a batch's
entering values need more (they are at most `UPDATE_VALUES` here: 2 MiB)."""
FRONTIER_SHARE = 32


class Frontier:
    """Where a full state's smallest values are, kept from one update to the next.

    Once the state is full, a batch's few entering values (`w` per unit) replace the `w` smallest of the
    unit's `k` kept values. Finding those is a search of the whole state, `O(k)` per unit, and `k`
    grows with the probe: every batch would cost more on a larger probe. A frontier is the result of
    one such search kept for the next batches: per unit, the slots `slots` `(K, m)` of its `m`
    smallest values when searched, a copy of the values in them (`values`, kept up to date: a batch
    reads `m` values in a row, not `m` scattered over a state of hundreds of MiB), and `ceiling`
    `(K,)`, the largest of the `m` when searched. No other slot holds
    a value below `ceiling`, and no other slot is written while the frontier lasts, so as long as the
    `w` smallest values in `slots` are `<= ceiling` they are the `w` smallest of the whole row: a batch
    costs `O(m)`, and the state is searched again only when the entering values have used up the
    frontier (`take` refuses) or the state was written by anything else (another tensor, or its
    `_version` moved on).
    """

    def __init__(self) -> None:
        self._state: weakref.ref[torch.Tensor] | None = None
        self._version = -1
        self.slots = torch.zeros(0, 0, dtype=torch.int32)
        self.values = self.ceiling = torch.zeros(0)

    def __getstate__(self) -> dict:  # pickled or copied with its metric: found again on the next update
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()  # type: ignore[misc]

    def matches(self, top: torch.Tensor) -> bool:
        """Whether this frontier was found on `top` and nothing has written to `top` since."""
        return self._state is not None and self._state() is top and top._version == self._version

    def find(self, top: torch.Tensor, width: int) -> None:
        """Search `top` `(K, k)` (full) for its smallest values: `FRONTIER_VALUES` over all units or room for four
        times `width` entering values per unit, at most a `FRONTIER_SHARE` of the state, at least `width`."""
        units, k = top.shape
        size = min(k, max(width, 1, min(max(4 * width, FRONTIER_VALUES // units), k // FRONTIER_SHARE)))
        smallest = top.topk(size, dim=1, largest=False, sorted=False)
        # int32 slots: a state row is far shorter than 2^31 (the gathers index with int64).
        self.slots, self.values = smallest.indices.int(), smallest.values
        self.ceiling = smallest.values.amax(1)
        self._state, self._version = weakref.ref(top), top._version

    def bound(self) -> torch.Tensor:
        """A value no larger than each unit's smallest kept value, `(K,)`: only values above it can enter."""
        return torch.minimum(self.values.amin(1), self.ceiling)

    def take(self, top: torch.Tensor, candidates: torch.Tensor) -> bool:
        """`_merge_in_place(top, candidates)` searching the frontier only; False (nothing written) where the
        `w` smallest values in the frontier may not be the row's `w` smallest."""
        width = candidates.shape[1]
        if width > self.slots.shape[1]:
            return False
        smallest = self.values.topk(width, dim=1, largest=False, sorted=False)
        if not bool((smallest.values.amax(1) <= self.ceiling).all()):
            return False
        merged = torch.cat([smallest.values, candidates], dim=1).topk(width, dim=1, sorted=False).values
        self.values.scatter_(1, smallest.indices, merged)
        top.scatter_(1, self.slots.gather(1, smallest.indices).long(), merged)
        self._version = top._version
        return True


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


def quantile_from_top(top_values: torch.Tensor, num_values: int, quantile: float) -> torch.Tensor:
    """The exact `1 - quantile` quantile of each unit from its largest values.

    Args:
        top_values: `(K, m)` the `m` largest values of each unit, in any order,
            `m >= top_count(num_values, quantile)`; where fewer than `m` values were seen, the
            rest of the row holds `-inf`.
        num_values: `n`, the number of values of each unit in the whole probe set.
        quantile: `q`.

    Returns:
        float64 tensor `(K,)`, equal to
        `torch.quantile(all_values.double(), 1 - q)` for every unit.
    """
    needed = top_count(num_values, quantile)
    kept = top_values.shape[1]
    if kept < needed:
        raise ValueError(f"quantile needs the top {needed} values of each unit, got {kept}")
    below, weight = quantile_rank(num_values, quantile)
    above = min(below + 1, num_values - 1) if weight > 0 else below
    # Ascending index i of all n values is descending index n - 1 - i, which among the m kept values is
    # ascending index m - n + i: the two order statistics are among the kept values' few smallest.
    smallest = top_values.topk(kept - num_values + above + 1, dim=1, largest=False, sorted=True).values
    low = smallest[:, kept - num_values + below].double()
    high = smallest[:, kept - num_values + above].double()
    # torch.quantile interpolates with lerp; calling it gives the same bits.
    return torch.lerp(low, high, torch.full_like(low, weight))


def top_values_update(top: torch.Tensor, maps: torch.Tensor, seen: int, frontier: Frontier | None = None
                      ) -> torch.Tensor:
    """The `k` largest values of each unit among `top` and a batch of maps, in no particular order.

    Exact whichever way it is computed: the same values as
    `torch.cat([top, maps.transpose(0, 1).reshape(K, -1)], 1).topk(k).values`, which is what
    the reference path runs. The fast path takes a bound that at least `k` values of each unit
    exceed (the smallest kept value once `k` values were seen, or for a large first batch a
    value from a strided sample of it) and sends only the values above it, packed per unit,
    to `topk`, without copying the batch into unit order. The state is updated in `top` itself:
    its empty slots take the batch's values as they are, and once it is full the entering
    values replace its smallest (`_merge_in_place`; with a `frontier`, found among the slots of the
    smallest values a previous update found, so most batches do not search the whole state). A
    step with more than `UPDATE_VALUES` values to handle (the first batches after the state fills,
    when many values still enter) is split by units, so the working set stays bounded however large
    the state and the batch.

    Args:
        top: `(K, k)` the state: its values in any order, the `k - seen` slots not filled yet
            (`-inf`) last. Changed in place on the fast path.
        maps: `(B, K, ...)` a batch, units on axis 1.
        seen: how many values of each unit `top` has seen (`k - seen` of its slots are empty).
        frontier: kept by the caller from one update of `top` to the next (`Frontier`), or None.

    Returns:
        The new state, `(K, k)`: `top` itself on the fast path, a new tensor on the reference path.
    """
    k = top.shape[1]
    flat = maps.reshape(maps.shape[0], maps.shape[1], -1).to(top.dtype)
    if use_reference() or k == 0:
        rows = flat.transpose(0, 1).reshape(flat.shape[1], -1)
        return _top(_with_state(top, rows, seen), k)
    _update_in_place(top, flat, seen, frontier)
    return top


def _update_in_place(top: torch.Tensor, flat: torch.Tensor, seen: int, frontier: Frontier | None = None) -> None:
    """`top_values_update`'s fast path: `flat` `(B, K, m)` into `top` `(K, k)`, in place."""
    batch, units, size = flat.shape
    k = top.shape[1]
    full = seen >= k
    bound = None
    if full:
        # Only values above a unit's smallest kept value can enter its top k (an equal one
        # would replace an equal one).
        bound = frontier.bound() if frontier is not None and frontier.matches(top) else top.amin(dim=1)
    elif seen == 0 and batch * size >= 8 * k:
        bound = _sample_bound(flat, k)
    if bound is not None:
        above = flat > bound.view(1, units, 1)
        passing = int(above.count_nonzero())
        if passing == 0 and full:
            return
        if units > 1 and passing > UPDATE_VALUES:
            del above
            return _split(top, flat, seen, passing)
        # Usually few values pass: each unit's, packed left into a (K, width) block padded with -inf,
        # go to the top-k instead of the whole batch.
        image, unit, column = above.nonzero(as_tuple=True)
        del above
        # nonzero lists the values image by image, unit by unit: `runs` of one (image, unit) each.
        run = image * units + unit
        runs = torch.bincount(run, minlength=batch * units)
        per_image = runs.view(batch, units)
        counts = per_image.sum(0)
        # A sampled bound counts only where every unit has k values above it.
        if full or bool((counts >= k).all()):
            width = int(counts.max())
            if width < batch * size // 2:
                if units > 1 and units * width > UPDATE_VALUES:
                    del image, unit, column, run
                    return _split(top, flat, seen, units * width)
                # A value's place in its unit's row: the unit's values in earlier images, then its rank in its run.
                earlier = (per_image.cumsum(0) - per_image).view(-1)
                position = (torch.arange(run.shape[0], device=run.device) - (runs.cumsum(0) - runs)[run]
                            + earlier[run])
                packed = torch.full((units, width), -math.inf, dtype=flat.dtype, device=flat.device)
                packed[unit, position] = flat[image, unit, column]
                del image, unit, column, run, position, earlier
                if full and width < k and frontier is not None:
                    if not (frontier.matches(top) and frontier.take(top, packed)):
                        frontier.find(top, width)
                        taken = frontier.take(top, packed)
                        assert taken, "a frontier just found holds its rows' smallest values"
                elif full and width < k:
                    _merge_in_place(top, packed)
                else:
                    top.copy_(_top(_with_state(top, packed, seen), k))
                return
        del image, unit, column, run
    if units > 1 and units * batch * size > UPDATE_VALUES:
        return _split(top, flat, seen, units * batch * size)
    rows = flat.transpose(0, 1).reshape(units, batch * size)
    if seen < k:
        # The empty slots take the batch's first values as they are; the rest is merged.
        take = min(k - seen, rows.shape[1])
        top[:, seen : seen + take] = rows[:, :take]
        rows = rows[:, take:]
        if not rows.shape[1]:
            return
        seen = k
    if rows.shape[1] < k:
        _merge_in_place(top, rows)
    else:
        top.copy_(_top(_with_state(top, rows, seen), k))


def _split(top: torch.Tensor, flat: torch.Tensor, seen: int, values: int) -> None:
    """`_update_in_place` on groups of units, about `UPDATE_VALUES` of the step's `values` each (exact:
    every unit's top k is its own)."""
    units = top.shape[0]
    step = -(-units // min(units, -(-values // UPDATE_VALUES)))
    for start in range(0, units, step):
        _update_in_place(top[start : start + step], flat[:, start : start + step], seen)


def _with_state(top: torch.Tensor, candidates: torch.Tensor, seen: int) -> torch.Tensor:
    """The state's values and the batch's candidates `(K, m)`, side by side; an empty state (all
    `-inf`) is left out where the candidates alone fill `k` columns."""
    if seen == 0 and candidates.shape[1] >= top.shape[1]:
        return candidates
    return torch.cat([top, candidates], dim=1)


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


def _merge_in_place(top: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The top `k` of each row of `top` `(K, k)` and `candidates` `(K, w)` (`w < k`, padded with
    `-inf`), written into `top`.

    The `w` smallest of a row and its candidates give their `w` largest back to the same slots:
    a dropped value is among the `w` smallest of those `2w`, so no larger than the largest of the
    row's `w` smallest, which no kept slot is below. Memory: `(K, w)`, not the state again.
    """
    smallest = top.topk(candidates.shape[1], dim=1, largest=False, sorted=False)
    merged = torch.cat([smallest.values, candidates], dim=1).topk(candidates.shape[1], dim=1, sorted=False).values
    return top.scatter_(1, smallest.indices, merged)


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    """The `k` largest entries of each row, in descending order (a state's empty slots last)."""
    return values.topk(k, dim=1, largest=True, sorted=True).values


def _empty_top(top: torch.Tensor) -> torch.Tensor:
    """An empty state like `top`: one `-inf` seen as its shape (`reset` clones it into a full state)."""
    return torch.full((), -math.inf, dtype=top.dtype, device=top.device).expand(top.shape)


def merge_top_values(states: torch.Tensor) -> torch.Tensor:
    """The exact merge of running top-k states of disjoint shards: `(P, K, k)` stacked -> `(K, k)`.

    The top `k` of a union is the top `k` of the parts' top `k` (empty slots hold `-inf`
    and sort last, where a state keeps them). Used by torchmetrics as
    `ActivationThresholds.top`'s `dist_reduce_fx`.
    """
    parts, units, k = states.shape
    return _top(states.permute(1, 0, 2).reshape(units, parts * k), k)


class ActivationThresholds(Metric):
    """The exact threshold `T_u` of every unit over a stream of batches (SEMANTICS §2).

    `T_u = torch.quantile(A[:, u].flatten().double(), 1 - q)` over every value of
    unit `u` seen, from a running top-k of `top_count(num_values, quantile)` values
    per unit, in no particular order (empty slots last). Exact; memory `K x k`
    float32 values, updated in place. Across processes the states merge exactly
    (:func:`merge_top_values`), so a sharded run gives the single-process
    thresholds bit for bit.

    Args:
        num_units: `K`.
        num_values: `n`, the number of values each unit will see in all (over all
            processes): `N * h * w` for `N` images of `h x w` maps. It sizes the
            state; `compute` reads the quantile of the values actually seen,
            which may be fewer.
        quantile: `q`, the fraction of each unit's values above its threshold.
        kwargs: passed to `torchmetrics.Metric` (`sync_on_compute`, `dist_sync_fn`, ...).

    Example:
        >>> thresholds = ActivationThresholds(num_units=2, num_values=2 * 3 * 3, quantile=0.25)
        >>> maps = torch.arange(36.0).view(2, 2, 3, 3)
        >>> thresholds.update(maps[:1])
        >>> thresholds.update(maps[1:])
        >>> thresholds.compute()
        tensor([21.7500, 30.7500], dtype=torch.float64)
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None
    top: torch.Tensor
    seen: torch.Tensor

    def __init__(self, num_units: int, num_values: int, quantile: float = 0.005, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_units, int) or num_units < 1:
            raise ValueError(f"num_units={num_units!r} must be a positive integer")
        if not isinstance(num_values, int) or num_values < 1:
            raise ValueError(f"num_values={num_values!r} must be a positive integer")
        if not isinstance(quantile, (int, float)) or not 0 < quantile < 1:
            raise ValueError(f"quantile={quantile!r} must be a number in (0, 1), e.g. 0.005 for the top 0.5%")
        self.num_units, self.num_values, self.quantile = num_units, num_values, float(quantile)
        self.k = top_count(num_values, quantile)
        self.add_state("top", torch.full((num_units, self.k), -math.inf), dist_reduce_fx=merge_top_values,
                       persistent=True)
        self.add_state("seen", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum", persistent=True)
        # torchmetrics keeps a copy of every state's default for `reset`: for `top`, the one state that
        # grows with the probe, a full copy would hold it twice. One -inf seen as (K, k) resets the same.
        self._defaults["top"] = _empty_top(self.top)
        self._frontier = Frontier()  # not a state: found again on the next update wherever `top` was replaced

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = "") -> ActivationThresholds:
        """`.to(device)` and the like (torchmetrics'), `top`'s default kept one value (not moved whole)."""
        super()._apply(fn, exclude_state=(*exclude_state, "top"))  # applies to self, returns it
        if "top" not in exclude_state:
            moved = fn(self.top)
            if moved.dtype == self.top.dtype:  # moved, not cast: the state stays float32 (as torchmetrics' guard)
                self.top = moved
                self._defaults["top"] = _empty_top(moved)
        return self

    def update(self, maps: torch.Tensor) -> None:
        """Add a batch of activations `(B, K, h, w)` (any trailing shape; units on axis 1)."""
        if maps.ndim < 2 or maps.shape[1] != self.num_units:
            raise ValueError(f"maps has shape {tuple(maps.shape)}; expected (B, {self.num_units}, ...)")
        self.top = top_values_update(self.top, maps, int(self.seen), self._frontier)
        self.seen += maps[:, 0].numel()

    def compute(self) -> torch.Tensor:
        """float64 `(K,)`: the `1 - q` quantile of every unit's values seen so far, `quantile_from_top`
        of the states (torchmetrics squeezes a single unit's to a 0-d tensor)."""
        return quantile_from_top(self.top, int(self.seen), self.quantile)

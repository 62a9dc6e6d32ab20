"""`ActivationCache`: the first batches' unit maps, kept in memory between the passes up to a budget.

Pass two needs every batch's unit maps again, exactly as pass one saw them. The first batches, as
many as fit `activation_cache_bytes`, wait in memory (the rest go to the spill file,
`engine/spill.py`, or are computed again). They are copied into one block per layer, sized at the
first batch for the batches that fit, not kept as the tensors the model returned: a kept output is
memory the model cannot have back, so every batch it would take fresh memory and fault it in page by
page. Where the allocator keeps and reuses freed memory, that made the model itself run a fifth
slower inside a dissection than in a plain pass (docs/performance.md, "The activation cache"); with the
blocks the model reuses its own buffers batch after batch. The copies are exact: pass two reads pass
one's very bits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


class ActivationCache:
    """Unit maps `{layer: (B, K, h, w)}` of the first batches, in one block per layer.

    Args:
        budget_bytes: the most bytes kept (`activation_cache_bytes`).
        batch_sizes: the images of every batch of the pass, in order.

    Example:
        >>> cache = ActivationCache(budget_bytes=64, batch_sizes=[2, 2, 1])
        >>> [cache.keep(n, {"l": torch.full((size, 2, 2, 2), float(n))}) for n, size in enumerate([2, 2, 1])]
        [True, False, False]
        >>> len(cache), cache.take(0)["l"].shape
        (1, torch.Size([2, 2, 2, 2]))
    """

    def __init__(self, budget_bytes: int, batch_sizes: Sequence[int]) -> None:
        self.budget_bytes = budget_bytes
        self.batch_sizes = list(batch_sizes)
        self.blocks: dict[str, torch.Tensor] = {}
        self.starts = [0]
        self.fits = -1  # how many leading batches fit the budget, known at the first batch
        self.kept = 0

    def __len__(self) -> int:
        """The batches kept."""
        return self.kept

    def keep(self, number: int, maps: Mapping[str, torch.Tensor]) -> bool:
        """Copy batch `number`'s unit maps in if it is the next batch and fits the budget; whether it was kept."""
        if self.fits < 0:
            self._allocate(maps)
        if number != self.kept or number >= self.fits:
            return False
        start, end = self.starts[number], self.starts[number + 1]
        for name, value in maps.items():
            self.blocks[name][start:end].copy_(value)
        self.kept += 1
        return True

    def take(self, number: int) -> dict[str, torch.Tensor]:
        """Batch `number`'s unit maps (views of the blocks); the blocks are let go with the last batch."""
        if not 0 <= number < self.kept:
            raise IndexError(f"batch {number} is not kept (kept: {self.kept})")
        start, end = self.starts[number], self.starts[number + 1]
        maps = {name: block[start:end] for name, block in self.blocks.items()}
        if number == self.kept - 1:
            self.blocks = {}  # freed once pass two is done with the returned views
        return maps

    def _allocate(self, maps: Mapping[str, torch.Tensor]) -> None:
        """The blocks for the leading batches whose unit maps fit the budget together."""
        image_bytes = sum(value[0].numel() * value.element_size() for value in maps.values())
        total, self.fits = 0, 0
        for size in self.batch_sizes:
            if total + size * image_bytes > self.budget_bytes:
                break
            total += size * image_bytes
            self.fits += 1
            self.starts.append(self.starts[-1] + size)
        if self.fits:
            self.blocks = {name: torch.empty((self.starts[-1], *value.shape[1:]), dtype=value.dtype,
                                             device=value.device) for name, value in maps.items()}

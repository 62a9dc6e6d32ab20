"""What a dissection may cost a training run: the figure budget and the per-dissection time budget.

- `FigureBudget`: drawing unit strips and figures may take at most a fraction of the wall time
  since the first dissection. The next drawing is expected to take as long as the last one; a
  dissection whose drawing would exceed the budget logs its scalars, tables and files but no
  figures. The first dissection always draws.
- `probe_size_within`: when one dissection took longer than `max_seconds`, the probe size that
  later dissections use (a subset of the same draw, cut in proportion).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class FigureBudget:
    """Strips and figures within `fraction` of the wall time since the first dissection.

    Args:
        fraction: e.g. 0.02; None draws at every dissection.
        clock: seconds (default `time.perf_counter`), replaceable in tests.

    Example:
        >>> now = [0.0]
        >>> budget = FigureBudget(0.1, clock=lambda: now[0])
        >>> budget.due()               # the first dissection always draws
        True
        >>> budget.spent(1.0)          # it took 1 s
        >>> now[0] = 15.0; budget.due()   # 1 s drawn + 1 s expected > 10% of 15 s
        False
        >>> now[0] = 20.0; budget.due()
        True
    """

    def __init__(self, fraction: float | None, clock: Callable[[], float] = time.perf_counter) -> None:
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                     or not fraction > 0):
            raise ValueError(f"figure_budget={fraction!r} must be a positive fraction of wall time (e.g. 0.02) "
                             "or None (figures at every dissection)")
        self.fraction = fraction
        self.clock = clock
        self.started: float | None = None  # wall time of the first dissection
        self.seconds = 0.0  # spent drawing so far
        self.last_seconds = 0.0  # the last drawing: what the next one is expected to take

    def due(self) -> bool:
        """Whether this dissection may draw (starts the clock at the first call)."""
        now = self.clock()
        if self.started is None:
            self.started = now
        expected = self.seconds + self.last_seconds
        return self.fraction is None or expected <= self.fraction * (now - self.started)

    def spent(self, seconds: float) -> None:
        """Record a drawing's wall time."""
        self.last_seconds = seconds
        self.seconds += seconds


def probe_size_within(seconds: float, max_seconds: float | None, size: int) -> int | None:
    """The probe size that brings a dissection of `seconds` on `size` images within `max_seconds`.

    Returns:
        The smaller size, or None when no cut is needed (or `max_seconds` is None).
    """
    if max_seconds is None or seconds <= max_seconds:
        return None
    cut = max(1, math.floor(size * max_seconds / seconds))
    return cut if cut < size else None


def validate_max_seconds(max_seconds: float | None) -> None:
    """Raise `ValueError` naming `max_seconds` when it is not a positive number or None."""
    if max_seconds is not None and (isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float))
                                    or not max_seconds > 0):
        raise ValueError(f"max_seconds={max_seconds!r} must be a positive number of seconds or None")

"""What dissections may cost a training run: one overhead budget, and the share of it that figures take.

- `OverheadBudget` (`max_overhead`, default 5%): everything the callback does (dissections, figures,
  files) stays within a fraction of the fit's wall time. It sizes the probe once, before the first
  dissection, and then skips scheduled dissections that would not fit, the earliest first; the
  first and the last dissection of a run always happen.
- `FigureBudget` (`figure_budget`, default 2%): within that, drawing unit strips and figures may
  take at most a fraction of the wall time since the first dissection. The next drawing is expected
  to take as long as the last one; a dissection whose drawing would exceed it logs its scalars,
  tables and files but no figures. The first and the last dissection always draw.
- `max_seconds`: the probe is sized once so that one dissection takes about that long (the smaller
  of this and the overhead budget's size).
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


def validate_max_seconds(max_seconds: float | None) -> None:
    """Raise `ValueError` naming `max_seconds` when it is not a positive number or None."""
    if max_seconds is not None and (isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float))
                                    or not max_seconds > 0):
        raise ValueError(f"max_seconds={max_seconds!r} must be a positive number of seconds or None")


# Training steps after which the measured rate, not the plan's estimate, projects the fit's length.
MEASURED_AFTER_STEPS = 20


class OverheadBudget:
    """The callback's own time (dissections, figures, files) within `max_overhead` of the fit's wall time.

    Two decisions, the first made once and the second at every scheduled dissection:

    - `plan_probe_size`: before the first dissection, the probe size that lets every scheduled
      dissection fit the budget, from a measured calibration (seconds per probe image of a real
      dissection), an estimate of a training step and the number of steps. The size is kept for the
      whole run, so numbers at different steps stay comparable; it is never below `smallest`
      (thresholds need enough values to be stable), and then dissections are skipped instead.
    - `keep`: whether a scheduled dissection fits, measured: the seconds spent so far and the mean
      seconds of a dissection against `max_overhead` of the fit's projected wall time (the training
      rate measured so far, to the last step). What does not fit is skipped, the earliest scheduled
      dissections first (log-spaced schedules lose their dense early steps); the first and the last
      dissection of a run are never skipped.

    Args:
        max_overhead: the fraction of the fit's wall time, e.g. 0.05; None: no budget.
        clock: seconds (default `time.perf_counter`), replaceable in tests.
    """

    def __init__(self, max_overhead: float | None, clock: Callable[[], float] = time.perf_counter) -> None:
        if max_overhead is not None and (isinstance(max_overhead, bool) or not isinstance(max_overhead, (int, float))
                                         or not 0 < max_overhead < 1):
            raise ValueError(f"max_overhead={max_overhead!r} must be a fraction of the fit's wall time in (0, 1), "
                             "e.g. 0.05, or None (every scheduled dissection on the whole probe)")
        self.max_overhead = max_overhead
        self.clock = clock
        self.started: float | None = None  # the fit's start
        self.own_seconds = 0.0  # everything the callback did
        self.dissections = 0
        self.dissection_seconds = 0.0  # of those, whole dissections (engine, files, figures)
        self.step_seconds: float | None = None  # the plan's estimate of a training step, until steps are measured

    def start(self) -> None:
        """Start the fit's clock (at the first training batch)."""
        if self.started is None:
            self.started = self.clock()

    def spent(self, seconds: float, dissection: bool = True) -> None:
        """Add the callback's own seconds; `dissection`: they were one whole dissection."""
        self.own_seconds += seconds
        if dissection:
            self.dissections += 1
            self.dissection_seconds += seconds

    @property
    def share(self) -> float:
        """The callback's share of the fit's wall time so far."""
        if self.started is None:
            return 0.0
        elapsed = self.clock() - self.started
        return self.own_seconds / elapsed if elapsed > 0 else 0.0

    def plan_probe_size(self, seconds_per_image: float, step_seconds: float, total_steps: float, dissections: int,
                        largest: int, smallest: int) -> int:
        """The probe size for the whole run.

        Args:
            seconds_per_image: a dissection's measured cost per probe image.
            step_seconds: the expected wall time of one training step.
            total_steps: the run's training steps (`trainer.estimated_stepping_batches`; inf: unknown).
            dissections: how many the schedule asks for, the first and the last included.
            largest: the probe's size (the most there is).
            smallest: the least that keeps thresholds stable.

        Returns:
            `largest` without a budget or with an unknown length of the run; else the size at which
            `dissections` dissections take `max_overhead` of the fit, within `[min(smallest, largest), largest]`.
        """
        self.step_seconds = step_seconds
        if self.max_overhead is None or not math.isfinite(total_steps) or seconds_per_image <= 0:
            return largest
        training = step_seconds * total_steps
        own = self.max_overhead / (1 - self.max_overhead) * training  # own <= f * (training + own)
        size = math.floor(own / (max(dissections, 1) * seconds_per_image))
        return max(min(smallest, largest), min(size, largest))

    def keep(self, steps_done: int, total_steps: float, later: int) -> bool:
        """Whether the dissection due now fits the budget (see the class docstring).

        Args:
            steps_done: training steps taken so far (the step of this dissection, > 0).
            total_steps: the run's training steps (inf: unknown: the fit so far is the measure).
            later: how many scheduled dissections come after this one, the last dissection of the run
                included.
        """
        if self.max_overhead is None or self.started is None or self.dissections == 0 or steps_done <= 0:
            return True
        elapsed = self.clock() - self.started
        training = max(elapsed - self.own_seconds, 0.0)
        if math.isfinite(total_steps) and total_steps > steps_done:
            if steps_done < MEASURED_AFTER_STEPS and self.step_seconds is not None:
                # The first steps are slow (data loaders starting, caches warming): their rate would promise
                # a long fit and spend the budget on the earliest dissections. Until then, the plan's estimate.
                training = self.step_seconds * total_steps
            else:
                training *= total_steps / steps_done  # the whole fit at the rate measured so far
        own = self.max_overhead / (1 - self.max_overhead) * training
        per_dissection = self.dissection_seconds / self.dissections
        affordable = math.floor((own - self.own_seconds) / per_dissection)  # this one, the later ones, the last
        return later + 1 <= affordable

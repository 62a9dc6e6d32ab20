"""What dissections may cost a training run: one overhead budget, and the share of it that figures take.

- `OverheadBudget` (`max_overhead`, default 5%): everything the callback does (dissections, figures,
  files) stays within a fraction of the fit's wall time. It sizes the probe once, before the first
  dissection, and then skips scheduled dissections that would not fit, the earliest first (the
  step-0 dissection too, in a run too short to afford it); the last dissection of a run always happens.
- `FigureBudget` (`figure_budget`, default 2%): within that, drawing unit strips and figures may
  take at most a fraction of the wall time since the first dissection. The next drawing is expected
  to take as long as the last one; a dissection whose drawing would exceed it logs its scalars,
  tables and files but no figures. The run's first and last dissections always draw.
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


# Before a drawing (figures and strips) is measured, one is expected to take this many dissections: drawings
# do not shrink with the probe as dissections do, and took 1.4 to 1.8 times a dissection in bench_training's
# one-layer run, 5 to 6 times in its four-layer run of a small CNN (docs/performance.md); the larger holds.
DRAWING_PER_DISSECTION = 6.0

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
    - `keep`: whether a scheduled dissection fits, measured: the seconds spent so far, the mean
      seconds of a dissection and the seconds of the last drawing (figures and strips) against
      `max_overhead` of the fit's projected wall time (the training rate measured so far, to the last
      step). Counted are this dissection, every later one, and the drawings still due: the last
      dissection's, and this one's when it is the run's first (both always draw). Before any
      dissection is measured, one costs what the calibration predicts (`expected_seconds`) and a
      drawing `drawing_per_dissection` dissections (`DRAWING_PER_DISSECTION`). What does not fit
      is skipped, the earliest scheduled dissections first (log-spaced schedules lose their dense
      early steps, and a short run its step 0); the last dissection of a run is never skipped (the
      caller does not ask).

    Args:
        max_overhead: the fraction of the fit's wall time, e.g. 0.05; None: no budget.
        clock: seconds (default `time.perf_counter`), replaceable in tests.
        drawing_per_dissection: a drawing's seconds in dissections, until one is measured.
    """

    def __init__(self, max_overhead: float | None, clock: Callable[[], float] = time.perf_counter,
                 drawing_per_dissection: float = DRAWING_PER_DISSECTION) -> None:
        if max_overhead is not None and (isinstance(max_overhead, bool) or not isinstance(max_overhead, (int, float))
                                         or not 0 < max_overhead < 1):
            raise ValueError(f"max_overhead={max_overhead!r} must be a fraction of the fit's wall time in (0, 1), "
                             "e.g. 0.05, or None (every scheduled dissection on the whole probe)")
        self.max_overhead = max_overhead
        self.clock = clock
        self.drawing_per_dissection = drawing_per_dissection
        self.started: float | None = None  # the fit's start
        self.own_seconds = 0.0  # everything the callback did
        self.dissections = 0
        self.dissection_seconds = 0.0  # of those, the dissections' own (engine, files), drawings left out
        self.last_drawing: float | None = None  # the seconds of the last drawing (figures and strips)
        self.expected_seconds: float | None = None  # one dissection, until one is measured (the calibration's)
        self.step_seconds: float | None = None  # the plan's estimate of a training step, until steps are measured

    def start(self) -> None:
        """Start the fit's clock (at the first training batch)."""
        if self.started is None:
            self.started = self.clock()

    def spent(self, seconds: float, dissection: bool = True, drawing: float = 0.0) -> None:
        """Add the callback's own seconds; `dissection`: they were one whole dissection; `drawing`: of
        them, the seconds its figures and strips took (0: nothing drawn)."""
        self.own_seconds += seconds
        if dissection:
            self.dissections += 1
            self.dissection_seconds += seconds - drawing
        if drawing > 0:
            self.last_drawing = drawing

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

    def _fit_training_seconds(self, steps_done: int, total_steps: float) -> float:
        """The fit's training seconds (the callback's left out), projected to its last step."""
        assert self.started is not None
        training = max(self.clock() - self.started - self.own_seconds, 0.0)
        if math.isfinite(total_steps) and total_steps > steps_done:
            if steps_done < MEASURED_AFTER_STEPS and self.step_seconds is not None:
                # The first steps are slow (data loaders starting, caches warming): their rate would promise
                # a long fit and spend the budget on the earliest dissections. Until then, the plan's estimate.
                return self.step_seconds * total_steps
            if steps_done > 0:
                return training * total_steps / steps_done  # the whole fit at the rate measured so far
        return training

    def _costs(self) -> tuple[float, float] | None:
        """`(a dissection's seconds, a drawing's seconds)`: measured, or the calibration's estimate."""
        per = self.dissection_seconds / self.dissections if self.dissections else self.expected_seconds
        if per is None:
            return None
        return per, self.last_drawing if self.last_drawing is not None else self.drawing_per_dissection * per

    def keep(self, steps_done: int, total_steps: float, later: int, first: bool = False) -> bool:
        """Whether the dissection due now fits the budget (see the class docstring).

        Args:
            steps_done: training steps taken so far (the step of this dissection).
            total_steps: the run's training steps (inf: unknown: the fit so far is the measure).
            later: how many scheduled dissections come after this one, the last dissection of the run
                included.
            first: no dissection of the run happened yet (this one would draw).
        """
        costs = self._costs()
        if self.max_overhead is None or self.started is None or costs is None:
            return True
        if steps_done <= 0 and (self.step_seconds is None or not math.isfinite(total_steps)):
            return True  # before training, with no estimate of the fit's length: nothing to weigh it against
        per, drawing = costs
        own = self.max_overhead / (1 - self.max_overhead) * self._fit_training_seconds(steps_done, total_steps)
        needed = (later + 1) * per + (2 if first and later else 1) * drawing  # the last one's drawing, this one's
        return self.own_seconds + needed <= own

    def expected(self, scheduled: int, total_steps: float) -> tuple[int, float] | None:
        """At the plan (before the first dissection): how many of `scheduled` dissections the budget is
        expected to afford (at least the last), and their share of the fit; None: not known."""
        costs = self._costs()
        if self.step_seconds is None or not math.isfinite(total_steps) or costs is None:
            return None
        per, drawing = costs
        training = self.step_seconds * total_steps
        count = max(scheduled, 1)
        if self.max_overhead is not None:
            own = self.max_overhead / (1 - self.max_overhead) * training
            while count > 1 and self.own_seconds + count * per + 2 * drawing > own:
                count -= 1
        spent = self.own_seconds + count * per + min(count, 2) * drawing
        return count, spent / (training + spent)

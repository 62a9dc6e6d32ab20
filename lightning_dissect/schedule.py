"""When to dissect during training: every N steps, every N epochs, log-spaced steps, or listed steps.

A schedule answers one question, `due(step, epoch)`, where `step` counts the
optimizer steps taken so far (Lightning's `trainer.global_step`) and `epoch` is
the index of the epoch that has just ended, or None when the question is asked
after a training step. Step 0 (before any optimizer step) is the fit-start
dissection of the untrained or pre-trained model, taken when `at_start` is true.

Schedules hold no state, so a resumed run asks the same questions and gets the
same answers as an uninterrupted one.

Example:
    >>> log_spaced(first=1, factor=2.2).steps(100)
    [0, 1, 2, 4, 9, 20, 44, 97]
    >>> every_n_steps(50).due(100)
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable

# The iterations at which the paper dissected AlexNet-Places205 snapshots (SEMANTICS §7).
PAPER_ITERATIONS = (1, 2, 4, 9, 20, 44, 99, 223, 492, 1108, 2446, 5509, 12164, 27396, 60491, 136238, 300818,
                    600818, 1200818, 2400818)


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


class Schedule:
    """Base class: decides whether a dissection is due.

    Args:
        at_start: dissect at step 0, before the first optimizer step.
    """

    def __init__(self, at_start: bool = True) -> None:
        if not isinstance(at_start, bool):
            raise ValueError(f"at_start={at_start!r} must be True or False")
        self.at_start = at_start

    def due(self, step: int, epoch: int | None = None) -> bool:
        """Whether to dissect now.

        Args:
            step: optimizer steps taken so far.
            epoch: the 0-based index of the epoch that has just ended, or None
                when asked after a training step (or at fit start).
        """
        if step == 0 and epoch is None:
            return self.at_start
        return self._due(step, epoch)

    def _due(self, step: int, epoch: int | None) -> bool:
        raise NotImplementedError

    def steps(self, last: int) -> list[int]:
        """The steps up to `last` (inclusive) at which a step-driven loop dissects."""
        return [step for step in range(last + 1) if self.due(step)]

    def planned_steps(self, total_steps: float, steps_per_epoch: int | None = None) -> list[int]:
        """The steps at which a run of `total_steps` optimizer steps will dissect, step 0 included
        when `at_start`; epoch schedules need `steps_per_epoch` (else only step 0 is known).
        An unknown length (inf) gives the steps known so far: none after step 0."""
        if not math.isfinite(total_steps):
            return [0] if self.at_start else []
        return self.steps(int(total_steps))

    def __repr__(self) -> str:
        arguments = ", ".join(f"{name}={value!r}" for name, value in vars(self).items() if not name.startswith("_"))
        return f"{type(self).__name__}({arguments})"


class EveryNSteps(Schedule):
    """Dissect after every `n`-th optimizer step (steps n, 2n, 3n, ...)."""

    def __init__(self, n: int, at_start: bool = True) -> None:
        super().__init__(at_start)
        self.n = _positive_int("every_n_steps", n)

    def _due(self, step: int, epoch: int | None) -> bool:
        return epoch is None and step > 0 and step % self.n == 0


class EveryNEpochs(Schedule):
    """Dissect at the end of every `n`-th training epoch (epochs n-1, 2n-1, ... counted from 0)."""

    def __init__(self, n: int, at_start: bool = True) -> None:
        super().__init__(at_start)
        self.n = _positive_int("every_n_epochs", n)

    def _due(self, step: int, epoch: int | None) -> bool:
        return epoch is not None and (epoch + 1) % self.n == 0

    def planned_steps(self, total_steps: float, steps_per_epoch: int | None = None) -> list[int]:
        start = [0] if self.at_start else []
        if not math.isfinite(total_steps) or not steps_per_epoch:
            return start
        epochs = math.ceil(total_steps / steps_per_epoch)
        return start + [min((epoch + 1) * steps_per_epoch, int(total_steps)) for epoch in range(epochs)
                        if self._due(0, epoch)]


class AtSteps(Schedule):
    """Dissect after the listed optimizer steps, e.g. the paper's `PAPER_ITERATIONS`."""

    def __init__(self, steps: Iterable[int], at_start: bool = True) -> None:
        super().__init__(at_start)
        self.at = tuple(sorted({_positive_int("steps", step) for step in steps}))
        if not self.at:
            raise ValueError("steps is empty: list at least one step, e.g. at_steps([100, 1000])")
        self._at = frozenset(self.at)

    def _due(self, step: int, epoch: int | None) -> bool:
        return epoch is None and step in self._at


class LogSpaced(Schedule):
    """Dissect at log-spaced steps: `s_0 = first`, `s_{i+1} = max(s_i + 1, round(factor * s_i))`.

    With the defaults the steps are 1, 2, 4, 9, 20, 44, 97, 213, 469, ...: the
    first six are the paper's iterations (SEMANTICS §7); later ones drift below
    them, since the paper's spacing averages about x2.23. For the paper's exact
    list use `at_steps(PAPER_ITERATIONS)`.
    """

    def __init__(self, first: int = 1, factor: float = 2.2, at_start: bool = True) -> None:
        super().__init__(at_start)
        self.first = _positive_int("first", first)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
            raise ValueError(f"factor={factor!r} must be a number above 1, e.g. 2.2")
        self.factor = float(factor)
        self._known = [self.first]
        self._known_set = {self.first}

    def _due(self, step: int, epoch: int | None) -> bool:
        if epoch is not None:
            return False
        while self._known[-1] < step:
            following = max(self._known[-1] + 1, round(self._known[-1] * self.factor))
            self._known.append(following)
            self._known_set.add(following)
        return step in self._known_set


def every_n_steps(n: int, at_start: bool = True) -> EveryNSteps:
    """Dissect after every `n`-th optimizer step, and at step 0 when `at_start`."""
    return EveryNSteps(n, at_start)


def every_n_epochs(n: int, at_start: bool = True) -> EveryNEpochs:
    """Dissect at the end of every `n`-th epoch, and at step 0 when `at_start`."""
    return EveryNEpochs(n, at_start)


def log_spaced(first: int = 1, factor: float = 2.2, at_start: bool = True) -> LogSpaced:
    """Dissect at log-spaced steps `first`, about `first * factor`, ... (see `LogSpaced`), and at step 0."""
    return LogSpaced(first, factor, at_start)


def at_steps(steps: Iterable[int], at_start: bool = True) -> AtSteps:
    """Dissect after each listed optimizer step, and at step 0 when `at_start`."""
    return AtSteps(steps, at_start)

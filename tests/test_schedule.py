"""Schedules: which steps and epoch ends a dissection is due at."""

from __future__ import annotations

import pytest

from lightning_dissect.schedule import PAPER_ITERATIONS, at_steps, every_n_epochs, every_n_steps, log_spaced


def reference_log_spaced(first: float, factor: float, last: int) -> list[int]:
    steps, step = [], first
    while step <= last:
        steps.append(step)
        step = max(step + 1, round(step * factor))
    return steps


def test_log_spaced_defaults_start_with_the_papers_first_six_iterations():
    assert log_spaced().steps(300) == [0, 1, 2, 4, 9, 20, 44, 97, 213]
    assert log_spaced().steps(44)[1:] == list(PAPER_ITERATIONS[:6])


@pytest.mark.parametrize("first,factor", [(1, 2.2), (1, 1.5), (3, 10), (5, 1.01)])
def test_log_spaced_steps_follow_the_rounded_recurrence(first, factor):
    schedule = log_spaced(first=first, factor=factor, at_start=False)
    assert schedule.steps(5000) == reference_log_spaced(first, factor, 5000)


def test_log_spaced_answers_do_not_depend_on_the_order_of_questions():
    schedule = log_spaced()
    assert schedule.due(97) and not schedule.due(98)
    assert schedule.due(9) and not schedule.due(10)  # asked after a later step: a resumed run
    assert [step for step in range(300) if log_spaced().due(step)] == log_spaced().steps(299)


def test_every_n_steps_is_due_at_multiples_and_step_zero():
    assert every_n_steps(3).steps(10) == [0, 3, 6, 9]
    assert every_n_steps(3, at_start=False).steps(10) == [3, 6, 9]


def test_step_schedules_are_never_due_at_an_epoch_end():
    for schedule in (every_n_steps(1), log_spaced(), at_steps([4])):
        assert not any(schedule.due(step, epoch=0) for step in range(10))


def test_every_n_epochs_is_due_at_the_end_of_every_nth_epoch_only():
    schedule = every_n_epochs(2)
    assert [epoch for epoch in range(7) if schedule.due(100, epoch)] == [1, 3, 5]
    assert not any(schedule.due(step) for step in range(1, 50))
    assert schedule.due(0) and not every_n_epochs(2, at_start=False).due(0)


def test_at_steps_is_due_at_the_listed_steps():
    assert at_steps([20, 5, 5], at_start=False).steps(30) == [5, 20]
    assert at_steps(PAPER_ITERATIONS).steps(500) == [0, 1, 2, 4, 9, 20, 44, 99, 223, 492]


@pytest.mark.parametrize("make,message", [
    (lambda: every_n_steps(0), "every_n_steps=0"),
    (lambda: every_n_epochs(1.5), "every_n_epochs=1.5"),
    (lambda: log_spaced(factor=1.0), "factor=1.0"),
    (lambda: log_spaced(first=0), "first=0"),
    (lambda: at_steps([]), "steps is empty"),
    (lambda: at_steps([3, -1]), "steps=-1"),
    (lambda: every_n_steps(2, at_start="yes"), "at_start='yes'"),
])
def test_bad_schedule_arguments_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_repr_shows_the_arguments():
    assert repr(log_spaced(first=2, factor=3.0)) == "LogSpaced(at_start=True, first=2, factor=3.0)"
    assert repr(every_n_steps(5)) == "EveryNSteps(at_start=True, n=5)"

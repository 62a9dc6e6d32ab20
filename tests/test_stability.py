"""The stable-probe rule (lightning_dissect/stability.py, measured in docs/performance.md)."""

from __future__ import annotations

import pytest

from lightning_dissect.stability import STABLE_PROBE_SIZE, STABLE_VALUES_ABOVE_THRESHOLD, unstable_probe


def test_a_probe_of_400_images_with_enough_values_above_the_threshold_is_stable():
    assert unstable_probe(STABLE_PROBE_SIZE, 0.005, {"layer3": 196, "layer4": 49}) is None


def test_fewer_images_than_the_rule_are_named():
    reason = unstable_probe(STABLE_PROBE_SIZE - 1, 0.005, {"layer4": 49})
    assert reason is not None and f"{STABLE_PROBE_SIZE - 1} images" in reason and "layer4" not in reason


@pytest.mark.parametrize("positions, quantile, unstable", [(4, 0.005, True), (16, 0.005, False), (16, 0.001, True)])
def test_a_layer_with_few_values_above_its_threshold_is_named(positions, quantile, unstable):
    size = 400
    reason = unstable_probe(size, quantile, {"small": positions, "large": 196})
    above = quantile * size * positions  # q * N * h * w, written out
    assert (above < STABLE_VALUES_ABOVE_THRESHOLD) == unstable
    assert (reason is not None and "'small'" in reason and f"{above:.3g} activations" in reason) == unstable
    assert reason is None or "'large'" not in reason

"""When a probe is too small for stable counts: the rule measured by `benchmarks/bench_probe_size.py`.

A dissection's numbers are exact for its probe, but the probe is a sample of the concept dataset.
On five draws of each size (docs/performance.md, "Probe size and stable counts"), probes of fewer
than 400 images gave a ResNet-shaped network with random weights several times the detectors of
the whole pool, and layers with fewer than 32 activations per unit above the threshold
(`q * N * h * w`) had thresholds that moved by more than a tenth between draws. The callback warns
once when its probe breaks either rule.
"""

from __future__ import annotations

from collections.abc import Mapping

STABLE_PROBE_SIZE = 400
STABLE_VALUES_ABOVE_THRESHOLD = 32


def values_above_threshold(probe_size: int, quantile: float, positions: int) -> float:
    """`q * N * h * w`: how many of a unit's activations lie above its threshold (SEMANTICS §2)."""
    return quantile * probe_size * positions


def unstable_probe(probe_size: int, quantile: float, positions: Mapping[str, int]) -> str | None:
    """Why a probe of `probe_size` images is too small for stable counts, or None when it is not.

    Args:
        probe_size: the probe's images.
        quantile: the dissection's `q`.
        positions: each layer's spatial positions `h * w` at the probe's input size.

    Returns:
        A sentence naming the rule each failing layer breaks, or None.

    Example:
        >>> unstable_probe(500, 0.005, {"layer4": 49})
        >>> unstable_probe(200, 0.005, {"layer3": 196, "layer4": 4})
        "200 images (fewer than 400); layer 'layer4' has 4 activations per unit above its threshold (fewer than 32)"
    """
    reasons = []
    if probe_size < STABLE_PROBE_SIZE:
        reasons.append(f"{probe_size} images (fewer than {STABLE_PROBE_SIZE})")
    for layer, count in positions.items():
        above = values_above_threshold(probe_size, quantile, count)
        if above < STABLE_VALUES_ABOVE_THRESHOLD:
            reasons.append(f"layer {layer!r} has {above:.3g} activations per unit above its threshold "
                           f"(fewer than {STABLE_VALUES_ABOVE_THRESHOLD})")
    return "; ".join(reasons) or None

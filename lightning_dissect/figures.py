"""Figures of a dissection and of its history, drawn with matplotlib's Agg canvas.

Figures are built as `matplotlib.figure.Figure` objects on an Agg canvas, never
through `pyplot`, so drawing them neither needs a display nor touches the
global figure registry of a user's session. `to_image` renders one to an RGB
array, the form every logger adapter accepts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter


def _figure(width: float = 6.0, height: float = 3.2) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100)
    figure.subplots_adjust(left=0.1, right=0.97, top=0.9, bottom=0.15)
    FigureCanvasAgg(figure)
    return figure


def detectors_per_category(summary: Mapping[str, float], categories: Sequence[str], title: str) -> Figure:
    """Bar chart of detectors and unique concepts per category (SEMANTICS §5).

    Args:
        summary: `LayerDissection.summary()` (needs `detectors/<category>` and
            `unique_concepts/<category>`).
        categories: the categories, in `category.csv` order.
        title: the figure title, e.g. the layer name and step.
    """
    figure = _figure()
    axes = figure.add_subplot()
    positions = np.arange(len(categories))
    detectors = [summary[f"detectors/{name}"] for name in categories]
    unique = [summary[f"unique_concepts/{name}"] for name in categories]
    axes.bar(positions - 0.2, detectors, width=0.4, label="detectors")
    axes.bar(positions + 0.2, unique, width=0.4, label="unique concepts")
    axes.set_xticks(positions, list(categories))
    axes.set_ylabel("count")
    # Fixed places: "best" legend placement and automatic title placement are slow to compute.
    axes.set_title(title, y=1.0)
    axes.legend(loc="upper right")
    return figure


def emergence_curve(steps: Sequence[int], unique_concepts: Mapping[str, Sequence[float]], title: str) -> Figure:
    """Unique concepts per category against the training step, on a log step axis.

    Step 0 (the fit-start dissection) is drawn at the left edge of a symlog
    axis, so the untrained model is part of the curve.

    Args:
        steps: the dissected steps, ascending.
        unique_concepts: category (or "all") -> one count per step.
        title: the figure title.
    """
    figure = _figure()
    axes = figure.add_subplot()
    for name, counts in unique_concepts.items():
        axes.plot(steps, counts, marker="o", markersize=3, label=name)
    axes.set_xscale("symlog", linthresh=1)
    # Steps as plain numbers (1, 10, 100): the default 10^k labels go through mathtext, slow to lay out.
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.set_xlabel("training step")
    axes.set_ylabel("unique concepts")
    axes.set_title(title, y=1.0)
    axes.legend(fontsize="small", ncols=2, loc="upper left")
    return figure


def to_image(figure: Figure) -> np.ndarray:
    """Render a figure to a uint8 RGB array `(height, width, 3)`."""
    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()

"""The figure toolkit: every figure of the package is made and rendered here, and the callback's own figures.

Figures are `matplotlib.figure.Figure` objects on an Agg canvas, never made through `pyplot`, so
drawing them neither needs a display nor touches the global figure registry of a user's session.
`new_figure` makes one; `figure_to_array` renders one to the uint8 RGB array every logger adapter
and image file takes. The report's figures (`bargraph.py`) and the analyses' (`analysis.py`) use
both; this file also holds the two figures the callback logs at every dissection: detectors and
unique concepts per category, and the emergence of concepts over the run.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal, cast

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator


def plain(text: object) -> str:
    """`text` as matplotlib shows it literally: names come from datasets and users, and a `$` pair would
    otherwise be read as mathtext (which fails on `$$` and changes `$x_1$`).

    Example:
        >>> plain("price $ in $")
        'price \\$ in \\$'
    """
    return str(text).replace("$", r"\$")


def new_figure(width: float, height: float, layout: Literal["constrained"] | None = None) -> Figure:
    """A figure of `width` x `height` inches at 100 dpi on its own Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def figure_to_array(figure: Figure, trim: bool = True, pad_inches: float = 0.08) -> np.ndarray:
    """Render a figure to uint8 RGB `(H, W, 3)`, trimmed to its content plus `pad_inches` (`trim`).

    The figure is drawn once and its content's bounding box cut out of the canvas; only when
    the content reaches past the figure's edges (long rotated labels) is it saved again with
    `bbox_inches="tight"`, which grows the canvas (and draws twice).
    """
    canvas = figure.canvas
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3]  # type: ignore[attr-defined]
    if not trim:
        return image.copy()
    content = figure.get_tightbbox(canvas.get_renderer())  # type: ignore[attr-defined]
    width, height = figure.get_size_inches()
    if content.x0 < 0 or content.y0 < 0 or content.x1 > width or content.y1 > height:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", bbox_inches="tight", pad_inches=pad_inches, facecolor="white")
        buffer.seek(0)
        return np.asarray(Image.open(buffer).convert("RGB")).copy()
    dpi = figure.dpi
    left, right = max(0, math.floor((content.x0 - pad_inches) * dpi)), math.ceil((content.x1 + pad_inches) * dpi)
    # Pixel rows count from the top, figure coordinates from the bottom.
    top = max(0, math.floor((height - content.y1 - pad_inches) * dpi))
    bottom = math.ceil((height - content.y0 + pad_inches) * dpi)
    return image[top:bottom, left:right].copy()


def integer_ticks(axes: Axes) -> None:
    """Integer ticks only on the y axis of a plot of counts."""
    # The default y locator is an AutoLocator, a MaxNLocator.
    locator = axes.yaxis.get_major_locator()
    cast("MaxNLocator", locator).set_params(integer=True)


def _callback_figure() -> Figure:
    figure = new_figure(6.0, 3.2)
    figure.subplots_adjust(left=0.1, right=0.97, top=0.9, bottom=0.15)
    return figure


def category_counts_figure(summary: Mapping[str, float], categories: Sequence[str], title: str,
                           iou_threshold: float) -> Figure:
    """Bar chart of detectors and unique concepts per category (SEMANTICS §5).

    The two counts sort units into categories differently: a detector counts once, in the
    category of its label; a unique concept counts in every category whose best label for a unit
    has IoU above the threshold. So a category can have unique concepts and no detector (a unit
    labelled "red" whose best texture also passes the threshold); the legend and a footnote say so.

    Args:
        summary: `LayerDissection.summary()` (needs `detectors/<category>` and
            `unique_concepts/<category>`).
        categories: the categories, in `category.csv` order.
        title: the figure title, e.g. the layer name and step.
        iou_threshold: the detector threshold `t` of the dissection.
    """
    figure = _callback_figure()
    figure.subplots_adjust(top=0.8, bottom=0.2)
    axes = figure.add_subplot()
    positions = np.arange(len(categories))
    detectors = [summary[f"detectors/{name}"] for name in categories]
    unique = [summary[f"unique_concepts/{name}"] for name in categories]
    axes.bar(positions - 0.2, detectors, width=0.4, label="detectors (in the category of their label)")
    axes.bar(positions + 0.2, unique, width=0.4, label=f"unique concepts (best labels with IoU > {iou_threshold:g})")
    axes.set_xticks(positions, [plain(name) for name in categories])
    axes.set_ylabel("count")
    integer_ticks(axes)
    # Fixed places, above the bars: "best" legend placement and automatic title placement are slow to compute.
    figure.suptitle(plain(title), y=0.98, va="top")
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize="small", frameon=False)
    figure.text(0.01, 0.01, f"A unit counts in every category whose best label has IoU > {iou_threshold:g}, as a "
                "detector only in its label's category:\na category can have unique concepts and no detector.",
                fontsize=7, color="#555555", va="bottom")
    return figure


def emergence_figure(steps: Sequence[int], unique_concepts: Mapping[str, Sequence[float]], title: str) -> Figure:
    """Unique concepts per category against the training step, on a log step axis.

    Step 0 (the fit-start dissection) is drawn at the left edge of a symlog
    axis, so the untrained model is part of the curve.

    Args:
        steps: the dissected steps, ascending.
        unique_concepts: category (or "all") -> one count per step.
        title: the figure title.
    """
    from matplotlib.ticker import FuncFormatter

    figure = _callback_figure()
    axes = figure.add_subplot()
    for name, counts in unique_concepts.items():
        axes.plot(steps, counts, marker="o", markersize=3, label=plain(name))
    axes.set_xscale("symlog", linthresh=1)
    # Steps as plain numbers (1, 10, 100): the default 10^k labels go through mathtext, slow to lay out.
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.set_xlabel("training step")
    axes.set_ylabel("unique concepts")
    axes.set_title(plain(title), y=1.0)
    axes.legend(fontsize="small", ncols=2, loc="upper left")
    return figure

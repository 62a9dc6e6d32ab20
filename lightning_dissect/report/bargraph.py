"""The bar graph of detectors per concept and the IoU histogram of a layer.

The bar graph is NetDissect's report figure: one bar per concept, its height
the number of detector units whose label it is, so there are as many bars as
`unique_top_concepts` (SEMANTICS §5), bars grouped and coloured by the concept's
category (categories in `category.csv` order, concepts by count within them).
Its title names both counts: `unique_concepts`, the number the callback logs as
`dissect/<layer>/unique_concepts`, and `unique_top_concepts`, the bars. Figures
are drawn with matplotlib's Agg canvas directly, without pyplot, so no global
backend or figure state is touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from lightning_dissect.report.figures import figure_to_array, integer_ticks, new_figure, plain

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lightning_dissect.engine.dissect import LayerNumbers

# NetDissect's report colours for Broden's categories; others cycle through matplotlib's tab10.
CATEGORY_COLORS = {
    "object": "#4B4CBF", "scene": "#55B05B", "part": "#50BDAC",
    "material": "#81C679", "texture": "#F0883B", "color": "#D94238",
}
_OTHER_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def category_color(category: str, categories: list[str]) -> str:
    """The colour of a category: NetDissect's for Broden's six, a fixed cycle for others."""
    if category in CATEGORY_COLORS:
        return CATEGORY_COLORS[category]
    others = [name for name in categories if name not in CATEGORY_COLORS]
    index = others.index(category) if category in others else 0
    return _OTHER_COLORS[index % len(_OTHER_COLORS)]


def detectors_per_concept(layer_result: LayerNumbers) -> list[tuple[str, list[tuple[str, int]]]]:
    """Detector units per concept, grouped by category.

    Returns:
        `[(category, [(concept, detectors), ...]), ...]`: categories in
        `category.csv` order (those without detectors left out), concepts by
        decreasing count, ties by label number.
    """
    detectors = layer_result.detectors
    counts: dict[int, int] = {}
    for label in layer_result.labels[detectors].tolist():
        counts[label] = counts.get(label, 0) + 1
    groups = []
    for k, category in enumerate(layer_result.categories):
        labels = [label for label in counts if int(layer_result.label_category[label]) == k]
        if labels:
            labels.sort(key=lambda label: (-counts[label], label))
            groups.append((category, [(layer_result.label_names[label], counts[label]) for label in labels]))
    return groups


def bar_graph_figure(layer_result: LayerNumbers) -> Figure:
    """NetDissect's bar graph of detectors per concept, as a matplotlib `Figure`."""
    groups = detectors_per_concept(layer_result)
    bars = sum(len(concepts) for _, concepts in groups)
    summary = layer_result.summary()
    title = (f"{plain(layer_result.layer)}: {int(summary['unique_concepts'])} unique concepts, "
             f"{int(summary['detectors'])} detectors of {layer_result.num_units} units "
             f"(IoU > {layer_result.iou_threshold:g})\n{int(summary['unique_top_concepts'])} unique top "
             "concepts (labels of detectors), one bar each")
    # Wide enough for the bars and for the title (about 0.07 inch a character at 9 points), untrimmed too.
    width = max(4.0, 1.0 + 0.24 * bars, 0.07 * max(len(line) for line in title.splitlines()))
    figure = new_figure(min(60.0, width), 3.2)
    axes = figure.add_axes((0.08 if bars > 8 else 0.15, 0.42, 0.9 if bars > 8 else 0.8, 0.4))
    figure.suptitle(title, fontsize=9, y=0.98, va="top")
    axes.set_ylabel("detectors", fontsize=8)
    axes.spines[["top", "right"]].set_visible(False)
    if not bars:
        axes.set_xticks([])
        axes.set_yticks([])
        axes.text(0.5, 0.5, "no detectors", ha="center", va="center", transform=axes.transAxes, color="#777777")
        return figure
    position = 0
    ticks, names, heights, colors = [], [], [], []
    for category, concepts in groups:
        color = category_color(category, layer_result.categories)
        start = position
        for concept, count in concepts:
            ticks.append(position)
            names.append(plain(concept))
            heights.append(count)
            colors.append(color)
            position += 1
        axes.annotate(plain(category), xy=((start + position - 1) / 2, 1), xycoords=("data", "axes fraction"),
                      xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=8,
                      color=color, fontweight="bold", annotation_clip=False)
        position += 1  # a gap between categories
    axes.bar(ticks, heights, width=0.8, color=colors)  # one call: one container, one limits update
    axes.set_xticks(ticks)
    axes.set_xticklabels(names, rotation=90, fontsize=7)
    axes.set_xlim(-0.7, position - 1.3)
    integer_ticks(axes)
    axes.tick_params(axis="y", labelsize=7)
    return figure


def iou_histogram_figure(layer_result: LayerNumbers, bins: int = 40) -> Figure:
    """A histogram of the units' scores, stacked by the category of their label,
    with the detector threshold marked."""
    figure = new_figure(5.0, 2.8)
    axes = figure.add_axes((0.12, 0.17, 0.84, 0.7))
    scores = layer_result.scores.double().numpy()
    top = max(float(scores.max()) if scores.size else 0.0, 2 * layer_result.iou_threshold, 0.1)
    edges = np.linspace(0.0, top * 1.0001, bins + 1)
    categories = [layer_result.unit_category(unit) for unit in range(layer_result.num_units)]
    bottom = np.zeros(bins)
    for category in layer_result.categories:
        values = scores[[name == category for name in categories]]
        if values.size:
            counts = np.histogram(values, bins=edges)[0]
            # One filled outline per category, stacked on the ones before (hist() draws a patch per bin).
            axes.stairs(bottom + counts, edges, baseline=bottom.copy(), fill=True, label=plain(category),
                        color=category_color(category, layer_result.categories))
            bottom += counts
    if bottom.any():
        axes.set_ylim(0, bottom.max() * 1.05)
        axes.legend(fontsize=7, frameon=False, loc="upper right")  # a fixed place: "best" is slow to find
    axes.axvline(layer_result.iou_threshold, color="#333333", linestyle="--", linewidth=1)
    # A fixed place: automatic placement measures every tick label again.
    axes.set_title(f"{plain(layer_result.layer)}: IoU of each unit's label ({layer_result.num_units} units)",
                   fontsize=9, y=1.0)
    axes.set_xlabel("IoU", fontsize=8)
    integer_ticks(axes)
    axes.set_ylabel("units", fontsize=8)
    axes.tick_params(labelsize=7)
    axes.spines[["top", "right"]].set_visible(False)
    return figure


def bar_graph(layer_result: LayerNumbers, trim: bool = True) -> np.ndarray:
    """The bar graph of detectors per concept, uint8 RGB `(H, W, 3)` (`trim`: to its content)."""
    return figure_to_array(bar_graph_figure(layer_result), trim=trim)


def iou_histogram(layer_result: LayerNumbers, trim: bool = True) -> np.ndarray:
    """The IoU histogram of a layer, uint8 RGB `(H, W, 3)` (`trim`: to its content)."""
    return figure_to_array(iou_histogram_figure(layer_result), trim=trim)

"""Figures and the HTML report: unit strips, bar graphs, IoU histograms, `write_report`.

- `strips`: a unit's top-activating probe images with its mask drawn (`unit_strips`).
- `bargraph`: detectors per concept by category, and the IoU histogram of a layer.
- `figures`: the figure toolkit (`new_figure`, `figure_to_array`) and the callback's own figures.
- `media`: strips and bar graphs of a dissection as images (`strip_media`, `bar_graph_media`), `save_image`.
- `html`: the static HTML report (`write_report`, `Dissection.to_html`).
- `run`: the report of a training run's folder (`run_folder.py`), and the `lightning-dissect report` command.
"""

from lightning_dissect.report.bargraph import bar_graph, detectors_per_concept, iou_histogram
from lightning_dissect.report.html import write_report
from lightning_dissect.report.media import bar_graph_media, saved_strips, select_units, strip_media
from lightning_dissect.report.strips import UnitStrip, activation_maps, unit_strips

__all__ = [
    "UnitStrip",
    "activation_maps",
    "bar_graph",
    "bar_graph_media",
    "detectors_per_concept",
    "iou_histogram",
    "saved_strips",
    "select_units",
    "strip_media",
    "unit_strips",
    "write_report",
]

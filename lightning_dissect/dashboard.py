"""What one dissection shows in the dashboards: its `DissectionReport`, and the tables and images made from it.

A dissection is shown as scalars (`DissectionReport.metrics`), tables and images. The tables and
images ("media") are made once per dissection by the producers below, and every logger adapter
(`loggers.py`) writes the same media its own way:

| tag | kind | what |
| --- | --- | --- |
| `dissect/<layer>/units` | table | every unit's label, category, score and whether it is a detector |
| `dissect/<layer>/transitions` | table | the concept switches since the layer's previous dissection |
| `dissect/<layer>/detectors_per_category` | figure | detectors and unique concepts per category |
| `dissect/<layer>/emergence` | figure | unique concepts per category over the dissections so far |
| `dissect/<layer>/bar_graph`, `.../iou_histogram` | figure | NetDissect's bar graph and the IoU histogram |
| `dissect/<layer>/strips/unit_<u>` | figure | the strips the dissector drew (top and switched units) |

Tables cost next to nothing and are made at every dissection; figures are made when the
dissector's figure budget allows (`make_media(report, figures=...)`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_dissect.history import HistoryEntry, entries_of
from lightning_dissect.result import Dissection


@dataclass
class DissectionReport:
    """One dissection and what was derived from it.

    Attributes:
        step, epoch: when it was taken (epoch: None when not known).
        seconds: wall time of the dissection.
        dissection: the numbers.
        entries: layer -> its new history entry.
        history: every entry so far, these included.
        metrics: the scalars, `dissect/<layer>/<name>` and `dissect/seconds`.
        categories: the probe's categories.
        iou_threshold: the detector threshold.
        switched: layer -> {unit: its previous concept} for the units that switched concept since the
            layer's previous dissection.
        strips: `dissect/<layer>/strips/unit_<u>` -> uint8 RGB image, the unit strips of the top and
            switched units (`lightning_dissect.report`), made on rank zero.
    """

    step: int
    epoch: int | None
    seconds: float
    dissection: Dissection
    entries: dict[str, HistoryEntry]
    history: list[HistoryEntry]
    metrics: dict[str, float]
    categories: list[str]
    iou_threshold: float
    switched: dict[str, dict[int, str]] = field(default_factory=dict)
    strips: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Table:
    """A table to show: `columns` names and `rows` of plain values."""

    tag: str
    columns: list[str]
    rows: list[list[Any]]

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(self.columns)
        writer.writerows(self.rows)
        return buffer.getvalue()

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + " --- |" * len(self.columns)]
        lines += ["| " + " | ".join(str(value) for value in row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclass
class Image:
    """An image to show: uint8 RGB `(height, width, 3)`.

    Attributes:
        photo: a photograph (a unit strip): encoded as JPEG, which is a few times smaller and about
            twenty times faster to encode than PNG for photographs; figures (text and lines) are PNG.
    """

    tag: str
    image: np.ndarray
    photo: bool = False

    @property
    def suffix(self) -> str:
        return ".jpg" if self.photo else ".png"

    def encoded(self) -> bytes:
        """The image as JPEG (a photograph) or PNG bytes (`report.media.encode_image`)."""
        from lightning_dissect.report.media import encode_image  # PIL, imported when an image is shown

        return encode_image(self.image, self.photo)


Media = Table | Image
Producer = Callable[[DissectionReport], Iterable[Media]]


# ---------------------------------------------------------------------- tables


def unit_tables(report: DissectionReport) -> Iterable[Media]:
    """`dissect/<layer>/units`: every unit's label, category, score and whether it is a detector."""
    for layer, entry in report.entries.items():
        rows = [[unit, entry.label[unit], entry.category[unit], round(entry.score[unit], 4),
                 entry.score[unit] > report.iou_threshold] for unit in range(entry.num_units)]
        yield Table(f"dissect/{layer}/units", ["unit", "label", "category", "score", "detector"], rows)


def transition_tables(report: DissectionReport) -> Iterable[Media]:
    """`dissect/<layer>/transitions`: the concept switches since the previous dissection, with counts."""
    for layer, entry in report.entries.items():
        if entry.transitions:
            rows = [list(row) for row in entry.transitions]
            yield Table(f"dissect/{layer}/transitions", ["from", "to", "units"], rows)


# ---------------------------------------------------------------------- figures


def detector_figures(report: DissectionReport) -> Iterable[Media]:
    """`dissect/<layer>/detectors_per_category`: detectors and unique concepts per category."""
    from lightning_dissect.report.figures import category_counts_figure, figure_to_array  # matplotlib, when drawn

    for layer, entry in report.entries.items():
        figure = category_counts_figure(entry.summary, report.categories, f"{layer}, step {report.step}",
                                        report.iou_threshold)
        yield Image(f"dissect/{layer}/detectors_per_category", figure_to_array(figure, trim=False))


def emergence_figures(report: DissectionReport) -> Iterable[Media]:
    """`dissect/<layer>/emergence`: unique concepts per category over all dissections so far."""
    from lightning_dissect.report.figures import emergence_figure, figure_to_array

    for layer in report.entries:
        entries = entries_of(report.history, layer)
        curves = {"all": [entry.summary["unique_concepts"] for entry in entries]}
        for category in report.categories:
            curves[category] = [entry.summary[f"unique_concepts/{category}"] for entry in entries]
        figure = emergence_figure([entry.step for entry in entries], curves, f"{layer}: emergence")
        yield Image(f"dissect/{layer}/emergence", figure_to_array(figure, trim=False))


def unit_figures(report: DissectionReport) -> Iterable[Media]:
    """`dissect/<layer>/strips/unit_<u>` (the unit strips the dissector drew), `dissect/<layer>/bar_graph`
    (detectors per concept) and `dissect/<layer>/iou_histogram` (`lightning_dissect.report`)."""
    from lightning_dissect.report.media import bar_graph_media

    for tag, image in report.strips.items():
        yield Image(tag, image, photo=True)
    for tag, image in bar_graph_media(report.dissection).items():
        yield Image(tag, image)


TABLE_PRODUCERS: list[Producer] = [unit_tables, transition_tables]
"""Producers of media that draw nothing: made at every dissection. Append one to show more."""
FIGURE_PRODUCERS: list[Producer] = [detector_figures, emergence_figures, unit_figures]
"""Producers that draw with matplotlib or PIL: made when the figure budget allows."""


def make_media(report: DissectionReport, figures: bool = True,
               failed: Callable[[Producer, Exception], None] | None = None, tables: bool = True) -> list[Media]:
    """Every producer's media for one dissection; with `figures=False`, only the tables.

    Args:
        figures, tables: whether to make the figures, the tables.
        failed: called with a producer that raised and its error; the other producers' media are
            still made. None: the error propagates.
    """
    media: list[Media] = []
    for producer in (TABLE_PRODUCERS if tables else []) + (FIGURE_PRODUCERS if figures else []):
        try:
            media.extend(producer(report))
        except Exception as error:
            if failed is None:
                raise
            failed(producer, error)
    return media

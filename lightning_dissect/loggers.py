"""One small adapter per logger kind, and the media every adapter shows.

A dissection is shown as scalars (`DissectionReport.metrics`), tables and
images. The media are made once per dissection by the producers in
`MEDIA_PRODUCERS` (a list: append a producer to add media, e.g. unit strips),
and each adapter only knows how its logger writes a scalar, a table and an
image:

| logger | scalars | tables | images |
| --- | --- | --- | --- |
| TensorBoard (`TensorBoardLogger`, a `SummaryWriter`) | `log_metrics` | markdown text | `add_image` |
| Weights & Biases (`WandbLogger`, a `wandb` run) | `log_metrics` | `wandb.Table` | `wandb.Image` |
| MLflow (`MLFlowLogger`) | `log_metrics` | CSV artifacts | PNG artifacts |
| CSV (`CSVLogger`) | `log_metrics` | CSV files beside `metrics.csv` | PNG files |
| anything else with `log_metrics` | `log_metrics` | - | - (warns once) |

Loggers are recognised by class name, so the `lightning.pytorch`,
`pytorch_lightning` and `lightning.fabric` classes all work and none of those
packages is imported here.
"""

from __future__ import annotations

import csv
import io
import urllib.parse
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_dissect.io import atomic_write

if TYPE_CHECKING:
    from lightning_dissect.dissector import DissectionReport


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
    """An image to show: uint8 RGB `(height, width, 3)`."""

    tag: str
    image: np.ndarray


Media = Table | Image


# ---------------------------------------------------------------------- media producers


def unit_tables(report: DissectionReport) -> Iterable[Media]:
    """`dissect/<layer>/units`: every unit's label, category, score and whether it is a detector."""
    for layer, entry in report.entries.items():
        rows = [[unit, entry["label"][unit], entry["category"][unit], round(entry["score"][unit], 4),
                 entry["score"][unit] > report.iou_threshold] for unit in range(len(entry["label"]))]
        yield Table(f"dissect/{layer}/units", ["unit", "label", "category", "score", "detector"], rows)


def transition_tables(report: DissectionReport) -> Iterable[Media]:
    """`dissect/<layer>/transitions`: the concept switches since the previous dissection, with counts."""
    for layer, entry in report.entries.items():
        if entry["transitions"]:
            yield Table(f"dissect/{layer}/transitions", ["from", "to", "units"], entry["transitions"])


def detector_figures(report: DissectionReport) -> Iterable[Media]:
    """`dissect/<layer>/detectors_per_category`: detectors and unique concepts per category."""
    from lightning_dissect import figures  # matplotlib, imported when a figure is drawn

    for layer, entry in report.entries.items():
        figure = figures.detectors_per_category(entry["summary"], report.categories, f"{layer}, step {report.step}")
        yield Image(f"dissect/{layer}/detectors_per_category", figures.to_image(figure))


def emergence_figures(report: DissectionReport) -> Iterable[Media]:
    """`dissect/<layer>/emergence`: unique concepts per category over all dissections so far."""
    from lightning_dissect import figures

    for layer in report.entries:
        entries = [entry for entry in report.history if entry["layer"] == layer]
        curves = {"all": [entry["summary"]["unique_concepts"] for entry in entries]}
        for category in report.categories:
            curves[category] = [entry["summary"][f"unique_concepts/{category}"] for entry in entries]
        figure = figures.emergence_curve([entry["step"] for entry in entries], curves, f"{layer}: emergence")
        yield Image(f"dissect/{layer}/emergence", figures.to_image(figure))


def unit_figures(report: DissectionReport) -> Iterable[Media]:
    """`dissect/<layer>/strips/unit_<u>` (the unit strips the dissector drew), `dissect/<layer>/bar_graph`
    (detectors per concept) and `dissect/<layer>/iou_histogram` (`lightning_dissect.report`)."""
    from lightning_dissect.report.media import bar_graph_media

    for tag, image in {**report.strips, **bar_graph_media(report.dissection)}.items():
        yield Image(tag, image)


MEDIA_PRODUCERS: list[Callable[[DissectionReport], Iterable[Media]]] = [
    unit_tables, transition_tables, detector_figures, emergence_figures, unit_figures,
]


def make_media(report: DissectionReport, figures: bool = True) -> list[Media]:
    """Every producer's media for one dissection; with `figures=False`, only the producers
    that draw nothing (tables), which cost next to nothing."""
    return [media for producer in MEDIA_PRODUCERS if figures or not getattr(producer, "draws_figures", False)
            for media in producer(report)]


for _producer in (detector_figures, emergence_figures, unit_figures):
    _producer.draws_figures = True  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- adapters


class LoggerAdapter:
    """Shows dissections through one logger.

    Subclasses override `log_table` and `log_image`; scalars go through the
    logger's own `log_metrics(metrics, step)`.

    Args:
        logger: the logger object.
    """

    shows_media = True

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        self.logger.log_metrics(dict(metrics), step=step)

    def log_table(self, table: Table, step: int) -> None:
        raise NotImplementedError

    def log_image(self, image: Image, step: int) -> None:
        raise NotImplementedError

    def log_media(self, media: Sequence[Media], step: int) -> None:
        for item in media:
            if isinstance(item, Table):
                self.log_table(item, step)
            else:
                self.log_image(item, step)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.logger).__name__})"


class TensorBoardAdapter(LoggerAdapter):
    """TensorBoard: tables as markdown text, images with `add_image`.

    Accepts a Lightning `TensorBoardLogger` or a `SummaryWriter` itself.
    """

    @property
    def writer(self) -> Any:
        return self.logger if hasattr(self.logger, "add_scalar") else self.logger.experiment

    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        if hasattr(self.logger, "log_metrics"):
            super().log_scalars(metrics, step)
            return
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def log_table(self, table: Table, step: int) -> None:
        self.writer.add_text(table.tag, table.to_markdown(), step)

    def log_image(self, image: Image, step: int) -> None:
        self.writer.add_image(image.tag, image.image, step, dataformats="HWC")


class WandbAdapter(LoggerAdapter):
    """Weights & Biases: `wandb.Table` and `wandb.Image`.

    Accepts a Lightning `WandbLogger` or a `wandb` run (`wandb.init()`).
    """

    def _log(self, values: dict[str, Any], step: int) -> None:
        if hasattr(self.logger, "log_metrics"):
            self.logger.log_metrics(values, step=step)
        else:
            self.logger.log(values, step=step)

    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        self._log(dict(metrics), step)

    def log_table(self, table: Table, step: int) -> None:
        import wandb

        self._log({table.tag: wandb.Table(columns=table.columns, data=table.rows)}, step)

    def log_image(self, image: Image, step: int) -> None:
        import wandb

        self._log({image.tag: wandb.Image(image.image)}, step)


class MLflowAdapter(LoggerAdapter):
    """MLflow: tables and images as artifacts `<tag>/step=<step>.csv|.png` of the logger's run.

    MLflow's file store (`file:` tracking URIs) keeps a metric in a file named
    by its key, so a key cannot also be a folder: there `dissect/<layer>/detectors`
    and `dissect/<layer>/unique_concepts` are logged as `.../detectors/all` and
    `.../unique_concepts/all` (beside `.../detectors/<category>`). Other stores
    get the names unchanged.
    """

    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        if urllib.parse.urlparse(str(self.logger.experiment.tracking_uri)).scheme in ("", "file"):
            folders = {name[:end] for name in metrics for end, char in enumerate(name) if char == "/"}
            metrics = {f"{name}/all" if name in folders else name: value for name, value in metrics.items()}
        super().log_scalars(metrics, step)

    def log_table(self, table: Table, step: int) -> None:
        self.logger.experiment.log_text(self.logger.run_id, table.to_csv(), f"{table.tag}/step={step}.csv")

    def log_image(self, image: Image, step: int) -> None:
        self.logger.experiment.log_image(self.logger.run_id, image.image, artifact_file=f"{image.tag}/step={step}.png")


class CSVAdapter(LoggerAdapter):
    """CSV: tables and images as files `media/<tag>/step=<step>.csv|.png` beside `metrics.csv`."""

    def _path(self, tag: str, step: int, suffix: str) -> Path:
        return Path(self.logger.log_dir, "media", *tag.split("/"), f"step={step}{suffix}")

    def log_table(self, table: Table, step: int) -> None:
        with atomic_write(self._path(table.tag, step, ".csv")) as handle:
            handle.write(table.to_csv())

    def log_image(self, image: Image, step: int) -> None:
        from PIL import Image as PILImage

        with atomic_write(self._path(image.tag, step, ".png"), "wb") as handle:
            PILImage.fromarray(image.image).save(handle, format="PNG")


class ScalarsOnlyAdapter(LoggerAdapter):
    """A logger without an adapter: scalars through `log_metrics`, and a warning the first time."""

    shows_media = False

    def __init__(self, logger: Any) -> None:
        super().__init__(logger)
        self._warned = False

    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"lightning_dissect has no adapter for {type(self.logger).__name__}: it gets the dissection "
                          "scalars only, no tables or figures (the files under the dissection directory have them)",
                          UserWarning, stacklevel=2)
        if hasattr(self.logger, "log_metrics"):
            super().log_scalars(metrics, step)


_ADAPTERS: list[tuple[set[str], type[LoggerAdapter]]] = [
    ({"TensorBoardLogger", "SummaryWriter"}, TensorBoardAdapter),
    ({"WandbLogger", "Run"}, WandbAdapter),
    ({"MLFlowLogger"}, MLflowAdapter),
    ({"CSVLogger"}, CSVAdapter),
]


def adapt(logger: Any) -> LoggerAdapter:
    """The adapter for a logger, chosen by its class names (see the module table)."""
    if isinstance(logger, LoggerAdapter):
        return logger
    names = {cls.__name__ for cls in type(logger).__mro__}
    for kinds, adapter in _ADAPTERS:
        if names & kinds:
            return adapter(logger)
    return ScalarsOnlyAdapter(logger)

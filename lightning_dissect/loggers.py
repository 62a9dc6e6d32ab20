"""One small adapter per logger kind, and the fan-out of a dissection to a run's loggers.

Each adapter only knows how its logger writes a scalar, a table and an image; what is shown
(`DissectionReport.metrics` and the media of `dashboard.make_media`) is decided in `dashboard.py`:

| logger | scalars | tables | images |
| --- | --- | --- | --- |
| TensorBoard (`TensorBoardLogger`, a `SummaryWriter`) | `log_metrics` | markdown text | image summaries |
| Weights & Biases (`WandbLogger`, a `wandb` run) | `log_metrics` (one call, one row) | `wandb.Table` | `wandb.Image` |
| MLflow (`MLFlowLogger`) | `log_metrics` | CSV artifacts | PNG / JPEG artifacts |
| CSV (`CSVLogger`) | `log_metrics` | CSV files beside `metrics.csv` | PNG / JPEG files |

Figures are PNG; unit strips (photographs) are JPEG.
| anything else with `log_metrics` | `log_metrics` | - | - (warns once) |

Loggers are recognised by class name, so the `lightning.pytorch`,
`pytorch_lightning` and `lightning.fabric` classes all work and none of those
packages is imported here.
"""

from __future__ import annotations

import urllib.parse
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_dissect.dashboard import DissectionReport, Image, Media, Table, make_media
from lightning_dissect.io import atomic_write

# ---------------------------------------------------------------------- adapters


class LoggerAdapter:
    """Shows dissections through one logger.

    Subclasses override `log_table` and `log_image`; scalars go through the
    logger's own `log_metrics(metrics, step)`. `log_dissection` receives a whole
    dissection at once: by default scalars, then each table and image; an adapter
    whose logger makes one record per call (W&B: one history row) overrides it to
    write everything in one call.

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

    def log_dissection(self, metrics: Mapping[str, float], media: Sequence[Media], step: int) -> None:
        """Show one dissection: its scalars and (when the logger shows them) its tables and images."""
        self.log_scalars(metrics, step)
        if self.shows_media:
            self.log_media(media, step)

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
        # The summary is written as `add_image` writes it, with the image encoded here: `add_image` always
        # resamples (Lanczos, even at the same size) and PNG-encodes, which costs 20 times a strip's JPEG.
        from tensorboard.compat.proto.summary_pb2 import Summary

        height, width = image.image.shape[:2]
        encoded = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=image.encoded())
        summary = Summary(value=[Summary.Value(tag=image.tag, image=encoded)])
        self.writer._get_file_writer().add_summary(summary, step)


class WandbAdapter(LoggerAdapter):
    """Weights & Biases: `wandb.Table` and `wandb.Image`.

    Each `log` call of W&B makes one row of the run's history, so a dissection's scalars, tables
    and images go in one call (`log_dissection`): one row per dissection.

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
        self._log(self._values([table]), step)

    def log_image(self, image: Image, step: int) -> None:
        self._log(self._values([image]), step)

    def log_dissection(self, metrics: Mapping[str, float], media: Sequence[Media], step: int) -> None:
        self._log({**metrics, **self._values(media)}, step)

    @staticmethod
    def _values(media: Sequence[Media]) -> dict[str, Any]:
        import wandb

        return {item.tag: wandb.Table(columns=list[Any](item.columns), data=item.rows) if isinstance(item, Table)
                else wandb.Image(item.image, file_type="jpg" if item.photo else "png") for item in media}


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
        self.logger.experiment.log_image(self.logger.run_id, image.image,
                                         artifact_file=f"{image.tag}/step={step}{image.suffix}")


class CSVAdapter(LoggerAdapter):
    """CSV: tables and images as files `media/<tag>/step=<step>.csv|.png` beside `metrics.csv`."""

    def _path(self, tag: str, step: int, suffix: str) -> Path:
        return Path(self.logger.log_dir, "media", *tag.split("/"), f"step={step}{suffix}")

    def log_table(self, table: Table, step: int) -> None:
        with atomic_write(self._path(table.tag, step, ".csv")) as handle:
            handle.write(table.to_csv())

    def log_image(self, image: Image, step: int) -> None:
        with atomic_write(self._path(image.tag, step, image.suffix), "wb") as handle:
            handle.write(image.encoded())


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


class LoggerGroup:
    """The loggers of a run: each gets the scalars and, when it shows media, the tables and images.

    The media are made once for all loggers. One logger that fails does not keep the dissection
    from the others (or from the files): under `on_error="warn"` it is reported through `warn`.

    Args:
        loggers: loggers or adapters (`adapt`).
    """

    def __init__(self, loggers: Iterable[Any] = ()) -> None:
        self.adapters = [adapt(logger) for logger in loggers]

    @property
    def shows_media(self) -> bool:
        """Whether any logger shows tables and images (so strips and figures are worth drawing)."""
        return any(adapter.shows_media for adapter in self.adapters)

    def show(self, report: DissectionReport, figures: bool, on_error: str, warn: Callable[[str], None],
             scalars: bool = True) -> None:
        """Log `report`'s scalars (unless not `scalars`) to every logger and its media (with figures when `figures`)
        to those that show them.

        A figure that cannot be drawn is left out with a warning: the scalars and tables (and the
        files, written before) never depend on a figure.

        Raises:
            Exception: a logger's or a figure's own error, under `on_error="raise"`.
        """

        def failed(producer: Callable[..., Any], error: Exception) -> None:
            if on_error == "raise":
                raise error
            warn(f"{producer.__name__} could not draw the dissection at step {report.step} ({type(error).__name__}: "
                 f"{error}); the scalars, tables and files have it")

        media = make_media(report, figures=figures, failed=failed, tables=scalars) if self.shows_media else []
        for adapter in self.adapters:
            try:
                if scalars:
                    adapter.log_dissection(report.metrics, media, report.step)
                elif adapter.shows_media:
                    adapter.log_media(media, report.step)
            except Exception as error:  # one broken logger must not hide the dissection from the others
                if on_error == "raise":
                    raise
                warn(f"{adapter!r} could not show the dissection at step {report.step} "
                     f"({type(error).__name__}: {error}); the other loggers and the files have it")

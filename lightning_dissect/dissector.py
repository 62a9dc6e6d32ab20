"""`Dissector`: Network Dissection on a schedule, from any training loop.

The dissector owns everything the Lightning callback does except reading the
trainer: it resolves the probe and the layers, dissects when the schedule says
so, compares each dissection with the previous one of the same layer (concept
switches, SEMANTICS §5), keeps the whole history in `state_dict`, writes the
files and shows the results through the logger adapters (`loggers.py`).

A dissection never changes the training run: the model is evaluated under
`frozen()` (eval mode, no gradients, every submodule's `training` flag restored)
and the Python, NumPy and torch (CPU and the model's CUDA device) random
streams are saved and restored around it.

Files, when `dirpath` is set (the callback sets it to `<log_dir>/dissections`):

    <dirpath>/step=<step>/<layer>.csv        NetDissect's per-unit table (LayerDissection.to_csv)
    <dirpath>/step=<step>/dissection.json    every number (Dissection.to_json)
    <dirpath>/step=<step>/strips/<layer>/unit_<u>.jpg   unit strips of the top and switched units (`report`)
    <dirpath>/history.jsonl                  one line per dissection and layer (see `Dissector.history`)

Each file is written to a temporary name and renamed into place, so a crash
never leaves half a file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_dissect import schedule as schedules
from lightning_dissect.broden import Broden, BrodenError, download_broden
from lightning_dissect.engine.capture import check_layers, choose_layers, frozen, model_device
from lightning_dissect.engine.dissect import validate_options
from lightning_dissect.engine.errors import DissectionError
from lightning_dissect.engine.rotation import Rotation, as_rotation
from lightning_dissect.engine.sync import Synchronizer, default_synchronizer, guard, slowest
from lightning_dissect.io import atomic_write
from lightning_dissect.loggers import LoggerAdapter, adapt, make_media
from lightning_dissect.probe import ProbeSet, cache_root
from lightning_dissect.result import Dissection, LayerDissection, concept_changes, dissect
from lightning_dissect.schedule import Schedule

log = logging.getLogger(__name__)

BRODEN_ENV = "LIGHTNING_DISSECT_BRODEN"
DEFAULT_PROBE_SIZE = 1000
SYNTHETIC_IMAGES = 500
ON_ERROR = ("warn", "raise")
_STATE_VERSION = 1


# ---------------------------------------------------------------------- probe


def default_broden() -> Path:
    """The Broden directory of zero configuration: `$LIGHTNING_DISSECT_BRODEN`, else
    `<cache_root()>/broden/broden1_224`, downloaded there on first use.

    Raises:
        DissectionError: the download failed (no network); the message says how
            to point at a local copy or use the synthetic dataset.
    """
    configured = os.environ.get(BRODEN_ENV)
    if configured:
        return Path(configured).expanduser()
    destination = cache_root() / "broden"
    try:
        return download_broden(destination, resolution=224)
    except (BrodenError, OSError) as error:
        raise DissectionError(
            f"probe=None: the Broden dataset is not in {destination} and could not be downloaded ({error}). "
            f"Point at a local copy with probe='/path/to/broden1_224' or the environment variable {BRODEN_ENV}, "
            "or dissect on the bundled synthetic dataset with probe='synthetic'."
        ) from error


def load_probe(probe: ProbeSet | Broden | str | os.PathLike | None, probe_size: int | None = None,
               probe_seed: int = 0, image_size: int | None = None) -> ProbeSet:
    """Build the probe set from what the user gave.

    Args:
        probe: a `ProbeSet` (used as is, or cut to `probe_size`), a `Broden`, the
            path of a Broden directory, `"synthetic"` (the procedural dataset,
            generated once into the cache), or None (`default_broden()`).
        probe_size: images in the probe; default all of a `ProbeSet`, else
            `DEFAULT_PROBE_SIZE` (or all images of a smaller dataset).
        probe_seed: seed of the image draw.
        image_size: resize probe images to this size for the model (and the
            image size of the synthetic dataset, default 224).

    Raises:
        DissectionError: no Broden found and none could be downloaded.
        BrodenError: the dataset does not load (names the file and row).
        ValueError: `probe_size` larger than the dataset.
    """
    if isinstance(probe, ProbeSet):
        return probe if probe_size is None or probe_size == len(probe) else resized_probe(probe, probe_size)
    if isinstance(probe, str) and probe == "synthetic":
        from lightning_dissect.synthetic import synthetic_broden_path

        probe = synthetic_broden_path(num_images=SYNTHETIC_IMAGES, image_size=image_size or 224,
                                      workers=min(4, os.cpu_count() or 1))
    elif probe is None:
        probe = default_broden()
    broden = probe if isinstance(probe, Broden) else Broden(probe)
    size = probe_size if probe_size is not None else min(DEFAULT_PROBE_SIZE, len(broden))
    return ProbeSet(broden, size=size, seed=probe_seed, image_size=image_size)


def resized_probe(probe: ProbeSet, size: int) -> ProbeSet:
    """The same selection of the same dataset with `size` images (same seed, split, categories, transform).

    For a smaller size the images are a subset of the larger probe's (the draw
    is one seeded permutation, cut).
    """
    return ProbeSet(probe.broden, size=size, seed=probe.seed, split=probe.split, categories=probe.categories,
                    image_size=probe.image_size, transform=probe.transform)


@contextlib.contextmanager
def _converted_inputs(probe: ProbeSet, convert: Callable[[torch.Tensor], torch.Tensor] | None) -> Iterator[None]:
    """Apply `convert` (e.g. a precision plugin's `convert_input`) after the probe's transform, for a while."""
    if convert is None:
        yield
        return
    transform = probe.transform
    probe.transform = lambda images: convert(transform(images))
    try:
        yield
    finally:
        probe.transform = transform


# ---------------------------------------------------------------------- layers


@contextlib.contextmanager
def preserved_random_state(device: torch.device) -> Iterator[None]:
    """Save the Python, NumPy and torch random streams (CPU, and `device` when it is a CUDA device)
    and restore them on exit, so whatever runs inside draws nothing from the training run's streams."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


# ---------------------------------------------------------------------- reports


@dataclass
class DissectionReport:
    """One dissection and what was derived from it.

    Attributes:
        step, epoch: when it was taken (epoch: None when not known).
        seconds: wall time of the dissection.
        dissection: the numbers.
        entries: layer -> its new `history` entry.
        history: every entry so far, these included.
        metrics: the scalars, `dissect/<layer>/<name>` and `dissect/seconds`.
        categories: the probe's categories.
        iou_threshold: the detector threshold.
        strips: `dissect/<layer>/strips/unit_<u>` -> uint8 RGB image, the unit strips of the top and
            switched units (`lightning_dissect.report`), made on rank zero.
    """

    step: int
    epoch: int | None
    seconds: float
    dissection: Dissection
    entries: dict[str, dict[str, Any]]
    history: list[dict[str, Any]]
    metrics: dict[str, float]
    categories: list[str]
    iou_threshold: float
    strips: dict[str, Any] = field(default_factory=dict)


def _reported(summary: Mapping[str, float]) -> dict[str, float]:
    """The summary counts that are logged (all of SEMANTICS §5 but the unit count)."""
    return {name: value for name, value in summary.items() if name != "units"}


def _as_labelling(entry: Mapping[str, Any], label_names: list[str], iou_threshold: float) -> LayerDissection:
    """A `LayerDissection` holding only an entry's unit labels and scores: all `concept_changes` reads."""
    units = len(entry["label_number"])
    empty = torch.zeros(units, 0)
    return LayerDissection(
        layer=entry["layer"], categories=[], label_names=label_names, label_category=torch.zeros(0, dtype=torch.long),
        iou_threshold=iou_threshold, thresholds=torch.zeros(units, dtype=torch.float64), iou=empty.double(),
        intersection=empty.long(), unit_area=empty.long(), label_area=torch.zeros(0, dtype=torch.long),
        category_labels=empty.long(), category_scores=empty.double(),
        labels=torch.tensor(entry["label_number"], dtype=torch.long),
        scores=torch.tensor(entry["score"], dtype=torch.float64),
    )


# ---------------------------------------------------------------------- the dissector


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


class Dissector:
    """Dissects a model on a schedule and tracks how its units' concepts change.

    Use it from any loop; `maybe_run` dissects when the schedule says so:

        dissector = Dissector(probe="synthetic", layers=["layer4"], dirpath="runs/dissect")
        for step in range(num_steps):
            dissector.maybe_run(model, step)     # step = optimizer steps taken so far
            train_step(model, next(batches))

    Args:
        probe: a `ProbeSet`, a `Broden`, a Broden directory, `"synthetic"`, or None for
            the Broden dataset of `$LIGHTNING_DISSECT_BRODEN` or the cache (downloaded on first use).
        layers: module names (`model.named_modules()`); None chooses the deepest
            modules with spatial output (`choose_layers`) on the first run.
        schedule: when to dissect; default `log_spaced()`. Or pass `every_n_steps=`
            or `every_n_epochs=` instead.
        quantile, iou_threshold, denominator, batch_size, rotation, prefix_tokens, top_k:
            the engine's options (`lightning_dissect.dissect`).
        probe_size: images in the probe (a cost budget): default all of a `ProbeSet`,
            else 1000 (or all images of a smaller dataset).
        probe_seed: seed of the image draw when the probe is built here.
        image_size: resize probe images to this size for the model.
        max_seconds: a time budget per dissection: when one takes longer, later ones
            use a probe cut in proportion (a subset of the same draw).
        dirpath: where to write files; None writes none.
        save_json: also write `dissection.json` (every IoU: large for big label sets).
        loggers: loggers or adapters to show scalars and media through (`loggers.adapt`).
        on_error: a failing periodic dissection (e.g. out of memory) `"warn"`s and
            training goes on, or `"raise"`s. Configuration errors always raise.
        figure_budget: the largest fraction of wall time (since the first dissection)
            that drawing unit strips and figures may take (default 2%): a dissection whose
            figures would exceed it (expecting them to take as long as the last ones) logs
            its scalars, tables and files but no figures. The first dissection always draws
            them. None draws them at every dissection.

    Raises:
        ValueError: an option out of range, naming the argument.
    """

    def __init__(
        self,
        probe: ProbeSet | Broden | str | os.PathLike | None = None,
        layers: str | Sequence[str] | None = None,
        schedule: Schedule | None = None,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        quantile: float = 0.005,
        iou_threshold: float = 0.04,
        denominator: str = "paper",
        batch_size: int = 64,
        rotation: Rotation | Mapping[str, Any] | torch.Tensor | None = None,
        prefix_tokens: int | None = None,
        top_k: int = 10,
        probe_size: int | None = None,
        probe_seed: int = 0,
        image_size: int | None = None,
        max_seconds: float | None = None,
        dirpath: str | os.PathLike | None = None,
        save_json: bool = True,
        loggers: Sequence[Any] = (),
        on_error: str = "warn",
        figure_budget: float | None = 0.02,
    ) -> None:
        validate_options(quantile, iou_threshold, denominator, batch_size, top_k)
        if not (probe is None or isinstance(probe, (ProbeSet, Broden, str, os.PathLike))):
            raise ValueError(f"probe={probe!r} must be a ProbeSet, a Broden, a path, 'synthetic' or None")
        if isinstance(layers, str):
            layers = [layers]
        if layers is not None and (not layers or not all(isinstance(name, str) and name for name in layers)):
            raise ValueError(f"layers={layers!r} must be None (automatic) or a non-empty list of module names")
        given = [name for name, value in (("schedule", schedule), ("every_n_steps", every_n_steps),
                                          ("every_n_epochs", every_n_epochs)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"pass one of schedule, every_n_steps and every_n_epochs, not {' and '.join(given)}")
        if every_n_steps is not None:
            schedule = schedules.every_n_steps(every_n_steps)
        elif every_n_epochs is not None:
            schedule = schedules.every_n_epochs(every_n_epochs)
        if schedule is not None and not isinstance(schedule, Schedule):
            raise ValueError(f"schedule={schedule!r} must be a Schedule, e.g. log_spaced() or every_n_steps(100)")
        for name, value in (("probe_size", probe_size), ("image_size", image_size)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer or None")
        if max_seconds is not None and (isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float))
                                        or not max_seconds > 0):
            raise ValueError(f"max_seconds={max_seconds!r} must be a positive number of seconds or None")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r} must be one of {list(ON_ERROR)}")
        if figure_budget is not None and (isinstance(figure_budget, bool) or not isinstance(figure_budget, (int, float))
                                          or not figure_budget > 0):
            raise ValueError(f"figure_budget={figure_budget!r} must be a positive fraction of wall time (e.g. 0.02) "
                             "or None (figures at every dissection)")
        if prefix_tokens is not None and (not isinstance(prefix_tokens, int) or prefix_tokens < 0):
            raise ValueError(f"prefix_tokens={prefix_tokens!r} must be a non-negative integer or None")
        self.probe_source = probe
        self.requested_layers = list(layers) if layers is not None else None
        self.schedule = schedule if schedule is not None else schedules.log_spaced()
        self.options = dict(quantile=quantile, iou_threshold=iou_threshold, denominator=denominator,
                            batch_size=batch_size, rotation=as_rotation(rotation), prefix_tokens=prefix_tokens,
                            top_k=top_k)
        self.probe_size, self.probe_seed, self.image_size = probe_size, probe_seed, image_size
        self.max_seconds = max_seconds
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.save_json = save_json
        self.adapters: list[LoggerAdapter] = [adapt(logger) for logger in loggers]
        self.on_error = on_error
        self.figure_budget = figure_budget
        self._clock_start: float | None = None  # wall time of the first dissection
        self._figure_seconds = 0.0  # wall time spent drawing strips and figures so far
        self._last_figure_seconds = 0.0  # the last drawing's wall time: what the next one is expected to take
        # Set by an adapter such as the Lightning callback:
        self.forward_context: Callable[[], contextlib.AbstractContextManager] | None = None
        self.convert_input: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.synchronizer: Synchronizer | None = None  # distributed probe sharding (lightning_dissect.distributed)
        self.is_global_zero = True  # only rank zero writes files and shows media
        self.strips_per_layer = 4  # unit strips shown and saved per layer at each dissection (0: none)
        self.info: Callable[[str], None] = log.info
        self.warn: Callable[[str], None] = _warn  # a module function: ddp_spawn pickles the dissector

        self.probe: ProbeSet | None = None
        self.layers: list[str] | None = None
        self.history: list[dict[str, Any]] = []
        self.last_step: int | None = None
        self._probe_size_in_use: int | None = None  # set by max_seconds, restored by load_state_dict

    # ------------------------------------------------------------------ setup

    def load_probe(self) -> ProbeSet:
        """Build the probe (once). Raises when it does not load (see `load_probe`)."""
        if self.probe is None:
            self.probe = load_probe(self.probe_source, self.probe_size, self.probe_seed, self.image_size)
        if self._probe_size_in_use is not None and self._probe_size_in_use < len(self.probe):
            self.probe = resized_probe(self.probe, self._probe_size_in_use)
        return self.probe

    def setup(self, model: nn.Module) -> list[str]:
        """Load the probe, choose or check the layers with one probe batch, and return them.

        The batch runs under `frozen()` with the random streams preserved, so
        the model and the run are unchanged. Called by the first `maybe_run`
        when not called before.

        Raises:
            DissectionError, BrodenError, ValueError: a probe that does not load, an
                unknown layer (with close matches), a layer without spatial output.
        """
        probe = self.load_probe()
        layers = self.layers or self.requested_layers
        device = model_device(model)
        context = self.forward_context or contextlib.nullcontext
        with preserved_random_state(device), _converted_inputs(probe, self.convert_input), frozen(model), context():
            inputs = probe.model_input(list(range(min(2, len(probe)))), device)
            if layers is None:
                layers = choose_layers(model, inputs)
                self.info(f"DissectionCallback: dissecting {layers} (the deepest modules with spatial output; "
                          "pass layers=[...] to choose)")
            check_layers(model, inputs, layers, self.options["prefix_tokens"])
        self.layers = list(layers)
        return self.layers

    # ------------------------------------------------------------------ running

    def due(self, step: int, ended_epoch: int | None = None) -> bool:
        """Whether the schedule asks for a dissection now that was not taken yet (see `Schedule.due`)."""
        return step != self.last_step and self.schedule.due(step, ended_epoch)

    def maybe_run(self, model: nn.Module, step: int, epoch: int | None = None,
                  epoch_end: bool = False) -> DissectionReport | None:
        """Dissect `model` when the schedule says so.

        Args:
            model: the model being trained.
            step: optimizer steps taken so far (0: before training).
            epoch: the current epoch (0-based), recorded in the history; None if unknown.
            epoch_end: True when called at the end of `epoch` (what `every_n_epochs` waits for).

        Returns:
            The report, or None when nothing was due (or the dissection failed
            under `on_error="warn"`).
        """
        if not self.due(step, epoch if epoch_end else None):
            return None
        if self.layers is None:
            self.setup(model)  # outside the try: configuration errors always raise
        try:
            return self.run(model, step, epoch)
        except Exception as error:
            if self.on_error == "raise":
                raise
            self.warn(f"the dissection at step {step} failed and was skipped ({type(error).__name__}: {error}); "
                      "training goes on. Pass on_error='raise' to stop instead.")
            return None

    def run(self, model: nn.Module, step: int, epoch: int | None = None) -> DissectionReport:
        """Dissect `model` now, record it in the history, write the files and show it."""
        if self.layers is None:
            self.setup(model)
        probe = self.load_probe()
        device = model_device(model)
        synchronizer = self.synchronizer or default_synchronizer()
        started = time.perf_counter()
        # Under several ranks a failure anywhere in here raises on every rank (lightning_dissect.distributed).
        with guard(synchronizer):
            with preserved_random_state(device), _converted_inputs(probe, self.convert_input):
                dissection = dissect(model, probe, self.layers, **self.options, forward_context=self.forward_context,
                                     synchronizer=synchronizer)
            seconds = slowest(synchronizer, time.perf_counter() - started)  # the same on every rank
            report = self._record(dissection, step, epoch, seconds)
            if self.is_global_zero:
                figures = self._figures_due()
                drawing = time.perf_counter()
                if figures:
                    report.strips = self._strips(model, probe, report)
                self._write(report)
                self._show(report, figures)
                if figures:
                    self._last_figure_seconds = time.perf_counter() - drawing
                    self._figure_seconds += self._last_figure_seconds
        self._apply_budget(seconds)
        return report

    def _record(self, dissection: Dissection, step: int, epoch: int | None, seconds: float) -> DissectionReport:
        entries: dict[str, dict[str, Any]] = {}
        metrics: dict[str, float] = {}
        for layer, result in dissection.items():
            summary = _reported(result.summary())
            entry: dict[str, Any] = {
                "step": step, "epoch": epoch, "layer": layer, "probe_size": dissection.settings["probe_size"],
                "seconds": seconds, "summary": summary,
                "label": [result.label_name(unit) for unit in range(result.num_units)],
                "category": [result.unit_category(unit) for unit in range(result.num_units)],
                "label_number": result.labels.tolist(), "score": result.scores.tolist(),
                "switches": None, "switch_in": None, "switch_out": None,
                "switched_units": [], "new_units": [], "lost_units": [], "transitions": [],
            }
            previous = next((old for old in reversed(self.history) if old["layer"] == layer), None)
            if previous is not None:
                changes = concept_changes(_as_labelling(previous, result.label_names, result.iou_threshold), result)
                transitions = sorted(changes["transitions"].items(), key=lambda item: (-item[1], item[0]))
                entry.update({key: changes[key] for key in ("switches", "switch_in", "switch_out", "switched_units",
                                                              "new_units", "lost_units")},
                             transitions=[[old, new, count] for (old, new), count in transitions])
            entries[layer] = entry
            metrics.update({f"dissect/{layer}/{name}": float(value) for name, value in summary.items()})
            if previous is not None:
                metrics.update({f"dissect/{layer}/{name}": float(entry[name])
                                for name in ("switches", "switch_in", "switch_out")})
        metrics["dissect/seconds"] = seconds
        self.history.extend(entries.values())
        self.last_step = step
        any_layer = next(iter(dissection.values()))
        return DissectionReport(step=step, epoch=epoch, seconds=seconds, dissection=dissection, entries=entries,
                                history=self.history, metrics=metrics, categories=list(any_layer.categories),
                                iou_threshold=any_layer.iou_threshold)

    def _write(self, report: DissectionReport) -> None:
        if self.dirpath is None:
            return
        folder = self.dirpath / f"step={report.step}"
        for layer, result in report.dissection.items():
            result.to_csv(folder / f"{layer}.csv")
        if self.save_json:
            report.dissection.to_json(folder / "dissection.json")
        self.write_history()

    def _strips(self, model: nn.Module, probe: ProbeSet, report: DissectionReport) -> dict[str, Any]:
        """Strips of each layer's top and switched units, saved under `<dirpath>/step=<step>/strips/` and shown.

        A failure here warns and leaves the dissection's numbers, files and other media intact.
        """
        shown = any(adapter.shows_media for adapter in self.adapters)
        if not self.strips_per_layer or not self.options["top_k"] or not (shown or self.dirpath is not None):
            return {}
        from lightning_dissect.report.media import report_strip_media

        folder = self.dirpath / f"step={report.step}" if self.dirpath is not None else None
        try:
            with preserved_random_state(model_device(model)), _converted_inputs(probe, self.convert_input):
                return report_strip_media(model, probe, report, self.strips_per_layer, directory=folder,
                                          forward_context=self.forward_context)
        except Exception as error:
            self.warn(f"unit strips at step {report.step} failed and were skipped ({type(error).__name__}: {error})")
            return {}

    def write_history(self) -> None:
        """Rewrite `<dirpath>/history.jsonl` from the history (atomically)."""
        if self.dirpath is None or not self.history:
            return
        with atomic_write(self.dirpath / "history.jsonl") as handle:
            for entry in self.history:
                handle.write(json.dumps(entry) + "\n")

    def _figures_due(self) -> bool:
        """Whether this dissection may draw figures within `figure_budget` (see `__init__`)."""
        now = time.perf_counter()
        if self._clock_start is None:
            self._clock_start = now
        expected = self._figure_seconds + self._last_figure_seconds
        return self.figure_budget is None or expected <= self.figure_budget * (now - self._clock_start)

    def _show(self, report: DissectionReport, figures: bool = True) -> None:
        shown = any(adapter.shows_media for adapter in self.adapters)
        media = make_media(report, figures=figures) if shown else []
        for adapter in self.adapters:
            try:
                adapter.log_scalars(report.metrics, report.step)
                if adapter.shows_media:
                    adapter.log_media(media, report.step)
            except Exception as error:  # one broken logger must not hide the dissection from the others
                if self.on_error == "raise":
                    raise
                self.warn(f"{adapter!r} could not show the dissection at step {report.step} "
                          f"({type(error).__name__}: {error}); the other loggers and the files have it")

    def _apply_budget(self, seconds: float) -> None:
        probe = self.probe
        if self.max_seconds is None or probe is None or seconds <= self.max_seconds:
            return
        size = max(1, math.floor(len(probe) * self.max_seconds / seconds))
        if size < len(probe):
            self.info(f"DissectionCallback: a dissection took {seconds:.1f} s > max_seconds={self.max_seconds}; "
                      f"later dissections use {size} of the {len(probe)} probe images")
            self._probe_size_in_use = size

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The history, the layers, the last dissected step and the probe size in use."""
        return {"version": _STATE_VERSION, "history": list(self.history), "layers": self.layers,
                "last_step": self.last_step, "probe_size_in_use": self._probe_size_in_use}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`; missing keys (older checkpoints) keep their defaults."""
        self.history = list(state.get("history", []))
        self.last_step = state.get("last_step")
        self._probe_size_in_use = state.get("probe_size_in_use")
        if self.requested_layers is None and state.get("layers"):
            self.layers = list(state["layers"])  # keep the automatic choice of the interrupted run


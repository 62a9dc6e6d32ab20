"""`Dissector`: Network Dissection on a schedule, from any training loop.

The dissector decides when to dissect (the schedule), runs the engine, applies the error policy
and the cost budgets, and hands each dissection to the parts that keep and show it: the history
(`history.py`: each unit's concept over the run and its changes, SEMANTICS §5), the run's files
(`run_folder.py`) and the loggers (`loggers.py`, showing `dashboard.py`'s tables and figures). What
depends on the loop it runs in (ranks, precision, loggers, the run's folder) comes in one
`RunContext`: the Lightning callback builds it from the trainer; a plain loop can leave the default.

A dissection never changes the training run: the model is evaluated under `frozen()` (eval mode,
no gradients, every submodule's `training` flag restored) and the Python, NumPy and torch (CPU and
the model's CUDA device) random streams are saved and restored around it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from lightning_dissect import schedule as schedules
from lightning_dissect.broden import Broden
from lightning_dissect.budget import FigureBudget, probe_size_within, validate_max_seconds
from lightning_dissect.dashboard import DissectionReport
from lightning_dissect.distributed import default_synchronizer, guard, slowest
from lightning_dissect.engine.dissect import (
    _as_rotation,
    _Synchronizer,
    check_layers,
    choose_layers,
    dissect,
    frozen,
    model_device,
    validate_options,
)
from lightning_dissect.engine.rotation import Rotation
from lightning_dissect.history import HistoryEntry
from lightning_dissect.loggers import LoggerGroup
from lightning_dissect.probe import ProbeSet
from lightning_dissect.probe_source import ProbeSource, load_probe, resized_probe
from lightning_dissect.result import Dissection
from lightning_dissect.run_folder import RunFolder
from lightning_dissect.schedule import Schedule

log = logging.getLogger(__name__)

OnError = Literal["warn", "raise"]
ON_ERROR: tuple[OnError, ...] = ("warn", "raise")


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


@dataclass
class RunContext:
    """What a dissection needs to know about the loop it runs in.

    Attributes:
        synchronizer: shards the probe over the ranks of a distributed run and combines the
            results exactly (`lightning_dissect.distributed`); None: a single process (or a
            `torch.distributed` group, found by the engine).
        forward_context: a context manager factory around every forward pass (a precision context).
        convert_input: applied to the probe's model input (a precision plugin's `convert_input`).
        is_global_zero: only global rank zero writes files and shows media.
        loggers: where scalars, tables and figures are shown.
        dirpath: the run's dissections folder; None writes no files.
        info, warn: where messages go (Lightning's rank-zero logging under the callback).
    """

    synchronizer: _Synchronizer | None = None
    forward_context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
    convert_input: Callable[[torch.Tensor], torch.Tensor] | None = None
    is_global_zero: bool = True
    loggers: LoggerGroup = field(default_factory=LoggerGroup)
    dirpath: Path | None = None
    info: Callable[[str], None] = log.info
    warn: Callable[[str], None] = _warn  # a module function: ddp_spawn pickles the dissector


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
            them. None draws them at every dissection (`budget.FigureBudget`).
        strips_per_layer: unit strips drawn, shown and saved per layer at each dissection that
            draws (the highest-scoring units, plus the units that switched concept); 0: none.

    Raises:
        ValueError: an option out of range, naming the argument.
    """

    def __init__(
        self,
        probe: ProbeSource = None,
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
        dirpath: str | os.PathLike[str] | None = None,
        save_json: bool = True,
        loggers: Sequence[Any] = (),
        on_error: OnError = "warn",
        figure_budget: float | None = 0.02,
        strips_per_layer: int = 4,
    ) -> None:
        validate_options(quantile, iou_threshold, denominator, batch_size, top_k)
        if not (probe is None or isinstance(probe, (ProbeSet, Broden, str, os.PathLike))):
            raise ValueError(f"probe={probe!r} must be a ProbeSet, a Broden, a path, 'synthetic' or None")
        self.requested_layers = _checked_layers(layers)
        self.schedule = _one_schedule(schedule, every_n_steps, every_n_epochs)
        for name, value in (("probe_size", probe_size), ("image_size", image_size)):
            _check_positive_int(name, value)
        _check_positive_int("strips_per_layer", strips_per_layer, zero=True)
        validate_max_seconds(max_seconds)
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r} must be one of {list(ON_ERROR)}")
        if prefix_tokens is not None and (not isinstance(prefix_tokens, int) or prefix_tokens < 0):
            raise ValueError(f"prefix_tokens={prefix_tokens!r} must be a non-negative integer or None")
        self.figure_budget = FigureBudget(figure_budget)
        self.probe_source = probe
        self.options: dict[str, Any] = dict(quantile=quantile, iou_threshold=iou_threshold, denominator=denominator,
                            batch_size=batch_size, rotation=_as_rotation(rotation), prefix_tokens=prefix_tokens,
                            top_k=top_k)
        self.probe_size, self.probe_seed, self.image_size = probe_size, probe_seed, image_size
        self.max_seconds = max_seconds
        self.save_json = save_json
        self.on_error = on_error
        self.strips_per_layer = strips_per_layer
        # The context of a plain loop; the callback passes its own to every call.
        self.context = RunContext(loggers=LoggerGroup(loggers), dirpath=Path(dirpath) if dirpath is not None else None)

        self.probe: ProbeSet | None = None
        self.layers: list[str] | None = None
        self.history: list[HistoryEntry] = []
        self.last_step: int | None = None
        self._probe_size_in_use: int | None = None  # set by max_seconds, restored by load_state_dict

    # ------------------------------------------------------------------ setup

    def load_probe(self) -> ProbeSet:
        """Build the probe (once). Raises when it does not load (see `probe_source.load_probe`)."""
        if self.probe is None:
            self.probe = load_probe(self.probe_source, self.probe_size, self.probe_seed, self.image_size)
        if self._probe_size_in_use is not None and self._probe_size_in_use < len(self.probe):
            self.probe = resized_probe(self.probe, self._probe_size_in_use)
        return self.probe

    def setup(self, model: nn.Module, context: RunContext | None = None) -> list[str]:
        """Load the probe, choose or check the layers with one probe batch, and return them.

        The batch runs under `frozen()` with the random streams preserved, so
        the model and the run are unchanged. Called by the first `maybe_run`
        when not called before.

        Raises:
            DissectionError, BrodenError, ValueError: a probe that does not load, an
                unknown layer (with close matches), a layer without spatial output.
        """
        context = context or self.context
        probe = self.load_probe()
        layers = self.layers or self.requested_layers
        device = model_device(model)
        forward_context = context.forward_context or contextlib.nullcontext
        with (preserved_random_state(device), _converted_inputs(probe, context.convert_input), frozen(model),
              forward_context()):
            inputs = probe.model_input(list(range(min(2, len(probe)))), device)
            if layers is None:
                layers = choose_layers(model, inputs)
                context.info(f"DissectionCallback: dissecting {layers} (the deepest modules with spatial output; "
                             "pass layers=[...] to choose)")
            check_layers(model, inputs, layers, self.options["prefix_tokens"])
        self.layers = list(layers)
        return self.layers

    # ------------------------------------------------------------------ running

    def due(self, step: int, ended_epoch: int | None = None) -> bool:
        """Whether the schedule asks for a dissection now that was not taken yet (see `Schedule.due`)."""
        return step != self.last_step and self.schedule.due(step, ended_epoch)

    def maybe_run(self, model: nn.Module, step: int, epoch: int | None = None, epoch_end: bool = False,
                  context: RunContext | None = None) -> DissectionReport | None:
        """Dissect `model` when the schedule says so.

        Args:
            model: the model being trained.
            step: optimizer steps taken so far (0: before training).
            epoch: the current epoch (0-based), recorded in the history; None if unknown.
            epoch_end: True when called at the end of `epoch` (what `every_n_epochs` waits for).
            context: the loop's `RunContext`; default this dissector's own (files in `dirpath`,
                its `loggers`, a single process).

        Returns:
            The report, or None when nothing was due (or the dissection failed
            under `on_error="warn"`).
        """
        if not self.due(step, epoch if epoch_end else None):
            return None
        context = context or self.context
        if self.layers is None:
            self.setup(model, context)  # outside the try: configuration errors always raise
        try:
            return self.run(model, step, epoch, context)
        except Exception as error:
            if self.on_error == "raise":
                raise
            context.warn(f"the dissection at step {step} failed and was skipped ({type(error).__name__}: {error}); "
                         "training goes on. Pass on_error='raise' to stop instead.")
            return None

    def run(self, model: nn.Module, step: int, epoch: int | None = None,
            context: RunContext | None = None) -> DissectionReport:
        """Dissect `model` now, record it in the history, write the files and show it."""
        context = context or self.context
        if self.layers is None:
            self.setup(model, context)
        assert self.layers is not None
        probe = self.load_probe()
        device = model_device(model)
        synchronizer = context.synchronizer or default_synchronizer()
        started = time.perf_counter()
        # Under several ranks a failure anywhere in here raises on every rank (lightning_dissect.distributed).
        with guard(synchronizer):
            with preserved_random_state(device), _converted_inputs(probe, context.convert_input):
                dissection = dissect(model, probe, self.layers, **self.options,
                                     forward_context=context.forward_context, synchronizer=synchronizer)
            seconds = slowest(synchronizer, time.perf_counter() - started)  # the same on every rank
            report = self._record(dissection, step, epoch, seconds)
            if context.is_global_zero:
                self._keep_and_show(model, probe, report, context)
        size = probe_size_within(seconds, self.max_seconds, len(probe))
        if size is not None:
            context.info(f"DissectionCallback: a dissection took {seconds:.1f} s > max_seconds={self.max_seconds}; "
                         f"later dissections use {size} of the {len(probe)} probe images")
            self._probe_size_in_use = size
        return report

    def _record(self, dissection: Dissection, step: int, epoch: int | None, seconds: float) -> DissectionReport:
        """Add the dissection's entries to the history; the report with its scalars."""
        entries: dict[str, HistoryEntry] = {}
        switched: dict[str, dict[int, str]] = {}
        metrics: dict[str, float] = {}
        for layer, result in dissection.items():
            previous = next((old for old in reversed(self.history) if old.layer == layer), None)
            entry = HistoryEntry.of(result, step, epoch, probe_size=dissection.settings["probe_size"],
                                    seconds=seconds, previous=previous)
            entries[layer] = entry
            switched[layer] = {unit: previous.label[unit] for unit in entry.switched_units} if previous else {}
            metrics.update({f"dissect/{layer}/{name}": float(value) for name, value in entry.summary.items()})
            metrics.update({f"dissect/{layer}/{name}": float(value) for name, value in (entry.changes or {}).items()})
        metrics["dissect/seconds"] = seconds
        self.history.extend(entries.values())
        self.last_step = step
        any_layer = next(iter(dissection.values()))
        return DissectionReport(step=step, epoch=epoch, seconds=seconds, dissection=dissection, entries=entries,
                                history=self.history, metrics=metrics, categories=list(any_layer.categories),
                                iou_threshold=any_layer.iou_threshold, switched=switched)

    def _keep_and_show(self, model: nn.Module, probe: ProbeSet, report: DissectionReport,
                       context: RunContext) -> None:
        """On rank zero: the strips (when the figure budget allows), the files, and the loggers."""
        figures = self.figure_budget.due()
        drawing = time.perf_counter()
        if figures:
            report.strips = self._strips(model, probe, report, context)
        folder = RunFolder(context.dirpath) if context.dirpath is not None else None
        if folder is not None:
            folder.write_dissection(report.step, report.dissection, self.save_json)
            folder.write_history(self.history)
        context.loggers.show(report, figures, self.on_error, context.warn)
        if figures:
            self.figure_budget.spent(time.perf_counter() - drawing)

    def _strips(self, model: nn.Module, probe: ProbeSet, report: DissectionReport,
                context: RunContext) -> dict[str, Any]:
        """Strips of each layer's top and switched units, saved under `<dirpath>/step=<step>/strips/` and shown.

        A failure here warns and leaves the dissection's numbers, files and other media intact.
        """
        wanted = context.loggers.shows_media or context.dirpath is not None
        if not self.strips_per_layer or not self.options["top_k"] or not wanted:
            return {}
        from lightning_dissect.report.media import strip_media  # matplotlib and PIL, imported when drawn

        folder = RunFolder(context.dirpath).step_folder(report.step) if context.dirpath is not None else None
        try:
            with preserved_random_state(model_device(model)), _converted_inputs(probe, context.convert_input):
                return strip_media(model, probe, report.dissection, self.strips_per_layer, report.switched,
                                   directory=folder, forward_context=context.forward_context)
        except Exception as error:
            context.warn(f"unit strips at step {report.step} failed and were skipped ({type(error).__name__}: {error})")
            return {}

    def write_history(self, context: RunContext | None = None) -> None:
        """Rewrite `<dirpath>/history.jsonl` from the history (atomically)."""
        context = context or self.context
        if context.dirpath is not None and self.history:
            RunFolder(context.dirpath).write_history(self.history)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The history, the layers, the last dissected step and the probe size in use (JSON values)."""
        return {"history": [entry.to_dict() for entry in self.history], "layers": self.layers,
                "last_step": self.last_step, "probe_size_in_use": self._probe_size_in_use}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`; missing keys (older checkpoints) keep their defaults."""
        threshold = float(self.options["iou_threshold"])
        self.history = [HistoryEntry.from_dict(entry, threshold) for entry in state.get("history", [])]
        self.last_step = state.get("last_step")
        self._probe_size_in_use = state.get("probe_size_in_use")
        if self.requested_layers is None and state.get("layers"):
            self.layers = list(state["layers"])  # keep the automatic choice of the interrupted run


# ---------------------------------------------------------------------- argument checks


def _checked_layers(layers: str | Sequence[str] | None) -> list[str] | None:
    if isinstance(layers, str):
        layers = [layers]
    if layers is not None and (not layers or not all(isinstance(name, str) and name for name in layers)):
        raise ValueError(f"layers={layers!r} must be None (automatic) or a non-empty list of module names")
    return list(layers) if layers is not None else None


def _one_schedule(schedule: Schedule | None, every_n_steps: int | None, every_n_epochs: int | None) -> Schedule:
    given = [name for name, value in (("schedule", schedule), ("every_n_steps", every_n_steps),
                                      ("every_n_epochs", every_n_epochs)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"pass one of schedule, every_n_steps and every_n_epochs, not {' and '.join(given)}")
    if every_n_steps is not None:
        return schedules.every_n_steps(every_n_steps)
    if every_n_epochs is not None:
        return schedules.every_n_epochs(every_n_epochs)
    if schedule is not None and not isinstance(schedule, Schedule):
        raise ValueError(f"schedule={schedule!r} must be a Schedule, e.g. log_spaced() or every_n_steps(100)")
    return schedule if schedule is not None else schedules.log_spaced()


def _check_positive_int(name: str, value: object, zero: bool = False) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if zero else 1):
        kind = "a non-negative" if zero else "a positive"
        raise ValueError(f"{name}={value!r} must be {kind} integer" + ("" if zero else " or None"))

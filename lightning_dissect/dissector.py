"""`Dissector`: Network Dissection on a schedule, from any training loop.

The dissector decides when to dissect (the schedule), runs the engine, applies the error policy
and the cost budgets, and hands each dissection to the parts that keep and show it: the history
(`history.py`: each unit's concept over the run and its changes, SEMANTICS §5), the run's files
(`run_folder.py`) and the loggers (`loggers.py`, showing `dashboard.py`'s tables and figures). What
depends on the loop it runs in (ranks, precision, loggers, the run's folder) comes in one
`RunContext`: the Lightning callback builds it from the trainer; a plain loop can leave the default.

Before the first dissection of a run, `plan` decides once what the whole run is dissected on: the
probe's images at the model's input size and a probe size that keeps the callback's cost within
`max_overhead` of the fit (`budget.py`); every dissection of the run then uses that probe, so the
numbers at different steps are comparable. A dissection the budget cannot afford is skipped, the
earliest first (in a run too short to afford it, also the one at step 0); the last one (`finish`,
the final model) always happens.

A dissection never changes the training run: the model is evaluated under `frozen()` (eval mode,
no gradients, every submodule's `training` flag restored) and the Python, NumPy and torch (CPU and
the model's CUDA device) random streams are saved and restored around it.
"""

from __future__ import annotations

import contextlib
import logging
import math
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
from lightning_dissect.budget import FigureBudget, OverheadBudget, validate_max_seconds
from lightning_dissect.concept_source import ConceptDataset
from lightning_dissect.dashboard import DissectionReport
from lightning_dissect.engine.capture import cast_to_model, check_layers, frozen, model_device
from lightning_dissect.engine.compiled import plain_names, uncompiled
from lightning_dissect.engine.dissect import validate_options
from lightning_dissect.engine.layer_choice import choose_layers
from lightning_dissect.engine.layouts import Grid, validate_grid, validate_layouts, validate_prefix_tokens
from lightning_dissect.engine.rotation import Rotation, as_rotation
from lightning_dissect.engine.sync import Synchronizer, default_synchronizer, guard, slowest
from lightning_dissect.history import HistoryEntry
from lightning_dissect.loggers import LoggerGroup
from lightning_dissect.probe import ProbeSet
from lightning_dissect.probe_source import ProbeSource, load_probe, probe_at_input_size
from lightning_dissect.result import Dissection, dissect
from lightning_dissect.run_folder import RunFolder
from lightning_dissect.schedule import Schedule
from lightning_dissect.stability import STABLE_PROBE_SIZE, STABLE_VALUES_ABOVE_THRESHOLD, unstable_probe

log = logging.getLogger(__name__)

OnError = Literal["warn", "raise"]
# The fewest probe images the budget cuts a probe to: below it, dissections are skipped instead.
# (How counts vary with the probe's size: docs/performance.md, "Probe size and stable counts".)
MIN_PROBE_SIZE = 200
ON_ERROR: tuple[OnError, ...] = ("warn", "raise")


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


@dataclass
class RunContext:
    """What a dissection needs to know about the loop it runs in.

    Attributes:
        synchronizer: shards the probe over the ranks of a distributed run and combines the
            results exactly (`lightning_dissect.engine.sync`); None: a single process (or a
            `torch.distributed` group, found by the engine).
        forward_context: a context manager factory around every forward pass (a precision context).
        convert_input: applied to the probe's model input (a precision plugin's `convert_input`).
        is_global_zero: only global rank zero writes files and shows media.
        total_steps: the run's training steps (inf: unknown), for the overhead budget.
        steps_per_epoch: optimizer steps per epoch (None: unknown), to plan epoch schedules.
        loggers: where scalars, tables and figures are shown.
        dirpath: the run's dissections folder; None writes no files.
        run_id: the run's id, written into its folder's markers (`run_folder.py`).
        info, warn: where messages go (Lightning's rank-zero logging under the callback).
    """

    synchronizer: Synchronizer | None = None
    forward_context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
    convert_input: Callable[[torch.Tensor], torch.Tensor] | None = None
    is_global_zero: bool = True
    total_steps: float = math.inf
    steps_per_epoch: int | None = None
    loggers: LoggerGroup = field(default_factory=LoggerGroup)
    dirpath: Path | None = None
    run_id: str | None = None
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
        probe: a `ProbeSet`, a `ConceptDataset` (`ProbeSet.from_dataset`), a `Broden`, a Broden
            directory, `"synthetic"`, or None for the Broden dataset of `$LIGHTNING_DISSECT_BRODEN` or the
            cache (downloaded on first use).
        layers: module names (`model.named_modules()`; for a compiled submodule with or without
            `_orig_mod.`, kept and logged without it); None chooses them on the first run
            (`engine.layer_choice.choose_layers`: the last outputs of the deepest feature stages).
        schedule: when to dissect; default `log_spaced()`. Or pass `every_n_steps=`
            or `every_n_epochs=` instead.
        quantile, iou_threshold, denominator, batch_size, rotation, prefix_tokens, top_k:
            the engine's options (`lightning_dissect.dissect`).
        layouts: layer -> `"NCHW"` or `"NHWC"`, for layers whose output layout the model does not
            tell (`lightning_dissect.dissect`; refused otherwise, before training, with the way to state it).
        grid: the patch grid `(h, w)` of token layers, or layer -> `(h, w)`, where the model does not
            state it (`lightning_dissect.dissect`).
        probe_size: images in the probe (a cost budget): default all of a `ProbeSet`,
            else 1000 (or all images of a smaller dataset).
        probe_seed: seed of the image draw when the probe is built here.
        image_size: resize probe images to this size for the model.
        max_overhead: the callback's own time (dissections, figures, files) stays within this
            fraction of the fit's wall time (default 5%): the probe is sized once for the run, and
            scheduled dissections that would not fit are skipped, the earliest first (`budget.py`).
            None: every scheduled dissection, on the whole probe.
        max_seconds: size the probe once so that one dissection takes about this long.
        at_end: dissect the final model when the run ends (`finish`), unless that step was dissected.
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
        layouts: Mapping[str, str] | None = None,
        grid: Grid | Mapping[str, Grid] | None = None,
        top_k: int = 10,
        probe_size: int | None = None,
        probe_seed: int = 0,
        image_size: int | None = None,
        max_overhead: float | None = 0.05,
        max_seconds: float | None = None,
        at_end: bool = True,
        dirpath: str | os.PathLike[str] | None = None,
        save_json: bool = True,
        loggers: Sequence[Any] = (),
        on_error: OnError = "warn",
        figure_budget: float | None = 0.02,
        strips_per_layer: int = 4,
    ) -> None:
        validate_options(quantile, iou_threshold, denominator, batch_size, top_k)
        if not (probe is None or isinstance(probe, (ProbeSet, ConceptDataset, Broden, str, os.PathLike))):
            raise ValueError(f"probe={probe!r} must be a ProbeSet, a ConceptDataset, a Broden, a path, 'synthetic' "
                             f"or None")
        self.requested_layers = _checked_layers(layers)
        self.schedule = _one_schedule(schedule, every_n_steps, every_n_epochs)
        for name, value in (("probe_size", probe_size), ("image_size", image_size)):
            _check_positive_int(name, value)
        _check_positive_int("strips_per_layer", strips_per_layer, zero=True)
        validate_max_seconds(max_seconds)
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r} must be one of {list(ON_ERROR)}")
        validate_prefix_tokens(prefix_tokens)
        layouts = validate_layouts(layouts) or None
        grid = validate_grid(grid)
        if not isinstance(at_end, bool):
            raise ValueError(f"at_end={at_end!r} must be True or False")
        self.figure_budget = FigureBudget(figure_budget)
        self.budget = OverheadBudget(max_overhead)
        self.probe_source = probe
        self.options: dict[str, Any] = dict(quantile=quantile, iou_threshold=iou_threshold, denominator=denominator,
                            batch_size=batch_size, rotation=as_rotation(rotation), prefix_tokens=prefix_tokens,
                            top_k=top_k, layouts=layouts, grid=grid)
        self.probe_size, self.probe_seed, self.image_size = probe_size, probe_seed, image_size
        self.max_seconds = max_seconds
        self.at_end = at_end
        self.save_json = save_json
        self.on_error = on_error
        self.strips_per_layer = strips_per_layer
        # The context of a plain loop; the callback passes its own to every call.
        self.context = RunContext(loggers=LoggerGroup(loggers), dirpath=Path(dirpath) if dirpath is not None else None)

        self.loaded_probe: ProbeSet | None = None  # as given, before `plan`
        self.probe: ProbeSet | None = None  # what the run is dissected on, set by `plan`
        self.input_size: tuple[int, int] | None = None  # the model's input size, decided by `plan`
        self.layers: list[str] | None = None
        self.history: list[HistoryEntry] = []
        self.last_step: int | None = None
        self.skipped: list[int] = []  # scheduled steps the budget could not afford
        self.unwritten: list[int] = []  # dissected steps whose files could not be written
        self._planned_size: int | None = None  # restored by load_state_dict: a resumed run keeps its probe
        self._seconds_per_image: float | None = None  # measured by the calibration of `plan`
        self._planned_steps: tuple[tuple[float, int | None], list[int]] = ((math.nan, None), [])
        self._last_report: DissectionReport | None = None  # the latest dissection, for `finish`
        self._last_final = False  # whether it drew what a final dissection draws

    # ------------------------------------------------------------------ setup

    def load_probe(self, info: Callable[[str], None] | None = None) -> ProbeSet:
        """Load the probe as given (once; the callback calls it in `setup` to fill the caches early).

        Args:
            info: where to say what a first use generates or downloads (default: this dissector's context).

        Raises:
            DissectionError, BrodenError, ValueError: the probe does not load (see `probe_source.load_probe`).
        """
        if self.loaded_probe is None:
            self.loaded_probe = load_probe(self.probe_source, self.probe_size, self.probe_seed, self.image_size,
                                           info=info or self.context.info)
        return self.loaded_probe

    def plan(self, model: nn.Module, context: RunContext | None = None, *,
             input_size: tuple[int, int] | None = None, total_steps: float = math.inf,
             step_seconds: float | None = None, scheduled: int | None = None) -> ProbeSet:
        """Decide, once per run, the probe the run is dissected on, and choose or check the layers.

        The probe's images go to the model at `input_size` (unless `image_size` was given); with a
        budget (`max_overhead`, `max_seconds`), one calibration dissection of half a probe batch measures
        the seconds per probe image, and the probe is cut to the size the budget affords (a subset of
        the same draw), never below `MIN_PROBE_SIZE` images. The decision is logged in one line.
        A resumed run (`load_state_dict`) keeps the size it had. Called by the first `maybe_run`
        when not called before.

        Args:
            model: the model being trained.
            context: the loop's `RunContext`.
            input_size: `(height, width)` of the model's training images (the callback reads the
                first training batch); None keeps the probe's own size.
            total_steps: the run's training steps (inf: unknown).
            step_seconds: the expected wall time of a training step (None: unknown).
            scheduled: how many dissections the run is expected to ask for, first and last included.

        Returns:
            The probe of the run (`self.probe`).

        Raises:
            DissectionError, BrodenError, ValueError: a probe that does not load, an unknown layer
                (with close matches), a layer without spatial output.
        """
        if self.probe is not None:
            return self.probe
        context = context or self.context
        started, spent = time.perf_counter(), self.budget.own_seconds
        loaded = self.load_probe(context.info)
        if self.image_size is not None:
            size: tuple[int, int] | None = (self.image_size, self.image_size)
        else:
            size = self.input_size or input_size  # a resumed run keeps the size it had
        probe = probe_at_input_size(loaded, size)
        self.input_size = probe.image_size or (int(probe.images.shape[-2]), int(probe.images.shape[-1]))
        self.setup(model, context, probe)
        planned = self._planned_size
        if planned is None and (self.budget.max_overhead is not None or self.max_seconds is not None):
            planned = self._afford(model, context, probe, total_steps, step_seconds, scheduled)
        if planned is not None and planned < len(probe):
            probe = probe.subset(planned)
        self.probe, self._planned_size = probe, len(probe)
        if self._seconds_per_image is not None:
            self.budget.expected_seconds = self._seconds_per_image * len(probe)
        where = ("the size of the training images" if size is not None and self.image_size is None
                 else "image_size" if self.image_size is not None else "the probe's own size")
        outlook = self.budget.expected(scheduled, total_steps) if scheduled else None
        if outlook is None or scheduled is None:
            expected = (f"{scheduled} dissections expected, " if scheduled is not None else "") + "cost not estimated"
        else:
            count, share = outlook
            expected = (f"{count} of {scheduled} scheduled dissections expected" if count < scheduled
                        else f"{count} dissections expected") + (" (the last, never skipped)" if count == 1 else "") + (
                f", about {100 * share:.1f}% of the fit")
        budget = (f"max_overhead={self.budget.max_overhead}" if self.budget.max_overhead is not None
                  else "no overhead budget")
        context.info(f"DissectionCallback: probe of {len(probe)} of {len(loaded)} images at "
                     f"{self.input_size[0]}x{self.input_size[1]} ({where}); {expected} ({budget})")
        # The plan's own time (the probe loaded and resized, the layers chosen and checked) is the callback's
        # too; the calibration in it was counted already.
        self.budget.spent(time.perf_counter() - started - (self.budget.own_seconds - spent), dissection=False)
        return probe

    def _afford(self, model: nn.Module, context: RunContext, probe: ProbeSet, total_steps: float,
                step_seconds: float | None, scheduled: int | None) -> int:
        """The probe size the budget affords, from a calibration dissection of half a probe batch."""
        assert self.layers is not None
        calibration = probe.subset(min(len(probe), max(1, self.options["batch_size"] // 2)))
        started = time.perf_counter()
        with guard(context.synchronizer or default_synchronizer()):
            self._dissect(model, calibration, self.layers, context)
        seconds = time.perf_counter() - started
        self.budget.spent(seconds, dissection=False)
        self._seconds_per_image = seconds / len(calibration)
        smallest = min(len(probe), MIN_PROBE_SIZE)
        size = len(probe)
        if step_seconds is not None and scheduled is not None:
            size = self.budget.plan_probe_size(self._seconds_per_image, step_seconds, total_steps, scheduled,
                                               len(probe), smallest)
        if self.max_seconds is not None:
            size = min(size, max(smallest, math.floor(self.max_seconds / self._seconds_per_image)))
        return size

    def setup(self, model: nn.Module, context: RunContext | None = None, probe: ProbeSet | None = None) -> list[str]:
        """Choose or check the layers with one probe batch, and return them.

        The batch runs under `frozen()` with the random streams preserved, so the model and the run
        are unchanged.

        Raises:
            DissectionError: an unknown layer (with close matches), a layer that does not run once
                per forward pass, a layer without two spatial axes or with one position, a layout or
                token grid the model does not tell and no option states.
        """
        context = context or self.context
        probe = probe or self.probe or self.load_probe()
        layers = self.layers or self.requested_layers
        device = model_device(model)
        forward_context = context.forward_context or contextlib.nullcontext
        # A compiled model or submodule is run (and its layers named) as its original (engine/compiled.py).
        with (preserved_random_state(device), _converted_inputs(probe, context.convert_input),
              uncompiled(model) as plain, frozen(plain), forward_context()):
            inputs = cast_to_model(probe.model_input(list(range(min(2, len(probe)))), device), plain)
            if layers is None:
                layers = choose_layers(plain, inputs)
                context.info(f"DissectionCallback: dissecting {layers}, chosen automatically (the last outputs of "
                             "the deepest feature stages; pass layers=[...] to choose)")
            check_layers(plain, inputs, layers, self.options["prefix_tokens"], layouts=self.options["layouts"],
                         grid=self.options["grid"])
        self.layers = list(layers)
        return self.layers

    # ------------------------------------------------------------------ running

    def due(self, step: int, ended_epoch: int | None = None) -> bool:
        """Whether the schedule asks for a dissection now that was not taken yet (see `Schedule.due`)."""
        return step != self.last_step and self.schedule.due(step, ended_epoch)

    def maybe_run(self, model: nn.Module, step: int, epoch: int | None = None, epoch_end: bool = False,
                  context: RunContext | None = None) -> DissectionReport | None:
        """Dissect `model` when the schedule says so and the budget affords it.

        Args:
            model: the model being trained.
            step: optimizer steps taken so far (0: before training).
            epoch: the current epoch (0-based), recorded in the history; None if unknown.
            epoch_end: True when called at the end of `epoch` (what `every_n_epochs` waits for).
            context: the loop's `RunContext`; default this dissector's own (files in `dirpath`,
                its `loggers`, a single process).

        Returns:
            The report, or None when nothing was due, the budget skipped it (`skipped` lists the
            steps), or the dissection failed under `on_error="warn"`.
        """
        if not self.due(step, epoch if epoch_end else None):
            return None
        context = context or self.context
        self.budget.start()
        if self.probe is None:
            self.plan(model, context)  # outside the try: configuration errors always raise
        if not self._affordable(step, context):
            self.skipped.append(step)
            return None
        return self._run_or_warn(model, step, epoch, context, final=False)

    def finish(self, model: nn.Module, step: int, epoch: int | None = None,
               context: RunContext | None = None) -> DissectionReport | None:
        """Dissect the final model (`at_end`), unless `step` was dissected already.

        The final dissection is never skipped by the budget, always draws its figures, and saves the
        strip of every detector, so the report has a picture on every detector's card.
        """
        context = context or self.context
        if not self.at_end:
            return None
        if step == self.last_step:
            # Dissected on the schedule just before the end: draw what a final dissection draws, if it did not.
            last = self._last_report
            if last is not None and not self._last_final and context.is_global_zero and self.probe is not None:
                started = time.perf_counter()
                self._keep_and_show(model, self.probe, last, context, figures=True, final=True, again=True)
                self._last_final = True
                seconds = time.perf_counter() - started
                self.budget.spent(seconds, dissection=False, drawing=seconds)
            return None
        if self.probe is None:
            self.plan(model, context)
        if step in self.skipped:
            self.skipped.remove(step)  # skipped as a scheduled step, dissected as the final model
        return self._run_or_warn(model, step, epoch, context, final=True)

    def _affordable(self, step: int, context: RunContext) -> bool:
        """The budget's `keep`, agreed by every rank (each measures its own clock): skip when any rank would."""
        if self.budget.max_overhead is None:
            return True
        key = (context.total_steps, context.steps_per_epoch)
        if self._planned_steps[0] != key:  # once per run: a long run has many steps to go through
            self._planned_steps = (key, self.schedule.planned_steps(*key))
        planned = self._planned_steps[1]
        later = sum(1 for planned_step in planned if planned_step > step)
        if self.at_end and (not planned or planned[-1] < context.total_steps):
            later += 1  # the final dissection
        keep = self.budget.keep(step, context.total_steps, later, first=not self.history)
        return slowest(context.synchronizer or default_synchronizer(), float(not keep)) == 0.0

    def _run_or_warn(self, model: nn.Module, step: int, epoch: int | None, context: RunContext,
                     final: bool) -> DissectionReport | None:
        try:
            return self.run(model, step, epoch, context, final=final)
        except Exception as error:
            if self.on_error == "raise":
                raise
            context.warn(f"the dissection at step {step} failed and was skipped ({type(error).__name__}: {error}); "
                         "training goes on. Pass on_error='raise' to stop instead.")
            return None

    def run(self, model: nn.Module, step: int, epoch: int | None = None, context: RunContext | None = None,
            final: bool = False) -> DissectionReport:
        """Dissect `model` now, record it in the history, write the files and show it.

        Args:
            final: the run's last dissection: figures are drawn whatever the figure budget, and every
                detector's strip is saved.
        """
        context = context or self.context
        started = time.perf_counter()
        self.budget.start()
        probe = self.plan(model, context)
        final = final or step >= context.total_steps  # the run's last step: known for a run of known length
        assert self.layers is not None
        synchronizer = context.synchronizer or default_synchronizer()
        first = not self.history
        # Under several ranks a failure anywhere in here raises on every rank (lightning_dissect.engine.sync).
        with guard(synchronizer):
            dissection = self._dissect(model, probe, self.layers, context)
            dissection.settings["input_size"] = list(self.input_size or ())
            seconds = slowest(synchronizer, time.perf_counter() - started)  # the same on every rank
            report = self._record(dissection, step, epoch, seconds)
            drawing = 0.0
            if context.is_global_zero:
                drawing = self._keep_and_show(model, probe, report, context, figures=first or final, final=final)
            self._last_report, self._last_final = report, final
        self.budget.spent(time.perf_counter() - started, drawing=drawing)
        if first:
            self._warn_if_unstable(dissection, context)
        context.info(f"DissectionCallback: step {step}, {seconds:.1f} s: " + "; ".join(
            f"{layer} {entry.summary['unique_concepts']:.0f} unique concepts, {entry.summary['detectors']:.0f} "
            f"detectors" for layer, entry in report.entries.items()))
        return report

    def _warn_if_unstable(self, dissection: Dissection, context: RunContext) -> None:
        """Say once, at the run's first dissection, when the probe is too small for stable counts
        (`lightning_dissect.stability`, measured in docs/performance.md)."""
        positions = {layer: shape[1] * shape[2] for layer, shape in dissection.settings["unit_maps"].items()}
        reason = unstable_probe(dissection.settings["probe_size"], self.options["quantile"], positions)
        if reason is None:
            return
        cut = (f" (the cost budget cut it from {len(self.loaded_probe)})"
               if self.loaded_probe is not None and len(self.loaded_probe) > dissection.settings["probe_size"] else "")
        context.warn(f"the probe{cut} is too small for stable counts: {reason}. Detector counts and labels vary "
                     f"with the probe's draw below {STABLE_PROBE_SIZE} images and {STABLE_VALUES_ABOVE_THRESHOLD} "
                     "activations per unit above a threshold (docs/performance.md, 'Probe size and stable counts'). "
                     "Pass a larger probe_size, a larger image_size, a larger max_overhead or max_overhead=None "
                     "(said once)")

    def _dissect(self, model: nn.Module, probe: ProbeSet, layers: Sequence[str], context: RunContext) -> Dissection:
        with preserved_random_state(model_device(model)), _converted_inputs(probe, context.convert_input):
            return dissect(model, probe, layers, **self.options, forward_context=context.forward_context,
                           synchronizer=context.synchronizer or default_synchronizer())

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

    def _keep_and_show(self, model: nn.Module, probe: ProbeSet, report: DissectionReport, context: RunContext,
                       figures: bool, final: bool, again: bool = False) -> float:
        """On rank zero: the strips (when the figure budget allows, or `figures`), the files, and the loggers.

        `again`: the report was kept and shown already; only its strips and figures are added.
        Returns the seconds the drawing took (strips, figures and showing them; 0 when nothing was drawn).
        """
        figures = self.figure_budget.due() or figures
        drawing = time.perf_counter()
        if figures:
            report.strips = self._strips(model, probe, report, context, every_detector=final)
        if context.dirpath is not None and not again:
            self._write_files(RunFolder(context.dirpath), report, context)
        context.loggers.show(report, figures, self.on_error, context.warn, scalars=not again)
        if not figures:
            return 0.0
        seconds = time.perf_counter() - drawing
        self.figure_budget.spent(seconds)
        return seconds

    def _write_files(self, folder: RunFolder, report: DissectionReport, context: RunContext) -> None:
        """The dissection's files and the history. A folder that cannot be written (read-only, full) warns
        once: the dissection stays in the history and the loggers, and its step is not marked complete."""
        try:
            folder.write_dissection(report.step, report.dissection, self.save_json, context.run_id)
            folder.write_history(self.history)
        except OSError as error:
            if self.on_error == "raise":
                raise
            if not self.unwritten:
                context.warn(f"the files of the dissection at step {report.step} could not be written to "
                             f"{folder.directory} ({type(error).__name__}: {error}); the dissections go on in the "
                             "history and the loggers, without files (said once)")
            self.unwritten.append(report.step)

    def _strips(self, model: nn.Module, probe: ProbeSet, report: DissectionReport, context: RunContext,
                every_detector: bool = False) -> dict[str, Any]:
        """Strips of each layer's top and switched units, saved under `<dirpath>/step=<step>/strips/` and shown.

        With `every_detector`, every detector's strip is saved too (only the top and switched ones are shown).
        A failure here warns and leaves the dissection's numbers, files and other media intact.
        """
        wanted = context.loggers.shows_media or context.dirpath is not None
        if not self.strips_per_layer or not self.options["top_k"] or not wanted:
            return {}
        from lightning_dissect.report.media import select_units, strip_media  # matplotlib and PIL, when drawn

        folder = RunFolder(context.dirpath).step_folder(report.step) if context.dirpath is not None else None
        count = self.strips_per_layer
        if every_detector:
            count = max([count] + [int(result.detectors.sum()) for result in report.dissection.values()])
        try:
            with preserved_random_state(model_device(model)), _converted_inputs(probe, context.convert_input):
                strips = strip_media(model, probe, report.dissection, count, report.switched, directory=folder,
                                     forward_context=context.forward_context)
        except Exception as error:
            context.warn(f"unit strips at step {report.step} failed and were skipped ({type(error).__name__}: {error})")
            return {}
        shown = {f"dissect/{layer}/strips/unit_{unit}" for layer, result in report.dissection.items()
                 for unit in select_units(result, self.strips_per_layer, list(report.switched.get(layer, {})))}
        return {tag: image for tag, image in strips.items() if tag in shown}

    def write_history(self, context: RunContext | None = None) -> None:
        """Rewrite `<dirpath>/history.jsonl` from the history (atomically)."""
        context = context or self.context
        if context.dirpath is not None and self.history:
            try:
                RunFolder(context.dirpath).write_history(self.history)
            except OSError as error:
                if self.on_error == "raise":
                    raise
                context.warn(f"{context.dirpath}: the history could not be written ({error})")

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on as one run (JSON values): the history, the layers, the last
        dissected step, the probe size and input size decided by `plan`, the skipped steps, the schedule."""
        return {"history": [entry.to_dict() for entry in self.history], "layers": self.layers,
                "last_step": self.last_step, "probe_size": self._planned_size,
                "input_size": list(self.input_size) if self.input_size is not None else None,
                "skipped": list(self.skipped), "schedule": repr(self.schedule)}

    def load_state_dict(self, state: Mapping[str, Any], warn: Callable[[str], None] = _warn) -> None:
        """Restore `state_dict()`; missing keys (older checkpoints) keep their defaults.

        A checkpoint taken under another schedule keeps its history; `warn` says so once.
        """
        threshold = float(self.options["iou_threshold"])
        self.history = [HistoryEntry.from_dict(entry, threshold) for entry in state.get("history", [])]
        self.last_step = state.get("last_step")
        self.skipped = list(state.get("skipped", []))
        self._planned_size = state.get("probe_size") or state.get("probe_size_in_use")
        if state.get("input_size"):
            self.input_size = (int(state["input_size"][0]), int(state["input_size"][1]))
        if self.requested_layers is None and state.get("layers"):
            self.layers = plain_names(state["layers"])  # keep the automatic choice of the interrupted run
        saved_schedule = state.get("schedule")
        if saved_schedule is not None and saved_schedule != repr(self.schedule):
            warn(f"DissectionCallback: the checkpoint was dissected on the schedule {saved_schedule}, this run uses "
                 f"{self.schedule!r}; the history of {len(self.history)} entries is kept and goes on under the new "
                 "schedule")


# ---------------------------------------------------------------------- argument checks


def _checked_layers(layers: str | Sequence[str] | None) -> list[str] | None:
    """The layer names as the original model names them (a compiled wrapper's `_orig_mod.` left out)."""
    if isinstance(layers, str):
        layers = [layers]
    if layers is not None and (not layers or not all(isinstance(name, str) and name for name in layers)):
        raise ValueError(f"layers={layers!r} must be None (automatic) or a non-empty list of module names")
    return plain_names(layers) if layers is not None else None


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

"""`DissectionCallback`: live Network Dissection while a Lightning `Trainer` fits.

The callback is a thin adapter over `Dissector`: it reads the trainer (step, epoch, loggers, log
directory, precision, rank) into a `RunContext` and decides nothing else. One implementation
(`DissectionHooks`) serves both Lightning packages, each class with its package's own `Callback`
base:

- `DissectionCallback` subclasses `lightning.pytorch.Callback` (or
  `pytorch_lightning.Callback` where only that package is installed);
- `PLDissectionCallback` subclasses `pytorch_lightning.Callback` (where it is installed).

This module imports Lightning; `import lightning_dissect` does not (it imports this module on
first use of either name).

Logged, per layer, at `step=trainer.global_step` (and put in
`trainer.callback_metrics`, so `ModelCheckpoint` and `EarlyStopping` can monitor them):
`dissect/<layer>/detectors`, `dissect/<layer>/detectors/<category>`,
`dissect/<layer>/unique_concepts`, `dissect/<layer>/unique_concepts/<category>`,
`dissect/<layer>/unique_top_concepts`, `dissect/<layer>/mean_score`,
`dissect/<layer>/switches`, `dissect/<layer>/switch_in`, `dissect/<layer>/switch_out`
(from the second dissection of a layer on) and `dissect/seconds`.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import math
import os
import re
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

# Imported at run time, not under TYPE_CHECKING: LightningCLI (jsonargparse) resolves the annotations
# of __init__ to parse configs.
from lightning_dissect.broden import Broden
from lightning_dissect.concept_source import ConceptDataset
from lightning_dissect.dashboard import DissectionReport
from lightning_dissect.dissector import Dissector, OnError, RunContext, preserved_random_state
from lightning_dissect.distributed import StrategySynchronizer, check_strategy, local_zero_first
from lightning_dissect.engine.capture import frozen, model_device
from lightning_dissect.engine.compiled import uncompiled
from lightning_dissect.engine.errors import DissectionError
from lightning_dissect.engine.rotation import Rotation
from lightning_dissect.loggers import LoggerGroup
from lightning_dissect.probe import ProbeSet
from lightning_dissect.run_folder import RunFolder, RunFolderTaken
from lightning_dissect.schedule import Schedule

_LIGHTNING_NAMESPACE = "lightning.pytorch"
try:
    from lightning.pytorch import Callback as _LightningCallback
except ImportError:  # only the standalone package: DissectionCallback falls back to it
    from pytorch_lightning import Callback as _LightningCallback  # type: ignore[assignment]

    _LIGHTNING_NAMESPACE = "pytorch_lightning"

try:
    import pytorch_lightning as _pytorch_lightning
except ImportError:
    _pytorch_lightning = None  # type: ignore[assignment]

__all__ = ["DissectionCallback", "DissectionHooks", "PLDissectionCallback"]


class DissectionHooks:
    """Dissects the model being fit on a schedule and logs what its units detect.

    With no arguments the probe is the Broden dataset (`$LIGHTNING_DISSECT_BRODEN`,
    or the cache, downloaded on first use), the layers are the deepest modules
    with spatial output, and dissections run at step 0 and at log-spaced steps
    1, 2, 4, 9, 20, 44, ...

    Configuration errors (an unknown layer, a probe that does not load, a layer
    without spatial output) stop `fit` before the first training step: the
    probe is loaded in `setup`, the layers are checked with one probe batch in
    `on_fit_start` (once the model is on its device). Nothing runs during the
    sanity check, under `fast_dev_run`, or outside `fit`.

    A run with the callback ends bit-identical to the same run without it (see
    `Dissector`). Only global rank zero writes files and logs media.

    Args:
        probe: a `ProbeSet`, a `ConceptDataset` (any segmentation dataset: `lightning_dissect.datasets`),
            a `Broden`, a Broden directory, `"synthetic"`, or None.
        layers: module names of the `LightningModule` (e.g. `"backbone.layer4"`); None: automatic.
        schedule: a `Schedule` (`log_spaced()` by default, `every_n_steps(n)`, ...),
            or pass `every_n_steps=` / `every_n_epochs=`.
        quantile, iou_threshold, denominator, batch_size, rotation, prefix_tokens, top_k:
            the engine's options (`lightning_dissect.dissect`).
        layouts: layer -> `"NCHW"` or `"NHWC"` (channels-last), for layers whose output layout the
            model does not tell, e.g. `{"model.features.7": "NHWC"}`; an ambiguous layer is refused
            before the first training step with a message saying so.
        grid: the patch grid `(h, w)` of token layers (or layer -> `(h, w)`) where the model does not
            state it (timm's `patch_embed.grid_size` and torchvision's `patch_size` are read).
        probe_size, probe_seed, image_size: the probe (`Dissector`); unless `image_size` is given, the probe's
            images go to the model at the size of the first training batch's images.
        max_overhead, max_seconds, figure_budget: the cost budget (`Dissector`, `budget.py`): by default
            everything the callback does takes at most 5% of the fit's wall time.
        at_end: dissect the final model when the fit ends (however it ends), unless that step was dissected.
        dirpath: the run's dissections folder; default one folder per run: `<log_dir>/dissections` under
            TensorBoard and CSV loggers, `<save_dir>/dissections/<run id>` under W&B and MLflow,
            `<default_root_dir>/dissections/version_<n>` without a logger. A resumed run continues its folder.
        save_json: also write each dissection's `dissection.json`.
        on_error: `"warn"` (default): a failing periodic dissection warns and
            training goes on; `"raise"`: it stops the fit.
        strips_per_layer: unit strips per layer at each dissection that draws (`Dissector`).

    Attributes:
        dissector: the `Dissector` doing the work; `dissector.history` is the timeline.

    Example:
        >>> from lightning.pytorch import Trainer                                 # doctest: +SKIP
        >>> trainer = Trainer(callbacks=[DissectionCallback(probe="synthetic")])  # doctest: +SKIP
    """

    _namespace = _LIGHTNING_NAMESPACE

    def __init__(
        self,
        probe: ProbeSet | ConceptDataset | Broden | str | None = None,
        layers: str | list[str] | None = None,
        schedule: Schedule | None = None,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        quantile: float = 0.005,
        iou_threshold: float = 0.04,
        denominator: str = "paper",
        batch_size: int = 64,
        rotation: Rotation | dict[str, Any] | torch.Tensor | None = None,
        prefix_tokens: int | None = None,
        layouts: dict[str, str] | None = None,
        grid: tuple[int, int] | dict[str, tuple[int, int]] | None = None,
        top_k: int = 10,
        probe_size: int | None = None,
        probe_seed: int = 0,
        image_size: int | None = None,
        max_overhead: float | None = 0.05,
        max_seconds: float | None = None,
        at_end: bool = True,
        dirpath: str | os.PathLike[str] | None = None,
        save_json: bool = True,
        on_error: OnError = "warn",
        figure_budget: float | None = 0.02,
        strips_per_layer: int = 4,
    ) -> None:
        # The options are spelled out (not **kwargs) so LightningCLI and help() see them.
        super().__init__()
        self.dissector = Dissector(
            probe, layers, schedule, every_n_steps=every_n_steps, every_n_epochs=every_n_epochs, quantile=quantile,
            iou_threshold=iou_threshold, denominator=denominator, batch_size=batch_size, rotation=rotation,
            prefix_tokens=prefix_tokens, layouts=layouts, grid=grid, top_k=top_k, probe_size=probe_size,
            probe_seed=probe_seed,
            image_size=image_size, max_overhead=max_overhead, max_seconds=max_seconds, at_end=at_end, dirpath=dirpath,
            save_json=save_json, on_error=on_error, figure_budget=figure_budget, strips_per_layer=strips_per_layer,
        )
        self._dirpath = Path(dirpath) if dirpath is not None else None
        self._context: RunContext | None = None  # set in setup for a fit that dissects
        self._batch_seen = False  # the first training batch of this fit plans the run
        self._run_id: str | None = None  # one id per run, kept by a resumed run
        self._restored_dirpath: Path | None = None

    @property
    def state_key(self) -> str:
        # The same key in both Lightning packages, so a checkpoint of one resumes in the other. The schedule
        # is not part of it: a resumed run with another schedule keeps its history (and is warned).
        dissector = self.dissector
        rotation: Rotation | None = dissector.options["rotation"]
        return "DissectionCallback" + repr({
            "layers": dissector.requested_layers, "quantile": dissector.options["quantile"],
            "iou_threshold": dissector.options["iou_threshold"], "denominator": dissector.options["denominator"],
            "rotation": rotation.describe() if rotation is not None else None,
        })

    def _rank_zero(self) -> Any:
        return importlib.import_module(f"{self._namespace}.utilities.rank_zero")

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._context = None
        if stage != "fit":
            return
        rank_zero = self._rank_zero()
        if trainer.fast_dev_run:
            rank_zero.rank_zero_info("DissectionCallback: disabled under fast_dev_run")
            return
        check_strategy(trainer.strategy)  # sharded parameters (FSDP, ZeRO-3) are refused here
        context = RunContext(
            # Several ranks: each dissects a share of the probe set, combined exactly through the strategy.
            synchronizer=StrategySynchronizer(trainer.strategy) if trainer.world_size > 1 else None,
            forward_context=trainer.precision_plugin.forward_context,
            convert_input=trainer.precision_plugin.convert_input,
            is_global_zero=trainer.is_global_zero,
            loggers=LoggerGroup(trainer.loggers if trainer.is_global_zero else ()),
            info=rank_zero.rank_zero_info, warn=rank_zero.rank_zero_warn,
        )
        # Each node's local rank zero fills the caches (download, synthetic data, decoded probe) first.
        local_zero_first(context.synchronizer, trainer.local_rank, lambda: self.dissector.load_probe(context.info))
        self._context = context
        self._batch_seen = False

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # After the checkpoint's state is restored (Lightning restores callbacks between setup and this hook).
        if self._context is None:
            return
        context = self._context
        context.run_id = trainer.strategy.broadcast(self._run_id or uuid.uuid4().hex[:12])
        self._run_id = context.run_id
        context.dirpath = self._run_folder(trainer, context.run_id)
        if trainer.is_global_zero:
            self.dissector.write_history(context)  # after a resume: the timeline up to the checkpoint

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._context is None or self._batch_seen:
            return
        # The first training batch of this fit: plan the run (probe size, input size), then the step-0 dissection.
        self._batch_seen = True
        context = self._context
        context.total_steps = float(trainer.estimated_stepping_batches)
        batches = trainer.num_training_batches
        if isinstance(batches, int) and batches > 0:
            context.steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
        self.dissector.budget.start()
        if self.dissector.probe is None:
            images = training_images(batch)
            input_size = (int(images.shape[-2]), int(images.shape[-1])) if images is not None else None
            step_seconds = self._step_seconds(pl_module, images, context) if images is not None else None
            planned = self.dissector.schedule.planned_steps(context.total_steps, context.steps_per_epoch)
            final = self.dissector.at_end and (not planned or planned[-1] < context.total_steps)
            self.dissector.plan(pl_module, context, input_size=input_size, total_steps=context.total_steps,
                                step_seconds=step_seconds, scheduled=len(planned) + int(final))
        self._maybe_run(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._maybe_run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._maybe_run(trainer, pl_module, epoch_end=True)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        # Every way a fit ends without an error (max_steps, max_epochs, early stopping, a time limit) ends here.
        if self._context is None or trainer.sanity_checking or not self._batch_seen:
            return
        report = self.dissector.finish(pl_module, trainer.global_step, trainer.current_epoch, self._context)
        self._publish(trainer, report)
        budget = self.dissector.budget
        skipped = f"; skipped steps {self.dissector.skipped} (max_overhead)" if self.dissector.skipped else ""
        if self.dissector.unwritten:
            skipped += f"; no files for steps {self.dissector.unwritten} ({self._context.dirpath} not writable)"
        count = f"{budget.dissections} dissection{'' if budget.dissections == 1 else 's'}"
        self._context.info(f"DissectionCallback: {count} took {budget.own_seconds:.1f} s "
                           f"in all, {100 * budget.share:.1f}% of the fit{skipped}")

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.dissector.probe is not None:
            self.dissector.probe.release()  # the probe's device copy

    def _maybe_run(self, trainer: Any, pl_module: Any, epoch_end: bool = False) -> None:
        if self._context is None or trainer.sanity_checking or not self._batch_seen:
            return
        report = self.dissector.maybe_run(pl_module, trainer.global_step, trainer.current_epoch, epoch_end,
                                          self._context)
        self._publish(trainer, report)

    @staticmethod
    def _publish(trainer: Any, report: DissectionReport | None) -> None:
        if report is not None:
            trainer.callback_metrics.update({name: torch.tensor(value) for name, value in report.metrics.items()})

    def _step_seconds(self, pl_module: Any, images: torch.Tensor, context: RunContext) -> float:
        """A training step's expected wall time: three eval forward passes of the first batch (forward,
        backward twice as long), timed without changing the model or the random streams."""
        device = model_device(pl_module)
        forward_context = context.forward_context or contextlib.nullcontext
        started = time.perf_counter()
        with preserved_random_state(device), uncompiled(pl_module) as plain, frozen(plain), forward_context():
            plain(images.to(device))
        seconds = time.perf_counter() - started
        self.dissector.budget.spent(seconds, dissection=False)
        return 3 * seconds

    def _run_folder(self, trainer: Any, run_id: str) -> Path:
        """The run's dissections folder, the same on every rank (see `run_folder.py`).

        A resumed run continues the folder of its checkpoint; `dirpath` when given (refused when it
        holds another run's dissections); else one folder per run: `<log_dir>/dissections` for loggers
        whose log directory is the run's (TensorBoard, CSV), `<save_dir>/dissections/<run id>` for W&B,
        MLflow and other loggers with a run id, `<default_root_dir>/dissections/version_<n>` without a logger.
        """
        given = self._dirpath is not None
        folder = self._dirpath or self._restored_dirpath or default_run_folder(trainer)
        if trainer.is_global_zero:
            try:
                folder = claimed_folder(folder, run_id, fixed=given or self._restored_dirpath is not None)
            except OSError as error:  # read-only or full: the dissections go on without files (Dissector says so)
                self._rank_zero().rank_zero_warn(f"DissectionCallback: {folder} cannot be written ({error}); "
                                                 "dissections go on without files")
        return Path(trainer.strategy.broadcast(str(folder)))

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        context = self._context
        dirpath = context.dirpath if context is not None else self._restored_dirpath
        return {**self.dissector.state_dict(), "run_id": self._run_id,
                "dirpath": str(dirpath) if dirpath is not None else None}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.dissector.load_state_dict(state_dict, warn=self._rank_zero().rank_zero_warn)
        self._run_id = state_dict.get("run_id")
        self._restored_dirpath = Path(state_dict["dirpath"]) if state_dict.get("dirpath") else None


def training_images(batch: Any) -> torch.Tensor | None:
    """The images of a training batch: the batch itself or its first element, when a 4-D float tensor."""
    for candidate in (batch, batch[0] if isinstance(batch, (list, tuple)) and batch else None):
        if isinstance(candidate, torch.Tensor) and candidate.ndim == 4 and candidate.is_floating_point():
            return candidate
    return None


def default_run_folder(trainer: Any) -> Path:
    """The dissections folder of a run that names none (see `DissectionHooks._run_folder`); a collective."""
    log_dir = trainer.log_dir  # a broadcast: every rank asks
    logger = trainer.loggers[0] if trainer.loggers else None
    kinds = {cls.__name__ for cls in type(logger).__mro__} if logger is not None else set()
    if kinds & {"TensorBoardLogger", "CSVLogger"}:
        return Path(log_dir) / "dissections"  # the logger's own folder is one run's: version_<n>
    base = Path(log_dir or trainer.default_root_dir) / "dissections"
    version = getattr(logger, "version", None) if logger is not None else None
    if version is not None and str(version):
        return base / str(version)  # W&B, MLflow: the run's id
    return base / "version_0"  # claimed_folder moves on to the next free version_<n>


def claimed_folder(folder: Path, run_id: str, fixed: bool) -> Path:
    """`folder`, claimed for `run_id`; when it holds another run's dissections, the next free sibling
    (`version_<n + 1>`, or `<name>_2`, `<name>_3`, ...), unless `fixed` (a folder the user named).

    Raises:
        DissectionError: a `fixed` folder that holds another run's dissections.
    """
    candidate = folder
    for number in itertools.count(2):
        try:
            RunFolder(candidate).claim(run_id)
            return candidate
        except RunFolderTaken as taken:
            if fixed:
                raise DissectionError(f"dirpath: {taken}; dissections of two runs never share a folder. Pass another "
                                      "dirpath, remove that one, or resume that run from its checkpoint") from None
        match = re.fullmatch(r"version_(\d+)", folder.name)
        name = f"version_{int(match.group(1)) + number - 1}" if match else f"{folder.name}_{number}"
        candidate = folder.with_name(name)
    raise AssertionError("unreachable")


class DissectionCallback(DissectionHooks, _LightningCallback):
    __doc__ = DissectionHooks.__doc__


if _pytorch_lightning is not None:

    class PLDissectionCallback(DissectionHooks, _pytorch_lightning.Callback):
        __doc__ = DissectionHooks.__doc__
        _namespace = "pytorch_lightning"

else:

    def __getattr__(name: str) -> Any:
        if name == "PLDissectionCallback":
            raise ImportError("PLDissectionCallback needs the pytorch_lightning package: pip install pytorch-lightning")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

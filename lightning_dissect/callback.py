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

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

# Imported at run time, not under TYPE_CHECKING: LightningCLI (jsonargparse) resolves the annotations
# of __init__ to parse configs.
from lightning_dissect.broden import Broden
from lightning_dissect.dissector import Dissector, OnError, RunContext
from lightning_dissect.distributed import StrategySynchronizer, check_strategy, local_zero_first
from lightning_dissect.engine.rotation import Rotation
from lightning_dissect.loggers import LoggerGroup
from lightning_dissect.probe import ProbeSet
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
        probe: a `ProbeSet`, a `Broden`, a Broden directory, `"synthetic"`, or None.
        layers: module names of the `LightningModule` (e.g. `"backbone.layer4"`); None: automatic.
        schedule: a `Schedule` (`log_spaced()` by default, `every_n_steps(n)`, ...),
            or pass `every_n_steps=` / `every_n_epochs=`.
        quantile, iou_threshold, denominator, batch_size, rotation, prefix_tokens, top_k:
            the engine's options (`lightning_dissect.dissect`).
        probe_size, probe_seed, image_size, max_seconds: the probe and the cost budget (`Dissector`).
        dirpath: where files go; default `<trainer.log_dir>/dissections`.
        save_json: also write each dissection's `dissection.json`.
        on_error: `"warn"` (default): a failing periodic dissection warns and
            training goes on; `"raise"`: it stops the fit.
        figure_budget: the largest fraction of wall time that drawing strips and figures may
            take (default 0.02, see `Dissector`); None: figures at every dissection.
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
        probe: ProbeSet | Broden | str | None = None,
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
        top_k: int = 10,
        probe_size: int | None = None,
        probe_seed: int = 0,
        image_size: int | None = None,
        max_seconds: float | None = None,
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
            prefix_tokens=prefix_tokens, top_k=top_k, probe_size=probe_size, probe_seed=probe_seed,
            image_size=image_size, max_seconds=max_seconds, dirpath=dirpath, save_json=save_json, on_error=on_error,
            figure_budget=figure_budget, strips_per_layer=strips_per_layer,
        )
        self._dirpath = Path(dirpath) if dirpath is not None else None
        self._context: RunContext | None = None  # set in setup for a fit that dissects

    @property
    def state_key(self) -> str:
        # The same key in both Lightning packages, so a checkpoint of one resumes in the other.
        dissector = self.dissector
        rotation: Rotation | None = dissector.options["rotation"]
        return "DissectionCallback" + repr({
            "layers": dissector.requested_layers, "quantile": dissector.options["quantile"],
            "iou_threshold": dissector.options["iou_threshold"], "denominator": dissector.options["denominator"],
            "rotation": rotation.describe() if rotation is not None else None, "schedule": repr(dissector.schedule),
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
        log_dir = trainer.log_dir  # a broadcast: every rank asks
        context = RunContext(
            # Several ranks: each dissects a share of the probe set, combined exactly through the strategy.
            synchronizer=StrategySynchronizer(trainer.strategy) if trainer.world_size > 1 else None,
            forward_context=trainer.precision_plugin.forward_context,
            convert_input=trainer.precision_plugin.convert_input,
            is_global_zero=trainer.is_global_zero,
            loggers=LoggerGroup(trainer.loggers if trainer.is_global_zero else ()),
            dirpath=self._dirpath or Path(log_dir or trainer.default_root_dir) / "dissections",
            info=rank_zero.rank_zero_info, warn=rank_zero.rank_zero_warn,
        )
        # Each node's local rank zero fills the caches (download, synthetic data, decoded probe) first.
        local_zero_first(context.synchronizer, trainer.local_rank, self.dissector.load_probe)
        self._context = context

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self._context is None:
            return
        self.dissector.setup(pl_module, self._context)
        if trainer.is_global_zero:
            self.dissector.write_history(self._context)  # after a resume: the timeline up to the checkpoint

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._maybe_run(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._maybe_run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._maybe_run(trainer, pl_module, epoch_end=True)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.dissector.probe is not None:
            self.dissector.probe.release()  # the probe's device copy

    def _maybe_run(self, trainer: Any, pl_module: Any, epoch_end: bool = False) -> None:
        if self._context is None or trainer.sanity_checking:
            return
        report = self.dissector.maybe_run(pl_module, trainer.global_step, trainer.current_epoch, epoch_end,
                                          self._context)
        if report is not None:
            trainer.callback_metrics.update({name: torch.tensor(value) for name, value in report.metrics.items()})

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return self.dissector.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.dissector.load_state_dict(state_dict)


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
